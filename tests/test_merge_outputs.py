"""Merged-model directories and merge inputs: atomic, locked, refusing, resumable.

Each regression test names the defect it guards; all fail on the code before this change.
"""
from __future__ import annotations

import inspect
import json
import multiprocessing
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from esmerge import methods, scales
from esmerge.errors import EsmergeError, OutputExistsError, UsageError
from esmerge.run import merge
from esmerge.run.merge import MergeContext, merge_once, run_merge
from esmerge.specialists import adapters as adapter_io
from esmerge.specialists.adapters import (
    Adapter,
    AdapterFileError,
    AdapterMismatchError,
    is_merged,
    load_adapter,
    load_merged,
    save_adapter,
)

MODALITIES = ("molecule", "protein", "cell")
KEYS = ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
BASE = SimpleNamespace(name="toy-base", weights_sha256="a" * 64)


def toy_context(seed: int = 0, base=BASE, card=None) -> MergeContext:
    """Three random toy adapters with projectors, as specialists of ``base`` (parameter-space methods only)."""
    gen = torch.Generator().manual_seed(seed)
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "toy-base"}
    specs = {}
    for m in MODALITIES:
        state = {KEYS[0]: torch.randn(2, 5, generator=gen), KEYS[1]: torch.randn(4, 2, generator=gen),
                 KEYS[2]: torch.randn(2, 5, generator=gen)}
        projector = None if m == "cell" else torch.nn.Linear(3, 4)
        specs[m] = SimpleNamespace(modality=m, adapter=Adapter(state, dict(config), m), projector=projector,
                                   card=dict({"base_weights_sha256": base.weights_sha256} if card is None else card))
    return MergeContext(base, specs, "smoke", probe_k=4)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_timing(meta: dict) -> dict:
    meta = dict(meta, wall_seconds=None)
    meta["info"] = {k: v for k, v in meta["info"].items() if k != "cost"}
    return meta


