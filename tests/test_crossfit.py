"""The cross-fitted threshold decision: hand-made margins, no row's own label in its own threshold,
and an evaluation that scores no calibration prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.errors import UsageError
from esmerge.evaluate import calibration as cal
from esmerge.evaluate import sweep
from esmerge.specialists.base_llm import load_base

CPU = scales.get("cpu")  # the settings these tests were written at

# 24 distinct valid SMILES (a CYP benchmark reads molecules only), as in test_evaluate_calibration
SMILES = ["C" * i + "O" for i in range(1, 9)] + ["C" * i + "N" for i in range(1, 9)] + \
         ["C" * i + "Cl" for i in range(1, 9)]


def _row_thresholds(margins, y, k=5, seed=0) -> np.ndarray:
    """Each row's own threshold ``[n]`` under cross-fitting."""
    folds = cal.cross_fit_folds(len(margins), k, seed)
    return cal.cross_fit_thresholds(margins, y, folds)[folds]


# --------------------------------------------------------------------------- hand-made margins
def test_cross_fit_on_hand_made_margins_with_known_answers():
    # two folds given by hand: fold 0 = rows 0, 2, 4, fold 1 = rows 1, 3, 5
    m = np.array([-3.0, -2.0, -1.0, 0.5, -2.5, 1.0])
    y = np.array([0, 0, 1, 1, 0, 1])
    folds = np.array([0, 1, 0, 1, 0, 1])
    # fold 0 is decided by a threshold fitted on rows 1, 3, 5: margins -2.0 (0), 0.5 (1), 1.0 (1) -> the
    # midpoint -0.75 is the only one right on all three; fold 1 by rows 0, 2, 4: -3.0 (0), -1.0 (1),
    # -2.5 (0) -> -1.75 separates them
    t = cal.cross_fit_thresholds(m, y, folds)
    assert t.tolist() == [-0.75, -1.75]
    # row 2 (margin -1.0, y=1) sits in fold 0: -1.0 > -0.75 is False, so cross-fitting gets it wrong,
    # whereas a threshold fitted on every row (-1.5 or -1.75) would call it right by having seen it
    assert cal.threshold_decision(m, t[folds]).tolist() == [0, 0, 0, 1, 0, 1]
    assert cal.threshold_decision(m, cal.fit_threshold(m, y)).tolist() == y.tolist()

    # well separated classes (every fold has both sides): cross-fitting recovers every answer, and each
    # fold's threshold lies in the gap between -1 and 1
    m = np.r_[np.linspace(-6.0, -1.0, 10), np.linspace(1.0, 6.0, 10)]
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    pred, folds, thresholds = cal.cross_fit_decision(m, y, k=5, seed=3)
    assert pred.tolist() == y.tolist()
    assert len(thresholds) == 5 and np.all((thresholds > -1.0) & (thresholds < 1.0))
    assert sorted(np.bincount(folds).tolist()) == [4] * 5

    # a margin that leans: every positive at -2..-1, every negative at -8..-6 -> argmax says all 0;
    # each cross-fitted threshold is a midpoint between a negative and a positive, in [-5, -3.5], so
    # every answer is right
    m = np.r_[np.linspace(-8.0, -6.0, 8), np.linspace(-2.0, -1.0, 8)]
    y = np.r_[np.zeros(8, int), np.ones(8, int)]
    pred, _, thresholds = cal.cross_fit_decision(m, y, k=4, seed=0)
    assert (m > 0).sum() == 0 and pred.tolist() == y.tolist()
    assert np.all((thresholds >= -5.0) & (thresholds <= -3.5))


def test_folds_are_seeded_balanced_and_never_read_labels():
    folds = cal.cross_fit_folds(32, 5, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [6, 6, 6, 7, 7]
    assert np.array_equal(folds, cal.cross_fit_folds(32, 5, seed=0))
    assert not np.array_equal(folds, cal.cross_fit_folds(32, 5, seed=1))
    assert sorted(cal.cross_fit_folds(3, 5).tolist()) == [0, 1, 2]  # k > n: leave-one-out
    # the decision's folds are the same whatever the labels
    m = np.random.default_rng(0).normal(size=20)
    _, a, _ = cal.cross_fit_decision(m, np.zeros(20, int), k=5, seed=7)
    _, b, _ = cal.cross_fit_decision(m, np.arange(20) % 2, k=5, seed=7)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="k must be at least 1"):
        cal.cross_fit_folds(4, 0)


def test_no_row_label_reaches_its_own_threshold():
    rng = np.random.default_rng(0)
    m = rng.normal(size=30) + np.r_[np.zeros(15), np.full(15, 1.0)]
    y = np.r_[np.zeros(15, int), np.ones(15, int)]
    before = _row_thresholds(m, y)
    moved_others = 0
    for i in range(len(y)):
        flipped = y.copy()
        flipped[i] = 1 - flipped[i]
        after = _row_thresholds(m, flipped)
        assert after[i] == before[i], f"row {i}'s own label moved its threshold"
        moved_others += int(np.any(after != before))
    # the labels do matter to the *other* folds' thresholds, so the check above can fail
    assert moved_others > 0
    # ...and a threshold fitted on every row, its own included, does move with its own label
    fit_all = cal.fit_threshold(m, y)
    assert any(cal.fit_threshold(m, np.where(np.arange(30) == i, 1 - y, y)) != fit_all for i in range(30))


# --------------------------------------------------------------------------- the evaluation
@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base(scales.get("smoke"))


