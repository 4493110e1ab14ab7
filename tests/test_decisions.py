"""Decision rules of the claims register on hand-made runs whose right verdict is known."""
from __future__ import annotations

import importlib
import itertools

import numpy as np
import pytest

from esmerge.evaluate import decisions as D
from esmerge.evaluate.caveats import CAVEAT_COLUMNS, DEFAULT_CAVEATS, caveats_for, seeds_text, would_change

C = importlib.import_module("esmerge.report.claims")  # the package re-exports a function of that name


def _run(y, pred, scores=None):
    return {"example_ids": list(range(len(y))), "y": list(y), "pred": list(pred), "scores": scores}


def test_sign_flip_pvalue_equals_exhaustive_enumeration():
    d = [np.array([1.0, 1.0, -1.0, 1.0, 0.0]), np.array([1.0, -1.0, 1.0])]
    weights = [1 / (5 * 2), 1 / (3 * 2)]
    observed = sum(w * x.sum() for w, x in zip(weights, d))
    nonzero = [x[x != 0] for x in d]
    flat = np.concatenate(nonzero)
    w = np.concatenate([[wt] * len(x) for wt, x in zip(weights, nonzero)])
    stats = [float(np.sum(w * flat * np.array(s))) for s in itertools.product([-1, 1], repeat=len(flat))]
    exact = np.mean(np.abs(stats) >= abs(observed) - 1e-12)
    assert D.sign_flip_pvalue(d, n_permutations=40000, seed=1) == pytest.approx(exact, abs=0.01)


def test_holm_matches_hand_computed_step_down():
    # sorted 0.004, 0.027, 0.03, 0.2 -> x4, x3, x2, x1 = 0.016, 0.081, 0.06 -> 0.081 (monotone), 0.2
    got = D.holm({"a": 0.027, "b": 0.2, "c": 0.004, "d": 0.03})
    assert got == {"a": 0.081, "b": 0.2, "c": 0.016, "d": 0.081}


def _family(n=32, benches=("BindingDB", "Human"), better_by=6, n_others=6, seed=0):
    """ES and seven competitors on the same examples: one competitor is right on ``better_by``
    more examples per benchmark than ES; the others answer as ES does, each flipped on a few
    examples to distinct answers (so no two coincide)."""
    rng = np.random.default_rng(seed)
    results = {"es": {}, "winner": {}}
    for i in range(n_others):
        results[f"o{i}"] = {}
    for b in benches:
        y = rng.integers(0, 2, n)
        es = y.copy()
        es[:12] = 1 - y[:12]  # ES wrong on 12 examples
        win = es.copy()
        win[:better_by] = y[:better_by]  # the winner fixes some of them
        results["es"][b], results["winner"][b] = _run(y, es), _run(y, win)
        for i in range(n_others):
            other = es.copy()
            other[20 + i] = 1 - other[20 + i]  # a distinct single flip
            results[f"o{i}"][b] = _run(y, other)
    return results


def test_not_supported_needs_the_family_wise_correction():
    results = _family(better_by=4)
    claim = C.Claim("es beats all", "-", "es", tuple(m for m in results if m != "es"), None, "-")
    benches = ["BindingDB", "Human"]
    groups, raw, adjusted = D.compare(results["es"], {m: results[m] for m in claim.b}, benches)
    assert raw["winner"] < 0.05 < adjusted["winner"]  # significant alone, not in a family of 7
    margins = {m: (-1.0, -2.0, -0.5) if m == "winner" else (0.0, -1.0, 1.0) for m in raw}
    assert D.superiority_verdict(margins, raw) == "not supported"  # what an uncorrected rule says
    assert D.superiority_verdict(margins, adjusted) == "inconclusive"


def test_a_clear_winner_survives_the_correction():
    results = _family(better_by=12, n=64)
    competitors = {m: results[m] for m in results if m != "es"}
    _, _, adjusted = D.compare(results["es"], competitors, ["BindingDB", "Human"])
    assert adjusted["winner"] < 0.05


def test_at_least_as_good_on_a_null_result_is_inconclusive_without_a_margin():
    y = np.array([0, 1] * 16)
    a = y.copy()
    a[:11] = 1 - a[:11]
    b = y.copy()
    b[11:22] = 1 - b[11:22]  # 11 wins, 11 losses
    results = {"es": {"CYP2C9-substrate": _run(y, a)}, "specialist-molecule": {"CYP2C9-substrate": _run(y, b)}}
    claim = C.Claim("es >= mol", "-", "es", ("specialist-molecule",), None, "-", at_least=True)
    row = C._check(claim, {m: {"CYP2C9-substrate": r["CYP2C9-substrate"]} for m, r in results.items()},
                   None, 300, 0, 0.95)
    assert row["ours"] == 0.0
    assert row["verdict"].startswith("inconclusive (no margin declared)")
    wide = C._check(claim, results, None, 300, 0, 0.95, noninferiority_margin=50.0)
    assert wide["verdict"].startswith("supported")


def test_identical_competitors_are_one_comparison_named_together():
    results = _family(better_by=2)
    results["twin"] = results["winner"]
    claim = C.Claim("es beats all", "-", "es", ("winner", "twin", "o0"), None, "-")
    row = C._check(claim, results, None, 200, 0, 0.95)
    assert row["n_compared"] == 2 and "winner = twin" in row["detail"]


