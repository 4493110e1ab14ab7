"""Layer-wise AdaMerging (Yang et al. 2023): merging coefficients learned at test time.

:math:`\\theta^l = \\sum_t \\lambda_t^l \\tau_t^l` (base = zero LoRA), with
:math:`\\lambda` minimising the Shannon entropy of the model's answer distribution on
unlabeled test prompts (AdaMerging Eq. 5-6). The entropy objective is injected through the
context, so this module never builds prompts.
"""
from __future__ import annotations

import time

import torch

from esmerge.errors import LR_MAX
from esmerge.methods import HParam, MergeResult, register
from esmerge.methods.es_signals import peak_memory
from esmerge.methods.objectives import count_flops, from_context
from esmerge.methods.static import task_names
from esmerge.progress import track
from esmerge.specialists.adapters import Adapter, parse_key, with_state


def coefficient_groups(keys: list[str], granularity: str = "layer") -> tuple[list[int], list[str]]:
    """Which AdaMerging coefficient each LoRA key uses.

    ``granularity="layer"``: one per transformer block (all its A and B matrices), the l of
    :math:`\\lambda^l_t`; ``"tensor"``: one per LoRA tensor (the original code's notion of a
    "layer" = one parameter tensor).

    Parameters
    ----------
    keys : list of str
        LoRA keys (the layer is read from each name).
    granularity : {"layer", "tensor"}
        One coefficient per block or per tensor.

    Returns
    -------
    groups : list of int
        The group index of each key.
    labels : list of str
        One label per group (``"layer3"``, or the key itself).

    Examples
    --------
    >>> keys = ["layers.0.self_attn.q_proj.lora_A.weight", "layers.0.self_attn.q_proj.lora_B.weight",
    ...         "layers.1.self_attn.q_proj.lora_A.weight"]
    >>> coefficient_groups(keys)
    ([0, 0, 1], ['layer0', 'layer1'])
    >>> coefficient_groups(keys, "tensor")[0]
    [0, 1, 2]
    """
    if granularity == "tensor":
        return list(range(len(keys))), list(keys)
    if granularity != "layer":
        raise ValueError(f"granularity must be 'layer' or 'tensor', got {granularity!r}")
    layers = sorted({parse_key(k)[0] for k in keys})
    index = {layer: i for i, layer in enumerate(layers)}
    return [index[parse_key(k)[0]] for k in keys], [f"layer{layer}" for layer in layers]


def layerwise_sum(stacked: dict[str, torch.Tensor], coefficients: torch.Tensor,
                  groups: dict[str, int]) -> dict[str, torch.Tensor]:
    r"""Weighted sum of the adapters with one coefficient per group: paper Eq. 1 with per-layer λ.

    :math:`\theta^k = \sum_t \lambda_t^{g(k)} \tau_t^k` for every LoRA key k, with g(k) its group
    (``coefficient_groups``). Differentiable in ``coefficients``.

    Parameters
    ----------
    stacked : dict of str to Tensor, shape ``[T, *shape]``
        Key -> the T adapters' tensors, stacked.
    coefficients : Tensor, shape ``[T, G]``
        One coefficient per adapter and group.
    groups : dict of str to int
        Key -> group index.

    Returns
    -------
    dict of str to Tensor, shape ``[*shape]``
        Key -> merged tensor.

    Examples
    --------
    0.5 · [1, 2] + 0.25 · [3, 4] = [1.25, 2]:

    >>> layerwise_sum({"k": torch.tensor([[1., 2.], [3., 4.]])}, torch.tensor([[0.5], [0.25]]), {"k": 0})
    {'k': tensor([1.2500, 2.0000])}
    """
    out = {}
    for key, tensors in stacked.items():
        lam = coefficients[:, groups[key]].reshape(-1, *([1] * (tensors.dim() - 1)))
        out[key] = (lam * tensors).sum(dim=0)
    return out


@register("adamerging", "AdaMerging (layer-wise)", "https://arxiv.org/abs/2310.02575", needs_context=True,
          needs=("data",), hparams=(
    HParam("steps", int, low=0, doc="Adam steps"),
    HParam("lr", float, low=0.0, high=LR_MAX, low_open=True, doc="Adam learning rate"),
    HParam("init", float, low=0.0, high=1.0, doc="initial value of every coefficient"),
    HParam("granularity", str, choices=("layer", "tensor"),
           doc="one coefficient per block or per LoRA tensor"),
    HParam("count_cost", bool, doc="count FLOPs (FlopCounterMode)"),
    HParam("progress", bool, doc="show a progress bar")))
