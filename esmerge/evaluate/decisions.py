"""Decision rules of the claims register: the tests a verdict rests on, each a pure function.

A claim "A beats B" (or "A is at least as good as B") is judged on the mean, over benchmarks, of
the per-benchmark paired accuracy difference. The rules a reviewer asks for live here:

* ``sign_flip_pvalue``: a paired permutation test of that mean (each example's difference
  ``c_A - c_B`` in {-1, 0, 1} keeps or flips its sign under the null of exchangeable answers);
* ``holm``: Holm's step-down family-wise correction over the compared competitors, so that one
  competitor out of seven beating A is "not supported" only when it survives the family;
* ``answer_groups``: competitors that answer identically on every example are one model, counted
  once in the family and named together;
* ``superiority_verdict`` and ``noninferiority_verdict``: the verdict words from the above. "At
  least as good" needs a non-inferiority margin declared before the run (the scale's
  ``noninferiority_margin``); without one a null result is *inconclusive*, never *supported*;
* ``paired_auroc_difference`` (and ``paired_auroc_draws``, ``bootstrap_pvalue``): a threshold-free
  check beside accuracy (the answer margin's AUROC, resampled jointly for both models).

What a verdict rests on (caveats, seeds, what would change it) is in ``esmerge.evaluate.caveats``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from esmerge.evaluate.stats import auroc

ALPHA = 0.05


def _paired_differences(runs_a: Mapping[str, dict], runs_b: Mapping[str, dict]) -> list[np.ndarray]:
    """Per benchmark, each example's ``correct_A - correct_B`` in {-1, 0, 1}; refuses unpaired runs."""
    out = []
    for bench, a in runs_a.items():
        b = runs_b[bench]
        if list(a["example_ids"]) != list(b["example_ids"]):
            raise ValueError(f"{bench}: the two runs were evaluated on different examples; cannot pair them")
        y = np.asarray(a["y"])
        out.append((np.asarray(a["pred"]) == y).astype(float) - (np.asarray(b["pred"]) == y).astype(float))
    return out


