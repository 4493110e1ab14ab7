"""What each chapter was executed from, and whether that still matches the code.

``esmerge regenerate`` records, for every notebook it runs, the input key (``esmerge.regen.input_keys``),
the commit of the repository and the sha256 of the notebook's text in ``regenerate_state.json``.
Comparing that record with the keys the files give *now* sorts every chapter into one of:

* ``fresh``: the key still matches: what the book shows is what the code would produce;
* ``code changed``: the notebook's text is unchanged but code, data or an upstream notebook it
  reads changed (a warning: a full ``cpu`` run cannot fit in CI). A notebook whose text differs
  only in where its ``esmerge`` names are imported from (``same_but_imports``) counts here too:
  moving a function between modules is a change of code, not of what the chapter says or calls;
* ``text changed``: the notebook's own text changed since it ran (an error for shipped results:
  the book would show the output of a notebook that no longer exists in that form);
* ``not executed``: a notebook with no executed copy (an error for shipped results);
* ``no source``: an executed copy whose notebook is gone (left out of the book; a warning).

The same record gives each chapter's banner (``banner_segments``), which the book shows under
the chapter's title (``esmerge.regen.sphinx_freshness``).
"""
from __future__ import annotations

import hashlib
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

FRESH, CODE_CHANGED, TEXT_CHANGED, NOT_EXECUTED, NO_SOURCE = (
    "fresh", "code changed", "text changed", "not executed", "no source")
# Statuses that fail ``esmerge regenerate --check``; the others only warn.
FAILING = (TEXT_CHANGED, NOT_EXECUTED)


