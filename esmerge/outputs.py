"""Publishing an output directory: the one protocol every esmerge writer follows.

A merge (``adapters.save_merged``), a trained specialist (``specialists``), a converted
specialist (``convert.output``) and their callers all publish through ``publish``, so that an
output is never lost and never silently wrong:

1. The writer fills a temporary sibling (``staging(out)``: ``.<name>.partial-<pid>-<id>``),
   checks every tensor finite (``check_finite``) and writes its completion marker last
   (``esmerge.json`` for a merge, ``card.json`` for a specialist), recording its kind under
   ``"esmerge_output"``. A directory without the marker is never read as finished.
2. ``publish`` takes a lock on the parent folder (``flock`` on the folder itself: no lock file),
   repairs what a killed swap left (``recover``), and decides whether ``out`` may be replaced
   (``check_replaceable``): only with ``force``, and only a directory carrying the marker of
   the *same* kind that is not an input of this run nor holds one. A regular file, a device, a
   symbolic link, a foreign folder, another kind of output, an input: refused in one line.
3. The swap is ``renameat2(RENAME_EXCHANGE)`` where the kernel has it (atomic: ``out`` is the
   old or the new output at every instant), else two renames, ``out`` -> ``.<name>.replaced-<id>``
   then staging -> ``out``. The old output is deleted after the lock is released.
4. ``recover(out)`` (run by every writer and every load): ``out`` missing and a
   ``.<name>.replaced-*`` present means a swap was killed between its renames: the newest is
   renamed back. ``out`` present: leftovers are deleted. So a kill at any point leaves the old
   or the new output, and the next run or load sees it.

Markers written before kinds were recorded are recognised by their files: ``esmerge.json`` is a
merge; ``card.json`` beside ``adapter_model.safetensors`` is a converted specialist when the card
names a ``converter``, a trained one otherwise.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import glob
import json
import os
import shutil
import stat
import sys
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from esmerge.cache import first_nonfinite
from esmerge.errors import InputError, OutputExistsError

KIND_KEY = "esmerge_output"  # the marker's record of what wrote it


@dataclass(frozen=True)
class Kind:
    name: str
    marker: str
    noun: str  # "a finished merge", as messages say it
    exists: str  # the refusal without --force ({out})
    foreign: str  # the refusal of a folder that is not this kind of output ({out}, {what})


MERGE = Kind("merge", "esmerge.json", "a finished merge",
             "{out} already exists (a finished merge); choose another --out or pass --force to replace it",
             "{out} exists and is not a finished merge ({what}); --force replaces only a merge esmerge wrote: "
             "choose another --out or remove it yourself")
SPECIALIST = Kind("specialist", "card.json", "a finished specialist",
                  "{out} already holds a finished specialist; pass force=True (--force) to retrain and overwrite it",
                  "{out} exists and is not a specialist directory ({what}); --force replaces only a specialist "
                  "esmerge trained: choose another output or remove it yourself")
CONVERTED = Kind("converted-specialist", "card.json", "a converted specialist",
                 "{out} already holds a converted specialist; pass force=True (--force) to replace it",
                 "{out} exists but is not a finished specialist ({what}); --force replaces only a converted "
                 "specialist esmerge wrote: choose another output or remove it yourself")
KINDS = {k.name: k for k in (MERGE, SPECIALIST, CONVERTED)}


# --------------------------------------------------------------------------- what is at a path
def _read_marker(file: Path) -> dict | None:
    try:
        value = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def kind_of(path: str | Path) -> Kind | None:
    """The kind of finished esmerge output at ``path`` (marker present and readable), else ``None``."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return None
    if (path / MERGE.marker).is_file():
        meta = _read_marker(path / MERGE.marker)
        return None if meta is None else KINDS.get(meta.get(KIND_KEY, MERGE.name))
    if (path / SPECIALIST.marker).is_file() and (path / "adapter_model.safetensors").is_file():
        card = _read_marker(path / SPECIALIST.marker)
        if card is None:
            return None
        return KINDS.get(card.get(KIND_KEY) or (CONVERTED.name if card.get("converter") else SPECIALIST.name))
    return None


def describe(path: Path) -> str:
    """What is at ``path``, in a few words, for a refusal."""
    try:
        mode = path.lstat().st_mode
    except OSError:
        return "nothing"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISREG(mode):
        return "a regular file"
    if not stat.S_ISDIR(mode):
        return "a device or other special file"
    kind = kind_of(path)
    if kind is not None:
        return kind.noun
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as err:
        return f"a folder esmerge cannot list ({err.strerror})"
    if not names:
        return "an empty folder"
    return f"a folder holding {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"


def _resolved(path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser().resolve()))


def check_replaceable(out: str | Path, kind: Kind, force: bool, inputs: Iterable = (),
                      in_progress: Callable[[Path], bool] | None = None) -> bool:
    """Refuse (``OutputExistsError``, one line) what must not be replaced at ``out``; True when it exists.

    ``inputs``: the paths this run reads (adapters, base folder, probe file, source checkpoint).
    ``in_progress(out)``: True for the writer's own unfinished state there (a training checkpoint),
    which it may replace without ``force``.
    """
    out = Path(out)
    if not os.path.lexists(out):
        return False
    target = _resolved(out)
    for given in inputs:
        if given is None or str(given) == "":
            continue
        source = _resolved(given)
        if source == target:
            raise OutputExistsError(f"{out} is an input of this run; choose another output folder")
        if target in source.parents:
            raise OutputExistsError(f"{out} holds {given}, an input of this run; choose another output folder")
    what = describe(out)
    if out.is_symlink() or not out.is_dir():
        raise OutputExistsError(f"{out} is {what}, not an output folder esmerge wrote; "
                                "choose another output or remove it yourself")
    found = kind_of(out)
    if found is None:
        if in_progress is not None and in_progress(out):
            return True
        raise OutputExistsError(kind.foreign.format(out=out, what=what))
    if found is not kind:
        raise OutputExistsError(f"{out} holds {found.noun}, not {kind.noun}; --force replaces only {kind.noun}: "
                                "choose another output folder")
    if not force:
        raise OutputExistsError(kind.exists.format(out=out))
    return True


