"""A rehearsal of ``book/paper_scale.md`` on stand-ins: the page's own ``esmerge`` commands, run by the CLI.

One module fixture builds a tiny LLaMA-3.1-shaped base (GQA, llama3 RoPE, untied head, bf16 shards with
an index, LLaMA-3 chat tokenizer) and the three published specialists in their upstream layouts
(``rehearsal_standins``), then runs every ``esmerge`` command of the page's ``bash`` blocks, read from
the page itself and expanded by bash (``rehearsal_standins.page_commands``), through ``esmerge.cli.main``.

What changes between the page and the rehearsal is explicit:

* ``standin_ids``: each real hub id or path on the page -> its stand-in (``/models/Llama-3.1-8B-Instruct``
  and ``meta-llama/Llama-3.1-8B-Instruct`` -> the base stand-in; the two checkpoints' hub ids -> their
  stand-in folders; ``FINETUNED`` -> a full fine-tune; ``OUT`` -> ``extracted/cell``). Relative paths
  (``data_manifest/...``, ``runs/...``) are kept: each block runs in a working folder of its own
  (``WORKDIRS``), so they land there.
* ``BUDGET``: the GPU-sized budgets shrunk to CI size (the dry runs keep the page's: their plans are
  of the real run). Each entry says why.
* setup of the real machine (``make``, ``pip``, ``huggingface-cli``) is skipped; ``esmerge data fetch``
  runs (it only checks the files when all are present).
* Mol-LLaMA runs its own encoder (``esmerge.specialists.mol_llama``, built from the card as for a user): its
  frozen MoleculeSTM and Uni-Mol come from a fake, offline Hugging Face hub cache (``HF_HOME`` under the
  rehearsal's folder), where ``huggingface-cli download`` would have put them.

AdaMerging and Avg+FT need task prompts, which ``esmerge merge`` does not build; the page runs them in
the notebooks. The rehearsal makes the same library calls as ``esmerge.run.all_methods`` at the smoke
scale's declared budgets, so every method of the registry is merged.
"""
from __future__ import annotations

import io
import json
import re
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

import pytest
import rehearsal_standins as rs
import torch

from esmerge import methods, scales
from esmerge.specialists import encoders
from esmerge.specialists.base_llm import checkpoint_sha256

PAGE = Path(__file__).resolve().parents[1] / "book" / "paper_scale.md"
# Page section -> the working folder its block runs in, in the order they run. "Commands" converts the same
# checkpoints to the same folders as the recipe, so it gets a folder of its own (the recipe would otherwise be
# refused its outputs); "Merging at paper scale" reads the three specialists: after the recipe, in its folder.
WORKDIRS = {"Commands": "commands", "Reproducing Tables 1-2 on a GPU": "recipe", "Merging at paper scale": "recipe"}
BUDGET = {
    # CPU instead of the GPU; 2 steps; the stand-in tokenizer is byte-level (one token per character, where
    # LLaMA-3's spends one per ~4), so a top-50-gene cell prompt needs more than the recipe's 384 tokens.
    "train": {"replace": {"--device": "cpu"}, "add": ["--steps", "2", "--batch-size", "2", "--max-tokens", "1024"]},
    "merge": {"add": ["--probe-k", "3"]},  # 3 probe samples per modality, not 110
    "merge:es": {"add": ["--set", "n_projections=16"]},  # sliced-Wasserstein projections, not 1024
    "merge:es-layer": {"add": ["--set", "n_projections=16"]},
    "merge:es-element": {"add": ["--set", "n_projections=16"]},
    "merge:ls-merge": {"add": ["--set", "epochs=3"]},  # VAE epochs, not 1000
    # n = 2 per benchmark, replies of 2 tokens (a random model never writes <|eot_id|>: it would run to 256), one
    # retrieved shot instead of 3 (attention over prompts of ESM-2 protein blocks dominates the CI time)
    "evaluate": {"replace": {"--n-eval": "2"}, "add": ["--max-new-tokens", "2", "--n-shots", "1"]},
}
MERGES = "runs/paper/06_merging"


