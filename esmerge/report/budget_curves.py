"""Budget curves of the baselines that search: retention and accuracy at each budget they ran at.

Chapter 6 runs AdaMerging and Avg+FT at the scale's budget and at the others of its curve
(``MergeBudgets.adamerging_curve`` / ``ft_curve_examples``), naming those runs ``<method>@<budget>``;
the run at the scale's own budget keeps the method's plain name. These tables put every run of a
curve on one row each, so a reader sees whether a baseline had plateaued by the budget it ran at.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

CURVED = ("adamerging", "avg-ft")
UNITS = {"adamerging": "Adam steps", "avg-ft": "training rows per benchmark"}


def curve_name(method: str, budget: int) -> str:
    """A budget-curve run's name: ``method@budget`` (AdaMerging steps, Avg+FT training rows); ``curve_member``
    reads it back.

    >>> curve_name("adamerging", 30)
    'adamerging@30'
    """
    return f"{method}@{budget}"


def curve_member(name: str, budgets) -> tuple[str, str | None, int] | None:
    """``(method, benchmark or None, budget)`` of a model on a budget curve, else None.

    ``adamerging@3`` is AdaMerging at 3 steps; ``avg-ft@16/GDSC2`` Avg+FT on 16 rows of GDSC2; the
    plain names are the runs at the scale's own budget (``budgets``, a ``scales.MergeBudgets``).

    >>> from esmerge.scales import MergeBudgets
    >>> b = MergeBudgets(adamerging_steps=10, ft_examples=8)
    >>> [curve_member(n, b) for n in ("adamerging@3", "adamerging", "avg-ft/GDSC2", "avg-ft@16/GDSC2", "ties")]
    [('adamerging', None, 3), ('adamerging', None, 10), ('avg-ft', 'GDSC2', 8), ('avg-ft', 'GDSC2', 16), None]
    """
    head, _, benchmark = name.partition("/")
    method, _, budget = head.partition("@")
    if method not in CURVED:
        return None
    own = budgets.adamerging_steps if method == "adamerging" else budgets.ft_examples
    return method, benchmark or None, int(budget) if budget else own


def retention_curve(table: pd.DataFrame, budgets) -> pd.DataFrame:
    """Mean retained fraction [CI] of every run of a budget curve, from a ``retention_table``.

    Returns one row per run: ``method, benchmark, budget, unit, as_run`` (the scale's own budget),
    ``retained, lo, hi``, sorted by method, benchmark and budget.

    >>> from esmerge.scales import MergeBudgets
    >>> t = pd.DataFrame({"method": ["adamerging@3", "adamerging", "ties"], "modality": ["mean"] * 3,
    ...                   "retained": [0.2, 0.3, 0.5], "lo": [0.1, 0.2, 0.4], "hi": [0.3, 0.4, 0.6]})
    >>> retention_curve(t, MergeBudgets(adamerging_steps=10))[["budget", "as_run", "retained"]].values.tolist()
    [[3, False, 0.2], [10, True, 0.3]]
    """
    rows = []
    for _, r in table[table["modality"] == "mean"].iterrows():
        member = curve_member(r["method"], budgets)
        if member is None:
            continue
        method, benchmark, budget = member
        rows.append({"method": method, "benchmark": benchmark or "all", "budget": budget, "unit": UNITS[method],
                     "as_run": budget == curve_member(method, budgets)[2],
                     "retained": r["retained"], "lo": r["lo"], "hi": r["hi"]})
    return _sorted(rows)


def mean_accuracy(runs: Mapping[str, Mapping], n_resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean accuracy (%) over a model's benchmarks and its 95 % bootstrap CI, examples resampled
    within each benchmark. ``runs``: benchmark -> result with ``y`` and ``pred`` (``evaluate_all``).

    >>> runs = {"A": {"y": [1, 0, 1, 0], "pred": [1, 0, 1, 0]}, "B": {"y": [1, 1], "pred": [0, 0]}}
    >>> mean_accuracy(runs, n_resamples=200)
    (50.0, 50.0, 50.0)
    """
    rng = np.random.default_rng(seed)
    correct = [np.asarray(r["pred"]) == np.asarray(r["y"]) for r in runs.values()]
    point = float(np.mean([c.mean() for c in correct]) * 100)
    draws = np.mean([c[rng.integers(0, len(c), (n_resamples, len(c)))].mean(1) for c in correct], axis=0) * 100
    return point, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def accuracy_curve(results: Mapping[str, Mapping[str, Mapping]], budgets, n_resamples: int = 1000,
                   seed: int = 0) -> pd.DataFrame:
    """Mean accuracy [CI] of every run of a budget curve (``results``: model -> benchmark -> result).

    AdaMerging runs are averaged over every benchmark they were scored on; Avg+FT (one adapter per
    benchmark) over ``budgets.curve_benchmarks`` only, so that all its budgets cover the same ones.
    Columns as ``retention_curve``, with ``accuracy, lo, hi`` and ``benchmarks``.
    """
    rows = []
    for name, runs in results.items():
        member = curve_member(name, budgets)
        if member is None:
            continue
        method, _, budget = member
        if method == "avg-ft":
            runs = {b: r for b, r in runs.items() if b in budgets.curve_benchmarks}
        if not runs:
            continue
        acc, lo, hi = mean_accuracy(runs, n_resamples, seed)
        rows.append({"method": method, "benchmark": "all" if method == "adamerging" else "curve benchmarks",
                     "budget": budget, "unit": UNITS[method], "as_run": budget == curve_member(method, budgets)[2],
                     "benchmarks": len(runs), "accuracy": acc, "lo": lo, "hi": hi})
    return _sorted(rows)


def _sorted(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame.sort_values(["method", "benchmark", "budget"]).reset_index(drop=True) if len(frame) else frame


def budget_notes(budgets, paper) -> dict[str, str]:
    """Each budget-limited baseline's budget as run beside its paper's, for the registers' caveats
    (``caveats.caveats_for(..., budgeted=...)``).

    >>> from esmerge.scales import MergeBudgets
    >>> budget_notes(MergeBudgets(adamerging_steps=10, ft_examples=8, ft_epochs=1), MergeBudgets())
    {'adamerging': '10 steps, paper 500', 'avg-ft': '8 rows x 1 epoch per benchmark, paper 2,000 x 10'}
    """
    notes = {}
    if budgets.adamerging_steps < paper.adamerging_steps:
        notes["adamerging"] = f"{budgets.adamerging_steps} steps, paper {paper.adamerging_steps:,}"
    if (budgets.ft_examples, budgets.ft_epochs) < (paper.ft_examples, paper.ft_epochs):
        notes["avg-ft"] = (f"{budgets.ft_examples:,} rows x {budgets.ft_epochs} epoch{'s' * (budgets.ft_epochs > 1)} "
                           f"per benchmark, paper {paper.ft_examples:,} x {paper.ft_epochs}")
    return notes
