"""Probe files of bring-your-own merging: marked plain text turned into the probe of paper §4.1.

JSON Lines, one ``{"text": ...}`` per probe; each modality's input is a span marked
``[[name]]...[[/name]]`` (the format is described in ``esmerge.run.byo``). ``check_probe_texts``
validates the whole file before any model loads; ``text_probes`` tokenises it into ``Probes``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from esmerge import methods
from esmerge.errors import InputError, UsageError
from esmerge.signals.probe import Probes

_MARK = re.compile(r"\[\[(/?)([A-Za-z0-9_.\-]+)\]\]")


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


def _check_layout(pieces: list[tuple[str, str]], first: list[str] | None, where: str, number: int) -> list[str]:
    """A probe line's layout (``"text"`` and span names, in order), refused unless it marks each name once and,
    after line 1 (``first``), the same names in the same order."""
    layout = [kind for kind, _ in pieces]
    names = [kind for kind in layout if kind != "text"]
    if not names:
        raise InputError(f"{where} line {number}: marks no span ([[name]]...[[/name]])")
    if len(set(names)) != len(names):
        raise InputError(f"{where} line {number}: marks {names}; each name at most once per line")
    if first is not None and layout != first:
        raise InputError(f"{where} line {number}: marks {names}, line 1 marks "
                         f"{[k for k in first if k != 'text']}; every line marks the same spans in one order")
    return layout


def check_probe_texts(texts: list[str], where: str = "probe") -> dict[str, dict[str, int]]:
    """Validate marked probe texts as ``text_probes`` reads them, without a tokenizer (before the base loads).

    Returns, per span name in order, ``{"probes": lines, "words": whitespace-separated words}``.

    >>> check_probe_texts(["a [[x]]b c[[/x]] [[y]]d[[/y]]", "[[x]]e[[/x]] [[y]]f g h[[/y]]"])
    {'x': {'probes': 2, 'words': 3}, 'y': {'probes': 2, 'words': 4}}
    """
    first, spans = None, {}
    for number, text in enumerate(texts, 1):
        pieces = parse_probe_line(text, f"{where} line {number}")
        first = _check_layout(pieces, first, where, number)
        for kind, span in pieces:
            if kind != "text":
                count = spans.setdefault(kind, {"probes": 0, "words": 0})
                count["probes"] += 1
                count["words"] += len(span.split())
    return spans


def probe_summary(path, spans: dict[str, dict[str, int]]) -> str:
    """One line: the probe file, its probes and, per span name, its probes and words.

    >>> probe_summary("p.jsonl", {"x": {"probes": 2, "words": 3}})
    'probe file p.jsonl: 2 probes; span x: 2 probes, 3 words'
    """
    lines = max((c["probes"] for c in spans.values()), default=0)
    each = "; ".join(f"span {name}: {c['probes']} probes, {c['words']} words" for name, c in spans.items())
    return f"probe file {path}: {lines} probes; {each}"


def check_span_names(method: str, hparams: dict, spans: list[str], names: list[str], where: str = "probe") -> None:
    """Span names are free labels (module docstring), except under settings that score each adapter on its own
    span (``score_modalities=own``, ``other_weight`` other than 1, as ``variant=code`` sets): then every adapter
    must be named after a span. Read from the method's registry presets; checked before the base loads."""
    if method not in methods.needing("probe"):
        return
    spec = methods.get(method)
    settings = dict(spec.presets.get(hparams.get("variant", "paper"), {})) | dict(hparams)
    own = settings.get("score_modalities") == "own" or float(settings.get("other_weight", 1.0)) != 1.0
    missing = [name for name in names if name not in spans]
    if own and missing:
        raise UsageError(f"{where} marks spans {spans}, but these settings (score_modalities='own' or other_weight "
                         f"!= 1) score each adapter on the span named after it, and adapters {missing} have none; "
                         "name each adapter after its span (--adapter NAME=PATH) or mark [[NAME]] spans")


def text_probes(tokenizer, embedding: torch.nn.Embedding, texts: list[str], chat: bool = True,
                where: str = "probe") -> Probes:
    """``Probes`` from marked texts: each span is its modality's block (see the module docstring)."""
    layouts, samples, spans = [], [], []
    for number, text in enumerate(texts, 1):
        if chat and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
        pieces = parse_probe_line(text, f"{where} line {number}")
        layout = _check_layout(pieces, layouts[0] if layouts else None, where, number)
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
