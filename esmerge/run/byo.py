r"""Bring your own adapters: ES-Merging (or any baseline) of any PEFT LoRA adapters on one base.

``esmerge merge --base HF_ID_OR_PATH --adapter NAME=PATH ... --probe PROBES.jsonl --method es --out DIR``
is :func:`merge_adapters`. Nothing here is biological: the probes are plain text, and the spans
marked in it play the part of the modality token blocks of the paper's probe (§4.1): their
states under the base and under each adapter give the SWD table (Eq. 2) and the element scores
(Eq. 3).

Probe file (JSON Lines, UTF-8): one probe sample per line, an object with a ``"text"`` string in
which each span is marked ``[[name]]...[[/name]]``. ``name`` is a free label of what the span
holds (a "modality": ``code``, ``math``, ``legal``...). Every line marks the same names, each
exactly once, in the same order (one span per modality per sample, as the paper's probe holds
one block per modality); spans do not nest and are never empty. Lines that are empty or start
with ``//`` are skipped. The text is wrapped in the base's chat template as a user turn when the
tokenizer has one (``chat=False``: as is). Example line::

    {"text": "Simplify [[math]]2x + 3x = 10[[/math]] and explain [[code]]sum(range(5))[[/code]]."}

Spans and the text between them may differ in length between lines: every piece is padded to its
longest version and the padding is masked out (``probe.Probes.attention_mask``), positions count
real tokens only. Each piece is tokenised on its own, so a token never straddles a marker.

Span names are free labels: they need not be adapter names, and ES-Merging reads every span for
every adapter (its SWD table compares the base's and each adapter's states on each span). Only
the official code's settings (``--set variant=code``, ``score_modalities=own`` or
``other_weight`` other than 1) score each adapter on its own span: then every adapter must be
named after a span, which is checked before the base loads (``check_span_names``).
``check_probe_texts`` validates the whole file before the base loads and counts, per span name,
its probes and whitespace-separated words (``esmerge merge`` prints them; ``esmerge.json``
records them with the tokens, ``probe_spans``).

``space="product"`` (``--space product``, ``avg`` and ``ties`` only) merges each module's
``Delta W = s B A`` instead of the factors and returns a rank-k LoRA by truncated SVD
(``esmerge.methods.product_space``); ``dtype`` (``--dtype``) is how the base is loaded: ``auto``
is float32 on the CPU and bfloat16 on CUDA.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from esmerge import methods, scales
from esmerge.cache import cache_dir
from esmerge.errors import UsageError, check_seed
from esmerge.run.merge import MergeContext, check_base, merge_inputs, run_merge, specialist_digests
from esmerge.run.probe_file import check_probe_texts, check_span_names, probe_summary, read_probe_file, text_probes
from esmerge.run.user_adapters import (
    check_adapter_name,
    check_fits_base,
    load_base_for,
    read_adapter,
    resolve_dtype,
    same_recorded_base,
)
from esmerge.specialists.adapters import (
    BASE_NAME,
    Adapter,
    check_compatible,
    refuse_existing,
    save_merged,
)
from esmerge.specialists.load import Specialist
from esmerge.specialists.lora_layout import normalise

SPACES = ("factors", "product")  # what avg and ties merge: the LoRA factors (Eq. 1/4) or each module's B A
def check_method(method: str) -> None:
    """Refuse a method that needs task data (AdaMerging's test prompts, Avg+FT's training set)."""
    spec = methods.get(method)
    if {"data", "labels"} & set(spec.needs):
        usable = [m for m in methods.names() if not {"data", "labels"} & set(methods.get(m).needs)]
        raise UsageError(f"method {method!r} needs task data, which bring-your-own merging does not have; "
                         f"choose one of {', '.join(usable)}")


# --------------------------------------------------------------------------- the merge
def check_space(space: str, method: str, hparams: dict, rank: int | None) -> None:
    """Refuse a ``--space``/``--rank`` that does not apply, in one line, before anything is read."""
    if space not in SPACES:
        raise UsageError(f"--space {space!r}: choose factors (merge A and B, the paper's way) or product "
                         "(merge each module's B A, avg and ties only)")
    if space == "factors":
        if rank is not None:
            raise UsageError("--rank sets the rank of a product-space merge; add --space product or drop --rank")
        return
    from esmerge.methods import product_space

    product_space.check_space(method, hparams, rank)


def run_product_merge(method: str, out: str | Path, context: MergeContext, hparams: dict, rank: int | None = None,
                      force: bool = False, rounding: str = "esmerge") -> Path:
    """``run_merge`` for ``--space product``: merge each module's ``Delta W`` (``methods.product_space``) and
    write the merged-model directory; ``esmerge.json`` records each module's relative reconstruction error."""
    from esmerge.methods import product_space

    inputs = merge_inputs(context)
    refuse_existing(out, force, inputs)
    check_base(context.base, context.specialists)
    adapters = [spec.adapter for spec in context.specialists.values()]
    check_compatible(adapters)  # one layout (lora_layout.normalise ran)
    weights = next(context.base.model.parameters(), None)
    start = time.perf_counter()
    adapter, info = product_space.merge(adapters, method, hparams, rank, rounding,
                                        device=weights.device.type if weights is not None else None)
    meta = {"method": method, "pretty_name": f"{methods.get(method).pretty_name} (product space)",
            "hparams": hparams, "scale": context.scale, "seed": context.seed,
            "specialists": specialist_digests(context), "wall_seconds": time.perf_counter() - start, "info": info}
    meta |= context.record
    return save_merged(out, adapter, meta, force=force, inputs=inputs)


