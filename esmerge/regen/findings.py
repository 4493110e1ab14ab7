"""The book's "Findings at a glance" page, generated from the claims registers the chapters wrote.

A register is a ``*claims.csv`` with a ``verdict`` column in a chapter's run folder
``runs/{scale}/{stem}/`` (today ``08_claims/representation_claims.csv``,
``08_claims/accuracy_claims.csv`` and ``09_retention/retention_claims.csv``). Each becomes one
table listing every claim, its numbers and its verdict, as the CSV has them: nothing is
recomputed here, so the page cannot disagree with the chapters. A count of the verdicts heads
the page, and each chapter's provenance line (``esmerge.regen.freshness``) is quoted.

What each verdict rests on is never left off: a register's caveat columns
(``esmerge.evaluate.decisions.CAVEAT_COLUMNS``: ``n, seeds, caveats, would_change``) are always
shown, whatever ``SKIPPED_COLUMNS`` says, an empty caveat cell shows as *not recorded*, and the
rendered table is checked to hold every caveat value (``CaveatError`` otherwise). A register
without those columns is marked on the page (``NO_CAVEATS``), or refused with ``strict=True``.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

from esmerge.evaluate.caveats import CAVEAT_COLUMNS

PAGE = "findings.md"
# Registers in reading order; any other register follows, alphabetically.
KNOWN = {"representation_claims.csv": "Representation claims", "accuracy_claims.csv": "Accuracy claims",
         "retention_claims.csv": "Retention claims"}
# Columns left off the glance (long per-competitor text; the chapter shows it). Never a caveat column.
SKIPPED_COLUMNS = ("detail",)
HEADERS = {"ours": "ours [95 % CI]", "n_compared": "n compared", "paper": "paper", "p_holm": "Holm p",
           "auroc_diff": "AUROC diff. [95 % CI]", "auroc_vs": "AUROC vs", "auroc_verdict": "AUROC verdict",
           "same_answers": "same answers", "would_change": "would change the verdict"}
NOT_RECORDED = "*not recorded*"  # an empty caveat cell
NO_CAVEATS = ("**No caveats recorded:** this register has no {missing} column(s), so its verdicts are shown "
              "without the examples, seeds, selection, routing or budgets they rest on.")


class CaveatError(ValueError):
    """A register's caveats would be missing from the page (or, with ``strict``, it has none)."""


def missing_caveat_columns(rows: list[dict[str, str]]) -> list[str]:
    """The caveat columns (``CAVEAT_COLUMNS``) a register lacks.

    Parameters
    ----------
    rows : list of dict
        The register's rows as ``csv.DictReader`` reads them (the first row's keys are its columns).

    Returns
    -------
    list of str
        In ``CAVEAT_COLUMNS``' order; all of them for an empty register.

    Examples
    --------
    >>> missing_caveat_columns([{"claim": "c", "verdict": "holds", "n": "8", "seeds": "0"}])
    ['caveats', 'would_change']
    """
    return [c for c in CAVEAT_COLUMNS if not rows or c not in rows[0]]


def verdict_kind(verdict: str) -> str:
    """The verdict without its qualifiers in parentheses.

    >>> verdict_kind("inconclusive (identical answers) (partial)"), verdict_kind("holds")
    ('inconclusive', 'holds')
    """
    return re.sub(r"\s*\(.*$", "", verdict.strip()) or verdict.strip()


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


# A point column and its CI ends, shown as one cell "point [lo, hi]".
CI_COLUMNS = {"ours": ("lo", "hi"), "auroc_diff": ("auroc_lo", "auroc_hi")}


def register_table(rows: list[dict[str, str]]) -> list[str]:
    """One register as Markdown table lines; ``ours``/``lo``/``hi`` become ``ours [lo, hi]`` (and
    ``auroc_diff``/``auroc_lo``/``auroc_hi`` likewise). Caveat columns (``CAVEAT_COLUMNS``) are
    always shown, an empty one as ``NOT_RECORDED``; ``CaveatError`` if a caveat value would not
    be on the page.

    >>> print("\\n".join(register_table([{"claim": "A | B", "ours": "1.5", "lo": "-0.5", "hi": "3.0",
    ...                                   "verdict": "inconclusive", "detail": "long"}])))
    | claim | ours [95 % CI] | verdict |
    |---|---|---|
    | A \\| B | 1.5 [-0.5, 3.0] | inconclusive |
    >>> print("\\n".join(register_table([{"claim": "c", "verdict": "holds", "n": "8", "caveats": ""}])))
    | claim | verdict | n | caveats |
    |---|---|---|---|
    | c | holds | 8 | *not recorded* |
    """
    columns = [c for c in rows[0] if c not in SKIPPED_COLUMNS or c in CAVEAT_COLUMNS]
    merged = {c: ends for c, ends in CI_COLUMNS.items() if {c, *ends} <= set(columns)}
    columns = [c for c in columns if not any(c in ends for ends in merged.values())]
    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c) or ""
            if c in merged and value != "" and row.get(merged[c][0], "") != "":
                value = f"{value} [{row[merged[c][0]]}, {row[merged[c][1]]}]"
            if c in CAVEAT_COLUMNS and not value.strip():
                value = NOT_RECORDED
            cells.append(_cell(value))
        line = "| " + " | ".join(cells) + " |"
        lost = [c for c in CAVEAT_COLUMNS if c in row and (row[c] or "").strip() and _cell(row[c]) not in line]
        if lost:
            raise CaveatError(f"the findings table would drop the caveat column(s) {lost} of {row.get('claim')!r}")
        lines.append(line)
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
                  strict: bool = False) -> str | None:
    """The page's MyST Markdown, or ``None`` when no chapter under ``results`` wrote a register.

    ``chapters`` maps a chapter stem to (link to its page, its provenance line), both optional.
    A register without the caveat columns is marked under its heading (``NO_CAVEATS``) and counted
    at the top; ``strict=True`` refuses it instead (``CaveatError``).
    """
    registers = read_registers(results)
    if not registers:
        return None
    bare = {(stem, title): missing_caveat_columns(rows) for stem, title, rows in registers
            if missing_caveat_columns(rows)}
    if strict and bare:
        raise CaveatError("registers without caveat columns: " + "; ".join(
            f"{stem}/{title}: no {', '.join(cols)}" for (stem, title), cols in bare.items()))
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
    if bare:
        lines += [f"{len(bare)} of {len(registers)} registers carry no caveats: "
                  + ", ".join(title for _, title in bare) + ".", ""]
    for stem, title, rows in registers:
        lines += [f"## {title}", "", f"From {name(stem)}.", ""]
        if (stem, title) in bare:
            lines += [NO_CAVEATS.format(missing=", ".join(f"`{c}`" for c in bare[(stem, title)])), ""]
        lines += register_table(rows) + [""]
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
