"""Reading, writing and checking PEFT LoRA adapter directories, and merged-model directories.

Adapters move through esmerge as plain state dicts ``{key: Tensor}`` with PEFT's own keys,
e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (shape ``[r, d_in]``)
and ``...lora_B.weight`` (shape ``[d_out, r]``). This module is the only place that touches
adapter files; the merging math never sees a model object.

A *merged-model directory* (``save_merged`` / ``load_merged``, the one writer and the one
reader) is a PEFT adapter directory plus ``esmerge_extras.safetensors`` (method extras, e.g.
EMR's masks), ``projectors/<modality>.safetensors`` and ``esmerge.json`` (method,
hyper-parameters, cost). Its tensors are checked finite, it is written into a temporary sibling,
``esmerge.json`` last, and published by ``esmerge.outputs.publish`` (the protocol every output
follows: atomic swap, ``--force`` replaces only an earlier merge that is not an input of the
run, a killed replacement is repaired by the next run or load).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from esmerge import outputs
from esmerge.cache import tensor_digest
from esmerge.errors import InputError

BASE_NAME = "base_model_name_or_path"  # the base an adapter config names

LoraState = dict[str, torch.Tensor]
_KEY = re.compile(r"layers\.(\d+)\.(?:[a-z_]+)\.([a-z_]+)\.lora_([AB])\.")
MARKER = "esmerge.json"  # written last: a merged-model directory with it is complete
EXTRAS_FILE = "esmerge_extras.safetensors"


class AdapterMismatchError(InputError):
    """Adapters that cannot be merged element-wise (different rank, targets, base, shapes)."""


class AdapterFileError(InputError):
    """An adapter or merged-model directory that is missing a file or holds an unreadable one."""


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


def adapter_digest(adapter: Adapter) -> str:
    """Content hash of an adapter's LoRA tensors (what a merge or a cache key records)."""
    return tensor_digest(adapter.state)


def write_file(path: Path, data: bytes) -> None:
    """The one place this module writes a file (tests inject faults here)."""
    with open(path, "wb") as fh:
        fh.write(data)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors; an ``AdapterFileError`` naming the file if it is unreadable."""
    try:
        return load_safetensors_bytes(Path(path).read_bytes())
    except (SafetensorError, OSError) as err:
        raise AdapterFileError(f"{path}: unreadable safetensors file ({err}); re-create or remove it") from None


def read_json(path: Path) -> dict:
    """A JSON file's object; an ``AdapterFileError`` naming the file if it is unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AdapterFileError(f"{path}: unreadable JSON ({err}); re-create or remove it") from None


def _tensor_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors_bytes({k: v.contiguous() for k, v in tensors.items()})


