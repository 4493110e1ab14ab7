"""Training-free parameter-space baselines (paper App. A.2): Average, TIES, EMR, PCB, Consensus.

Each is a composition of the primitives in :mod:`esmerge.methods.primitives` over the
stacked LoRA task vectors ``tau`` (``[T, P]``, base = zero LoRA), applied element-wise to
the A and B matrices as the paper's Eq. 1 does. Where an original method ranks or normalises
over a whole model's task vector (TIES' top-k, PCB's softmaxes and drop), ``scope`` chooses
between one LoRA tensor (default: A and B entries live on different scales) and the whole
flattened adapter (the original's literal reading). EMR's rescalers are per whole adapter.
"""
from __future__ import annotations

import time

import torch

from esmerge.adapters import Adapter, with_state
from esmerge.encoders import MODALITIES
from esmerge.methods import HParam, MergeResult, register
from esmerge.methods import primitives as P


def _merged(adapters: list[Adapter], vector: torch.Tensor, keys, shapes, name: str, info: dict, start: float,
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
    """The task of an adapter named ``name``: its modality if the name is or starts with one
    (``"molecule"``, ``"molecule-specialist"``), else the name itself, else ``task{index}``."""
    for modality in MODALITIES:
        if name == modality or name.startswith(modality + "-") or name.startswith(modality + "_"):
            return modality
    return name or f"task{index}"


def task_names(adapters: list[Adapter]) -> list[str]:
    """Task names of the adapters (see :func:`task_name`); ``task{i}`` for all if any two collide."""
    names = [task_name(a.name, i) for i, a in enumerate(adapters)]
    return names if len(set(names)) == len(names) else [f"task{i}" for i in range(len(adapters))]


# --------------------------------------------------------------------------- Average
@register("avg", "Avg. Merging", "https://arxiv.org/abs/2203.05482")
def average(adapters: list[Adapter], context=None) -> MergeResult:
    r"""Element-wise mean of the LoRA tensors: Eq. 1 with :math:`\lambda_{m_i}^{l,n} = 1/K`.

    Choices where the paper is silent: none (the A's and the B's are averaged separately,
    as Eq. 1 prescribes; the product :math:`\bar B \bar A` is not the mean of :math:`B_t A_t`).
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    return _merged(adapters, tau.mean(dim=0), keys, shapes, "avg", {"hparams": {}}, start)


# --------------------------------------------------------------------------- TIES
# |lambda| <= 1e3: the papers tune lambda in about [0, 2] (negative: task negation), so 1e3 is far
# outside any useful value, and LoRA entries (|w| < 1e3) times 1e3 stay finite in float32, while
# lambda = 1e308 alone turns every merged entry into Inf or NaN.
SCALE_BOUND = 1e3
SCALE = HParam("scale", float, 1.0, low=-SCALE_BOUND, high=SCALE_BOUND, doc="lambda applied to the merged task vector")
SCOPE = HParam("scope", str, "tensor", choices=SCOPES, doc="threshold per LoRA tensor or over the whole adapter")


@register("ties", "TIES-Merging", "https://arxiv.org/abs/2306.01708", hparams=(
    HParam("keep", float, 0.2, low=0.0, high=1.0, low_open=True, doc="fraction of each task vector kept"),
    SCALE, SCOPE))
def ties(adapters: list[Adapter], context=None, keep: float = 0.2, scale: float = 1.0,
         scope: str = "tensor") -> MergeResult:
    r"""TIES-Merging (Yadav et al. 2023, Sec. 4 / Algorithm 1): trim, elect sign, disjoint merge.

    :math:`\hat\tau_t = \mathrm{trim}_k(\tau_t)`, :math:`\gamma = \mathrm{sgn}(\sum_t \hat\tau_t)`,
    :math:`\tau_m = \lambda \cdot \mathrm{mean}_{t: \hat\tau_t \gamma > 0} \hat\tau_t`.

    Parameters
    ----------
    keep : float
        Fraction of each task vector kept by magnitude (the paper's k = 20%, its default).
    scale : float
        :math:`\lambda` applied to the merged task vector. The TIES paper tunes it on
        validation data; 1.0 is the value it recommends without validation data.
    scope : ``"tensor"`` | ``"model"``
        Where the top-k threshold is taken. The original takes it over the whole model's
        task vector; for LoRA that ranks A entries (initialised at ~1/sqrt(d_in)) against B
        entries (trained from 0, much smaller), so most B entries are trimmed and the merged
        update BA nearly vanishes. We default to a threshold per LoRA tensor (as PEFT's
        LoRA TIES does); ``"model"`` reproduces the original's global threshold.

    Choices where the papers are silent: the scope above; a zero sign-sum elects +1
    (irrelevant to the result).
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)

    def merge(part: torch.Tensor) -> torch.Tensor:
        trimmed = P.magnitude_trim(part, keep)
        return P.disjoint_mean(trimmed, P.elect_sign(trimmed))

    merged = scale * _scoped(tau, shapes, scope, merge)
    return _merged(adapters, merged, keys, shapes, "ties", {"hparams": {"keep": keep, "scale": scale, "scope": scope}}, start)


# --------------------------------------------------------------------------- EMR
EMR_RULE = (
    "cross-modal benchmark adapter = mean over the modalities present in the benchmark of "
    "lambda_t * M_t * tau_uni (emr_benchmark_adapter); the saved adapter is tau_uni itself"
)


@register("emr", "EMR-Merging", "https://arxiv.org/abs/2405.17461")
def emr(adapters: list[Adapter], context=None) -> MergeResult:
    r"""EMR-Merging (Huang et al. 2024, Eqs. 2-7): elect, mask, rescale.

    The merged adapter is the unified vector :math:`\tau_{uni}` (Eqs. 2-4). The per-task
    masks :math:`M_t` (Eq. 5) and rescalers :math:`\lambda_t` (Eq. 6) are stored in
    ``adapter.extras`` under ``"{task}.mask.{key}"`` (bool, the key's shape) and
    ``"{task}.rescale"`` (scalar); :func:`emr_task_adapter` rebuilds the modulated task
    vector :math:`\hat\tau_t = \lambda_t M_t \odot \tau_{uni}` (Eq. 7).

    Choices where the paper is silent:

    * Rescalers are one scalar per task over the whole flattened adapter.
    * Cross-modal benchmarks have no single task. Our rule, identical for all benchmarks:
      average the modulated adapters :math:`\hat\tau_t` of the modalities present in the
      benchmark (:func:`emr_benchmark_adapter`); e.g. molecule-protein interaction uses
      :math:`(\hat\tau_{mol} + \hat\tau_{prot})/2`.
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    unified = P.emr_unified(tau)
    masks = P.emr_masks(tau, unified)
    rescale = P.emr_rescalers(tau, unified, masks)
    extras = {}
    for name, mask, lam in zip(task_names(adapters), masks, rescale):
        for key, part in P.unflatten(mask.float(), keys, shapes).items():
            extras[f"{name}.mask.{key}"] = part.bool()
        extras[f"{name}.rescale"] = lam.reshape(())
    info = {
        "hparams": {},
        "tasks": task_names(adapters),
        "rescalers": {n: float(v) for n, v in zip(task_names(adapters), rescale)},
        "mask_density": {n: float(m.float().mean()) for n, m in zip(task_names(adapters), masks)},
        "inference_rule": EMR_RULE,
    }
    return _merged(adapters, unified, keys, shapes, "emr", info, start, extras)


def emr_task_adapter(result: MergeResult | Adapter, task: str) -> Adapter:
    r"""The modulated adapter :math:`\lambda_t M_t \odot \tau_{uni}` of one task (EMR Eq. 7)."""
    merged = result.adapter if isinstance(result, MergeResult) else result
    if f"{task}.rescale" not in merged.extras:
        known = sorted({k.split(".")[0] for k in merged.extras})
        raise KeyError(f"no EMR mask/rescaler for task {task!r}; adapter has {known or 'no EMR extras'}")
    lam = merged.extras[f"{task}.rescale"]
    state = {k: lam * merged.extras[f"{task}.mask.{k}"].to(v.dtype) * v for k, v in merged.state.items()}
    return with_state(merged, state, f"emr[{task}]")


def emr_benchmark_adapter(result: MergeResult | Adapter, modalities: list[str]) -> Adapter:
    """Mean of the EMR task adapters of the ``modalities`` a benchmark contains (our cross-modal rule)."""
    if not modalities:
        raise ValueError("a benchmark needs at least one modality to pick EMR masks")
    parts = [emr_task_adapter(result, m) for m in modalities]
    state = {k: torch.stack([p.state[k] for p in parts]).mean(dim=0) for k in parts[0].state}
    return with_state(parts[0], state, f"emr[{'+'.join(modalities)}]")


# --------------------------------------------------------------------------- PCB
@register("pcb", "PCB-Merging", "https://arxiv.org/abs/2410.02396", hparams=(
    HParam("drop", float, 0.9, low=0.0, high=1.0, high_open=True, doc="fraction of each task's entries dropped"),
    SCALE, SCOPE))
def pcb(adapters: list[Adapter], context=None, drop: float = 0.9, scale: float = 1.0,
        scope: str = "tensor") -> MergeResult:
    r"""PCB-Merging (Du et al. 2024, Eqs. 2-7).

    :math:`\beta_i = \mathrm{Softmax}(T\,\mathrm{Norm}(\tau_i^2)) \odot \sum_j \mathrm{Softmax}(\mathrm{Norm}(\tau_i \odot \tau_j))`,
    drop the lowest ``drop`` fraction of :math:`\beta_i` per task,
    :math:`\tau_m = \lambda \sum_i \hat\beta_i \tau_i / \sum_i \hat\beta_i`.

    Parameters
    ----------
    drop : float
        Fraction of each task's entries dropped (paper's ratio r). 0.9 matches the official
        code's default ``pcb_ratio=0.1``, which *keeps* the top 10% of :math:`\beta_i`.
    scale : float
        :math:`\lambda`; the paper searches it on validation data (evolutionary search),
        which we do not have; 1.0 leaves the balanced mean unscaled.
    scope : ``"tensor"`` | ``"model"``
        Over what the softmaxes, normalisations and the drop quantile run: each LoRA tensor
        (default) or the whole flattened adapter as the original does over a whole model.
        Over the whole adapter the kept 10% are almost all A entries (larger than B's), every
        B is dropped and the merged update BA is exactly 0; hence per tensor.

    Choices where the paper is silent or the code differs: we follow the paper's Eq. 3
    (a sum of softmaxes) rather than the official code's ``tanh(tau_i * sum_j tau_j)``;
    Norm is min-max within a task vector (the code's ``normalize``); we skip the code's
    0.01% outlier clamping; kept entries are weighted by :math:`\beta` itself (Eq. 6), not
    by a min-max rescaled :math:`\beta`.
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    kept = []

    def merge(part: torch.Tensor) -> torch.Tensor:
        log_beta = P.pcb_log_balance(part)
        keep = P.keep_top_fraction(log_beta, drop)
        kept.append(keep.float().sum())
        return P.balanced_mean(part, log_beta, keep)

    merged = scale * _scoped(tau, shapes, scope, merge)
    info = {"hparams": {"drop": drop, "scale": scale, "scope": scope},
            "kept_fraction": float(sum(kept) / tau.numel())}
    return _merged(adapters, merged, keys, shapes, "pcb", info, start)


# --------------------------------------------------------------------------- Consensus
@register("consensus", "Consensus Merging", "https://arxiv.org/abs/2405.07813", hparams=(
    HParam("tall_lambda", float, 0.4, low=0.0, doc="TALL mask threshold lambda_t, the same for every task"),
    HParam("k", int, 2, low=1, doc="minimum number of tasks an entry must matter to"),
    HParam("scale", float, None, low=-SCALE_BOUND, high=SCALE_BOUND, nullable=True,
           doc="task-arithmetic alpha; null: 1/T")))
def consensus(adapters: list[Adapter], context=None, tall_lambda: float = 0.4, k: int = 2,
              scale: float | None = None) -> MergeResult:
    r"""Consensus Task Arithmetic (Wang et al. 2024, "Localizing task information...", Sec. 5).

    TALL masks :math:`m_t = 1\{|\tau_t| \ge \lambda_t |\tau_{MTL} - \tau_t|\}` with
    :math:`\tau_{MTL} = \sum_t \tau_t`; consensus mask :math:`m = 1\{\sum_t m_t \ge k\}`;
    merged :math:`\tau = \alpha \sum_t m \odot \tau_t`.

    Parameters
    ----------
    tall_lambda : float
        :math:`\lambda_t`, the same for every task. The paper picks each from
        {0.2, ..., 0.6} on validation data; we have none and take the middle, 0.4.
    k : int
        Minimum number of tasks an entry must matter to (paper: 2).
    scale : float, optional
        Task-arithmetic :math:`\alpha`; tuned on validation in the paper. Default ``1/T``,
        so that with every entry kept the result is the plain average (comparable to Avg).

    Choices where the paper is silent: :math:`\tau_{MTL}` is the unscaled task-arithmetic
    sum of the task vectors (as FusionBench's TALL-mask implementation builds it); the same
    :math:`\lambda` for all tasks.
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    alpha = 1.0 / len(adapters) if scale is None else scale
    masks = P.tall_masks(tau, tall_lambda)
    keep = P.consensus_mask(masks, k)
    merged = alpha * (tau * keep).sum(dim=0)
    info = {
        "hparams": {"tall_lambda": tall_lambda, "k": k, "scale": alpha},
        "kept_fraction": float(keep.float().mean()),
        "tall_mask_density": {n: float(m.float().mean()) for n, m in zip(task_names(adapters), masks)},
    }
    return _merged(adapters, merged, keys, shapes, "consensus", info, start)
