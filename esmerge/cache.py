"""Content-addressed caching: every intermediate is keyed by a hash of what made it.

A rerun with the same inputs loads the stored result; an interrupted run leaves no
half-written file behind (writes go to a temporary name, unique to the writer, and are renamed
into place). Two processes that need the same missing entry do not both compute it: ``cached``
holds a lock per key (``key_lock``), so the second waits and then loads what the first stored.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def cache_dir() -> Path:
    """Where esmerge caches converted weights and intermediates (``ESMERGE_CACHE``)."""
    root = os.environ.get("ESMERGE_CACHE") or Path.home() / ".cache" / "esmerge"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tensor_digest(tensors: dict[str, torch.Tensor], length: int = 16) -> str:
    """Content hash of named tensors (as float32), independent of dict order and device."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:length]


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (parameters, upstream hashes, code version)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def _temporary_sibling(path: Path) -> Iterator[Path]:
    """A fresh temporary file beside ``path`` (same folder, so the rename is atomic), unique to this writer.

    Yields its path; renames it onto ``path`` when the block succeeds, removes it when it raises.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are mode 0600, and a cache or state file keeps the umask's mode.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")
    tmp.touch(exist_ok=False)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a unique temporary sibling, so readers and parallel writers never see half a file.

    ``torch.save`` names the records inside its zip after the file it writes, so the temporary file
    sits in a private folder under the fixed name ``<name>.tmp``: the bytes do not depend on which
    writer made them (two runs write identical files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")
    private.mkdir()
    try:
        tmp = private / f"{path.name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(private, ignore_errors=True)


def atomic_write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (sorted keys) through a unique temporary file, so readers never see half a file.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "state.json"
    >>> atomic_write_json(out, {"b": 1, "a": [1, 2]}, indent=None)
    >>> out.read_text(), sorted(p.name for p in out.parent.iterdir())
    ('{"a": [1, 2], "b": 1}\\n', ['state.json'])
    """
    text = json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n"
    with _temporary_sibling(Path(path)) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def key_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for the cache entry (or output folder) ``path`` while the block runs.

    The lock is ``fcntl.flock`` on a hidden ``.{name}.lock`` file beside ``path``: the kernel
    releases it when the holder exits, even if it is killed, so a stale lock never blocks a rerun.
    The lock file itself stays (removing it would race with a process about to lock it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cached(path: Path, compute: Callable[[], Any], refresh: bool = False) -> Any:
    """Return the object stored at ``path``, computing and storing it first if absent.

    A second process asking for the same missing ``path`` waits for the first and loads its result.
    """
    path = Path(path)
    if path.exists() and not refresh:
        return torch.load(path, weights_only=True)
    with key_lock(path):
        if path.exists() and not refresh:  # another process stored it while we waited
            return torch.load(path, weights_only=True)
        value = compute()
        atomic_torch_save(value, path)
    return value
