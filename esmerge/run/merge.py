"""Running a merge method on a scale's models and writing the merged model: ``esmerge merge`` as a library.

``build_context`` loads the base and the specialists; ``run_merge`` validates the
hyper-parameters, checks that every specialist was trained on this base's weights, runs the
method and writes the merged-model directory (``esmerge.specialists.adapters.save_merged``: atomic, locked,
refusing an existing output unless ``force``, and never replacing one of the run's inputs:
``merge_inputs``); ``merge_once`` does the same unless the directory already holds this exact
merge (resume). Two processes running the same ``merge_once`` (two regenerations sharing a runs
folder) both succeed: the one that publishes second finds the first's identical merge under the
publish lock and keeps it, instead of failing on a check made before it computed.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from esmerge import methods, scales
from esmerge.cache import cache_dir
from esmerge.errors import UsageError
from esmerge.scales import ScaleConfig
from esmerge.signals.probe import Probes
from esmerge.specialists.adapters import (
    Adapter,
    AdapterMismatchError,
    adapter_digest,
    is_merged,
    load_merged,
    refuse_existing,
    save_merged,
)
from esmerge.specialists.base_llm import BaseModel, load_base, same_base_name
from esmerge.specialists.load import PAPER_BASE_ENV, Specialist, paper_base  # noqa: F401 (PAPER_BASE_ENV re-exported)
from esmerge.specialists.per_scale import load_specialists
from esmerge.specialists.raw_encoder import RawEncoder


def check_probe_k(probe_k) -> int:
    """``probe_k`` if it is an integer >= 1, else a ``UsageError`` (0 used to mean "the default").

    >>> check_probe_k(8)
    8
    >>> check_probe_k(0)
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: probe_k must be an integer >= 1 (probe samples per modality), got 0
    """
    if isinstance(probe_k, bool) or not isinstance(probe_k, int) or probe_k < 1:
        raise UsageError(f"probe_k must be an integer >= 1 (probe samples per modality), got {probe_k!r}")
    return probe_k


@dataclass
class MergeContext:
    """What data-aware merging methods need besides the adapters.

    Attributes:
        base: the base LLM.
        specialists: name -> ``Specialist`` (adapter, projector, card), in merge order.
        scale, seed: run settings.
        probe_k: probe samples per modality (paper: 110).
        cache: directory for cached intermediates (probes, states, SWD, scores).
        extras: the optional inputs of some methods, by name (``EXTRAS``); each is also an attribute
            (``None`` until set): what ``run.baseline_inputs`` builds for AdaMerging and Avg+FT,
            ready-made probes and what ``run.byo`` records.
    """

    base: BaseModel | None
    specialists: dict[str, Specialist]
    scale: str = "cpu"
    seed: int = 0
    probe_k: int = 110
    cache: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_probe_k(self.probe_k)
        unknown = sorted(set(self.extras) - set(EXTRAS))
        if unknown:
            raise UsageError(f"MergeContext: unknown extras {unknown}; known: {', '.join(EXTRAS)}")

    @property
    def entropy_objective(self) -> Callable | None:
        """AdaMerging's objective: LoRA state -> mean entropy on unlabeled prompts."""
        return self.extras.get("entropy_objective")

    @property
    def adamerging_prompts(self) -> int | None:
        """How many unlabeled prompts the entropy objective cycles through."""
        return self.extras.get("adamerging_prompts")

    @property
    def train_loss(self) -> Callable | None:
        """Avg+FT's loss: (LoRA state, batch) -> mean NLL of the gold answers."""
        return self.extras.get("train_loss")

    @property
    def train_batches(self) -> list | None:
        """Avg+FT's training batches."""
        return self.extras.get("train_batches")

    @property
    def benchmark(self) -> str | None:
        """The benchmark Avg+FT fine-tunes on."""
        return self.extras.get("benchmark")

    @property
    def probes(self) -> Probes | None:
        """Ready-made probes (bring your own adapters), used as given instead of sampled ones."""
        return self.extras.get("probes")

    @property
    def record(self) -> dict:
        """What ``esmerge.json`` records besides the merge (e.g. ``run.byo``'s base and adapter paths)."""
        return self.extras.get("record") or {}


# The optional inputs a MergeContext can carry, each an attribute of it.
EXTRAS = ("entropy_objective", "adamerging_prompts", "train_loss", "train_batches", "benchmark", "probes", "record")


