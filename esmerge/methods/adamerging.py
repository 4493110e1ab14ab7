"""Layer-wise AdaMerging (Yang et al. 2023): merging coefficients learned at test time.

:math:`\\theta^l = \\sum_t \\lambda_t^l \\tau_t^l` (base = zero LoRA), with
:math:`\\lambda` minimising the Shannon entropy of the model's answer distribution on
unlabeled test prompts (AdaMerging Eq. 5-6). The entropy objective is injected through the
context, so this module never builds prompts.
"""
from __future__ import annotations

import time

import torch

from esmerge.adapters import Adapter, parse_key, with_state
from esmerge.methods import HParam, MergeResult, register
from esmerge.methods.hparams import LR_MAX
from esmerge.methods.objectives import count_flops, from_context
from esmerge.methods.static import task_names
from esmerge.progress import track


def coefficient_groups(keys: list[str], granularity: str = "layer") -> tuple[list[int], list[str]]:
    """Which coefficient each LoRA key uses.

    ``granularity="layer"``: one per transformer block (all its A and B matrices);
    ``"tensor"``: one per LoRA tensor (the original code's notion of a "layer" = one
    parameter tensor). Returns (group index per key, group labels).
    """
    if granularity == "tensor":
        return list(range(len(keys))), list(keys)
    if granularity != "layer":
        raise ValueError(f"granularity must be 'layer' or 'tensor', got {granularity!r}")
    layers = sorted({parse_key(k)[0] for k in keys})
    index = {layer: i for i, layer in enumerate(layers)}
    return [index[parse_key(k)[0]] for k in keys], [f"layer{layer}" for layer in layers]


def layerwise_sum(stacked: dict[str, torch.Tensor], coefficients: torch.Tensor, groups: dict[str, int]) -> dict[str, torch.Tensor]:
    r"""Layer-wise weighted sum :math:`\sum_t \lambda_t^{g(k)} \tau_t^k` (paper Eq. 1 with per-layer :math:`\lambda`).

    stacked : ``{key: Tensor (T, *shape)}``; coefficients : Tensor, shape (T, G);
    groups : ``{key: g}``. Returns ``{key: Tensor (*shape)}``, differentiable in ``coefficients``.
    """
    out = {}
    for key, tensors in stacked.items():
        lam = coefficients[:, groups[key]].reshape(-1, *([1] * (tensors.dim() - 1)))
        out[key] = (lam * tensors).sum(dim=0)
    return out


@register("adamerging", "AdaMerging (layer-wise)", "https://arxiv.org/abs/2310.02575", needs_context=True, hparams=(
    HParam("steps", int, 500, low=0, doc="Adam steps"),
    HParam("lr", float, 1e-3, low=0.0, high=LR_MAX, low_open=True, doc="Adam learning rate"),
    HParam("init", float, 0.3, low=0.0, high=1.0, doc="initial value of every coefficient"),
    HParam("granularity", str, "layer", choices=("layer", "tensor"), doc="one coefficient per block or per LoRA tensor"),
    HParam("count_cost", bool, True, doc="count FLOPs (FlopCounterMode)"),
    HParam("progress", bool, True, doc="show a progress bar")))
def adamerging(adapters: list[Adapter], context=None, steps: int = 500, lr: float = 1e-3, init: float = 0.3,
               granularity: str = "layer", count_cost: bool = True, progress: bool = True) -> MergeResult:
    r"""Layer-wise AdaMerging: learn :math:`\lambda_t^l` by entropy minimisation (AdaMerging Eqs. 5-6).

    ``context.entropy_objective(state) -> scalar`` must return the mean Shannon entropy of
    the model's two-label answer distribution on (a batch of) unlabeled test prompts when the
    model carries the LoRA ``state`` (see :func:`esmerge.methods.objectives.label_entropy_objective`).

    Parameters
    ----------
    steps : int
        Adam steps; 500 as in the original.
    lr : float
        Adam learning rate, 1e-3 as in the original.
    init : float
        Initial value of every coefficient; the original's prior 0.3.
    granularity : ``"layer"`` | ``"tensor"``
        One coefficient per transformer block per adapter (the paper: "a merging coefficient
        for each layer of every task vector"), or per LoRA tensor as in the original code.

    Choices where the papers are silent: coefficients are clipped to [0, 1] after each step
    (as the original code does); the merged A's and B's both use the layer's coefficient, so
    the layer's update :math:`BA` scales quadratically, as Eq. 1 implies for LoRA.
    Cost: wall time and the FLOPs of all forward/backward passes (FlopCounterMode).
    """
    objective = from_context(context, "entropy_objective", "adamerging")
    start = time.perf_counter()
    keys = sorted(adapters[0].state)
    group_of_key, labels = coefficient_groups(keys, granularity)
    groups = dict(zip(keys, group_of_key))
    stacked = {k: torch.stack([a.state[k].float() for a in adapters]) for k in keys}
    coefficients = torch.full((len(adapters), len(labels)), float(init), requires_grad=True)
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

    _, flops = count_flops(train, enabled=count_cost)
    with torch.no_grad():
        final_entropy = float(objective(layerwise_sum(stacked, coefficients, groups)))
        state = {k: v.detach().clone() for k, v in layerwise_sum(stacked, coefficients, groups).items()}
    names = task_names(adapters)
    info = {
        "hparams": {"steps": steps, "lr": lr, "init": init, "granularity": granularity},
        "coefficients": {n: dict(zip(labels, coefficients[i].tolist())) for i, n in enumerate(names)},
        "entropy": {"first_step": history[0] if history else None, "final": final_entropy, "history": history},
        "cost": {"wall_seconds": time.perf_counter() - start, "flops": flops},
    }
    return MergeResult(with_state(adapters[0], state, "adamerging"), info)
