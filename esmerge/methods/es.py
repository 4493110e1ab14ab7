"""ES-Merging and its two ablations, as one engine (paper §4, Table 3).

``es`` uses both coefficient types (Eq. 4); ``es-layer`` fixes the element-wise factor to
uniform (lambda = alpha); ``es-element`` fixes the layer-wise factor to uniform (lambda = beta).

Defaults follow the paper (App. A.3): 1024 SWD projections, p = 2, tau = 0.5 for both softmaxes,
Frobenius distance, z-scores within each layer, no standardisation or subsampling before SWD.
``variant="code"`` switches every setting to the official code's choice (element tau 0.1, MSE
distance, per-tensor z-scores, joint standardisation and equal-size subsampling before SWD);
each can also be set on its own.
"""
from __future__ import annotations

import time

import torch

from esmerge import element_gradients, elementwise, layerwise, probe
from esmerge.adapters import Adapter, adapter_digest, attach, with_state
from esmerge.cache import atomic_torch_save, cached, content_key, key_lock, tensor_digest
from esmerge.errors import UsageError
from esmerge.merge import combine, merge_lora, uniform_element_coefficients, uniform_layer_coefficients
from esmerge.methods import HParam, MergeResult, register

# Bumped whenever the element-score computation changes, so stale cached scores are never reused
# (2: gradients taken w.r.t. the active adapter only, when several adapters are attached).
SCORES_VERSION = 3  # 3: batched element scores (same values to ~4e-7 relative)
PAPER_SETTINGS = dict(n_projections=1024, p=2.0, tau_layer=0.5, tau_element=0.5, distance="frobenius",
                      per_tensor=False, standardize=False, equal_size=None)
CODE_SETTINGS = dict(PAPER_SETTINGS, tau_element=0.1, distance="mse", per_tensor=True, standardize=True,
                     equal_size="min")
# Declared defaults are the paper's; ``variant="code"`` changes those not given (see CODE_SETTINGS).
HPARAMS = (
    HParam("variant", str, "paper", choices=("paper", "code"), doc="paper settings, or the official code's"),
    HParam("n_projections", int, 1024, low=1, doc="SWD projections (an SWD of 0 projections is NaN)"),
    HParam("p", float, 2.0, low=1.0, doc="SWD order"),
    HParam("tau_layer", float, 0.5, low=0.0, low_open=True, doc="layer softmax temperature (Eq. 2)"),
    HParam("tau_element", float, 0.5, low=0.0, low_open=True, doc="element softmax temperature (Eq. 3); code: 0.1"),
    HParam("distance", str, "frobenius", choices=tuple(elementwise.DISTANCES), doc="token distance; code: mse"),
    HParam("per_tensor", bool, False, doc="z-score element scores per LoRA tensor, not per layer; code: true"),
    HParam("standardize", bool, False, doc="jointly z-score states before SWD; code: true"),
    HParam("equal_size", int, None, low=1, also=("min",), nullable=True,
           doc="subsample probes before SWD; 'min': all K (code); null: none"),
    HParam("seed", int, 0, doc="seed of the probe sample and the SWD projections"),
)


def resolve_settings(variant: str = "paper", **overrides) -> dict:
    """Paper or official-code defaults, with explicit overrides applied on top."""
    if variant not in ("paper", "code"):
        raise UsageError(f"es: variant must be 'paper' or 'code', got {variant!r}")
    settings = dict(PAPER_SETTINGS if variant == "paper" else CODE_SETTINGS)
    unknown = set(overrides) - set(settings) - {"seed"}
    if unknown:
        raise UsageError(f"es: unknown ES-Merging settings {sorted(unknown)}; known: {sorted(settings)}")
    settings.update({k: v for k, v in overrides.items() if k != "seed"})
    return settings


