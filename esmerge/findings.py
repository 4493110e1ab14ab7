"""The book's "Findings at a glance" page, generated from the claims register that notebook 08 wrote.

Every CSV under ``runs/{scale}/08_claims/`` with a ``verdict`` column is a register (today
``representation_claims.csv`` and ``accuracy_claims.csv``); each becomes one table listing every
claim, its numbers and its verdict, as the CSV has them: nothing is recomputed here, so the page
cannot disagree with the chapter. A count of the verdicts heads the page.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

PAGE = "findings.md"
# Registers in reading order; any other register follows, alphabetically.
KNOWN = {"representation_claims.csv": "Representation claims", "accuracy_claims.csv": "Accuracy claims"}
# Columns left off the glance (long per-competitor text; the chapter shows it).
SKIPPED_COLUMNS = ("detail",)
HEADERS = {"ours": "ours [95 % CI]", "n_compared": "n compared", "paper": "paper"}


def verdict_kind(verdict: str) -> str:
    """The verdict without its qualifiers in parentheses.

    >>> verdict_kind("inconclusive (identical answers) (partial)"), verdict_kind("holds")
    ('inconclusive', 'holds')
    """
    return re.sub(r"\s*\(.*$", "", verdict.strip()) or verdict.strip()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def register_table(rows: list[dict[str, str]]) -> list[str]:
    """One register as Markdown table lines; ``ours``/``lo``/``hi`` become ``ours [lo, hi]``.

    >>> print("\\n".join(register_table([{"claim": "A | B", "ours": "1.5", "lo": "-0.5", "hi": "3.0",
    ...                                   "verdict": "inconclusive", "detail": "long"}])))
    | claim | ours [95 % CI] | verdict |
    |---|---|---|
    | A \\| B | 1.5 [-0.5, 3.0] | inconclusive |
    """
    columns = [c for c in rows[0] if c not in SKIPPED_COLUMNS]
    with_ci = {"ours", "lo", "hi"} <= set(columns)
    if with_ci:
        columns = [c for c in columns if c not in ("lo", "hi")]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c, "")
            if c == "ours" and with_ci and value != "" and row.get("lo", "") != "":
                value = f"{value} [{row['lo']}, {row['hi']}]"
            cells.append(_cell(value))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def read_registers(claims_dir: Path) -> list[tuple[str, list[dict[str, str]]]]:
    """(title, rows) of every register CSV in ``claims_dir`` (a CSV with a ``verdict`` column), in reading order."""
    order = list(KNOWN)
    paths = sorted(claims_dir.glob("*.csv"),
                   key=lambda p: (0, order.index(p.name)) if p.name in KNOWN else (1, p.name))
    out = []
    for path in paths:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and "verdict" in rows[0]:
            out.append((KNOWN.get(path.name, path.stem.replace("_", " ").capitalize()), rows))
    return out


def findings_page(claims_dir: Path, scale: str, chapter_link: str | None = None,
                  provenance: str | None = None) -> str | None:
    """The page's MyST Markdown, or ``None`` when ``claims_dir`` holds no register."""
    registers = read_registers(claims_dir) if claims_dir.is_dir() else []
    if not registers:
        return None
    kinds: dict[str, int] = {}
    for _, rows in registers:
        for row in rows:
            kind = verdict_kind(row["verdict"])
            kinds[kind] = kinds.get(kind, 0) + 1
    total = sum(kinds.values())
    chapter = f"[the claims register chapter]({chapter_link})" if chapter_link else "the claims register chapter"
    lines = ["# Findings at a glance", "",
             f"Every verdict of the claims register at scale `{scale}`, with its numbers, as {chapter} "
             f"wrote them to `runs/{scale}/08_claims/` (generated from those files; nothing here is typed by "
             "hand). What each verdict means, and the margin against every competitor, is in that chapter.", ""]
    if provenance:
        lines += [provenance, ""]
    lines += [f"**{total} claims:** " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()) + ".", ""]
    for title, rows in registers:
        lines += [f"## {title}", ""] + register_table(rows) + [""]
    return "\n".join(lines)


def write_findings_page(book: Path, claims_dir: Path, scale: str, chapter_link: str | None = None,
                        provenance: str | None = None) -> Path | None:
    """Write ``book/findings.md`` (or remove it when there is no register); unchanged text is not rewritten."""
    page = book / PAGE
    text = findings_page(claims_dir, scale, chapter_link, provenance)
    if text is None:
        page.unlink(missing_ok=True)
        return None
    if not page.exists() or page.read_text() != text:  # unchanged file keeps Sphinx's cache valid
        page.write_text(text)
    return page
