"""Small pure tensor primitives that the parameter-space baselines are composed of.

Every function here works on *stacked task vectors* ``tau`` of shape ``[T, P]``: row ``t``
is the flattened LoRA state of specialist ``t`` (all A and B matrices concatenated in a
fixed key order, see :func:`flatten`). The base of a LoRA task vector is the zero LoRA, so
the task vector *is* the adapter (paper Sec. 3, Eq. 1 merges A's and B's element-wise).
No function here knows about models, files or keys beyond :func:`flatten` / :func:`unflatten`.
"""
from __future__ import annotations

import torch

from esmerge.adapters import Adapter, LoraState


# --------------------------------------------------------------------------- flat views
def flatten(adapters: list[Adapter]) -> tuple[torch.Tensor, list[str], list[torch.Size]]:
    """Stack adapters into task vectors.

    Returns
    -------
    tau : Tensor, shape (T, P)
        ``tau[t]`` is adapter ``t``'s tensors, flattened in sorted key order, float32.
    keys : list[str]
        The key order used.
    shapes : list[torch.Size]
        Shape of each key's tensor, to undo the flattening.
    """
    keys = sorted(adapters[0].state)
    shapes = [adapters[0].state[k].shape for k in keys]
    rows = [torch.cat([a.state[k].detach().float().reshape(-1) for k in keys]) for a in adapters]
    return torch.stack(rows), keys, shapes


def unflatten(vector: torch.Tensor, keys: list[str], shapes: list[torch.Size]) -> LoraState:
    """Inverse of one row of :func:`flatten`: ``vector`` of shape ``(P,)`` -> ``{key: tensor}``."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if vector.numel() != sum(sizes):
        raise ValueError(f"vector has {vector.numel()} elements, keys need {sum(sizes)}")
    parts = torch.split(vector, sizes)
    return {k: p.reshape(s).clone() for k, p, s in zip(keys, parts, shapes)}


def per_segment(tau: torch.Tensor, shapes: list[torch.Size], fn) -> torch.Tensor:
    """Apply ``fn: [T, P_k] -> [P_k]`` to each tensor's columns of ``tau`` ``[T, P]`` separately; concatenate.

    Used to take a method's thresholds and normalisations per LoRA tensor instead of over the
    whole flattened adapter.
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return torch.cat([fn(part) for part in torch.split(tau, sizes, dim=1)])


