"""Reading, writing and checking PEFT LoRA adapter directories, and merged-model directories.

Adapters move through esmerge as plain state dicts ``{key: Tensor}`` with PEFT's own keys,
e.g. ``base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`` (shape ``[r, d_in]``)
and ``...lora_B.weight`` (shape ``[d_out, r]``). This module is the only place that touches
adapter files; the merging math never sees a model object.

A *merged-model directory* (``save_merged`` / ``load_merged``, the one writer and the one
reader) is a PEFT adapter directory plus ``esmerge_extras.safetensors`` (method extras, e.g.
EMR's masks), ``projectors/<modality>.safetensors`` and ``esmerge.json`` (method,
hyper-parameters, cost). It is written into a temporary sibling, ``esmerge.json`` last, and
renamed into place only when complete, so a directory that exists is finished.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from esmerge.cache import tensor_digest
from esmerge.errors import InputError, OutputExistsError

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
    """Read a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    path = Path(path)
    config_file, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    for needed in (config_file, weights):
        if not needed.is_file():
            raise AdapterFileError(f"{path} is not a PEFT adapter directory: {needed.name} is missing")
    config = read_json(config_file)
    state = {k: v.float() for k, v in read_tensors(weights).items()}
    return Adapter(state, config, name or path.name)


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
            raise AdapterMismatchError(f"{adapter.name or 'adapter'}: {key} contains NaN or Inf; retrain or re-export it")


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
    """True when ``path`` is a complete merged-model directory (its marker ``esmerge.json`` exists)."""
    return (Path(path) / MARKER).is_file()


@contextmanager
def _directory_lock(folder: Path):
    """Exclusive ``flock`` on ``folder`` itself: writers into the same parent take turns (no lock file left)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits while another process commits into this folder
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def refuse_existing(out: str | Path, force: bool = False) -> None:
    """``OutputExistsError`` if ``out`` exists and ``force`` is false (checked before any long work)."""
    out = Path(out)
    if out.exists() and not force:
        what = "a finished merge" if is_merged(out) else "something that is not a finished merge"
        raise OutputExistsError(f"{out} already exists ({what}); choose another --out or pass --force to replace it")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Delete temporary siblings of ``out`` left by writers that died (their pid is gone)."""
    for partial in out.parent.glob(f".{out.name}.partial-*"):
        pid = partial.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(partial, ignore_errors=True)


def save_merged(out: str | Path, adapter: Adapter, meta: dict, projectors: dict | None = None,
                force: bool = False) -> Path:
    """Write a merged-model directory atomically; the one writer of that format.

    Files go into ``.<name>.partial-<pid>-<id>`` beside ``out`` (``esmerge.json`` last), and the
    folder is renamed to ``out`` under a lock on the parent folder. An existing ``out`` is
    refused (``OutputExistsError``) unless ``force``, which replaces it whole, so no file of an
    earlier merge survives beside the new one. ``projectors``: modality -> state dict.
    """
    out = Path(out)
    refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial.mkdir()
    replaced = None
    try:
        save_adapter(adapter, partial)
        for modality, state in (projectors or {}).items():
            (partial / "projectors").mkdir(exist_ok=True)
            write_file(partial / "projectors" / f"{modality}.safetensors", _tensor_bytes(state))
        write_file(partial / MARKER, _json_text(meta).encode())
        replaced = None
        with _directory_lock(out.parent):
            refuse_existing(out, force)  # another writer may have finished first
            if out.exists():
                replaced = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
                out.rename(replaced)
            partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        if replaced is not None and not out.exists():
            replaced.rename(out)  # put the earlier merge back rather than leave nothing
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _remove_stale_partials(out)
    return out


def load_merged(path: str | Path, name: str | None = None) -> MergedModel:
    """Read a merged-model directory written by ``save_merged``; the one reader of that format.

    Refuses (``AdapterFileError``, one line naming the folder) a directory without the marker.
    """
    path = Path(path)
    if not is_merged(path):
        raise AdapterFileError(f"{path} is not a finished merged model ({MARKER} is missing); merge it again")
    adapter = load_adapter(path, name=name)
    if (path / EXTRAS_FILE).is_file():
        adapter.extras = read_tensors(path / EXTRAS_FILE)
    projectors = {p.stem: read_tensors(p) for p in sorted((path / "projectors").glob("*.safetensors"))}
    return MergedModel(adapter, read_json(path / MARKER), projectors, path)