def signals(adapters: list[Adapter], context, seed: int = 0, need_scores: bool = True, **settings) -> dict:
    """Probe -> states -> SWD table and element scores for these adapters (cached by content).

    Returns ``{"probes", "states", "swd" [S, M, L], "scores": [dict per specialist], "seconds"}``
    (``scores`` is empty when ``need_scores`` is false).
    Every intermediate is stored under ``context.cache`` keyed by what produced it, so a rerun
    is instant and an interrupted run resumes at the first missing piece. The probes are the
    paper's (``probe.probe_entities`` through each specialist's encoder) unless the context
    carries ready-made ones (``context.probes``: ``esmerge.byo``'s marked text); blocks of varying
    length (paper-scale proteins) keep their masks in the cache and through ``element_scores``.
    """
    settings = resolve_settings(**settings)
    base = context.base
    names = list(context.specialists)
    projectors = {m: s.projector for m, s in context.specialists.items() if getattr(s, "projector", None) is not None}
    given = getattr(context, "probes", None)  # ready-made probes (bring your own adapters: esmerge.byo)
    if given is not None:
        probe_key = content_key(base.weights_sha256, "given", tensor_digest(_probe_tensors(given)))
    else:
        probe_key = content_key(base.weights_sha256, context.probe_k, seed,
                                {m: tensor_digest(p.state_dict()) for m, p in projectors.items()})
    states_key = content_key(probe_key, [adapter_digest(a) for a in adapters])
    root = context.cache
    t0 = time.perf_counter()

    def make_probes():
        raw = probe.probe_entities(k=context.probe_k, seed=seed, exclude_cells=_training_cells(context))
        n_tokens = {"molecule": 8, "protein": 8, "cell": 24}
        blocks = probe.encode_blocks(base, projectors, raw, n_tokens)
        p = probe.build_probes(base.tokenizer, base.model.get_input_embeddings(), blocks, raw)
        return _probe_record(p)

    if given is not None:
        stored = cached(root / f"probes-{probe_key}.pt", lambda: _probe_record(given))
    else:
        stored = cached(root / f"probes-{probe_key}.pt", make_probes)
    probes = probe.Probes(stored["embeds"], stored["positions"], stored["raw"], stored["template"],
                          stored.get("attention_mask"), stored.get("block_mask", {}))

    peft_model = attach(base.model, dict(zip(names, adapters)))
    try:
        states = cached(root / f"states-{states_key}.pt", lambda: probe.collect_states(peft_model, names, probes))
        equal = settings["equal_size"]
        if equal == "min":
            equal = len(probes)
        swd_key = content_key(states_key, settings["n_projections"], settings["p"], seed,
                              settings["standardize"], equal)
        swd = cached(root / f"swd-{swd_key}.pt", lambda: layerwise.swd_table(
            states["base"]["pooled"], [states[n]["pooled"] for n in names],
            n_projections=settings["n_projections"], p=settings["p"], seed=seed,
            standardize=settings["standardize"], equal_size=equal))
        scores = []
        for name in names if need_scores else []:
            files = {dist: root / f"scores-{content_key(states_key, name, dist, SCORES_VERSION)}.pt"
                     for dist in elementwise.DISTANCES}
            wanted = files[settings["distance"]]
            if not wanted.exists():
                # A second process (another notebook at --jobs 2) waits here and reuses the first's scores.
                with key_lock(wanted):
                    if not wanted.exists():
                        # One pass yields the scores of every distance; store each so either is instant later.
                        peft_model.set_adapter(name)
                        computed = element_scores(peft_model, probes, states["base"]["tokens"])
                        for dist, path in files.items():
                            atomic_torch_save(computed[dist], path)
            scores.append(torch.load(files[settings["distance"]], weights_only=True))
    finally:
        peft_model.unload()
    return {"probes": probes, "states": states, "swd": swd, "scores": scores, "seconds": time.perf_counter() - t0}


def _probe_record(p: probe.Probes) -> dict:
    """What the probe cache stores; the masks only when blocks vary in length (so fixed-length
    records, and their cache files, are as before)."""
    record = {"embeds": p.embeds, "positions": p.positions, "raw": p.raw, "template": p.template}
    if p.attention_mask is not None:
        record |= {"attention_mask": p.attention_mask, "block_mask": p.block_mask}
    return record


def _probe_tensors(p: probe.Probes) -> dict:
    tensors = {"embeds": p.embeds, **{f"pos.{m}": t for m, t in p.positions.items()}}
    if p.attention_mask is not None:
        tensors["attention_mask"] = p.attention_mask
    return tensors