# --------------------------------------------------------------------------- TIES
def magnitude_trim(tau: torch.Tensor, keep: float) -> torch.Tensor:
    r"""Keep the ``keep`` fraction of largest-magnitude entries of each row, zero the rest.

    TIES step 1 ("trim", Yadav et al. 2023, Sec. 4):
    :math:`\hat\tau_t = \tau_t \odot 1[|\tau_t| \ge \mathrm{kth}(|\tau_t|)]`.

    Parameters
    ----------
    tau : Tensor, shape (T, P)
    keep : float in (0, 1]
        Fraction of entries kept per row (TIES' ``k``, 0.2 = top-20%).

    Ties at the threshold are all kept, so slightly more than ``keep`` may survive.

    >>> magnitude_trim(torch.tensor([[0.1, -3.0, 2.0, 0.5]]), keep=0.5)
    tensor([[ 0., -3.,  2.,  0.]])
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n_drop = int(tau.shape[1] * (1.0 - keep))
    if n_drop == 0:
        return tau.clone()
    threshold = tau.abs().kthvalue(n_drop, dim=1, keepdim=True).values
    return tau * (tau.abs() > threshold)


def elect_sign(tau: torch.Tensor) -> torch.Tensor:
    r"""Sign with the larger total mass per entry: :math:`\gamma = \mathrm{sgn}(\sum_t \tau_t)`.

    TIES step 2 ("elect", Yadav et al. 2023, Eq. in Sec. 4). Entries whose sum is exactly 0
    get +1 (any choice is fine there: with a zero sum no non-zero entry can be averaged
    without a conflict, and :func:`disjoint_mean` of all-zero columns is 0).

    Parameters
    ----------
    tau : Tensor, shape (T, P)

    Returns
    -------
    Tensor, shape (P,), entries in {-1, +1}

    >>> elect_sign(torch.tensor([[1.0, -2.0], [-3.0, 1.0]]))
    tensor([-1., -1.])
    """
    total = tau.sum(dim=0)
    return torch.where(total >= 0, torch.ones_like(total), -torch.ones_like(total))


def agreement_mask(tau: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """``[T, P]`` bool: entry is non-zero and has the elected ``sign`` (shape ``(P,)``)."""
    return (tau * sign) > 0


def disjoint_mean(tau: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    r"""Mean over the tasks that agree with the elected sign (TIES step 3, "disjoint merge").

    :math:`\tau_m^p = \frac{1}{|A^p|}\sum_{t \in A^p} \hat\tau_t^p`,
    :math:`A^p = \{t : \hat\tau_t^p \gamma^p > 0\}`; 0 where :math:`A^p` is empty.

    Parameters
    ----------
    tau : Tensor, shape (T, P)
    sign : Tensor, shape (P,)

    Returns
    -------
    Tensor, shape (P,)

    >>> disjoint_mean(torch.tensor([[1.0, 0.0], [3.0, -2.0], [-5.0, 0.0]]), torch.tensor([1.0, -1.0]))
    tensor([ 2., -2.])
    """
    agree = agreement_mask(tau, sign)
    count = agree.sum(dim=0).clamp(min=1)
    return (tau * agree).sum(dim=0) / count


# --------------------------------------------------------------------------- EMR
def emr_unified(tau: torch.Tensor) -> torch.Tensor:
    r"""EMR's unified task vector (Huang et al. 2024, Eqs. 2-4).

    :math:`\gamma = \mathrm{sgn}(\sum_t \tau_t)`,
    :math:`\epsilon^p = \max_{t: \mathrm{sgn}(\tau_t^p) = \gamma^p} |\tau_t^p|`,
    :math:`\tau_{uni} = \gamma \odot \epsilon`.

    Parameters
    ----------
    tau : Tensor, shape (T, P)

    Returns
    -------
    Tensor, shape (P,)

    >>> emr_unified(torch.tensor([[1.0, -2.0], [-3.0, 1.0], [0.5, -4.0]]))
    tensor([-3., -4.])
    """
    sign = elect_sign(tau)
    magnitude = (tau.abs() * agreement_mask(tau, sign)).amax(dim=0)
    return sign * magnitude


def emr_masks(tau: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
    r"""Task-specific masks :math:`M_t = 1[\tau_t \odot \tau_{uni} > 0]` (EMR Eq. 5), ``[T, P]`` bool."""
    return (tau * unified) > 0


def emr_rescalers(tau: torch.Tensor, unified: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    r"""Task-specific rescalers :math:`\lambda_t = \frac{\sum|\tau_t|}{\sum|M_t \odot \tau_{uni}|}` (EMR Eq. 6).

    One scalar per task over the whole flattened adapter, as in EMR's definition.
    Returns Tensor of shape ``(T,)``; a task whose mask is empty gets 0.
    """
    kept = (masks * unified.abs()).sum(dim=1)
    return torch.where(kept > 0, tau.abs().sum(dim=1) / kept.clamp(min=torch.finfo(tau.dtype).tiny), 0.0)


# --------------------------------------------------------------------------- TALL / Consensus
def tall_masks(tau: torch.Tensor, lambdas: float | torch.Tensor, multi_task: torch.Tensor | None = None) -> torch.Tensor:
    r"""TALL masks (Wang et al. 2024, "Localizing task information...", Eq. 4).

    :math:`m_t = 1\{|\tau_t| \ge \lambda_t \, |\tau_{MTL} - \tau_t|\}` with
    :math:`\tau_{MTL} = \sum_t \tau_t` (task arithmetic) unless ``multi_task`` is given.

    The TALL paper writes the mask with weights, :math:`|\theta_0 - \theta_t| \ge
    \lambda_t|\theta_{MTL} - \theta_t|`; with :math:`\theta_t = \theta_0 + \tau_t` and
    :math:`\theta_{MTL} = \theta_0 + \tau_{MTL}` that is exactly the form above. (A public
    toolkit's docstring reads ":math:`|\theta_0 - \tau_t|`", mixing weights and task
    vectors; we implement the paper's form.)

    Parameters
    ----------
    tau : Tensor, shape (T, P)
    lambdas : float or Tensor of shape (T,)
    multi_task : Tensor, shape (P,), optional

    Returns
    -------
    Tensor, shape (T, P), bool

    >>> tall_masks(torch.tensor([[1.0, 0.1], [1.0, 2.0]]), 0.5).int()
    tensor([[1, 0],
            [1, 1]], dtype=torch.int32)
    """
    mtl = tau.sum(dim=0) if multi_task is None else multi_task
    lam = torch.as_tensor(lambdas, dtype=tau.dtype).reshape(-1, 1)
    return tau.abs() >= lam * (mtl - tau).abs()


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    r"""Entries active in at least ``k`` task masks: :math:`m_{cons} = 1\{\sum_t m_t \ge k\}` (Consensus, Eq. 5).

    ``masks``: ``[T, P]`` bool -> ``[P]`` bool. ``k=2`` removes "selfish" weights (one task
    only) and "catastrophic" ones (no task).
    """
    return masks.sum(dim=0) >= k


# --------------------------------------------------------------------------- PCB
def minmax_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``(x - min) / (max - min)`` along ``dim``; a constant row maps to 0."""
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
    Tensor, shape (T, P): :math:`\log \beta`.
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
    ``scores``: ``[T, P]`` -> ``[T, P]`` bool. ``drop=0`` keeps everything.
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

    tau, log_weights, keep : Tensor, shape (T, P) -> Tensor, shape (P,)
    """
    masked = torch.where(keep, log_weights, torch.full_like(log_weights, -torch.inf))
    any_kept = keep.any(dim=0)
    weights = torch.softmax(torch.where(any_kept, masked, torch.zeros_like(masked)), dim=0)
    return torch.where(any_kept, (weights * tau).sum(dim=0), torch.zeros_like(tau[0]))