def sign_flip_pvalue(differences: Sequence[Sequence[float]], n_permutations: int = 10000, seed: int = 0) -> float:
    """Two-sided p-value of ``T = mean_b mean_i d_{b,i}`` under random sign flips of each ``d_{b,i}``.

    ``differences``: one array ``[n_b]`` per benchmark (paired per-example differences). Under the
    null that A's and B's answers are exchangeable on each example, every ``d`` is as likely to
    carry either sign; ``p = (1 + #{|T*| >= |T|}) / (1 + n_permutations)`` (never 0). Only nonzero
    differences move ``T*``, so zeros are dropped before sampling.

    >>> round(sign_flip_pvalue([[1.0] * 8]), 3)  # 8 of 8 examples favour A: exact p = 2 / 256
    0.008
    >>> sign_flip_pvalue([[1.0, -1.0, 0.0, 0.0]])  # a tie decides nothing
    1.0
    """
    rng = np.random.default_rng(seed)
    weights = [1.0 / (len(d) * len(differences)) for d in differences]
    observed = sum(w * float(np.sum(d)) for w, d in zip(weights, differences))
    null = np.zeros(n_permutations)
    for w, d in zip(weights, differences):
        nonzero = np.asarray(d, dtype=float)[np.asarray(d) != 0]
        if len(nonzero):
            signs = rng.integers(0, 2, size=(n_permutations, len(nonzero))) * 2 - 1
            null += w * (signs * nonzero).sum(1)
    # a small slack so that permutations equal to T in exact arithmetic count as extreme
    extreme = int(np.sum(np.abs(null) >= abs(observed) - 1e-12))
    return (1 + extreme) / (1 + n_permutations)


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values (family-wise error control over ``pvalues``' keys).

    The ``i``-th smallest of ``m`` p-values is multiplied by ``m - i`` (``i`` from 0), made
    non-decreasing along that order, and capped at 1.

    >>> holm({"a": 0.01, "b": 0.04, "c": 0.03})
    {'a': 0.03, 'b': 0.06, 'c': 0.06}
    """
    order = sorted(pvalues, key=lambda k: pvalues[k])
    m, running, out = len(order), 0.0, {}
    for i, key in enumerate(order):
        running = max(running, min(1.0, (m - i) * pvalues[key]))
        out[key] = round(running, 12)
    return {k: out[k] for k in pvalues}


def answer_groups(runs: Mapping[str, Mapping[str, dict]], benchmarks: Sequence[str],
                  field: str = "pred") -> list[list[str]]:
    """Models that give the same answer on every example of ``benchmarks``, grouped, first-seen order.

    ``runs[model][benchmark]``: ``evaluate`` results (``pred`` lists on the same examples).
    ``field="scores"`` groups by identical answer scores ``[n, 2]`` instead (models whose AUROCs
    cannot differ).

    >>> r = {"x": {"b": {"pred": [1, 0]}}, "y": {"b": {"pred": [1, 1]}}, "z": {"b": {"pred": [1, 0]}}}
    >>> answer_groups(r, ["b"])
    [['x', 'z'], ['y']]
    """
    groups: list[list[str]] = []
    keys: list[tuple] = []
    for model, by_bench in runs.items():
        key = tuple(repr(np.asarray(by_bench[b][field]).tolist()) for b in benchmarks)
        if key in keys:
            groups[keys.index(key)].append(model)
        else:
            keys.append(key)
            groups.append([model])
    return groups


def superiority_verdict(margins: Mapping[str, tuple[float, float, float]], adjusted_p: Mapping[str, float],
                        alpha: float = ALPHA) -> str:
    """Verdict on "A beats every competitor" from each competitor's ``(point, lo, hi)`` margin of
    A over it and its Holm-adjusted p-value.

    *supported*: every margin's CI lies above 0 (each comparison must hold, so no correction is
    needed: an intersection-union test). *not supported*: some competitor is significantly better
    than A after the family-wise correction (CI below 0 and adjusted p < ``alpha``), or A's point
    margin is <= 0 against a competitor whose CI excludes a positive margin and survives the
    correction. *inconclusive* otherwise.

    >>> superiority_verdict({"b": (3.0, 1.0, 5.0)}, {"b": 0.01})
    'supported'
    >>> superiority_verdict({"b": (-3.0, -5.0, -1.0), "c": (1.0, -1.0, 3.0)}, {"b": 0.19, "c": 0.5})
    'inconclusive'
    >>> superiority_verdict({"b": (-3.0, -5.0, -1.0), "c": (1.0, -1.0, 3.0)}, {"b": 0.01, "c": 0.5})
    'not supported'
    """
    if all(lo > 0 for _, lo, _ in margins.values()):
        return "supported"
    if any(hi < 0 and adjusted_p[b] < alpha for b, (_, _, hi) in margins.items()):
        return "not supported"
    return "inconclusive"


def noninferiority_verdict(margins: Mapping[str, tuple[float, float, float]], adjusted_p: Mapping[str, float],
                           margin: float | None, alpha: float = ALPHA) -> str:
    """Verdict on "A is at least as good as every competitor" with non-inferiority margin ``margin``
    (points, declared before the run; ``None``: none declared).

    *supported*: every CI's lower end lies above ``-margin``. *not supported*: some competitor is
    significantly better after the family-wise correction. *inconclusive (no margin declared)*
    when ``margin`` is ``None`` and nothing is significant: a null result is absence of evidence.

    >>> noninferiority_verdict({"b": (0.0, -7.3, 8.3)}, {"b": 1.0}, None)
    'inconclusive (no margin declared)'
    >>> noninferiority_verdict({"b": (0.0, -2.0, 2.0)}, {"b": 1.0}, 3.0)
    'supported'
    >>> noninferiority_verdict({"b": (0.0, -7.3, 8.3)}, {"b": 1.0}, 3.0)
    'inconclusive'
    """
    if any(hi < 0 and adjusted_p[b] < alpha for b, (_, _, hi) in margins.items()):
        return "not supported"
    if margin is None:
        return "inconclusive (no margin declared)"
    if not (np.isfinite(margin) and margin > 0):
        raise ValueError(f"a non-inferiority margin must be a positive number of points, got {margin!r}")
    return "supported" if all(lo > -margin for _, lo, _ in margins.values()) else "inconclusive"


def _auroc_draws(y: np.ndarray, margin: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``stats.auroc`` of every resample ``y[idx[r]], margin[idx[r]]`` at once: ``idx`` ``[R, n]`` -> ``[R]``.

    The margins do not change between resamples, only which examples are drawn, so per resample
    the drawn negatives are counted per distinct margin value; each drawn positive then adds the
    negatives below its value plus half of those equal to it (the Mann-Whitney count with ties
    at one half, as ``stats.auroc``). Time and memory ``O(R (n + distinct values))``.
    """
    n_resamples = idx.shape[0]
    values, where = np.unique(margin, return_inverse=True)
    drawn_y, drawn_value = y[idx], where.reshape(-1)[idx]
    negatives = np.zeros((n_resamples, len(values)))
    rows = np.broadcast_to(np.arange(n_resamples)[:, None], idx.shape)
    np.add.at(negatives, (rows, drawn_value), (drawn_y == 0).astype(float))
    below_or_half = np.cumsum(negatives, axis=1) - 0.5 * negatives  # < value, plus half of == value
    greater = (np.take_along_axis(below_or_half, drawn_value, axis=1) * (drawn_y == 1)).sum(1)
    pairs = (drawn_y == 1).sum(1) * negatives.sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pairs > 0, 100.0 * greater / pairs, np.nan)


