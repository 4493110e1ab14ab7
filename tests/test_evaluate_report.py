"""What the results chapter shows: merged models found on disk, Table 4's cost, group averages, overview."""
from __future__ import annotations

import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import needs_reference  # skips when ../shared/reference is not here

from esmerge import evaluate as ev
from esmerge import report, scales
from esmerge.specialists.adapters import adapter_from_model, save_merged
from esmerge.specialists.base_llm import load_base, lora_config


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base(scales.get("smoke"))


@pytest.fixture(scope="module")
def adapter(base):
    from peft import get_peft_model

    return adapter_from_model(get_peft_model(copy.deepcopy(base.model), lora_config()), "zero")


def _meta(method, wall, cost):
    return {"method": method, "wall_seconds": wall, "info": {"cost": cost}}


def test_merged_models_reads_each_kind_of_folder(base, adapter, tmp_path):
    save_merged(tmp_path / "avg", adapter, _meta("avg", 1.0, {}))
    emr = copy.deepcopy(adapter)
    emr.extras = {"mask": torch.ones(2)}
    save_merged(tmp_path / "emr", emr, _meta("emr", 1.0, {}))
    save_merged(tmp_path / "avg-ft" / "GDSC2", adapter, _meta("avg-ft", 2.0, {}))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text("{}")  # no marker: an unfinished merge
    seen = []

    def per_benchmark(a, b):
        seen.append((sorted(a.extras), b))
        return a

    models, covers, notes = ev.merged_models(tmp_path, base, {}, ["BindingDB", "GDSC2"], per_benchmark)
    assert list(models) == ["avg", "avg-ft", "emr"]
    assert covers == {"avg-ft": ["GDSC2"]}
    assert notes == ["avg-ft: adapters for 1 of 2 benchmarks; evaluated on those",
                     f"skipping {tmp_path / 'half'}: neither a merged model nor one per evaluated benchmark"]
    models["emr"].adapter_for("BindingDB")
    assert seen == [(["mask"], "BindingDB")]  # EMR's modulation reads its saved extras
    assert models["avg-ft"].adapter_for("GDSC2").name == "avg-ft/GDSC2"
    table = ev.models_table(models).set_index("method")
    assert table.loc["avg", "adapter"] == "yes" and table.loc["avg-ft", "adapter"] == "per benchmark"
    assert table.loc["emr", "modalities as tokens"] == "none"


@needs_reference
def test_cost_table_sums_per_benchmark_merges_including_wall_seconds(tmp_path):
    """Before: 07 summed a key ``wall_s`` that no method records, so Avg.+FT's time showed as 0."""
    root, extra = tmp_path / "06", tmp_path / "07"
    for folder, meta in {root / "avg": _meta("avg", 0.5, {"wall_seconds": 0.25}),
                         root / "avg-ft" / "GDSC2": _meta("avg-ft", 1.5, {"wall_seconds": 1.0, "flops": 10}),
                         root / "avg-ft" / "CYP2C9": _meta("avg-ft", 2.5, {"wall_seconds": 2.0, "flops": 32}),
                         root / "es": _meta("es", 9.0, {}), extra / "es": _meta("es", 3.0, {})}.items():
        folder.mkdir(parents=True)
        (folder / "esmerge.json").write_text(json.dumps(meta))
    (root / "empty").mkdir()
    folders = report.merge_folders(root, extra)
    assert list(folders) == ["avg", "es", "avg-ft", "empty"] and folders["es"] == extra / "es"
    cost = report.cost_table(folders).set_index("method")
    assert list(cost.index) == ["avg", "es", "avg-ft"]  # a folder with no esmerge.json at all is left out
    assert cost.loc["avg-ft", "wall_seconds"] == pytest.approx(4.0)
    assert cost.loc["avg-ft", "cost.wall_seconds"] == pytest.approx(3.0)
    assert cost.loc["avg-ft", "cost.flops"] == 42 and "cost.wall_s" not in cost
    assert cost.loc["es", "wall_seconds"] == 3.0 and cost.loc["avg", "cost.wall_seconds"] == 0.25
    assert cost.loc["es", "paper_total_flops"] == pytest.approx(149807.0)


