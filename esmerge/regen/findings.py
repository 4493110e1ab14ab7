"""The book's "Findings at a glance" page, generated from the claims registers the chapters wrote.

A register is a ``*claims.csv`` with a ``verdict`` column in a chapter's run folder
``runs/{scale}/{stem}/`` (today ``08_claims/representation_claims.csv``,
``08_claims/accuracy_claims.csv`` and ``09_retention/retention_claims.csv``). Each becomes one
table listing every claim, its numbers and its verdict, as the CSV has them: nothing is
recomputed here, so the page cannot disagree with the chapters. A count of the verdicts heads
the page, and each chapter's provenance line (``esmerge.regen.freshness``) is quoted.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

PAGE = "findings.md"
# Registers in reading order; any other register follows, alphabetically.
KNOWN = {"representation_claims.csv": "Representation claims", "accuracy_claims.csv": "Accuracy claims",
         "retention_claims.csv": "Retention claims"}
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


def read_registers(results: Path) -> list[tuple[str, str, list[dict[str, str]]]]:
    """(chapter stem, title, rows) of every register under ``results/{stem}/``, chapters in order.

    Within a chapter the known registers come first (``KNOWN``), then the others alphabetically.
    """
    order = list(KNOWN)
    out = []
    for folder in sorted(p for p in results.glob("[0-9][0-9]_*") if p.is_dir()) if results.is_dir() else []:
        paths = sorted(folder.glob("*claims.csv"),
                       key=lambda p: (0, order.index(p.name)) if p.name in KNOWN else (1, p.name))
        for path in paths:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows and "verdict" in rows[0]:
                out.append((folder.name, KNOWN.get(path.name, path.stem.replace("_", " ").capitalize()), rows))
    return out


def findings_page(results: Path, scale: str, chapters: dict[str, tuple[str | None, str | None]] | None = None,
                  ) -> str | None:
    """The page's MyST Markdown, or ``None`` when no chapter under ``results`` wrote a register.

    ``chapters`` maps a chapter stem to (link to its page, its provenance line), both optional.
    """
    registers = read_registers(results)
    if not registers:
        return None
    chapters = chapters or {}
    kinds: dict[str, int] = {}
    for _, _, rows in registers:
        for row in rows:
            kind = verdict_kind(row["verdict"])
            kinds[kind] = kinds.get(kind, 0) + 1
    stems = list(dict.fromkeys(stem for stem, _, _ in registers))

    def name(stem: str) -> str:
        link = chapters.get(stem, (None, None))[0]
        return f"[{stem}]({link})" if link else f"`{stem}`"

    lines = ["# Findings at a glance", "",
             f"Every verdict of the claims registers at scale `{scale}`, with its numbers, as the chapters "
             f"{', '.join(name(s) for s in stems)} wrote them to `runs/{scale}/` (generated from those files; "
             "nothing here is typed by hand). What each verdict means, and the margin against every "
             "competitor, is in those chapters.", ""]
    lines += [f"{stem}: {chapters[stem][1]}\n" for stem in stems if chapters.get(stem, (None, None))[1]]
    total = sum(kinds.values())
    lines += [f"**{total} claim{'s' * (total != 1)}:** " + ", ".join(f"{kind} ({n})" for kind, n in kinds.items())
              + ".", ""]
    for stem, title, rows in registers:
        lines += [f"## {title}", "", f"From {name(stem)}.", ""] + register_table(rows) + [""]
    return "\n".join(lines)


def write_findings_page(book: Path, results: Path, scale: str,
                        chapters: dict[str, tuple[str | None, str | None]] | None = None) -> Path | None:
    """Write ``book/findings.md`` (or remove it when there is no register); unchanged text is not rewritten."""
    page = book / PAGE
    text = findings_page(results, scale, chapters)
    if text is None:
        page.unlink(missing_ok=True)
        return None
    if not page.exists() or page.read_text() != text:  # unchanged file keeps Sphinx's cache valid
        page.write_text(text)
    return page
