"""Specialist seed replicates: loaded per seed, merged by every method into their own folders, and the
budget curves beside the scale's budgets (smoke scale, tiny budgets)."""
import pytest
import torch

from esmerge import evaluate, scales
from esmerge.errors import UsageError
from esmerge.evaluate.models import merged_models
from esmerge.evaluate.retention_models import retention_models
from esmerge.report import budget_curves
from esmerge.run import all_methods
from esmerge.run.merge import build_context
from esmerge.specialists import per_scale
from esmerge.specialists.adapters import adapter_digest, is_merged


@pytest.fixture(scope="module")
def cache(private_cache):
    torch.set_num_threads(1)


def test_each_specialist_seed_is_its_own_set_and_seed_zero_is_unchanged(cache):
    seed0 = build_context(scales.get("smoke"), 0)
    again = build_context(scales.get("smoke"), 0, specialist_seed=0)
    seed1 = build_context(scales.get("smoke"), 0, specialist_seed=1)
    for m in seed0.specialists:
        assert adapter_digest(seed0.specialists[m].adapter) == adapter_digest(again.specialists[m].adapter)
        assert adapter_digest(seed0.specialists[m].adapter) != adapter_digest(seed1.specialists[m].adapter)
        assert seed1.specialists[m].card["seed"] == 1 and seed0.specialists[m].card["seed"] == 0
    assert seed0.base.weights_sha256 == seed1.base.weights_sha256  # one base: only the specialists vary


def test_paper_scale_has_one_seed_and_a_bad_seed_is_refused(cache):
    base = build_context(scales.get("smoke"), 0).base
    with pytest.raises(UsageError, match="specialist seed 1: the paper scale has one set"):
        per_scale.load_specialists(scales.get("paper"), base, seed=1)
    with pytest.raises(UsageError, match="specialist seed"):
        per_scale.load_specialists(scales.get("smoke"), base, seed=-1)


def test_shipped_cpu_seed_replicates_verify_against_the_manifest():
    dirs = {s: per_scale.verify_shipped("cpu", s) for s in scales.get("cpu").specialist_seeds}
    assert [d["cell"].parent.name for d in dirs.values()] == ["cpu", "cpu-seed1", "cpu-seed2"]


def test_every_method_at_a_second_seed_lands_in_its_own_folder_and_discovery_skips_it(cache, tmp_path):
    budgets = scales.get("smoke").merge_budgets
    config = evaluate.default_config(scales.get("smoke"))
    root = tmp_path / "06_merging"
    for s in (0, 1):
        context = build_context(scales.get("smoke"), 0, specialist_seed=s)
        done = all_methods.merge_every_method(context, all_methods.seed_folder(root, s), budgets, config,
                                              es_variants=("es",))
        assert set(done.adapters) == {*all_methods.TRAINING_FREE, "ls-merge", "adamerging", "es"}
        assert list(done.finetune) == list(budgets.benchmarks)
    curves = all_methods.merge_budget_curves(context, root, budgets, config)
    assert set(curves) == {"adamerging@1", "adamerging@3", "avg-ft@2/GDSC2", "avg-ft@8/GDSC2"}
    assert all(is_merged(root / "curves" / name) for name in curves)
    seed1 = root / "seeds" / "seed1"
    assert is_merged(seed1 / "es") and is_merged(seed1 / "avg-ft" / "GDSC2")
    # the seed-0 merges differ from seed 1's: each seed merges its own specialists
    es0 = (root / "es" / "adapter_model.safetensors").read_bytes()
    assert es0 != (seed1 / "es" / "adapter_model.safetensors").read_bytes()
    # the evaluation and retention chapters find the methods, never "seeds" or "curves" as one
    models, _, notes = merged_models(root, context.base, {}, ["GDSC2"], lambda a, b: a)
    assert "seeds" not in models and "curves" not in models and not any("seeds" in n for n in notes)
    found, notes = retention_models({}, root)
    assert not {"seeds", "curves"} & set(found) and not any("curves" in n for n in notes)
    # a rerun merges nothing again: every folder already holds its method's result
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("esmerge.json")}
    all_methods.merge_every_method(context, all_methods.seed_folder(root, 1), budgets, config, es_variants=("es",))
    assert {p: p.stat().st_mtime_ns for p in root.rglob("esmerge.json")} == stamps


def test_accuracy_curve_averages_avg_ft_over_the_curve_benchmarks_only():
    budgets = scales.MergeBudgets(adamerging_steps=10, ft_examples=8, curve_benchmarks=("A",))
    right, wrong = {"y": [1, 0], "pred": [1, 0]}, {"y": [1, 0], "pred": [0, 1]}
    results = {"avg-ft": {"A": right, "B": wrong}, "avg-ft@4": {"A": wrong}, "adamerging": {"A": right, "B": wrong},
               "ties": {"A": right}}
    curve = budget_curves.accuracy_curve(results, budgets, n_resamples=50).set_index(["method", "budget"])
    assert curve.loc[("avg-ft", 8), "accuracy"] == 100.0  # B, not a curve benchmark, is left out
    assert curve.loc[("avg-ft", 4), "accuracy"] == 0.0
    assert curve.loc[("adamerging", 10), "accuracy"] == 50.0 and bool(curve.loc[("adamerging", 10), "as_run"])
    assert "ties" not in curve.index.get_level_values("method")


def test_the_seed_replicate_assist_merges_exactly_what_the_chapter_would(cache, tmp_path, monkeypatch):
    """06_merging's assist runs the steps backwards in a fresh process: every merge must be the same bytes
    as the chapter's forward run after its other work moved the global RNG, or the book would depend on
    which process merged what."""
    budgets = scales.get("smoke").merge_budgets
    config = evaluate.default_config(scales.get("smoke"))
    forward = tmp_path / "chapter" / "smoke" / "06_merging"
    torch.manual_seed(0)
    torch.rand(1000)  # the chapter's seed-0 merges and curves ran before the replicates
    context = build_context(scales.get("smoke"), 0, specialist_seed=1)
    all_methods.merge_every_method(context, all_methods.seed_folder(forward, 1), budgets, config)

    monkeypatch.setenv("ESMERGE_RUNS_DIR", str(tmp_path / "assist"))
    steps = len(all_methods.method_steps(context, tmp_path / "unused", budgets, config))
    assert all_methods.fill_seed_merges("smoke") == steps  # smoke: seeds (0, 1), so seed 1 only
    backward = tmp_path / "assist" / "smoke" / "06_merging" / "seeds" / "seed1"
    made = sorted(p.relative_to(backward) for p in backward.rglob("adapter_model.safetensors"))
    assert made == sorted(p.relative_to(all_methods.seed_folder(forward, 1))
                          for p in all_methods.seed_folder(forward, 1).rglob("adapter_model.safetensors"))
    assert len(made) == steps
    for rel in made:
        assert (backward / rel).read_bytes() == (all_methods.seed_folder(forward, 1) / rel).read_bytes(), rel
