"""Where things live: the repository, its notebooks, and the per-scale run and book folders.

Notebooks write their figures and tables to ``run_dir(scale, stem)``; ``esmerge regenerate``
writes executed notebooks to ``executed_dir(scale)``. Both are build products (gitignored).
``$ESMERGE_RUNS_DIR`` moves the runs folder (``esmerge regenerate`` sets it for the notebooks it
executes, so a notebook and the regenerator always agree on where results go).
"""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BOOK_DIR = REPO_ROOT / "book"
SCALES = ("smoke", "cpu", "paper")


def _check_scale(scale: str) -> None:
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}: expected one of {', '.join(SCALES)}")


def runs_root() -> Path:
    """The folder holding ``{scale}/{stem}/`` results: ``$ESMERGE_RUNS_DIR`` or ``<repo>/runs``."""
    return Path(os.environ.get("ESMERGE_RUNS_DIR") or REPO_ROOT / "runs")


def run_dir(scale: str, stem: str) -> Path:
    """``runs/{scale}/{stem}``, created: where notebook ``stem`` saves figures, tables and results."""
    _check_scale(scale)
    path = runs_root() / scale / stem
    path.mkdir(parents=True, exist_ok=True)
    return path


def executed_dir(scale: str) -> Path:
    """``book/executed/{scale}``, created: the executed notebooks the book renders at that scale."""
    _check_scale(scale)
    path = BOOK_DIR / "executed" / scale
    path.mkdir(parents=True, exist_ok=True)
    return path
