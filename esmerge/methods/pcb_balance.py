"""PCB's parameter competition balancing (Du et al. 2024, Eqs. 2-6) as pure tensor primitives.

Like ``primitives``, every function works on stacked task vectors ``tau`` of shape ``[T, P]``
(:func:`esmerge.methods.primitives.flatten`). They are kept apart because, unlike the small
elementwise steps of TIES and Consensus, PCB's balancing is a method of its own: a normalisation,
log-space softmaxes within and across tasks, a drop mask and a rescaled mean, which
:func:`esmerge.methods.static.pcb` composes.
"""
from __future__ import annotations

import torch


def minmax_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Min-max normalisation ``(x - min) / (max - min)`` along one dimension (PCB's Norm).

    Parameters
    ----------
    x : Tensor
        Any shape.
    dim : int
        The dimension to normalise along.

    Returns
    -------
    Tensor
        Same shape, in [0, 1]; a constant row maps to 0.

    Examples
    --------
    >>> minmax_normalize(torch.tensor([[1., 3., 5.], [2., 2., 2.]]))
    tensor([[0.0000, 0.5000, 1.0000],
            [0.0000, 0.0000, 0.0000]])
    """
    lo = x.amin(dim=dim, keepdim=True)
    span = x.amax(dim=dim, keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / span.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(x))


def pcb_log_balance(tau: torch.Tensor) -> torch.Tensor:
    r"""Log of PCB's parameter competition balancing matrix (Du et al. 2024, Eqs. 2-4).

    Intra-balancing (Eq. 2): :math:`\beta_{intra,i} = \mathrm{Softmax}(T \cdot \mathrm{Norm}(\tau_i \odot \tau_i))`.
    Inter-balancing (Eq. 3): :math:`\beta_{inter,i} = \sum_{j} \mathrm{Softmax}(\mathrm{Norm}(\tau_i \odot \tau_j))`.
    :math:`\beta_i = \beta_{intra,i} \odot \beta_{inter,i}` (Eq. 4).

    Softmax runs over the entries of one task vector and Norm is min-max normalisation
    within one task vector (as in the official code's ``normalize``). Computed in log space
    because a softmax over millions of entries gives values near 1/P whose products
    underflow less gracefully than their logs.

    Parameters
    ----------
    tau : Tensor, shape (T, P)

    Returns
    -------
    Tensor, shape (T, P)
        :math:`\log \beta`.

    Examples
    --------
    One task of two equal entries: Norm gives [0, 0], each softmax 1/2, so beta = 1/4. With
    entries [0, 1], Norm gives [0, 1] and each softmax (0.2689, 0.7311), so beta = their squares:

    >>> pcb_log_balance(torch.tensor([[1., 1.]])).exp()
    tensor([[0.2500, 0.2500]])
    >>> pcb_log_balance(torch.tensor([[0., 1.]])).exp()
    tensor([[0.0723, 0.5344]])
    """
    n_tasks = tau.shape[0]
    log_intra = torch.log_softmax(n_tasks * minmax_normalize(tau * tau, dim=1), dim=1)
    log_inter_terms = torch.stack(
        [torch.log_softmax(minmax_normalize(tau * tau[j], dim=1), dim=1) for j in range(n_tasks)]
    )
    return log_intra + torch.logsumexp(log_inter_terms, dim=0)


def keep_top_fraction(scores: torch.Tensor, drop: float) -> torch.Tensor:
    r"""Mask keeping, per row, entries whose score is at or above the ``drop`` quantile.

    PCB Eq. 5: :math:`m_i = \beta_i \ge \mathrm{sorted}(\beta_i)[r \cdot P]` with drop ratio ``r``.

    Parameters
    ----------
    scores : Tensor, shape (T, P)
        E.g. PCB's log balance (:func:`pcb_log_balance`).
    drop : float in [0, 1)
        Fraction dropped per row; ``drop=0`` keeps everything.

    Returns
    -------
    Tensor, shape (T, P), bool

    Examples
    --------
    Dropping half of four scores keeps those at or above the third smallest, 3:

    >>> keep_top_fraction(torch.tensor([[1., 4., 2., 3.]]), 0.5)
    tensor([[False,  True, False,  True]])
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop ratio must be in [0, 1), got {drop}")
    index = int(scores.shape[1] * drop)
    if index == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    threshold = scores.sort(dim=1).values[:, index : index + 1]
    return scores >= threshold


def balanced_mean(tau: torch.Tensor, log_weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    r"""PCB's rescaled merge (Eq. 6): :math:`\tau_m = \sum_i \hat\beta_i \odot \tau_i / \sum_i \hat\beta_i`.

    :math:`\hat\beta_i = m_i \odot \beta_i`; written as a softmax over tasks of the masked log
    weights so it never divides tiny numbers. Entries that every task dropped become 0.

    Parameters
    ----------
    tau : Tensor, shape (T, P)
    log_weights : Tensor, shape (T, P)
        :math:`\log \beta` (:func:`pcb_log_balance`).
    keep : Tensor, shape (T, P), bool
        :math:`m_i` (:func:`keep_top_fraction`).

    Returns
    -------
    Tensor, shape (P,)

    Examples
    --------
    Weights 3 and 1 on column 0: (3·1 + 1·3) / 4 = 1.5; equal weights on column 1: (2 + 4) / 2:

    >>> tau = torch.tensor([[1., 2.], [3., 4.]])
    >>> balanced_mean(tau, torch.tensor([[3., 1.], [1., 1.]]).log(), torch.ones(2, 2, dtype=torch.bool))
    tensor([1.5000, 3.0000])
    >>> balanced_mean(tau, torch.zeros(2, 2), torch.tensor([[True, False], [True, False]]))  # column 1 dropped
    tensor([2., 0.])
    """
    masked = torch.where(keep, log_weights, torch.full_like(log_weights, -torch.inf))
    any_kept = keep.any(dim=0)
    weights = torch.softmax(torch.where(any_kept, masked, torch.zeros_like(masked)), dim=0)
    return torch.where(any_kept, (weights * tau).sum(dim=0), torch.zeros_like(tau[0]))
