"""Where the signals are read inside a model: its decoder blocks, their outputs, its LoRA linears.

Forward hooks and module lookups over a (PEFT-wrapped) LLaMA-style causal LM, shared by the probe
(§4.1: block outputs), the element scores (§4.3: LoRA linears' inputs and output gradients) and
Graft's compatibility score (any module's outputs). Nothing here computes a coefficient.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable

import torch


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a (PEFT-wrapped) LLaMA-style causal LM.

    The first submodule with a non-empty ``layers`` ``ModuleList`` holds them; the layer-wise
    signals (§4.2, §4.3) are read at their outputs.

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    torch.nn.ModuleList
        Its L decoder layers.

    Raises
    ------
    ValueError
        If no module has such a list.

    Examples
    --------
    >>> net = torch.nn.Module(); net.layers = torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.Tanh()])
    >>> decoder_layers(net) is net.layers
    True
    """
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError("could not find the decoder layers of the model")


@contextmanager
def block_outputs(model: torch.nn.Module, detach_inputs: bool = False):
    r"""Record every decoder layer's output during a forward; optionally detach every layer's input.

    The outputs are the layer-wise states of §4.1, read before the model's final norm. With
    ``detach_inputs``, layer l's output depends on layer l's own parameters only, which lets one
    backward give :math:`\partial r^l/\partial\theta^l` for every layer (§4.3, ``gradients``).

    Parameters
    ----------
    model : torch.nn.Module
        A model with decoder layers (``decoder_layers``).
    detach_inputs : bool
        Detach each layer's input (its values are unchanged).

    Yields
    ------
    list of Tensor, shape ``[B, T, d]``
        Filled by the forward with each block's output, in layer order.

    Examples
    --------
    >>> net = torch.nn.Module(); net.layers = torch.nn.ModuleList([torch.nn.ReLU(), torch.nn.Tanh()])
    >>> x = torch.tensor([[[-1.0, 2.0]]], requires_grad=True)
    >>> def forward(h):
    ...     for layer in net.layers:
    ...         h = layer(h)
    >>> with block_outputs(net) as outputs:
    ...     forward(x)
    >>> [[round(v, 4) for v in o.flatten().tolist()] for o in outputs]  # relu(-1, 2), then tanh
    [[0.0, 2.0], [0.0, 0.964]]
    >>> outputs[1].requires_grad
    True
    >>> with block_outputs(net, detach_inputs=True) as outputs:
    ...     forward(x)
    >>> outputs[1].requires_grad  # layer 2 no longer sees x through layer 1
    False
    """
    outputs: list[torch.Tensor] = []
    handles = []

    def detach_input(module, args, kwargs):
        if args:
            return (args[0].detach(),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].detach()
        return args, kwargs

    def record_output(module, args, output):
        outputs.append(output[0] if isinstance(output, tuple) else output)

    for layer in decoder_layers(model):
        if detach_inputs:
            handles.append(layer.register_forward_pre_hook(detach_input, with_kwargs=True))
        handles.append(layer.register_forward_hook(record_output))
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


_LORA_MODULE = re.compile(r"\.(lora_[AB])\.([^.]+)$")


def lora_linears(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.nn.Linear]:
    """The LoRA A and B linears of one adapter, keyed like PEFT's saved state dict.

    The keys drop the adapter name (``...q_proj.lora_A.default`` -> ``...q_proj.lora_A.weight``).
    Only one adapter's modules are returned: a PEFT model holding several adapters has one linear
    per adapter under the same key, and the element scores (§4.3) must be taken with respect to
    the active one.

    Parameters
    ----------
    model : torch.nn.Module
        A PEFT model.
    adapter_name : str, optional
        The adapter; default: the model's active adapter.

    Returns
    -------
    dict of str to torch.nn.Linear
        LoRA key -> linear; A has weight ``[r, d_in]``, B has ``[d_out, r]``.

    Raises
    ------
    ValueError
        If the model has no LoRA linear for that adapter, or two share a key.

    Examples
    --------
    >>> from collections import OrderedDict
    >>> from peft import LoraConfig, get_peft_model
    >>> net = torch.nn.Sequential(OrderedDict(q_proj=torch.nn.Linear(3, 2)))
    >>> peft_model = get_peft_model(net, LoraConfig(r=1, target_modules=["q_proj"]))
    >>> {key: tuple(linear.weight.shape) for key, linear in lora_linears(peft_model).items()}
    {'base_model.model.q_proj.lora_A.weight': (1, 3), 'base_model.model.q_proj.lora_B.weight': (2, 1)}
    """
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active[0] if isinstance(active, (list, tuple)) else active
    linears = {}
    for name, module in model.named_modules():
        match = _LORA_MODULE.search(name)
        if match is None or not isinstance(module, torch.nn.Linear):
            continue
        if adapter_name is not None and match.group(2) != adapter_name:
            continue
        # "...q_proj.lora_A.molecule" -> "...q_proj.lora_A.weight"
        key = name[:match.start()] + f".{match.group(1)}.weight"
        if key in linears:
            raise ValueError(f"several adapters own {key}; name the one to score (adapter_name)")
        linears[key] = module
    if not linears:
        raise ValueError(f"model has no LoRA parameters for adapter {adapter_name!r}; "
                         "attach the specialist's adapter first")
    return linears


