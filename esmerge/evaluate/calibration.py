"""Decisions that read the prompt, and the control that shows whether they do.

A small base LLM scored by ``label_logits`` leans towards one label whatever its shots say: the
argmax of the two label log-likelihoods gives the majority answer on nearly every example. Two
ways to turn the answer margin ``m = s_1 - s_0`` (``s`` = ``label_logits``, ``[n, 2]``) into a
decision without ever looking at an evaluation label:

* ``"contextual"`` -- contextual calibration (Zhao et al. 2021, "Calibrate before use"):
  context-pool prompts are scored with their query replaced by the content-free input ``"N/A"``
  (same instruction, shots retrieved as usual); the decision is ``m - m_cf > 0``, i.e. the label
  probabilities divided by the mean content-free ones (``W = diag(p_cf)^-1``, no bias), argmax.
* ``"context-threshold"`` -- a threshold on ``m`` fitted on the **context pool only**
  (``calibration_pools``: some context rows scored with shots retrieved from the rest of the
  pool), chosen to maximise accuracy there (``fit_threshold``), then applied to the evaluation
  rows: ``m > t``.

A third rule puts the threshold's own noise inside the evaluation's bootstrap CI instead of holding
a 16-row fit fixed, and needs no calibration prompts at all:

* ``"cross-fit"`` -- the evaluation rows are dealt into ``k`` folds (``cross_fit_folds``: seeded,
  from the number of rows only); each fold's answers are ``m > t_f`` with ``t_f`` fitted
  (``fit_threshold``) on the margins and labels of the *other* folds (``cross_fit_thresholds``).
  No row's label ever reaches its own threshold; the folds are not stratified by label, because
  then a row's own label would decide which rows its threshold is fitted on.

``"argmax"`` (``m > 0``) is the paper's decision for a model that answers in the requested form.

The **shots-shuffled control** (``shuffled_shot_labels``): the same prompts -- same queries, same
retrieved shot entities in the same order -- but the labels shown with the shots are a seeded
permutation of all shot labels of the benchmark's evaluation prompts (every ``(query, shot)``
slot, pooled). The multiset of shown labels, hence the share of positive shots, is unchanged;
what is destroyed is the link between a query and the labels of its nearest neighbours. What a
decision fits (content-free bias, context-pool threshold) comes from the same context-pool prompts
as in the real run, so the control differs from it only in the evaluation prompts' shot labels
(under ``"cross-fit"`` each run's thresholds are cross-fitted on its own margins: the control's on
the control's). A model that uses its shots scores higher than its control on the same examples (a
paired test).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

DECISIONS = ("argmax", "contextual", "context-threshold", "cross-fit")
N_FOLDS = 5  # cross-fit folds unless told
CONTENT_FREE = "N/A"


def margin(scores) -> np.ndarray:
    """The answer margin ``s_1 - s_0`` of ``label_logits`` scores ``[n, 2]`` -> ``[n]``.

    >>> margin([[-2.0, -3.5], [-1.0, -0.5]]).tolist()
    [-1.5, 0.5]
    """
    scores = np.asarray(scores, dtype=float)
    return scores[:, 1] - scores[:, 0]


def content_free_bias(content_free_scores) -> float:
    """The content-free log-odds ``m_cf = log(p_cf / (1 - p_cf))``, ``p_cf`` the probability of
    label 1 normalised over the two labels and averaged over the content-free prompts ``[n_cf, 2]``
    (Zhao et al. 2021 average ``p_cf`` over several content-free inputs). 0 when there are none.

    >>> round(content_free_bias([[-1.0, -1.0], [-2.0, -1.0]]), 4)  # p_cf = mean(0.5, 0.7311)
    0.4706
    """
    m = margin(np.asarray(content_free_scores, dtype=float).reshape(-1, 2))
    if len(m) == 0:
        return 0.0
    p = float(np.mean(1.0 / (1.0 + np.exp(-m))))
    p = min(max(p, 1e-12), 1 - 1e-12)
    return float(np.log(p / (1 - p)))


def contextual_decision(scores, content_free_scores) -> np.ndarray:
    """Contextual calibration (Zhao et al. 2021, ``W = diag(p_cf)^-1``, ``b = 0``), ``[n]`` ints.

    ``scores`` ``[n, 2]``: label log-likelihoods of the prompts to decide; ``content_free_scores``
    ``[n_cf, 2]``: of content-free prompts (same instruction and kind of shots, query ``"N/A"``).
    With ``p`` normalised over the two labels, ``argmax_j p_j / p_cf,j`` is 1 exactly when
    ``m - m_cf > 0`` (``m = log p_1 - log p_0``; ``m_cf`` from ``content_free_bias``).

    The content-free prompts are *not* each query's own prompt with the query blanked: with
    retrieved shots that would cancel exactly the part of the margin the shot labels cause, the
    part the shuffled control tests. They are context-pool prompts (``calibration_pools``), so one
    bias per benchmark removes the model's lean towards a label and keeps each prompt's shots.

    >>> contextual_decision([[-1.0, -2.0], [-1.0, -0.5]], [[-1.0, -1.5], [-1.0, -0.5]]).tolist()
    [0, 1]
    """
    return (margin(scores) - content_free_bias(content_free_scores) > 0).astype(int)


def fit_threshold(margins: Sequence[float], y: Sequence[int]) -> float:
    """The threshold ``t`` maximising the accuracy of ``margin > t`` on fitting rows ``[n]``.

    Candidates are the midpoints between consecutive distinct margins and one value below and
    above them all (always-positive, always-negative). Among equally accurate thresholds the one
    nearest 0 (the argmax decision) wins, then the smaller. Only ``margins`` and ``y`` of the
    fitting rows are read.

    >>> fit_threshold([-3.0, -2.0, -1.0, 0.5], [0, 0, 1, 1])
    -1.5
    >>> fit_threshold([-3.0, -2.0], [1, 1])  # every row positive: below them all
    -4.0
    """
    m = np.asarray(margins, dtype=float)
    y = np.asarray(y, dtype=int)
    if len(m) == 0:
        return 0.0
    distinct = np.unique(m)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + 1.0]])
    acc = ((m[None, :] > candidates[:, None]) == (y[None, :] == 1)).mean(1)
    best = candidates[acc == acc.max()]
    return float(best[np.lexsort((best, np.abs(best)))[0]])


def threshold_decision(margins, threshold: float) -> np.ndarray:
    """``margin > threshold`` as ints ``[n]``.

    >>> threshold_decision([-2.0, -1.0, 0.5], -1.5).tolist()
    [0, 1, 1]
    """
    return (np.asarray(margins, dtype=float) > threshold).astype(int)


def cross_fit_folds(n: int, k: int = N_FOLDS, seed: int = 0) -> np.ndarray:
    """The fold of each of ``n`` rows, ``[n]`` ints in ``[0, min(k, n))``: a permutation drawn by
    ``numpy.random.default_rng(seed)`` dealt round-robin, so fold sizes differ by at most one. It
    reads ``n``, ``k`` and ``seed`` only -- no label, so no row's label moves it between folds.

    >>> cross_fit_folds(7, 3, seed=0).tolist()
    [2, 0, 0, 2, 1, 1, 0]
    >>> np.bincount(cross_fit_folds(7, 3, seed=0)).tolist(), cross_fit_folds(2, 5).tolist()  # k > n: one row a fold
    ([3, 2, 2], [0, 1])
    """
    if int(k) < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = max(1, min(int(k), int(n)))
    folds = np.empty(int(n), dtype=int)
    folds[np.random.default_rng(seed).permutation(int(n))] = np.arange(int(n)) % k
    return folds


def cross_fit_thresholds(margins: Sequence[float], y: Sequence[int], folds: Sequence[int]) -> np.ndarray:
    """Per-fold thresholds ``[k]`` (``k = max(folds) + 1``): fold ``f``'s is ``fit_threshold`` on
    the margins ``[n]`` and labels ``[n]`` of the rows *not* in fold ``f`` (0.0, the argmax, when
    there are none). Row ``i``'s threshold is ``thresholds[folds[i]]``; its own label never enters.

    >>> m, y = [-3.0, -2.0, -1.0, 0.5, -2.5, 1.0], [0, 0, 1, 1, 0, 1]
    >>> cross_fit_thresholds(m, y, [0, 1, 0, 1, 0, 1]).tolist()  # fold 0 from rows 1, 3, 5; fold 1 from 0, 2, 4
    [-0.75, -1.75]
    """
    m = np.asarray(margins, dtype=float)
    y = np.asarray(y, dtype=int)
    folds = np.asarray(folds, dtype=int)
    k = int(folds.max()) + 1 if len(folds) else 0
    return np.array([fit_threshold(m[folds != f], y[folds != f]) for f in range(k)], dtype=float)


def cross_fit_decision(margins: Sequence[float], y: Sequence[int], k: int = N_FOLDS, seed: int = 0
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cross-fitted threshold decision on evaluation rows: ``(pred [n], folds [n], thresholds [k'])``,
    ``k' = min(k, n)`` folds from ``cross_fit_folds(n, k, seed)``, ``pred[i] = margins[i] >
    thresholds[folds[i]]`` with each fold's threshold fitted on the other folds
    (``cross_fit_thresholds``).

    >>> pred, folds, t = cross_fit_decision([-3.0, -2.0, -1.0, 0.5, -2.5, 1.0], [0, 0, 1, 1, 0, 1], k=2, seed=0)
    >>> folds.tolist()  # fold 0: rows 0, 3, 5; fold 1: rows 1, 2, 4
    [0, 1, 1, 0, 1, 0]
    >>> t.tolist()  # t_0 between -2.0 (y=0) and -1.0 (y=1) of rows 1, 2, 4; t_1 between -3.0 and 0.5 of rows 0, 3, 5
    [-1.5, -1.25]
    >>> pred.tolist()  # -3 > -1.5, -2 > -1.25, -1 > -1.25, 0.5 > -1.5, -2.5 > -1.25, 1 > -1.5
    [0, 0, 1, 1, 0, 1]
    """
    m = np.asarray(margins, dtype=float)
    folds = cross_fit_folds(len(m), k, seed)
    thresholds = cross_fit_thresholds(m, y, folds)
    return threshold_decision(m, thresholds[folds]), folds, thresholds


