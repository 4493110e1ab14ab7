"""Retention over specialist seeds: the two-level bootstrap against known truths, the claims'
family-wise (Holm) gate, per-modality rows where the mean nets opposite effects, and the
reduction to the single-seed bootstrap."""
from __future__ import annotations

import re

import numpy as np
import pytest

from esmerge.evaluate import retention as R
from esmerge.evaluate import retention_seeds as RS

MODS = ("molecule", "protein", "cell")


def seeded(shifts, n=300, seeds=(0, 1, 2), noise=0.05, data_seed=0):
    """Per specialist seed ``(nlls, tokens)`` on the same examples, with a large shared example difficulty d.

    Per token: base = d + 1 (identical at every seed), specialist = d, model k = d + shift, each
    but the base with fresh noise per seed; ``shifts[k]``: a number, a per-seed list, or a
    per-modality dict of either. The true retained fraction at a seed is 1 - shift.
    """
    rng = np.random.default_rng(data_seed)
    tokens = {m: rng.integers(5, 30, n) for m in MODS}
    d = {m: rng.gamma(2.0, 1.5, n) for m in MODS}
    out = {}
    for j, s in enumerate(seeds):
        nlls = {}
        for m in MODS:
            per = {"base": d[m] + 1, f"specialist-{m}": d[m] + noise * rng.standard_normal(n)}
            for k, sh in shifts.items():
                sh = sh.get(m, 0.0) if isinstance(sh, dict) else sh
                sh = sh[j] if isinstance(sh, (list, tuple)) else sh
                per[k] = d[m] + sh + noise * rng.standard_normal(n)
            nlls[m] = {k: v * tokens[m] for k, v in per.items()}
        out[s] = (nlls, tokens)
    return out


def width(draws):
    lo, hi = R.percentile_ci(draws)
    return hi - lo


def margin_draws(res, a="es", b="avg", m="mean"):
    return res.draws[a][m] - res.draws[b][m]


# --------------------------------------------------------------------------- reduction to one seed
@pytest.mark.parametrize("examples", ["shared", "per seed"])
def test_one_seed_is_resampled_retention_draw_for_draw(examples):
    nlls, tokens = seeded({"es": 0.3, "avg": 0.5}, seeds=(4,), noise=0.2)[4]
    want = R.resampled_retention(nlls, tokens, n_resamples=300, seed=7)
    got = RS.seeded_retention({4: (nlls, tokens)}, n_resamples=300, seed=7, examples=examples)
    assert got.point == want.point and got.nll == want.nll and got.n == want.n
    for k in want.draws:
        for m in want.draws[k]:
            np.testing.assert_array_equal(got.draws[k][m], want.draws[k][m])
    for m in want.gain:
        assert got.gain[m][0] == want.gain[m][0]
        np.testing.assert_array_equal(got.gain[m][1], want.gain[m][1])
    assert got.seeds == (4,) and got.dropped == {} and got.per_seed["es"]["mean"] == {4: want.point["es"]["mean"]}
    # the claims agree too, but for the per-seed margin the seeded detail names
    a, b = R.retention_claims(want, seeds=(4,)), R.retention_claims(got)
    assert a.drop(columns="detail").equals(b.drop(columns="detail"))
    assert b.iloc[1]["detail"].startswith(a.iloc[1]["detail"]) and "seeds 4: " in b.iloc[1]["detail"]


# --------------------------------------------------------------------------- the two-level bootstrap
def test_without_between_seed_variation_the_ci_is_the_example_level_one():
    one = seeded({"es": 0.3, "avg": 0.35}, seeds=(0,))[0]
    single = margin_draws(R.resampled_retention(*one, n_resamples=1000))
    copies = {s: one for s in (0, 1, 2)}  # three seeds that happen to give identical models
    shared = margin_draws(RS.seeded_retention(copies))
    assert width(shared) == pytest.approx(width(single), rel=1e-6)
    # drawing the examples afresh per drawn seed treats one set of examples as three: ~1/sqrt(3) too narrow
    nested = margin_draws(RS.seeded_retention(copies, examples="per seed"))
    assert width(nested) < 0.7 * width(single)
    # seeds that differ only by per-example noise (no seed effect): about the example-level width
    fresh = margin_draws(RS.seeded_retention(seeded({"es": 0.3, "avg": 0.35})))
    assert 0.75 * width(single) < width(fresh) < 1.25 * width(single)