def text_sha256(path: Path) -> str:
    """sha256 of a notebook's bytes: what ``text changed`` compares."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


_ESMERGE_IMPORT = re.compile(
    r"^[ \t]*(?:from esmerge[\w.]* import (?:\([^)]*\)|[^\n]*)|import esmerge[^\n]*)[ \t]*(?:\n|$)", re.M)
_BOUND = re.compile(r"(\w+)\s+as\s+(\w+)|(\w+)")


def _imported_aliases(source: str) -> set[str]:
    """Local names an ``esmerge`` import statement binds in ``source`` (modules and functions alike)."""
    names = set()
    for statement in _ESMERGE_IMPORT.findall(source):
        if statement.lstrip().startswith("from"):
            bound = statement.split(" import ", 1)[1].strip("()\n ")
            for m in _BOUND.finditer(bound):
                names.add(m.group(2) or m.group(3))
        else:
            names.add(statement.split(" as ")[-1].strip().split(".")[0])
    return names


def without_imports(source: str, aliases: set[str] | None = None) -> str:
    """``source`` with its ``esmerge`` import statements removed, each name bound by those imports (or
    given in ``aliases``) unqualified, each dotted ``esmerge`` path cut to ``esmerge``, notes to the linter
    left out, and all whitespace (line breaks and indentation included) removed: the key to compare two
    versions by, not text to read.

    >>> without_imports("from esmerge import evaluate as ev\\n\\nx = ev.claims(r,\\n                   n)\\n")
    'x=claims(r,n)'
    >>> without_imports("x = claims(r)  # see `esmerge.report.claims`", {"report"})
    'x=claims(r)#see`esmerge`'
    """
    aliases = _imported_aliases(source) | (aliases or set())
    body = _ESMERGE_IMPORT.sub("", source)
    if aliases:
        body = re.sub(r"(?<![\w.])(?:" + "|".join(map(re.escape, sorted(aliases))) + r")\.(?=[A-Za-z_])", "", body)
    body = re.sub(r"\besmerge(?:\.\w+)+", "esmerge", body)  # a dotted path in prose names code, not text
    body = re.sub(r"[ \t]*# noqa\b[^\n]*", "", body)  # a note to the linter
    return "".join(body.split())  # line breaks and indentation: how a line is wrapped is not what it says


def same_but_imports(before: list[str], after: list[str]) -> bool:
    """Whether two versions of a notebook's cells (their sources, in order) differ only in where their
    ``esmerge`` names come from: the import statements, and the module a name is reached through.

    >>> same_but_imports(["from esmerge import evaluate as ev", "ev.claims(r)"],
    ...                  ["from esmerge import report", "report.claims(r)"])
    True
    >>> same_but_imports(["from esmerge import evaluate as ev", "ev.claims(r)"],
    ...                  ["from esmerge import report", "report.claims(r, margin=1)"])
    False
    """
    if len(before) != len(after):
        return False
    names_before = set().union(*map(_imported_aliases, before)) if before else set()
    names_after = set().union(*map(_imported_aliases, after)) if after else set()
    return all(without_imports(a, names_before) == without_imports(b, names_after) for a, b in zip(before, after))


def source_commit(repo: Path) -> dict:
    """``{"commit": sha or None, "uncommitted_changes": bool or None}`` of the git work tree at ``repo``.

    ``None`` outside a git work tree (or without git): provenance is then the input key alone.
    """
    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None

    head = git("rev-parse", "--verify", "HEAD")
    if head is None or head.returncode != 0:
        return {"commit": None, "uncommitted_changes": None}
    # Only what goes into the input keys counts: notebooks, the package, the data manifest.
    diff = git("status", "--porcelain", "--untracked-files=no", "--", "notebooks", "esmerge", "data_manifest")
    return {"commit": head.stdout.strip(),
            "uncommitted_changes": None if diff is None or diff.returncode != 0 else bool(diff.stdout.strip())}


@dataclass(frozen=True)
class ChapterStatus:
    stem: str
    status: str
    recorded_key: str | None  # the key it was executed with
    current_key: str | None  # the key the files give now
    entry: dict  # its regenerate_state.json entry (commit, parameters, started, ...)


def chapter_statuses(state: dict, executed: set[str], keys_now: dict[str, str],
                     texts_now: dict[str, str]) -> list[ChapterStatus]:
    """Status of every chapter: each notebook in ``keys_now`` (in that order), then executed orphans.

    ``state`` is a loaded ``regenerate_state.json``; ``executed`` the stems with an executed copy;
    ``keys_now`` / ``texts_now`` the input key and text sha256 of each notebook as the files are now.

    >>> state = {"notebooks": {"01_a": {"key": "k1", "text_sha256": "t1"},
    ...                        "02_b": {"key": "k2", "text_sha256": "t2"},
    ...                        "09_gone": {"key": "k9", "text_sha256": "t9"}}}
    >>> [(s.stem, s.status) for s in chapter_statuses(
    ...     state, {"01_a", "02_b", "09_gone"}, {"01_a": "k1", "02_b": "k2-new", "03_c": "k3"},
    ...     {"01_a": "t1", "02_b": "t2", "03_c": "t3"})]
    [('01_a', 'fresh'), ('02_b', 'code changed'), ('03_c', 'not executed'), ('09_gone', 'no source')]
    """
    recorded = state.get("notebooks", {})
    out = []
    for stem, key in keys_now.items():
        entry = recorded.get(stem, {})
        if stem not in executed or "key" not in entry:
            status = NOT_EXECUTED
        elif entry["key"] == key:
            status = FRESH
        elif entry.get("text_sha256") in (None, texts_now.get(stem)):
            # No recorded text hash (a state from before it was kept): the text cannot be shown to
            # have changed, so it is not called a text change.
            status = CODE_CHANGED
        else:
            status = TEXT_CHANGED
        out.append(ChapterStatus(stem, status, entry.get("key"), key, entry))
    for stem in sorted(executed - set(keys_now)):
        entry = recorded.get(stem, {})
        out.append(ChapterStatus(stem, NO_SOURCE, entry.get("key"), None, entry))
    return out


def banner_segments(status: ChapterStatus, origin: str, cold_seconds: float | None = None) -> list[tuple[str, str]]:
    """The chapter's freshness banner as ``(kind, text)`` pieces, ``kind`` ``text``, ``code`` or ``strong``.

    ``origin`` says where the rendered copy comes from ("shipped with the repository" or "a local
    run"). Pieces rather than markup, so the Sphinx extension builds nodes without parsing.

    The run's duration is wall-clock, with whatever the content-keyed caches already held; when that
    is well under ``cold_seconds`` (the chapter's time with empty caches, from the Rerun page), the
    banner gives both.

    >>> s = ChapterStatus("04_layerwise", "fresh", "3fc57be349c6dba6127b", "3fc57be349c6dba6127b",
    ...                   {"parameters": {"scale": "cpu", "seed": 0}, "commit": "0123456789abcdef",
    ...                    "started": "2026-12-02T07:02:07+00:00", "seconds": 130.4})
    >>> print(banner_plain(banner_segments(s, "shipped with the repository")))  # doctest: +NORMALIZE_WHITESPACE
    Executed at scale cpu, seed 0, on 2026-12-02 in 2m10s from commit 0123456789ab (shipped with the
    repository); input key 3fc57be349c6dba6127b: matches the code now.
    >>> print(banner_plain(banner_segments(s, "a local run", cold_seconds=4200)))  # doctest: +NORMALIZE_WHITESPACE
    Executed at scale cpu, seed 0, on 2026-12-02 in 2m10s (reading what the caches held; 1h10m with empty
    caches, book/rerun.md) from commit 0123456789ab (a local run); input key 3fc57be349c6dba6127b:
    matches the code now.
    """
    from esmerge.progress import format_seconds

    entry = status.entry
    params = entry.get("parameters") or {}
    parts: list[tuple[str, str]] = [("text", "Executed at scale "), ("code", str(params.get("scale", "?"))),
                                    ("text", f", seed {params.get('seed', '?')}")]
    if entry.get("started"):
        parts.append(("text", f", on {entry['started'][:10]}"))
    if entry.get("seconds"):
        parts.append(("text", f" in {format_seconds(float(entry['seconds']))}"))
        if cold_seconds and float(entry["seconds"]) < 0.8 * cold_seconds:
            parts.append(("text", f" (reading what the caches held; {format_seconds(cold_seconds)} with empty "
                                  "caches, book/rerun.md)"))
    if entry.get("commit"):
        parts += [("text", " from commit "), ("code", entry["commit"][:12])]
        if entry.get("uncommitted_changes"):
            parts.append(("text", " plus uncommitted changes"))
    parts += [("text", f" ({origin}); input key "), ("code", status.recorded_key or "?"), ("text", ": ")]
    if status.status == FRESH:
        parts.append(("strong", "matches the code now."))
    elif status.status == CODE_CHANGED:
        parts += [("strong", "stale"), ("text", ": code, data or an upstream chapter it reads changed since "
                                                "(key now "), ("code", status.current_key or "?"),
                  ("text", "); its text did not. Re-run "),
                  ("code", f"esmerge regenerate --scale {params.get('scale', 'cpu')} --only {status.stem}"),
                  ("text", " to refresh.")]
    elif status.status == TEXT_CHANGED:
        parts += [("strong", "stale"), ("text", ": the notebook's own text changed since it ran; these outputs "
                                                "are not what it would produce now. Re-run "),
                  ("code", f"esmerge regenerate --scale {params.get('scale', 'cpu')} --only {status.stem}"),
                  ("text", ".")]
    elif status.status == NOT_EXECUTED:
        parts.append(("strong", "no record of the run that made it (no regenerate_state.json entry)."))
    else:
        parts.append(("strong", status.status + "."))
    return parts


def banner_plain(segments: list[tuple[str, str]]) -> str:
    """The banner as one plain line (logs, tests)."""
    return "".join(text for _, text in segments)


def banner_markdown(segments: list[tuple[str, str]]) -> str:
    """The banner as one line of Markdown (the findings page).

    >>> banner_markdown([("text", "key "), ("code", "ab12"), ("text", ": "), ("strong", "stale")])
    'key `ab12`: **stale**'
    """
    marks = {"code": "`", "strong": "**"}
    return "".join(f"{marks.get(kind, '')}{text}{marks.get(kind, '')}" for kind, text in segments)


def summary_lines(statuses: list[ChapterStatus], what: str) -> list[str]:
    """One line per chapter that is not fresh, for ``--check`` and the book build's log.

    >>> print("\\n".join(summary_lines([ChapterStatus("01_a", "fresh", "k", "k", {}),
    ...     ChapterStatus("02_b", "text changed", "k", "j", {})], "shipped cpu")))
      STALE       02_b: text changed (shipped cpu key k, now j)
    """
    lines = []
    for s in statuses:
        if s.status == FRESH:
            continue
        label = "STALE      " if s.status in FAILING else "warning    "
        lines.append(f"  {label} {s.stem}: {s.status} ({what} key {s.recorded_key or 'none'}, "
                     f"now {s.current_key or 'none'})")
    return lines
