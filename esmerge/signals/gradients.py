r"""Element scores of one specialist from per-sample gradients of fine embedding signals (paper §4.3).

For specialist :math:`\theta_j`, input modality :math:`m_i`, probe sample :math:`k`, layer
:math:`l` and LoRA element :math:`n` of that layer, with :math:`r^{l,(k)}_{i\to j}` the token
distance of ``esmerge.signals.elementwise``:

.. math::

    s^{l,n}_j = \sum_i \sum_k \Big|\frac{\partial r^{l,(k)}_{i\to j}}{\partial\theta^{l,n}_j}\Big|.

This is the side that needs a model (forward hooks, autograd); ``esmerge.signals.elementwise`` turns the
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

import torch

from esmerge.signals.elementwise import batch_token_distance
from esmerge.signals.hooks import block_outputs, linear_inputs_outputs, lora_linears

# Probe samples per batched pass: the autograd graph of one SmolLM2 probe (~70 tokens) holds
# about 0.1 GB, so 16 keep a pass near 2 GB while the matmuls are already large enough.
BATCH_SIZE = 16


def per_sample_weight_gradients(inputs: torch.Tensor, output_grads: torch.Tensor) -> torch.Tensor:
    r"""Per-sample gradient of a bias-free linear's weight, :math:`G_b = \sum_t g_{b,t}\,x_{b,t}^\top` (§4.3).

    For :math:`y = x W^\top` and a loss :math:`\sum_b L_b` with :math:`L_b` depending on sample
    b only, :math:`\partial L_b/\partial W = G_b`. This gives every probe's own gradient of
    :math:`r^{l,(k)}` from one backward of the batch.

    Parameters
    ----------
    inputs : Tensor, shape ``[B, T, in]``
        The linear's inputs :math:`x`.
    output_grads : Tensor, shape ``[B, T, out]``
        The loss's gradient with respect to the linear's outputs :math:`g`.

    Returns
    -------
    Tensor, shape ``[B, out, in]``
        In float32 or wider (float64 inputs stay float64).

    Examples
    --------
    One token: the outer product of g = [3] and x = [1, 2]:

    >>> per_sample_weight_gradients(torch.tensor([[[1., 2.]]]), torch.tensor([[[3.]]]))
    tensor([[[3., 6.]]])

    It matches autograd on one sample's loss:

    >>> x = torch.randn(2, 3, 4); w = torch.randn(5, 4, requires_grad=True)
    >>> y = x @ w.T
    >>> g = torch.autograd.grad(y[1].pow(2).sum(), y)[0]  # sample 1's loss only
    >>> torch.allclose(per_sample_weight_gradients(x, g)[1], torch.autograd.grad(y[1].pow(2).sum(), w)[0])
    True
    """
    dtype = torch.promote_types(torch.promote_types(output_grads.dtype, inputs.dtype), torch.float32)
    return torch.einsum("bto,bti->boi", output_grads.to(dtype), inputs.to(dtype))


def batch_distance_gradients(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distance: str = "frobenius",
    on_gradient=None,
    last_norm: torch.nn.Module | None = None,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    r"""Per-sample, per-modality gradients of the token distances for a batch of probes (§4.3).

    For each probe k and modality i, the gradient of :math:`r^{l,(k)}_{i\to j}` with respect to
    layer l's LoRA elements :math:`\theta^{l,n}_j`, signed: the terms of the element scores
    :math:`s^{l,n}_j` before their absolute value. One forward of the batch (every layer's input
    detached, so layer l's distance depends on :math:`\theta^l` only) and one backward of
    :math:`\sum_l r^{l,(k)}` per modality.

    Parameters
    ----------
    model : torch.nn.Module
        Base LLM with the specialist's LoRA attached and active.
    probe_embeds : Tensor, shape ``[B, T, d]``
        Input embeddings of B probe samples (one length, no padding).
    positions : dict of str to Tensor, shape ``[T_m]``
        Modality -> token positions of its block in every probe.
    base_tokens : dict of str to Tensor, shape ``[L, B, T_m, d]``
        Modality -> base states of these samples.
    distance : {"frobenius", "mse"}
        ``"frobenius"`` (paper) or ``"mse"`` (official code).
    on_gradient : callable, optional
        If given, ``on_gradient(modality, key, grads [B, *shape], distances [B, L])`` is called
        for each LoRA tensor instead of storing the gradients (so a caller that only sums them
        never holds all B x n_params values at once).
    last_norm : torch.nn.Module, optional
        If given (``final_norm(model)``), the last layer's states are read after it, as Hugging
        Face's ``hidden_states[-1]`` (official code); ``base_tokens``' last layer must then be
        normed too. Default: every layer is a block output, before the norm.

    Returns
    -------
    gradients : dict of str to dict of str to Tensor, shape ``[B, *shape of key]``
        ``gradients[modality][key]`` is :math:`\partial r^{l(key),(k)}/\partial\theta` (layer-isolated,
        float32 or wider); empty when ``on_gradient`` is given.
    distances : dict of str to Tensor, shape ``[B, L]``
        ``distances[modality]``: the values :math:`r^{l,(k)}`.

    Examples
    --------
    A tiny LLaMA with a fresh LoRA, 2 probes of 3 tokens and a block at tokens 1-2, measured
    against base states of 0. The distance at layer 1 is then the norm of the first block's
    output, and PEFT's B = 0 makes every gradient of A vanish:

    >>> from peft import LoraConfig, get_peft_model
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> llama = tiny_llama()
    >>> model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"]))
    >>> embeds = torch.randn(2, 3, 4)
    >>> grads, dist = batch_distance_gradients(model, embeds, {"m": torch.tensor([1, 2])},
    ...                                        {"m": torch.zeros(2, 2, 2, 4)})
    >>> key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    >>> grads["m"][key].shape, dist["m"].shape
    (torch.Size([2, 1, 4]), torch.Size([2, 2]))
    >>> float(grads["m"][key].abs().max())
    0.0
    >>> first = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states[1]
    >>> torch.allclose(dist["m"][:, 0], first[:, 1:].flatten(1).norm(dim=1))
    True
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
            batch_token_distance(out[:, pos], base_tokens[modality][layer].to(out.device, out.dtype), distance)
            for layer, out in enumerate(outputs)
        ], dim=1)  # [B, L]
        output_grads = torch.autograd.grad(r.sum(), captured_outputs, retain_graph=idx < len(modalities) - 1,
                                           allow_unused=True)
        r = r.detach()
        per_key = {}
        for key, g in zip(keys, output_grads):
            weight = linears[key].weight
            if g is None:
                grads = torch.zeros(probe_embeds.shape[0], *weight.shape,
                                    dtype=torch.promote_types(weight.dtype, torch.float32), device=weight.device)
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
    r"""Gradients of the token distances for ONE probe sample (§4.3); see ``batch_distance_gradients``.

    :math:`\partial r^{l,(k)}_{i\to j}/\partial\theta^{l,n}_j` for one probe k, every modality i and
    every LoRA tensor.

    Parameters
    ----------
    model : torch.nn.Module
        Base LLM with the specialist's LoRA attached and active.
    probe_embeds : Tensor, shape ``[T, d]``
        The probe's input embeddings.
    positions : dict of str to Tensor, shape ``[T_m]``
        Modality -> token positions of its block.
    base_tokens : dict of str to Tensor, shape ``[L, T_m, d]``
        Modality -> the base's states of this probe.
    distance : {"frobenius", "mse"}
        ``"frobenius"`` (paper) or ``"mse"`` (official code).

    Returns
    -------
    gradients : dict of str to dict of str to Tensor, shape ``[*shape of key]``
        ``gradients[modality][key]`` (float32 or wider).
    distances : dict of str to Tensor, shape ``[L]``
        ``distances[modality]``.

    Examples
    --------
    The same values as row 1 of a batch:

    >>> from peft import LoraConfig, get_peft_model
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> llama = tiny_llama()
    >>> model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"]))
    >>> embeds, pos = torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}
    >>> grads, dist = batch_distance_gradients(model, embeds, pos, {"m": torch.zeros(2, 2, 2, 4)})
    >>> one, one_dist = sample_distance_gradients(model, embeds[1], pos, {"m": torch.zeros(2, 2, 4)})
    >>> key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    >>> one["m"][key].shape, one_dist["m"].shape  # B is [d_out, r]; one distance per layer
    (torch.Size([4, 1]), torch.Size([2]))
    >>> torch.allclose(one["m"][key], grads["m"][key][1], atol=1e-6)
    True
    >>> torch.allclose(one_dist["m"], dist["m"][1])
    True
    """
    grads, dists = batch_distance_gradients(model, probe_embeds.unsqueeze(0), positions,
                                            {m: t.unsqueeze(1) for m, t in base_tokens.items()}, distance)
    return ({m: {k: g[0] for k, g in per_key.items()} for m, per_key in grads.items()},
            {m: d[0] for m, d in dists.items()})


