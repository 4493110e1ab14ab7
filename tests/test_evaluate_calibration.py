"""Calibrated decisions and the shots-shuffled control, and the power statement."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.data.benchmarks import spec
from esmerge.errors import UsageError
from esmerge.evaluate import calibration as cal
from esmerge.evaluate import sweep
from esmerge.specialists.base_llm import load_base

CPU = scales.get("cpu")  # the settings these tests were written at

# 24 distinct valid SMILES (a CYP benchmark reads molecules only)
SMILES = ["C" * i + "O" for i in range(1, 9)] + ["C" * i + "N" for i in range(1, 9)] + \
         ["C" * i + "Cl" for i in range(1, 9)]


KIND = spec("CYP2C9").kind


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base(scales.get("smoke"))


def cyp_frame(y):
    n = len(y)
    return pd.DataFrame({"molecule": SMILES[:n], "molecule2": [None] * n, "protein": [None] * n,
                         "cell_id": [None] * n, "cell_genes": [None] * n, "y": list(y), "label": ["x"] * n})


def pools():
    df = cyp_frame([0, 1, 1, 0, 0, 1, 0, 1] + [1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0])
    return df.iloc[:8], df.iloc[8:]


# --------------------------------------------------------------------------- the maths, by hand
def test_contextual_calibration_divides_by_the_content_free_probabilities():
    # content-free prompts: p_cf(1) = 0.8 on average -> bias log(0.8 / 0.2) = log 4
    cf = np.log([[0.2, 0.8], [0.2, 0.8]])
    assert cal.content_free_bias(cf) == pytest.approx(np.log(4.0))
    # p(1) = 0.75 (odds 3 < 4) -> 0 after calibration although argmax says 1; odds 5 > 4 -> 1
    scores = np.log([[0.25, 0.75], [1 / 6, 5 / 6], [0.9, 0.1]])
    assert scores.argmax(1).tolist() == [1, 1, 0]
    assert cal.contextual_decision(scores, cf).tolist() == [0, 1, 0]
    # Zhao et al.'s W = diag(p_cf)^-1 applied to normalised probabilities gives the same answers
    p = np.exp(scores) / np.exp(scores).sum(1, keepdims=True)
    assert (p / np.array([0.2, 0.8])).argmax(1).tolist() == [0, 1, 0]
    # unnormalised log-likelihoods (shifted per row) decide the same: only the margin counts
    assert cal.contextual_decision(scores - np.array([[3.0], [1.0], [7.0]]), cf - 2.0).tolist() == [0, 1, 0]


def test_fit_threshold_maximises_accuracy_and_prefers_the_argmax():
    margins = np.array([-4.0, -3.0, -2.5, -1.0, 0.5, 2.0])
    y = np.array([0, 0, 1, 1, 1, 1])
    t = cal.fit_threshold(margins, y)
    assert t == pytest.approx(-2.75)  # the midpoint between -3.0 and -2.5: 6/6 right
    assert cal.threshold_decision(margins, t).tolist() == y.tolist()
    # a tie in accuracy between -0.25 (between -1 and 0.5) and -3.5 goes to the one nearest 0
    assert cal.fit_threshold([-4.0, -3.0, -1.0, 0.5], [0, 1, 0, 1]) == pytest.approx(-0.25)
    assert cal.fit_threshold([], []) == 0.0


# --------------------------------------------------------------------------- the shuffled control
def test_shuffled_control_keeps_entities_order_and_label_multiset_on_a_hand_made_pool(base):
    eval_df, context_df = pools()
    config = ev.EvalConfig.for_scale(CPU, n_eval=8, n_context=16, n_shots=3, shot_labels="shuffled")
    options = ev.PromptOptions(frozenset(), smiles_chars=None)
    session = ev.EvalSession()
    real = sweep._prompts("CYP2C9", KIND, eval_df, context_df, ev.EvalConfig.for_scale(CPU, n_shots=3), options,
                          base.tokenizer, session)
    control = sweep._prompts("CYP2C9", KIND, eval_df, context_df, config, options, base.tokenizer, session)
    shots = lambda p: re.findall(r"Example \d+: Molecule: (\S+) Final answer: ([^\n]+)", p.text)  # noqa: E731
    pool, positions = session.retrieval.shots(KIND, "CYP2C9", eval_df, context_df, 3)
    real_labels, control_labels = [], []
    for r, c, pos in zip(real, control, positions):
        assert [m for m, _ in shots(r)] == [m for m, _ in shots(c)] == pool["molecule"].iloc[pos].tolist()
        assert len(shots(c)) == 3
        real_labels += [lab for _, lab in shots(r)]
        control_labels += [lab for _, lab in shots(c)]
        # the query itself is untouched
        assert r.text.split("Examples:")[1].split("\n\n")[1] == c.text.split("Examples:")[1].split("\n\n")[1]
    # the real prompts show the pool's labels; the control the same multiset, reassigned
    labels = spec("CYP2C9").labels
    assert sorted(real_labels) == sorted(control_labels) and real_labels != control_labels
    assert real_labels == [labels[v] for p in positions for v in pool["y"].to_numpy()[p]]
    # by hand: pooled labels permuted with the seed, dealt back slot by slot
    flat = np.array([1, 1, 0, 0, 1, 0])
    expect = flat[np.random.default_rng(3).permutation(6)]
    assert cal.shuffled_shot_labels([[1, 1], [0, 0, 1], [0]], seed=3) == [expect[:2].tolist(), expect[2:5].tolist(),
                                                                           expect[5:].tolist()]


# --------------------------------------------------------------------------- no evaluation label leaks
@pytest.mark.parametrize("decision", ["context-threshold", "contextual"])
def test_fitted_decision_reads_context_labels_only(base, tmp_path, decision):
    eval_df, context_df = pools()
    config = ev.EvalConfig.for_scale(CPU, n_eval=8, n_context=16, n_shots=2, batch_size=4, n_resamples=50,
                                     decision=decision, n_calibration=8)
    mut = ev.ModelUnderTest.base_only(base)
    first = ev.evaluate(mut, "CYP2C9", config, pools=(eval_df, context_df), out_dir=tmp_path / "a", progress=False)
    # the evaluation rows' labels permuted (entities, order and index unchanged): a new cache entry
    flipped = eval_df.assign(y=eval_df["y"].to_numpy()[[3, 0, 6, 1, 7, 2, 4, 5]])
    assert flipped["y"].tolist() != eval_df["y"].tolist()
    second = ev.evaluate(mut, "CYP2C9", config, pools=(flipped, context_df), out_dir=tmp_path / "b", progress=False)
    assert second["y"] == flipped["y"].tolist()
    assert second["decision"] == first["decision"]  # same threshold / content-free bias
    assert second["pred"] == first["pred"]
    assert first["decision"]["n_calibration"] == 8 and first["decision"]["rule"] == decision
    if decision == "context-threshold":
        # ...whereas a threshold fitted on the evaluation rows would have moved with their labels,
        # so the two assertions above do catch a leak
        margins = cal.margin(np.asarray(first["scores"]))
        assert cal.fit_threshold(margins, first["y"]) != cal.fit_threshold(margins, second["y"])
        # and the context labels do matter: flip them and the fitted threshold moves
        ctx = context_df.assign(y=1 - context_df["y"])
        third = ev.evaluate(mut, "CYP2C9", config, pools=(eval_df, ctx), out_dir=tmp_path / "c", progress=False)
        assert third["decision"]["threshold"] != first["decision"]["threshold"]
        t = first["decision"]["threshold"]
        assert first["pred"] == (margins > t).astype(int).tolist()
    assert first["pred_argmax"] == np.asarray(first["scores"]).argmax(1).tolist()


def test_plain_argmax_keeps_its_old_cache_key_and_result_fields():
    config = ev.EvalConfig.for_scale(CPU, n_eval=4, n_context=6, n_shots=2, decision="argmax")
    assert "decision" not in config.key() and "shot_labels" not in config.key()
    assert "n_calibration" not in config.key()
    assert ev.EvalConfig.for_scale(CPU, decision="contextual").key()["decision"] == "contextual"
    # smoke and cpu cross-fit their thresholds: the fold count is in the key, no calibration rows are
    smoke = ev.default_config(scales.get("smoke"))
    assert smoke.decision == "cross-fit" and smoke.key()["n_folds"] == 3 and "n_calibration" not in smoke.key()
    assert ev.EvalConfig.for_scale(CPU, shot_labels="shuffled").key()["shot_labels"] == "shuffled"
    with pytest.raises(UsageError, match="decision='bogus'"):
        ev.EvalConfig.for_scale(CPU, decision="bogus")
    with pytest.raises(UsageError, match="shot_labels"):
        ev.EvalConfig.for_scale(CPU, shot_labels="random")


# --------------------------------------------------------------------------- power statement
def _run(y, pred):
    return {"example_ids": list(range(len(y))), "y": list(y), "pred": list(pred)}


def test_minimal_detectable_difference_from_the_observed_discordance():
    y = [1, 0] * 50
    a = _run(y, y)  # always right
    b = _run(y, [v if i % 5 else 1 - v for i, v in enumerate(y)])  # wrong on every 5th: discordance 0.2
    assert ev.discordance(a, b) == pytest.approx(0.2)
    # 2.80 * sqrt(0.2 / 100) = 0.1252 -> 12.5 points on one benchmark
    z = 1.959964 + 0.841621
    assert ev.paired_mde({"X": a}, {"X": b}) == pytest.approx(100 * z * np.sqrt(0.2 / 100), rel=1e-5)
    # four benchmarks alike: the mean's SE halves
    four_a, four_b = {k: a for k in "ABCD"}, {k: b for k in "ABCD"}
    assert ev.paired_mde(four_a, four_b) == pytest.approx(100 * z * np.sqrt(0.2 / 100) / 2, rel=1e-5)
    # more power or a stricter alpha needs a larger difference
    assert ev.paired_mde(four_a, four_b, power=0.9) > ev.paired_mde(four_a, four_b)
    assert ev.paired_mde(four_a, four_b, alpha=0.01) > ev.paired_mde(four_a, four_b)
    with pytest.raises(ValueError, match="different examples"):
        ev.discordance(a, {**b, "example_ids": list(range(1, 101))})
