"""The yardstick and shuffled-control rows of the claims register, and the power table."""
from __future__ import annotations

import numpy as np
import pytest

from esmerge import evaluate as ev
from esmerge import report


def _run(y, pred, ids=None):
    return {"example_ids": ids or [str(i) for i in range(len(y))], "y": list(map(int, y)),
            "pred": list(map(int, pred))}


def _results():
    """Hand-made runs on all 13 benchmarks, 40 examples each (40 % positive):
    majority always 0 (60 %), k-NN right on 36/40 (90 %), base right on 26/40 (65 %),
    its shuffled control = majority (60 %), "es" identical to the majority yardstick."""
    y = np.array([1] * 16 + [0] * 24)
    knn = y.copy()
    knn[:4] = 0  # 4 positives missed
    base = np.zeros(40, dtype=int)
    base[:2] = 1  # 2 positives found: 24 + 2 = 26 right
    out = {"base": {}, report.SHUFFLED_CONTROL: {}, "es": {}, "majority": {}, "knn-shots": {}}
    for b in ev.BENCHMARK_NAMES:
        out["base"][b] = _run(y, base)
        out[report.SHUFFLED_CONTROL][b] = _run(y, np.zeros(40))
        out["es"][b] = _run(y, np.zeros(40))
        out["majority"][b] = _run(y, np.zeros(40))
        out["knn-shots"][b] = _run(y, knn)
    return out


def test_yardstick_claims_give_verdicts_that_are_not_inconclusive():
    reg = report.yardstick_claims(_results(), n_resamples=500, seed=0).set_index("claim")
    # rows: the shots test, then each model (not the yardsticks, not the control) against each yardstick
    assert list(reg.index) == [
        "the base uses its shots: it beats its shots-shuffled control (all 13, avg.)",
        "base beats the always-majority yardstick (all 13, avg.)",
        "es beats the always-majority yardstick (all 13, avg.)",
        "base beats the k-NN vote over its own shots (all 13, avg.)",
        "es beats the k-NN vote over its own shots (all 13, avg.)"]
    shots = reg.loc["the base uses its shots: it beats its shots-shuffled control (all 13, avg.)"]
    assert shots["ours"] == pytest.approx(5.0) and shots["lo"] > 0 and shots["verdict"] == "supported"
    assert np.isnan(shots["paper"])  # not a claim of the paper
    knn = reg.loc["base beats the k-NN vote over its own shots (all 13, avg.)"]
    assert knn["ours"] == pytest.approx(65.0 - 90.0) and knn["hi"] < 0 and knn["verdict"] == "not supported"
    assert reg.loc["es beats the always-majority yardstick (all 13, avg.)", "verdict"] == \
        "inconclusive (identical answers)"
    assert reg.loc["base beats the always-majority yardstick (all 13, avg.)", "verdict"] == "supported"


def test_yardstick_claims_pair_examples_and_mark_partial_groups():
    results = _results()
    results["knn-shots"]["BindingDB"] = {**results["knn-shots"]["BindingDB"],
                                         "example_ids": [f"x{i}" for i in range(40)]}
    with pytest.raises(ValueError, match="different examples"):
        report.yardstick_claims(results, n_resamples=50)
    few = {m: {b: r for b, r in runs.items() if b in ("BindingDB", "GDSC2")} for m, runs in _results().items()}
    reg = report.yardstick_claims(few, n_resamples=50)
    assert set(reg["datasets"]) == {"2/13"} and reg["verdict"].str.endswith("(partial)").all()
    # without a control or yardsticks there is nothing to check
    assert report.yardstick_claims({"base": _results()["base"]}).empty


def test_power_table_reports_the_observed_discordance_and_its_mde():
    results = _results()
    table = report.power_table(results, reference="base").set_index("method")
    # base vs majority: exactly one right on the 2 found positives -> 2/40 discordant
    assert table.loc["majority", "discordance"] == pytest.approx(2 / 40)
    assert table.loc["majority", "mde"] == pytest.approx(
        ev.minimal_detectable_difference([2 / 40] * 13, [40] * 13))
    assert table.loc["majority", "n"] == 13 * 40
    assert "base" not in table.index
    assert report.power_table(results, reference="missing").empty


def test_decided_verdicts_lists_decided_rows_or_says_why_with_numbers():
    results = _results()
    reg = report.yardstick_claims(results, n_resamples=200)
    lines = report.decided_verdicts(reg)
    assert lines[0] == f"4 of {len(reg)} verdicts are not inconclusive:"  # all but es vs majority (identical)
    assert any("base beats the k-NN vote over its own shots" in l and "not supported" in l for l in lines)
    undecided = reg[reg["verdict"].str.startswith("inconclusive")]
    why = report.decided_verdicts(undecided, report.power_table(results, reference="es"))
    assert why[0] == "No verdict of the 1 is decided at this n."
    assert "+0.0 and +0.0" in why[1] and "1 compare models that answer identically" in why[1]
    assert why[2].startswith("Paired differences from ES-Merging this n resolves")