def element_scores(peft_model, probes: probe.Probes, base_tokens: dict) -> dict:
    """``element_gradients.element_scores_by_distance`` on probes whose blocks may vary in length.

    With one length per block (no mask) it is that call as is. Otherwise each sample is run
    alone with its padding slots cut out: the same states as the masked batch (attention skips
    padding, positions count real tokens), and the scores are sums over samples, so adding the
    per-sample scores gives the batch's. ``base_tokens``: modality -> ``[L, K, T_m, d]``.
    """
    if probes.attention_mask is None:
        return element_gradients.element_scores_by_distance(peft_model, probes.embeds, probes.positions, base_tokens)
    total = None
    for k in range(len(probes)):
        real = probes.attention_mask[k].bool()
        index = real.long().cumsum(0) - 1  # position of each real token once padding is cut out
        positions, tokens = {}, {}
        for m, pos in probes.positions.items():
            keep = real[pos]
            positions[m] = index[pos[keep]]
            tokens[m] = base_tokens[m][:, k:k + 1, keep]
        one = element_gradients.element_scores_by_distance(peft_model, probes.embeds[k:k + 1, real], positions, tokens,
                                                           progress=False, batch_size=1)
        total = one if total is None else {d: {key: total[d][key] + v for key, v in s.items()} for d, s in one.items()}
    return total


def _training_cells(context) -> set:
    spec = context.specialists.get("cell")
    card = getattr(spec, "card", None) or {}
    return set(card.get("training_cells", []))


def coefficients_from_signals(sig: dict, template, settings: dict, use_layer: bool = True, use_element: bool = True):
    """``(alpha [S, L], beta {key: [S, *shape]}, lambda {key: [S, *shape]})`` from ``signals``' output.

    alpha by Eq. 2 (or uniform), beta by Eq. 3 (or uniform), lambda by Eq. 4; ``template`` is one
    adapter's LoRA state (keys and shapes of the uniform beta).
    """
    n, n_layers = sig["swd"].shape[0], sig["swd"].shape[-1]
    alpha = (layerwise.layer_coefficients(sig["swd"], settings["tau_layer"]) if use_layer
             else uniform_layer_coefficients(n, n_layers))
    beta = (elementwise.element_coefficients(sig["scores"], settings["tau_element"], settings["per_tensor"])
            if use_element else uniform_element_coefficients(template, n))
    return alpha, beta, combine(alpha, beta)


def es_merge(adapters: list[Adapter], context, use_layer: bool = True, use_element: bool = True,
             seed: int = 0, variant: str = "paper", **overrides) -> MergeResult:
    settings = resolve_settings(variant, **overrides)
    sig = signals(adapters, context, seed=seed, need_scores=use_element, **settings)
    alpha, _, coefficients = coefficients_from_signals(sig, adapters[0].state, settings, use_layer, use_element)
    merged = merge_lora([a.state for a in adapters], coefficients)
    info = {"settings": settings, "variant": variant, "seed": seed, "use_layer": use_layer,
            "use_element": use_element, "signal_seconds": sig["seconds"],
            "alpha": alpha.tolist(), "probe_k": len(sig["probes"])}
    return MergeResult(with_state(adapters[0], merged, "es"), info)


@register("es", "ES-Merging", "Lee, Kim, Hwang 2026, §4 (Eq. 4)", needs_context=True, hparams=HPARAMS)
def es(adapters, context=None, **hp):
    return es_merge(adapters, context, use_layer=True, use_element=True, **hp)


@register("es-layer", "Layer-wise ES-Merging", "Lee, Kim, Hwang 2026, §4.2 (Eq. 2)", needs_context=True,
          hparams=HPARAMS)
def es_layer(adapters, context=None, **hp):
    return es_merge(adapters, context, use_layer=True, use_element=False, **hp)


@register("es-element", "Element-wise ES-Merging", "Lee, Kim, Hwang 2026, §4.3 (Eq. 3)", needs_context=True,
          hparams=HPARAMS)
def es_element(adapters, context=None, **hp):
    return es_merge(adapters, context, use_layer=False, use_element=True, **hp)
