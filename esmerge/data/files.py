"""Upstream data files: manifest, resolution, hash verification, download, restricted unpickling.

Files are never copied into this repository. ``data_manifest/files.yaml`` records, for every
upstream file, its path (as mirrored in ``../shared/data``), upstream URL at a pinned commit,
sha256, size, licence, citation and the tasks that use it. A file is resolved from, in order:

1. ``$ESMERGE_DATA_DIR`` -- when set, it must be an existing folder: a mistyped path is refused
   with ``DataError`` rather than silently skipped (files would otherwise come from elsewhere);
2. otherwise ``../shared/data`` beside the repository (when it exists): a folder named explicitly
   replaces it, so what is resolved is what the user pointed at;
3. the data cache (``$ESMERGE_DATA_CACHE``, default ``$ESMERGE_CACHE/data``), where ``fetch``
   downloads it by URL. It has its own variable so that a run with a fresh ``ESMERGE_CACHE`` (the
   Makefile's cold reproduction, the tests' own cache) still reads the files fetched once.

Every resolved file is checked against its sha256 before use. Also here:

* ``verify`` / ``check_file``: the status of every file (ok, missing, corrupt, unreadable);
* ``safe_pickle_load``, the restricted unpickler the TGSA (GDSC2) pickles are read with;
* ``fetch_missing``: what ``esmerge data fetch`` does; ``fetch_summary``: its outcome in one line
  (what ``make data`` prints, before ``make all`` or ``make test`` does any work).

The readers of these files are in ``esmerge.data.sources``; the 13 benchmarks built from them, and their
evaluation pools, in ``esmerge.data.benchmarks``.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from esmerge.cache import cache_dir, file_sha256
from esmerge.errors import EsmergeError, UsageError
from esmerge.paths import REPO_ROOT

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
    """All manifest entries keyed by their path; ``DataError`` naming the manifest if it cannot be read."""
    try:
        rows = yaml.safe_load(MANIFEST.read_text())["files"]
        return {row["path"]: ManifestEntry(**{**row, "tasks": tuple(row.get("tasks") or ())}) for row in rows}
    except (OSError, yaml.YAMLError, TypeError, KeyError) as err:
        raise DataError(f"cannot read the data manifest {MANIFEST} ({type(err).__name__}: {err}); "
                        "restore it from git") from None


class OfflineError(DataError):
    """A download that could not reach its server (no network, DNS, timeout): the next would fail too.
    ``reason`` is the network's own words, for the one-line summary."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason or message


def data_cache_dir() -> Path:
    """Where ``fetch`` puts downloaded files: ``$ESMERGE_DATA_CACHE`` or ``$ESMERGE_CACHE/data``."""
    chosen = os.environ.get("ESMERGE_DATA_CACHE")
    return Path(chosen) if chosen else cache_dir() / "data"


def search_dirs() -> list[Path]:
    """The folders files are looked up in, in order; ``DataError`` if ``$ESMERGE_DATA_DIR`` is not a folder."""
    if os.environ.get("ESMERGE_DATA_DIR"):
        chosen = Path(os.environ["ESMERGE_DATA_DIR"])
        if not chosen.is_dir():
            raise DataError(f"ESMERGE_DATA_DIR={chosen} is not a folder; create it, correct the path or unset it")
        dirs = [chosen]
    else:
        shared = REPO_ROOT.parent / "shared" / "data"
        dirs = [shared] if shared.is_dir() else []
    return dirs + [data_cache_dir()]


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
            raise DataError(f"{candidate}: cannot be read ({err.strerror or err}); "
                            "fix its permissions or remove it") from None
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
    """Download ``entry`` by its URL into the data cache (``data_cache_dir()``), checking its sha256.

    The file is written under a temporary name and renamed into place only when the hash matches,
    so an interrupted or tampered download leaves nothing behind. Returns the cached path.
    ``OfflineError`` when the server cannot be reached (as opposed to an HTTP error for this file).
    """
    import shutil
    import tempfile
    import urllib.error
    import urllib.parse
    import urllib.request

    target = data_cache_dir() / entry.path
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
    except urllib.error.HTTPError as err:  # the server answered: a problem of this file only
        raise DataError(f"{entry.path}: download from {entry.url} failed ({err}); "
                        f"copy the file to $ESMERGE_DATA_DIR/{entry.path} by hand") from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as err:  # no route, DNS, timeout
        reason = f"{urllib.parse.urlsplit(entry.url).netloc}: {getattr(err, 'reason', err)}"
        raise OfflineError(f"{entry.path}: cannot reach {reason}; copy the file to "
                           f"$ESMERGE_DATA_DIR/{entry.path} by hand", reason) from None
    except OSError as err:  # writing the cache: disk full, permissions
        raise DataError(f"{entry.path}: cannot write it to {target.parent} ({err}); "
                        f"free space or set ESMERGE_DATA_CACHE to a writable folder") from None
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


def fetch_missing(paths: list[str] | None = None, force: bool = False):
    """What ``esmerge data fetch`` does: yield ``(path, result)`` for each manifest file that needs a
    download (all of ``paths``, default every file that is not ``ok``; with ``force`` every one).

    ``result`` is the cached ``Path`` or the ``DataError`` that stopped that file; a corrupt copy
    outside the cache is reported, not shadowed by a fresh download. After one ``OfflineError`` the
    remaining downloads are not tried (each would wait for the same timeout) and get that error.
    Unknown ``paths`` are refused with ``UsageError`` before anything is fetched.
    """
    entries = manifest()
    unknown = [p for p in paths or [] if p not in entries]
    if unknown:
        raise UsageError(f"not in the data manifest: {', '.join(unknown)}; see data_manifest/files.yaml")
    offline: OfflineError | None = None
    for entry in (entries[p] for p in paths or entries):
        status = check_file(entry)
        in_cache = status.location is not None and data_cache_dir() in status.location.parents
        if status.status == "ok" and not force:
            continue
        if status.status in ("corrupt", "unreadable") and not in_cache:
            yield entry.path, DataError(status.message)  # a fresh download would hide behind it
            continue
        if offline is not None and entry.url:  # derived files are made here and still tried
            yield entry.path, OfflineError(f"{entry.path}: not downloaded, no network ({offline.reason})",
                                           offline.reason)
            continue
        try:
            yield entry.path, fetch(entry, force=True)
        except OfflineError as err:
            offline = err
            yield entry.path, err
        except DataError as err:
            yield entry.path, err


def fetch_summary(failures: dict[str, DataError], total: int) -> str:
    """One line for the files ``fetch_missing`` could not provide: which (the first few by name), why,
    and how to supply them. ``failures`` maps each path to its error, in manifest order."""
    if len(failures) == 1:
        return str(next(iter(failures.values())))
    paths = list(failures)
    named = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    offline = [e for e in failures.values() if isinstance(e, OfflineError)]
    why = (f"no download reached its server ({offline[0].reason})" if offline
           else f"first: {next(iter(failures.values()))}")
    return (f"{len(paths)} of {total} upstream data files are missing or unusable ({named}); {why}. "
            f"Set ESMERGE_DATA_DIR to a folder holding them (paths as in data_manifest/files.yaml; "
            f"`esmerge data verify` lists them) or run `esmerge data fetch` with network access")
