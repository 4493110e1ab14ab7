"""What the training baselines optimise, independent of data: a model run with a given LoRA state.

AdaMerging and Avg+FT need gradients of a model loss with respect to merged LoRA tensors
(or to the coefficients that produce them). :func:`lora_state_swapped` makes a ``PeftModel``'s
LoRA parameters *be* the tensors of a state dict for the duration of a block, so the graph
runs from the loss back to whatever built the state. The objectives over real prompts
(:func:`esmerge.run.baseline_inputs.label_entropy_objective`, ``answer_nll_loss``) are built on it;
this module knows no prompts, labels or files.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable

import torch

from esmerge.errors import UsageError
from esmerge.specialists.adapters import LoraState


def lora_param_name(key: str, adapter_name: str = "default") -> str:
    """The live ``PeftModel`` parameter name of a PEFT state-dict key.

    ``...q_proj.lora_A.weight`` -> ``...q_proj.lora_A.default.weight``.

    Parameters
    ----------
    key : str
        A LoRA A or B key as PEFT saves it.
    adapter_name : str
        The adapter's name in the live model.

    Returns
    -------
    str
        The parameter name.

    Raises
    ------
    ValueError
        If ``key`` is no LoRA A/B key.

    Examples
    --------
    >>> lora_param_name("model.layers.0.self_attn.q_proj.lora_A.weight")
    'model.layers.0.self_attn.q_proj.lora_A.default.weight'
    >>> lora_param_name("model.layers.0.self_attn.q_proj.lora_B.weight", "cell")
    'model.layers.0.self_attn.q_proj.lora_B.cell.weight'
    """
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            return key.replace(part, f"{part}{adapter_name}.")
    raise ValueError(f"not a LoRA A/B key: {key!r}")


@contextmanager
def lora_state_swapped(peft_model: torch.nn.Module, state: LoraState, adapter_name: str = "default"):
    """Context manager in which a PEFT model's LoRA weights *are* the tensors of a state dict (no copy).

    Works however the code inside calls the model (embeddings, spliced modality tokens, several
    calls). Gradients flow into ``state``'s tensors, so AdaMerging and Avg+FT can differentiate a
    model loss with respect to a merged LoRA (Eq. 1) or to what built it. The original
    parameters are put back on exit, also after an exception.

    Parameters
    ----------
    peft_model : peft.PeftModel
        The model.
    state : dict of str to Tensor
        PEFT LoRA key -> tensor of that parameter's shape (A ``[r, d_in]``, B ``[d_out, r]``).
    adapter_name : str
        The adapter whose weights are replaced.

    Yields
    ------
    peft.PeftModel
        ``peft_model`` itself.

    Raises
    ------
    KeyError
        If a key names no LoRA parameter of the model.

    Examples
    --------
    With A = B = ones and lora_alpha = r = 1, the LoRA adds B A x = [2, 2] to x = [1, 1]'s output:

    >>> from collections import OrderedDict
    >>> from peft import LoraConfig, get_peft_model
    >>> net = torch.nn.Sequential(OrderedDict(q_proj=torch.nn.Linear(2, 2)))
    >>> net = get_peft_model(net, LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"]))
    >>> x, a = torch.ones(1, 2), torch.ones(1, 2, requires_grad=True)
    >>> state = {"base_model.model.q_proj.lora_A.weight": a, "base_model.model.q_proj.lora_B.weight": torch.ones(2, 1)}
    >>> before = net(x)
    >>> with lora_state_swapped(net, state):
    ...     inside = net(x)
    >>> torch.allclose(inside - before, torch.tensor([[2., 2.]]))
    True
    >>> inside.sum().backward(); a.grad  # d(sum B A x)/dA = (B^T 1) x^T
    tensor([[2., 2.]])
    >>> torch.equal(net(x), before)  # the model's own (zero) B is back
    True
    """
    modules = dict(peft_model.named_modules())
    swapped = []
    try:
        for key, value in state.items():
            module_name, _, attr = lora_param_name(key, adapter_name).rpartition(".")
            module = modules.get(module_name)
            if module is None or attr not in module._parameters:
                raise KeyError(f"{key}: no LoRA parameter {module_name}.{attr} in the model "
                               "(different targets/base?)")
            param = module._parameters.pop(attr)
            swapped.append((module, attr, param))
            # a plain attribute now, read by the module's forward; on the model's device (a CPU state
            # on a GPU model: the copy is differentiable, so gradients still reach ``state``'s tensors)
            setattr(module, attr, value.to(param.device))
        yield peft_model
    finally:
        for module, attr, param in reversed(swapped):
            delattr(module, attr)
            module._parameters[attr] = param


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    r"""Mean Shannon entropy of the softmax of ``logits`` (AdaMerging's objective).

    :math:`H = -\frac1N \sum_n \sum_c p_{nc} \log p_{nc}`: AdaMerging's surrogate objective (Yang
    et al. 2023, Eq. 5) with ``C`` answer labels. Computed in float32.

    Parameters
    ----------
    logits : Tensor, shape ``[N, C]``
        Answer logits of N prompts.

    Returns
    -------
    Tensor, shape ``[]``
        H, in nats.

    Examples
    --------
    >>> round(float(mean_entropy(torch.zeros(3, 2))), 4)  # uniform over 2 labels: log 2
    0.6931
    >>> abs(float(mean_entropy(torch.tensor([[0., -1000.]]))))  # a sure answer
    0.0
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


def from_context(context: Any, name: str, method: str):
    """An attribute (or, for a dict, a key) of a merge context that a method needs.

    Parameters
    ----------
    context : object or dict
        The merge context.
    name : str
        What to read.
    method : str
        The method that needs it, for the message.

    Returns
    -------
    object
        The value.

    Raises
    ------
    UsageError
        If it is missing or ``None``.

    Examples
    --------
    >>> from_context({"train_batches": [1, 2]}, "train_batches", "avg-ft")
    [1, 2]
    >>> from_context({}, "train_loss", "avg-ft")
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: merge method 'avg-ft' needs `train_loss` in its context
    """
    value = context.get(name) if isinstance(context, dict) else getattr(context, name, None)
    if value is None:
        raise UsageError(f"merge method {method!r} needs `{name}` in its context")
    return value


def count_flops(fn: Callable[[], Any], enabled: bool = True) -> tuple[Any, int | None]:
    """Run ``fn()`` and count its FLOPs with :class:`torch.utils.flop_counter.FlopCounterMode`.

    Parameters
    ----------
    fn : callable
        Takes no argument.
    enabled : bool
        Count; if false, FLOPs are ``None``.

    Returns
    -------
    result : object
        What ``fn()`` returned.
    flops : int or None
        The FLOPs counted.

    Examples
    --------
    A [2, 3] x [3, 4] matrix product takes 2 * 2 * 3 * 4 = 48 FLOPs:

    >>> product, flops = count_flops(lambda: torch.ones(2, 3) @ torch.ones(3, 4))
    >>> product.shape, flops
    (torch.Size([2, 4]), 48)
    >>> count_flops(lambda: "done", enabled=False)
    ('done', None)
    """
    if not enabled:
        return fn(), None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())
