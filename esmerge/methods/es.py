"""ES-Merging and its two ablations, as one engine (paper §4, Table 3).

``es`` uses both coefficient types (Eq. 4); ``es-layer`` fixes the element-wise factor to
uniform (lambda = alpha); ``es-element`` fixes the layer-wise factor to uniform (lambda = beta).

Defaults follow the paper (§4, App. A.3): 1024 SWD projections, p = 2, tau = 0.5 for both
softmaxes, Frobenius distance, element scores summed over every modality's tokens, per probe, with
block outputs before the final norm, z-scores within each layer, no standardisation before SWD.
``variant="code"`` switches every setting to the official code's choice (WonbinLee067/es-merging;
``CODE_SETTINGS``, the book's "Paper vs official code"): element tau 0.1, MSE distance, scores on
the specialist's own modality only, the last layer after the final norm, the absolute gradient of the MSE of
each batch of 2 probes, per-tensor z-scores, joint standardisation before SWD, fresh SWD
projections per layer and pair, and 3 x probe_k probes (create_330_samples). Each can also be set
on its own, so every difference can be ablated.
"""
from __future__ import annotations

import time

from esmerge.methods import MergeResult, register
from esmerge.methods.es_settings import DEFAULTS, HPARAMS, PRESETS, resolve_settings
from esmerge.methods.es_signals import NOT_RECORDED, own_modalities, signals
from esmerge.signals import elementwise, layerwise
from esmerge.signals.combine import combine, merge_lora, uniform_element_coefficients, uniform_layer_coefficients
from esmerge.specialists.adapters import Adapter, with_state


def coefficients_from_signals(sig: dict, template, settings: dict, use_layer: bool = True, use_element: bool = True):
    """ES-Merging's coefficients α (Eq. 2), β (Eq. 3) and λ = α·β (Eq. 4) from the output of ``signals``.

    Parameters
    ----------
    sig : dict
        ``signals``' output; ``swd [S, M, L]`` and ``scores`` (one dict per specialist) are used,
        and ``names`` and ``modalities`` when ``other_weight != 1``.
    template : dict of str to Tensor
        One adapter's LoRA state (keys and shapes of the uniform β).
    settings : dict
        ``tau_layer``, ``tau_element``, ``per_tensor`` and optionally ``other_weight``.
    use_layer : bool
        Use Eq. 2's α; if false, α is uniform (λ = β).
    use_element : bool
        Use Eq. 3's β; if false, β is uniform (λ = α).

    Returns
    -------
    alpha : Tensor, shape ``[S, L]``
    beta : dict of str to Tensor, shape ``[S, *shape]``
    lambda : dict of str to Tensor, shape ``[S, *shape]``

    Examples
    --------
    At layer 1, α = softmax(-1, 1) as in ``layer_coefficients``. Element 0 has β = softmax(-1, 1)
    too, so λ = softmax(-2, 2) = (0.0180, 0.9820); element 1 has β = softmax(1, -1), and λ = 0.5:

    >>> import torch
    >>> key = "layers.0.self_attn.q_proj.lora_A.weight"
    >>> sig = {"swd": torch.tensor([[[1., 3.]], [[2., 3.]]]),
    ...        "scores": [{key: torch.tensor([1., 3.])}, {key: torch.tensor([3., 1.])}]}
    >>> settings = {"tau_layer": 1.0, "tau_element": 1.0, "per_tensor": False}
    >>> alpha, beta, lam = coefficients_from_signals(sig, {key: torch.zeros(2)}, settings)
    >>> alpha[:, 0], beta[key][:, 0]
    (tensor([0.1192, 0.8808]), tensor([0.1192, 0.8808], dtype=torch.float64))
    >>> lam[key]
    tensor([[0.0180, 0.5000],
            [0.9820, 0.5000]], dtype=torch.float64)
    >>> coefficients_from_signals(sig, {key: torch.zeros(2)}, settings, use_element=False)[2][key]  # λ = α
    tensor([[0.1192, 0.1192],
            [0.8808, 0.8808]], dtype=torch.float64)
    """
    n, n_layers = sig["swd"].shape[0], sig["swd"].shape[-1]
    other_weight = settings.get("other_weight", 1.0)
    own = None
    if other_weight != 1.0:
        modalities = list(sig["modalities"])
        own_modalities(sig["names"], modalities, dict(settings, score_modalities="own"))
        own = [modalities.index(name) for name in sig["names"]]
    alpha = (layerwise.layer_coefficients(sig["swd"], settings["tau_layer"], own, other_weight) if use_layer
             else uniform_layer_coefficients(n, n_layers))
    beta = (elementwise.element_coefficients(sig["scores"], settings["tau_element"], settings["per_tensor"])
            if use_element else uniform_element_coefficients(template, n))
    return alpha, beta, combine(alpha, beta)


