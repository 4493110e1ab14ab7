r"""Element-wise local merging coefficients from fine embedding signals (paper §4.3, Eq. 3).

For specialist :math:`\theta_j`, input modality :math:`m_i`, probe sample :math:`k`, layer
:math:`l` and LoRA element :math:`n` of that layer:

.. math::

    r^{l,(k)}_{i\to j} = \big\lVert \mathbf H^{l,(k)}_{i\to\mathrm{base}}
                                   - \mathbf H^{l,(k)}_{i\to\theta_j}\big\rVert_F, \qquad
    s^{l,n}_j = \sum_i \sum_k \Big|\frac{\partial r^{l,(k)}_{i\to j}}{\partial\theta^{l,n}_j}\Big|,

    \hat s^{l,n}_j = \operatorname{zscore}_{n\in l}\big(s^{l,n}_j\big), \qquad
    \beta^{l,n}_j = \frac{\exp(\hat s^{l,n}_j/\tau)}{\sum_m \exp(\hat s^{l,n}_m/\tau)}.

Two details the paper leaves implicit, and how this module settles them:

* The absolute value is taken per probe sample and per modality, so every (k, i) needs its own
  gradient: one forward per sample, one backward per modality.
* :math:`r^l` is differentiated only through layer l's own LoRA parameters. Every decoder
  layer's input is detached during the specialist's forward, so layer l's output depends on
  :math:`\theta^l` alone; the *values* are unchanged (the detached input equals the true one).
  Then one backward of :math:`\sum_l r^l` yields :math:`\partial r^l/\partial\theta^l` for every
  layer at once.
"""
from __future__ import annotations

import re
from collections import defaultdict
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from esmerge.adapters import layer_of
from esmerge.layerwise import softmax_over_specialists

DISTANCES = ("frobenius", "mse")


def token_distance(specialist: torch.Tensor, base: torch.Tensor, distance: str = "frobenius") -> torch.Tensor:
    """Distance between two token blocks ``[T, d]``: Frobenius norm (paper) or mean squared error (official code)."""
    diff = specialist - base
    if distance == "frobenius":
        # The epsilon keeps the gradient finite when a specialist equals the base exactly.
        return torch.sqrt(diff.pow(2).sum() + 1e-20)
    if distance == "mse":
        return diff.pow(2).mean()
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


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


_LORA_PARAM = re.compile(r"\.(lora_[AB])\.([^.]+)\.weight$")


def lora_parameters(model: torch.nn.Module, adapter_name: str | None = None) -> dict[str, torch.nn.Parameter]:
    """LoRA A/B parameters of one adapter, keyed like PEFT's saved state dict (adapter name removed).

    ``adapter_name`` defaults to the model's active adapter. Only that adapter's tensors are
    returned: a PEFT model holding several adapters has one parameter per adapter under the same
    key, and the gradients must be taken with respect to the active one.
    """
    if adapter_name is None:
        active = getattr(model, "active_adapter", None)
        adapter_name = active[0] if isinstance(active, (list, tuple)) else active
    params = {}
    for name, param in model.named_parameters():
        match = _LORA_PARAM.search(name)
        if match is None or (adapter_name is not None and match.group(2) != adapter_name):
            continue
        # "...q_proj.lora_A.molecule.weight" -> "...q_proj.lora_A.weight"
        key = name[:match.start()] + f".{match.group(1)}.weight"
        if key in params:
            raise ValueError(f"several adapters own {key}; name the one to score (adapter_name)")
        params[key] = param
    if not params:
        raise ValueError(f"model has no LoRA parameters for adapter {adapter_name!r}; attach the specialist's adapter first")
    return params