def test_paired_auroc_difference_separates_a_ranker_from_noise():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    good = np.stack([np.zeros(80), y + 0.1 * rng.normal(size=80)], 1)  # margin ranks y perfectly
    noise = np.stack([np.zeros(80), rng.normal(size=80)], 1)
    a, b = _run(y, y, good.tolist()), _run(y, y, noise.tolist())
    point, lo, hi = D.paired_auroc_difference({"x": a}, {"x": b}, n_resamples=300)
    assert lo > 0 and point > 30
    same = D.paired_auroc_difference({"x": a}, {"x": a}, n_resamples=50)
    assert same == (0.0, 0.0, 0.0)
    assert np.isnan(D.paired_auroc_difference({"x": _run(y, y)}, {"x": b})[0])


def test_a_bad_margin_is_refused():
    with pytest.raises(ValueError, match="positive number of points"):
        D.noninferiority_verdict({"b": (0.0, -1.0, 1.0)}, {"b": 1.0}, -3.0)


def test_vectorised_auroc_draws_equal_stats_auroc_on_every_resample():
    from esmerge.evaluate.stats import auroc

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 15)
    margin = rng.integers(-2, 3, 15).astype(float)  # many ties
    idx = rng.integers(0, 15, size=(200, 15))
    idx[0] = 0  # one resample of a single example: one class only
    fast = D._auroc_draws(y, margin, idx)
    slow = np.array([auroc(y[i], margin[i]) for i in idx])
    np.testing.assert_allclose(fast, slow, equal_nan=True)
    assert np.isnan(fast[0])


def test_paired_auroc_draws_pair_the_resamples_and_skip_runs_without_scores():
    y = np.array([0, 1] * 10)
    good = _run(y, y, np.stack([np.zeros(20), y + 0.01 * np.arange(20)], 1).tolist())
    point, draws = D.paired_auroc_draws({"x": good, "z": good}, {"x": good, "z": {**good, "scores": None}}, 100)
    assert point == 0.0 and np.all(draws[~np.isnan(draws)] == 0.0)  # only x counts, and it pairs with itself
    assert D.bootstrap_pvalue(draws) == 1.0


def test_bootstrap_pvalue_is_the_level_at_which_the_percentile_ci_reaches_zero():
    draws = np.concatenate([np.full(95, 1.0), np.full(5, -1.0)])
    assert D.bootstrap_pvalue(draws) == pytest.approx(2 * 6 / 101)
    assert D.bootstrap_pvalue(-draws) == D.bootstrap_pvalue(draws)
    assert D.bootstrap_pvalue(np.full(999, 2.0)) == pytest.approx(0.002)
    assert np.isnan(D.bootstrap_pvalue([np.nan, np.nan]))


def test_answer_groups_by_scores_separate_models_with_the_same_answers():
    runs = {"a": {"b": {"pred": [1, 0], "scores": [[0, 1], [1, 0]]}},
            "b": {"b": {"pred": [1, 0], "scores": [[0, 2], [1, 0]]}},
            "c": {"b": {"pred": [1, 0], "scores": [[0, 1], [1, 0]]}}}
    assert D.answer_groups(runs, ["b"]) == [["a", "b", "c"]]
    assert D.answer_groups(runs, ["b"], field="scores") == [["a", "c"], ["b"]]


def test_caveats_apply_only_to_the_rows_whose_models_they_concern():
    every = DEFAULT_CAVEATS["accuracy"]
    assert caveats_for(every, ["es", "ties"]) == ("tiny base LLM; our random splits, not the paper's; "
                                                    "one seed, selected by the Fig. 2 test")
    assert caveats_for(every, ["es", "emr", "adamerging", "avg-ft/GDSC2", "emr-one"]).endswith(
        "oracle routing: emr; below the paper's budget: adamerging, avg-ft/GDSC2")
    assert caveats_for(every, ["base", "majority"]) == "tiny base LLM; our random splits, not the paper's"
    assert caveats_for([], ["es"]) == "none"
    assert seeds_text([0], ["base", "knn-shots"]) == "none (no specialist)"
    assert seeds_text([2, 0], ["es", "base"]) == "2, 0"
    assert set(CAVEAT_COLUMNS) == {"n", "seeds", "caveats", "would_change"}


def test_would_change_reads_the_numbers_of_each_kind_of_verdict():
    assert would_change("supported", "ties", 1.2, 5.0) == "a CI lower bound at or below 0 vs ties (now +1.2)"
    assert would_change("supported (partial)", "ties", 1.2, 5.0, at_least=True, margin=3.0) == \
        "a CI lower bound at or below -3 vs ties (now +1.2)"
    assert would_change("inconclusive", "mol", -4.0, 2.0, at_least=True, margin=3.0) == \
        "a CI lower bound above -3 vs mol would support it (now -4.0)"
    assert would_change("inconclusive (no margin declared)", "mol", 0.5, 2.0) == \
        "a non-inferiority margin of any size declared before the run (the CI vs mol starts at +0.5)"
    assert would_change("not supported", "avg", -0.3, -0.1, digits=3) == \
        "avg no longer significantly better: a CI upper bound at or above 0 (now -0.100)"
    assert would_change("inconclusive (identical answers)", "avg", 0.0, 0.0) == \
        "any example on which the two models answer differently (vs avg)"
    assert would_change("not measured", "", np.nan, np.nan) == "results for the missing models or benchmarks"
