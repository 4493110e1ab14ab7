"""Models under test: a base LLM, its LoRA adapter(s) and the projectors it reads entities with.

``ModelUnderTest`` has one constructor per kind of model of Tables 1-3 (base, specialist, merged,
one adapter per benchmark); ``PeftCopies`` holds the one PEFT copy of a base that every adapter is
loaded into in turn; ``merged_models`` finds the merged models a merging run wrote.
"""
from __future__ import annotations

import copy
import hashlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from torch import nn

from esmerge.cache import keyed_on_device, tensor_digest
from esmerge.paths import MERGE_ROOT_EXTRAS
from esmerge.specialists.adapters import Adapter, attach, is_merged, load_lora_state, load_merged, lora_config_of


@dataclass
class ModelUnderTest:
    """A base LLM, an optional LoRA adapter and the projectors of the modalities it reads as tokens.

    ``adapter_for_benchmark`` (EMR-Merging) returns a task-specific adapter per benchmark and takes
    precedence over ``adapter``. Use the constructors ``base_only``, ``specialist``, ``merged``, ``emr``.
    """

    name: str
    base: object  # models.BaseModel
    adapter: Adapter | None = None
    projectors: dict[str, nn.Module] = field(default_factory=dict)
    adapter_for_benchmark: Callable[[str], Adapter] | None = None

    @classmethod
    def base_only(cls, base, name: str = "base") -> "ModelUnderTest":
        return cls(name, base)

    @classmethod
    def specialist(cls, base, spec, name: str | None = None) -> "ModelUnderTest":
        """A specialist: its adapter and only its own projector (other modalities as text)."""
        projectors = {spec.modality: spec.projector} if spec.projector is not None else {}
        return cls(name or f"specialist-{spec.modality}", base, spec.adapter, projectors)

    @classmethod
    def merged(cls, base, adapter: Adapter, projectors: dict[str, nn.Module], name: str) -> "ModelUnderTest":
        """A merged model: one adapter and every specialist's projector."""
        return cls(name, base, adapter, {m: p for m, p in projectors.items() if p is not None})

    @classmethod
    def emr(cls, base, adapter_for_benchmark: Callable[[str], Adapter], projectors: dict[str, nn.Module],
            name: str = "emr") -> "ModelUnderTest":
        return cls(name, base, None, {m: p for m, p in projectors.items() if p is not None}, adapter_for_benchmark)

    def adapter_for(self, benchmark: str) -> Adapter | None:
        return self.adapter_for_benchmark(benchmark) if self.adapter_for_benchmark else self.adapter

    def model_id(self, benchmark: str) -> str:
        """Hash of base weights, the adapter used on ``benchmark``, the projectors and, unless it is
        float32, the dtype the base runs in (so fp32 and bf16 results never share a cache entry,
        while fp32 ids stay what they were before dtypes were recorded); likewise the device, unless
        it is the CPU (``cache.keyed_on_device``)."""
        adapter = self.adapter_for(benchmark)
        parts = [keyed_on_device(self.base.weights_sha256 or self.base.name, self.base.model),
                 tensor_digest(adapter.state) if adapter is not None else "no-adapter"]
        for modality in sorted(self.projectors):
            parts.append(f"{modality}:{tensor_digest(self.projectors[modality].state_dict())}")
        dtype = next(self.base.model.parameters()).dtype
        if dtype != torch.float32:
            parts.append(f"dtype:{str(dtype).removeprefix('torch.')}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @contextmanager
    def model_for(self, benchmark: str, copies: "PeftCopies | None" = None):
        """The torch model to score ``benchmark`` with: ``base.model`` itself, or the PEFT copy of it
        in ``copies`` (a fresh ``PeftCopies`` when None) with this run's adapter loaded;
        ``base.model`` is never modified."""
        adapter = self.adapter_for(benchmark)
        yield self.base.model if adapter is None else (copies or PeftCopies()).load(self.base, adapter)


class PeftCopies:
    """One PEFT copy per base model, into which each adapter under test is loaded in turn.

    PEFT injects LoRA layers into the module it wraps, hence a copy; keeping one per base (rather
    than one per adapter) bounds memory to one extra base whatever the number of models swept.
    With ``merge=True`` (the default) the loaded adapter is merged into the copy's weights
    (``W + s B A``, PEFT's ``merge_adapter``), so a forward pass costs what the base's does: no
    per-module LoRA matmuls. Before the next adapter is loaded the copy is unmerged and its
    weights are copied back from ``base.model``, so merging never accumulates rounding error
    across adapters. ``merge=False`` keeps PEFT's unmerged forward (for gradients through LoRA).
    """

    def __init__(self, merge: bool = True):
        self.merge = merge
        self._copies: dict[int, tuple[nn.Module, nn.Module]] = {}

    def load(self, base, adapter: Adapter) -> nn.Module:
        """The copy of ``base.model`` holding ``adapter``'s tensors (created on first use)."""
        key = id(base.model)
        if key not in self._copies or self._copies[key][0] is not base.model:
            self._copies[key] = (base.model, attach(copy.deepcopy(base.model), {"default": adapter}).eval())
            return self._merged(self._copies[key][1])
        wrapper = self._copies[key][1]
        have, want = wrapper.peft_config["default"], lora_config_of(adapter)
        if ((have.r, have.lora_alpha, sorted(have.target_modules))
                != (want.r, want.lora_alpha, sorted(want.target_modules))):
            raise ValueError(f"adapter {adapter.name!r} has r={want.r}, alpha={want.lora_alpha}, targets="
                             f"{sorted(want.target_modules)}; the evaluation copy holds r={have.r}, "
                             f"alpha={have.lora_alpha}, targets={sorted(have.target_modules)}")
        if _lora_merged_in(wrapper):
            wrapper.unmerge_adapter()
            _restore_base_weights(wrapper, base.model)
        load_lora_state(wrapper, adapter.state)
        return self._merged(wrapper)

    def _merged(self, wrapper: nn.Module) -> nn.Module:
        if self.merge:
            wrapper.merge_adapter()
        return wrapper


def _lora_layers(wrapper: nn.Module):
    """``(name in the wrapped model, LoRA layer)`` of every module PEFT injected."""
    from peft.tuners.lora import LoraLayer  # peft is imported lazily everywhere in esmerge (heavy)

    prefix = "base_model.model."
    return [(name.removeprefix(prefix), m) for name, m in wrapper.named_modules() if isinstance(m, LoraLayer)]


def _lora_merged_in(wrapper: nn.Module) -> bool:
    return any(m.merged for _, m in _lora_layers(wrapper))


@torch.no_grad()
def _restore_base_weights(wrapper: nn.Module, model: nn.Module) -> None:
    """Copy ``model``'s weights back into the wrapper's LoRA base layers (undoes unmerge's rounding)."""
    for name, layer in _lora_layers(wrapper):
        layer.get_base_layer().weight.copy_(model.get_submodule(name).weight)


def merged_models(folder: Path, base, projectors: dict[str, nn.Module], benchmarks: list[str],
                  per_benchmark_adapter: Callable[[Adapter, str], Adapter]
                  ) -> tuple[dict, dict[str, list[str]], list[str]]:
    """The merged models under ``folder`` (one sub-folder per method, as ``06_merging`` writes them).

    * a finished merged-model folder (``adapters.load_merged``): one adapter for every benchmark;
      ``emr`` instead gets ``per_benchmark_adapter(adapter, benchmark)`` (its task-specific modulation);
    * a folder of finished per-benchmark folders (Avg. Merging + FT): each benchmark's own adapter,
      evaluated on the benchmarks it has.

    Every model reads every modality with ``projectors``. Returns ``(models, covers, notes)``:
    ``{name: ModelUnderTest}`` in folder order, ``{name: benchmarks}`` for per-benchmark methods and
    one line per folder skipped or only partly covered.
    """
    found, covers, notes = {}, {}, []
    for sub in sorted(p for p in Path(folder).iterdir() if p.is_dir() and p.name not in MERGE_ROOT_EXTRAS):
        name = sub.name
        if is_merged(sub):
            adapter = load_merged(sub, name=name).adapter
            if name == "emr":
                found[name] = ModelUnderTest.emr(base, lambda b, a=adapter: per_benchmark_adapter(a, b),
                                                 projectors, name)
            else:
                found[name] = ModelUnderTest.merged(base, adapter, projectors, name)
        elif any(is_merged(sub / b) for b in benchmarks):
            own = {b: load_merged(sub / b, name=f"{name}/{b}").adapter for b in benchmarks if is_merged(sub / b)}
            covers[name] = list(own)
            if len(own) < len(benchmarks):
                notes.append(f"{name}: adapters for {len(own)} of {len(benchmarks)} benchmarks; evaluated on those")
            found[name] = ModelUnderTest.emr(base, own.__getitem__, projectors, name)
        else:
            notes.append(f"skipping {sub}: neither a merged model nor one per evaluated benchmark")
    return found, covers, notes


def models_table(models: dict[str, ModelUnderTest]) -> pd.DataFrame:
    """One row per model: its adapter (none, one, or one per benchmark) and the modalities it reads as tokens."""
    return pd.DataFrame([{"method": k, "adapter": "per benchmark" if m.adapter_for_benchmark
                          else ("yes" if m.adapter else "none"),
                          "modalities as tokens": ", ".join(sorted(m.projectors)) or "none"}
                         for k, m in models.items()])
