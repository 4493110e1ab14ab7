"""The pools drawn from a benchmark's rows: evaluation, in-context and protocol rows, one seeded draw.

``split_pools`` (seeded, stratified, disjoint evaluation and in-context pools) and ``protocol_pool`` /
``protocol_rows`` (the rows on which protocol settings may be chosen, disjoint from the evaluation
rows). They are kept apart from ``esmerge.data.benchmarks``, which describes the benchmarks and
loads their rows: this module only decides which of those rows each pool gets.

Three kinds of rows, one seeded draw (``numpy.random.default_rng(seed)``, one permutation per label):

* **evaluation rows** -- the head of each label's permutation (``split_pools``' ``eval_df``);
* **context rows** -- the next rows (``split_pools``' ``context_df``): shown as shots, and the rows a
  fitted decision is fitted on (``evaluate.calibration.calibration_pools``), never evaluated;
* **protocol rows** -- the *tail* of each label's permutation (``protocol_pool``): the queries on
  which a protocol setting (decision rule, number of shots, threshold rows) may be chosen, e.g. by
  ``benchmarks/bench_shots.py``. Being the tail, they are the same rows whatever the evaluation
  sizes, and no evaluation row of any size that leaves them free is one of them. Where the
  benchmark has too few rows for all three (``n_eval + n_context + n_protocol`` beyond a label's
  rows), they are taken from the context pool instead (``attrs["protocol_source"] == "context"``),
  still never from the evaluation rows.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esmerge.data.benchmarks import load_benchmark
from esmerge.scales import ScaleConfig


def _stratified_counts(available: pd.Series, n: int, proportions: pd.Series) -> pd.Series:
    """Largest-remainder allocation of ``n`` rows over labels in ``proportions``, capped by what is
    ``available`` per label (any shortfall goes to the labels that still have rows).

    >>> _stratified_counts(pd.Series([3, 7]), 3, pd.Series([0.3, 0.7])).tolist()  # 0.9, 2.1 -> 1, 2
    [1, 2]
    """
    quota = proportions * n
    take = np.floor(quota).astype(int).clip(upper=available)
    for label in (quota - np.floor(quota)).sort_values(ascending=False, kind="stable").index:
        if take.sum() >= n:
            break
        if take[label] < available[label]:
            take[label] += 1
    while take.sum() < n:  # a label ran out: fill from the label with the most rows left
        take[(available - take).idxmax()] += 1
    return take


def split_pools(df: pd.DataFrame, n_eval: int, n_context: int, seed: int = 0,
                label_column: str = "y") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Disjoint evaluation and in-context pools, each stratified by label.

    Each pool holds the benchmark's label proportions (largest-remainder rounding); rows are drawn
    with ``numpy.random.default_rng(seed)`` so a seed gives the same pools on every machine.
    Returns ``(eval_df, context_df)`` in shuffled order with ``df``'s index preserved.
    Raises ``ValueError`` if ``n_eval + n_context`` exceeds the rows available.
    """
    if n_eval < 0 or n_context < 0:
        raise ValueError(f"pool sizes must be non-negative, got n_eval={n_eval}, n_context={n_context}")
    if n_eval + n_context > len(df):
        raise ValueError(f"n_eval + n_context = {n_eval + n_context} exceeds the {len(df)} rows available")
    rng, counts, shuffled, eval_take, context_take = _draw(df, n_eval, n_context, seed, label_column)
    eval_pos = np.concatenate([shuffled[lab][:eval_take[lab]] for lab in counts.index]).astype(int)
    context_pos = np.concatenate([shuffled[lab][eval_take[lab]:eval_take[lab] + context_take[lab]]
                                  for lab in counts.index]).astype(int)
    return df.iloc[rng.permutation(eval_pos)], df.iloc[rng.permutation(context_pos)]


def _draw(df: pd.DataFrame, n_eval: int, n_context: int, seed: int, label_column: str):
    """The draw ``split_pools`` and ``protocol_pool`` share: ``(rng, counts, shuffled, eval_take,
    context_take)``, ``shuffled[label]`` the seeded permutation of that label's positions (``rng``
    has drawn exactly those permutations, in label order, and nothing else)."""
    rng = np.random.default_rng(seed)
    labels = df[label_column]
    counts = labels.value_counts().sort_index()
    proportions = counts / counts.sum()
    shuffled = {label: rng.permutation(np.flatnonzero((labels == label).to_numpy())) for label in counts.index}
    eval_take = _stratified_counts(counts, n_eval, proportions)
    context_take = _stratified_counts(counts - eval_take, n_context, proportions)
    return rng, counts, shuffled, eval_take, context_take