def calibration_pools(context_df: pd.DataFrame, n_fit: int, seed: int = 0, keep: int = 1
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(fit_df, rest_df)``: ``n_fit`` rows of the context pool to fit a decision on, and the rest
    of the pool to retrieve their shots from (at least ``keep`` rows are left there, so a small pool
    fits on fewer rows). Drawn by ``numpy.random.default_rng(seed)``, the index preserved;
    evaluation rows never enter.

    >>> fit, rest = calibration_pools(pd.DataFrame({"y": [0, 1] * 5}), 3, seed=0)
    >>> len(fit), len(rest), sorted(set(fit.index) | set(rest.index)) == list(range(10))
    (3, 7, True)
    >>> [len(p) for p in calibration_pools(pd.DataFrame({"y": [0, 1] * 3}), 32, keep=2)]
    [4, 2]
    """
    n_fit = max(0, min(int(n_fit), len(context_df) - max(int(keep), 1)))
    order = np.random.default_rng(seed).permutation(len(context_df))
    return context_df.iloc[np.sort(order[:n_fit])], context_df.iloc[np.sort(order[n_fit:])]


def shuffled_shot_labels(shot_labels: Sequence[Sequence[int]], seed: int = 0) -> list[list[int]]:
    """The shots-shuffled control's labels: every ``(query, shot)`` label of a benchmark pooled
    and permuted with ``numpy.random.default_rng(seed)``, then dealt back to the same slots (each
    query keeps its number of shots). The multiset of labels is unchanged.

    >>> shuffled_shot_labels([[1, 1, 1], [0, 0, 0]], seed=0)
    [[0, 1, 0], [0, 1, 1]]
    """
    flat = np.asarray([int(v) for s in shot_labels for v in s], dtype=int)
    permuted = flat[np.random.default_rng(seed).permutation(len(flat))]
    out, at = [], 0
    for s in shot_labels:
        out.append(permuted[at: at + len(s)].tolist())
        at += len(s)
    return out


def relabelled(shots: pd.DataFrame, labels: Sequence[int]) -> pd.DataFrame:
    """``shots`` with its ``y`` column replaced by ``labels`` (entities and order kept)."""
    return shots.assign(y=np.asarray(labels, dtype=int))


def content_free(query: pd.Series) -> pd.Series:
    """``query`` with every entity replaced by the content-free input ``"N/A"`` (a cell: one
    "gene" ``N/A``); its label is dropped so nothing downstream can read it."""
    out = query.copy()
    for col in ("molecule", "molecule2", "protein"):
        if col in out.index and isinstance(out[col], str) and out[col]:
            out[col] = CONTENT_FREE
    if "cell_genes" in out.index and out["cell_genes"] is not None and not (
            isinstance(out["cell_genes"], float) and np.isnan(out["cell_genes"])):
        out["cell_genes"] = [CONTENT_FREE]
    out["y"] = np.nan
    return out