def standin_ids(root: Path, sources: dict[str, Path]) -> dict[str, str]:
    """The page's real ids and paths -> the stand-ins under ``root``."""
    base = str(root / "llama")
    return {"/models/Llama-3.1-8B-Instruct": base, "meta-llama/Llama-3.1-8B-Instruct": base,
            "DongkiKim/Mol-Llama-3.1-8B-Instruct": str(sources["mol"]),
            "xiao-fei/Prot2Text-V2-11B-Instruct-hf": str(sources["p2t"]),
            "FINETUNED": str(sources["cell"]), "OUT": "extracted/cell"}


def run_order() -> list[tuple[str, str]]:
    """``(heading, block)`` of the page's bash blocks in the rehearsal's order (``WORKDIRS``)."""
    blocks = dict(rs.page_blocks(PAGE))
    return [(heading, blocks[heading]) for heading in WORKDIRS]


def _missing_data() -> str:
    from esmerge.data import files

    try:
        bad = [s for s in files.verify() if s.status != "ok"]
    except files.DataError as err:
        return str(err)
    return f"upstream data file {bad[0].path} is {bad[0].status}: set ESMERGE_DATA_DIR or run `esmerge data fetch`" \
        if bad else ""


@dataclass
class Run:
    heading: str
    argv: list[str]
    code: int
    out: str
    err: str
    seconds: float


@dataclass
class Rehearsal:
    root: Path
    ids: dict[str, str]
    runs: list[Run]
    skipped: list[str]
    seconds: float
    built: list[tuple[str, str, object]]  # (card kind, class, graph_weights) of each encoder a command built

    def one(self, *words: str) -> Run:
        """The single run whose argv holds every one of ``words`` (e.g. ``"evaluate", "--dry-run"``)."""
        found = [r for r in self.runs if all(w in r.argv for w in words)]
        assert len(found) == 1, (words, [r.argv for r in found])
        return found[0]


def _cli(heading: str, argv: list[str]) -> Run:
    from esmerge.cli import main

    out, err, start = io.StringIO(), io.StringIO(), time.perf_counter()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(argv[1:])
    return Run(heading, argv, code, out.getvalue(), err.getvalue(), time.perf_counter() - start)


def _data_driven_baselines() -> None:
    """AdaMerging and Avg+FT as ``esmerge.run.all_methods.merge_every_method`` runs them, at the smoke
    scale's declared budgets (one benchmark, 2 steps; 4 training rows, 1 epoch), on the paper context."""
    from esmerge.evaluate.sweep import EvalConfig
    from esmerge.run import baseline_inputs
    from esmerge.run.merge import build_context, merge_once

    budgets, paper = scales.get("smoke").merge_budgets, scales.get("paper")
    context = build_context(paper)
    config = EvalConfig.for_scale(paper, n_eval=2)
    benchmark = budgets.benchmarks[0]
    context.extras.update(baseline_inputs.adamerging_extras(
        context.base, context.specialists, [benchmark], budgets.adamerging_prompts_per_benchmark,
        budgets.adamerging_batch, config))
    merge_once("adamerging", f"{MERGES}/adamerging", context, steps=budgets.adamerging_steps, progress=False)
    context.extras.update(baseline_inputs.finetune_extras(
        context.base, context.specialists, benchmark, budgets.ft_examples, budgets.ft_batch, config))
    merge_once("avg-ft", f"{MERGES}/avg-ft/{benchmark}", context, epochs=budgets.ft_epochs, progress=False)


