"""Reading and checking the adapters a user brings: names, PEFT configs, dtypes and the base they fit.

Adapter names (``--adapter NAME=PATH``) follow ``ADAPTER_NAME``: a letter, then up to 63 letters,
digits, ``_`` or ``-``; each name once. PEFT refuses dots in adapter names and warns that a name
inside its ``lora_`` prefix may have its weights re-initialised, so neither is accepted.

Adapters of different rank, alpha (or ``rank_pattern``/``alpha_pattern``/rsLoRA) or target
modules are brought to one layout before any merge (``esmerge.specialists.lora_layout.normalise``:
scales folded into ``B``, ranks zero-padded, absent modules zero deltas), which leaves each
adapter's ``Delta W`` unchanged; ``esmerge.json`` records what was done (``normalised``).
Adapters are refused, with one line naming the adapter, when they do not fit the base (a LoRA
tensor's shape, or a Conv1D module), were trained on other base weights (``recorded_base_matches``,
the one rule: a specialist ``card.json`` records the weights hash; else the base that
``adapter_config.json`` names is hashed when its weights are on this machine, and only otherwise
compared by name, ``base_llm.same_base_name``, so a hub id and a local copy of it agree), disagree
with each other on a module's width, hold NaN/Inf, or have a config PEFT would not load them with,
or that holds more than LoRA factors (``check_lora_config``: DoRA, ``modules_to_save``, trained
biases, Conv1D ``fan_in_fan_out``, ``target_modules`` a regex string, a ``rank_pattern`` that
disagrees with the tensors' ranks). A parameter-space merge loads no tokenizer, so a base folder
without one serves every method but ``es``, ``es-layer`` and ``es-element``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from esmerge import scales
from esmerge.cache import file_sha256
from esmerge.errors import UsageError
from esmerge.specialists.adapters import Adapter, AdapterFileError, AdapterMismatchError, load_adapter
from esmerge.specialists.base_llm import BaseModel, checkpoint_sha256, load_base, load_paper, same_base_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # --dtype, besides "auto"
ADAPTER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_PEFT_PREFIX = "lora_"  # PEFT warns that a name inside its prefix may get re-initialised weights


# --------------------------------------------------------------------------- adapter names
def check_adapter_name(name: str) -> str:
    """``name`` if it is a usable adapter name (module docstring), else a one-line ``UsageError``.

    >>> check_adapter_name("molecule-v2")
    'molecule-v2'
    >>> check_adapter_name("mol.v2")  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: adapter name 'mol.v2': use a letter, then up to 63 letters, digits, '_' or '-'
    (PEFT refuses dots), not part of 'lora_'; e.g. --adapter molecule=PATH
    """
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name) or name in _PEFT_PREFIX:
        raise UsageError(f"adapter name {name!r}: use a letter, then up to 63 letters, digits, '_' or '-' "
                         f"(PEFT refuses dots), not part of {_PEFT_PREFIX!r}; e.g. --adapter molecule=PATH")
    return name


def split_name_path(item: str) -> tuple[str, Path]:
    """``NAME=PATH`` (one ``--adapter``) as ``(NAME, Path(PATH))``, else a one-line ``UsageError``.

    >>> split_name_path("molecule=adapters/mol")
    ('molecule', PosixPath('adapters/mol'))
    """
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--adapter {item!r}: write NAME=PATH, e.g. --adapter molecule=adapters/mol")
    return name, Path(path)


def named_adapters(pairs: list[tuple[str, Path]]) -> dict[str, Path]:
    """``[(name, path), ...]`` (``--adapter NAME=PATH``, repeated) -> ``{name: path}``; a name given twice is
    refused rather than one of its adapters silently dropped."""
    out: dict[str, Path] = {}
    for name, path in pairs:
        check_adapter_name(name)
        if name in out:
            raise UsageError(f"--adapter {name!r} is given twice ({out[name]} and {path}); "
                             "give each adapter its own name")
        out[name] = path
    return out


# --------------------------------------------------------------------------- adapters and base
def resolve_dtype(dtype: str | torch.dtype | None, base: str, device: str | None = None) -> torch.dtype:
    """``--dtype``: ``float32``, ``bfloat16``, or ``auto``/``None``: bfloat16 where the base will run on CUDA
    (``device`` cuda or auto, or an HF base with no ``device``, when a GPU is present), float32 on the CPU.

    >>> resolve_dtype("auto", "smoke"), resolve_dtype("bfloat16", "cpu")
    (torch.float32, torch.bfloat16)
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = "auto" if dtype is None else dtype
    if name == "auto":
        wants_gpu = device is None and base not in ("smoke", "cpu") or str(device).startswith(("cuda", "auto"))
        return torch.bfloat16 if wants_gpu and torch.cuda.is_available() else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype {name!r}: choose one of {', '.join([*DTYPES, 'auto'])}")
    return DTYPES[name]


