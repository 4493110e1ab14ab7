"""Upstream data files: manifest, resolution, hash verification, download, restricted unpickling.

Files are never copied into this repository. ``data_manifest/files.yaml`` records, for every
upstream file, its path (as mirrored in ``../shared/data``), upstream URL at a pinned commit,
sha256, size, licence, citation and the tasks that use it. A file is resolved from, in order:

1. ``$ESMERGE_DATA_DIR`` -- when set, it must be an existing folder: a mistyped path is refused
   with ``DataError`` rather than silently skipped (files would otherwise come from elsewhere);
2. ``../shared/data`` beside the repository (when it exists);
3. the user cache (``$ESMERGE_CACHE/data``), where ``fetch`` downloads it by URL.

Every resolved file is checked against its sha256 before use. Also here:

* ``verify`` / ``check_file``: the status of every file (ok, missing, corrupt, unreadable);
* ``safe_pickle_load``, the restricted unpickler the TGSA (GDSC2) pickles are read with;
* ``cli``: ``esmerge data verify`` and ``esmerge data fetch``.

The readers of these files are in ``esmerge.sources``; the 13 benchmarks built from them, and their
evaluation pools, in ``esmerge.benchmarks``.
"""
from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from esmerge.cache import cache_dir, file_sha256
from esmerge.errors import EsmergeError

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = REPO_ROOT / "data_manifest" / "files.yaml"


class DataError(EsmergeError, RuntimeError):
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
    citation: str = ""


@lru_cache(maxsize=1)
def manifest() -> dict[str, ManifestEntry]:
    """All manifest entries keyed by their path."""
    rows = yaml.safe_load(MANIFEST.read_text())["files"]
    return {row["path"]: ManifestEntry(**{**row, "tasks": tuple(row.get("tasks") or ())}) for row in rows}


def search_dirs() -> list[Path]:
    """The folders files are looked up in, in order; ``DataError`` if ``$ESMERGE_DATA_DIR`` is not a folder."""
    dirs = []
    if os.environ.get("ESMERGE_DATA_DIR"):
        chosen = Path(os.environ["ESMERGE_DATA_DIR"])
        if not chosen.is_dir():
            raise DataError(f"ESMERGE_DATA_DIR={chosen} is not a folder; create it, correct the path or unset it")
        dirs.append(chosen)
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
    obtain it, if it is unknown, missing, corrupt or unreadable.
    """
    entries = manifest()
    if relpath not in entries:
        raise DataError(f"{relpath}: not in the data manifest ({MANIFEST})")
    entry = entries[relpath]
    for root in search_dirs():
        candidate = root / relpath
        try:
            exists = candidate.is_file()
            matches = exists and _verified(str(candidate), entry.sha256)
        except OSError as err:  # no permission on the file or a folder above it
            raise DataError(f"{candidate}: cannot be read ({err.strerror or err}); fix its permissions or remove it") from None
        if exists:
            if not matches:
                raise DataError(
                    f"{candidate}: sha256 mismatch (expected {entry.sha256}); the file is corrupt or a "
                    f"different version: {how_to_get(entry)}"
                )
            return candidate
    searched = ", ".join(str(d) for d in search_dirs())
    raise DataError(f"{relpath}: not found in {searched} (expected sha256 {entry.sha256}); {how_to_get(entry)}")


# ----------------------------------------------------------------------------------------------
# Restricted unpickling (TGSA ships its GDSC2 tables as pickles)
# ----------------------------------------------------------------------------------------------

def _numpy_allowed() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array needs, under both numpy 1 (``numpy.core``) and numpy 2
    (``numpy._core``) module names; each is bound to the object of the running numpy."""
    from numpy._core import multiarray, numeric  # numpy >= 2; the 1.x names below map here

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 arrays
    return allowed


# Builtin containers/primitives pickle may name by global (dict, list, tuple, str, ... have opcodes).
# ``_codecs.encode`` is how protocol 2 stores bytes (numpy array buffers); it only encodes a string.
_BUILTINS_ALLOWED = {("builtins", n): getattr(__import__("builtins"), n)
                     for n in ("set", "frozenset", "complex", "bytearray", "slice", "range")}
