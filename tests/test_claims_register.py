"""The claims register's new columns on hand-made results whose right answer is known: the
threshold-free AUROC verdict beside accuracy, identical competitors counted once, the caveat
columns on every row, the declared non-inferiority margin, and EMR routed vs one model."""
from __future__ import annotations

import copy
import importlib

import numpy as np
import pandas as pd

from esmerge import report
from esmerge.data.benchmarks import BENCHMARK_NAMES
from esmerge.evaluate import decisions as D
from esmerge.evaluate.caveats import CAVEAT_COLUMNS
from esmerge.methods.emr import ONE_MODEL

C = importlib.import_module("esmerge.report.claims")  # the package re-exports a function of that name
N = 24
MODELS = ("es", "base", *C.MERGING_BASELINES, *C.SPECIALISTS, "avg-ft")


def _run(y, pred, margin=None):
    scores = None if margin is None else np.stack([np.zeros(len(y)), margin], 1).round(4).tolist()
    return {"example_ids": [str(i) for i in range(len(y))], "y": [int(v) for v in y],
            "pred": [int(v) for v in pred], "scores": scores}


def _results(models=MODELS, seed=0):
    """Every model on all 13 benchmarks, 24 examples each, each wrong on its own 6 random examples
    (so accuracies tie and no two models answer alike). ES's answer margin ranks the examples
    perfectly; every other model's margin is noise."""
    rng = np.random.default_rng(seed)
    out = {m: {} for m in models}
    for b in BENCHMARK_NAMES:
        y = np.array([0, 1] * (N // 2))
        for m in models:
            pred = y.copy()
            wrong = rng.choice(N, 6, replace=False)
            pred[wrong] = 1 - pred[wrong]
            margin = (y + 0.1 * rng.random(N)) if m == "es" else rng.normal(size=N)
            out[m][b] = _run(y, pred, margin)
    return out


def _row(register, start):
    rows = register[register["claim"].str.startswith(start)]
    assert len(rows) == 1, start
    return rows.iloc[0]


ALL_13 = "ES-Merging beats every merging baseline on all 13 benchmarks"


# --------------------------------------------------------------------------- A: AUROC beside accuracy
def test_auroc_verdict_separates_what_accuracy_cannot():
    reg = report.claims(_results(), n_resamples=300)
    row = _row(reg, ALL_13)
    assert row["verdict"] == "inconclusive"  # every model is right on 18 of 24: accuracy cannot tell
    assert row["auroc_verdict"] == "supported" and row["auroc_lo"] > 0 and row["auroc_diff"] > 30
    assert row["auroc_vs"] in C.MERGING_BASELINES and "AUROC: vs avg:" in row["detail"]
    assert {"auroc_diff", "auroc_lo", "auroc_hi", "auroc_verdict"} <= set(reg.columns)


def test_auroc_verdict_says_not_supported_when_the_competitor_ranks_better():
    results = _results()
    results["base"], results["es"] = results["es"], results["base"]  # now the base has the perfect margin
    row = _row(report.claims(results, n_resamples=300), "ES-Merging beats the base LLM")
    assert row["auroc_hi"] < 0 and row["auroc_verdict"] == "not supported"


def test_auroc_columns_are_nan_and_say_why_without_answer_margins():
    results = _results()
    for run in results["base"].values():
        run["scores"] = None  # a generated reply keeps no scores
    results["ties"]["BindingDB"]["scores"] = None
    reg = report.claims(results, n_resamples=200)
    base = _row(reg, "ES-Merging beats the base LLM")
    assert np.isnan(base[["auroc_diff", "auroc_lo", "auroc_hi"]].astype(float)).all()
    assert base["auroc_verdict"] == "not measured (no answer margins: base)"
    assert not np.isnan(base["ours"])  # accuracy is still measured
    merging = _row(reg, ALL_13)
    assert merging["auroc_verdict"] == "supported (partial: no answer margins: ties)"
    for run in results["es"].values():
        run["scores"] = None
    assert _row(report.claims(results, n_resamples=50), ALL_13)["auroc_verdict"].startswith(
        "not measured (no answer margins: es")


# --------------------------------------------------------------------------- B: identical answers are one model
def test_identical_baselines_are_one_group_counted_once_in_holm():
    results = _results()
    for run in results["adamerging"].values():  # adamerging is wrong on 2 examples, ES on 6: it wins
        run["pred"] = list(run["y"])
        run["pred"][0] = 1 - run["pred"][0]
        run["pred"][1] = 1 - run["pred"][1]
    results["consensus"] = copy.deepcopy(results["adamerging"])  # the same answers on every benchmark
    row = _row(report.claims(results, n_resamples=200), ALL_13)
    assert row["same_answers"] == "adamerging = consensus"
    assert row["n_compared"] == len(C.MERGING_BASELINES) - 1
    assert "vs adamerging = consensus:" in row["detail"] and "vs consensus:" not in row["detail"]
    assert row["verdict"] == "not supported" and row["would_change"].startswith("adamerging = consensus no longer")
    # the Holm family holds six comparisons, not seven: the winner's p is multiplied by 6
    distinct = {m: results[m] for m in C.MERGING_BASELINES if m != "consensus"}
    _, raw, adjusted = D.compare(results["es"], distinct, list(BENCHMARK_NAMES))
    assert row["p_holm"] == round(adjusted["adamerging"], 4) == round(6 * raw["adamerging"], 4)
    assert row["p_holm"] != round(7 * raw["adamerging"], 4)
    # one example answered differently: two models again, counted twice
    results["consensus"]["GDSC2"]["pred"][5] = 1 - results["consensus"]["GDSC2"]["pred"][5]
    row = _row(report.claims(results, n_resamples=200), ALL_13)
    assert row["same_answers"] == "-" and row["n_compared"] == len(C.MERGING_BASELINES)


def test_identical_on_the_claims_benchmarks_only_is_enough():
    results = _results()
    for b in ("CYP2C9-substrate", "CYP2D6-substrate", "CYP3A4-substrate"):  # the CYP Sub. group
        results["consensus"][b] = copy.deepcopy(results["adamerging"][b])
    reg = report.claims(results, n_resamples=100)
    assert _row(reg, "ES-Merging beats every merging baseline on CYP Sub.")["same_answers"] == \
        "adamerging = consensus"
    assert _row(reg, ALL_13)["same_answers"] == "-"  # they differ elsewhere


# --------------------------------------------------------------------------- C: caveats on every row
def test_every_row_carries_n_seeds_caveats_and_what_would_change_it():
    results = _results()
    reg = report.claims(results, n_resamples=100)
    for column in CAVEAT_COLUMNS:
        assert reg[column].notna().all() and (reg[column].astype(str).str.strip() != "").all(), column
    row = _row(reg, ALL_13)
    assert row["n"] == 13 * N and row["seeds"] == "0"
    assert "tiny base LLM" in row["caveats"] and "our random splits" in row["caveats"]
    assert "one seed, selected by the Fig. 2 test" in row["caveats"]
    assert "oracle routing: emr" in row["caveats"] and "below the paper's budget: adamerging" in row["caveats"]
    assert row["would_change"].startswith("a CI lower bound above 0 vs every competitor")
    base = _row(reg, "ES-Merging beats the base LLM")
    assert "oracle routing" not in base["caveats"] and "budget" not in base["caveats"]  # neither model has them
    avg_ft = _row(reg, "ES-Merging beats Avg. Merging + FT")
    assert avg_ft["caveats"].endswith("below the paper's budget: avg-ft") and avg_ft["n"] == 3 * N
    # the caller says what applies, and with which budgets
    mine = report.claims(results, n_resamples=50, seeds=(0, 1, 2), caveats=["tiny base", "unequal budgets"],
                         budgets={"adamerging": "10 steps, paper 500"})
    row = _row(mine, ALL_13)
    assert row["seeds"] == "0, 1, 2"
    assert row["caveats"] == "tiny base LLM; below the paper's budget: adamerging (10 steps, paper 500)"


def test_would_change_names_the_competitor_and_numbers_that_decide():
    results = _results()
    for b in BENCHMARK_NAMES:  # ties is right everywhere: ES is significantly worse than it
        run = results["ties"][b]
        run["pred"] = list(run["y"])
    row = _row(report.claims(results, n_resamples=300), ALL_13)
    assert row["verdict"] == "not supported"
    assert row["would_change"].startswith("ties no longer significantly better: a CI upper bound at or above 0 (now")
    assert f"{row['hi']:+.1f}" in row["would_change"] and "Holm p >= 0.05" in row["would_change"]


def test_yardstick_rows_carry_caveats_and_no_seed_for_the_base_alone():
    results = _results(models=("es", "base", "emr"))
    y = np.array([0, 1] * (N // 2))
    results[C.SHUFFLED_CONTROL] = {b: _run(y, np.zeros(N), np.zeros(N)) for b in BENCHMARK_NAMES}
    results["majority"] = {b: _run(y, np.zeros(N), np.zeros(N)) for b in BENCHMARK_NAMES}
    reg = report.yardstick_claims(results, n_resamples=100)
    assert list(reg.columns) == C.COLUMNS
    shots = _row(reg, "the base uses its shots")
    assert shots["seeds"] == "none (no specialist)" and "seed" not in shots["caveats"]
    assert shots["source"] == "yardstick"  # the book names chapters and methods, not issue numbers
    emr = _row(reg, "emr (routed) beats the always-majority yardstick")
    assert emr["seeds"] == "0" and "oracle routing: emr" in emr["caveats"]
    assert shots["auroc_verdict"] and not pd.isna(shots["would_change"])


def test_mechanism_claims_carry_caveats_and_fig2_says_it_selected_the_seed():
    shift = pd.DataFrame({"molecule": [3.0, 2.0], "protein": [2.0, 1.5]}, index=["molecule", "protein"])
    gap = pd.DataFrame({"specialist": ["molecule"], "blocks_above": [30], "blocks": [30], "mean_ratio": [1.02]})
    stability = pd.DataFrame({"projections": [32, 256], "mean std of alpha over seeds": [0.1, 0.04]})
    distances = pd.DataFrame({"molecule": [1.0, 3.0], "protein": [2.0, 2.5]}, index=["molecule", "protein"])
    table = report.mechanism_claims(shift, gap, stability, distances, n={"Fig. 2": 64}).set_index("source")
    assert list(table.columns[-4:]) == list(CAVEAT_COLUMNS)
    fig2 = table.loc["Fig. 2"]
    assert fig2["n"] == 64 and fig2["seeds"] == "0" and "selected by this very test" in fig2["caveats"]
    assert "mean ratio <= 1 (now 30/30 blocks, mean ratio 1.02)" in fig2["would_change"]
    assert (table.loc["Fig. 1", "n"] == "not recorded").all()
    protein = table[table["claim"].str.startswith("the protein specialist")].iloc[0]
    # the same test at three specialist seeds: holds only where it holds at every seed
    by_seed = pd.DataFrame({"seed": [0, 1, 2, 0, 1, 2], "specialist": ["molecule"] * 3 + ["cell"] * 3,
                            "blocks_above": [30, 28, 25, 20, 5, 3], "blocks": [30] * 6,
                            "mean_ratio": [1.3, 1.2, 1.1, 1.1, 0.9, 0.8]})
    seeded = report.mechanism_claims(shift, by_seed, stability, distances, seeds=(0, 1, 2)).set_index("source")
    mol, cell = (seeded.loc["Fig. 2"].set_index("claim").filter(like=f"{m} specialist", axis=0).iloc[0]
                 for m in ("molecule", "cell"))
    assert mol["verdict"] == "holds" and cell["verdict"] == "mixed: holds at 1 of 3 seeds"
    assert mol["seeds"] == "0, 1, 2" and "seed 1: 28/30 blocks" in mol["evidence"]
    assert "seed 0 selected by this very test, seeds 1, 2 not" in cell["caveats"]
    assert protein["verdict"] == "does not hold" and protein["would_change"] == \
        "protein tokens moving furthest (now molecule 2 vs protein 1.5)"


# --------------------------------------------------------------------------- D: the declared margin is recorded
def test_the_noninferiority_margin_is_recorded_on_the_at_least_rows():
    results = _results(models=("es", "specialist-molecule"))
    none = _row(report.claims(results, n_resamples=200), "ES-Merging is at least as good as Mol-LLaMA")
    assert np.isnan(none["margin"]) and none["verdict"] == "inconclusive (no margin declared)"
    assert none["would_change"].startswith("a non-inferiority margin above")
    reg = report.claims(results, n_resamples=200, noninferiority_margin=30.0)
    row = _row(reg, "ES-Merging is at least as good as Mol-LLaMA")
    assert row["margin"] == 30.0 and row["verdict"] == "supported"
    assert row["would_change"].startswith("a CI lower bound at or below -30 vs specialist-molecule")
    assert reg[~reg["claim"].str.contains(">=|at least")]["margin"].isna().all()  # "beats" rows use no margin


# --------------------------------------------------------------------------- E: EMR routed vs one model
def test_emr_is_labelled_routed_or_one_model_and_one_model_is_optional():
    results = _results()
    without = _row(report.claims(results, n_resamples=100), ALL_13)
    assert "vs emr (routed):" in without["detail"] and "(partial)" not in without["verdict"]
    results[C.EMR_ONE_MODEL] = _results(models=("emr-one",), seed=5)["emr-one"]
    row = _row(report.claims(results, n_resamples=100), ALL_13)
    assert "vs emr (routed):" in row["detail"] and "vs emr (one model):" in row["detail"]
    assert row["n_compared"] == len(C.MERGING_BASELINES) + 1
    assert "oracle routing: emr;" in row["caveats"] and "emr-one" not in row["caveats"]
    assert C.method_label("emr-one") == "emr (one model)" and C.EMR_ONE_MODEL == ONE_MODEL