def _json_text(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


def load_adapter(path: str | Path, name: str | None = None) -> Adapter:
    """Read a PEFT adapter directory: ``adapter_config.json`` and ``adapter_model.safetensors``, or
    the older ``adapter_model.bin`` (read weights-only: a tensor dict, nothing that runs code)."""
    path = Path(path)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights.is_file() and (path / "adapter_model.bin").is_file():
        weights = path / "adapter_model.bin"
    for needed in (config_file, weights):
        if not needed.is_file():
            raise AdapterFileError(f"{path} is not a PEFT adapter directory: {needed.name} is missing")
    config = read_json(config_file)
    tensors = read_tensors(weights) if weights.suffix == ".safetensors" else _read_bin(weights)
    for key, value in tensors.items():  # an int LoRA tensor is a broken export, not weights to round
        if not value.is_floating_point():
            raise AdapterFileError(f"{weights}: {key} holds {str(value.dtype).removeprefix('torch.')} values, "
                                   "not floating-point LoRA weights; re-export the adapter")
    state = {k: v.float() for k, v in tensors.items()}
    return Adapter(state, config, name or path.name)


def _read_bin(file: Path) -> dict[str, torch.Tensor]:
    """A PyTorch ``adapter_model.bin`` as a tensor dict, with ``torch.load(weights_only=True)``."""
    import pickle

    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        raise AdapterFileError(f"{file} is not a weights-only PyTorch file ({type(err).__name__}); "
                               "re-save the adapter with PEFT (safetensors)") from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise AdapterFileError(f"{file} does not hold a dict of tensors; re-save the adapter with PEFT (safetensors)")
    return tensors


def save_adapter(adapter: Adapter, out_dir: str | Path, metadata: dict | None = None) -> Path:
    """Write an adapter directory that ``PeftModel.from_pretrained`` loads (in place; see ``save_merged``).

    ``adapter.extras`` (e.g. EMR masks) go to ``esmerge_extras.safetensors``; ``metadata``
    (method, hyper-parameters, cost) to ``esmerge.json``, last.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_file(out / "adapter_model.safetensors", _tensor_bytes(adapter.state))
    write_file(out / "adapter_config.json", json.dumps(adapter.config, indent=2, sort_keys=True).encode())
    if adapter.extras:
        write_file(out / EXTRAS_FILE, _tensor_bytes(adapter.extras))
    if metadata is not None:
        write_file(out / MARKER, _json_text(metadata).encode())
    return out


def adapter_from_model(peft_model, name: str = "") -> Adapter:
    """The LoRA tensors and config of a live ``PeftModel`` (default adapter)."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    config = peft_model.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return Adapter(state, json.loads(json.dumps(config, default=str)), name)


def check_compatible(adapters: list[Adapter], same_layout: bool = True, same_base=None) -> None:
    """Refuse adapters that cannot be merged element-wise, naming the mismatch.

    Always checked, since nothing can fix them: the base model (by ``base_llm.same_base_name``:
    ``org/x`` and ``/models/x`` agree), finiteness, and the widths of every module both adapters
    adapt (``d_in`` of ``lora_A``, ``d_out`` of ``lora_B``). With ``same_layout`` (every merge
    method checks it) also rank, alpha, target modules, key sets and shapes;
    ``esmerge.specialists.lora_layout.normalise`` gives adapters that differ only there one layout
    (``esmerge merge --adapter`` runs it), so bring-your-own merging checks ``same_layout=False`` first.
    ``same_base(a, b)``: whether two recorded base names can name one base (default ``same_base_name``;
    ``esmerge.run.byo`` also looks at the weights they name).
    """
    from esmerge.specialists.base_llm import same_base_name

    same_base = same_base or same_base_name

    if not adapters:
        raise AdapterMismatchError("no adapters to merge")
    ref = adapters[0]
    for other in adapters:
        _check_finite(other)
    for other in adapters[1:]:
        pair = f"{ref.name or 'adapter 0'} vs {other.name or 'adapter'}"
        a, b = ref.config.get(BASE_NAME), other.config.get(BASE_NAME)
        if a and b and not same_base(a, b):  # one unnamed adapter is no evidence either way
            raise AdapterMismatchError(f"{pair}: different {BASE_NAME} ({a!r} vs {b!r}); "
                                       "merge adapters trained on one base")
        if not same_layout:  # (with it, the shape check below covers the widths)
            for key in sorted(set(ref.state) & set(other.state)):
                axis = 1 if ".lora_A." in key else 0  # A: [r, d_in], B: [d_out, r]
                va, vb = ref.state[key], other.state[key]
                if va.ndim == vb.ndim == 2 and va.shape[axis] != vb.shape[axis]:
                    raise AdapterMismatchError(f"{pair}: {key} has width {va.shape[axis]} vs {vb.shape[axis]}; "
                                               "they were trained on different bases")
            continue
        for field_name in ("r", "lora_alpha"):
            a, b = ref.config.get(field_name), other.config.get(field_name)
            if a != b:
                raise AdapterMismatchError(f"{pair}: different {field_name} ({a!r} vs {b!r}); "
                                           "esmerge merge --adapter normalises them (lora_layout.normalise)")
        ta, tb = sorted(ref.config.get("target_modules") or []), sorted(other.config.get("target_modules") or [])
        if ta != tb:
            raise AdapterMismatchError(f"{pair}: different target_modules ({ta} vs {tb}); "
                                       "esmerge merge --adapter normalises them (lora_layout.normalise)")
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
            raise AdapterMismatchError(f"{adapter.name or 'adapter'}: {key} contains NaN or Inf; "
                                       "retrain or re-export it")


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
    # This adapter's own tensors only: `...lora_A.<name>.weight` (a name like "mlp" also appears in module paths).
    own = re.compile(rf"\.lora_\w+\.{re.escape(adapter_name)}\.")
    missing = [k for k in result.missing_keys if own.search(k)]
    if missing or result.unexpected_keys:
        raise AdapterMismatchError(f"adapter {adapter_name!r} does not fit the model: missing {missing[:2]}, "
                                   f"unexpected {list(result.unexpected_keys)[:2]}")


# --------------------------------------------------------------------------- merged-model directories
@dataclass
class MergedModel:
    """What ``load_merged`` reads back: the adapter (with ``extras``), ``esmerge.json`` and the projectors.

    ``projectors``: modality -> projector state dict (the merged MLLM keeps every modality's encoder).
    """

    adapter: Adapter
    meta: dict
    projectors: dict[str, dict[str, torch.Tensor]]
    path: Path


def is_merged(path: str | Path) -> bool:
    """True when ``path`` is a complete merged-model directory (its marker ``esmerge.json`` exists).

    A replacement of ``path`` that was killed half-way is repaired first (``outputs.recover``).
    """
    outputs.recover(path)
    return (Path(path) / MARKER).is_file()


def refuse_existing(out: str | Path, force: bool = False, inputs=()) -> None:
    """``OutputExistsError`` (one line) unless ``out`` is free or, with ``force``, an earlier merge that is
    not one of ``inputs`` (checked before any long work; ``outputs.check_replaceable``)."""
    outputs.recover(out)
    outputs.check_replaceable(out, outputs.MERGE, force, inputs)


def _nonfinite_cause(meta: dict) -> str:
    method, hparams = meta.get("method", "the method"), meta.get("hparams") or {}
    if not hparams:
        return f"{method} turned finite adapters into NaN/Inf; report it with the adapters"
    settings = ", ".join(f"{k}={v!r}" for k, v in sorted(hparams.items()))
    return f"a hyper-parameter is likely out of range ({method}: {settings}); see `esmerge methods {method}`"


def save_merged(out: str | Path, adapter: Adapter, meta: dict, projectors: dict | None = None,
                force: bool = False, inputs=(), same=None) -> Path:
    """Write a merged-model directory atomically; the one writer of that format.

    Every tensor is checked finite first (an ``InputError`` naming the tensor and the likely
    hyper-parameter, nothing written). Files go into ``.<name>.partial-<pid>-<id>`` beside
    ``out`` (``esmerge.json`` last, recording ``"esmerge_output": "merge"``), then
    ``outputs.publish`` moves it to ``out``. An existing ``out`` is refused unless ``force`` and
    it is an earlier merge that is not one of ``inputs``; it is replaced whole, so no file of it
    survives beside the new one. ``same(out)``: True when a merge already at ``out`` is this one
    (kept, this copy dropped). ``projectors``: modality -> state dict.
    """
    out = Path(out)
    refuse_existing(out, force, inputs)
    where, cause = f"merge into {out}", _nonfinite_cause(meta)
    outputs.check_finite(adapter.state, where, cause)
    outputs.check_finite(adapter.extras, where, cause)
    for modality, state in (projectors or {}).items():
        outputs.check_finite(state, f"{where}: projector {modality}", "the specialist's projector holds NaN/Inf")
    with outputs.staging(out) as partial:
        save_adapter(adapter, partial)
        for modality, state in (projectors or {}).items():
            (partial / "projectors").mkdir(exist_ok=True)
            write_file(partial / "projectors" / f"{modality}.safetensors", _tensor_bytes(state))
        write_file(partial / MARKER, _json_text(dict(meta, **{outputs.KIND_KEY: outputs.MERGE.name})).encode())
        return outputs.publish(partial, out, outputs.MERGE, force, inputs, same)


def load_merged(path: str | Path, name: str | None = None) -> MergedModel:
    """Read a merged-model directory written by ``save_merged``; the one reader of that format.

    Refuses (``AdapterFileError``, one line naming the folder) a directory without the marker.
    """
    path = Path(path)
    if not is_merged(path):  # repairs a killed replacement first
        raise AdapterFileError(f"{path} is not a finished merged model ({MARKER} is missing); merge it again")
    adapter = load_adapter(path, name=name)
    if (path / EXTRAS_FILE).is_file():
        adapter.extras = read_tensors(path / EXTRAS_FILE)
    projectors = {p.stem: read_tensors(p) for p in sorted((path / "projectors").glob("*.safetensors"))}
    meta = read_json(path / MARKER)
    if isinstance(meta, dict):
        meta.pop(outputs.KIND_KEY, None)  # what the writer gave save_merged, as merges before the key read
    return MergedModel(adapter, meta, projectors, path)
