"""ES-Merging's embedding signals (paper §4.1-4.3): probe, hidden states, SWD table, element scores.

Each piece is cached on disk, keyed by its inputs, so an interrupted merge resumes and the
ablations (``es-layer``, ``es-element``, ``variant="code"``) reuse what they share.
"""
from __future__ import annotations

import json
import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from esmerge.cache import atomic_torch_save, atomic_write_json, cached, content_key, keyed_on_device, tensor_digest
from esmerge.errors import UsageError
from esmerge.methods.es_settings import PAPER_SETTINGS, SCORE_SETTINGS, resolve_settings
from esmerge.signals import elementwise, probe, probe_states, sliced
from esmerge.signals.element_scores import element_scores_by_distance
from esmerge.signals.hooks import final_norm
from esmerge.specialists.adapters import Adapter, adapter_digest, attach

# Bumped whenever the element-score computation changes, so stale cached scores are never reused
# (2: gradients taken w.r.t. the active adapter only, when several adapters are attached).
SCORES_VERSION = 3  # 3: batched element scores (same values to ~4e-7 relative)


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
        "modalities", "seconds", "cost"}``: ``scores`` is empty when ``need_scores`` is false, ``names``
        are the specialists in order, ``modalities`` the SWD table's modality order, ``cost`` piece ->
        what computing it took (``counted``; ``es.signal_cost`` sums them).

    Examples
    --------
    A tiny LLaMA, one adapter used twice (as specialists x and y) and 2 ready-made probes with one
    modality block; the cache lives in a temporary folder:

    >>> import tempfile, types
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
    >>> sig = signals([adapter, adapter], context, n_projections=8)
    >>> sig["swd"].shape, sig["names"], sig["modalities"], len(sig["scores"])  # [S, M, L]
    (torch.Size([2, 1, 2]), ['x', 'y'], ['m'], 2)
    >>> torch.equal(sig["swd"][0], sig["swd"][1])  # the same adapter twice: the same signal
    True
    >>> sig["cost"]["states"]["flops"] > 0, sig["cost"]["states"]["cached"]  # forward passes, counted
    (True, False)
    >>> signals([adapter, adapter], context, n_projections=8)["cost"]["scores/y"]["cached"]  # read back with its cost
    True
    >>> cache.cleanup()
    """
    settings = resolve_settings(**settings)
    base = context.base
    names = list(context.specialists)
    projectors = {m: s.projector for m, s in context.specialists.items() if getattr(s, "projector", None) is not None}
    given = getattr(context, "probes", None)  # ready-made probes (bring your own adapters: esmerge.run.byo)
    k = context.probe_k * (len(names) if settings["probe_layout"] == "code" else 1)
    base_id = keyed_on_device(base.weights_sha256, base.model)
    if given is not None:
        probe_key = content_key(base_id, "given", tensor_digest(_probe_tensors(given)))
    else:
        probe_key = content_key(base_id, k, seed,
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

    pieces: dict[str, dict] = {}  # what computing each piece cost, as recorded beside its cache entry
    stored, pieces["probes"] = counted(root / f"probes-{probe_key}.pt",
                                       (lambda: _probe_record(given)) if given is not None else make_probes)
    probes = probe.Probes(stored["embeds"], stored["positions"], stored["raw"], stored["template"],
                          stored.get("attention_mask"), stored.get("block_mask", {}))
    own = own_modalities(names, probes.modalities, settings)

    peft_model = attach(base.model, dict(zip(names, adapters)))
    try:
        states, pieces["states"] = counted(root / f"states-{states_key}.pt",
                                           lambda: probe_states.collect_states(peft_model, names, probes))
        equal = settings["equal_size"]
        if equal == "min":
            equal = len(probes)
        swd_parts = [states_key, settings["n_projections"], settings["p"], seed, settings["standardize"], equal]
        if settings["projections"] != "shared":
            swd_parts.append({"projections": settings["projections"]})
        swd, pieces["swd"] = counted(root / f"swd-{content_key(*swd_parts)}.pt", lambda: sliced.swd_table(
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
            # scores; a corrupt entry is set aside with one warning and computed again. The other
            # distances' entries came from the same pass, so they share its cost record.
            value, pieces[f"scores/{name}"] = counted(wanted, compute, also=[p for p in files.values() if p != wanted])
            scores.append(value)
    finally:
        peft_model.unload()
    return {"probes": probes, "states": states, "swd": swd, "scores": scores, "names": names,
            "modalities": probes.modalities, "seconds": time.perf_counter() - t0, "cost": pieces}


def own_modalities(names: list[str], modalities: list[str], settings: dict) -> dict[str, str]:
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
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> llama = tiny_llama()
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


# --------------------------------------------------------------------------- cost of the signals (Table 4)
NOT_RECORDED = "not recorded (cached before counting)"


@contextmanager
def peak_memory():
    """Peak memory of the block, in a dict filled on exit: ``peak_memory_mib`` and ``peak_memory_kind``.

    CUDA (initialised on exit): ``torch.cuda.max_memory_allocated`` over the block (counter reset on entry);
    CPU: the process's RSS high-water mark on exit (``ru_maxrss``; no per-call peak without tracing every
    allocation), an upper bound, model included. The kind says which.

    >>> with peak_memory() as memory:
    ...     _ = torch.ones(1000) @ torch.ones(1000)
    >>> memory["peak_memory_mib"] > 0, memory["peak_memory_kind"].split(":")[0] in ("cpu", "cuda")
    (True, True)
    """
    record: dict = {}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    try:
        yield record
    finally:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            record.update(peak_memory_mib=torch.cuda.max_memory_allocated() / 2**20,
                          peak_memory_kind="cuda: torch.cuda.max_memory_allocated during the search")
        else:  # ru_maxrss: KiB on Linux, bytes on macOS
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
            record.update(peak_memory_mib=rss, peak_memory_kind=(
                "cpu: process RSS high-water mark after the search (ru_maxrss; an upper bound, model included)"))


def cost_sidecar(path: Path) -> Path:
    """Where the cost of computing cache entry ``path`` is kept: hidden, so entry listings stay as before.

    >>> cost_sidecar(Path("cache/scores-ab12.pt")).as_posix()
    'cache/.scores-ab12.pt.cost.json'
    """
    return Path(path).with_name(f".{Path(path).name}.cost.json")


class FlopCount(TorchDispatchMode):
    """``FlopCounterMode``'s count (its ``flop_registry``: matmuls, convolutions, attention, forward and
    backward) with every op run as it is: FlopCounterMode decomposes ops it has no formula for, and
    ``silu_backward`` decomposed moves float32 gradients by ~1e-7, so element scores would change.
    The decomposed ops are elementwise, which it does not count either: the totals are the same.

    >>> with FlopCount() as counter:
    ...     _ = torch.ones(2, 3) @ torch.ones(3, 4)
    >>> counter.flops  # 2 FLOPs per multiply-add: 2 * 2 * 3 * 4
    48
    """

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (formula := flop_registry.get(func._overloadpacket)) is not None:
            self.flops += int(formula(*args, **(kwargs or {}), out_val=out))
        return out


def counted(path: Path, compute, also: list[Path] = ()) -> tuple[object, dict]:
    """``cached(path, compute)`` (same value, same key) and what computing it cost.

    When ``compute`` runs, its FLOPs (``FlopCount``: every forward and backward pass),
    seconds and ``peak_memory`` go atomically, under the entry's lock, to ``cost_sidecar`` of
    ``path`` and of ``also`` (entries the same pass wrote), so a cache hit reports them with
    ``cached: True``; an entry stored before costs were recorded gives ``flops: None``, ``NOT_RECORDED``.

    >>> import tempfile; folder = Path(tempfile.mkdtemp())
    >>> value, cost = counted(folder / "x.pt", lambda: torch.ones(2, 3) @ torch.ones(3, 4))
    >>> value.shape, cost["flops"], cost["cached"], counted(folder / "x.pt", lambda: None)[1]["flops"]
    (torch.Size([2, 4]), 48, False, 48)
    """
    fresh: dict = {}

    def run():
        start = time.perf_counter()
        with peak_memory() as memory, FlopCount() as counter:
            value = compute()
        fresh.update(flops=counter.flops, seconds=time.perf_counter() - start, **memory)
        for target in (path, *also):
            atomic_write_json(cost_sidecar(target), fresh)
        return value

    value = cached(path, run)
    if fresh:
        return value, {**fresh, "cached": False}
    try:
        stored = json.loads(cost_sidecar(path).read_text())
    except (OSError, ValueError):
        stored = {"flops": None, "seconds": None, "note": NOT_RECORDED}
    return value, {**stored, "cached": True}

