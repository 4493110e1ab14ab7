"""Metrics and their uncertainty (App. A.5): accuracy, macro-F1, AUROC, bootstrap CIs.

Metrics take label and prediction arrays ``[n]`` (or batched ``[R, n]`` for the bootstrap) and
return percent. ``paired_bootstrap`` resamples examples jointly for two models evaluated on the
same examples, which is what makes the claims' margins tight.
"""
from __future__ import annotations

from statistics import NormalDist

import numpy as np


def _confusion(y: np.ndarray, pred: np.ndarray):
    """Per-class TP, FP, FN for classes 0 and 1 along the last axis; arrays ``[..., 2]``."""
    tp = np.stack([((pred == c) & (y == c)).sum(-1) for c in (0, 1)], -1)
    fp = np.stack([((pred == c) & (y != c)).sum(-1) for c in (0, 1)], -1)
    fn = np.stack([((pred != c) & (y == c)).sum(-1) for c in (0, 1)], -1)
    return tp, fp, fn


def accuracy(y, pred) -> float | np.ndarray:
    """Accuracy in percent; works on ``[n]`` or batched ``[R, n]`` arrays."""
    y, pred = np.asarray(y), np.asarray(pred)
    return 100.0 * (y == pred).mean(-1)


def macro_f1(y, pred) -> float | np.ndarray:
    """Macro-F1 over classes {0, 1} in percent (App. A.5); ``[n]`` or batched ``[R, n]``.

    .. math:: \\mathrm{F1}_c = \\frac{2\\,TP_c}{2\\,TP_c + FP_c + FN_c}, \\qquad
              \\text{macro-F1} = \\tfrac12(\\mathrm{F1}_0 + \\mathrm{F1}_1)

    A class absent from both labels and predictions scores 0 (scikit-learn's ``zero_division=0``).
    """
    y, pred = np.asarray(y), np.asarray(pred)
    tp, fp, fn = _confusion(y, pred)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return 100.0 * f1.mean(-1)


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def auroc(y, margin) -> float:
    """Area under the ROC curve (percent) of ``margin = score[:, 1] - score[:, 0]`` for class 1.

    Not a paper metric: a threshold-free check of whether a model *ranks* examples better than
    chance even when its argmax always picks one label (common for a 135M base). Ties count half
    (Mann-Whitney U). NaN when only one class is present.
    """
    y, margin = np.asarray(y), np.asarray(margin, dtype=float)
    pos, neg = margin[y == 1], margin[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(100.0 * greater / (len(pos) * len(neg)))


def bootstrap_ci(y, pred, metric: str = "accuracy", n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of a metric over examples; ``y``, ``pred`` ``[n]``."""
    y, pred = np.asarray(y), np.asarray(pred)
    if len(y) == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_resamples, len(y)))
    values = METRICS[metric](y[idx], pred[idx])
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def paired_bootstrap(runs_a: dict[str, dict], runs_b: dict[str, dict] | None, metric: str = "accuracy",
                     n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Point estimate and CI of ``mean_b metric(A) - mean_b metric(B)`` over benchmarks ``b``.

    ``runs_*[benchmark]`` are ``evaluate`` results on the same examples; examples are resampled
    jointly for A and B within each benchmark, so the CI reflects the paired design. With
    ``runs_b=None`` it is the CI of A's benchmark average itself (the paper's group "Avg.").
    """
    rng = np.random.default_rng(seed)
    fn = METRICS[metric]
    point, boot = [], []
    for bench, a in runs_a.items():
        ya, pa = np.asarray(a["y"]), np.asarray(a["pred"])
        idx = rng.integers(0, len(ya), size=(n_resamples, len(ya)))
        va, ba = fn(ya, pa), fn(ya[idx], pa[idx])
        if runs_b is not None:
            b = runs_b[bench]
            if list(a["example_ids"]) != list(b["example_ids"]):
                raise ValueError(f"{bench}: the two runs were evaluated on different examples; cannot pair them")
            yb, pb = np.asarray(b["y"]), np.asarray(b["pred"])
            va, ba = va - fn(yb, pb), ba - fn(yb[idx], pb[idx])
        point.append(va)
        boot.append(ba)
    alpha = (1 - level) / 2
    mean_boot = np.mean(boot, axis=0)
    return float(np.mean(point)), float(np.quantile(mean_boot, alpha)), float(np.quantile(mean_boot, 1 - alpha))



def discordance(run_a: dict, run_b: dict) -> float:
    """Share of examples on which exactly one of two runs on the same examples is right, in [0, 1].

    >>> discordance({"example_ids": [1, 2, 3, 4], "y": [1, 0, 1, 0], "pred": [1, 0, 0, 0]},
    ...             {"example_ids": [1, 2, 3, 4], "y": [1, 0, 1, 0], "pred": [1, 1, 1, 0]})
    0.5
    """
    if list(run_a["example_ids"]) != list(run_b["example_ids"]):
        raise ValueError("the two runs were evaluated on different examples; cannot pair them")
    y = np.asarray(run_a["y"])
    right_a, right_b = np.asarray(run_a["pred"]) == y, np.asarray(run_b["pred"]) == y
    return float(np.mean(right_a != right_b)) if len(y) else float("nan")


def minimal_detectable_difference(discordances, ns, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true paired accuracy difference (points) on the mean over benchmarks that a
    two-sided test at level ``alpha`` detects with probability ``power`` (normal approximation).

    For benchmark ``b`` with ``n_b`` examples and discordance rate ``q_b`` (share of examples on
    which exactly one model is right), the per-example difference ``d = c_A - c_B`` lies in
    {-1, 0, 1} with variance ``q_b`` under no difference, so the mean over ``B`` benchmarks has

    .. math:: \\mathrm{SE} = \\frac{1}{B}\\sqrt{\\sum_b q_b / n_b}, \\qquad
              \\mathrm{MDE} = 100\\,(z_{1-\\alpha/2} + z_{\\text{power}})\\,\\mathrm{SE}

    (McNemar's test in its normal form; ``z_{0.975} + z_{0.8} = 2.80``). ``discordances`` and
    ``ns`` are ``[B]``; a single benchmark is ``B = 1``.

    >>> round(minimal_detectable_difference([0.2], [64]), 1)  # 2.80 * sqrt(0.2 / 64)
    15.7
    >>> round(minimal_detectable_difference([0.2] * 13, [64] * 13), 1)  # the mean over 13
    4.3
    """
    q, n = np.asarray(discordances, dtype=float), np.asarray(ns, dtype=float)
    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return float(100.0 * z * np.sqrt(np.sum(q / n)) / len(q))


def paired_mde(runs_a: dict[str, dict], runs_b: dict[str, dict], alpha: float = 0.05, power: float = 0.8) -> float:
    """``minimal_detectable_difference`` of A vs B on the mean over ``runs_a``'s benchmarks, from
    the observed discordance rates (``runs_*[benchmark]``: ``evaluate`` results, same examples)."""
    benches = list(runs_a)
    return minimal_detectable_difference([discordance(runs_a[b], runs_b[b]) for b in benches],
                                         [len(runs_a[b]["y"]) for b in benches], alpha, power)


def format_ci(value, lo, hi, digits: int = 1, signed: bool = False) -> str:
    """An estimate and its CI as the tables write it, ``value [lo, hi]``, each to ``digits`` decimals
    (``+`` on positive numbers when ``signed``). No rule for a missing number: NaN prints as ``nan``
    (``esmerge.report.display.ci_text`` is the cell that leaves such a value empty).

    >>> format_ci(0.5, 0.4, 0.6, 3), format_ci(61.25, 58.0, 64.5)
    ('0.500 [0.400, 0.600]', '61.2 [58.0, 64.5]')
    >>> format_ci(-0.0226, -0.0301, 0.0152, 3, signed=True)
    '-0.023 [-0.030, +0.015]'
    """
    spec = f"{'+' if signed else ''}.{digits}f"
    return f"{value:{spec}} [{lo:{spec}}, {hi:{spec}}]"