_BUILTINS_ALLOWED[("_codecs", "encode")] = __import__("codecs").encode


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, source: str):
        super().__init__(fh)
        self.source = source
        self.allowed = {**_numpy_allowed(), **_BUILTINS_ALLOWED}

    def find_class(self, module: str, name: str):
        # Protocols 0-2 name builtins by their Python 2 modules (``__builtin__.set``); map them the
        # way CPython's own Unpickler does before checking the allow-list.
        from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refused global {module}.{name} while unpickling (only numpy arrays "
                f"and builtin containers are allowed); the file is not the expected TGSA table"
            ) from None

    def persistent_load(self, pid):
        raise DataError(f"{self.source}: refused persistent id {pid!r} while unpickling")


def safe_pickle_load(path: str | os.PathLike):
    """Unpickle ``path`` allowing only numpy arrays/dtypes/scalars and builtin containers.

    Any other global (``os.system``, ``builtins.eval``, a class) raises ``DataError`` naming it
    before anything is called, so a tampered file cannot execute code.
    """
    with open(path, "rb") as fh:
        try:
            return _RestrictedUnpickler(fh, str(path)).load()
        except DataError:
            raise
        except Exception as err:  # truncated or not a pickle at all
            raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------------------------
# Verification, download, command line (`esmerge data verify|fetch`)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileStatus:
    """Where a manifest file was found and whether it matches: ``ok``, ``missing``, ``corrupt`` or
    ``unreadable`` (a copy, or a folder on its path, that cannot be read)."""
    path: str
    bytes: int
    status: str
    location: Path | None
    message: str = ""


def check_file(entry: ManifestEntry) -> FileStatus:
    """Status of one manifest entry, resolved in ``data_path``'s order (first copy found decides)."""
    for root in search_dirs():
        candidate = root / entry.path
        try:
            if not candidate.is_file():
                continue
            size = candidate.stat().st_size
            matches = size == entry.bytes and _verified(str(candidate), entry.sha256)
        except OSError as err:  # no permission on the file or a folder above it
            return FileStatus(entry.path, 0, "unreadable", candidate,
                              f"{entry.path}: cannot read {candidate} ({err.strerror or err}); "
                              f"fix its permissions or remove it")
        if matches:
            return FileStatus(entry.path, size, "ok", candidate)
        return FileStatus(entry.path, size, "corrupt", candidate,
                          f"{entry.path}: corrupt copy at {candidate} ({size} bytes; expected {entry.bytes} "
                          f"bytes, sha256 {entry.sha256}); remove it and {how_to_get(entry)}")
    return FileStatus(entry.path, 0, "missing", None,
                      f"{entry.path}: missing (expected sha256 {entry.sha256}); {how_to_get(entry)}")


def verify() -> list[FileStatus]:
    """Check every manifest file (size, then sha256)."""
    return [check_file(entry) for entry in manifest().values()]