def adamerging(adapters: list[Adapter], context=None, steps: int = 500, lr: float = 1e-3, init: float = 0.3,
               granularity: str = "layer", count_cost: bool = True, progress: bool = True) -> MergeResult:
    r"""Layer-wise AdaMerging: learn :math:`\lambda_t^l` by entropy minimisation (AdaMerging Eqs. 5-6).

    A baseline of the paper (App. A.2). The merge is Eq. 1 with one λ per adapter and layer,
    :math:`\theta^l = \sum_t \lambda_t^l \tau_t^l`, and λ minimises the entropy of the answers.

    Parameters
    ----------
    adapters : list of Adapter
        The T specialists.
    context : MergeContext or dict
        ``context.entropy_objective(state) -> scalar`` must return the mean Shannon entropy of
        the model's two-label answer distribution on (a batch of) unlabeled test prompts when
        the model carries the LoRA ``state`` (see
        :func:`esmerge.run.baseline_inputs.label_entropy_objective`).
    steps : int
        Adam steps; 500 as in the original.
    lr : float
        Adam learning rate, 1e-3 as in the original.
    init : float
        Initial value of every coefficient; the original's prior 0.3.
    granularity : ``"layer"`` | ``"tensor"``
        One coefficient per transformer block per adapter (the paper: "a merging coefficient
        for each layer of every task vector"), or per LoRA tensor as in the original code.
    count_cost : bool
        Count FLOPs (FlopCounterMode).
    progress : bool
        Show a progress bar.

    Returns
    -------
    MergeResult
        The merged adapter; ``info`` holds the hyper-parameters, the learnt coefficients per
        task and group, the entropy history and the cost (``wall_seconds``, ``flops``, ``peak_memory_mib``,
        ``peak_memory_kind``).

    Notes
    -----
    Choices where the papers are silent: coefficients are clipped to [0, 1] after each step
    (as the original code does); the merged A's and B's both use the layer's coefficient, so
    the layer's update :math:`BA` scales quadratically, as Eq. 1 implies for LoRA.
    Cost: wall time, the FLOPs of all forward/backward passes (FlopCounterMode) and the peak memory
    (``es_signals.peak_memory``: CUDA peak allocated, or the process's RSS high-water mark on CPU).

    Examples
    --------
    Any scalar function of the merged state can stand in for the entropy. With no steps the
    merge is 0.3 · (a + b); minimising the squared norm drives every coefficient to its bound 0:

    >>> from esmerge.specialists.adapters import Adapter
    >>> key = "layers.0.self_attn.q_proj.lora_A.weight"
    >>> a = Adapter({key: torch.tensor([[1., 3.]])}, {}, "molecule")
    >>> b = Adapter({key: torch.tensor([[3., 5.]])}, {}, "protein")
    >>> context = {"entropy_objective": lambda state: sum((v ** 2).sum() for v in state.values())}
    >>> adamerging([a, b], context, steps=0, count_cost=False, progress=False).adapter.state[key]
    tensor([[1.2000, 2.4000]])
    >>> result = adamerging([a, b], context, steps=20, lr=0.1, count_cost=False, progress=False)
    >>> result.info["coefficients"]
    {'molecule': {'layer0': 0.0}, 'protein': {'layer0': 0.0}}
    """
    objective = from_context(context, "entropy_objective", "adamerging")
    start = time.perf_counter()
    keys = sorted(adapters[0].state)
    group_of_key, labels = coefficient_groups(keys, granularity)
    groups = dict(zip(keys, group_of_key))
    stacked = {k: torch.stack([a.state[k].float() for a in adapters]) for k in keys}
    # on the adapters' device: the merged state is built there, and the objective puts it on the model's
    coefficients = torch.full((len(adapters), len(labels)), float(init), requires_grad=True,
                              device=stacked[keys[0]].device)
    optimizer = torch.optim.Adam([coefficients], lr=lr)
    history: list[float] = []

    def train():
        for _ in track(range(steps), desc="adamerging", unit="step", disable=not progress):
            loss = objective(layerwise_sum(stacked, coefficients, groups))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                coefficients.clamp_(0.0, 1.0)
            history.append(float(loss.detach()))

    with peak_memory() as memory:  # beside the FLOPs, for Table 4 (esmerge.report.cost)
        _, flops = count_flops(train, enabled=count_cost)
    with torch.no_grad():
        final_entropy = float(objective(layerwise_sum(stacked, coefficients, groups)))
        state = {k: v.detach().clone() for k, v in layerwise_sum(stacked, coefficients, groups).items()}
    names = task_names(adapters)
    info = {
        "hparams": {"steps": steps, "lr": lr, "init": init, "granularity": granularity},
        "coefficients": {n: dict(zip(labels, coefficients[i].tolist())) for i, n in enumerate(names)},
        "entropy": {"first_step": history[0] if history else None, "final": final_entropy, "history": history},
        "cost": {"wall_seconds": time.perf_counter() - start, "flops": flops, **memory},
    }
    return MergeResult(with_state(adapters[0], state, "adamerging"), info)