def test_opposite_margins_at_different_seeds_widen_the_ci_to_inconclusive():
    # es retains 0.7 at every seed; avg 0.4 / 1.0 / 0.4: margins +0.3 / -0.3 / +0.3, mean +0.1
    by_seed = seeded({"es": 0.3, "avg": [0.6, 0.0, 0.6]})
    res = RS.seeded_retention(by_seed)
    assert res.point["es"]["mean"] - res.point["avg"]["mean"] == pytest.approx(0.1, abs=0.01)
    lo, hi = R.percentile_ci(margin_draws(res))
    assert lo < -0.1 and hi > 0.25  # the seed level dominates: from "avg at every seed" to "es at every seed"
    row = R.retention_claims(res).set_index("b").loc["avg"]
    assert row["verdict"] == "inconclusive" and row["p_holm"] > 0.05
    assert re.search(r"seeds 0/1/2: \+0\.[23]\d\d/-0\.[23]\d\d/\+0\.[23]\d\d \(2 of 3 agree in sign\)", row["detail"])
    # seed 0 alone, or the three seeds' examples pooled as if one model, would have said "supported"
    assert R.retention_claims(R.resampled_retention(*by_seed[0])).set_index("b").loc["avg", "verdict"] == "supported"
    pooled_nlls = {m: {k: np.concatenate([by_seed[s][0][m][k] for s in by_seed]) for k in by_seed[0][0][m]}
                   for m in MODS}
    pooled_tokens = {m: np.concatenate([by_seed[s][1][m] for s in by_seed]) for m in MODS}
    pooled = R.retention_claims(R.resampled_retention(pooled_nlls, pooled_tokens)).set_index("b").loc["avg"]
    assert pooled["verdict"] == "supported" and pooled["ours"] == pytest.approx(0.1, abs=0.01)


def test_seed_level_draws_take_only_ten_values_at_three_seeds():
    """Without example noise every draw is one of the C(5, 3) = 10 seed multisets' means."""
    tokens = {"cell": np.ones(4, dtype=int)}

    def at(shift):
        return {"cell": {"base": np.full(4, 2.0), "specialist-cell": np.ones(4), "es": np.full(4, 1.0 + shift)}}, tokens

    res = RS.seeded_retention({0: at(0.1), 1: at(0.3), 2: at(0.9)}, n_resamples=2000)
    assert len(set(np.round(res.draws["es"]["cell"], 9))) == 10
    assert res.per_seed["es"]["cell"] == pytest.approx({0: 0.9, 1: 0.7, 2: 0.1})
    assert res.point["es"]["cell"] == pytest.approx(1.7 / 3)
    table = RS.seed_table(res)
    assert len(table[(table["method"] == "es") & (table["modality"] == "cell")]) == 3
    assert "C(5, 3) = 10" in RS.seed_resolution_note(3) and "p = 0.25" in RS.seed_resolution_note(3)
    assert "C(9, 5) = 126" in RS.seed_resolution_note(5) and "p = 0.0625" in RS.seed_resolution_note(5)


def test_table_accepts_seeded_results():
    res = RS.seeded_retention(seeded({"es": 0.3, "avg": 0.6}), n_resamples=200)
    table = R.retention_table(res).set_index(["method", "modality"])
    assert table.loc[("es", "mean"), "lo"] < 0.7 < table.loc[("es", "mean"), "hi"]
    assert table.loc[("es", "molecule"), "n"] == 300 and table.loc[("base", "cell"), "specialist_gain"] > 0.9


# --------------------------------------------------------------------------- Holm over the baselines
def hand_resampled(margins):
    """A ``Resampled`` whose ``es`` minus each baseline's draws are ``margins[b]`` ``[R]`` (one modality)."""
    point = {"es": {"cell": 0.0, "mean": 0.0}}
    draws = {"es": {"cell": np.zeros(1000), "mean": np.zeros(1000)}}
    for b, d in margins.items():
        point[b] = {"cell": -float(np.median(d)), "mean": -float(np.median(d))}
        draws[b] = {"cell": -d, "mean": -d}
    return R.Resampled(point, draws, {}, {}, {"cell": 100})


def test_holm_turns_a_borderline_margin_inconclusive_and_keeps_a_large_one():
    rng = np.random.default_rng(0)
    borderline = np.concatenate([np.full(15, -0.01), np.full(985, 0.05)])  # 15 of 1000 <= 0: p = 32 / 1001
    margins = {"large": np.full(1000, 0.3), "borderline": borderline,
               **{f"null{i}": rng.normal(0, 0.1, 1000) for i in range(5)}}
    claims = R.retention_claims(hand_resampled(margins))
    by_b = claims.set_index("b")
    assert by_b.loc["borderline", "lo"] > 0  # its CI alone excludes 0 ...
    assert R.verdict(by_b.loc["borderline", "lo"], by_b.loc["borderline", "hi"]) == "supported"
    assert by_b.loc["borderline", "p_holm"] == pytest.approx(6 * 32 / 1001, abs=1e-4)  # ... but not the family
    assert by_b.loc["borderline", "verdict"] == "inconclusive"
    assert "Holm p < 0.05 vs borderline" in by_b.loc["borderline", "would_change"]
    assert by_b.loc["large", "p_holm"] == pytest.approx(7 * 2 / 1001, abs=1e-4)
    assert by_b.loc["large", "verdict"] == "supported"
    assert (by_b.loc[[f"null{i}" for i in range(5)], "verdict"] == "inconclusive").all()
    assert claims.iloc[0]["verdict"] == "inconclusive" and claims.iloc[0]["n_compared"] == 7