def load_base_for(base: str, dtype: torch.dtype | None = None, device: str | None = None,
                  with_tokenizer: bool = True) -> BaseModel:
    """``smoke`` or ``cpu``: this project's base of that scale (its shipped specialists' base);
    anything else: a Hugging Face causal LM by hub id or local path (``base_llm.load_paper``; its
    tokenizer only ``with_tokenizer``)."""
    if base in ("smoke", "cpu"):
        return load_base(scales.get(base), dtype=dtype, device=device)
    return load_paper(base, dtype=dtype or resolve_dtype(None, base, device), device=device,
                      with_tokenizer=with_tokenizer)


def check_lora_config(name: str, path: Path, adapter: Adapter) -> None:
    """Refuse a LoRA config that PEFT would not load these tensors with, in one line naming the file.

    ``target_modules`` must be a list of module names (a string is a regex to PEFT, which esmerge
    cannot compare between adapters), and every LoRA tensor's rank must be the one the config
    gives its module (``rank_pattern``, matched as PEFT matches it, else ``r``).
    """
    where = f"adapter {name!r}: {path / 'adapter_config.json'}"
    # Three PEFT layouts carry more than LoRA factors A and B, which every method here merges; each
    # is refused for what it is before any work (merging them as factors would be silently wrong:
    # TIES trimmed DoRA's magnitude vectors, the weight norms themselves, to zero).
    if adapter.config.get("use_dora"):
        raise AdapterMismatchError(f"{where} is a DoRA adapter (use_dora): its magnitude vectors are weight norms, "
                                   "not LoRA factors, and esmerge merges LoRA only; merge it with PEFT instead")
    if adapter.config.get("modules_to_save"):
        raise AdapterMismatchError(f"{where} also trains whole modules (modules_to_save: "
                                   f"{adapter.config['modules_to_save']}), which esmerge does not merge; re-train "
                                   "or re-export it without modules_to_save")
    if adapter.config.get("fan_in_fan_out"):
        raise AdapterMismatchError(f"{where} targets Conv1D layers (fan_in_fan_out, GPT-2 style), whose weights are "
                                   "transposed; esmerge merges LoRA on nn.Linear layers only")
    if adapter.config.get("bias", "none") not in (None, "none"):
        raise AdapterMismatchError(f"{where} also trains biases (bias: {adapter.config['bias']!r}), which esmerge "
                                   "does not merge; re-train or re-export it with bias=\"none\"")
    if adapter.config.get("target_parameters"):
        raise AdapterMismatchError(f"{where} adapts parameters directly (target_parameters: "
                                   f"{adapter.config['target_parameters']}); esmerge merges LoRA on nn.Linear layers "
                                   "only (target_modules)")
    other = next((key for key in adapter.state if not re.search(r"\.lora_[AB]\.weight$", key)), None)
    if other is not None:
        raise AdapterMismatchError(f"{where}: its weights hold {other}, which is no LoRA factor (*.lora_A.weight, "
                                   "*.lora_B.weight of an nn.Linear layer); esmerge merges those only")
    targets = adapter.config.get("target_modules")
    if isinstance(targets, str):
        raise AdapterMismatchError(f"{where} gives target_modules as the regex {targets!r}; esmerge needs a list of "
                                   "module names, e.g. [\"q_proj\", \"v_proj\"]")
    pattern, r = adapter.config.get("rank_pattern") or {}, adapter.config.get("r")
    if not isinstance(pattern, dict) or not all(isinstance(v, int) for v in pattern.values()):
        raise AdapterMismatchError(f"{where}: rank_pattern must map module names to ranks, got {pattern!r}")
    for key, value in adapter.state.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        try:
            rule = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", module)), None)
        except re.error as err:
            raise AdapterMismatchError(f"{where}: rank_pattern key is not a valid pattern ({err})") from None
        want = pattern[rule] if rule is not None else r
        if want is None:  # no r at all: check_compatible compares the adapters' r
            continue
        have = value.shape[0] if ".lora_A." in key else value.shape[-1]
        if want != have:
            given = f"rank_pattern[{rule!r}] = {want}" if rule is not None else f"r = {want}"
            raise AdapterMismatchError(f"{where} gives {module} {given}, but {key} has rank {have}; correct the "
                                       "config or re-export the adapter")