def _pools():
    import pandas as pd

    y = [0, 1, 1, 0, 0, 1, 0, 1, 1, 0] + [1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1]
    n = len(y)
    df = pd.DataFrame({"molecule": SMILES[:n], "molecule2": [None] * n, "protein": [None] * n,
                       "cell_id": [None] * n, "cell_genes": [None] * n, "y": y})
    return df.iloc[:10], df.iloc[10:]


def _counting(monkeypatch) -> list[int]:
    """Rows ``label_logits`` scores, one entry per batch."""
    rows = []
    real = sweep.label_logits

    def counted(model, batch, projectors):
        out = real(model, batch, projectors)
        rows.append(int(out.shape[0]))
        return out

    monkeypatch.setattr(sweep, "label_logits", counted)
    return rows


def test_cross_fit_evaluation_scores_no_calibration_prompt(base, tmp_path, monkeypatch):
    eval_df, context_df = _pools()
    mut = ev.ModelUnderTest.base_only(base)
    rows = _counting(monkeypatch)
    common = dict(n_eval=10, n_context=14, n_shots=2, batch_size=4, n_resamples=50, n_calibration=8)
    fitted = ev.evaluate(mut, "CYP2C9", ev.EvalConfig.for_scale(CPU, decision="context-threshold", **common),
                         pools=(eval_df, context_df), out_dir=tmp_path / "a", progress=False)
    assert sum(rows) == 10 + 8 and fitted["decision"]["n_calibration"] == 8  # the counter does count them
    rows.clear()
    config = ev.EvalConfig.for_scale(CPU, decision="cross-fit", n_folds=3, **common)
    result = ev.evaluate(mut, "CYP2C9", config, pools=(eval_df, context_df), out_dir=tmp_path / "b", progress=False)
    assert sum(rows) == 10  # the evaluation prompts only
    d = result["decision"]
    assert sweep.decision_rule(result) == "cross-fit" and sweep.decision_rule(fitted) == "context-threshold"
    assert d["n_calibration"] == 0 and d["k"] == 3 and len(d["fold_thresholds"]) == 3
    assert sorted(np.bincount(d["folds"]).tolist()) == [3, 3, 4]
    # the recorded thresholds give the recorded answers, each fold's fitted on the other folds
    margins = cal.margin(np.asarray(result["scores"]))
    folds = np.asarray(d["folds"])
    assert result["pred"] == (margins > np.asarray(d["fold_thresholds"])[folds]).astype(int).tolist()
    y = np.asarray(result["y"])
    # (the stored scores are rounded to 4 decimals, the thresholds were fitted on the unrounded ones)
    assert d["fold_thresholds"] == pytest.approx([cal.fit_threshold(margins[folds != f], y[folds != f])
                                                  for f in range(3)], abs=1e-3)
    assert result["accuracy"] == pytest.approx(ev.accuracy(result["y"], result["pred"]))
    assert result["pred_argmax"] == np.asarray(result["scores"]).argmax(1).tolist()

    # one evaluation row's label flipped: its own answer cannot move (its threshold never saw it)
    monkeypatch.undo()
    for i in range(10):
        flipped = eval_df.assign(y=np.where(np.arange(10) == i, 1 - eval_df["y"].to_numpy(), eval_df["y"].to_numpy()))
        again = ev.evaluate(mut, "CYP2C9", config, pools=(flipped, context_df), out_dir=tmp_path / f"f{i}",
                            progress=False)
        assert again["scores"] == result["scores"]  # the prompts do not show the query's label
        assert again["decision"]["fold_thresholds"][folds[i]] == d["fold_thresholds"][folds[i]]
        assert again["pred"][i] == result["pred"][i]


def test_cross_fit_config_keys_and_refusals():
    # other decisions keep the keys and printed form they had before n_folds existed
    for decision in ("argmax", "contextual", "context-threshold"):
        config = ev.EvalConfig.for_scale(CPU, decision=decision)
        assert "n_folds" not in config.key() and "n_folds" not in repr(config)
    # the cpu scale cross-fits its thresholds (chosen on protocol rows): its key carries the fold count
    assert ev.default_config(CPU).decision == "cross-fit" and ev.default_config(CPU).key()["n_folds"] == 5
    # generation has no scores to threshold: asking for it at a cross-fitting scale takes the paper's argmax
    assert ev.EvalConfig.for_scale(CPU, scoring="generate").decision == "argmax"
    with pytest.raises(UsageError, match="scoring='generate' has none of"):  # but never silently when asked for
        ev.EvalConfig.for_scale(CPU, scoring="generate", decision="cross-fit")
    key = ev.EvalConfig.for_scale(CPU, decision="cross-fit", n_folds=4).key()
    assert key["decision"] == "cross-fit" and key["n_folds"] == 4 and "n_calibration" not in key
    assert ev.EvalConfig.for_scale(CPU, decision="cross-fit").n_folds == cal.N_FOLDS == 5
    assert ev.EvalConfig.for_scale(CPU, decision="cross-fit").key()["n_folds"] == 5
    with pytest.raises(UsageError, match="n_folds=1"):
        ev.EvalConfig.for_scale(CPU, decision="cross-fit", n_folds=1)
    with pytest.raises(UsageError, match="scoring='generate'"):
        ev.EvalConfig.for_scale(CPU, decision="cross-fit", scoring="generate")
    assert "cross-fit" in cal.DECISIONS
