"""Table 4 (esmerge.report.cost) and the cost records it reads: ES-Merging's counted signals, the baselines' memory."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import needs_reference
from test_es_pipeline import random_specialists

from esmerge import methods
from esmerge.methods import es_signals
from esmerge.report import cost

# Hand-made paper rows: Table 4 as printed (no unit), and a Table 1 row that must be ignored.
PAPER = pd.DataFrame({"table": ["Table 4"] * 3 + ["Table 1"], "method": ["avg-ft", "adamerging", "es", "es"],
                      "value": [891117.0, 493694.0, 149807.0, 70.0]})
CPU_KIND = "cpu: process RSS high-water mark after the search (ru_maxrss; an upper bound, model included)"


def _write(folder, info, wall=1.0):
    folder.mkdir(parents=True)
    (folder / "esmerge.json").write_text(json.dumps({"wall_seconds": wall, "info": info}))


def _folders(root, es_cost=None):
    """ES (its signals cached), AdaMerging, Avg.+FT on two benchmarks, TIES (training-free)."""
    es_cost = es_cost or {"wall_seconds": 0.2, "flops": 100, "seconds": 2.0, "peak_memory_mib": 50.0,
                          "peak_memory_kind": CPU_KIND, "cached": True}
    _write(root / "es", {"probe_k": 4, "n_specialists": 3, "modalities": ["molecule", "protein", "cell"],
                         "use_element": True, "cost": es_cost})
    _write(root / "adamerging", {"hparams": {"steps": 10}, "entropy": {"history": [0.6] * 10},
                                 "cost": {"wall_seconds": 5.0, "flops": 330, "peak_memory_mib": 60.0,
                                          "peak_memory_kind": CPU_KIND}})
    for bench, flops, peak in (("GDSC2", 200, 70.0), ("CYP2C9", 395, 80.0)):
        _write(root / "avg-ft" / bench, {"hparams": {"epochs": 1, "n_batches": 2}, "loss": {"history": [1.0, 0.9]},
                                         "cost": {"wall_seconds": 3.0, "flops": flops, "peak_memory_mib": peak,
                                                  "peak_memory_kind": CPU_KIND}})
    _write(root / "ties", {"cost": {"wall_seconds": 0.25, "flops": None}}, wall=0.3)
    (root / "empty").mkdir()
    return cost.merge_folders(root)


def test_table4_ratios_units_and_no_missing_cells(tmp_path):
    result = cost.table4(_folders(tmp_path), PAPER)
    table = result.table.set_index("method")
    assert list(table.index) == ["es", "adamerging", "avg-ft", "ties"]  # Table 4's order, then the rest
    assert not result.table.isna().any().any()  # "not recorded" is said, never NaN
    assert table.loc["es", "flops"] == 100 and table.loc["adamerging", "flops"] == 330
    assert table.loc["avg-ft", "flops"] == 595  # summed over benchmarks
    assert table.loc["avg-ft", "peak_memory_mib"] == 80.0  # the largest peak, not a sum
    assert table.loc["avg-ft", "seconds"] == 6.0 and table.loc["es", "seconds"] == 2.0  # ES: as computed
    assert table.loc["adamerging", "flops_vs_es"] == 3.3 and table.loc["avg-ft", "flops_vs_es"] == 5.95
    assert table.loc["es", "flops_vs_es"] == 1.0
    assert table.loc["adamerging", "paper_flops_vs_es"] == 3.3 and table.loc["avg-ft", "paper_flops_vs_es"] == 5.9
    assert table.loc["es", "paper_flops"] == 149807 and table.loc["ties", "paper_flops"] == "not in Table 4"
    assert table.loc["ties", "search"] == "no search step (training-free)" and table.loc["ties", "seconds"] == 0.25
    assert table.loc["ties", "flops_vs_es"] == "n/a (no search step)"
    assert "cache" in table.loc["es", "notes"]
    assert table.loc["adamerging", "budget"].startswith("10 Adam steps")
    assert table.loc["avg-ft", "budget"].startswith("2 benchmark(s) x (2 batches x 1 epochs) = 4 steps")
    assert table.loc["es", "budget"].startswith("4 probes x 3 modality blocks through the base and 3 specialists")
    assert "2,000 examples x 10 epochs" in table.loc["avg-ft", "paper_budget"]
    note = result.note
    assert "3.4x cheaper than AdaMerging and 6.1x cheaper than Avg. Merging + FT" in note
    assert "493,694 / 149,807 = 3.3x" in note and "891,117 / 149,807 = 5.9x" in note
    assert "AdaMerging 3.3x, Avg. Merging + FT 5.95x" in note


def test_es_flops_cached_before_counting_are_said_not_recorded(tmp_path):
    es_cost = {"wall_seconds": 0.2, "flops": None, "seconds": None, "cached": True,
               "note": "not recorded (cached before counting): states, scores/cell"}
    result = cost.table4(_folders(tmp_path, es_cost), PAPER)
    table = result.table.set_index("method")
    assert not result.table.isna().any().any()
    assert table.loc["es", "flops"] == "not recorded (cached before counting): states, scores/cell"
    assert table.loc["es", "seconds"] == "not recorded" and table.loc["es", "peak_memory_mib"] == "not recorded"
    assert table.loc["adamerging", "flops_vs_es"] == "not recorded"
    assert "ES-Merging's FLOPs are not recorded" in result.note


def test_a_merge_from_before_costs_were_recorded(tmp_path):
    _write(tmp_path / "es", {"probe_k": 4})
    table = cost.table4(cost.merge_folders(tmp_path), PAPER).table
    assert table["flops"].item() == "not recorded (merged before costs were recorded)"
    assert not table.isna().any().any()


@needs_reference
def test_the_papers_table_4_ratios_are_3_3_and_5_9_while_its_text_says_3_4_and_6_1():
    ratios = cost.paper_ratios()
    assert round(ratios["adamerging"], 1) == 3.3 and round(ratios["avg-ft"], 1) == 5.9
    assert ratios["adamerging"] == pytest.approx(493694 / 149807)
    assert cost.PAPER_TEXT_RATIOS == {"adamerging": 3.4, "avg-ft": 6.1}


# --------------------------------------------------------------------------- what the methods record
@pytest.fixture()
def context(tmp_path, monkeypatch):
    """The smoke stand-ins of test_es_pipeline: a tiny random LLaMA and three random LoRA specialists."""
    from esmerge.run.merge import MergeContext
    from esmerge.signals import probe
    from esmerge.specialists.base_llm import load_smoke

    smiles, seqs = ["CCO", "c1ccccc1", "CC(=O)O", "CCN"], ["MKTAYIAKQR", "GAVLIPFW", "MSTNPKPQRK", "MAHHHHHHGS"]
    monkeypatch.setattr(probe, "probe_entities", lambda k, seed, exclude_cells=None: {
        "molecule": smiles[:k], "protein": seqs[:k], "cell": ["CD3E, CD2, IL7R, LTB, CCR7, MAL, LEF1, TCF7"] * k})
    base = load_smoke(seed=0, num_layers=2, hidden_size=32)
    return MergeContext(base, random_specialists(base), "smoke", 0, probe_k=4, cache=tmp_path / "cache")


def test_an_es_merge_records_its_flops_and_memory_and_a_cache_hit_reports_them(context, tmp_path):
    from esmerge.run.merge import run_merge

    out = run_merge("es", tmp_path / "merged" / "es", context)
    info = json.loads((out / "esmerge.json").read_text())["info"]
    first = info["cost"]
    assert first["flops"] > 0 and first["peak_memory_mib"] > 0 and first["cached"] is False
    assert first["peak_memory_kind"].split(":")[0] in ("cpu", "cuda")
    pieces = first["pieces"]
    assert set(pieces) == {"probes", "states", "swd", "scores/molecule", "scores/protein", "scores/cell"}
    assert pieces["states"]["flops"] > 0 and all(pieces[f"scores/{m}"]["flops"] > 0 for m in context.specialists)
    assert first["flops"] == sum(p["flops"] for p in pieces.values())
    # the cache folder's entries are as before: the cost records are hidden sidecars
    visible = sorted(p.name.split("-")[0] for p in context.cache.iterdir() if not p.name.startswith("."))
    assert visible == ["probes"] + ["scores"] * 6 + ["states", "swd"]
    # a cache hit reports the FLOPs of computing the signals, and says it was cached
    adapters = [s.adapter for s in context.specialists.values()]
    again = methods.run("es", adapters, context)
    assert again.info["cost"]["flops"] == first["flops"] and again.info["cost"]["cached"] is True
    # an entry stored before costs were recorded: honest "not recorded", never a guess
    for sidecar in context.cache.glob(".states-*.cost.json"):
        sidecar.unlink()
    old = methods.run("es", adapters, context).info["cost"]
    assert old["flops"] is None and old["note"] == "not recorded (cached before counting): states"
    # Table 4 from the folder the merge wrote
    table = cost.table4(cost.merge_folders(tmp_path / "merged"), PAPER).table
    assert table["flops"].item() == first["flops"] and not table.isna().any().any()


def test_counting_changes_no_number_and_counts_as_flop_counter_mode_does(context):
    """The element scores computed under the counter equal those computed without it, bit for bit (under
    FlopCounterMode they would not: it decomposes silu_backward), and the count is FlopCounterMode's."""
    from torch.utils.flop_counter import FlopCounterMode

    from esmerge.specialists.adapters import attach

    adapters = [s.adapter for s in context.specialists.values()]
    sig = es_signals.signals(adapters, context, n_projections=16)
    names = list(context.specialists)

    def scores(mode=None):
        model = attach(context.base.model, dict(zip(names, adapters)))
        try:
            model.set_adapter(names[0])
            with mode or contextlib.nullcontext():
                return es_signals.element_scores(model, sig["probes"], sig["states"]["base"]["tokens"])["frobenius"]
        finally:
            model.unload()

    plain, reference = scores(), FlopCounterMode(display=False)
    assert plain.keys() == sig["scores"][0].keys()
    assert all(torch.equal(plain[k], sig["scores"][0][k]) for k in plain)
    scores(reference)
    assert sig["cost"][f"scores/{names[0]}"]["flops"] == reference.get_total_flops() > 0


def test_adamerging_and_avg_ft_record_peak_memory_beside_their_flops():
    from esmerge.specialists.adapters import Adapter

    key = "layers.0.self_attn.q_proj.lora_A.weight"
    a = Adapter({key: torch.tensor([[1.0, 3.0]])}, {}, "molecule")
    b = Adapter({key: torch.tensor([[3.0, 5.0]])}, {}, "protein")
    square = lambda state, *_: sum((v ** 2).sum() for v in state.values())  # noqa: E731
    ada = methods.run("adamerging", [a, b], {"entropy_objective": square}, steps=2, progress=False)
    ft = methods.run("avg-ft", [a, b], {"train_loss": square, "train_batches": [None]}, epochs=1, progress=False)
    for result in (ada, ft):
        recorded = result.info["cost"]
        assert np.isfinite(recorded["peak_memory_mib"]) and recorded["peak_memory_mib"] > 0
        assert recorded["peak_memory_kind"].split(":")[0] in ("cpu", "cuda") and "flops" in recorded
