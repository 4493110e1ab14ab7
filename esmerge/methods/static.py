"""Training-free parameter-space baselines (paper App. A.2): Average, TIES, EMR, PCB, Consensus.

Each is a composition of the primitives in :mod:`esmerge.methods.primitives` (PCB's in
:mod:`esmerge.methods.pcb_balance`) over the stacked LoRA task vectors ``tau`` (``[T, P]``,
base = zero LoRA), applied element-wise to the A and B matrices as the paper's Eq. 1 does.
Where an original method ranks or normalises over a whole model's task vector (TIES' top-k,
PCB's softmaxes and drop), ``scope`` chooses between one LoRA tensor (default: A and B entries
live on different scales) and the whole flattened adapter (the original's literal reading).
EMR's rescalers are per whole adapter.
"""
from __future__ import annotations

import time

import torch

from esmerge.methods import HParam, MergeResult, register
from esmerge.methods import primitives as P
from esmerge.methods.pcb_balance import balanced_mean, keep_top_fraction, pcb_log_balance
from esmerge.specialists.adapters import Adapter, with_state
from esmerge.specialists.encoders import MODALITIES


def merged_result(adapters: list[Adapter], vector: torch.Tensor, keys, shapes, name: str, info: dict, start: float,
            extras: dict | None = None) -> MergeResult:
    info = dict(info)
    info["cost"] = {"wall_seconds": time.perf_counter() - start, "flops": None}
    return MergeResult(with_state(adapters[0], P.unflatten(vector, keys, shapes), name, extras), info)


SCOPES = ("tensor", "model")


def _scoped(tau: torch.Tensor, shapes, scope: str, fn) -> torch.Tensor:
    """``fn`` over the whole flattened adapter (``scope="model"``) or per LoRA tensor (``"tensor"``)."""
    if scope == "model":
        return fn(tau)
    if scope == "tensor":
        return P.per_segment(tau, shapes, fn)
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def task_name(name: str, index: int) -> str:
    """The task (modality) of an adapter, from its name.

    Parameters
    ----------
    name : str
        The adapter's name.
    index : int
        Its position, for an unnamed adapter.

    Returns
    -------
    str
        Its modality if the name is one or starts with one and ``-`` or ``_`` (``"molecule"``,
        ``"molecule-specialist"``), else the name itself, else ``task{index}``.

    Examples
    --------
    >>> task_name("molecule-specialist", 0), task_name("cell_v2", 1), task_name("mine", 1), task_name("", 2)
    ('molecule', 'cell', 'mine', 'task2')
    """
    for modality in MODALITIES:
        if name == modality or name.startswith(modality + "-") or name.startswith(modality + "_"):
            return modality
    return name or f"task{index}"


def task_names(adapters: list[Adapter]) -> list[str]:
    """The task names of several adapters (see :func:`task_name`).

    Parameters
    ----------
    adapters : list of Adapter
        The adapters, in order.

    Returns
    -------
    list of str
        One name per adapter; ``task{i}`` for all if any two collide.

    Examples
    --------
    >>> from esmerge.specialists.adapters import Adapter
    >>> task_names([Adapter({}, {}, "cell"), Adapter({}, {}, "protein-x")])
    ['cell', 'protein']
    >>> task_names([Adapter({}, {}, "molecule"), Adapter({}, {}, "molecule_v2")])
    ['task0', 'task1']
    """
    names = [task_name(a.name, i) for i, a in enumerate(adapters)]
    return names if len(set(names)) == len(names) else [f"task{i}" for i in range(len(adapters))]


