"""Where things live: the repository, its notebooks, and the per-scale run and book folders.

Notebooks write their figures and tables to ``run_dir(scale, stem)``; ``esmerge regenerate``
writes executed notebooks to ``executed_dir(scale)``. Both are build products (gitignored).
``$ESMERGE_RUNS_DIR`` moves the runs folder (``esmerge regenerate`` sets it for the notebooks it
executes, so a notebook and the regenerator always agree on where results go). ``Layout`` is
the set of folders one regeneration reads and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from esmerge import scales

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
BOOK_DIR = REPO_ROOT / "book"
SCALES = scales.NAMES  # kept for importers; the names live in esmerge.scales
# Folders under a merge root (``run_dir(scale, "06_merging")``) that hold no method of their own: the
# merges of the seed replicates and the baselines' budget curves (``esmerge.run.all_methods``).
MERGE_ROOT_EXTRAS = ("seeds", "curves")


def runs_root() -> Path:
    """The folder holding ``{scale}/{stem}/`` results: ``$ESMERGE_RUNS_DIR`` or ``<repo>/runs``."""
    return Path(os.environ.get("ESMERGE_RUNS_DIR") or REPO_ROOT / "runs")


def run_dir(scale: str, stem: str) -> Path:
    """``runs/{scale}/{stem}``, created: where notebook ``stem`` saves figures, tables and results.

    ``scale`` is a scale's name (``ScaleConfig.name``), resolved (and so checked) where it was given.
    """
    path = runs_root() / scale / stem
    path.mkdir(parents=True, exist_ok=True)
    return path


def executed_dir(scale: str) -> Path:
    """``book/executed/{scale}``, created: the executed notebooks the book renders at that scale."""
    path = BOOK_DIR / "executed" / scale
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class Layout:
    """The folders one regeneration reads and writes (the repository's own by default).

    Tests point every field at a temporary directory.
    """

    notebooks: Path  # notebooks/NN_*.py
    runs: Path  # runs/{scale}/{stem}/, state and produced.json
    book: Path  # Jupyter Book source: _config.yml, static pages, executed/{scale}/
    package: Path  # source tree whose modules are hashed into the input keys
    manifest: Path  # data manifest hashed into every input key
    cwd: Path  # working directory of every notebook kernel

    @classmethod
    def default(cls) -> "Layout":
        return cls(notebooks=NOTEBOOKS_DIR, runs=runs_root(), book=BOOK_DIR, package=REPO_ROOT / "esmerge",
                   manifest=REPO_ROOT / "data_manifest" / "files.yaml", cwd=REPO_ROOT)

    def executed(self, scale: str) -> Path:
        return self.book / "executed" / scale

    def state_file(self, scale: str) -> Path:
        return self.runs / scale / "regenerate_state.json"

    def failed_dir(self, scale: str) -> Path:
        return self.runs / scale / "failed"
