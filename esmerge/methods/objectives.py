"""Running a model with a given LoRA state differentiably, for the methods that train.

AdaMerging and Avg+FT need gradients of a model loss with respect to merged LoRA tensors
(or to the coefficients that produce them). Instead of copying tensors into a ``PeftModel``
we call it with :func:`torch.func.functional_call`, substituting the LoRA parameters by the
tensors of a state dict, so the graph runs from the loss back to whatever built the state.

The data-facing parts (which prompts, which labels) are injected as callables; this module
only knows "a batch of token ids" and "the ids of the two label tokens".
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Any, Callable, Iterable

import torch

from esmerge.adapters import LoraState


def lora_param_name(key: str, adapter_name: str = "default") -> str:
    """PEFT state-dict key -> the live ``PeftModel`` parameter name.

    ``...q_proj.lora_A.weight`` -> ``...q_proj.lora_A.default.weight``.
    """
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            return key.replace(part, f"{part}{adapter_name}.")
    raise ValueError(f"not a LoRA A/B key: {key!r}")


def lora_forward(peft_model: torch.nn.Module, state: LoraState, **inputs) -> Any:
    """``peft_model(**inputs)`` with its LoRA weights replaced by ``state`` (differentiably)."""
    params = {lora_param_name(k): v for k, v in state.items()}
    missing = [n for n in list(params)[:3] if n not in dict(peft_model.named_parameters())]
    if missing:
        raise KeyError(f"LoRA tensors not in the model (different targets/base?): {missing}")
    return torch.func.functional_call(peft_model, params, args=(), kwargs=inputs, strict=False)


@contextmanager
def lora_state_swapped(peft_model: torch.nn.Module, state: LoraState, adapter_name: str = "default"):
    """Inside the block, ``peft_model``'s LoRA weights *are* the tensors of ``state`` (no copy).

    For code that calls the model in several ways (embeddings, cached decoding), where
    :func:`lora_forward` cannot wrap a single call. Gradients flow into ``state``'s tensors.
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


def last_token_label_logits(outputs_logits: torch.Tensor, attention_mask: torch.Tensor,
                            label_ids: list[int]) -> torch.Tensor:
    """Next-token logits of the label tokens after each prompt's last real token.

    outputs_logits : Tensor, shape (B, L, V); attention_mask : Tensor, shape (B, L) (right
    or left padding); label_ids : the first token id of each label. Returns ``(B, len(label_ids))``.
    """
    last = attention_mask.long().cumsum(dim=1).argmax(dim=1)  # index of the last 1 in each row
    rows = outputs_logits[torch.arange(outputs_logits.shape[0]), last]
    return rows[:, label_ids]


def entropy_objective(peft_model: torch.nn.Module, batches: Iterable[dict], label_ids: list[int]
                      ) -> Callable[[LoraState], torch.Tensor]:
    """An AdaMerging objective: ``state -> mean entropy over the label tokens`` of the next batch.

    ``batches``: tokenised prompts ``{"input_ids": [B, L], "attention_mask": [B, L]}``, cycled
    forever (test-time adaptation re-visits the unlabeled test prompts).
    """
    stream = itertools.cycle(list(batches))

    def objective(state: LoraState) -> torch.Tensor:
        batch = next(stream)
        out = lora_forward(peft_model, state, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return mean_entropy(last_token_label_logits(out.logits, batch["attention_mask"], label_ids))

    return objective


def causal_lm_loss(peft_model: torch.nn.Module) -> Callable[[LoraState, dict], torch.Tensor]:
    """``(state, batch) -> next-token cross-entropy`` for batches with ``input_ids``, ``attention_mask``, ``labels``.

    ``labels`` use -100 for positions not trained on (the prompt), as transformers expects.
    """

    def loss(state: LoraState, batch: dict) -> torch.Tensor:
        return lora_forward(peft_model, state, **batch).loss

    return loss


def from_context(context: Any, name: str, method: str):
    """Attribute or key ``name`` of ``context``, or an error saying which method needs it."""
    value = context.get(name) if isinstance(context, dict) else getattr(context, name, None)
    if value is None:
        raise ValueError(f"merge method {method!r} needs `{name}` in its context")
    return value


def count_flops(fn: Callable[[], Any], enabled: bool = True) -> tuple[Any, int | None]:
    """Run ``fn()`` under :class:`torch.utils.flop_counter.FlopCounterMode`; return (result, FLOPs)."""
    if not enabled:
        return fn(), None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())