# --------------------------------------------------------------------------- outputs
def test_existing_output_is_refused_and_force_replaces_it_whole(tmp_path):
    """Regression: `--method emr --out D` then `--method avg --out D` exited 0 with EMR's extras left beside avg."""
    context, out = toy_context(), tmp_path / "D"
    run_merge("emr", out, context)
    assert (out / "esmerge_extras.safetensors").is_file()
    with pytest.raises(OutputExistsError, match=r"D already exists \(a finished merge\).*--force"):
        run_merge("avg", out, context)
    assert json.loads((out / "esmerge.json").read_text())["method"] == "emr"  # untouched
    run_merge("avg", out, context, force=True)
    assert json.loads((out / "esmerge.json").read_text())["method"] == "avg"
    assert not (out / "esmerge_extras.safetensors").exists()
    assert sorted(files_of(out)) == ["adapter_config.json", "adapter_model.safetensors", "esmerge.json",
                                     "projectors/molecule.safetensors", "projectors/protein.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["D"]  # no temporary sibling left


def test_marker_is_the_last_file_written(tmp_path, monkeypatch):
    written = []
    real = adapter_io.write_file
    monkeypatch.setattr(adapter_io, "write_file",
                        lambda path, data: written.append(Path(path).name) or real(path, data))
    run_merge("emr", tmp_path / "out", toy_context())
    assert written[-1] == "esmerge.json" and written.count("esmerge.json") == 1
    assert len(written) == 6  # weights, config, extras, two projectors, marker


@pytest.mark.parametrize("method", ["emr", "ties"])
def test_a_merge_stopped_at_every_write_never_looks_finished_and_resumes_identically(tmp_path, monkeypatch, method):
    """Fault injection: the writer raises at the N-th write, for every N. Regression: a stop while
    projectors were written left a folder merge_once treated as finished (the marker came first)."""
    context = toy_context(1)
    reference = tmp_path / "reference"
    merge_once(method, reference, context)
    n_writes = len(files_of(reference))
    real = adapter_io.write_file
    for n in range(1, n_writes + 1):
        out = tmp_path / f"stopped-{n}"
        calls = {"i": 0}

        def failing(path, data, n=n):
            calls["i"] += 1
            if calls["i"] == n:
                real(path, data[: len(data) // 2])  # half a file, then the stop
                raise KeyboardInterrupt(f"stopped at write {n}")
            real(path, data)

        monkeypatch.setattr(adapter_io, "write_file", failing)
        with pytest.raises(KeyboardInterrupt):
            merge_once(method, out, context)
        monkeypatch.setattr(adapter_io, "write_file", real)
        assert not out.exists() and not is_merged(out), n
        with pytest.raises(AdapterFileError, match="not a finished merged model"):
            load_merged(out)
        merge_once(method, out, context)  # the next run resumes
        got, ref = files_of(out), files_of(reference)
        assert got.keys() == ref.keys()
        for name in ref:
            if name != "esmerge.json":
                assert got[name] == ref[name], (n, name)
        assert without_timing(json.loads(got["esmerge.json"])) == without_timing(json.loads(ref["esmerge.json"]))
    assert (sorted(p.name for p in tmp_path.iterdir())
            == ["reference"] + sorted(f"stopped-{n}" for n in range(1, n_writes + 1)))


def test_a_killed_writer_leaves_only_a_temporary_sibling_that_the_next_run_removes(tmp_path):
    context, out = toy_context(), tmp_path / "ties"
    dead = multiprocessing.get_context("fork").Process(target=lambda: None)
    dead.start(), dead.join()  # a pid that no longer runs
    stale = tmp_path / f".ties.partial-{dead.pid}-deadbeef"
    stale.mkdir()
    (stale / "esmerge.json").write_text("{}")  # even a marker inside a partial folder is never read
    assert not is_merged(out)
    merge_once("ties", out, context)
    assert is_merged(out) and not stale.exists()


def _merge_into(out, barrier, results):
    barrier.wait()
    try:
        run_merge("avg", out, toy_context())
        results.put("ok")
    except OutputExistsError as err:
        results.put(f"refused: {err}")


def test_two_merges_into_one_output_one_wins_the_other_refuses(tmp_path):
    """Regression: two merges into the same --out both reported success; the last writer won."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_merge_into, args=(tmp_path / "D", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcomes = sorted(results.get(timeout=5) for _ in procs)
    assert outcomes[0] == "ok" and outcomes[1].startswith("refused: ") and "already exists" in outcomes[1]
    assert is_merged(tmp_path / "D") and [p.name for p in tmp_path.iterdir()] == ["D"]


def test_merge_once_reuses_a_finished_merge_and_refuses_foreign_folders(tmp_path, monkeypatch):
    context, out = toy_context(), tmp_path / "m"
    calls = []
    real = methods.run_checked
    monkeypatch.setattr(methods, "run_checked", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    merge_once("ties", out, context, keep=0.5)
    merge_once("ties", out, context, keep="0.5")  # the same value, as the command line gives it
    assert calls == ["ties"]
    merge_once("ties", out, context, keep=0.3)  # other settings: replaced
    assert calls == ["ties", "ties"] and json.loads((out / "esmerge.json").read_text())["hparams"] == {"keep": 0.3}
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="not a finished merge"):
        merge_once("ties", foreign, context)
    assert (foreign / "mine.txt").read_text() == "keep me"


def test_load_merged_reads_back_what_save_merged_wrote(tmp_path):
    context = toy_context()
    run_merge("emr", tmp_path / "emr", context)
    merged = load_merged(tmp_path / "emr", name="emr")
    fresh = methods.run("emr", [s.adapter for s in context.specialists.values()])
    for key in KEYS:
        torch.testing.assert_close(merged.adapter.state[key], fresh.adapter.state[key])
    assert merged.adapter.extras.keys() == fresh.adapter.extras.keys()
    assert merged.meta["method"] == "emr" and merged.adapter.name == "emr"
    assert set(merged.projectors) == {"molecule", "protein"}
    torch.testing.assert_close(merged.projectors["molecule"]["weight"],
                               context.specialists["molecule"].projector.weight)


# --------------------------------------------------------------------------- inputs
def test_truncated_adapter_is_refused_naming_the_file(tmp_path):
    """Regression: a truncated adapter gave `SafetensorError: incomplete metadata` without the path."""
    adapter = toy_context().specialists["molecule"].adapter
    out = save_adapter(adapter, tmp_path / "a")
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(AdapterFileError, match=f"{weights}: unreadable safetensors file"):
        load_adapter(out)
    weights.write_bytes(b"")
    with pytest.raises(AdapterFileError, match=f"{weights}: unreadable safetensors file"):
        load_adapter(out)
    (out / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="adapter_config.json: unreadable JSON"):
        load_adapter(out)
    with pytest.raises(AdapterFileError, match="not a PEFT adapter directory: adapter_config.json is missing"):
        load_adapter(tmp_path)
    assert issubclass(AdapterFileError, EsmergeError) and issubclass(AdapterMismatchError, EsmergeError)


def test_specialists_of_another_base_are_refused_by_weights_hash(tmp_path):
    """Regression: three adapters trained for another base merged onto the smoke base with exit 0."""
    other = toy_context(card={"base_weights_sha256": "b" * 64, "base_name": "Llama-3.1-8B-Instruct"})
    with pytest.raises(AdapterMismatchError, match=r"molecule specialist was trained on base weights "
                                                    r"bbbbbbbbbbbb\.\.\., "
                                                    r"but the base is toy-base \(aaaaaaaaaaaa\.\.\.\)"):
        run_merge("avg", tmp_path / "x", other)
    unproven = toy_context(card={})
    for spec in unproven.specialists.values():
        spec.adapter.config["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B-Instruct"
    with pytest.raises(AdapterMismatchError, match="names base 'meta-llama/Llama-3.1-8B-Instruct' and records no"):
        run_merge("avg", tmp_path / "x", unproven)
    assert not (tmp_path / "x").exists()
    run_merge("avg", tmp_path / "x", toy_context(card={}))  # no hash, but it names this base: accepted


def test_probe_k_zero_is_refused_and_the_default_comes_from_the_scale(monkeypatch):
    """Regression: --probe-k 0 silently used 8 (`probe_k or SCALE_DEFAULTS[...]`)."""
    loaded = []
    monkeypatch.setattr(merge, "load_base", lambda scale, seed=0: loaded.append(scale) or BASE)
    monkeypatch.setattr(merge, "load_specialists", lambda scale, base, seed=0: toy_context().specialists)
    with pytest.raises(UsageError, match="probe_k must be an integer >= 1 .*got 0"):
        merge.build_context(scales.get("smoke"), probe_k=0)
    assert loaded == []  # refused before any model was loaded
    with pytest.raises(UsageError, match="probe_k"):
        MergeContext(BASE, {}, "smoke", probe_k=0)
    assert merge.build_context(scales.get("smoke")).probe_k == scales.get("smoke").probe_k == 8
    assert merge.build_context(scales.get("smoke"), probe_k=3).probe_k == 3
    assert not hasattr(merge, "SCALE_DEFAULTS")


@pytest.mark.parametrize("hparams, message", [
    ({"tau": 0.1}, "es: unknown hyper-parameter 'tau'; known: distance, equal_size"),  # the old help text's example
    ({"tau_layer": "abc"}, "es: tau_layer must be a number >= 1e-06, got 'abc'"),
    ({"tau_layer": 0}, "es: tau_layer must be a number >= 1e-06, got 0"),
    ({"n_projections": 0}, "es: n_projections must be an integer in [1, 65536], got 0"),
    ({"n_projections": 2.5}, "es: n_projections must be an integer in [1, 65536], got 2.5"),
    ({"variant": "mine"}, "es: variant must be one of paper | code, got 'mine'"),
    ({"per_tensor": 1}, "es: per_tensor must be true or false, got 1"),
])
def test_set_values_are_refused_before_any_model_loads(tmp_path, monkeypatch, hparams, message):
    """Regression: --set tau=0.1 gave a TypeError, tau_layer=abc a str/int comparison error, after loading."""
    monkeypatch.setattr(merge, "build_context", lambda *a, **k: pytest.fail("loaded models before validating"))
    with pytest.raises(UsageError) as err:
        merge.merge_command(scales.get("smoke"), "es", tmp_path / "out", hparams)
    assert str(err.value) == message or str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_merge_command_refuses_existing_output_and_unknown_method_before_loading(tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "build_context", lambda *a, **k: pytest.fail("loaded models"))
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError, match="--force"):
        merge.merge_command(scales.get("smoke"), "avg", tmp_path / "out", {})
    with pytest.raises(UsageError, match="unknown merge method 'nope'; available: adamerging"):
        merge.merge_command(scales.get("smoke"), "nope", tmp_path / "new", {})
    with pytest.raises(UsageError, match="unknown scale 'gpu'"):  # refused where the name is resolved
        merge.merge_command(scales.get("gpu"), "avg", tmp_path / "new", {})
    with pytest.raises(UsageError, match="write KEY=VALUE"):
        methods.parse_set(["tau_layer"])


# --------------------------------------------------------------------------- declared hyper-parameters
def test_every_declared_hyper_parameter_matches_its_function():
    from dataclasses import fields

    from esmerge.methods.es_settings import PAPER_SETTINGS
    from esmerge.methods.lsmerge import VAEConfig

    for name in methods.names():
        method = methods.get(name)
        declared = {h.name: h.default for h in method.hparams}
        assert len(declared) == len(method.hparams), name  # no name twice
        if name.startswith("es"):
            expected = dict(PAPER_SETTINGS, variant="paper", seed=0)
        elif name == "ls-merge":
            expected = {f.name: f.default for f in fields(VAEConfig)} | {"count_cost": True, "progress": True}
        else:
            params = list(inspect.signature(method.fn).parameters.values())[2:]
            expected = {p.name: p.default for p in params}
        assert declared == expected, name
        for h in method.hparams:  # every default passes its own check
            assert h.check(name, h.default) == h.default, (name, h.name)


def test_validate_converts_command_line_strings_and_refuses_wrong_types():
    assert methods.validate("adamerging", {"steps": "10", "lr": "1e-2", "progress": "false"}) == \
        {"steps": 10, "lr": 0.01, "progress": False}
    assert methods.validate("es", {"equal_size": "min"}) == {"equal_size": "min"}
    assert methods.validate("es", {"equal_size": None, "seed": 3.0}) == {"equal_size": None, "seed": 3}
    assert methods.validate("consensus", {"scaling_factor": None}) == {"scaling_factor": None}
    assert methods.validate("graft", {"order": ["cell", "molecule", "protein"]})["order"][0] == "cell"
    for name, hp in [("ties", {"keep": 0.0}), ("ties", {"keep": True}), ("pcb", {"drop": 1.0}),
                     ("graft", {"order": "cell"}), ("avg", {"keep": 0.5}), ("ties", {"keep": float("nan")}),
                     ("avg-ft", {"max_steps": 0})]:
        with pytest.raises(UsageError, match=f"^{name}: "):
            methods.validate(name, hp)


def test_describe_lists_every_method_and_parameter():
    rows = methods.describe()
    assert {r["method"] for r in rows} == set(methods.names())
    ties = {r["parameter"]: r for r in rows if r["method"] == "ties"}
    assert ties["keep"]["range"] == "in (0, 1]" and ties["keep"]["default"] == 0.2 and ties["keep"]["type"] == "float"
    assert ties["scope"]["range"] == "tensor | model"
    assert [r["doc"] for r in rows if r["method"] == "avg"] == ["no hyper-parameters"]
    es = {r["parameter"]: r for r in methods.describe("es")}
    assert es["equal_size"]["range"] == ">= 1 or 'min' or null"


def _merge_once_slowly(out, barrier, results):
    real = methods.run_checked

    def slow(*args, **kwargs):  # both processes have checked `out` before either publishes
        result = real(*args, **kwargs)
        barrier.wait()
        return result

    methods.run_checked = slow
    try:
        merge_once("avg", out, toy_context())
        results.put("ok")
    except EsmergeError as err:
        results.put(f"{type(err).__name__}: {err}")


def test_two_merge_once_of_the_same_merge_both_succeed(tmp_path):
    """Regression (D4): two cold `esmerge regenerate` runs sharing a runs folder: one failed in
    notebook 06 with `OutputExistsError ... already exists` (merge_once checked, computed, then wrote)."""
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_merge_once_slowly, args=(tmp_path / "avg", barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert sorted(results.get(timeout=5) for _ in procs) == ["ok", "ok"]
    assert is_merged(tmp_path / "avg") and [p.name for p in tmp_path.iterdir()] == ["avg"]
    assert merge_once("avg", tmp_path / "avg", toy_context())[1]["method"] == "avg"


def test_each_entry_point_checks_hyper_parameters_once(tmp_path, monkeypatch):
    real, calls = methods.check_all, []
    monkeypatch.setattr(methods, "check_all", lambda *a: calls.append(a[0]) or real(*a))
    run_merge("ties", tmp_path / "a", toy_context(), keep="0.5")
    assert calls == ["ties"]
    merge_once("ties", tmp_path / "b", toy_context(), keep=0.5)
    assert calls == ["ties", "ties"]
    checked = methods.validate("ties", {"keep": "0.5"})
    assert checked == {"keep": 0.5} and methods.validate("ties", checked) is checked
    with pytest.raises(UsageError, match="unknown hyper-parameter .keep."):  # checked for another method: again
        methods.validate("pcb", checked)
