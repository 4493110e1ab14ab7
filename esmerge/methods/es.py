"""ES-Merging and its two ablations, as one engine (paper §4, Table 3).

``es`` uses both coefficient types (Eq. 4); ``es-layer`` fixes the element-wise factor to
uniform (lambda = alpha); ``es-element`` fixes the layer-wise factor to uniform (lambda = beta).

Defaults follow the paper (§4, App. A.3): 1024 SWD projections, p = 2, tau = 0.5 for both
softmaxes, Frobenius distance, element scores summed over every modality's tokens, per probe, with
block outputs before the final norm, z-scores within each layer, no standardisation before SWD.
``variant="code"`` switches every setting to the official code's choice (WonbinLee067/es-merging;
``CODE_SETTINGS``, the book's "Paper vs official code"): element tau 0.1, MSE distance, scores on
the specialist's own modality only, the last layer after the final norm, |gradient| of the MSE of
each batch of 2 probes, per-tensor z-scores, joint standardisation before SWD, fresh SWD
projections per layer and pair, and 3 x probe_k probes (create_330_samples). Each can also be set
on its own, so every difference can be ablated.
"""
from __future__ import annotations

import time

import torch

from esmerge.cache import atomic_torch_save, cached, content_key, tensor_digest
from esmerge.errors import UsageError
from esmerge.methods import HParam, MergeResult, register
from esmerge.signals import elementwise, layerwise, probe
from esmerge.signals.combine import combine, merge_lora, uniform_element_coefficients, uniform_layer_coefficients
from esmerge.signals.element_scores import element_scores_by_distance
from esmerge.signals.hooks import final_norm
from esmerge.specialists.adapters import Adapter, adapter_digest, attach, with_state

# Bumped whenever the element-score computation changes, so stale cached scores are never reused
# (2: gradients taken w.r.t. the active adapter only, when several adapters are attached).
SCORES_VERSION = 3  # 3: batched element scores (same values to ~4e-7 relative)
PAPER_SETTINGS = dict(n_projections=1024, p=2.0, tau_layer=0.5, tau_element=0.5, distance="frobenius",
                      per_tensor=False, standardize=False, equal_size=None, score_modalities="all",
                      final_norm=False, grad_batch=1, projections="shared", probe_layout="paper", other_weight=1.0)
CODE_SETTINGS = dict(PAPER_SETTINGS, tau_element=0.1, distance="mse", per_tensor=True, standardize=True,
                     equal_size="min", score_modalities="own", final_norm=True, grad_batch=2, projections="fresh",
                     probe_layout="code")