def check_base(base, specialists: dict) -> None:
    """Refuse specialists not trained on ``base``'s weights (``AdapterMismatchError``, one line).

    The authority is the weights hash: a specialist's card records ``base_weights_sha256``,
    compared with ``base.weights_sha256``. Without a recorded hash, the adapter's
    ``base_model_name_or_path`` must name this base (``base.name``). A base without a known
    hash (``None``) or no base at all (parameter-space use) is not checked.
    """
    if base is None or not getattr(base, "weights_sha256", None):
        return
    for modality, spec in specialists.items():
        card = getattr(spec, "card", None) or {}
        recorded = card.get("base_weights_sha256")
        if recorded is not None:
            if recorded != base.weights_sha256:
                raise AdapterMismatchError(
                    f"{modality} specialist was trained on base weights {recorded[:12]}..., but the base is "
                    f"{base.name} ({base.weights_sha256[:12]}...); use specialists trained on this base")
            continue
        named = (spec.adapter.config or {}).get("base_model_name_or_path")
        if named and not same_base_name(named, base.name):
            raise AdapterMismatchError(
                f"{modality} adapter names base {named!r} and records no base weights hash, but the base is "
                f"{base.name}; merge adapters trained on this base")


def build_context(config: ScaleConfig, seed: int = 0, probe_k: int | None = None, *, base_path: str | None = None,
                  specialists_dir: str | Path | None = None, specialist_seed: int = 0, base: BaseModel | None = None,
                  **extras) -> MergeContext:
    """Load the base and the three specialists of the scale ``config`` into a ``MergeContext``.

    ``seed`` seeds the merge (probe sample, projections, baselines' data); ``specialist_seed`` is
    the training seed of the specialists (``config.specialist_seeds``; see
    ``specialists.per_scale.load_specialists``). ``probe_k``: probe samples per modality, default
    ``config.probe_k``. At ``paper``
    scale the base is ``paper_base(base_path)`` (hub id or local folder) and the specialists are
    read from ``specialists.paper_specialists_dir(specialists_dir)``; both are refused elsewhere.
    ``base``: the scale's base, already loaded (another specialist seed's context), used as it is
    rather than loaded again (nothing changes a base: merges and evaluation work on copies of it).
    """
    scale = config.name
    k = config.probe_k if probe_k is None else check_probe_k(probe_k)
    if scale != "paper" and (base_path or specialists_dir):
        raise UsageError(f"a base path and a specialists folder are paper-scale settings, not {scale!r} ones; "
                         "to merge your own adapters use esmerge.run.byo.merge_adapters "
                         "(esmerge merge --base ... --adapter ...)")
    if scale == "paper":
        base = base or load_base(config, seed=seed, model_id=paper_base(base_path))
        specs = load_specialists(config, base, root=specialists_dir)
    else:
        base = base or load_base(config, seed=seed)
        specs = load_specialists(config, base, seed=specialist_seed)
    check_base(base, specs)
    return MergeContext(base, specs, scale, seed, k, cache_dir() / "es" / scale, dict(extras))


def _projector_states(context: MergeContext) -> dict:
    # A paper-scale encoder (ESM-2-3B inside) is not copied into every merge: the merge names its
    # specialist folder instead (``encoder_folders``).
    return {m: {k: v.contiguous() for k, v in s.projector.state_dict().items()}
            for m, s in context.specialists.items()
            if getattr(s, "projector", None) is not None and not isinstance(s.projector, RawEncoder)}


def encoder_folders(context: MergeContext) -> dict[str, str]:
    """modality -> folder of the specialist whose own encoder the merged model uses (paper scale)."""
    return {m: str(s.path) for m, s in context.specialists.items()
            if isinstance(getattr(s, "projector", None), RawEncoder)}


def compute_device(context: MergeContext) -> str:
    """The type of device the context's base runs on (``"cpu"`` without a base): a merge made elsewhere
    records it, and is not taken for the CPU's (``holds_merge``)."""
    model = getattr(context.base, "model", None)
    return next(model.parameters()).device.type if model is not None else "cpu"


def specialist_digests(context: MergeContext) -> dict[str, str]:
    """modality -> content hash of its adapter: what a merge's ``esmerge.json`` records."""
    return {m: adapter_digest(s.adapter) for m, s in context.specialists.items()}


def merge_inputs(context: MergeContext) -> list[Path]:
    """The files and folders a merge reads: each specialist's folder, the base's local folder, and
    (``esmerge.run.byo``) the adapters and probe file it records. ``--force`` never replaces one of them."""
    found = [getattr(s, "path", None) for s in context.specialists.values()]
    record = context.record
    found += list((record.get("adapters") or {}).values()) + [record.get("probe_file")]
    for base in (record.get("base"), getattr(context.base, "name", None)):
        if isinstance(base, str) and base not in scales.NAMES and os.path.exists(base):
            found.append(base)
    return [Path(p) for p in found if p]


