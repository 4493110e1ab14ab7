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

Adapter names (``--adapter NAME=PATH``) follow ``ADAPTER_NAME``: a letter, then up to 63 letters,
digits, ``_`` or ``-``; each name once. PEFT refuses dots in adapter names and warns that a name
inside its ``lora_`` prefix may have its weights re-initialised, so neither is accepted.

Adapters are refused, with one line naming the adapter, when they do not fit the base (a LoRA
tensor's shape), were trained on other base weights (a specialist ``card.json`` beside them
records them) or name another base (``adapter_config.json``; compared by
``base_llm.same_base_name``, so a hub id and a local copy of it agree), differ from the others in
rank, alpha or target modules, hold NaN/Inf, or have a config PEFT would not load them with
(``check_lora_config``: ``target_modules`` a regex string, or a ``rank_pattern`` that disagrees
with the tensors' ranks). A parameter-space merge loads no tokenizer, so a base folder without
one serves every method but ``es``, ``es-layer`` and ``es-element``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from esmerge import methods, scales
from esmerge.cache import cache_dir
from esmerge.errors import InputError, UsageError, check_seed
from esmerge.run.merge import MergeContext, run_merge
from esmerge.signals.probe import Probes
from esmerge.specialists.adapters import (
    Adapter,
    AdapterFileError,
    AdapterMismatchError,
    check_compatible,
    load_adapter,
    refuse_existing,
)
from esmerge.specialists.base_llm import BaseModel, load_base, load_paper, same_base_name
from esmerge.specialists.load import Specialist

PROBE_METHODS = ("es", "es-layer", "es-element")  # data-aware methods whose data is the probe file
_MARK = re.compile(r"\[\[(/?)([A-Za-z0-9_.\-]+)\]\]")
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


# --------------------------------------------------------------------------- probes
def parse_probe_line(text: str, where: str = "probe") -> list[tuple[str, str]]:
    """A marked text -> its pieces ``[("text", s), (name, span), ("text", s), ...]`` (text first and last).

    >>> parse_probe_line("a [[x]]b[[/x]] c")
    [('text', 'a '), ('x', 'b'), ('text', ' c')]
    >>> parse_probe_line("[[x]]b")
    Traceback (most recent call last):
    ...
    esmerge.errors.InputError: probe: span [[x]] is never closed ([[/x]])
    """
    pieces, cursor, open_name, open_at = [], 0, None, 0
    for match in _MARK.finditer(text):
        closing, name = match.group(1) == "/", match.group(2)
        if not closing:
            if open_name is not None:
                raise InputError(f"{where}: span [[{name}]] opens inside [[{open_name}]]; spans do not nest")
            pieces.append(("text", text[cursor:match.start()]))
            open_name, open_at = name, match.end()
        else:
            if open_name != name:
                raise InputError(f"{where}: [[/{name}]] closes no open span [[{name}]]")
            span = text[open_at:match.start()]
            if not span.strip():
                raise InputError(f"{where}: span [[{name}]] is empty")
            pieces.append((name, span))
            open_name = None
        cursor = match.end()
    if open_name is not None:
        raise InputError(f"{where}: span [[{open_name}]] is never closed ([[/{open_name}]])")
    pieces.append(("text", text[cursor:]))
    return pieces


def read_probe_file(path: str | Path) -> list[str]:
    """The ``"text"`` of every probe line of a JSON Lines file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such probe file (JSON Lines, one {{\"text\": ...}} per line)")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except OSError as err:
        raise InputError(f"{path}: cannot read the probe file ({err.strerror or err}); check its permissions") from None
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x}); save the probe file "
                         "as UTF-8") from None
    texts = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}: not JSON ({err.msg}); each line is {{\"text\": \"...\"}}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{number}: needs a \"text\" string")
        texts.append(record["text"])
    if not texts:
        raise InputError(f"{path}: holds no probe line")
    return texts


def text_probes(tokenizer, embedding: torch.nn.Embedding, texts: list[str], chat: bool = True,
                where: str = "probe") -> Probes:
    """``Probes`` from marked texts: each span is its modality's block (see the module docstring)."""
    layouts, samples, spans = [], [], []
    for number, text in enumerate(texts, 1):
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        pieces = parse_probe_line(text, f"{where} line {number}")
        layout = [kind for kind, _ in pieces]
        names = [kind for kind in layout if kind != "text"]
        if not names:
            raise InputError(f"{where} line {number}: marks no span ([[name]]...[[/name]])")
        if len(set(names)) != len(names):
            raise InputError(f"{where} line {number}: marks {names}; each name at most once per line")
        if layouts and layout != layouts[0]:
            raise InputError(f"{where} line {number}: marks {names}, line 1 marks "
                             f"{[k for k in layouts[0] if k != 'text']}; every line marks the same spans in one order")
        layouts.append(layout)
        spans.append(pieces)
        samples.append([tokenizer(s, add_special_tokens=False)["input_ids"] for _, s in pieces])
    layout, k = layouts[0], len(samples)
    widths = [max(len(sample[i]) for sample in samples) for i in range(len(layout))]
    device = embedding.weight.device
    total = sum(widths)
    embeds = torch.zeros(k, total, embedding.weight.shape[1], dtype=embedding.weight.dtype, device=device)
    mask = torch.zeros(k, total, dtype=torch.long)
    positions, cursor = {}, 0
    for i, (kind, width) in enumerate(zip(layout, widths)):
        for row, sample in enumerate(samples):
            ids = sample[i]
            if ids:
                with torch.no_grad():
                    embeds[row, cursor:cursor + len(ids)] = embedding(torch.tensor(ids, device=device))
                mask[row, cursor:cursor + len(ids)] = 1
        if kind != "text":
            positions[kind] = torch.arange(cursor, cursor + width)
        cursor += width
    raw = {name: [s for sample in spans for kind, s in sample if kind == name] for name in positions}
    if bool(mask.all()):
        return Probes(embeds, positions, raw, "")
    block_mask = {m: mask[:, pos].bool() for m, pos in positions.items() if not bool(mask[:, pos].all())}
    return Probes(embeds, positions, raw, "", mask, block_mask)


# --------------------------------------------------------------------------- adapters and base
def load_base_for(base: str, dtype: torch.dtype | None = None, device: str | None = None,
                  with_tokenizer: bool = True) -> BaseModel:
    """``smoke`` or ``cpu``: this project's base of that scale (its shipped specialists' base);
    anything else: a Hugging Face causal LM by hub id or local path (``base_llm.load_paper``; its
    tokenizer only ``with_tokenizer``)."""
    if base in ("smoke", "cpu"):
        return load_base(base, dtype=dtype, device=device)
    return load_paper(base, dtype=dtype or torch.bfloat16, device=device, with_tokenizer=with_tokenizer)


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
    if not recorded and named and not same_base_name(named, base.name):
        raise AdapterMismatchError(f"adapter {name!r} names base {named!r}, not {base.name!r}; pass that base (--base)")


def check_method(method: str) -> None:
    """Refuse a method that needs task data (AdaMerging's test prompts, Avg+FT's training set)."""
    spec = methods.get(method)
    if spec.needs_context and method not in PROBE_METHODS:
        usable = [m for m in methods.names() if m in PROBE_METHODS or not methods.get(m).needs_context]
        raise UsageError(f"method {method!r} needs task data, which bring-your-own merging does not have; "
                         f"choose one of {', '.join(usable)}")


# --------------------------------------------------------------------------- the merge
def merge_adapters(base: str, adapters: dict[str, str | Path], probes: str | Path | None, out: str | Path,
                   method: str = "es", hparams: dict | None = None, *, force: bool = False, seed: int = 0,
                   chat: bool = True, dtype: torch.dtype | None = None, device: str | None = None) -> Path:
    """ES-merge (or merge with any method that needs no task data) PEFT LoRA adapters on one base.

    Args:
        base: a hub id or local directory of the base LLM, or ``"smoke"``/``"cpu"`` for this
            project's bases (the shipped specialists' base).
        adapters: name -> PEFT LoRA directory; at least two, all of one rank, alpha and targets.
        probes: the JSON Lines probe file (module docstring); needed by ``es``, ``es-layer`` and
            ``es-element``, ignored by the parameter-space methods.
        out: the merged-model directory (``adapters.save_merged``), refused if it exists unless ``force``.
        method, hparams: a registry method and its hyper-parameters (``esmerge methods``).
        seed: the run's seed in ``esmerge.json`` (ES-Merging's probe/SWD seed is its hyper-parameter
            ``seed``, e.g. ``hparams={"seed": 1}``); chat: wrap probe texts in the chat template.
        dtype, device: how an HF base is loaded (default bf16, ``device_map="auto"`` with a GPU).

    Returns ``out``. Every check that needs no model runs before the base is loaded.
    """
    hparams = methods.validate(method, dict(hparams or {}))
    check_method(method)
    for name in adapters:
        check_adapter_name(name)
    check_seed(seed, "seed")
    if len(adapters) < 2:
        raise UsageError(f"merging needs at least two adapters, got {len(adapters)} (--adapter NAME=PATH, repeated)")
    refuse_existing(out, force)
    loaded = {name: read_adapter(name, path) for name, path in adapters.items()}
    check_compatible([Adapter(a.state, a.config, name) for name, (a, _) in loaded.items()])
    texts = None
    if method in PROBE_METHODS:
        if probes is None:
            raise UsageError(f"method {method!r} reads the base's and adapters' states on probes: "
                             "pass --probe PROBES.jsonl")
        texts = read_probe_file(probes)
    model = load_base_for(base, dtype, device, with_tokenizer=texts is not None)
    for name, (adapter, card) in loaded.items():
        check_fits_base(name, adapter, card, model)
    # Checked above: each card records this base (run_merge's own check reads the hash).
    specialists = {name: Specialist(name, adapter, None, {"base_weights_sha256": model.weights_sha256},
                                    Path(adapters[name]))
                   for name, (adapter, card) in loaded.items()}
    extras = {"record": {"base": str(base), "adapters": {n: str(p) for n, p in adapters.items()},
                         "probe_file": str(probes) if texts else None}}
    k = 1
    if texts is not None:
        given = text_probes(model.tokenizer, model.model.get_input_embeddings(), texts, chat, str(probes))
        extras["probes"], k = given, len(given)
    label = base if base in scales.NAMES[:2] else "byo"
    context = MergeContext(model, specialists, label, seed, k, cache_dir() / "es" / "byo", extras)
    return run_merge(method, out, context, force=force, **hparams)
