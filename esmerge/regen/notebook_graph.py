"""Which notebooks there are and in which order they run: the ``# esmerge-needs:`` graph.

A notebook is ``notebooks/NN_name.py`` (jupytext percent format) with a line
``# esmerge-needs: 01_data, 02_specialists`` naming the notebooks whose results it reads.
``discover`` finds them, ``topological_order`` orders them, ``with_ancestors`` closes a
selection over what it needs. Notebook 00 lists the chapters with the same parser.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from esmerge.errors import EsmergeError

NEEDS_RE = re.compile(r"^#\s*esmerge-needs:[ \t]*(.*)$", re.MULTILINE)
STEM_RE = re.compile(r"^\d\d_[A-Za-z0-9_]+$")


class RegenerateError(EsmergeError, RuntimeError):
    """The notebooks or the book could not be (re)built; the message says which and why."""


@dataclass(frozen=True)
class Notebook:
    stem: str
    path: Path
    needs: tuple[str, ...] = field(default=())


def parse_needs(text: str) -> tuple[str, ...]:
    """Stems listed on the notebook's ``# esmerge-needs:`` line (empty when absent or blank).

    >>> parse_needs("# %%\\n# esmerge-needs: 01_data, 02_specialists\\nx = 1")
    ('01_data', '02_specialists')
    >>> parse_needs("# esmerge-needs:\\nscale = 'cpu'\\n")
    ()
    """
    match = NEEDS_RE.search(text)
    if not match:
        return ()
    return tuple(s.strip() for s in match.group(1).split(",") if s.strip())


def discover(notebooks_dir: Path) -> dict[str, Notebook]:
    """Every ``NN_name.py`` notebook in ``notebooks_dir``, keyed by stem, in file-name order."""
    if not notebooks_dir.is_dir():
        raise RegenerateError(f"no notebooks folder at {notebooks_dir}")
    found = {}
    for path in sorted(notebooks_dir.glob("[0-9][0-9]_*.py")):
        if STEM_RE.match(path.stem):
            found[path.stem] = Notebook(path.stem, path, parse_needs(path.read_text()))
    return found


def topological_order(notebooks: dict[str, Notebook]) -> list[str]:
    """Stems ordered so that every notebook comes after those it needs (ties by file name).

    Raises ``RegenerateError`` naming an unknown dependency or the notebooks on a cycle.
    """
    for nb in notebooks.values():
        for dep in nb.needs:
            if dep not in notebooks:
                raise RegenerateError(
                    f"{nb.path.name} needs {dep!r} (esmerge-needs line), but there is no "
                    f"notebook {dep}.py in {nb.path.parent}"
                )
    order: list[str] = []
    done: set[str] = set()
    remaining = dict(notebooks)
    while remaining:
        ready = sorted(s for s, nb in remaining.items() if set(nb.needs) <= done)
        if not ready:
            raise RegenerateError("esmerge-needs lines form a cycle among: " + ", ".join(sorted(remaining)))
        order.extend(ready)
        done.update(ready)
        for stem in ready:
            del remaining[stem]
    return order


def with_ancestors(notebooks: dict[str, Notebook], stems: list[str]) -> set[str]:
    """``stems`` plus every notebook they need, directly or transitively."""
    unknown = [s for s in stems if s not in notebooks]
    if unknown:
        raise RegenerateError(f"--only: no notebook named {', '.join(unknown)} (have: {', '.join(notebooks)})")
    out: set[str] = set()
    stack = list(stems)
    while stack:
        stem = stack.pop()
        if stem not in out:
            out.add(stem)
            for dep in notebooks[stem].needs:
                if dep not in notebooks:
                    raise RegenerateError(f"{stem} needs {dep!r} (esmerge-needs line), "
                                          f"but there is no notebook {dep}.py")
                stack.append(dep)
    return out
