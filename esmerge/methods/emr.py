r"""EMR-Merging (Huang et al. 2024, Eqs. 2-7): elect a unified task vector, then mask and rescale it per task.

The primitives work on stacked task vectors ``tau`` ``[T, P]`` (see ``esmerge.methods.primitives``);
the registered method saves the unified vector and keeps each task's mask and rescaler, from which
``emr_task_adapter`` rebuilds one task's adapter and ``emr_benchmark_adapter`` one benchmark's.
Both are *routed*: something must know the task (or the benchmark's modalities) to pick the
modulator. ``emr_one_model`` is the one adapter a user would deploy without routing, the mean of
the modulated task vectors; reports name it ``ONE_MODEL`` ("emr (one model)"), the routed one
"emr (routed)".
"""
from __future__ import annotations

import time

import torch

from esmerge.data.benchmarks import benchmark_modalities
from esmerge.methods import MergeResult, register
from esmerge.methods import primitives as P
from esmerge.methods.static import merged_result, task_names
from esmerge.specialists.adapters import Adapter, with_state


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

    Examples
    --------
    Both sums are negative; the largest negative magnitudes are 3 and 4:

    >>> emr_unified(torch.tensor([[1.0, -2.0], [-3.0, 1.0], [0.5, -4.0]]))
    tensor([-3., -4.])
    """
    sign = P.elect_sign(tau)
    magnitude = (tau.abs() * P.agreement_mask(tau, sign)).amax(dim=0)
    return sign * magnitude


def emr_masks(tau: torch.Tensor, unified: torch.Tensor) -> torch.Tensor:
    r"""Task-specific masks :math:`M_t = 1[\tau_t \odot \tau_{uni} > 0]` (EMR Eq. 5).

    Parameters
    ----------
    tau : Tensor, shape (T, P)
    unified : Tensor, shape (P,)
        :math:`\tau_{uni}` (:func:`emr_unified`).

    Returns
    -------
    Tensor, shape (T, P), bool

    Examples
    --------
    >>> tau = torch.tensor([[1.0, -2.0], [-3.0, 1.0], [0.5, -4.0]])
    >>> emr_masks(tau, emr_unified(tau))  # unified = [-3, -4]
    tensor([[False,  True],
            [ True, False],
            [False,  True]])
    """
    return (tau * unified) > 0


def emr_rescalers(tau: torch.Tensor, unified: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    r"""Task-specific rescalers :math:`\lambda_t = \frac{\sum|\tau_t|}{\sum|M_t \odot \tau_{uni}|}` (EMR Eq. 6).

    One scalar per task over the whole flattened adapter, as in EMR's definition.

    Parameters
    ----------
    tau : Tensor, shape (T, P)
    unified : Tensor, shape (P,)
        :math:`\tau_{uni}` (:func:`emr_unified`).
    masks : Tensor, shape (T, P), bool
        :math:`M_t` (:func:`emr_masks`).

    Returns
    -------
    Tensor, shape (T,)
        A task whose mask is empty gets 0.

    Examples
    --------
    With unified = [-3, -4]: task 0 keeps |-4|, so 3 / 4; task 1 keeps |-3|, 4 / 3; task 2 keeps
    |-4|, 4.5 / 4:

    >>> tau = torch.tensor([[1.0, -2.0], [-3.0, 1.0], [0.5, -4.0]])
    >>> unified = emr_unified(tau)
    >>> emr_rescalers(tau, unified, emr_masks(tau, unified))
    tensor([0.7500, 1.3333, 1.1250])
    """
    kept = (masks * unified.abs()).sum(dim=1)
    return torch.where(kept > 0, tau.abs().sum(dim=1) / kept.clamp(min=torch.finfo(tau.dtype).tiny), 0.0)


# --------------------------------------------------------------------------- EMR
ONE_MODEL = "emr-one"  # the name of EMR evaluated as one merged model (emr_one_model)
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

    Parameters
    ----------
    adapters : list of Adapter
        The T specialists (task vectors: the base is the zero LoRA).
    context : ignored
        Training-free: no context is needed.

    Returns
    -------
    MergeResult
        :math:`\tau_{uni}` with the masks and rescalers as extras; ``info`` holds the rescalers,
        the mask densities and the cross-modal rule.

    Notes
    -----
    Choices where the paper is silent:

    * Rescalers are one scalar per task over the whole flattened adapter.
    * Cross-modal benchmarks have no single task. Our rule, identical for all benchmarks:
      average the modulated adapters :math:`\hat\tau_t` of the modalities present in the
      benchmark (:func:`emr_benchmark_adapter`); e.g. molecule-protein interaction uses
      :math:`(\hat\tau_{mol} + \hat\tau_{prot})/2`.

    Examples
    --------
    Signs elected: (+, +). Unified magnitudes: 3 (from the molecule task) and 2 (protein).
    Rescalers: molecule (3 + 1) / 3, protein (1 + 2) / 2:

    >>> from esmerge.specialists.adapters import Adapter
    >>> a = Adapter({"w": torch.tensor([3., -1.])}, {}, "molecule")
    >>> b = Adapter({"w": torch.tensor([-1., 2.])}, {}, "protein")
    >>> result = emr([a, b])
    >>> result.adapter.state["w"], result.adapter.extras["molecule.mask.w"]
    (tensor([3., 2.]), tensor([ True, False]))
    >>> {task: round(v, 4) for task, v in result.info["rescalers"].items()}
    {'molecule': 1.3333, 'protein': 1.5}
    """
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    unified = emr_unified(tau)
    masks = emr_masks(tau, unified)
    rescale = emr_rescalers(tau, unified, masks)
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
    return merged_result(adapters, unified, keys, shapes, "emr", info, start, extras)


