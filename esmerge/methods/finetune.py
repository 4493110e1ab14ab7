"""Avg. Merging + task-specific fine-tuning (paper App. A.2, "Average Merging + Task-Specific Finetune").

Average the specialists' LoRA tensors, then fine-tune the averaged LoRA on one benchmark's
training examples. One call = one benchmark: the caller (notebook, evaluation) passes that
benchmark's batches and loss through the context and runs it once per benchmark.
"""
from __future__ import annotations

import time

import torch

from esmerge.errors import LR_MAX
from esmerge.methods import HParam, MergeResult, register
from esmerge.methods.es_signals import peak_memory
from esmerge.methods.objectives import count_flops, from_context
from esmerge.progress import track
from esmerge.specialists.adapters import Adapter, with_state

# Paper App. A.2: 2,000 sampled training examples, 10 epochs, batch size 16.
PAPER_EXAMPLES, PAPER_EPOCHS, PAPER_BATCH = 2000, 10, 16


def finetune_state(state: dict[str, torch.Tensor], loss_fn, batches, epochs: int, lr: float,
                   max_steps: int | None = None, progress: bool = True) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Fine-tune LoRA tensors with Adam over several passes of the training batches.

    The second half of the Avg. Merging + FT baseline (paper App. A.2). The tensors are trained
    in float32 on copies; ``state`` itself is not changed.

    Parameters
    ----------
    state : dict of str to Tensor
        LoRA key -> tensor (any shapes).
    loss_fn : callable
        ``loss_fn(state, batch) -> scalar`` (e.g. :func:`esmerge.run.baseline_inputs.answer_nll_loss`).
    batches : iterable
        The training batches (at least one); read once into a list.
    epochs : int
        Passes over ``batches``.
    lr : float
        Adam learning rate.
    max_steps : int, optional
        Cap on optimiser steps.
    progress : bool
        Show a progress bar.

    Returns
    -------
    state : dict of str to Tensor
        The trained tensors (detached), same keys and shapes.
    losses : list of float
        The loss at each step.

    Examples
    --------
    Adam's first step moves a parameter by about ``lr`` against the gradient's sign:

    >>> loss = lambda state, target: ((state["w"] - target) ** 2).sum()
    >>> state, losses = finetune_state({"w": torch.tensor([0.])}, loss, [torch.tensor([1.])], epochs=1, lr=0.1,
    ...                                progress=False)
    >>> state["w"], losses  # the loss before the step: (0 - 1)^2
    (tensor([0.1000]), [1.0])
    >>> len(finetune_state({"w": torch.tensor([0.])}, loss, [torch.tensor([1.])], epochs=5, lr=0.1, max_steps=3,
    ...                    progress=False)[1])
    3
    """
    params = {k: v.detach().clone().float().requires_grad_(True) for k, v in state.items()}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    batches = list(batches)
    if not batches:
        raise ValueError("avg-ft needs at least one training batch")
    losses: list[float] = []
    total = epochs * len(batches) if max_steps is None else min(max_steps, epochs * len(batches))
    bar = track(total=total, desc="avg-ft", unit="step", disable=not progress)
    for _ in range(epochs):
        for batch in batches:
            if len(losses) >= total:
                break
            loss = loss_fn(params, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            bar.update()
    bar.close()
    return {k: v.detach().clone() for k, v in params.items()}, losses


@register("avg-ft", "Avg. Merging + FT", "ES-Merging paper, App. A.2", needs_context=True,
          needs=("data", "labels"), hparams=(
    HParam("epochs", int, low=1, doc="passes over the training batches"),
    HParam("lr", float, low=0.0, high=LR_MAX, low_open=True, doc="Adam learning rate"),
    HParam("max_steps", int, low=1, nullable=True, doc="cap on optimiser steps; null: none"),
    HParam("count_cost", bool, doc="count FLOPs (FlopCounterMode)"),
    HParam("progress", bool, doc="show a progress bar")))
def avg_finetune(adapters: list[Adapter], context=None, epochs: int = PAPER_EPOCHS, lr: float = 1e-4,
                 max_steps: int | None = None, count_cost: bool = True, progress: bool = True) -> MergeResult:
    r"""Average the adapters (Eq. 1, :math:`\lambda = 1/K`), then fine-tune the LoRA on one benchmark.

    A baseline of the paper (App. A.2, "Average Merging + Task-Specific Finetune").

    Parameters
    ----------
    adapters : list of Adapter
        The K specialists.
    context : MergeContext or dict
        ``train_loss(state, batch) -> scalar`` and ``train_batches`` (a re-iterable of batches;
        the paper samples 2,000 training examples in batches of 16). Optional ``benchmark`` (a
        name recorded in ``info``).
    epochs : int
        Passes over ``train_batches`` (paper: 10).
    lr : float
        Adam learning rate. The paper does not state it; 1e-4 is the usual LoRA rate.
    max_steps : int, optional
        Cap on optimiser steps (for the small scales).
    count_cost : bool
        Count FLOPs (FlopCounterMode).
    progress : bool
        Show a progress bar.

    Returns
    -------
    MergeResult
        The fine-tuned adapter; ``info`` holds the hyper-parameters, the benchmark, the loss
        history and the cost (``wall_seconds``, ``flops``, ``peak_memory_mib``, ``peak_memory_kind``).

    Notes
    -----
    Choices where the paper is silent: Adam without weight decay or schedule; LoRA
    dropout 0 (shared LoRA config); only A and B are trained, the modality projectors are not.

    Examples
    --------
    The mean of [1, 3] and [3, 5] is [2, 4]; one Adam step of lr 0.5 on the squared norm moves
    each entry down by 0.5:

    >>> from esmerge.specialists.adapters import Adapter
    >>> key = "layers.0.self_attn.q_proj.lora_A.weight"
    >>> a = Adapter({key: torch.tensor([[1., 3.]])}, {}, "molecule")
    >>> b = Adapter({key: torch.tensor([[3., 5.]])}, {}, "protein")
    >>> context = {"train_loss": lambda state, batch: sum((v ** 2).sum() for v in state.values()),
    ...            "train_batches": [None]}
    >>> result = avg_finetune([a, b], context, epochs=1, lr=0.5, count_cost=False, progress=False)
    >>> result.adapter.state[key], result.info["loss"]["first"]  # 2^2 + 4^2 = 20
    (tensor([[1.5000, 3.5000]]), 20.0)
    """
    loss_fn = from_context(context, "train_loss", "avg-ft")
    batches = from_context(context, "train_batches", "avg-ft")
    benchmark = context.get("benchmark") if isinstance(context, dict) else getattr(context, "benchmark", None)
    start = time.perf_counter()
    keys = sorted(adapters[0].state)
    average = {k: torch.stack([a.state[k].float() for a in adapters]).mean(dim=0) for k in keys}
    with peak_memory() as memory:  # beside the FLOPs, for Table 4 (esmerge.report.cost)
        (state, losses), flops = count_flops(
            lambda: finetune_state(average, loss_fn, batches, epochs, lr, max_steps, progress), enabled=count_cost
        )
    info = {
        "hparams": {"epochs": epochs, "lr": lr, "max_steps": max_steps, "n_batches": len(list(batches))},
        "benchmark": benchmark,
        "loss": {"first": losses[0], "last": losses[-1], "history": losses},
        "cost": {"wall_seconds": time.perf_counter() - start, "flops": flops, **memory},
    }
    return MergeResult(with_state(adapters[0], state, "avg-ft"), info)
