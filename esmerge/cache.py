"""Content-addressed caching: every intermediate is keyed by a hash of what made it.

A rerun with the same inputs loads the stored result; an interrupted run leaves no
half-written file behind (writes go to a temporary name, unique to the writer, and are renamed
into place). Two processes that need the same missing entry do not both compute it: ``cached``
holds a lock per key (``key_lock``), so the second waits and then loads what the first stored.

Nothing wrong is kept as finished: a tensor with NaN/Inf is refused before it is stored
(``InputError`` naming the entry and the likely cause), and an entry that cannot be read as a
weights-only torch file (empty, truncated, or a pickle planted there) is moved aside to
``<name>.corrupt-<id>`` with a one-line warning and computed again. Nothing is ever unpickled
beyond weights-only loading. A full file system becomes one line naming the cache folder.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from esmerge.errors import EsmergeError, InputError


class CacheWriteError(EsmergeError):
    """The cache folder's file system is full (or refuses the write): one line naming the folder."""


# What each kind of entry (the name's prefix) is, and the likely cause of NaN/Inf in it.
_NONFINITE_CAUSES = {
    "probes": "probe embeddings: the base's embedding or a specialist's projector holds NaN/Inf",
    "states": "hidden states on the probe: the base or an adapter overflows (check the adapters, or load the base "
              "in float32)",
    "swd": "SWD table: check the es hyper-parameters n_projections and p, and the hidden states",
    "scores": "element scores: the gradients overflowed (check the adapters, or load the base in float32)",
}


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


def keyed_on_device(identity: str, model: torch.nn.Module) -> str:
    """``identity`` (a base's weights hash, say) as results that ``model`` computes are keyed: unchanged
    on the CPU, ``identity@<device type>`` elsewhere, since a GPU sums in another order and its numbers
    are its own (a run on the GPU never reads what the CPU cached, nor the other way round).

    >>> keyed_on_device("abc", torch.nn.Linear(1, 1)), keyed_on_device("abc", torch.nn.Linear(1, 1, device="meta"))
    ('abc', 'abc@meta')
    """
    device = next(model.parameters()).device
    return identity if device.type == "cpu" else f"{identity}@{device.type}"


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


def first_nonfinite(obj: Any, where: str = "") -> tuple[str, int, int] | None:
    """``(where, bad, total)`` of the first floating tensor in ``obj`` (nested dicts, lists) with NaN/Inf."""
    if torch.is_tensor(obj):
        if obj.is_floating_point() and not bool(torch.isfinite(obj).all()):
            return where or "the value", int((~torch.isfinite(obj)).sum()), obj.numel()
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if (found := first_nonfinite(value, f"{where}[{key!r}]")) is not None:
                return found
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            if (found := first_nonfinite(value, f"{where}[{i}]")) is not None:
                return found
    return None


def check_finite_entry(obj: Any, path: Path) -> None:
    """Refuse (``InputError``, one line) to store an object holding a NaN/Inf float tensor at ``path``."""
    found = first_nonfinite(obj)
    if found is not None:
        where, bad, total = found
        cause = _NONFINITE_CAUSES.get(Path(path).name.split("-")[0],
                                      "an input or a hyper-parameter of the step that computes it is likely "
                                      "out of range")
        raise InputError(f"cache entry {Path(path).name}: {where} has {bad:,} NaN/Inf of {total:,} values, so it was "
                         f"not stored; {cause}")


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(err)  # torch's zip writer reports a failed write as "[enforce fail at inline_container.cc...]"
    return isinstance(err, RuntimeError) and ("inline_container" in text or "file write failed" in text)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a unique temporary sibling, so readers and parallel writers never see half a file.

    ``torch.save`` names the records inside its zip after the file it writes, so the temporary file
    sits in a private folder under the fixed name ``<name>.tmp``: the bytes do not depend on which
    writer made them (two runs write identical files). A float tensor with NaN/Inf is refused
    (``check_finite_entry``); a full file system raises ``CacheWriteError`` naming the folder.
    """
    path = Path(path)
    check_finite_entry(obj, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    private = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial")
    try:
        private.mkdir()
        tmp = private / f"{path.name}.tmp"
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        if _disk_full(err):
            raise CacheWriteError(f"cannot store {path.name} in the cache folder {path.parent}: its file system is "
                                  "full; free space there or set ESMERGE_CACHE to a folder with room") from None
        raise
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


MISSING = object()  # what ``load_entry`` returns for an absent (or set-aside) entry


def load_entry(path: Path) -> Any:
    """The object stored at ``path`` (weights-only), or ``MISSING`` if there is none.

    An entry that is not a readable weights-only torch file (empty, truncated, planted) is moved
    aside to ``<name>.corrupt-<id>`` with a one-line warning on stderr, and ``MISSING`` returned,
    so the caller computes it again.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's own notes on pickle protocols: not for our users
            return torch.load(path, weights_only=True)
    except FileNotFoundError:
        return MISSING
    except (EOFError, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, AttributeError, TypeError) as err:
        why = {EOFError: "empty or truncated", pickle.UnpicklingError: "not a weights-only torch file"}.get(
            type(err), "not a readable torch file")
    except OSError as err:
        raise InputError(f"cache entry {path} cannot be read ({err.strerror}); fix its permissions or set "
                         "ESMERGE_CACHE to another folder") from None
    aside = path.with_name(f"{path.name}.corrupt-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another process set it aside first
        return MISSING
    print(f"esmerge: warning: cache entry {path} is {why}; moved it to {aside.name} and computing it again",
          file=sys.stderr)
    return MISSING


def cached(path: Path, compute: Callable[[], Any], refresh: bool = False) -> Any:
    """Return the object stored at ``path``, computing and storing it first if absent (or corrupt).

    A second process asking for the same missing ``path`` waits for the first and loads its result.
    The value is refused (``InputError``) rather than stored if it holds NaN/Inf.
    """
    path = Path(path)
    if not refresh and (value := load_entry(path)) is not MISSING:
        return value
    with key_lock(path):
        if not refresh and (value := load_entry(path)) is not MISSING:  # stored by another process meanwhile
            return value
        value = compute()
        atomic_torch_save(value, path)
    return value
