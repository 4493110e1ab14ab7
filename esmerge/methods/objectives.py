"""What the training baselines optimise, independent of data: a model run with a given LoRA state.

AdaMerging and Avg+FT need gradients of a model loss with respect to merged LoRA tensors
(or to the coefficients that produce them). :func:`lora_state_swapped` makes a ``PeftModel``'s
LoRA parameters *be* the tensors of a state dict for the duration of a block, so the graph
runs from the loss back to whatever built the state. The objectives over real prompts
(:func:`esmerge.methods.contexts.label_entropy_objective`, ``answer_nll_loss``) are built on it;
this module knows no prompts, labels or files.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch

from esmerge.adapters import LoraState
from esmerge.errors import UsageError


def lora_param_name(key: str, adapter_name: str = "default") -> str:
    """PEFT state-dict key -> the live ``PeftModel`` parameter name.

    ``...q_proj.lora_A.weight`` -> ``...q_proj.lora_A.default.weight``.
    """
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            return key.replace(part, f"{part}{adapter_name}.")
    raise ValueError(f"not a LoRA A/B key: {key!r}")


@contextmanager
def lora_state_swapped(peft_model: torch.nn.Module, state: LoraState, adapter_name: str = "default"):
    """Inside the block, ``peft_model``'s LoRA weights *are* the tensors of ``state`` (no copy).

    Works however the code inside calls the model (embeddings, spliced modality tokens, several
    calls). Gradients flow into ``state``'s tensors.
    The original parameters are put back on exit, also after an exception.
    """
    modules = dict(peft_model.named_modules())
    swapped = []
    try:
        for key, value in state.items():
            module_name, _, attr = lora_param_name(key, adapter_name).rpartition(".")
            module = modules.get(module_name)
            if module is None or attr not in module._parameters:
                raise KeyError(f"{key}: no LoRA parameter {module_name}.{attr} in the model (different targets/base?)")
            swapped.append((module, attr, module._parameters.pop(attr)))
            setattr(module, attr, value)  # a plain attribute now, read by the module's forward
        yield peft_model
    finally:
        for module, attr, param in reversed(swapped):
            delattr(module, attr)
            module._parameters[attr] = param


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Mean Shannon entropy of the softmax of ``logits``.

    :math:`H = -\frac1N \sum_n \sum_c p_{nc} \log p_{nc}`, ``logits``: ``[N, C]`` -> scalar.
    AdaMerging's surrogate objective (Yang et al. 2023, Eq. 5) with ``C`` answer labels.

    >>> round(float(mean_entropy(torch.zeros(3, 2))), 4)  # uniform over 2 labels: log 2
    0.6931
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def from_context(context: Any, name: str, method: str):
    """Attribute or key ``name`` of ``context``, or an error saying which method needs it."""
    value = context.get(name) if isinstance(context, dict) else getattr(context, name, None)
    if value is None:
        raise UsageError(f"merge method {method!r} needs `{name}` in its context")
    return value


def count_flops(fn: Callable[[], Any], enabled: bool = True) -> tuple[Any, int | None]:
    """Run ``fn()`` under :class:`torch.utils.flop_counter.FlopCounterMode`; return (result, FLOPs)."""
    if not enabled:
        return fn(), None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())
