r"""Element scores of one specialist from per-sample gradients of fine embedding signals (paper §4.3).

For specialist :math:`\theta_j`, input modality :math:`m_i`, probe sample :math:`k`, layer
:math:`l` and LoRA element :math:`n` of that layer, with :math:`r^{l,(k)}_{i\to j}` the token
distance of ``esmerge.elementwise``:

.. math::

    s^{l,n}_j = \sum_i \sum_k \Big|\frac{\partial r^{l,(k)}_{i\to j}}{\partial\theta^{l,n}_j}\Big|.

This is the side that needs a model (forward hooks, autograd); ``esmerge.elementwise`` turns the
scores into coefficients (Eq. 3) with pure functions. Two details the paper leaves implicit, and
how this module settles them:

* The absolute value is taken per probe sample and per modality, so every (k, i) needs its own
  gradient. They come from batched passes: one forward of a batch of probes and one backward
  per modality. The backward of :math:`\sum_k r^{(k)}` gives, at every LoRA linear, the gradient
  of its output; since no operation mixes samples (all probes share one length, no padding), the
  part of that gradient in sample k is exactly sample k's, and the per-sample weight gradient is
  the outer product of that sample's output gradient and input, summed over its tokens
  (``per_sample_weight_gradients``), as per-sample-gradient libraries (Opacus) form it.
* :math:`r^l` is differentiated only through layer l's own LoRA parameters. Every decoder
  layer's input is detached during the specialist's forward, so layer l's output depends on
  :math:`\theta^l` alone; the *values* are unchanged (the detached input equals the true one).
  Then one backward of :math:`\sum_l r^l` yields :math:`\partial r^l/\partial\theta^l` for every
  layer at once.
"""
from __future__ import annotations

import re
from contextlib import contextmanager

import torch

from esmerge.adapters import layer_of
from esmerge.elementwise import DISTANCES, batch_token_distance
from esmerge.progress import track

# Probe samples per batched pass: the autograd graph of one SmolLM2 probe (~70 tokens) holds
# about 0.1 GB, so 16 keep a pass near 2 GB while the matmuls are already large enough.
BATCH_SIZE = 16


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a (PEFT-wrapped) LLaMA-style causal LM."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError("could not find the decoder layers of the model")


@contextmanager
def block_outputs(model: torch.nn.Module, detach_inputs: bool = False):
    """Record every decoder layer's output; with ``detach_inputs``, also detach every layer's input.

    Yields a list that the forward fills with each block's output ``[B, T, d]`` (in layer order),
    read before the model's final norm.
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
    """LoRA A/B linears of one adapter, keyed like PEFT's saved state dict (adapter name removed).

    ``adapter_name`` defaults to the model's active adapter. Only that adapter's modules are
    returned: a PEFT model holding several adapters has one linear per adapter under the same
    key, and the gradients must be taken with respect to the active one.
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
        raise ValueError(f"model has no LoRA parameters for adapter {adapter_name!r}; attach the specialist's adapter first")
    return linears


def lora_parameters(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.nn.Parameter]:
    """LoRA A/B weights of one adapter (see ``lora_linears``), key -> parameter ``[out, in]``."""
    return {key: linear.weight for key, linear in lora_linears(model, adapter_name).items()}


