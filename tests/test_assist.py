"""Assists: an idle core fills a lone notebook's caches; they start only when a slot is free and stop with it."""
from __future__ import annotations

import ast
import importlib
import inspect
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_regenerate import make_layout, write_notebook

from esmerge.paths import NOTEBOOKS_DIR
from esmerge.regen import regenerate as rg
from esmerge.regen.assist import ASSISTS
from esmerge.regen.notebook_graph import discover
from esmerge.run import retention_runs

ASSIST_TARGET = '''\
import json, os, time
from pathlib import Path


def fill(scale, seed):
    out = Path(os.environ["ESMERGE_RUNS_DIR"]) / scale / "assisted.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"scale": scale, "seed": seed, "pid": os.getpid(),
                               "threads": os.environ.get("OMP_NUM_THREADS")}))
    time.sleep(600)  # until the regenerator stops it
'''

WAITS_FOR_ITS_ASSIST = """\
    import time
    flag = Path("runs") / scale / "assisted.json"
    for _ in range(600):
        if flag.exists():
            break
        time.sleep(0.1)
    (out / "saw_assist.txt").write_text(str(flag.exists()))
"""


def _assisted_notebook(root, monkeypatch, body: str, target_source: str = ASSIST_TARGET):
    """Notebook ``01_long`` with ``body``, whose assist is ``assist_target:fill`` (``target_source``)."""
    (root / "assist_target.py").write_text(target_source)
    write_notebook(root, "01_long", body)
    monkeypatch.setitem(ASSISTS, "01_long", "assist_target:fill")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_lone_notebook_gets_its_assist_which_stops_when_it_finishes(tmp_path, monkeypatch):
    layout = make_layout(tmp_path)
    _assisted_notebook(tmp_path, monkeypatch, WAITS_FOR_ITS_ASSIST)
    said = []

    report = rg.run_notebooks("smoke", layout, seed=3, jobs=2, log=said.append)

    assert report.failed is None, report.message
    assert (tmp_path / "runs" / "smoke" / "01_long" / "saw_assist.txt").read_text() == "True"
    assisted = json.loads((tmp_path / "runs" / "smoke" / "assisted.json").read_text())
    assert (assisted["scale"], assisted["seed"]) == ("smoke", 3)  # the notebook's injected parameters
    assert assisted["threads"] == rg.kernel_threads(2)  # the kernels' thread budget, not the whole machine
    assert not _alive(assisted["pid"])  # stopped with its notebook, not left running
    assert any("assist      01_long" in line for line in said)


def test_no_assist_without_a_free_slot(tmp_path, monkeypatch):
    layout = make_layout(tmp_path)
    _assisted_notebook(tmp_path, monkeypatch, "print('done')\n")

    report = rg.run_notebooks("smoke", layout, jobs=1, log=lambda *_: None)  # one slot, taken by the notebook

    assert report.failed is None, report.message
    assert not (tmp_path / "runs" / "smoke" / "assisted.json").exists()


def test_a_failing_assist_is_reported_and_the_notebook_still_finishes(tmp_path, monkeypatch):
    layout = make_layout(tmp_path)
    failing = "def fill(scale, seed):\n    raise ValueError('no merges yet')\n"
    _assisted_notebook(tmp_path, monkeypatch, "import time\ntime.sleep(4)\n", failing)
    said = []

    report = rg.run_notebooks("smoke", layout, jobs=2, log=said.append)

    assert report.failed is None, report.message
    assert any("stopped with an error" in line and "ValueError: no merges yet" in line for line in said), said


# ----------------------------------------------------------------------------- 09_retention's assist


def _parameters(path) -> dict:
    """The literal assignments of a notebook's parameters cell."""
    cell = path.read_text().split('# %% tags=["parameters"', 1)[1].split("\n", 1)[1].split("\n# %%", 1)[0]
    return {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(cell).body
            if isinstance(node, ast.Assign)}


@pytest.mark.parametrize("stem", sorted(ASSISTS))
def test_each_assist_takes_its_chapters_parameters_with_the_same_defaults(stem):
    notebook = discover(NOTEBOOKS_DIR)[stem]
    module, function = ASSISTS[stem].split(":")
    signature = inspect.signature(getattr(importlib.import_module(module), function))
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    defaults = {k: {} if k == "budget_overrides" and v is None else v for k, v in defaults.items()}  # None: no change
    params = _parameters(notebook.path)
    assert set(defaults) <= set(params)
    assert {k: params[k] for k in defaults} == defaults


