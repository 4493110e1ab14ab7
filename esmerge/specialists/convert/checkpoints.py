"""Reading published checkpoints tensor by tensor, without unpickling anything a user can plant.

A checkpoint is one of the layouts the paper's specialists and their bases are published in:

* a Hugging Face directory: ``config.json`` and ``model.safetensors``, or shards
  ``model-0000K-of-0000N.safetensors`` listed in ``model.safetensors.index.json``;
* the same with ``pytorch_model.bin`` (or its ``.index.json`` shards);
* a single ``.safetensors``, ``.bin``, ``.pt`` or ``.ckpt`` file (a PyTorch Lightning checkpoint
  keeps its tensors under ``state_dict``).

Torch files are read with ``torch.load(weights_only=True)``: a file that needs anything more than
tensors and plain containers is refused before any of its code runs. The one exception is a short
admit-list of upstream config classes by name (Mol-LLaMA's Lightning ``.ckpt`` pickles its
``MolLLaMAConfig`` in ``hyper_parameters``): each is rebuilt as an ``InertConfig`` that only keeps
the pickled fields, never as the upstream class, and is read back as a plain dict
(``TensorSource.hyper_parameters``). Safetensors files are read lazily, one tensor at a time, so an
8B checkpoint never has to fit in memory at once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from esmerge.errors import InputError
from esmerge.specialists.base_llm import checkpoint_sha256

TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Buffers a module keeps besides its weights (BatchNorm's num_batches_tracked, BERT's position_ids):
# carried with their dtype, never cast to float.
INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
# The seven projections of a LLaMA block that the shared LoRA targets (models.LORA_TARGET_MODULES),
# with the sub-module each lives in.
TARGET_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
                 "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class CheckpointError(InputError):
    """A checkpoint that cannot be converted as given; the one-line message names the file or key."""


def resolve(path_or_id: str | Path, what: str = "checkpoint") -> Path:
    """A local checkpoint path, downloading a hub id's safetensors and JSON files if it is not a path."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        return path
    text = str(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise CheckpointError(f"{what} {text}: no such file or directory")
    try:  # deferred: only a hub id needs huggingface_hub, and it may be offline
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # offline, gated, unknown id: all end the same way for the user
        raise CheckpointError(f"{what} {text}: not a local path and the hub download failed "
                              f"({type(err).__name__}); download it first and pass its directory") from None


def read_config(path: Path) -> dict:
    """``config.json`` of a checkpoint directory (or beside a single file); ``{}`` if there is none."""
    folder = path if path.is_dir() else path.parent
    file = folder / "config.json"
    if not file.exists():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{file}: not valid JSON ({err.msg} at line {err.lineno})") from None


class InertConfig:
    """What an admitted upstream config object becomes when unpickled: its pickled fields, no behaviour.

    The weights-only unpickler calls ``__new__`` and ``__setstate__`` (or ``__init__`` with the
    pickled arguments) on it; none of them runs anything of the upstream class.
    """

    qualified_name = ""

    def __init__(self, *args, **kwargs):
        self.fields = {"args": list(args), **kwargs} if args or kwargs else {}

    def __setstate__(self, state):
        self.fields = state if isinstance(state, dict) else {"state": state}


def _inert_globals(names: tuple[str, ...]) -> list[tuple[type, str]]:
    return [(type(name.rsplit(".", 1)[-1], (InertConfig,), {"qualified_name": name}), name) for name in names]


def plain(obj):
    """``obj`` with every ``InertConfig`` turned into a dict (``"__class__"``: the upstream name) and
    tensors left out: what a card or a converter may read from a checkpoint's extra content."""
    if isinstance(obj, InertConfig):
        return {"__class__": obj.qualified_name, **plain(getattr(obj, "fields", {}))}
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj if not isinstance(v, torch.Tensor)]
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else repr(obj)


def export_command(file: Path) -> str:
    """A command to run in the upstream environment that turns a Lightning checkpoint into plain tensors.

    It never unpickles blindly: it lists the classes the file would import
    (``torch.serialization.get_unsafe_globals_in_checkpoint``), goes on only when the user confirms
    that they are the upstream project's own, and then loads with ``weights_only=True``, those
    classes admitted, before saving the ``state_dict`` as safetensors beside the file.
    """
    out = file.with_suffix(".safetensors")
    steps = [
        "import importlib, torch",
        "from safetensors.torch import save_file",
        f"f = '{file}'",
        "names = torch.serialization.get_unsafe_globals_in_checkpoint(f)",
        "input(f'{f} imports {names}: Enter if these are the upstream classes only, Ctrl-C otherwise ')",
        "torch.serialization.add_safe_globals([getattr(importlib.import_module(n.rpartition('.')[0]), "
        "n.rpartition('.')[2]) for n in names])",
        "sd = torch.load(f, map_location='cpu', weights_only=True)['state_dict']",
        f"save_file({{k: v.contiguous() for k, v in sd.items()}}, '{out}')",
    ]
    return f'python -c "{"; ".join(steps)}"'