@contextmanager
def linear_inputs_outputs(linears: dict[str, torch.nn.Linear]):
    """Record each linear's input ``[B, T, in]`` and output ``[B, T, out]`` during one forward.

    Yields ``{key: (input, output)}``, filled by the forward. A linear called more than once
    (a LoRA variant, a second forward) would make the per-sample gradients wrong, so it is refused.
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


def per_sample_weight_gradients(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    r"""Per-sample gradient of a bias-free linear's weight, :math:`G_b = \sum_t g_{b,t}\,x_{b,t}^\top`.

    For :math:`y = x W^\top` and a loss :math:`\sum_b L_b` with :math:`L_b` depending on sample
    b only, :math:`\partial L_b/\partial W = G_b`.

    Args:
        inputs: ``[B, T, in]`` the linear's inputs :math:`x`.
        output_grads: ``[B, T, out]`` the loss's gradient w.r.t. the linear's outputs :math:`g`.

    Returns:
        ``[B, out, in]``, in float32 or wider (float64 inputs stay float64).

    >>> x = torch.randn(2, 3, 4); w = torch.randn(5, 4, requires_grad=True)
    >>> y = x @ w.T
    >>> g = torch.autograd.grad(y[1].pow(2).sum(), y)[0]  # sample 1's loss only
    >>> torch.allclose(per_sample_weight_gradients(x, g)[1], torch.autograd.grad(y[1].pow(2).sum(), w)[0])
    True
    """
    dtype = torch.promote_types(torch.promote_types(output_grads.dtype, inputs.dtype), torch.float32)
    return torch.einsum("bto,bti->boi", output_grads.to(dtype), inputs.to(dtype))


def final_norm(model: torch.nn.Module) -> torch.nn.Module:
    """The norm a (PEFT-wrapped) LLaMA-style model applies after its last block (``model.model.norm``)."""
    for module in model.modules():
        layers, norm = getattr(module, "layers", None), getattr(module, "norm", None)
        if isinstance(layers, torch.nn.ModuleList) and isinstance(norm, torch.nn.Module):
            return norm
    raise ValueError("could not find the final norm of the model")


def batch_distance_gradients(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distance: str = "frobenius",
    on_gradient=None,
    last_norm: torch.nn.Module | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    r"""Per-sample, per-modality gradients of :math:`\sum_l r^{l,(k)}` for a batch of probes (§4.3).

    One forward of the batch (every layer's input detached, so layer l's distance depends on
    :math:`\theta^l` only) and one backward per modality.

    Args:
        model: base LLM with the specialist's LoRA attached and active.
        probe_embeds: ``[B, T, d]`` input embeddings of B probe samples (one length, no padding).
        positions: modality -> token positions ``[T_m]`` of its block in every probe.
        base_tokens: modality -> base states of these samples ``[L, B, T_m, d]``.
        distance: ``"frobenius"`` (paper) or ``"mse"`` (official code).
        on_gradient: if given, ``on_gradient(modality, key, grads [B, *shape], distances [B, L])``
            is called for each LoRA tensor instead of storing the gradients (so a caller that
            only sums them never holds all B x n_params values at once).
        last_norm: if given (``final_norm(model)``), the last layer's states are read after it,
            as Hugging Face's ``hidden_states[-1]`` (official code); ``base_tokens``' last layer
            must then be normed too. Default: every layer is a block output, before the norm.

    Returns:
        (gradients, distances): ``gradients[modality][key]`` is ``[B, *shape of key]`` (float32 or wider),
        :math:`\partial r^{l(key),(k)}/\partial\theta` (layer-isolated), empty when
        ``on_gradient`` is given; ``distances[modality]`` is ``[B, L]``, the values :math:`r^{l,(k)}`.
    """
    linears = lora_linears(model)
    for linear in linears.values():
        linear.weight.requires_grad_(True)
    with block_outputs(model, detach_inputs=True) as outputs, linear_inputs_outputs(linears) as seen:
        model(inputs_embeds=probe_embeds, use_cache=False)
    missing = [k for k in linears if k not in seen]
    if missing:
        raise RuntimeError(f"LoRA linears not called in the forward (a LoRA variant?): {missing[:3]}")
    if last_norm is not None:
        outputs[-1] = last_norm(outputs[-1])
    keys = list(linears)
    captured_outputs = [seen[k][1] for k in keys]
    gradients, distances = {}, {}
    modalities = list(positions)
    for idx, modality in enumerate(modalities):
        pos = positions[modality]
        r = torch.stack([
            batch_token_distance(out[:, pos], base_tokens[modality][l].to(out.device, out.dtype), distance)
            for l, out in enumerate(outputs)
        ], dim=1)  # [B, L]
        output_grads = torch.autograd.grad(r.sum(), captured_outputs, retain_graph=idx < len(modalities) - 1,
                                           allow_unused=True)
        r = r.detach()
        per_key = {}
        for key, g in zip(keys, output_grads):
            weight = linears[key].weight
            if g is None:
                grads = torch.zeros(probe_embeds.shape[0], *weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                    device=weight.device)
            else:
                grads = per_sample_weight_gradients(seen[key][0].detach(), g)
            if on_gradient is None:
                per_key[key] = grads
            else:
                on_gradient(modality, key, grads, r)
        gradients[modality] = per_key
        distances[modality] = r
    return gradients, distances


def sample_distance_gradients(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distance: str = "frobenius",
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    r"""``batch_distance_gradients`` for ONE probe sample.

    Args:
        probe_embeds: ``[T, d]``; base_tokens: modality -> ``[L, T_m, d]``.

    Returns:
        (gradients, distances): ``gradients[modality][key]`` with the shape of LoRA tensor ``key``
        (float32 or wider); ``distances[modality]`` is ``[L]``.
    """
    grads, dists = batch_distance_gradients(model, probe_embeds.unsqueeze(0), positions,
                                            {m: t.unsqueeze(1) for m, t in base_tokens.items()}, distance)
    return ({m: {k: g[0] for k, g in per_key.items()} for m, per_key in grads.items()},
            {m: d[0] for m, d in dists.items()})


def element_scores(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distance: str = "frobenius",
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    grad_batch: int = 1,
    last_norm: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    r"""Element-wise importance :math:`s^{l,n}_j = \sum_i\sum_k |\partial r^{l,(k)}_{i\to j}/\partial\theta^{l,n}_j|` (§4.3).

    Args:
        model: base LLM with specialist j's LoRA attached and active (gradients are enabled on
            its LoRA parameters here; all other parameters are untouched).
        probe_embeds: ``[K, T, d]`` probe input embeddings.
        positions: modality -> ``[T_m]`` token positions of each modality block.
        base_tokens: modality -> base token-level states ``[L, K, T_m, d]``.
        distance: ``"frobenius"`` (paper) or ``"mse"`` (official code).
        batch_size: probe samples per batched pass (memory only; the scores do not depend on it).
        grad_batch: probes per absolute value: 1 (paper) takes it per probe; g > 1 takes it of the
            distance of each run of g consecutive probes' tokens together (official code: the MSE
            of a batch of 2), see ``esmerge.element_batches``.
        last_norm: read the last layer after this norm (see ``batch_distance_gradients``).

    Returns:
        LoRA key -> scores with that tensor's shape (float32, >= 0).
    """
    return element_scores_by_distance(model, probe_embeds, positions, base_tokens, (distance,), progress,
                                      batch_size, grad_batch, last_norm)[distance]


def element_scores_by_distance(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distances: tuple[str, ...] = DISTANCES,
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    grad_batch: int = 1,
    last_norm: torch.nn.Module | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    r"""``element_scores`` for several distances from one pass over the probes.

    With :math:`D` the token-state difference of ``T_m`` tokens of width ``d``,
    :math:`r_F = \lVert D\rVert_F` and :math:`r_{MSE} = r_F^2/(T_m d)`, so
    :math:`\partial r_{MSE}/\partial\theta = \frac{2 r_F}{T_m d}\,\partial r_F/\partial\theta`: one
    Frobenius gradient per (sample, modality) gives both scores.

    Returns:
        distance -> (LoRA key -> scores ``[*shape of key]``).
    """
    unknown = set(distances) - set(DISTANCES)
    if unknown:
        raise ValueError(f"unknown distance(s) {sorted(unknown)}; choose from {DISTANCES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if grad_batch != 1:
        from esmerge.element_batches import batch_mean_scores

        return batch_mean_scores(model, probe_embeds, positions, base_tokens, grad_batch, distances, progress,
                                 batch_size, last_norm)
    params = lora_parameters(model)
    layer = {key: layer_of(key) for key in params}
    scores = {dist: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()} for dist in distances}
    width = probe_embeds.shape[-1]

    def accumulate(modality, key, grads, frob):
        magnitude = grads.abs().float()
        if "frobenius" in scores:
            scores["frobenius"][key] += magnitude.sum(dim=0)
        if "mse" in scores:
            factor = 2.0 * frob[:, layer[key]] / (len(positions[modality]) * width)  # [B]
            scores["mse"][key] += (magnitude * factor.float().view(-1, *[1] * (magnitude.dim() - 1))).sum(dim=0)

    n = probe_embeds.shape[0]
    for start in track(range(0, n, batch_size), desc="element scores", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        batch_distance_gradients(model, probe_embeds[chunk], positions, {m: base_tokens[m][:, chunk] for m in positions},
                                 "frobenius", on_gradient=accumulate, last_norm=last_norm)
    return scores
