"""Upstream data: manifest, resolution, hash verification, and loaders.

Files are never copied into this repository. ``data_manifest/files.yaml`` records, for every
upstream file, its path (as mirrored in ``../shared/data``), upstream URL at a pinned commit,
sha256, size and licence. A file is resolved from, in order:

1. ``$ESMERGE_DATA_DIR``;
2. ``../shared/data`` beside the repository (when it exists);
3. the user cache (``$ESMERGE_CACHE/data``), where ``fetch`` downloads it by URL.

Every resolved file is checked against its sha256 before use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from esmerge.cache import cache_dir, file_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = REPO_ROOT / "data_manifest" / "files.yaml"


class DataError(RuntimeError):
    """A data file is missing, corrupt or unknown; the message says how to fix it."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    sha256: str
    bytes: int
    repo: str
    commit: str
    url: str | None
    licence: str
    source: str
    tasks: tuple[str, ...] = ()


@lru_cache(maxsize=1)
def manifest() -> dict[str, ManifestEntry]:
    """All manifest entries keyed by their path."""
    rows = yaml.safe_load(MANIFEST.read_text())["files"]
    return {row["path"]: ManifestEntry(**{**row, "tasks": tuple(row.get("tasks") or ())}) for row in rows}


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("ESMERGE_DATA_DIR"):
        dirs.append(Path(os.environ["ESMERGE_DATA_DIR"]))
    shared = REPO_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        dirs.append(shared)
    dirs.append(cache_dir() / "data")
    return dirs


def how_to_get(entry: ManifestEntry) -> str:
    where = f"download {entry.url}" if entry.url else f"derive it as described in data_manifest ({entry.source})"
    return f"{where} to $ESMERGE_DATA_DIR/{entry.path} (or run `esmerge data fetch`)"


@lru_cache(maxsize=None)
def _verified(path: str, sha256: str) -> bool:
    return file_sha256(path) == sha256


def data_path(relpath: str) -> Path:
    """The verified local path of manifest file ``relpath`` (e.g. ``molt5/ChEBI-20_data/test.txt``).

    Raises ``DataError`` with a one-line message naming the file, its expected sha256 and how to
    obtain it, if it is unknown, missing or corrupt.
    """
    entries = manifest()
    if relpath not in entries:
        raise DataError(f"{relpath}: not in the data manifest ({MANIFEST})")
    entry = entries[relpath]
    for root in search_dirs():
        candidate = root / relpath
        if candidate.is_file():
            if not _verified(str(candidate), entry.sha256):
                raise DataError(
                    f"{candidate}: sha256 mismatch (expected {entry.sha256}); the file is corrupt or a "
                    f"different version: {how_to_get(entry)}"
                )
            return candidate
    searched = ", ".join(str(d) for d in search_dirs())
    raise DataError(f"{relpath}: not found in {searched} (expected sha256 {entry.sha256}); {how_to_get(entry)}")