def emr_task_adapter(result: MergeResult | Adapter, task: str) -> Adapter:
    r"""The modulated adapter :math:`\hat\tau_t = \lambda_t M_t \odot \tau_{uni}` of one task (EMR Eq. 7).

    Parameters
    ----------
    result : MergeResult or Adapter
        EMR's output (with its masks and rescalers as extras).
    task : str
        The task (modality).

    Returns
    -------
    Adapter
        Named ``emr[task]``.

    Raises
    ------
    KeyError
        If the adapter has no EMR extras for that task.

    Examples
    --------
    With the example of :func:`emr`: molecule keeps entry 0, 4/3 · 3 = 4; protein keeps entry 1,
    1.5 · 2 = 3:

    >>> from esmerge.specialists.adapters import Adapter
    >>> result = emr([Adapter({"w": torch.tensor([3., -1.])}, {}, "molecule"),
    ...               Adapter({"w": torch.tensor([-1., 2.])}, {}, "protein")])
    >>> emr_task_adapter(result, "molecule").state["w"], emr_task_adapter(result, "protein").state["w"]
    (tensor([4., 0.]), tensor([0., 3.]))
    """
    merged = result.adapter if isinstance(result, MergeResult) else result
    if f"{task}.rescale" not in merged.extras:
        known = sorted({k.split(".")[0] for k in merged.extras})
        raise KeyError(f"no EMR mask/rescaler for task {task!r}; adapter has {known or 'no EMR extras'}")
    lam = merged.extras[f"{task}.rescale"]
    state = {k: lam * merged.extras[f"{task}.mask.{k}"].to(v.dtype) * v for k, v in merged.state.items()}
    return with_state(merged, state, f"emr[{task}]")


def emr_benchmark_adapter(result: MergeResult | Adapter, modalities: list[str]) -> Adapter:
    """The mean of the EMR task adapters of the modalities a benchmark contains (our cross-modal rule).

    Parameters
    ----------
    result : MergeResult or Adapter
        EMR's output.
    modalities : list of str
        The benchmark's modalities (at least one).

    Returns
    -------
    Adapter
        Named ``emr[m1+m2...]``.

    Examples
    --------
    The mean of [4, 0] and [0, 3] (see :func:`emr_task_adapter`):

    >>> from esmerge.specialists.adapters import Adapter
    >>> result = emr([Adapter({"w": torch.tensor([3., -1.])}, {}, "molecule"),
    ...               Adapter({"w": torch.tensor([-1., 2.])}, {}, "protein")])
    >>> emr_benchmark_adapter(result, ["molecule", "protein"]).state["w"]
    tensor([2.0000, 1.5000])
    """
    if not modalities:
        raise ValueError("a benchmark needs at least one modality to pick EMR masks")
    parts = [emr_task_adapter(result, m) for m in modalities]
    state = {k: torch.stack([p.state[k] for p in parts]).mean(dim=0) for k in parts[0].state}
    return with_state(parts[0], state, f"emr[{'+'.join(modalities)}]")


