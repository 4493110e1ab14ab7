"""Retrieval-only yardstick: votes, leakage of evaluation labels, result shape, the fast retrieval
(equal to ``evaluate.retrieve_examples``), the paper-protocol split and the verdict table."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_data import needs_data, needs_reference  # skip when the upstream data / the paper's values are not here

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.data import benchmarks
from esmerge.data.benchmark_pools import split_pools
from esmerge.evaluate import yardstick as ys
from esmerge.report import yardstick as ry

CPU = scales.get("cpu")  # the settings these tests were written at

ALCOHOLS = ["CCO", "CCCO", "CCCCO", "CCCCCO", "CCCCCCO", "OCCO"]
AROMATICS = ["c1ccccc1", "Cc1ccccc1", "CCc1ccccc1", "c1ccc2ccccc2c1", "Oc1ccccc1C", "c1ccncc1"]
PROT_A, PROT_B, PROT_C = "MKTAYIAKQRQISFVK", "GGSSLLAAVVGGSSLL", "MKTAYIAKQRQISFVA"


def frame(molecules, y, proteins=None, genes=None, molecule2=None, cell_ids=None, index=None):
    n = len(molecules)
    return pd.DataFrame({
        "molecule": molecules, "molecule2": molecule2 or [None] * n, "protein": proteins or [None] * n,
        "cell_id": cell_ids or [None] * n, "cell_genes": genes or [None] * n, "y": y, "label": ["x"] * n},
        index=index)


def config(n_shots=3, n_resamples=200):
    return ev.EvalConfig.for_scale(CPU, n_eval=0, n_context=0, n_shots=n_shots, n_resamples=n_resamples)


# --------------------------------------------------------------------------- votes on a known pool
def test_knn_vote_on_a_hand_made_pool_where_the_answer_is_known():
    # Alcohols are positive, aromatics negative: the 3 nearest shots of an alcohol are alcohols.
    context = frame(ALCOHOLS[:5] + AROMATICS[:5], [1] * 5 + [0] * 5)
    queries = frame(["CCCCCCCO", "CCCCCCCCO", "CCCc1ccccc1", "Cc1ccccc1C"], [1, 1, 0, 0], index=[10, 11, 12, 13])
    runs = ys.yardstick_runs("CYP1A2", config(), pools=(queries, context))
    knn = runs["knn-shots"]
    assert knn["pred"] == [1, 1, 0, 0] and knn["accuracy"] == 100.0
    assert knn["example_ids"] == ["10", "11", "12", "13"] and knn["n"] == 4 and knn["n_context"] == 10
    assert knn["scores"][0] == [0.0, 1.0]  # all three shots positive
    # the shots voted on are exactly the ones evaluate retrieves for the prompt
    _, shots = ev.RetrievalCache().shots("cyp-inh", "CYP1A2", queries, context, 3)
    index = ev.ContextIndex(context, "cyp-inh")
    assert shots == [ev.retrieve_examples(index, q, 3) for _, q in queries.iterrows()]
    assert all(set(s) <= set(range(5)) for s in shots[:2]) and all(set(s) <= set(range(5, 10)) for s in shots[2:])
    assert ys.yardstick_from_shots("CYP1A2", queries, context, shots, config())["knn-shots"]["pred"] == knn["pred"]
    # a 5-5 pool majority ties: y = 0 by the documented rule, so always-majority scores 50 here
    assert runs["majority"]["pred"] == [0, 0, 0, 0] and runs["majority"]["accuracy"] == 50.0


def test_shot_votes_use_shot_labels_and_ties_go_to_the_pool_majority():
    context = frame(["C"] * 5, [1, 0, 0, 1, 0])  # pool majority 0
    result = ys.yardstick_from_shots("CYP1A2", frame(["CO"] * 3, [1, 1, 0]), context,
                                     [[0, 3], [0, 1], [1, 2, 4]], config())
    assert result["knn-shots"]["pred"] == [1, 0, 0]  # 2-0 positive; 1-1 tie -> pool majority 0; 0-3
    assert result["knn-shots"]["context_majority"] == 0
    with pytest.raises(ValueError, match="unknown yardstick"):
        ys.yardstick_run("CYP1A2", config(), "oracle", pools=(frame(["CO"], [1]), context))


def test_majority_comes_from_the_context_pool_never_from_the_evaluation_rows():
    context = frame(ALCOHOLS + AROMATICS[:2], [0] * 5 + [1] * 3)  # pool majority 0
    queries = frame(AROMATICS[2:], [1, 1, 1, 1])  # evaluation majority 1
    runs = ys.yardstick_runs("CYP1A2", config(), pools=(queries, context))
    assert runs["majority"]["pred"] == [0, 0, 0, 0] and runs["majority"]["accuracy"] == 0.0
    # Flipping every evaluation label changes no prediction of either yardstick.
    flipped = ys.yardstick_runs("CYP1A2", config(), pools=(queries.assign(y=1 - queries["y"]), context))
    for method in ys.METHODS:
        assert flipped[method]["pred"] == runs[method]["pred"]
        assert flipped[method]["y"] == [0, 0, 0, 0]
    # ... while flipping the pool's labels flips the majority.
    swapped = ys.yardstick_runs("CYP1A2", config(), pools=(queries, context.assign(y=1 - context["y"])))
    assert swapped["majority"]["pred"] == [1, 1, 1, 1]


def test_results_have_the_evaluation_shape_and_the_project_cis():
    rng = np.random.default_rng(0)
    context = frame(ALCOHOLS + AROMATICS, rng.integers(0, 2, 12).tolist())
    queries = frame(["CCCCCCCO", "CCc1ccccc1", "OCCCO", "c1ccccc1CC", "CCN", "CCCN"], [1, 0, 1, 0, 1, 1])
    runs = ys.yardstick_runs("CYP2C9", config(n_resamples=300), pools=(queries, context))
    for method, r in runs.items():
        assert r["method"] == method and r["benchmark"] == "CYP2C9" and r["seed"] == 0
        for metric in ("accuracy", "macro_f1"):
            lo, hi = r[f"{metric}_ci"]
            assert isinstance(lo, float) and lo <= r[metric] <= hi
            assert (lo, hi) == ev.bootstrap_ci(r["y"], r["pred"], metric, 300, 0)
        assert np.asarray(r["scores"]).shape == (6, 2)
    # the rows fit the project's summary table and paired comparisons
    table = ev.summary({m: {"CYP2C9": r} for m, r in runs.items()})
    assert list(table["method"]) == list(ys.METHODS)
    point, lo, hi = ev.paired_bootstrap({"CYP2C9": runs["knn-shots"]}, {"CYP2C9": runs["majority"]})
    assert point == pytest.approx(runs["knn-shots"]["accuracy"] - runs["majority"]["accuracy"])


# --------------------------------------------------------------------------- fast retrieval == evaluate's
def _same_as_evaluate(context, queries, kind, k):
    index = ev.ContextIndex(context, kind)
    reference = [ev.retrieve_examples(index, q, k) for _, q in queries.iterrows()]
    assert ys.retrieve_all(context, queries, kind, k) == reference
    return reference


def test_fast_retrieval_equals_evaluate_on_hand_made_pools():
    prots = [PROT_A, PROT_B, PROT_C, PROT_A, PROT_B, PROT_A]
    mp = frame(ALCOHOLS, [0, 1, 1, 0, 1, 0], proteins=prots)
    q = frame(["CCCCO", "c1ccccc1", "CCO"], [0, 1, 0], proteins=[PROT_C, PROT_C, "MKTAYIAKQRQ"])
    picked = _same_as_evaluate(mp, q, "mol-prot", 4)
    assert 2 not in picked[0]  # row 2 ("CCCCO", PROT_C) shows the query's entities: never a shot
    g = lambda *ids: [f"G{i}" for i in ids]  # noqa: E731
    cells = frame(["CCO", "CCCCO", "CCO", "CCCCO"], [0, 1, 0, 1],
                  genes=[g(1, 2, 3, 9), g(1, 2, 3, 4), g(1, 2, 3, 4), g(7, 8)],
                  cell_ids=list("wxyz"), molecule2=["CCN", "CCC", "CCCN", "CO"])
    cq = frame(["CCCCO", "CCN"], [1, 0], genes=[g(1, 2, 3, 4), g(7, 8, 9)], cell_ids=["q", "r"],
               molecule2=["CCN", "CCO"])
    assert _same_as_evaluate(cells, cq, "gdsc", 4)[0] == [1, 2, 0, 3]
    _same_as_evaluate(cells, cq, "drugcomb", 3)
    _same_as_evaluate(frame(ALCOHOLS + AROMATICS, [0, 1] * 6), frame(["CCCCCCCO", "Cc1ccccc1"], [1, 0]), "cyp-sub", 5)


@needs_data
@pytest.mark.parametrize("benchmark", ["BIOSNAP", "DrugComb", "GDSC2", "CYP2D6-substrate"])
def test_fast_retrieval_equals_evaluate_on_real_pools(benchmark):
    eval_df, context_df = split_pools(benchmarks.load_benchmark(benchmark), 12, 300, seed=3)
    _same_as_evaluate(context_df, eval_df, benchmarks.spec(benchmark).kind, ys.PAPER_SHOTS)


# --------------------------------------------------------------------------- the paper's protocol
def test_paper_split_is_seeded_stratified_disjoint_and_complete():
    df = pd.DataFrame({"y": [0] * 70 + [1] * 30, "molecule": [f"C{'C' * i}O" for i in range(100)]})
    test, train = ys.paper_split(df, seed=4)
    assert (len(test), len(train)) == (20, 80) and int(test["y"].sum()) == 6 and int(train["y"].sum()) == 24
    assert set(test.index).isdisjoint(train.index) and len(set(test.index) | set(train.index)) == 100
    again, _ = ys.paper_split(df, seed=4)
    other, _ = ys.paper_split(df, seed=5)
    assert list(again.index) == list(test.index) and set(other.index) != set(test.index)
    with pytest.raises(ValueError, match="test_fraction"):
        ys.paper_split(df, test_fraction=1.0)


# --------------------------------------------------------------------------- beside the paper
def test_paper_verdict_on_hand_made_numbers():
    assert ry.paper_verdict(71.0, 79.0, 66.0) == "above"
    assert ry.paper_verdict(71.0, 79.0, 94.1) == "below"
    assert ry.paper_verdict(71.0, 79.0, 71.0) == "within CI"  # the bounds belong to the CI
    assert ry.paper_verdict(71.0, 79.0, float("nan")) == "no paper value"


def _run(y, pred, n_context=100):
    y, pred = np.asarray(y), np.asarray(pred)
    return {"n": len(y), "n_context": n_context, "y": y.tolist(), "pred": pred.tolist(),
            "example_ids": [str(i) for i in range(len(y))],
            "accuracy": float(ev.accuracy(y, pred)), "accuracy_ci": list(ev.bootstrap_ci(y, pred, "accuracy", 200)),
            "macro_f1": float(ev.macro_f1(y, pred)), "macro_f1_ci": list(ev.bootstrap_ci(y, pred, "macro_f1", 200))}


def test_verdict_table_on_hand_made_numbers():
    y = np.array([1, 0] * 50)
    runs = {"knn-shots": {"GDSC2": _run(y, y), "DrugComb": _run(y, np.where(np.arange(100) < 50, y, 1 - y)),
                          "Human": _run(y, 1 - y)},
            "majority": {b: _run(y, np.zeros(100, int)) for b in ("GDSC2", "DrugComb", "Human")}}
    paper = {"GDSC2": 94.1, "DrugComb": 80.7, "Avg. Mol-Cell": 87.4}
    table = ry.verdict_table(runs, paper=paper, n_resamples=200).set_index("dataset")
    assert (table.loc["GDSC2", "knn"] == 100.0
            and table.loc["GDSC2", "verdict"] == "k-NN vote above the paper's ES-Merging")
    assert (table.loc["DrugComb", "knn"] == 50.0
            and table.loc["DrugComb", "verdict"].endswith("below the paper's ES-Merging"))
    assert table.loc["Human", "verdict"] == "no paper value" and table.loc["Human", "majority"] == 50.0
    avg = table.loc["Avg. Mol-Cell"]
    assert avg["knn"] == pytest.approx(75.0) and avg["knn_lo"] < 75.0 < avg["knn_hi"] and avg["n_eval"] == 200
    assert avg["verdict"] == "k-NN vote below the paper's ES-Merging"  # 87.4 lies above the CI of 75
    assert "Avg. Mol-Prot" not in table.index and "Mean of 13" not in table.index  # incomplete groups


@needs_reference
def test_verdict_table_reads_the_paper_values_by_default():
    y = np.array([1, 0] * 10)
    runs = {m: {b: _run(y, y) for b in benchmarks.BENCHMARK_NAMES} for m in ys.METHODS}
    table = ry.verdict_table(runs, n_resamples=50).set_index("dataset")
    assert table.loc["GDSC2", "paper"] == 94.1 and table.loc["CYP2D6 Inh.", "paper"] == 80.7
    assert table.loc["Avg. CYP Sub.", "paper"] == 61.9
    assert table.loc["Mean of 13", "benchmarks"] == 13 and table.loc["Mean of 13", "n_eval"] == 13 * 20
    assert (table["verdict"].str.startswith("k-NN vote above")).all()  # 100 % beats every paper value