def lora_parameters(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.nn.Parameter]:
    r"""The LoRA A and B weights of one adapter: the :math:`\theta^{l,n}_j` that §4.3 scores.

    Parameters
    ----------
    model : torch.nn.Module
        A PEFT model.
    adapter_name : str, optional
        The adapter; default: the model's active adapter (see ``lora_linears``).

    Returns
    -------
    dict of str to torch.nn.Parameter, shape ``[out, in]``
        LoRA key -> weight.

    Examples
    --------
    >>> from collections import OrderedDict
    >>> from peft import LoraConfig, get_peft_model
    >>> net = torch.nn.Sequential(OrderedDict(q_proj=torch.nn.Linear(3, 2)))
    >>> params = lora_parameters(get_peft_model(net, LoraConfig(r=1, target_modules=["q_proj"])))
    >>> params["base_model.model.q_proj.lora_B.weight"].tolist()  # PEFT starts B at 0
    [[0.0], [0.0]]
    """
    return {key: linear.weight for key, linear in lora_linears(model, adapter_name).items()}


@contextmanager
def linear_inputs_outputs(linears: dict[str, torch.nn.Linear]):
    """Record each linear's input and output during one forward.

    The per-sample gradients of §4.3 are built from them (``gradients.per_sample_weight_gradients``).
    A linear called more than once (a LoRA variant, a second forward) would make those gradients
    wrong, so it is refused with a ``RuntimeError``.

    Parameters
    ----------
    linears : dict of str to torch.nn.Linear
        Key -> linear (``lora_linears``).

    Yields
    ------
    dict of str to tuple of Tensor
        ``{key: (input [B, T, in], output [B, T, out])}``, filled by the forward.

    Examples
    --------
    >>> linear = torch.nn.Linear(2, 1, bias=False)
    >>> _ = torch.nn.init.ones_(linear.weight)
    >>> with linear_inputs_outputs({"sum": linear}) as seen:
    ...     _ = linear(torch.tensor([[[1., 2.]]]))
    >>> [t.tolist() for t in seen["sum"]]  # 1 + 2 = 3
    [[[[1.0, 2.0]]], [[[3.0]]]]
    """
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []

    def recorder(key):
        def record(module, args, output):
            if key in seen:
                raise RuntimeError(f"{key} ran twice in one forward; per-sample gradients need one call")
            seen[key] = (args[0], output)
        return record

    for key, linear in linears.items():
        handles.append(linear.register_forward_hook(recorder(key)))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm a (PEFT-wrapped) LLaMA-style model applies after its last block (``model.model.norm``).

    The official code reads the last layer after it (``es`` setting ``final_norm``).

    Parameters
    ----------
    model : torch.nn.Module
        The model.

    Returns
    -------
    torch.nn.Module
        The ``norm`` of the first submodule that has both ``layers`` and ``norm``.

    Raises
    ------
    ValueError
        If there is none.

    Examples
    --------
    >>> net = torch.nn.Module(); net.layers = torch.nn.ModuleList([torch.nn.ReLU()])
    >>> net.norm = torch.nn.LayerNorm(2)
    >>> final_norm(net) is net.norm
    True
    """
    for module in model.modules():
        layers, norm = getattr(module, "layers", None), getattr(module, "norm", None)
        if isinstance(layers, torch.nn.ModuleList) and isinstance(norm, torch.nn.Module):
            return norm
    raise ValueError("could not find the final norm of the model")


def module_outputs(model, run: Callable[[], object], module_filter: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Outputs of the modules whose name passes a filter, from the first forward pass of ``run()``.

    Graft's compatibility score (Graft Eqs. 9-14) reads these; the hooks are removed afterwards.

    Parameters
    ----------
    model : torch.nn.Module
        The model to watch.
    run : callable
        Runs the model (its return value is ignored).
    module_filter : callable
        ``module_filter(name) -> bool`` on ``named_modules()`` names.

    Returns
    -------
    dict of str to Tensor, shape ``[B, T, d]``
        Module name -> its first output, detached, float32.

    Examples
    --------
    >>> net = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Tanh())
    >>> module_outputs(net, lambda: net(torch.tensor([[-1., 2.]])), lambda name: name == "0")
    {'0': tensor([[0., 2.]])}
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if module_filter(name):
            def hook(_mod, _inp, out, name=name):
                if name not in captured:
                    captured[name] = (out[0] if isinstance(out, tuple) else out).detach().float()
            handles.append(module.register_forward_hook(hook))
    if not handles:
        raise ValueError("module_filter matched no module of the model")
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return captured