def merge_adapters(base: str, adapters: dict[str, str | Path], probes: str | Path | None, out: str | Path,
                   method: str = "es", hparams: dict | None = None, *, force: bool = False, seed: int = 0,
                   chat: bool = True, dtype: str | torch.dtype | None = None, device: str | None = None,
                   space: str = "factors", rank: int | None = None, report=None) -> Path:
    """ES-merge (or merge with any method that needs no task data) PEFT LoRA adapters on one base.

    Args:
        base: a hub id or local directory of the base LLM, or ``"smoke"``/``"cpu"`` for this
            project's bases (the shipped specialists' base).
        adapters: name -> PEFT LoRA directory; at least two. Ranks, alphas and target modules may
            differ (``lora_layout.normalise``).
        probes: the JSON Lines probe file (module docstring); needed by ``es``, ``es-layer`` and
            ``es-element``, ignored by the parameter-space methods (``esmerge merge`` refuses it there).
        out: the merged-model directory (``adapters.save_merged``), refused if it exists unless ``force``.
        method, hparams: a registry method and its hyper-parameters (``esmerge methods``).
        seed: the run's seed in ``esmerge.json`` (ES-Merging's probe/SWD seed is its hyper-parameter
            ``seed``, e.g. ``hparams={"seed": 1}``); chat: wrap probe texts in the chat template.
        dtype, device: how the base is loaded (``resolve_dtype``: default ``auto``, bfloat16 on CUDA and
            float32 on the CPU; an HF base goes to ``device_map="auto"`` with a GPU).
        space, rank: ``"factors"`` (default: A and B merged separately) or ``"product"`` (``avg``/``ties``
            of each module's ``B A``, back to a rank-``rank`` LoRA; default the largest input rank).
        report: called with one line per fact worth printing before the long work (the probe counts).

    Returns ``out``. Every check that needs no model runs before the base is loaded.
    """
    hparams = methods.validate(method, {} if hparams is None else hparams)  # checked values pass through
    check_method(method)
    check_space(space, method, hparams, rank)
    for name in adapters:
        check_adapter_name(name)
    check_seed(seed, "seed")
    if len(adapters) < 2:
        raise UsageError(f"merging needs at least two adapters, got {len(adapters)} (--adapter NAME=PATH, repeated)")
    torch_dtype = resolve_dtype(dtype, base, device)
    refuse_existing(out, force)
    loaded = {name: read_adapter(name, path) for name, path in adapters.items()}
    originals = [Adapter(a.state, a.config, name) for name, (a, _) in loaded.items()]
    check_compatible(originals, same_layout=False, same_base=same_recorded_base)  # what no layout fixes
    normalised, layout = normalise(originals)
    texts = spans = None
    if method in methods.needing("probe"):
        if probes is None:
            raise UsageError(f"method {method!r} reads the base's and adapters' states on probes: "
                             "pass --probe PROBES.jsonl")
        texts = read_probe_file(probes)
        spans = check_probe_texts(texts, str(probes))
        check_span_names(method, hparams, list(spans), list(adapters), str(probes))
        if report is not None:
            report(probe_summary(probes, spans))
    model = load_base_for(base, torch_dtype, device, with_tokenizer=texts is not None)
    for name, (adapter, card) in loaded.items():
        check_fits_base(name, adapter, card, model)
    # Each fits this base now (by weights or name): one recorded base for all, the first adapter's, so the
    # methods' own check (same names) agrees and the merged config names the base as the first adapter did.
    recorded = next((a.config.get(BASE_NAME) for a in normalised if a.config.get(BASE_NAME)), None)
    normalised = [Adapter(a.state, dict(a.config, **{BASE_NAME: recorded}), a.name, a.extras) if recorded else a
                  for a in normalised]
    # Checked above: each card records this base (run_merge's own check reads the hash).
    specialists = {adapter.name: Specialist(adapter.name, adapter, None, {"base_weights_sha256": model.weights_sha256},
                                            Path(adapters[adapter.name]))
                   for adapter in normalised}
    record = {"base": str(base), "adapters": {n: str(p) for n, p in adapters.items()},
              "probe_file": str(probes) if texts else None, "space": space,
              "dtype": str(torch_dtype).removeprefix("torch.")}
    if layout["changed"]:
        record["normalised"] = layout
    extras = {"record": record}
    k = 1
    if texts is not None:
        given = text_probes(model.tokenizer, model.model.get_input_embeddings(), texts, chat, str(probes))
        extras["probes"], k = given, len(given)
        for name, count in spans.items():
            real = given.block_mask[name].sum() if name in given.block_mask else k * len(given.positions[name])
            count["tokens"] = int(real)
        record["probe_spans"] = spans
    label = base if base in scales.NAMES[:2] else "byo"
    context = MergeContext(model, specialists, label, seed, k, cache_dir() / "es" / "byo", extras)
    if space == "product":
        return run_product_merge(method, out, context, hparams, rank, force=force)
    return run_merge(method, out, context, force=force, **hparams)