def fetch(entry: ManifestEntry, force: bool = False) -> Path:
    """Download ``entry`` by its URL into the cache (``$ESMERGE_CACHE/data``), checking its sha256.

    The file is written under a temporary name and renamed into place only when the hash matches,
    so an interrupted or tampered download leaves nothing behind. Returns the cached path.
    """
    import shutil
    import tempfile
    import urllib.request

    target = cache_dir() / "data" / entry.path
    if target.is_file() and not force and file_sha256(target) == entry.sha256:
        return target
    derive = DERIVED.get(entry.path)
    if not entry.url and derive is None:
        raise DataError(f"{entry.path}: no download URL; {how_to_get(entry)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            if derive is not None:
                out.write(derive().encode())
            else:
                with urllib.request.urlopen(entry.url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
        got = file_sha256(tmp)
        if got != entry.sha256:
            origin = "derived" if derive is not None else f"downloaded from {entry.url}"
            raise DataError(f"{entry.path}: {origin} but sha256 is {got}, expected "
                            f"{entry.sha256}; the upstream file changed or the download was altered")
        os.replace(tmp, target)
    except OSError as err:  # URLError is an OSError: no network, 404, refused
        raise DataError(f"{entry.path}: download from {entry.url} failed ({err}); "
                        f"copy the file to $ESMERGE_DATA_DIR/{entry.path} by hand") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _verified.cache_clear()
    return target


CYP_FASTA = "derived/cyp_human.fasta"
CYP_ACCESSIONS = {"CYP1A2": "P05177", "CYP2C19": "P33261", "CYP2C9": "P11712", "CYP2D6": "P10635",
                  "CYP3A4": "P08684"}
MOLTRANS_BIOSNAP = "moltrans/dataset/BIOSNAP/full_data/test.csv"


def derive_cyp_fasta() -> str:
    """The text of ``derived/cyp_human.fasta``: each human CYP enzyme's sequence, taken from MolTrans
    BIOSNAP by its UniProt accession (column ``Gene``), as ``>NAME ACCESSION len=N`` + 60-column lines."""
    import textwrap

    biosnap = pd.read_csv(data_path(MOLTRANS_BIOSNAP), usecols=["Gene", "Target Sequence"], dtype=str)
    records = []
    for name, accession in CYP_ACCESSIONS.items():
        sequences = biosnap.loc[biosnap["Gene"] == accession, "Target Sequence"].unique()
        if len(sequences) != 1:
            raise DataError(f"{MOLTRANS_BIOSNAP}: expected one sequence for {accession}, found {len(sequences)}")
        seq = sequences[0]
        records.append(f">{name} {accession} len={len(seq)}\n" + "\n".join(textwrap.wrap(seq, 60)) + "\n")
    return "".join(records)


# Manifest files made here rather than downloaded: path -> function returning the file's text.
DERIVED = {CYP_FASTA: derive_cyp_fasta}


def _print_table(statuses: list[FileStatus]) -> None:
    width = max([len(s.path) for s in statuses] + [4])
    status_width = max([len(s.status) for s in statuses] + [7])
    print(f"{'file':<{width}}  {'bytes':>9}  {'status':<{status_width}}  where")
    for s in statuses:
        root = str(s.location)[: -len(s.path) - 1] if s.location else "-"  # the search dir it came from
        print(f"{s.path:<{width}}  {s.bytes:>9}  {s.status:<{status_width}}  {root}")


def cli(argv: list[str]) -> int:
    """``esmerge data verify`` | ``esmerge data fetch [--force] [FILE ...]``; returns the exit code."""
    import argparse

    parser = argparse.ArgumentParser(prog="esmerge data", description="Upstream data files of the manifest.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check every file against its sha256; exit 0 only if all match")
    fetch_parser = sub.add_parser("fetch", help="download missing files by URL into the cache, hash-checked")
    fetch_parser.add_argument("files", nargs="*", help="manifest paths (default: every missing file)")
    fetch_parser.add_argument("--force", action="store_true", help="download even if a good copy exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has already printed the usage error
        return int(stop.code or 0)
    try:
        entries = manifest()
    except (OSError, yaml.YAMLError, TypeError, KeyError) as err:
        print(f"error: cannot read the data manifest {MANIFEST}: {err}", file=sys.stderr)
        return 1

    if args.command == "verify":
        try:
            statuses = verify()
        except DataError as err:  # e.g. ESMERGE_DATA_DIR is not a folder
            print(f"error: {err}", file=sys.stderr)
            return 1
        _print_table(statuses)
        bad = [s for s in statuses if s.status != "ok"]
        for s in bad:
            print(f"error: {s.message}", file=sys.stderr)
        print(f"{len(statuses) - len(bad)} of {len(statuses)} files ok")
        return 1 if bad else 0

    unknown = [f for f in args.files if f not in entries]
    if unknown:
        print(f"error: not in the data manifest: {', '.join(unknown)}", file=sys.stderr)
        return 2
    failures = 0
    for entry in (entries[f] for f in args.files or entries):
        try:
            status = check_file(entry)
        except DataError as err:  # e.g. ESMERGE_DATA_DIR is not a folder
            print(f"error: {err}", file=sys.stderr)
            return 1
        in_cache = status.location is not None and cache_dir() / "data" in status.location.parents
        if status.status == "ok" and not args.force:
            continue
        if status.status in ("corrupt", "unreadable") and not in_cache:
            print(f"error: {status.message}", file=sys.stderr)  # it would shadow a fresh download
            failures += 1
            continue
        try:
            print(f"fetched {entry.path} -> {fetch(entry, force=True)}")
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0