def es_merge(adapters: list[Adapter], context, use_layer: bool = True, use_element: bool = True,
             seed: int = 0, variant: str = "paper", **overrides) -> MergeResult:
    """Merge adapters with ES-Merging or one of its ablations (paper §4, Eqs. 1-4; Table 3).

    ``signals`` gives the SWD table and element scores, ``coefficients_from_signals`` turns them
    into λ (Eq. 4), and ``merge_lora`` merges the LoRA tensors with it (Eq. 1).

    Parameters
    ----------
    adapters : list of Adapter
        The S specialists, in the order of ``context.specialists``.
    context : MergeContext
        As ``signals`` needs it.
    use_layer, use_element : bool
        Use the layer-wise α (Eq. 2) and the element-wise β (Eq. 3); an unused one is uniform.
    seed : int
        Seed of the probe sample and of the SWD projections.
    variant : {"paper", "code"}
        Default settings (``resolve_settings``).
    **overrides
        Settings to change.

    Returns
    -------
    MergeResult
        The merged adapter; ``info`` holds the settings, the seed, α ``[S, L]`` as lists, the
        number of probes and the time spent on signals, and ``cost``: ``wall_seconds`` of this
        call and the signals' ``flops``, ``seconds``, ``peak_memory_mib`` (``signal_cost``).

    Examples
    --------
    Identical specialists get α = 1/2 everywhere and merge to themselves (same setup as in
    ``signals``):

    >>> import tempfile, types
    >>> import torch
    >>> from esmerge.signals import probe
    >>> from pathlib import Path
    >>> from peft import LoraConfig, get_peft_model
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> from esmerge.specialists.adapters import adapter_from_model
    >>> llama = tiny_llama()
    >>> peft_model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    >>> adapter = adapter_from_model(peft_model, "x"); llama = peft_model.unload()
    >>> cache = tempfile.TemporaryDirectory()
    >>> context = types.SimpleNamespace(
    ...     base=types.SimpleNamespace(model=llama, weights_sha256="tiny"), specialists={"x": None, "y": None},
    ...     probes=probe.Probes(torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}), probe_k=2, cache=Path(cache.name))
    >>> result = es_merge([adapter, adapter], context, n_projections=8)
    >>> result.info["alpha"]
    [[0.5, 0.5], [0.5, 0.5]]
    >>> result.info["cost"]["flops"] > 0, result.info["cost"]["cached"]
    (True, False)
    >>> all(torch.allclose(v, adapter.state[k]) for k, v in result.adapter.state.items())
    True
    >>> cache.cleanup()
    """
    start = time.perf_counter()
    settings = resolve_settings(variant, **overrides)
    sig = signals(adapters, context, seed=seed, need_scores=use_element, **settings)
    alpha, _, coefficients = coefficients_from_signals(sig, adapters[0].state, settings, use_layer, use_element)
    merged = merge_lora([a.state for a in adapters], coefficients)
    # The search's cost, as AdaMerging and Avg+FT record theirs (Table 4): FLOPs, seconds and peak memory of
    # computing the signals, as recorded when each piece was computed (``cached``: some were read back).
    cost = signal_cost(sig["cost"])
    info = {"settings": settings, "variant": variant, "seed": seed, "use_layer": use_layer,
            "use_element": use_element, "signal_seconds": sig["seconds"],
            "alpha": alpha.tolist(), "probe_k": len(sig["probes"]),
            "n_specialists": len(adapters), "modalities": list(sig["modalities"]),
            "cost": {"wall_seconds": time.perf_counter() - start, **cost}}
    return MergeResult(with_state(adapters[0], merged, "es"), info)