def emr_adapter_for_benchmark(merged: Adapter, benchmark: str) -> Adapter:
    """EMR's adapter for one benchmark: the mean of the modulated task vectors of its modalities.

    Parameters
    ----------
    merged : Adapter
        EMR's merged adapter.
    benchmark : str
        A benchmark name (``esmerge.data.benchmarks``), e.g. ``"BindingDB"``.

    Returns
    -------
    Adapter
        ``emr_benchmark_adapter`` over the benchmark's modalities.

    Examples
    --------
    BindingDB holds proteins and molecules:

    >>> from esmerge.specialists.adapters import Adapter
    >>> result = emr([Adapter({"w": torch.tensor([3., -1.])}, {}, "molecule"),
    ...               Adapter({"w": torch.tensor([-1., 2.])}, {}, "protein")])
    >>> adapter = emr_adapter_for_benchmark(result.adapter, "BindingDB")
    >>> adapter.name, adapter.state["w"]
    ('emr[protein+molecule]', tensor([2.0000, 1.5000]))
    """
    return emr_benchmark_adapter(merged, benchmark_modalities(benchmark))


def emr_one_model(result: MergeResult | Adapter, tasks: list[str] | None = None) -> Adapter:
    r"""EMR as one merged model, without routing: the mean over tasks of the modulated task vectors.

    .. math:: \bar\tau = \frac{1}{T} \sum_{t=1}^{T} \lambda_t M_t \odot \tau_{uni}
              = \tau_{uni} \odot \frac{1}{T} \sum_t \lambda_t M_t

    with :math:`\tau_{uni}` of EMR Eqs. 2-4 (:func:`emr_unified`), the masks :math:`M_t` of Eq. 5
    and the rescalers :math:`\lambda_t` of Eq. 6; each summand is Eq. 7's modulated task vector
    :math:`\hat\tau_t` (:func:`emr_task_adapter`). EMR itself routes each input to its task's
    :math:`\hat\tau_t` (an oracle that knows the task); this is the one adapter a user would
    deploy when nothing tells the model which task an input belongs to.

    Parameters
    ----------
    result : MergeResult or Adapter
        EMR's output: per key a tensor of the key's shape (:math:`\tau_{uni}`), with extras
        ``"{task}.mask.{key}"`` (bool, the key's shape) and ``"{task}.rescale"`` (scalar).
    tasks : list of str, optional
        The T tasks to average; default every task with EMR extras, in sorted order.

    Returns
    -------
    Adapter
        Named ``ONE_MODEL`` (``"emr-one"``), each tensor of its key's shape, without EMR's
        extras (there is nothing left to route).

    Raises
    ------
    KeyError
        If the adapter has no EMR extras (or none for one of ``tasks``).

    Examples
    --------
    Three tasks with unified = [-3, -4], masks [0, 1], [1, 0], [0, 1] and rescalers 3/4, 4/3,
    9/8 (see :func:`emr_rescalers`): the modulated vectors are [0, -3], [-4, 0] and [0, -4.5],
    so the one model is their mean [-4/3, -2.5]; routing would give each task its own vector:

    >>> from esmerge.specialists.adapters import Adapter
    >>> result = emr([Adapter({"w": torch.tensor([1.0, -2.0])}, {}, "molecule"),
    ...               Adapter({"w": torch.tensor([-3.0, 1.0])}, {}, "protein"),
    ...               Adapter({"w": torch.tensor([0.5, -4.0])}, {}, "cell")])
    >>> one = emr_one_model(result)
    >>> one.name, one.state["w"], one.extras
    ('emr-one', tensor([-1.3333, -2.5000]), {})
    >>> {t: [v + 0.0 for v in emr_task_adapter(result, t).state["w"].tolist()] for t in ("molecule", "protein")}
    {'molecule': [0.0, -3.0], 'protein': [-4.0, 0.0]}
    """
    merged = result.adapter if isinstance(result, MergeResult) else result
    if tasks is None:
        # sorted: the extras' stored order varies between loads, and with it the mean's rounding (and digest)
        tasks = sorted(k[: -len(".rescale")] for k in merged.extras if k.endswith(".rescale"))
    if not tasks:
        raise KeyError("no EMR mask/rescaler in this adapter: it is not EMR's output")
    parts = [emr_task_adapter(merged, t) for t in tasks]
    state = {k: torch.stack([p.state[k] for p in parts]).mean(dim=0) for k in merged.state}
    return with_state(merged, state, ONE_MODEL)