# Protocol rows per benchmark (benchmarks/bench_shots.py's default): at the cpu and paper sizes
# (32 or 64 evaluation rows, a 512-row context pool) every benchmark, the three CYP substrate sets
# (663-667 rows) included, has them beyond its evaluation and context rows.
PROTOCOL_ROWS = 32


def protocol_pool(df: pd.DataFrame, n_protocol: int, n_eval: int, n_context: int, seed: int = 0,
                  label_column: str = "y") -> pd.DataFrame:
    """The protocol rows of ``df``: ``n_protocol`` rows, stratified by label, on which a protocol
    setting (decision rule, shots, threshold rows) may be chosen; disjoint from the evaluation rows
    ``split_pools(df, n_eval, n_context, seed)[0]``.

    They are the tail of each label's seeded permutation (the head is the evaluation pool, then the
    context pool), so they do not depend on ``n_eval`` or ``n_context`` while those leave them free:
    ``attrs["protocol_source"] == "held-out"`` (neither evaluation nor context rows; a label short of
    rows beyond the pools gives its share to the other). Where fewer than ``n_protocol`` rows are
    left beyond the two pools they are the last rows of the context pool instead, ``"context"`` (a
    caller that fits something on context rows must then keep these apart; ``bench_shots.py``
    retrieves their shots from the rest of the pool). Shuffled order, ``df``'s index preserved;
    ``ValueError`` when even the context pool is too small.

    >>> df = pd.DataFrame({"y": [0, 1] * 10})
    >>> ev, ctx = split_pools(df, 4, 6, seed=0)
    >>> held = protocol_pool(df, 4, 4, 6, seed=0)
    >>> held.attrs["protocol_source"], sorted(held["y"]), set(held.index) & (set(ev.index) | set(ctx.index))
    ('held-out', [0, 0, 1, 1], set())
    >>> sorted(protocol_pool(df, 4, 2, 2, seed=0).index) == sorted(held.index)  # any sizes that leave them free
    True
    >>> tight = protocol_pool(df, 4, 6, 12, seed=0)  # 6 + 12 + 4 > 20 rows: from the context pool
    >>> tight.attrs["protocol_source"], set(tight.index) <= set(split_pools(df, 6, 12, seed=0)[1].index)
    ('context', True)
    """
    if n_protocol < 0:
        raise ValueError(f"n_protocol must be non-negative, got {n_protocol}")
    if n_eval + n_context > len(df):
        raise ValueError(f"n_eval + n_context = {n_eval + n_context} exceeds the {len(df)} rows available")
    rng, counts, shuffled, eval_take, context_take = _draw(df, n_eval, n_context, seed, label_column)
    left = counts - eval_take - context_take
    if n_protocol <= left.sum():
        take = _stratified_counts(left, n_protocol, counts / counts.sum())  # a label short of rows: the other's
        source = "held-out"
        pos = [shuffled[lab][counts[lab] - take[lab]:] for lab in counts.index]
    else:
        if n_protocol > context_take.sum():
            raise ValueError(f"n_protocol = {n_protocol} exceeds both the {len(df) - n_eval - n_context} rows left "
                             f"beyond the evaluation and context pools and the {n_context} context rows")
        take = _stratified_counts(context_take, n_protocol, counts / counts.sum())
        source = "context"
        end = eval_take + context_take
        pos = [shuffled[lab][end[lab] - take[lab]: end[lab]] for lab in counts.index]
    out = df.iloc[rng.permutation(np.concatenate(pos).astype(int))]
    out.attrs = {**df.attrs, "protocol_source": source}
    return out


def protocol_rows(name: str, config: ScaleConfig, n_protocol: int = PROTOCOL_ROWS, seed: int = 0,
                  n_eval: int | None = None, n_context: int | None = None) -> pd.DataFrame:
    """The protocol rows of benchmark ``name`` (``protocol_pool`` of ``load_benchmark(name)``),
    disjoint from the evaluation rows of the scale ``config`` (its ``n_eval`` and ``n_context`` unless given)
    at ``seed``; ``attrs["protocol_source"]`` says whether they are held-out rows or context rows.

    The only place a protocol setting may take its rows from (``benchmarks/bench_shots.py``).
    """
    defaults = config.evaluation
    n_eval = defaults.n_eval if n_eval is None else n_eval
    n_context = defaults.n_context if n_context is None else n_context
    return protocol_pool(load_benchmark(name), n_protocol, n_eval, n_context, seed)