# --------------------------------------------------------------------------- Average
@register("avg", "Avg. Merging", "https://arxiv.org/abs/2203.05482")
def average(adapters: list[Adapter], context=None) -> MergeResult:
    r"""Average Merging: the element-wise mean of the LoRA tensors, Eq. 1 with :math:`\lambda_{m_i}^{l,n} = 1/K`.

    A baseline of the paper (App. A.2).

    Parameters
    ----------
    adapters : list of Adapter
        The T specialists (task vectors: the base is the zero LoRA).
    context : ignored
        Training-free: no context is needed.

    Returns
    -------
    MergeResult
        The mean adapter.

    Notes
    -----
    Choices where the paper is silent: none (the A's and the B's are averaged separately,
    as Eq. 1 prescribes; the product :math:`\bar B \bar A` is not the mean of :math:`B_t A_t`).

    Examples
    --------
    >>> from esmerge.specialists.adapters import Adapter
    >>> a = Adapter({"w": torch.tensor([1., 3.])}, {}, "molecule")
    >>> b = Adapter({"w": torch.tensor([3., 5.])}, {}, "protein")
    >>> average([a, b]).adapter.state["w"]
    tensor([2., 4.])
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    return merged_result(adapters, tau.mean(dim=0), keys, shapes, "avg", {"hparams": {}}, start)


# --------------------------------------------------------------------------- TIES
# |lambda| <= 1e3: the papers tune lambda in about [0, 2] (negative: task negation), so 1e3 is far
# outside any useful value, and LoRA entries (|w| < 1e3) times 1e3 stay finite in float32, while
# lambda = 1e308 alone turns every merged entry into Inf or NaN.
SCALE_BOUND = 1e3
SCALING_FACTOR = HParam("scaling_factor", float, low=-SCALE_BOUND, high=SCALE_BOUND,
                        doc="lambda applied to the merged task vector")
SCOPE = HParam("scope", str, choices=SCOPES, doc="threshold per LoRA tensor or over the whole adapter")


@register("ties", "TIES-Merging", "https://arxiv.org/abs/2306.01708", hparams=(
    HParam("keep", float, low=0.0, high=1.0, low_open=True, doc="fraction of each task vector kept"),
    SCALING_FACTOR, SCOPE))
def ties(adapters: list[Adapter], context=None, keep: float = 0.2, scaling_factor: float = 1.0,
         scope: str = "tensor") -> MergeResult:
    r"""TIES-Merging (Yadav et al. 2023, Sec. 4 / Algorithm 1): trim, elect sign, disjoint merge.

    :math:`\hat\tau_t = \mathrm{trim}_k(\tau_t)`, :math:`\gamma = \mathrm{sgn}(\sum_t \hat\tau_t)`,
    :math:`\tau_m = \lambda \cdot \mathrm{mean}_{t: \hat\tau_t \gamma > 0} \hat\tau_t`.

    Parameters
    ----------
    adapters : list of Adapter
        The T specialists (task vectors: the base is the zero LoRA).
    context : ignored
        Training-free: no context is needed.
    keep : float
        Fraction of each task vector kept by magnitude (the paper's k = 20%, its default).
    scaling_factor : float
        :math:`\lambda` applied to the merged task vector. The TIES paper tunes it on
        validation data; 1.0 is the value it recommends without validation data.
    scope : ``"tensor"`` | ``"model"``
        Where the top-k threshold is taken. The original takes it over the whole model's
        task vector; for LoRA that ranks A entries (initialised at ~1/sqrt(d_in)) against B
        entries (trained from 0, much smaller), so most B entries are trimmed and the merged
        update BA nearly vanishes. We default to a threshold per LoRA tensor (as PEFT's
        LoRA TIES does); ``"model"`` reproduces the original's global threshold.

    Returns
    -------
    MergeResult
        The merged adapter.

    Notes
    -----
    Choices where the papers are silent: the scope above; a zero sign-sum elects +1
    (irrelevant to the result).

    Examples
    --------
    Nothing trimmed: entry 0 elects + and averages 1 and 3; entry 1 elects - and keeps -2;
    entry 2 sums to 0, elects + and keeps 0.5:

    >>> from esmerge.specialists.adapters import Adapter
    >>> a = Adapter({"w": torch.tensor([1., -2., 0.5])}, {}, "molecule")
    >>> b = Adapter({"w": torch.tensor([3., 1., -0.5])}, {}, "protein")
    >>> ties([a, b], keep=1.0).adapter.state["w"]
    tensor([ 2.0000, -2.0000,  0.5000])
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)

    def merge(part: torch.Tensor) -> torch.Tensor:
        trimmed = P.magnitude_trim(part, keep)
        return P.disjoint_mean(trimmed, P.elect_sign(trimmed))

    merged = scaling_factor * _scoped(tau, shapes, scope, merge)
    info = {"hparams": {"keep": keep, "scaling_factor": scaling_factor, "scope": scope}}
    return merged_result(adapters, merged, keys, shapes, "ties", info, start)


