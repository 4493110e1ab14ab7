"""Content-addressed caching: every intermediate is keyed by a hash of what made it.

A rerun with the same inputs loads the stored result; an interrupted run leaves no
half-written file behind (writes go to a temporary name and are renamed into place).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

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


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` as JSON (sorted keys) through a temporary file, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def cached(path: Path, compute: Callable[[], Any], refresh: bool = False) -> Any:
    """Return the object stored at ``path``, computing and storing it first if absent."""
    if path.exists() and not refresh:
        return torch.load(path, weights_only=True)
    value = compute()
    atomic_torch_save(value, path)
    return value