def signal_cost(pieces: dict[str, dict]) -> dict:
    """ES-Merging's signal cost for ``info["cost"]`` from each piece's ``counted`` record.

    ``flops``, ``seconds``: sums as recorded when computed, or ``None`` and a ``note`` naming pieces cached
    before counting (no partial sum); ``peak_memory_mib``: the largest; ``cached``: some piece was read back.

    >>> cost = signal_cost({"states": {"flops": 10, "seconds": 1.0, "peak_memory_mib": 5.0, "cached": False},
    ...                     "scores/x": {"flops": 32, "seconds": 2.0, "peak_memory_mib": 7.0, "cached": True}})
    >>> cost["flops"], cost["seconds"], cost["peak_memory_mib"], cost["cached"]
    (42, 3.0, 7.0, True)
    >>> signal_cost({"states": {"flops": None, "seconds": None, "cached": True}})["note"]
    'not recorded (cached before counting): states'
    """
    missing = [name for name, p in pieces.items() if p.get("flops") is None]
    peaks = [p["peak_memory_mib"] for p in pieces.values() if p.get("peak_memory_mib") is not None]
    kinds = list(dict.fromkeys(p["peak_memory_kind"] for p in pieces.values() if p.get("peak_memory_kind")))
    return {"flops": None if missing else sum(p["flops"] for p in pieces.values()),
            "seconds": None if missing else sum(p["seconds"] for p in pieces.values()),
            "peak_memory_mib": max(peaks) if peaks else None, "peak_memory_kind": "; ".join(kinds) or None,
            "cached": any(p.get("cached") for p in pieces.values()), "pieces": pieces,
            **({"note": f"{NOT_RECORDED}: {', '.join(missing)}"} if missing else {})}


@register("es", "ES-Merging", "Lee, Kim, Hwang 2026, §4 (Eq. 4)", needs_context=True, hparams=HPARAMS,
          presets=PRESETS, defaults=DEFAULTS, needs=("probe",))
def es(adapters, context=None, **hp):
    """ES-Merging with both coefficient types, λ = α·β (paper §4.4, Eq. 4; Table 3).

    ``es_merge`` with use_layer=True, use_element=True; its example runs the whole method on a tiny LLaMA.
    """
    return es_merge(adapters, context, use_layer=True, use_element=True, **hp)


@register("es-layer", "Layer-wise ES-Merging", "Lee, Kim, Hwang 2026, §4.2 (Eq. 2)", needs_context=True,
          hparams=HPARAMS, presets=PRESETS, defaults=DEFAULTS, needs=("probe",))
def es_layer(adapters, context=None, **hp):
    """ES-Merging with layer-wise coefficients only, λ = α (paper §4.2, Eq. 2; Table 3).

    ``es_merge`` with use_layer=True, use_element=False; its example runs the whole method on a tiny LLaMA.
    """
    return es_merge(adapters, context, use_layer=True, use_element=False, **hp)


@register("es-element", "Element-wise ES-Merging", "Lee, Kim, Hwang 2026, §4.3 (Eq. 3)", needs_context=True,
          hparams=HPARAMS, presets=PRESETS, defaults=DEFAULTS, needs=("probe",))
def es_element(adapters, context=None, **hp):
    """ES-Merging with element-wise coefficients only, λ = β (paper §4.3, Eq. 3; Table 3).

    ``es_merge`` with use_layer=False, use_element=True; its example runs the whole method on a tiny LLaMA.
    """
    return es_merge(adapters, context, use_layer=False, use_element=True, **hp)