def test_the_head_is_not_supported_only_when_a_better_baseline_survives_holm():
    rng = np.random.default_rng(1)
    nulls = {f"null{i}": rng.normal(0, 0.1, 1000) for i in range(5)}
    better_borderline = -np.concatenate([np.full(15, -0.01), np.full(985, 0.05)])  # hi < 0, p = 0.032
    claims = R.retention_claims(hand_resampled({"large": np.full(1000, 0.3), "better": better_borderline, **nulls}))
    by_b = claims.set_index("b")
    assert by_b.loc["better", "hi"] < 0 and by_b.loc["better", "verdict"] == "inconclusive"
    assert claims.iloc[0]["verdict"] == "inconclusive"
    claims = R.retention_claims(hand_resampled({"large": np.full(1000, 0.3), "better": np.full(1000, -0.3), **nulls}))
    by_b = claims.set_index("b")
    assert by_b.loc["better", "verdict"] == claims.iloc[0]["verdict"] == "not supported"
    assert claims.iloc[0]["p_holm"] == by_b.loc["better", "p_holm"] < 0.05
    assert claims.iloc[0]["would_change"].startswith("better no longer significantly better")


# --------------------------------------------------------------------------- per-modality rows
def test_modality_rows_appear_when_the_mean_nets_significant_opposite_effects():
    # es vs avg: molecule +0.2 (es better), protein -0.2, cell 0: the mean margin is about 0
    # es vs ties: +0.2 on every modality: nothing to split
    res = RS.seeded_retention(seeded({"es": {"molecule": 0.1, "protein": 0.5, "cell": 0.3}, "avg": 0.3,
                                      "ties": 0.5}), n_resamples=500)
    claims = R.retention_claims(res)
    assert claims["b"].tolist() == ["every baseline", "avg", "avg", "avg", "avg", "ties"]
    assert claims["modality"].tolist() == ["mean", "mean", "molecule", "protein", "cell", "mean"]
    mean_row = claims.iloc[1]
    assert "nets opposite per-modality effects" in mean_row["detail"] and mean_row["verdict"] == "inconclusive"
    rows = claims[claims["modality"] != "mean"].set_index("modality")
    assert rows.loc["molecule", "claim"].endswith("than avg (on molecule)")
    assert rows["verdict"].tolist() == ["supported", "not supported", "inconclusive"]
    assert (rows["n"] == 300).all() and (rows["n_compared"] == 1).all() and (rows["seeds"] == "0, 1, 2").all()
    assert "over 3 modalities vs avg" in rows.loc["protein", "detail"]  # Holm within the modality rows
    assert "seeds 0/1/2:" in rows.loc["protein", "detail"]
    assert "nets opposite" not in claims.iloc[-1]["detail"]
    assert claims.iloc[0]["n"] == claims.iloc[1]["n"] == 900


def test_no_modality_rows_when_one_of_the_opposite_effects_is_not_significant():
    # protein: es 0.7 vs avg 0.698, well inside the noise; molecule significant
    res = RS.seeded_retention(seeded({"es": {"molecule": 0.1, "protein": 0.302, "cell": 0.3}, "avg": 0.3}),
                              n_resamples=500)
    per = {m: R.percentile_ci(margin_draws(res, m=m)) for m in MODS}
    assert per["molecule"][0] > 0 and per["protein"][0] < 0 < per["protein"][1]
    claims = R.retention_claims(res)
    assert claims["modality"].tolist() == ["mean", "mean"]
    assert "nets opposite" not in claims.iloc[1]["detail"]


# --------------------------------------------------------------------------- models, seeds, examples
def test_a_model_missing_at_one_seed_is_dropped_and_reported():
    by_seed = seeded({"es": 0.3, "avg": 0.6, "ties": 0.5})
    del by_seed[1][0]["protein"]["ties"]
    res = RS.seeded_retention(by_seed, n_resamples=100)
    assert res.dropped == {"ties": [1]} and "ties" not in res.point and "ties" not in res.per_seed
    claims = R.retention_claims(res)
    assert claims["b"].tolist() == ["every baseline", "avg"]
    assert "not at every seed, left out: ties (missing at seed 1)" in claims.iloc[0]["detail"]
    assert claims.iloc[0]["seeds"] == "0, 1, 2"
    asked = R.retention_claims(res, baselines=["avg", "ties"])
    assert asked.iloc[0]["verdict"].endswith("(partial)")


def test_seeds_scored_on_other_examples_are_refused():
    by_seed = seeded({"es": 0.3})
    by_seed[2] = (by_seed[2][0], {**by_seed[2][1], "cell": by_seed[2][1]["cell"] + 1})
    with pytest.raises(ValueError, match="seed 2, cell: other examples"):
        RS.seeded_retention(by_seed, n_resamples=10)
    with pytest.raises(ValueError, match="examples must be"):
        RS.seeded_retention(seeded({"es": 0.3}), examples="nested")