# --------------------------------------------------------------------------- finiteness
def check_finite(tensors: dict, where: str, cause: str) -> None:
    """``InputError`` naming the first floating tensor of ``tensors`` with NaN/Inf, the count and ``cause``."""
    for key, value in tensors.items():
        if torch.is_tensor(value) and (found := first_nonfinite(value)) is not None:
            _, bad, total = found
            raise InputError(f"{where}: {key} has {bad:,} NaN/Inf of {total:,} entries, so nothing was "
                             f"written; {cause}")


# --------------------------------------------------------------------------- locking, staging
_HELD: set[tuple[int, str]] = set()  # (thread, folder) locks this process holds: taking one again is a no-op


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Exclusive ``flock`` on ``folder`` itself: publishers into one parent take turns (no lock file left).

    The kernel drops it when the holder dies, so a killed writer never blocks the next one.
    Re-entrant within a thread (a load inside a publish must not wait for itself).
    """
    folder.mkdir(parents=True, exist_ok=True)
    key = (threading.get_ident(), os.path.realpath(folder))
    if key in _HELD:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def staging(out: str | Path) -> Iterator[Path]:
    """A fresh temporary sibling of ``out`` to write into; removed when the block leaves it behind."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path) -> list[Path]:
    # ``.replaced`` and ``.old-*``: the names earlier versions moved an old output to.
    name = glob.escape(out.name)
    found = [p for p in (*out.parent.glob(f".{name}.replaced*"), *out.parent.glob(f".{name}.old-*"))
             if p.is_dir() and not p.is_symlink()]  # anything else is not esmerge's: never touched
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:  # removed meanwhile by another writer's tidy-up
        return 0.0


def _recover_locked(out: Path) -> None:
    leftovers = _leftovers(out)
    if leftovers and not os.path.lexists(out):
        os.rename(leftovers[0], out)  # a swap was killed between its renames: the old output comes back
        print(f"esmerge: restored {out} from {leftovers[0].name}, left by an interrupted replacement",
              file=sys.stderr)
        leftovers = leftovers[1:]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    name = glob.escape(out.name)
    for partial in out.parent.glob(f".{name}.partial-*"):  # staging folders of writers that died
        pid = partial.name.rsplit("-", 2)[-2]
        if pid.isdigit() and not _pid_alive(int(pid)) and partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
    for partial in out.parent.glob(f".{name}.staging-*"):  # earlier versions' name for them
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)


def recover(out: str | Path) -> None:
    """Repair what a killed replacement of ``out`` left (module docstring, step 4); cheap when nothing did."""
    out = Path(out)
    if out.parent.is_dir() and _leftovers(out):
        with folder_lock(out.parent):
            _recover_locked(out)


# --------------------------------------------------------------------------- the swap
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False where the C library or the file system lacks it."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def exchange(src: Path, dst: Path) -> bool:
    """Atomically swap two paths (tests replace this to kill a writer mid-swap)."""
    return _renameat2(src, dst, _RENAME_EXCHANGE)


def _swap(staged: Path, out: Path) -> Path:
    """Put ``staged`` at ``out``; return where the old output now is (deleted by the caller)."""
    replaced = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    if exchange(staged, out):
        os.rename(staged, replaced)  # a kill before this leaves a dead writer's partial: removed later
        return replaced
    os.rename(out, replaced)
    try:
        os.rename(staged, out)
    except BaseException:
        os.rename(replaced, out)
        raise
    return replaced


def publish(staged: str | Path, out: str | Path, kind: Kind, force: bool = False, inputs: Iterable = (),
            same: Callable[[Path], bool] | None = None,
            in_progress: Callable[[Path], bool] | None = None) -> Path:
    """Move the finished folder ``staged`` (marker written) to ``out`` under the protocol above.

    ``same(out)``: True when the output already there is what this run made (another process
    finished it first): it is kept and ``staged`` dropped. Other arguments: ``check_replaceable``.
    """
    staged, out = Path(staged), Path(out)
    if kind_of(staged) is not kind:
        raise AssertionError(f"{staged} is not a finished {kind.name}: write its marker before publishing")
    inputs = list(inputs)
    old = None
    with folder_lock(out.parent):
        _recover_locked(out)
        exists = check_replaceable(out, kind, True, inputs, in_progress)
        if exists and same is not None and kind_of(out) is kind and same(out):
            shutil.rmtree(staged, ignore_errors=True)
            return out
        if exists:
            check_replaceable(out, kind, force, inputs, in_progress)
            old = _swap(staged, out)
        elif not _renameat2(staged, out, _RENAME_NOREPLACE):
            os.rename(staged, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def move_file(src: str | Path, dst: str | Path) -> Path:
    """``os.replace`` that also works across file systems (copy beside ``dst``, rename, then remove ``src``)."""
    src, dst = Path(src), Path(dst)
    try:
        os.replace(src, dst)
    except OSError as err:
        if err.errno != errno.EXDEV:
            raise
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        finally:
            tmp.unlink(missing_ok=True)
        src.unlink()
    return dst
