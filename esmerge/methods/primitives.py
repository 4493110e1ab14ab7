"""Small pure tensor primitives that the parameter-space baselines are composed of.

Every function here works on *stacked task vectors* ``tau`` of shape ``[T, P]``: row ``t``
is the flattened LoRA state of specialist ``t`` (all A and B matrices concatenated in a
fixed key order, see :func:`flatten`). The base of a LoRA task vector is the zero LoRA, so
the task vector *is* the adapter (paper Sec. 3, Eq. 1 merges A's and B's element-wise).
No function here knows about models, files or keys beyond :func:`flatten` / :func:`unflatten`.
PCB's balancing, built on the same ``tau``, is in :mod:`esmerge.methods.pcb_balance`.
"""
from __future__ import annotations

import torch

from esmerge.specialists.adapters import Adapter, LoraState


# --------------------------------------------------------------------------- flat views
def flatten(adapters: list[Adapter]) -> tuple[torch.Tensor, list[str], list[torch.Size]]:
    """Stack adapters into LoRA task vectors, one flat row per adapter.

    The base of a LoRA task vector is the zero LoRA, so the row is the adapter itself.

    Parameters
    ----------
    adapters : list of Adapter
        T adapters with the same keys and shapes.

    Returns
    -------
    tau : Tensor, shape (T, P)
        ``tau[t]`` is adapter ``t``'s tensors, flattened in sorted key order, float32.
    keys : list[str]
        The key order used.
    shapes : list[torch.Size]
        Shape of each key's tensor, to undo the flattening.

    Examples
    --------
    Key "a" comes first in sorted order:

    >>> from esmerge.specialists.adapters import Adapter
    >>> adapters = [Adapter({"b": torch.tensor([1., 2.]), "a": torch.tensor([[3.]])}, {}),
    ...             Adapter({"b": torch.tensor([4., 5.]), "a": torch.tensor([[6.]])}, {})]
    >>> flatten(adapters)
    (tensor([[3., 1., 2.],
            [6., 4., 5.]]), ['a', 'b'], [torch.Size([1, 1]), torch.Size([2])])
    """
    keys = sorted(adapters[0].state)
    shapes = [adapters[0].state[k].shape for k in keys]
    rows = [torch.cat([a.state[k].detach().float().reshape(-1) for k in keys]) for a in adapters]
    return torch.stack(rows), keys, shapes


def unflatten(vector: torch.Tensor, keys: list[str], shapes: list[torch.Size]) -> LoraState:
    """Undo :func:`flatten` for one row: a flat vector back to a LoRA state dict.

    Parameters
    ----------
    vector : Tensor, shape (P,)
        One flat task vector.
    keys : list[str]
        Key order, as :func:`flatten` returns it.
    shapes : list[torch.Size]
        Shape of each key's tensor.

    Returns
    -------
    dict of str to Tensor
        Key -> tensor of its shape (copies).

    Raises
    ------
    ValueError
        If the sizes do not add up to P.

    Examples
    --------
    >>> unflatten(torch.tensor([3., 1., 2.]), ["a", "b"], [torch.Size([1, 1]), torch.Size([2])])
    {'a': tensor([[3.]]), 'b': tensor([1., 2.])}
    """
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if vector.numel() != sum(sizes):
        raise ValueError(f"vector has {vector.numel()} elements, keys need {sum(sizes)}")
    parts = torch.split(vector, sizes)
    return {k: p.reshape(s).clone() for k, p, s in zip(keys, parts, shapes)}