# --------------------------------------------------------------------------- PCB
@register("pcb", "PCB-Merging", "https://arxiv.org/abs/2410.02396", hparams=(
    HParam("drop", float, low=0.0, high=1.0, high_open=True, doc="fraction of each task's entries dropped"),
    SCALING_FACTOR, SCOPE))
def pcb(adapters: list[Adapter], context=None, drop: float = 0.9, scaling_factor: float = 1.0,
        scope: str = "tensor") -> MergeResult:
    r"""PCB-Merging (Du et al. 2024, Eqs. 2-7).

    :math:`\beta_i = \mathrm{Softmax}(T\,\mathrm{Norm}(\tau_i^2)) \odot
    \sum_j \mathrm{Softmax}(\mathrm{Norm}(\tau_i \odot \tau_j))`,
    drop the lowest ``drop`` fraction of :math:`\beta_i` per task,
    :math:`\tau_m = \lambda \sum_i \hat\beta_i \tau_i / \sum_i \hat\beta_i`.

    Parameters
    ----------
    adapters : list of Adapter
        The T specialists (task vectors: the base is the zero LoRA).
    context : ignored
        Training-free: no context is needed.
    drop : float
        Fraction of each task's entries dropped (paper's ratio r). 0.9 matches the official
        code's default ``pcb_ratio=0.1``, which *keeps* the top 10% of :math:`\beta_i`.
    scaling_factor : float
        :math:`\lambda`; the paper searches it on validation data (evolutionary search),
        which we do not have; 1.0 leaves the balanced mean unscaled.
    scope : ``"tensor"`` | ``"model"``
        Over what the softmaxes, normalisations and the drop quantile run: each LoRA tensor
        (default) or the whole flattened adapter as the original does over a whole model.
        Over the whole adapter the kept 10% are almost all A entries (larger than B's), every
        B is dropped and the merged update BA is exactly 0; hence per tensor.

    Returns
    -------
    MergeResult
        The merged adapter; ``info`` holds the fraction of entries kept.

    Notes
    -----
    Choices where the paper is silent or the code differs: we follow the paper's Eq. 3
    (a sum of softmaxes) rather than the official code's ``tanh(tau_i * sum_j tau_j)``;
    Norm is min-max within a task vector (the code's ``normalize``); we skip the code's
    0.01% outlier clamping; kept entries are weighted by :math:`\beta` itself (Eq. 6), not
    by a min-max rescaled :math:`\beta`.

    Examples
    --------
    Two equal tasks each keep their larger entry only, so entry 0 is dropped by both (0) and
    entry 1 is the balanced mean of 2 and 2:

    >>> from esmerge.specialists.adapters import Adapter
    >>> a = Adapter({"w": torch.tensor([1., 2.])}, {}, "molecule")
    >>> result = pcb([a, Adapter({"w": torch.tensor([1., 2.])}, {}, "protein")], drop=0.5)
    >>> result.adapter.state["w"], result.info["kept_fraction"]
    (tensor([0., 2.]), 0.5)
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    kept = []

    def merge(part: torch.Tensor) -> torch.Tensor:
        log_beta = pcb_log_balance(part)
        keep = keep_top_fraction(log_beta, drop)
        kept.append(keep.float().sum())
        return balanced_mean(part, log_beta, keep)

    merged = scaling_factor * _scoped(tau, shapes, scope, merge)
    info = {"hparams": {"drop": drop, "scaling_factor": scaling_factor, "scope": scope},
            "kept_fraction": float(sum(kept) / tau.numel())}
    return merged_result(adapters, merged, keys, shapes, "pcb", info, start)


# --------------------------------------------------------------------------- Consensus
@register("consensus", "Consensus Merging", "https://arxiv.org/abs/2405.07813", hparams=(
    HParam("tall_lambda", float, low=0.0, doc="TALL mask threshold lambda_t, the same for every task"),
    HParam("k", int, low=1, doc="minimum number of tasks an entry must matter to"),
    HParam("scaling_factor", float, low=-SCALE_BOUND, high=SCALE_BOUND, nullable=True,
           doc="task-arithmetic alpha; null: 1/T")))
def consensus(adapters: list[Adapter], context=None, tall_lambda: float = 0.4, k: int = 2,
              scaling_factor: float | None = None) -> MergeResult:
    r"""Consensus Task Arithmetic (Wang et al. 2024, "Localizing task information...", Sec. 5).

    TALL masks :math:`m_t = 1\{|\tau_t| \ge \lambda_t |\tau_{MTL} - \tau_t|\}` with
    :math:`\tau_{MTL} = \sum_t \tau_t`; consensus mask :math:`m = 1\{\sum_t m_t \ge k\}`;
    merged :math:`\tau = \alpha \sum_t m \odot \tau_t`.

    Parameters
    ----------
    adapters : list of Adapter
        The T specialists (task vectors: the base is the zero LoRA).
    context : ignored
        Training-free: no context is needed.
    tall_lambda : float
        :math:`\lambda_t`, the same for every task. The paper picks each from
        {0.2, ..., 0.6} on validation data; we have none and take the middle, 0.4.
    k : int
        Minimum number of tasks an entry must matter to (paper: 2).
    scaling_factor : float, optional
        Task-arithmetic :math:`\alpha`; tuned on validation in the paper. Default ``1/T``,
        so that with every entry kept the result is the plain average (comparable to Avg).

    Returns
    -------
    MergeResult
        The merged adapter; ``info`` holds the kept fraction and each task's TALL mask density.

    Notes
    -----
    Choices where the paper is silent: :math:`\tau_{MTL}` is the unscaled task-arithmetic
    sum of the task vectors (as FusionBench's TALL-mask implementation builds it); the same
    :math:`\lambda` for all tasks.

    Examples
    --------
    The TALL masks of :func:`~esmerge.methods.primitives.tall_masks`' example: entry 0 matters to
    both tasks and is kept, (1 + 1) / 2 = 1; entry 1 matters to one task only and is dropped:

    >>> from esmerge.specialists.adapters import Adapter
    >>> a = Adapter({"w": torch.tensor([1., 0.1])}, {}, "molecule")
    >>> b = Adapter({"w": torch.tensor([1., 2.])}, {}, "protein")
    >>> consensus([a, b], tall_lambda=0.5).adapter.state["w"]
    tensor([1., 0.])
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    alpha = 1.0 / len(adapters) if scaling_factor is None else scaling_factor
    masks = P.tall_masks(tau, tall_lambda)
    keep = P.consensus_mask(masks, k)
    merged = alpha * (tau * keep).sum(dim=0)
    info = {
        "hparams": {"tall_lambda": tall_lambda, "k": k, "scaling_factor": alpha},
        "kept_fraction": float(keep.float().mean()),
        "tall_mask_density": {n: float(m.float().mean()) for n, m in zip(task_names(adapters), masks)},
    }
    return merged_result(adapters, merged, keys, shapes, "consensus", info, start)