def read_adapter(name: str, path: str | Path) -> tuple[Adapter, dict]:
    """One PEFT LoRA directory (and the ``card.json`` beside it, if any) -> ``(Adapter, card)``."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise AdapterFileError(f"adapter {name!r}: {path} has no adapter_config.json; pass a PEFT LoRA directory")
    try:
        adapter = load_adapter(path, name=name)
    except (OSError, ValueError, KeyError) as err:
        raise AdapterFileError(f"adapter {name!r}: {path} cannot be read ({type(err).__name__}: {err})") from None
    if adapter.config.get("peft_type", "LORA") != "LORA":
        raise AdapterMismatchError(f"adapter {name!r}: {path} is a {adapter.config.get('peft_type')} adapter, not LoRA")
    broken = next((key for key, value in adapter.state.items() if not torch.isfinite(value).all()), None)
    if broken is not None:
        raise AdapterMismatchError(f"adapter {name!r}: {broken} in {path} contains NaN or Inf; retrain or re-export it")
    check_lora_config(name, path, adapter)
    card = {}
    if (path / "card.json").is_file():
        try:
            card = json.loads((path / "card.json").read_bytes().decode("utf-8"))
        except (OSError, ValueError) as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise AdapterFileError(f"adapter {name!r}: {path / 'card.json'} is not UTF-8 JSON ({type(err).__name__}); "
                                   "fix it or remove it (it only records the adapter's base)") from None
        if not isinstance(card, dict):
            raise AdapterFileError(f"adapter {name!r}: {path / 'card.json'} is not a JSON object; fix it or remove it")
    return adapter, card


def check_fits_base(name: str, adapter: Adapter, card: dict, base: BaseModel) -> None:
    """Refuse an adapter not made for ``base``: tensor shapes, recorded weights hash, named base."""
    modules = dict(base.model.named_modules())
    for key, value in adapter.state.items():
        target = key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
        module = modules.get(target)
        weight = getattr(module, "weight", None)
        if type(module).__name__ == "Conv1D":
            raise AdapterMismatchError(f"adapter {name!r}: {key} targets {target}, a Conv1D layer of the base "
                                       f"{base.name} (GPT-2 style, weights transposed); esmerge merges LoRA on "
                                       "nn.Linear layers only")
        if weight is None or weight.ndim != 2:
            raise AdapterMismatchError(f"adapter {name!r}: {key} targets {target}, which the base {base.name} "
                                       "does not have; it was trained on another base")
        want = weight.shape[1] if ".lora_A." in key else weight.shape[0]
        have = value.shape[1] if ".lora_A." in key else value.shape[0]
        if have != want:
            raise AdapterMismatchError(f"adapter {name!r}: {key} has width {have}, the base {base.name} has {want} "
                                       f"at {target}; it was trained on another base")
    recorded = card.get("base_weights_sha256")
    if recorded and base.weights_sha256 and recorded != base.weights_sha256:
        raise AdapterMismatchError(f"adapter {name!r} was trained on base weights {recorded[:12]}..., but {base.name} "
                                   f"has {base.weights_sha256[:12]}...; pass the base it was trained on (--base)")
    named = adapter.config.get("base_model_name_or_path")
    if recorded or not named:
        return
    matches, digest = recorded_base_matches(named, base)
    if matches:
        return
    if digest is None:
        raise AdapterMismatchError(f"adapter {name!r} names base {named!r}, not {base.name!r}; pass that base (--base)")
    raise AdapterMismatchError(f"adapter {name!r} names base {named!r}, whose weights ({digest[:12]}...) are not those "
                               f"of {base.name}; pass the base it was trained on (--base)")


def _named_folder(named: str) -> Path | None:
    """The local folder of a named base: the path itself, or a hub id's snapshot in the local hub cache."""
    if Path(named).is_dir():
        return Path(named)
    if not re.fullmatch(r"[\w.\-]+/[\w.\-]+", named) or Path(named).exists():
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(named, local_files_only=True, allow_patterns=["*.safetensors"]))
    except Exception:  # not in the hub cache (or no hub library): the name decides
        return None