PRESETS = {"paper": PAPER_SETTINGS, "code": CODE_SETTINGS}  # what `esmerge methods describe es` shows
# Settings that change the element scores; they enter the scores' cache key only when they differ
# from the paper's, so the paper's keys (and every score cached under them) stay as they were.
SCORE_SETTINGS = ("score_modalities", "final_norm", "grad_batch")
# Declared defaults are the paper's; ``variant="code"`` changes those not given (see CODE_SETTINGS).
# Bounds: p <= 32 keeps |difference|^p finite in float64 for state differences up to ~1e4 (massive
# activations; 1e308 overflowed and the SWD table became constant: uniform alpha, silently);
# n_projections <= 65536: the paper's Table 7 stops at 1024, and 2^16 directions of a 4096-wide state
# already take 2 GiB (1e300 failed deep in NumPy); tau >= MIN_TAU: see layerwise.MIN_TAU (1e-320
# made exp overflow, then a NaN blamed on the cache); grad_batch <= 65536: any larger batch is the
# whole probe set anyway.
HPARAMS = (
    HParam("variant", str, "paper", choices=("paper", "code"),
           doc="paper settings, or the official code's (CODE_SETTINGS)"),
    HParam("n_projections", int, 1024, low=1, high=65536, doc="SWD projections; paper 1024, code 1024"),
    HParam("p", float, 2.0, low=1.0, high=32.0, doc="SWD order; paper 2, code 2"),
    HParam("tau_layer", float, 0.5, low=layerwise.MIN_TAU,
           doc="layer softmax temperature (Eq. 2); paper 0.5, code 0.5"),
    HParam("tau_element", float, 0.5, low=layerwise.MIN_TAU,
           doc="element softmax temperature (Eq. 3); paper 0.5, code 0.1"),
    HParam("distance", str, "frobenius", choices=tuple(elementwise.DISTANCES),
           doc="token distance r (Eq. 3); paper frobenius, code mse"),
    HParam("per_tensor", bool, False,
           doc="z-score element scores per LoRA tensor, not per layer; paper false, code true"),
    HParam("standardize", bool, False, doc="jointly z-score states before SWD; paper false, code true"),
    HParam("equal_size", int, None, low=1, also=("min",), nullable=True,
           doc="subsample probes before SWD ('min': all K, a no-op here); paper null, code 'min'"),
    HParam("score_modalities", str, "all", choices=("all", "own"),
           doc="tokens whose distance scores a specialist's elements: every modality's or its own; "
               "paper all, code own"),
    HParam("final_norm", bool, False,
           doc="element scores read the last layer after the final norm (HF hidden_states[-1]); "
               "paper false, code true"),
    HParam("grad_batch", int, 1, low=1, high=65536,
           doc="probes per |gradient| in element scores (a batch's distance); paper 1, code 2"),
    HParam("projections", str, "shared", choices=("shared", "fresh"),
           doc="SWD directions: one set for every layer and pair, or fresh for each; "
               "paper unsaid (here shared), code fresh"),
    HParam("probe_layout", str, "paper", choices=("paper", "code"),
           doc="probes: paper = probe_k (110 per modality), code = M x probe_k (create_330_samples: 330)"),
    HParam("other_weight", float, 1.0, low=0.0,
           doc="weight of the other modalities' z-scores in layer scores (code --alpha); paper 1, code 1"),
    HParam("seed", int, 0, doc="seed of the probe sample and the SWD projections; official code 42"),
)


def resolve_settings(variant: str = "paper", **overrides) -> dict:
    """The ES-Merging settings: the paper's or the official code's defaults, with overrides on top.

    Parameters
    ----------
    variant : {"paper", "code"}
        ``PAPER_SETTINGS`` or ``CODE_SETTINGS``.
    **overrides
        Settings to change (``seed`` is accepted and ignored here).

    Returns
    -------
    dict
        Every setting of ``PAPER_SETTINGS``.

    Raises
    ------
    UsageError
        For an unknown variant or setting.

    Examples
    --------
    >>> resolve_settings()["tau_element"], resolve_settings("code")["tau_element"]
    (0.5, 0.1)
    >>> resolve_settings("code", tau_element=0.3)["tau_element"]
    0.3
    >>> resolve_settings(tau=1.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: es: unknown ES-Merging settings ['tau']; known: ['distance', ...]
    """
    if variant not in ("paper", "code"):
        raise UsageError(f"es: variant must be 'paper' or 'code', got {variant!r}")
    settings = dict(PAPER_SETTINGS if variant == "paper" else CODE_SETTINGS)
    unknown = set(overrides) - set(settings) - {"seed"}
    if unknown:
        raise UsageError(f"es: unknown ES-Merging settings {sorted(unknown)}; known: {sorted(settings)}")
    settings.update({k: v for k, v in overrides.items() if k != "seed"})
    return settings


