"""Reading, writing and checking PEFT LoRA adapter directories.

Adapters move through esmerge as plain state dicts ``{key: Tensor}`` with PEFT's own keys,
e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (shape ``[r, d_in]``)
and ``...lora_B.weight`` (shape ``[d_out, r]``). This module is the only place that touches
adapter files; the merging math never sees a model object.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

LoraState = dict[str, torch.Tensor]
_KEY = re.compile(r"layers\.(\d+)\.(?:[a-z_]+)\.([a-z_]+)\.lora_([AB])\.")


class AdapterMismatchError(ValueError):
    """Adapters that cannot be merged element-wise (different rank, targets, base, shapes)."""


@dataclass
class Adapter:
    """One LoRA adapter: its tensors, its PEFT config (as a dict) and where it came from."""

    state: LoraState
    config: dict
    name: str = ""
    extras: dict = field(default_factory=dict)


def parse_key(key: str) -> tuple[int, str, str]:
    """``(layer, module, 'A' | 'B')`` of a LoRA key, e.g. ``(3, 'q_proj', 'A')``."""
    match = _KEY.search(key)
    if match is None:
        raise ValueError(f"not a per-layer LoRA key: {key!r}")
    return int(match.group(1)), match.group(2), match.group(3)


def layer_of(key: str) -> int:
    return parse_key(key)[0]


def load_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Read a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for needed in (config_file, weights):
        if not needed.exists():
            raise FileNotFoundError(f"{path} is not a PEFT adapter directory: {needed.name} is missing")
    state = {k: v.float() for k, v in load_file(weights).items()}
    return Adapter(state, json.loads(config_file.read_text()), name or path.name)


def save_adapter(adapter: Adapter, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """Write an adapter directory that ``PeftModel.from_pretrained`` loads.

    ``adapter.extras`` (e.g. EMR masks) go to ``esmerge_extras.safetensors``; ``metadata``
    (method, hyper-parameters, cost) to ``esmerge.json``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adapter.state.items()}, out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(adapter.config, indent=2, sort_keys=True))
    if adapter.extras:
        save_file({k: v.contiguous() for k, v in adapter.extras.items()}, out / "esmerge_extras.safetensors")
    if metadata is not None:
        (out / "esmerge.json").write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
    return out


def adapter_from_model(peft_model, name: str = "") -> Adapter:
    """The LoRA tensors and config of a live ``PeftModel`` (default adapter)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return Adapter(state, json.loads(json.dumps(config, default=str)), name)


def check_compatible(adapters: list[Adapter]) -> None:
    """Refuse adapters that cannot be merged element-wise, naming the mismatch.

    Checks rank, alpha, target modules, base model, key sets, shapes and finiteness.
    """
    if not adapters:
        raise AdapterMismatchError("no adapters to merge")
    ref = adapters[0]
    for other in adapters:
        _check_finite(other)
    for other in adapters[1:]:
        pair = f"{ref.name or 'adapter 0'} vs {other.name or 'adapter'}"
        for field_name in ("r", "lora_alpha", "base_model_name_or_path"):
            a, b = ref.config.get(field_name), other.config.get(field_name)
            if a != b:
                raise AdapterMismatchError(f"{pair}: different {field_name} ({a!r} vs {b!r})")
        ta, tb = sorted(ref.config.get("target_modules") or []), sorted(other.config.get("target_modules") or [])
        if ta != tb:
            raise AdapterMismatchError(f"{pair}: different target_modules ({ta} vs {tb})")
        ka, kb = set(ref.state), set(other.state)
        if ka != kb:
            missing = sorted(ka ^ kb)[:3]
            raise AdapterMismatchError(f"{pair}: different LoRA tensors, e.g. {missing}")
        for key, value in ref.state.items():
            if value.shape != other.state[key].shape:
                raise AdapterMismatchError(
                    f"{pair}: {key} has shape {tuple(value.shape)} vs {tuple(other.state[key].shape)}"
                )


def _check_finite(adapter: Adapter) -> None:
    for key, value in adapter.state.items():
        if not torch.isfinite(value).all():
            raise AdapterMismatchError(f"{adapter.name or 'adapter'}: {key} contains NaN or Inf")


def with_state(template: Adapter, state: LoraState, name: str = "merged", extras: dict | None = None) -> Adapter:
    """A new adapter with ``template``'s config and the given tensors."""
    return Adapter(state, dict(template.config), name, extras or {})


def lora_config_of(adapter: Adapter):
    """The ``peft.LoraConfig`` stored in an adapter's config dict."""
    from peft import LoraConfig

    fields = LoraConfig.__dataclass_fields__
    return LoraConfig(**{k: v for k, v in adapter.config.items() if k in fields and k != "peft_type"})


def attach(model: torch.nn.Module, adapters: dict[str, Adapter]):
    """Wrap ``model`` in a ``PeftModel`` holding every adapter under its name (first one active).

    PEFT injects LoRA layers into ``model`` in place; ``peft_model.unload()`` takes them out
    again and returns the bare model. ``with peft_model.disable_adapter():`` runs the base.
    """
    from peft import get_peft_model

    if not adapters:
        raise ValueError("no adapters to attach")
    names = list(adapters)
    peft_model = get_peft_model(model, lora_config_of(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, lora_config_of(adapters[name]))
    for name, adapter in adapters.items():
        load_lora_state(peft_model, adapter.state, name)
    peft_model.set_adapter(names[0])
    return peft_model


def load_lora_state(peft_model, state: LoraState, adapter_name: str = "default") -> None:
    """Copy LoRA tensors into a ``PeftModel``'s adapter ``adapter_name``; refuse a state that does not fit."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(peft_model, state, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
    if missing or result.unexpected_keys:
        raise AdapterMismatchError(f"adapter {adapter_name!r} does not fit the model: missing {missing[:2]}, "
                                   f"unexpected {list(result.unexpected_keys)[:2]}")