def _torch_tensors(file: Path, inert: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors of a torch file (under ``state_dict`` for Lightning) and its other content, made ``plain``."""
    try:
        with torch.serialization.safe_globals(_inert_globals(inert)):
            try:  # memory-mapped, so a large file is not read at once; only the zip format allows it
                obj = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                obj = torch.load(file, map_location="cpu", weights_only=True)  # the legacy (pre-1.6) format
    except Exception as err:  # UnpicklingError for planted objects, RuntimeError for a truncated zip
        hint = (f"if you trust it, export its state_dict upstream: {export_command(file)}"
                if file.suffix == ".ckpt" else "re-save it as safetensors")
        raise CheckpointError(f"{file}: not a plain tensor checkpoint ({type(err).__name__}); only tensors and "
                              f"plain containers are read (weights_only=True); {hint}") from None
    extra = {}
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extra = plain({k: v for k, v in obj.items() if k != "state_dict"})
        obj = obj["state_dict"]  # PyTorch Lightning keeps the weights here
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{file}: expected a dict of tensors (or one under 'state_dict')")
    return obj, extra


class TensorSource:
    """Named tensors of a checkpoint, read on demand: ``keys()``, ``shape(k)``, ``dtype(k)``, ``get(k)``."""

    def __init__(self, path: str | Path, inert: tuple[str, ...] = ()):
        """``inert``: fully qualified upstream class names a torch file may pickle (read as ``InertConfig``)."""
        self.path = Path(path)
        self._files: dict[str, Path] = {}  # key -> safetensors file
        self._loaded: dict[str, torch.Tensor] = {}  # key -> tensor of a torch file
        self._handles: dict[Path, object] = {}
        self.extra: dict = {}  # a Lightning file's other content (hyper_parameters, epoch, ...), plain
        for file in self._weight_files():
            if file.suffix == ".safetensors":
                for key in self._handle(file).keys():
                    self._files[key] = file
            else:
                tensors, extra = _torch_tensors(file, inert)
                self._loaded.update(tensors)
                self.extra.update(extra)
        if not self._files and not self._loaded:
            raise CheckpointError(f"{self.path}: no tensors found")

    def _weight_files(self) -> list[Path]:
        if self.path.is_file():
            if self.path.suffix != ".safetensors" and self.path.suffix not in TORCH_SUFFIXES:
                raise CheckpointError(f"{self.path}: unknown checkpoint format; expected .safetensors, "
                                      f"{', '.join(TORCH_SUFFIXES)} or a Hugging Face directory")
            return [self.path]
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: no such file or directory")
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index = self.path / index_name
            if index.exists():
                weight_map = json.loads(index.read_text()).get("weight_map") or {}
                files = sorted({self.path / name for name in weight_map.values()})
                missing = [f.name for f in files if not f.exists()]
                if missing:
                    raise CheckpointError(f"{index}: shard {missing[0]} is missing; finish the download")
                return files
        for pattern in ("*.safetensors", "pytorch_model*.bin", "*.ckpt", "*.pt", "*.pth"):
            files = sorted(f for f in self.path.glob(pattern) if not f.name.startswith("."))
            if files:
                return files
        raise CheckpointError(f"{self.path}: no weights (model.safetensors, an index json, *.bin or *.ckpt)")

    def _handle(self, file: Path):
        if file not in self._handles:
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as err:  # a truncated download is the usual cause
                raise CheckpointError(f"{file}: not a readable safetensors file ({type(err).__name__}); "
                                      "download it again") from None
        return self._handles[file]

    def keys(self) -> list[str]:
        return sorted(set(self._files) | set(self._loaded))

    def __contains__(self, key: str) -> bool:
        return key in self._files or key in self._loaded

    def shape(self, key: str) -> tuple[int, ...]:
        if key in self._loaded:
            return tuple(self._loaded[key].shape)
        return tuple(self._handle(self._files[key]).get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        if key in self._loaded:
            return self._loaded[key]
        if key not in self._files:
            raise CheckpointError(f"{self.path}: tensor {key} is missing")
        return self._handle(self._files[key]).get_tensor(key)

    def dtype(self, key: str) -> torch.dtype:
        return self.get(key).dtype if key in self._loaded else _SAFETENSORS_DTYPE.get(
            self._handle(self._files[key]).get_slice(key).get_dtype(), torch.uint8)

    def file_of(self, key: str) -> Path:
        return self._files.get(key, self.path)


_SAFETENSORS_DTYPE = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def checked(source: TensorSource, key: str, shape: tuple[int, ...] | None = None, *,
            integers: bool = False) -> torch.Tensor:
    """``source.get(key)`` after refusing a non-float dtype, a wrong shape, or NaN/Inf (naming the key).

    ``integers``: an integer or bool buffer is returned as stored (a module's counters and index
    tables, not weights) instead of refused.
    """
    where = f"{source.file_of(key)}: {key}"
    dtype = source.dtype(key)
    if dtype not in FLOAT_DTYPES and not (integers and dtype in INTEGER_DTYPES):
        raise CheckpointError(f"{where} has dtype {dtype}; expected a float tensor (float32, float16 or bfloat16)")
    if shape is not None and source.shape(key) != tuple(shape):
        raise CheckpointError(f"{where} has shape {source.shape(key)}, but the base needs {tuple(shape)}; "
                              "convert against the base it was trained on")
    tensor = source.get(key)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise CheckpointError(f"{where} contains NaN or Inf; the checkpoint is corrupt")
    return tensor


def target_key(layer: int, module: str, prefix: str = "") -> str:
    """Key of a LLaMA target projection's weight, e.g. ``model.layers.3.self_attn.q_proj.weight``."""
    return f"{prefix}model.layers.{layer}.{TARGET_PARENT[module]}.{module}.weight"


def llama_prefix(source: TensorSource) -> str:
    """The prefix before ``model.layers.0.self_attn.q_proj.weight`` (``''`` for a plain LLaMA directory)."""
    suffix = target_key(0, "q_proj")
    found = sorted(k[: -len(suffix)] for k in source.keys() if k.endswith(suffix))
    if not found:
        raise CheckpointError(f"{source.path}: no LLaMA decoder weights ({suffix}) found")
    return min(found, key=len)


def llama_config(config: dict, where: Path) -> dict:
    """The LLaMA fields the converters check, from a LLaMA ``config.json`` (or a nested ``llama_config``)."""
    config = config.get("llama_config") or config
    needed = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if k not in config]
    if missing:
        raise CheckpointError(f"{where}: config.json lacks {', '.join(missing)}; is this a LLaMA checkpoint?")
    out = {k: config[k] for k in needed}
    out["num_key_value_heads"] = config.get("num_key_value_heads") or config["num_attention_heads"]
    out["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", False))
    return out