def has_margins(runs: Mapping[str, dict]) -> bool:
    """Whether every run carries per-example answer scores, so that an AUROC of the answer margin exists.

    Parameters
    ----------
    runs : mapping of str to dict
        ``runs[benchmark]``: ``evaluate`` results; ``scores`` ``[n, 2]``, or ``None`` for a generated
        reply or a run that did not keep them.

    Returns
    -------
    bool
        False also for no runs at all.

    Examples
    --------
    >>> has_margins({"b": {"scores": [[0.0, 1.0]]}}), has_margins({"b": {"scores": None}}), has_margins({})
    (True, False, False)
    """
    return bool(runs) and all(r.get("scores") is not None for r in runs.values())


def paired_auroc_draws(runs_a: Mapping[str, dict], runs_b: Mapping[str, dict], n_resamples: int = 1000,
                       seed: int = 0) -> tuple[float, np.ndarray]:
    """Point estimate and bootstrap draws of ``mean_b AUROC(A) - mean_b AUROC(B)`` (points),
    examples resampled jointly for A and B within each benchmark.

    The AUROC is of the answer margin ``scores[:, 1] - scores[:, 0]`` (``stats.auroc``), so it needs
    no threshold. Benchmarks where a run has no scores, or a resample holds one class only, are left
    out of that mean (NaN-aware).

    Parameters
    ----------
    runs_a, runs_b : mapping of str to dict
        ``runs[benchmark]``: ``evaluate`` results on the same examples: ``example_ids``, ``y``
        ``[n_b]`` and ``scores`` ``[n_b, 2]`` (or ``None``).
    n_resamples : int
        R, the bootstrap draws.
    seed : int

    Returns
    -------
    point : float
        NaN when no benchmark has both runs' scores.
    draws : ndarray, shape (R,)
        All NaN when ``point`` is.

    Raises
    ------
    ValueError
        If the two runs of a benchmark were evaluated on different examples.

    Examples
    --------
    >>> y = [0, 0, 1, 1]
    >>> a = {"x": {"example_ids": [0, 1, 2, 3], "y": y, "scores": [[0, 0], [0, 1], [0, 2], [0, 3]]}}
    >>> b = {"x": {"example_ids": [0, 1, 2, 3], "y": y, "scores": [[0, 3], [0, 2], [0, 1], [0, 0]]}}
    >>> point, draws = paired_auroc_draws(a, b, n_resamples=200)
    >>> point, draws.shape, float(np.nanmin(draws)), float(np.nanmax(draws))  # A ranks perfectly, B backwards
    (100.0, (200,), 100.0, 100.0)
    """
    rng = np.random.default_rng(seed)
    point, boot = [], []
    for bench, a in runs_a.items():
        b = runs_b[bench]
        if list(a["example_ids"]) != list(b["example_ids"]):
            raise ValueError(f"{bench}: the two runs were evaluated on different examples; cannot pair them")
        if a.get("scores") is None or b.get("scores") is None:
            continue
        y = np.asarray(a["y"])
        ma = np.diff(np.asarray(a["scores"], dtype=float), axis=1)[:, 0]
        mb = np.diff(np.asarray(b["scores"], dtype=float), axis=1)[:, 0]
        point.append(auroc(y, ma) - auroc(y, mb))
        idx = rng.integers(0, len(y), size=(n_resamples, len(y)))
        boot.append(_auroc_draws(y, ma, idx) - _auroc_draws(y, mb, idx))
    if not point or np.all(np.isnan(point)):
        return float("nan"), np.full(n_resamples, np.nan)
    boot = np.asarray(boot)
    valid = (~np.isnan(boot)).sum(0)  # per resample, the benchmarks with both classes drawn
    draws = np.where(valid > 0, np.where(np.isnan(boot), 0.0, boot).sum(0) / np.maximum(valid, 1), np.nan)
    return float(np.nanmean(point)), draws