def named_base_sha256(named: str) -> str | None:
    """The weights hash of the base an adapter names, when its weights are on this machine, else ``None``.

    A folder (or a hub id's cached snapshot) with safetensors files: ``base_llm.checkpoint_sha256``, the
    hash an HF base loaded from it records. A GGUF file, or a folder whose weights are one GGUF: that file's
    sha256 (the ``cpu`` base's identity).
    """
    try:
        path = Path(named)
        if path.is_file():
            return file_sha256(path) if path.suffix == ".gguf" else None
        folder = _named_folder(named)
        if folder is None:
            return None
        digest = checkpoint_sha256(folder)
        if digest is None:
            ggufs = sorted(folder.glob("*.gguf"))
            digest = file_sha256(ggufs[0]) if len(ggufs) == 1 else None
        return digest
    except OSError:  # unreadable: no evidence either way, the name decides
        return None


def base_sha256s(base: BaseModel) -> set[str]:
    """Every hash naming ``base``'s weights: its ``weights_sha256`` and, for the ``cpu`` base (whose identity
    is its GGUF's sha256), the hash of its converted safetensors folder in the cache."""
    hashes = {base.weights_sha256} - {None}
    if base.scale == "cpu":
        from esmerge.specialists.smollm2 import cpu_base_folder

        folder, identity = cpu_base_folder()
        hashes |= {identity, checkpoint_sha256(folder)} - {None}
    return hashes


def same_recorded_base(a: str, b: str) -> bool:
    """Whether two adapters' recorded bases can be one base, before ``--base`` loads: by name when neither
    names weights on this machine; otherwise yes here, and each is checked against the loaded base's weights
    (``recorded_base_matches``: a GGUF and its converted folder are one base to it, not to their hashes)."""
    if named_base_sha256(a) is not None or named_base_sha256(b) is not None:
        return True
    return same_base_name(a, b)


def recorded_base_matches(named: str, base: BaseModel) -> tuple[bool, str | None]:
    """The one rule for the base an adapter config names (``base_model_name_or_path``) against ``--base``.

    When the named base's weights are on this machine (``named_base_sha256``: a local folder, a hub id's cached
    snapshot, a GGUF), their hash decides: the adapter fits when it names ``base``'s weights (``base_sha256s``;
    so ``--base cpu`` accepts adapters whose config names any copy of its converted folder or its GGUF, under
    any name). Otherwise the name decides (``same_base_name``). Returns ``(fits, the named weights' hash or
    None)``. (A ``card.json`` recording ``base_weights_sha256`` is checked before and decides alone.)
    """
    digest = named_base_sha256(named)
    if digest is not None:
        return digest in base_sha256s(base), digest
    return same_base_name(named, base.name), None