def run_merge(method: str, out: str | Path, context: MergeContext, force: bool = False, **hparams) -> Path:
    """Merge the context's specialists with ``method`` and write a merged-model directory to ``out``.

    Hyper-parameters are validated before any work; an existing ``out`` is refused unless
    ``force``. The directory holds the PEFT adapter, each specialist's projector (the merged
    MLLM keeps every modality's encoder) and ``esmerge.json`` with the method,
    hyper-parameters and cost, written last (``esmerge.specialists.adapters.save_merged``).
    """
    return write_merge(method, out, context, methods.validate(method, hparams), force)


def write_merge(method: str, out: str | Path, context: MergeContext, hparams: dict, force: bool = False,
                same=None) -> Path:
    """``run_merge`` with hyper-parameters ``methods.validate`` already returned (each entry point
    validates once, before any model work). ``same``: see ``save_merged``."""
    inputs = merge_inputs(context)
    refuse_existing(out, force, inputs)
    check_base(context.base, context.specialists)
    adapters = [spec.adapter for spec in context.specialists.values()]
    start = time.perf_counter()
    result = methods.run_checked(method, adapters, context, hparams)
    seconds = time.perf_counter() - start
    meta = {
        "method": method,
        "pretty_name": methods.get(method).pretty_name,
        "hparams": hparams,
        "scale": context.scale,
        "seed": context.seed,
        "specialists": specialist_digests(context),
        "wall_seconds": seconds,
        "info": result.info,
    }
    if compute_device(context) != "cpu":  # absent means the CPU, as in every merge made before devices
        meta["device"] = compute_device(context)
    if encoder_folders(context):
        meta["encoders"] = encoder_folders(context)
    meta |= context.record  # e.g. esmerge.run.byo: the base and adapter paths
    return save_merged(out, result.adapter, meta, _projector_states(context), force=force, inputs=inputs, same=same)


def _same(a, b) -> bool:
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def holds_merge(out: str | Path, method: str, hparams: dict, specialists: dict, device: str = "cpu") -> bool:
    """True when ``out`` is a finished merge of ``method`` with these hyper-parameters and specialists,
    made on this type of ``device``."""
    if not is_merged(out):
        return False
    try:
        meta = json.loads((Path(out) / "esmerge.json").read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    return meta.get("method") == method and _same(meta.get("hparams", {}), hparams) \
        and meta.get("specialists") == specialists and meta.get("device", "cpu") == device


def merge_once(method: str, out: str | Path, context: MergeContext, refresh: bool = False,
               **hparams) -> tuple[Adapter, dict]:
    """``run_merge`` unless ``out`` already holds this method's result for the same hyper-parameters
    and specialists (resume after an interruption). Returns (adapter with extras, esmerge.json).

    A finished merge with other settings in ``out`` is replaced (a notebook rerun with new
    parameters); anything else in ``out`` is refused, even with ``refresh``. Race-free: if another
    process publishes this same merge while this one computes, its copy is kept and this one's
    dropped (``save_merged(same=...)``, decided under the publish lock).
    """
    hparams = methods.validate(method, hparams)
    out = Path(out)
    digests, device = specialist_digests(context), compute_device(context)
    if refresh or not holds_merge(out, method, hparams, digests, device):
        same = None if refresh else (lambda existing: holds_merge(existing, method, hparams, digests, device))
        # force: an earlier merge here (any settings, or one published meanwhile) is replaced
        write_merge(method, out, context, hparams, force=True, same=same)
    merged = load_merged(out, name=method)
    return merged.adapter, merged.meta


# --------------------------------------------------------------------------- what `esmerge merge` calls
def merge_command(config: ScaleConfig, method: str, out: str | Path, hparams: dict, seed: int = 0,
                  probe_k: int | None = None, force: bool = False, *, base_path: str | None = None,
                  specialists_dir: str | Path | None = None) -> Path:
    """What ``esmerge merge`` does: every check that needs no model first, then load, merge, write.

    ``base_path``/``specialists_dir`` (paper scale only): see ``build_context``. ``hparams``: as given, or
    what ``methods.validate`` returned (the CLI's one check), which passes through unchecked.
    """
    hparams = methods.validate(method, hparams)
    if method in methods.needing("data"):  # refused before any weight is loaded
        raise UsageError(f"--method {method} trains on benchmark prompts (a test-time objective or a fine-tuning "
                         "loop), which `esmerge merge` does not build; chapter 6 runs it: `esmerge regenerate "
                         f"--scale {config.name} --only 06_merging` (budgets in esmerge.scales.MergeBudgets)")
    if probe_k is not None:
        check_probe_k(probe_k)
    given = [p for p in (base_path, specialists_dir) if p and str(p) not in scales.NAMES and os.path.exists(p)]
    refuse_existing(out, force, given)  # run_merge checks every input again once they are loaded
    context = build_context(config, seed, probe_k, base_path=base_path, specialists_dir=specialists_dir)
    return write_merge(method, out, context, hparams, force=force)