def paired_auroc_difference(runs_a: Mapping[str, dict], runs_b: Mapping[str, dict], n_resamples: int = 1000,
                            seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Point and percentile CI of ``mean_b AUROC(A) - mean_b AUROC(B)`` (points), examples resampled
    jointly for A and B within each benchmark (``paired_auroc_draws``); ``(nan, nan, nan)`` when no
    benchmark has both runs' scores.

    >>> y = [0, 0, 1, 1]
    >>> a = {"x": {"example_ids": [0, 1, 2, 3], "y": y, "scores": [[0, 0], [0, 1], [0, 2], [0, 3]]}}
    >>> paired_auroc_difference(a, a, n_resamples=50)  # the same margins: nothing to tell apart
    (0.0, 0.0, 0.0)
    >>> paired_auroc_difference(a, {"x": {**a["x"], "scores": None}})
    (nan, nan, nan)
    """
    point, draws = paired_auroc_draws(runs_a, runs_b, n_resamples, seed)
    if np.isnan(point) or np.isnan(draws).all():
        return (float("nan"),) * 3
    alpha = (1 - level) / 2
    return point, float(np.nanquantile(draws, alpha)), float(np.nanquantile(draws, 1 - alpha))


def bootstrap_pvalue(draws: Sequence[float]) -> float:
    """Two-sided bootstrap p-value of "the difference is 0" from bootstrap draws of it.

    ``p = min(1, 2 (1 + min(#{d <= 0}, #{d >= 0})) / (1 + R))``: about the smallest ``1 - level``
    whose percentile CI reaches 0, and never 0.

    Parameters
    ----------
    draws : sequence of float, shape (R,)
        NaN draws are dropped first.

    Returns
    -------
    float
        NaN when every draw is.

    Examples
    --------
    >>> bootstrap_pvalue([1.0] * 99), bootstrap_pvalue([-1.0, 1.0] * 50), bootstrap_pvalue([0.0] * 9)
    (0.02, 1.0, 1.0)
    """
    d = np.asarray(draws, dtype=float)
    d = d[~np.isnan(d)]
    if not len(d):
        return float("nan")
    tail = min(int(np.sum(d <= 0)), int(np.sum(d >= 0)))
    return float(min(1.0, 2 * (1 + tail) / (1 + len(d))))


def compare(runs_a: Mapping[str, dict], competitors: Mapping[str, Mapping[str, dict]], benchmarks: Sequence[str],
            n_permutations: int = 10000, seed: int = 0) -> tuple[list[list[str]], dict[str, float], dict[str, float]]:
    """The family of comparisons of A against ``competitors`` on ``benchmarks``.

    Competitors with identical answers form one group (the first name stands for it); each group
    gets a sign-flip p-value (``sign_flip_pvalue``) and the Holm correction runs over the groups.
    Returns ``(groups, p, adjusted_p)``, the dicts keyed by each group's first name.
    """
    groups = answer_groups(competitors, benchmarks)
    pvalues = {}
    for group in groups:
        lead = group[0]
        diffs = _paired_differences({b: runs_a[b] for b in benchmarks}, {b: competitors[lead][b] for b in benchmarks})
        pvalues[lead] = sign_flip_pvalue(diffs, n_permutations, seed)
    return groups, pvalues, holm(pvalues)