def signals(adapters: list[Adapter], context, seed: int = 0, need_scores: bool = True, **settings) -> dict:
    """ES-Merging's embedding signals for these adapters: probe, states, SWD table, element scores (§4.1-4.3).

    Probe -> per-layer states of the base and of each specialist (§4.1) -> SWD table of Eq. 2's
    coarse signal (§4.2) -> element scores of Eq. 3's fine signal (§4.3). Every intermediate is
    stored under ``context.cache`` keyed by what produced it, so a rerun is instant and an
    interrupted run resumes at the first missing piece. The probes are the paper's
    (``probe.probe_entities`` through each specialist's encoder; ``probe_layout="code"`` samples
    M x ``probe_k`` of them, as the official create_330_samples) unless the context carries
    ready-made ones (``context.probes``: ``esmerge.run.byo``'s marked text, used as given);
    blocks of varying length (paper-scale proteins) keep their masks in the cache and through
    ``element_scores``.

    Parameters
    ----------
    adapters : list of Adapter
        The S specialists, in the order of ``context.specialists``.
    context : MergeContext
        ``base`` (model, ``weights_sha256``), ``specialists`` (name -> specialist, with an optional
        ``projector``), ``probe_k``, ``cache`` (a folder) and optionally ``probes``.
    seed : int
        Seed of the probe sample and of the SWD projections.
    need_scores : bool
        Compute the element scores (not needed by ``es-layer``).
    **settings
        ES-Merging settings (``resolve_settings``).

    Returns
    -------
    dict
        ``{"probes", "states", "swd" [S, M, L], "scores": [dict per specialist], "names",
        "modalities", "seconds"}``: ``scores`` is empty when ``need_scores`` is false, ``names``
        are the specialists in order, ``modalities`` the SWD table's modality order.

    Examples
    --------
    A tiny LLaMA, one adapter used twice (as specialists x and y) and 2 ready-made probes with one
    modality block; the cache lives in a temporary folder:

    >>> import tempfile, types
    >>> from pathlib import Path
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from esmerge.specialists.adapters import adapter_from_model
    >>> _ = torch.manual_seed(0)
    >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
    ...                                      num_attention_heads=1, num_key_value_heads=1))
    >>> peft_model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    >>> adapter = adapter_from_model(peft_model, "x"); llama = peft_model.unload()
    >>> cache = tempfile.TemporaryDirectory()
    >>> context = types.SimpleNamespace(
    ...     base=types.SimpleNamespace(model=llama, weights_sha256="tiny"), specialists={"x": None, "y": None},
    ...     probes=probe.Probes(torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}), probe_k=2, cache=Path(cache.name))
    >>> sig = signals([adapter, adapter], context, n_projections=8)
    >>> sig["swd"].shape, sig["names"], sig["modalities"], len(sig["scores"])  # [S, M, L]
    (torch.Size([2, 1, 2]), ['x', 'y'], ['m'], 2)
    >>> torch.equal(sig["swd"][0], sig["swd"][1])  # the same adapter twice: the same signal
    True
    >>> cache.cleanup()
    """
    settings = resolve_settings(**settings)
    base = context.base
    names = list(context.specialists)
    projectors = {m: s.projector for m, s in context.specialists.items() if getattr(s, "projector", None) is not None}
    given = getattr(context, "probes", None)  # ready-made probes (bring your own adapters: esmerge.run.byo)
    k = context.probe_k * (len(names) if settings["probe_layout"] == "code" else 1)
    if given is not None:
        probe_key = content_key(base.weights_sha256, "given", tensor_digest(_probe_tensors(given)))
    else:
        probe_key = content_key(base.weights_sha256, k, seed,
                                {m: tensor_digest(p.state_dict()) for m, p in projectors.items()})
    states_key = content_key(probe_key, [adapter_digest(a) for a in adapters])
    root = context.cache
    t0 = time.perf_counter()

    def make_probes():
        raw = probe.probe_entities(k=k, seed=seed, exclude_cells=_training_cells(context))
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
    own = _own_modalities(names, probes.modalities, settings)

    peft_model = attach(base.model, dict(zip(names, adapters)))
    try:
        states = cached(root / f"states-{states_key}.pt", lambda: probe.collect_states(peft_model, names, probes))
        equal = settings["equal_size"]
        if equal == "min":
            equal = len(probes)
        swd_parts = [states_key, settings["n_projections"], settings["p"], seed, settings["standardize"], equal]
        if settings["projections"] != "shared":
            swd_parts.append({"projections": settings["projections"]})
        swd = cached(root / f"swd-{content_key(*swd_parts)}.pt", lambda: layerwise.swd_table(
            states["base"]["pooled"], [states[n]["pooled"] for n in names],
            n_projections=settings["n_projections"], p=settings["p"], seed=seed,
            standardize=settings["standardize"], equal_size=equal, projections=settings["projections"]))
        changed = {key: settings[key] for key in SCORE_SETTINGS if settings[key] != PAPER_SETTINGS[key]}
        scores = []
        for name in names if need_scores else []:
            files = {dist: root / (
                f"scores-{content_key(states_key, name, dist, SCORES_VERSION, *([changed] if changed else []))}.pt"
            ) for dist in elementwise.DISTANCES}
            wanted = files[settings["distance"]]

            def compute(name=name, files=files, wanted=wanted):
                # One pass yields the scores of every distance; store each so either is instant later.
                peft_model.set_adapter(name)
                modalities = [own[name]] if settings["score_modalities"] == "own" else probes.modalities
                norm = final_norm(peft_model) if settings["final_norm"] else None
                tokens = {m: states["base"]["tokens"][m] for m in modalities}
                if norm is not None:
                    tokens = {m: _norm_last_layer(norm, t) for m, t in tokens.items()}
                computed = element_scores(peft_model, probes, tokens, modalities, settings["grad_batch"], norm)
                for dist, path in files.items():
                    if path != wanted:  # ``cached`` stores the wanted one
                        atomic_torch_save(computed[dist], path)
                return computed[settings["distance"]]

            # A second process (another notebook at --jobs 2) waits for the first and reuses its
            # scores; a corrupt entry is set aside with one warning and computed again.
            scores.append(cached(wanted, compute))
    finally:
        peft_model.unload()
    return {"probes": probes, "states": states, "swd": swd, "scores": scores, "names": names,
            "modalities": probes.modalities, "seconds": time.perf_counter() - t0}