def sample_distance_gradients(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distance: str = "frobenius",
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    r"""Per-modality gradients of :math:`\sum_l r^{l}` for ONE probe sample.

    Args:
        model: base LLM with the specialist's LoRA attached and active.
        probe_embeds: ``[T, d]`` input embeddings of one probe sample.
        positions: modality -> token positions ``[T_m]`` of its block in the probe.
        base_tokens: modality -> base states of this sample ``[L, T_m, d]``.

    Returns:
        (gradients, distances): ``gradients[modality][key]`` has the shape of LoRA tensor ``key``
        and holds :math:`\partial r^{l(key)}/\partial\theta` (layer-isolated);
        ``distances[modality]`` is ``[L]``, the values :math:`r^l`.
    """
    params = lora_parameters(model)
    keys, tensors = list(params), list(params.values())
    with block_outputs(model, detach_inputs=True) as outputs:
        model(inputs_embeds=probe_embeds.unsqueeze(0), use_cache=False)
    gradients, distances = {}, {}
    modalities = list(positions)
    for idx, modality in enumerate(modalities):
        pos = positions[modality]
        r = torch.stack([
            token_distance(out[0, pos], base_tokens[modality][l].to(out.dtype), distance)
            for l, out in enumerate(outputs)
        ])
        grads = torch.autograd.grad(r.sum(), tensors, retain_graph=idx < len(modalities) - 1, allow_unused=True)
        gradients[modality] = {k: (g if g is not None else torch.zeros_like(t)) for k, g, t in zip(keys, grads, tensors)}
        distances[modality] = r.detach()
    return gradients, distances


def element_scores(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distance: str = "frobenius",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    r"""Element-wise importance :math:`s^{l,n}_j = \sum_i\sum_k |\partial r^{l,(k)}_{i\to j}/\partial\theta^{l,n}_j|`.

    Args:
        model: base LLM with specialist j's LoRA attached and active (gradients are enabled on
            its LoRA parameters here; all other parameters are untouched).
        probe_embeds: ``[K, T, d]`` probe input embeddings.
        positions: modality -> ``[T_m]`` token positions of each modality block.
        base_tokens: modality -> base token-level states ``[L, K, T_m, d]``.
        distance: ``"frobenius"`` (paper) or ``"mse"`` (official code).

    Returns:
        LoRA key -> scores with that tensor's shape (float32, >= 0).
    """
    return element_scores_by_distance(model, probe_embeds, positions, base_tokens, (distance,), progress)[distance]


def element_scores_by_distance(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distances: tuple[str, ...] = DISTANCES,
    progress: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    r"""``element_scores`` for several distances from one pass over the probes.

    With :math:`D` the token-state difference of ``T_m`` tokens of width ``d``,
    :math:`r_F = \lVert D\rVert_F` and :math:`r_{MSE} = r_F^2/(T_m d)`, so
    :math:`\partial r_{MSE}/\partial\theta = \frac{2 r_F}{T_m d}\,\partial r_F/\partial\theta`: one
    Frobenius gradient per (sample, modality) gives both scores.

    Returns:
        distance -> (LoRA key -> scores).
    """
    unknown = set(distances) - set(DISTANCES)
    if unknown:
        raise ValueError(f"unknown distance(s) {sorted(unknown)}; choose from {DISTANCES}")
    params = lora_parameters(model)
    for p in params.values():
        p.requires_grad_(True)
    layer = {key: layer_of(key) for key in params}
    scores = {dist: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()} for dist in distances}
    width = probe_embeds.shape[-1]
    for k in tqdm(range(probe_embeds.shape[0]), desc="element scores", disable=not progress, leave=False):
        sample_base = {m: base_tokens[m][:, k] for m in positions}
        grads, frob = sample_distance_gradients(model, probe_embeds[k], positions, sample_base, "frobenius")
        for modality, per_key in grads.items():
            mse_factor = 2.0 * frob[modality] / (len(positions[modality]) * width)
            for key, g in per_key.items():
                g = g.detach().abs().float()
                if "frobenius" in scores:
                    scores["frobenius"][key] += g
                if "mse" in scores:
                    scores["mse"][key] += g * float(mse_factor[layer[key]])
    return scores


def zscore_within_layers(scores: dict[str, torch.Tensor], per_tensor: bool = False) -> dict[str, torch.Tensor]:
    """Z-score one specialist's scores over all LoRA elements of each layer (paper), or of each tensor (code).

    A group with zero variance maps to 0 (no NaN).
    """
    groups: dict[object, list[str]] = defaultdict(list)
    for key in scores:
        groups[key if per_tensor else layer_of(key)].append(key)
    out = {}
    for keys in groups.values():
        flat = torch.cat([scores[k].flatten().double() for k in keys])
        mean, std = flat.mean(), flat.std(unbiased=False)
        for k in keys:
            z = (scores[k].double() - mean) / std if std > 1e-12 else torch.zeros_like(scores[k], dtype=torch.float64)
            out[k] = z
    return out


def element_coefficients(
    scores: list[dict[str, torch.Tensor]], tau: float = 0.5, per_tensor: bool = False
) -> dict[str, torch.Tensor]:
    r"""Element-wise local merging coefficients :math:`\beta^{l,n}_j` (paper Eq. 3).

    Args:
        scores: one dict per specialist (same keys and shapes), LoRA key -> raw scores ``s``.
        tau: softmax temperature (paper: 0.5; official code: 0.1).
        per_tensor: z-score within each LoRA tensor instead of within each layer (code option).

    Returns:
        LoRA key -> ``[n_specialists, *tensor_shape]`` (float64), summing to 1 over dim 0.
    """
    if not scores:
        raise ValueError("no specialist scores given")
    keys = list(scores[0])
    for j, s in enumerate(scores[1:], start=1):
        if list(s) != keys:
            raise ValueError(f"specialist {j} has different LoRA keys than specialist 0")
    normalized = [zscore_within_layers(s, per_tensor) for s in scores]
    return {k: softmax_over_specialists(torch.stack([z[k] for z in normalized]), tau) for k in keys}