def _offline_hub_cache(mp: pytest.MonkeyPatch, home: Path) -> Path:
    """An offline Hugging Face hub cache at ``home/hub`` (``rs.upstream_sources`` fills it), set as a user's
    environment sets it (``HF_HOME``, ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``); huggingface_hub reads those when
    it is first imported, so its already-read constants follow them too. Nothing is ever downloaded."""
    from huggingface_hub import constants

    cache = home / "hub"
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", "1")):
        mp.setenv(name, value)
    mp.setattr(constants, "HF_HOME", str(home))
    mp.setattr(constants, "HF_HUB_CACHE", str(cache))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _record_encoder_builds(mp: pytest.MonkeyPatch) -> list[tuple[str, str, object]]:
    """Every ``encoders.build_encoder`` call of the run, as ``(card kind, class built, graph_weights)``; the
    builders themselves are the library's (nothing is registered), so the record is what a user's run built."""
    built, real = [], encoders.build_encoder

    def recording(entry, projector, encoder, folder):
        module = real(entry, projector, encoder, folder)
        built.append((entry.get("kind"), type(module).__name__, getattr(module, "graph_weights", None)))
        return module

    mp.setattr(encoders, "build_encoder", recording)
    return built


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    """Everything built and run once: the stand-ins, then each page block's commands in its folder."""
    missing = _missing_data()
    if missing:
        pytest.skip(f"the rehearsal needs the upstream data files: {missing}")
    start, threads = time.perf_counter(), torch.get_num_threads()
    root = tmp_path_factory.mktemp("rehearsal")
    mp = pytest.MonkeyPatch()
    try:
        torch.set_num_threads(1)
        mp.setenv("ESMERGE_CACHE", str(root / "cache"))
        mp.setenv("ESMERGE_RUNS_DIR", str(root / "runs-root"))  # `esmerge evaluate`'s default results folder
        for name in ("ESMERGE_PAPER_BASE", "ESMERGE_PAPER_SPECIALISTS"):  # only the page's exports count
            mp.delenv(name, raising=False)
        hub_cache = _offline_hub_cache(mp, root / "hf-home")
        built = _record_encoder_builds(mp)
        base_model = rs.save_llama31_base(root / "llama")
        ids = standin_ids(root, rs.upstream_sources(root / "upstream", root / "llama", base_model, hub_cache))
        runs, skipped = [], []
        for heading, block in run_order():
            (root / WORKDIRS[heading]).mkdir(exist_ok=True)
            mp.chdir(root / WORKDIRS[heading])
            argvs, exported, setup = rs.page_commands(block)
            skipped += setup
            for name, value in exported.items():
                mp.setenv(name, rs.substitute([value], ids, {})[0])
            runs += [_cli(heading, rs.substitute(argv, ids, BUDGET)) for argv in argvs]
        with redirect_stderr(io.StringIO()):  # progress bars; an error still raises
            _data_driven_baselines()  # in the recipe's folder, with its exported variables
        yield Rehearsal(root, ids, runs, skipped, time.perf_counter() - start, built)
    finally:
        mp.undo()
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the page and the rehearsal agree
def test_every_page_command_maps_to_a_standin():
    """Each bash block sits under a known section; every hub id or absolute path on the page is in the mapping,
    and every mapped id is still on the page (no stale entry)."""
    blocks = rs.page_blocks(PAGE)
    assert sorted(h for h, _ in blocks) == sorted(WORKDIRS)
    ids = standin_ids(Path("/standin"), {"mol": Path("/m"), "p2t": Path("/p"), "cell": Path("/c")})
    words = set()
    for _, block in blocks:
        argvs, exported, setup = rs.page_commands(block)
        assert set(setup) <= set(rs.SETUP_COMMANDS)
        words |= {w for argv in argvs for w in argv} | set(exported.values())
    real = {w for w in words if w.startswith("/") or re.fullmatch(r"[\w.-]+/[\w.-]+", w) or w.isupper()}
    assert real == set(ids)


def test_the_page_covers_the_whole_pipeline():
    """Converters of all three upstream layouts, the cell substitute, both dry runs, a merge by every registry
    method that needs no task data, and one evaluation of the base, the specialists and every merge."""
    argvs = [a for _, block in rs.page_blocks(PAGE) for a in rs.page_commands(block)[0]]
    assert {a[2] for a in argvs if a[1] == "convert"} == {"mol-llama", "prot2text", "lora-extract"}
    assert any(a[1] == "train" and rs.flags(a)["--modality"] == ["cell"] for a in argvs)
    assert {a[1] for a in argvs if "--dry-run" in a} == {"merge", "evaluate"}
    merged = {rs.flags(a)["--method"][0]: rs.flags(a)["--out"][0] for a in argvs
              if a[1] == "merge" and "--dry-run" not in a and MERGES in rs.flags(a)["--out"][0]}
    assert set(merged) == set(methods.names()) - set(methods.needing("data"))
    evaluations = [rs.flags(a)["--model"] for a in argvs if a[1] == "evaluate" and "--dry-run" not in a]
    assert evaluations == [["base", *(f"specialist-{m}" for m in encoders.MODALITIES), *merged.values()]]