def _own_modalities(names: list[str], modalities: list[str], settings: dict) -> dict[str, str]:
    """Each specialist's own modality: its name (``context.specialists`` is keyed by modality; in
    ``esmerge.run.byo`` an adapter is named after its probe span). Needed only by the official code's
    settings ``score_modalities="own"`` and ``other_weight != 1``; refused when a name is no modality."""
    if settings["score_modalities"] != "own" and settings["other_weight"] == 1.0:
        return {}
    missing = [n for n in names if n not in modalities]
    if missing:
        raise UsageError(f"es: score_modalities='own' and other_weight need each specialist named after its probe "
                         f"modality; {missing} are not among the probe's {modalities}")
    return {n: n for n in names}


@torch.no_grad()
def _norm_last_layer(norm: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Base token states ``[L, K, T, d]`` with the model's final norm applied to the last layer
    (what HF's ``hidden_states[-1]`` holds); the other layers as they are."""
    weight = next(norm.parameters())
    last = norm(tokens[-1].to(weight.device, weight.dtype)).to(tokens.dtype).cpu()
    return torch.cat([tokens[:-1], last[None]])


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


def element_scores(peft_model, probes: probe.Probes, base_tokens: dict, modalities: list[str] | None = None,
                   grad_batch: int = 1, last_norm: torch.nn.Module | None = None) -> dict:
    r"""Element scores :math:`s^{l,n}_j` (§4.3) of the active adapter, on probes whose blocks may vary in length.

    With one length per block (no mask) this is ``element_scores_by_distance`` as is. Otherwise
    each sample is run alone with its padding slots cut out: the same states as the masked batch
    (attention skips padding, positions count real tokens), and the scores are sums over
    samples, so adding the per-sample scores gives the batch's (with ``grad_batch > 1``, the
    samples' signed gradients are grouped before the absolute value).

    Parameters
    ----------
    peft_model : peft.PeftModel
        The base LLM with the specialist's adapter active.
    probes : Probes
        K probes, ``embeds [K, T, d]``, with ``attention_mask [K, T]`` when lengths vary.
    base_tokens : dict of str to Tensor, shape ``[L, K, T_m, d]``
        Modality -> base states (last layer already normed when ``last_norm`` is given).
    modalities : list of str, optional
        The blocks whose distances count (default all; the official code: the specialist's own).
    grad_batch : int
        Probes per absolute value (``esmerge.signals.gradient_batches``); 1 is the paper's.
    last_norm : torch.nn.Module, optional
        Read the last layer after this norm.

    Returns
    -------
    dict of str to dict of str to Tensor, shape ``[*shape of key]``
        Distance -> (LoRA key -> scores, float32).

    Examples
    --------
    Sample 0's block has one padding slot. Its scores are those of the sample with the slot cut
    out, added to sample 1's:

    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
    ...                                      num_attention_heads=1, num_key_value_heads=1))
    >>> model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    >>> embeds, mask = torch.randn(2, 3, 4), torch.tensor([[1, 1, 0], [1, 1, 1]])
    >>> probes = probe.Probes(embeds, {"m": torch.tensor([1, 2])}, attention_mask=mask,
    ...                       block_mask={"m": mask[:, 1:].bool()})
    >>> base = {"m": torch.zeros(2, 2, 2, 4)}
    >>> both = element_scores(model, probes, base)
    >>> first = element_scores_by_distance(model, embeds[:1, :2], {"m": torch.tensor([1])},
    ...                                    {"m": base["m"][:, :1, :1]}, progress=False)
    >>> second = element_scores_by_distance(model, embeds[1:], {"m": torch.tensor([1, 2])},
    ...                                     {"m": base["m"][:, 1:]}, progress=False)
    >>> key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    >>> torch.allclose(both["frobenius"][key], first["frobenius"][key] + second["frobenius"][key])
    True
    """
    modalities = list(probes.positions) if modalities is None else list(modalities)
    positions_all = {m: probes.positions[m] for m in modalities}
    if probes.attention_mask is None:
        return element_scores_by_distance(peft_model, probes.embeds, positions_all, base_tokens,
                                                            grad_batch=grad_batch, last_norm=last_norm)
    grouped = None
    if grad_batch != 1:
        from esmerge.signals.gradient_batches import BatchMeanScores

        grouped = BatchMeanScores(peft_model, len(probes), grad_batch, probes.embeds.shape[-1], last_norm=last_norm)
    total = None
    for k in range(len(probes)):
        real = probes.attention_mask[k].bool()
        index = real.long().cumsum(0) - 1  # position of each real token once padding is cut out
        positions, tokens = {}, {}
        for m, pos in positions_all.items():
            keep = real[pos]
            positions[m] = index[pos[keep]]
            tokens[m] = base_tokens[m][:, k:k + 1, keep]
        if grouped is not None:
            grouped.feed(probes.embeds[k:k + 1, real], positions, tokens)
            continue
        one = element_scores_by_distance(peft_model, probes.embeds[k:k + 1, real], positions, tokens,
                                                           progress=False, batch_size=1, last_norm=last_norm)
        total = one if total is None else {d: {key: total[d][key] + v for key, v in s.items()} for d, s in one.items()}
    return grouped.scores if grouped is not None else total


def _training_cells(context) -> set:
    spec = context.specialists.get("cell")
    card = getattr(spec, "card", None) or {}
    return set(card.get("training_cells", []))


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
        _own_modalities(sig["names"], modalities, dict(settings, score_modalities="own"))
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
        number of probes and the time spent on signals.

    Examples
    --------
    Identical specialists get α = 1/2 everywhere and merge to themselves (same setup as in
    ``signals``):

    >>> import tempfile, types
    >>> from pathlib import Path
    >>> from peft import LoraConfig, get_peft_model
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from esmerge.specialists.adapters import adapter_from_model
    >>> _ = torch.manual_seed(0)
    >>> llama = LlamaForCausalLM(LlamaConfig(vocab_size=8, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
    ...                                      num_attention_heads=1, num_key_value_heads=1))
    >>> peft_model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    >>> adapter = adapter_from_model(peft_model, "x"); llama = peft_model.unload()
    >>> cache = tempfile.TemporaryDirectory()
    >>> context = types.SimpleNamespace(
    ...     base=types.SimpleNamespace(model=llama, weights_sha256="tiny"), specialists={"x": None, "y": None},
    ...     probes=probe.Probes(torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}), probe_k=2, cache=Path(cache.name))
    >>> result = es_merge([adapter, adapter], context, n_projections=8)
    >>> result.info["alpha"]
    [[0.5, 0.5], [0.5, 0.5]]
    >>> all(torch.allclose(v, adapter.state[k]) for k, v in result.adapter.state.items())
    True
    >>> cache.cleanup()
    """
    settings = resolve_settings(variant, **overrides)
    sig = signals(adapters, context, seed=seed, need_scores=use_element, **settings)
    alpha, _, coefficients = coefficients_from_signals(sig, adapters[0].state, settings, use_layer, use_element)
    merged = merge_lora([a.state for a in adapters], coefficients)
    info = {"settings": settings, "variant": variant, "seed": seed, "use_layer": use_layer,
            "use_element": use_element, "signal_seconds": sig["seconds"],
            "alpha": alpha.tolist(), "probe_k": len(sig["probes"])}
    return MergeResult(with_state(adapters[0], merged, "es"), info)


@register("es", "ES-Merging", "Lee, Kim, Hwang 2026, §4 (Eq. 4)", needs_context=True, hparams=HPARAMS,
          presets=PRESETS)
def es(adapters, context=None, **hp):
    """ES-Merging method ``es``: both coefficient types, λ = α·β (paper §4.4, Eq. 4; Table 3).

    ``es_merge`` with use_layer=True and use_element=True.

    Parameters
    ----------
    adapters : list of Adapter
        The S specialists.
    context : MergeContext
        Base model, specialists, probe count and cache (see ``signals``); required.
    **hp
        The declared hyper-parameters (``HPARAMS``; ``variant`` picks the paper's or the code's).

    Returns
    -------
    MergeResult
        As ``es_merge`` returns it.

    Notes
    -----
    No doctest here: it needs a model context. ``es_merge`` has a runnable example, and
    ``tests/test_es_pipeline.py`` runs this method end to end at smoke scale.
    """
    return es_merge(adapters, context, use_layer=True, use_element=True, **hp)


@register("es-layer", "Layer-wise ES-Merging", "Lee, Kim, Hwang 2026, §4.2 (Eq. 2)", needs_context=True,
          hparams=HPARAMS, presets=PRESETS)
def es_layer(adapters, context=None, **hp):
    """ES-Merging method ``es-layer``: layer-wise coefficients only, λ = α (paper §4.2, Eq. 2; Table 3).

    ``es_merge`` with use_layer=True and use_element=False.

    Parameters
    ----------
    adapters : list of Adapter
        The S specialists.
    context : MergeContext
        Base model, specialists, probe count and cache (see ``signals``); required.
    **hp
        The declared hyper-parameters (``HPARAMS``; ``variant`` picks the paper's or the code's).

    Returns
    -------
    MergeResult
        As ``es_merge`` returns it.

    Notes
    -----
    No doctest here: it needs a model context. ``es_merge`` has a runnable example, and
    ``tests/test_es_pipeline.py`` runs this method end to end at smoke scale.
    """
    return es_merge(adapters, context, use_layer=True, use_element=False, **hp)


@register("es-element", "Element-wise ES-Merging", "Lee, Kim, Hwang 2026, §4.3 (Eq. 3)", needs_context=True,
          hparams=HPARAMS, presets=PRESETS)
def es_element(adapters, context=None, **hp):
    """ES-Merging method ``es-element``: element-wise coefficients only, λ = β (paper §4.3, Eq. 3; Table 3).

    ``es_merge`` with use_layer=False and use_element=True.

    Parameters
    ----------
    adapters : list of Adapter
        The S specialists.
    context : MergeContext
        Base model, specialists, probe count and cache (see ``signals``); required.
    **hp
        The declared hyper-parameters (``HPARAMS``; ``variant`` picks the paper's or the code's).

    Returns
    -------
    MergeResult
        As ``es_merge`` returns it.

    Notes
    -----
    No doctest here: it needs a model context. ``es_merge`` has a runnable example, and
    ``tests/test_es_pipeline.py`` runs this method end to end at smoke scale.
    """
    return es_merge(adapters, context, use_layer=False, use_element=True, **hp)