def test_the_retention_assist_visits_every_entry_of_the_chapter_from_the_far_end(monkeypatch):
    """Last seed first, modalities and models reversed; the same (seed, model, modality) set as the chapter."""
    config = SimpleNamespace(specialist_seeds=(0, 1, 2), n_retention=4, train="recipe")
    models = {0: ["base", "spec", "avg", "adamerging@3"], 1: ["base", "spec", "avg"], 2: ["base", "spec", "avg"]}

    def fake_context(seed):
        return SimpleNamespace(seed=seed, base="base-model", specialists={"molecule": 1, "protein": 2, "cell": 3})

    def fake_seed_models(config, seed, seeds, merge_root, avg_ft, contexts):
        for s in seeds:
            ctx = contexts.get(s) or fake_context(s)
            yield s, ctx, {name: f"{name}@seed{s}" for name in models[s]}, []

    visits = []

    def record(models_, base, specialists, examples, recipe, batch_size, progress):
        [(name, model)] = models_.items()
        [modality] = examples
        visits.append((int(model.rsplit("seed", 1)[1]), name, modality))
        assert (base, recipe, batch_size, progress) == ("base-model", "recipe", 8, False)

    monkeypatch.setattr(retention_runs.scales, "get", lambda scale, device=None: config)
    monkeypatch.setattr(retention_runs, "build_context", lambda config, seed, specialist_seed: fake_context(
        specialist_seed))
    monkeypatch.setattr(retention_runs, "heldout_examples", lambda m, config, n, seed: [m] * n)
    monkeypatch.setattr(retention_runs, "seed_models", fake_seed_models)
    monkeypatch.setattr(retention_runs, "score_models", record)
    monkeypatch.setattr(retention_runs, "run_dir", lambda scale, stem: f"runs/{scale}/{stem}")

    assert retention_runs.fill_retention("cpu") == len(visits) == 3 * (4 + 3 + 3)
    assert visits[0] == (2, "avg", "cell") and visits[-1] == (0, "base", "molecule")
    assert [v[0] for v in visits] == [2] * 9 + [1] * 9 + [0] * 12
    chapter = {(s, name, m) for s in (0, 1, 2) for m in ("molecule", "protein", "cell") for name in models[s]}
    assert set(visits) == chapter and len(set(visits)) == len(visits)


@pytest.mark.parametrize("jobs,running,ready,free", [(2, 1, 0, 1), (2, 1, 1, 0), (3, 1, 1, 1), (2, 2, 0, 0)])
def test_notebooks_come_before_assists(jobs, running, ready, free):
    from esmerge.regen.assist import free_assist_slots

    assert free_assist_slots(jobs, running, ready) == free


def test_seed_models_loads_the_base_once_for_every_seed(monkeypatch):
    """Every other seed's context is built on the first context's base (it was loaded once per seed)."""
    config = SimpleNamespace(merge_budgets=SimpleNamespace(curve_benchmarks=()))
    built = []

    def build(config, seed, specialist_seed, base=None):
        built.append((specialist_seed, base))
        return SimpleNamespace(base=base or f"base loaded for seed {specialist_seed}", specialists={})

    monkeypatch.setattr(retention_runs, "build_context", build)
    monkeypatch.setattr(retention_runs, "load_merged", lambda folder: SimpleNamespace(adapter=None))
    monkeypatch.setattr(retention_runs, "emr_one_model", lambda adapter: "emr-one")
    monkeypatch.setattr(retention_runs, "curve_models", lambda budgets, benchmarks: [])
    monkeypatch.setattr(retention_runs, "retention_models", lambda specialists, folder, avg_ft, extra: ({}, []))

    runs = list(retention_runs.seed_models(config, 0, (0, 1, 2), Path("merges"), ()))
    assert built == [(0, None), (1, "base loaded for seed 0"), (2, "base loaded for seed 0")]
    assert {context.base for _, context, _, _ in runs} == {"base loaded for seed 0"}
    given = SimpleNamespace(base="the chapter's base", specialists={})
    built.clear()
    list(retention_runs.seed_models(config, 0, (0, 1), Path("merges"), (), {0: given}))
    assert built == [(1, "the chapter's base")]