def test_the_rehearsal_ran_every_page_command(rehearsal):
    expected = [rs.substitute(argv, rehearsal.ids, BUDGET) for _, block in run_order()
                for argv in rs.page_commands(block)[0]]
    assert [r.argv for r in rehearsal.runs] == expected
    failed = [(" ".join(r.argv[1:4]), r.err.strip().splitlines()[-1:]) for r in rehearsal.runs if r.code != 0]
    assert failed == []
    assert sorted(set(rehearsal.skipped)) == sorted(rs.SETUP_COMMANDS)
    print(f"rehearsal: {len(rehearsal.runs)} commands in {rehearsal.seconds:.0f} s; slowest: "
          + ", ".join(f"{' '.join(r.argv[1:4])} {r.seconds:.1f} s"
                      for r in sorted(rehearsal.runs, key=lambda r: -r.seconds)[:3]))


# --------------------------------------------------------------------------- what each step left behind
def test_converted_and_trained_specialists_record_the_base(rehearsal):
    root, sha = rehearsal.root, checkpoint_sha256(rehearsal.root / "llama")
    specialists = root / "recipe" / "data_manifest" / "specialists" / "paper"
    folders = [specialists / m for m in encoders.MODALITIES] + [
        root / "commands" / "data_manifest" / "specialists" / "paper" / m for m in ("molecule", "protein")] + [
        root / "commands" / "extracted" / "cell"]
    for folder in folders:
        assert rs.card(folder)["base_weights_sha256"] == sha, folder
    # Mol-LLaMA with and without --base (the base its config.json names): one and the same adapter.
    same = [(f / "molecule" / "adapter_model.safetensors").read_bytes() for f in
            (specialists, root / "commands" / "data_manifest" / "specialists" / "paper")]
    assert same[0] == same[1] and rs.card(specialists / "molecule")["base_identity"] == "weights compared"
    extraction = rs.card(root / "commands" / "extracted" / "cell")["extraction"]
    assert list(extraction["changed_other_tensors"]) == ["model.norm.weight"]  # the full fine-tune's moved norm
    protein = rs.card(specialists / "protein")
    assert protein["extraction"]["max_relative_error"] < 0.05  # a rank-8 LoRA merged into bf16 weights
    cell = rs.card(specialists / "cell")
    assert (cell["scale"], cell["steps"], cell["lora"]["r"]) == ("paper", 2, 8)
    from safetensors.torch import load_file

    trained = load_file(specialists / "cell" / "adapter_model.safetensors")
    shapes = {".".join(k.split(".")[-3:-1]): tuple(v.shape) for k, v in trained.items()}
    assert shapes["k_proj.lora_B"] == (16, 8) and shapes["q_proj.lora_B"] == (32, 8)  # GQA: 2 KV heads x 8
    assert any(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)  # moved from PEFT's zero B


def test_dry_runs_print_the_plan_of_the_real_run(rehearsal):
    benchmarks = "benchmarks: BindingDB, BIOSNAP, Human, DrugComb, GDSC2, CYP1A2, CYP2C19, CYP2C9, CYP2D6, " \
                 "CYP3A4, CYP2C9-substrate, CYP2D6-substrate, CYP3A4-substrate"
    merge, evaluate = rehearsal.one("merge", "--dry-run"), rehearsal.one("evaluate", "--dry-run")
    for run, names in ((merge, "models: base, specialist-molecule, specialist-protein, specialist-cell, merged (es)"),
                       (evaluate, f"models: base, specialist-molecule\n{benchmarks}")):
        assert run.code == 0 and run.out.startswith("dry run:"), run.err
        assert names in run.out and "131072 positions" in run.out  # the llama3 config, read without weights
        total = re.search(r"total ([\d.]+ \w?FLOP), peak memory ([\d.]+ \w+), about ([\d.]+) h", run.out)
        assert total and float(total[1].split()[0]) > 0, run.out
        assert run.out.rstrip().endswith("no blocking problem found: the real run may start")
    assert "probe 1092" in merge.out  # 110 probes padded to ESM-2's longest protein: the page's budget, not CI's