def per_segment(tau: torch.Tensor, shapes: list[torch.Size], fn) -> torch.Tensor:
    """Apply a function to the columns of each LoRA tensor separately, then concatenate the results.

    Used to take a method's thresholds and normalisations per LoRA tensor instead of over the
    whole flattened adapter.

    Parameters
    ----------
    tau : Tensor, shape (T, P)
        Stacked task vectors.
    shapes : list[torch.Size]
        Shape of each key's tensor, in the flat order (their sizes P_k add up to P).
    fn : callable
        ``fn(part) -> Tensor``: ``[T, P_k] -> [P_k]``.

    Returns
    -------
    Tensor, shape (P,)

    Examples
    --------
    Normalise each segment to sum 1: [4] / 4 and [2, 4] / 6:

    >>> tau = torch.tensor([[1., 2., 4.], [3., 0., 0.]])
    >>> per_segment(tau, [torch.Size([1]), torch.Size([2])], lambda part: part.sum(0) / part.sum())
    tensor([1.0000, 0.3333, 0.6667])
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

    Returns
    -------
    Tensor, shape (T, P)

    Ties at the threshold are all kept, so slightly more than ``keep`` may survive.

    Examples
    --------
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

    Examples
    --------
    >>> elect_sign(torch.tensor([[1.0, -2.0], [-3.0, 1.0]]))
    tensor([-1., -1.])
    >>> elect_sign(torch.tensor([[1.0], [-1.0]]))  # a zero sum elects +1
    tensor([1.])
    """
    total = tau.sum(dim=0)
    return torch.where(total >= 0, torch.ones_like(total), -torch.ones_like(total))


def agreement_mask(tau: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Which entries are non-zero and have the elected sign (TIES' set of agreeing tasks).

    Parameters
    ----------
    tau : Tensor, shape (T, P)
    sign : Tensor, shape (P,)
        Elected sign, entries in {-1, +1} (:func:`elect_sign`).

    Returns
    -------
    Tensor, shape (T, P), bool

    Examples
    --------
    >>> agreement_mask(torch.tensor([[1.0, -2.0], [-3.0, 1.0]]), torch.tensor([-1.0, -1.0]))
    tensor([[False,  True],
            [ True, False]])
    """
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

    Examples
    --------
    Column 0: tasks 0 and 1 agree with +1, (1 + 3) / 2 = 2; column 1: only task 1 agrees with -1:

    >>> disjoint_mean(torch.tensor([[1.0, 0.0], [3.0, -2.0], [-5.0, 0.0]]), torch.tensor([1.0, -1.0]))
    tensor([ 2., -2.])
    """
    agree = agreement_mask(tau, sign)
    count = agree.sum(dim=0).clamp(min=1)
    return (tau * agree).sum(dim=0) / count


# --------------------------------------------------------------------------- TALL / Consensus
def tall_masks(tau: torch.Tensor, lambdas: float | torch.Tensor,
               multi_task: torch.Tensor | None = None) -> torch.Tensor:
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

    Examples
    --------
    tau_MTL = [2, 2.1]. Task 0, entry 1: |0.1| < 0.5 * |2.1 - 0.1| = 1, so it is dropped:

    >>> tall_masks(torch.tensor([[1.0, 0.1], [1.0, 2.0]]), 0.5).int()
    tensor([[1, 0],
            [1, 1]], dtype=torch.int32)
    """
    mtl = tau.sum(dim=0) if multi_task is None else multi_task
    lam = torch.as_tensor(lambdas, dtype=tau.dtype).reshape(-1, 1)
    return tau.abs() >= lam * (mtl - tau).abs()


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    r"""Entries active in at least ``k`` task masks: :math:`m_{cons} = 1\{\sum_t m_t \ge k\}` (Consensus, Eq. 5).

    ``k=2`` removes "selfish" weights (one task only) and "catastrophic" ones (no task).

    Parameters
    ----------
    masks : Tensor, shape (T, P), bool
        TALL masks (:func:`tall_masks`).
    k : int
        Minimum number of tasks.

    Returns
    -------
    Tensor, shape (P,), bool

    Examples
    --------
    >>> consensus_mask(torch.tensor([[True, False, True], [True, True, False]]), 2)
    tensor([ True, False, False])
    """
    return masks.sum(dim=0) >= k