def state_digest(source: TensorSource, prefix: str = "", tie_word_embeddings: bool = False) -> str:
    """``models.state_dict_sha256`` of the ``LlamaForCausalLM`` these files load into, streamed.

    Same bytes as ``cache.tensor_digest(model.state_dict(), 64)``: sorted keys, each key's name
    then its float32 values. A checkpoint with tied embeddings stores no ``lm_head.weight``; the
    model's state dict has it (equal to the input embedding), so it is hashed in its place.
    """
    keys = {k[len(prefix):]: k for k in source.keys() if k.startswith(prefix)}
    if tie_word_embeddings and "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys:
        keys["lm_head.weight"] = keys["model.embed_tokens.weight"]
    digest = hashlib.sha256()
    for name in sorted(keys):
        digest.update(name.encode())
        digest.update(source.get(keys[name]).to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def base_weights_sha256(source: TensorSource, tie_word_embeddings: bool = False) -> str:
    """The hash ``base_llm.load_paper`` records for this base, so ``load_specialist`` can match a card to it:
    ``models.checkpoint_sha256`` of its safetensors files, or else the streamed state-dict digest."""
    return checkpoint_sha256(source.path if source.path.is_dir() else None) or state_digest(
        source, "", tie_word_embeddings)


def cached_folder(model_id: str) -> Path | None:
    """The local folder of ``model_id``: the path itself, or its snapshot already in the hub cache (no download)."""
    if Path(model_id).expanduser().is_dir():
        return Path(model_id).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # not cached, or not a hub id: the caller records that it could not compare
        return None


def describe(source: TensorSource) -> dict:
    """Where a checkpoint came from, for a card: its path, weight files with sizes, config sha256."""
    folder = source.path if source.path.is_dir() else source.path.parent
    files = sorted({source.file_of(k) for k in source.keys()})
    record = {"path": str(source.path), "files": {f.name: f.stat().st_size for f in files},
              "n_tensors": len(source.keys())}
    if (folder / "config.json").exists():
        record["config_sha256"] = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    return record


def fingerprint(source: TensorSource) -> dict:
    """What must be unchanged for an interrupted conversion to resume: each weight file's size and
    modification time (a re-download changes it), and the config's sha256."""
    files = sorted({source.file_of(k) for k in source.keys()})
    return describe(source) | {"modified_ns": {f.name: f.stat().st_mtime_ns for f in files}}


def check_same_architecture(config: dict, base: dict, where: Path, base_path: Path) -> None:
    """Refuse a checkpoint whose LLaMA config differs from the base's in a field that changes a shape."""
    for name in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        if config.get(name) != base.get(name):
            raise CheckpointError(f"{where}: {name} is {config.get(name)} but the base {base_path} has "
                                  f"{base.get(name)}; convert against the base it was trained on")


def equal_to_base(tensor: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether a checkpoint tensor is the base tensor, stored at the checkpoint's precision."""
    return tensor.shape == base.shape and torch.equal(base.to(tensor.dtype), tensor)