def test_group_averages_take_the_ablation_paper_values_from_table_8():
    t1 = pd.DataFrame({"method": ["es", "es-layer", "es"], "dataset": ["Avg. Mol-Prot", "Avg. Mol-Prot", "BindingDB"],
                       "metric": ["accuracy"] * 3, "ours": [60.0, 55.0, 61.0], "paper": [65.7, np.nan, 66.0]})
    t2 = t1.assign(dataset=["Avg. CYP Inh.", "Avg. CYP Inh.", "CYP1A2 Inh."],
                   metric=["accuracy", "macro_f1", "accuracy"])
    t8 = pd.DataFrame({"method": ["es-layer"], "dataset": ["Avg. Mol-Prot"], "paper": [63.1]})
    rows = report.group_averages([t1, t2], ablation=t8)
    assert rows[["method", "dataset"]].values.tolist() == [["es", "Avg. Mol-Prot"], ["es-layer", "Avg. Mol-Prot"],
                                                           ["es", "Avg. CYP Inh."]]
    assert rows["paper"].tolist() == [65.7, 63.1, 65.7]


def test_overview_is_the_mean_over_benchmarks_in_method_order():
    per = pd.DataFrame({"method": ["z", "z", "a"], "accuracy": [50.0, 70.0, 40.0], "macro_f1": [1.0, 3.0, 2.0],
                        "auroc": [50.0, np.nan, 60.0], "predicted_positive": [0.0, 1.0, 0.5]})
    table = ev.overview(per)
    assert list(table.index) == ["z", "a"]
    assert table.loc["z"].tolist() == [60.0, 2.0, 50.0, 0.5]


def test_claims_chapter_summaries():
    mechanism = pd.DataFrame({"claim": ["c1", "c2"], "source": ["Fig. 1", "Fig. 2"], "evidence": ["e1", "e2"],
                              "verdict": ["holds", "does not hold"]})
    register = pd.DataFrame({"claim": ["a", "b", "c"], "source": ["§5", "§5", "T2"], "paper": [1.5, -0.2, 2.0],
                             "ours": [3.0, np.nan, -4.0], "lo": [1.0, np.nan, -6.0], "hi": [5.0, np.nan, -2.0],
                             "verdict": ["supported", "not measured", "not supported"]})
    lines = report.disagreements(mechanism, register)
    assert lines[:4] == ["- Fig. 2: c2 -> does not hold here (e2)",
                         "- §5: b: paper margin -0.2 pts; ours not measured -> not measured",
                         "- T2: c: paper margin +2.0 pts; ours -4.0 [-6.0, -2.0] -> not supported",
                         "- note: the paper's own numbers give this claim a margin of -0.2 pts: b"]
    assert lines[4] == ("\nRepresentation: 1 of 2 hold. Accuracy: 1 of 3 supported, 1 contradicted, "
                        "0 inconclusive, 1 not measured.")
    table = pd.DataFrame({"method": ["es", "avg", "base", "es", "avg"], "metric": ["accuracy"] * 5,
                          "dataset": ["Avg. Mol-Prot"] * 3 + ["Avg. CYP Inh. (2/5 datasets)"] * 2,
                          "ours": [70.0, 60.0, 65.0, 40.0, 50.0], "paper": [65.7, 64.0, np.nan, np.nan, np.nan]})
    ranks = report.es_ranks([table]).set_index("group")
    assert ranks.loc["Avg. Mol-Prot", ["rank", "of", "paper_rank", "paper_of"]].tolist() == [1.0, 3, 1.0, 2]
    assert ranks.loc["Avg. CYP Inh. (2/5 datasets)", "rank"] == 2.0
    assert np.isnan(ranks.loc["Avg. CYP Inh. (2/5 datasets)", "paper_rank"])
    assert report.es_ranks([table], method="graft").empty
    run = {"pred": [1, 1, 0, 0], "y": [1, 0, 0, 0], "auroc": 60.0, "accuracy_ci": [40.0, 90.0]}
    bias = report.answer_bias({"es": {"A": run, "B": {**run, "pred": [1] * 4, "auroc": 40.0}}})
    assert bias["positive_answers"] == {"es": 75.0} and bias["positive_rate"] == 25.0
    assert bias["auroc"] == {"es": 50.0} and bias["median_ci_width"] == 50.0
    # a generated reply without a valid answer is -1: neither positive nor a fraction of one
    invalid = report.answer_bias({"gen": {"A": {**run, "pred": [1, -1, 0, 1]}}})
    assert invalid["positive_answers"] == {"gen": 50.0}