def test_every_registry_method_merged_into_its_own_adapter(rehearsal):
    from esmerge.specialists.adapters import is_merged, load_merged

    recipe = rehearsal.root / "recipe"
    folders = {m: recipe / MERGES / m for m in methods.names() if m != "avg-ft"}
    folders["avg-ft"] = recipe / MERGES / "avg-ft" / scales.get("smoke").merge_budgets.benchmarks[0]
    merged = {}
    for method, folder in folders.items():
        assert is_merged(folder), folder  # esmerge.json, written last, is the completion marker
        merged[method] = load_merged(folder)
        assert merged[method].meta["method"] == method and merged[method].meta["scale"] == "paper"
        assert all(torch.isfinite(v).all() for v in merged[method].adapter.state.values()), method
    keys = {m: set(a.adapter.state) for m, a in merged.items()}
    assert len({frozenset(k) for k in keys.values()}) == 1  # every method: the same LoRA tensors
    same = [(a, b) for a, b in combinations(merged, 2)
            if all(torch.equal(merged[a].adapter.state[k], merged[b].adapter.state[k]) for k in keys[a])]
    assert same == []  # no two methods gave the same merge
    # The page's other ES merge (runs/paper/es) is the same command with the same inputs: the same tensors.
    again = load_merged(recipe / "runs" / "paper" / "es")
    assert all(torch.equal(again.adapter.state[k], v) for k, v in merged["es"].adapter.state.items())
    assert set(merged["es"].meta["encoders"]) == {"molecule", "protein"}  # named by folder, not copied


def test_the_evaluation_scored_13_benchmarks_by_generation_for_every_model(rehearsal):
    run = rehearsal.one("evaluate", "--n-eval")
    models = rs.flags(run.argv)["--model"]
    labels = [m if "/" not in m else Path(m).name for m in models]
    found = {}
    for file in (rehearsal.root / "runs-root" / "paper" / "07_results" / "evals").glob("*/*.json"):
        result = json.loads(file.read_text())
        found[(result["method"], result["benchmark"])] = result
    from esmerge.data.benchmarks import BENCHMARK_NAMES

    assert set(found) == {(m, b) for m in labels for b in BENCHMARK_NAMES}  # 14 models x 13 benchmarks
    for key, result in found.items():
        assert (result["n"], result["config"]["scoring"], len(result["replies"])) == (2, "generate", 2), key
        assert 0 <= result["invalid_rate"] <= 100 and len(result["pred"]) == 2, key
    rows = [line.split() for line in run.out.splitlines() if re.match(r"\s*\S+\s+\S+\s+2\s+[\d.]+", line)]
    assert len(rows) == len(labels) * len(BENCHMARK_NAMES)  # the printed table: one row per model and benchmark


def test_the_molecule_specialist_runs_mol_llamas_own_encoder(rehearsal):
    """No stand-in encoder: every command that loaded the converted Mol-LLaMA built its own encoder (MoleculeSTM +
    Uni-Mol + blending + Q-Former + llm_proj) from the card, its frozen graph encoders read from the hub cache."""
    from esmerge.specialists.base_llm import load_paper
    from esmerge.specialists.load import load_specialist
    from esmerge.specialists.mol_llama.encoder import MolLlamaEncoder
    from esmerge.specialists.raw_encoder import RawEncoder

    assert encoders.ENCODER_BUILDERS["mol-llama"].__module__ == encoders.__name__  # the library's builder
    hub = rehearsal.root / "hf-home" / "hub"
    molecule = [(name, graph) for kind, name, graph in rehearsal.built if kind == "mol-llama"]
    assert len(molecule) >= 11 and {name for name, _ in molecule} == {"MolLlamaEncoder"}  # 10 merges + evaluate
    assert all(Path(f["path"]).is_relative_to(hub) for _, graph in molecule for f in graph.values())
    assert "graph encoders in the hub cache" in rehearsal.one("merge", "--dry-run").out
    folder = rehearsal.root / "recipe" / "data_manifest" / "specialists" / "paper" / "molecule"
    recorded = rs.card(folder)["encoder"]["graph_encoder_files"]  # the converter found them in the cache
    spec = load_specialist(folder, load_paper(str(rehearsal.root / "llama"), with_tokenizer=False))
    assert isinstance(spec.projector, MolLlamaEncoder) and isinstance(spec.projector, RawEncoder)
    assert {r: f["sha256"] for r, f in spec.projector.graph_weights.items()} == \
        {r: f["sha256"] for r, f in recorded.items()}
    tokens = spec.projector.blocks(["CC(=O)Oc1ccccc1C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"])  # aspirin, caffeine
    assert tokens.shape == (2, 8, 32) and torch.isfinite(tokens).all()
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3  # the graphs reach the tokens: two molecules, two blocks
