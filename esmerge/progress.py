"""Progress of long library calls, shown where the user is looking and never in the book.

Use::

    for row in progress.track(rows, desc="evaluate BindingDB", unit="ex"):
        ...
    bar = progress.track(total=steps, desc="train molecule", unit="step")
    bar.update(); bar.set_postfix(loss="0.512"); bar.close()

Where a bar goes is decided when it is created:

* ``$ESMERGE_PROGRESS_FILE`` is set (``esmerge regenerate`` sets it for each notebook's kernel):
  one JSON line per update, at most every ``FILE_EVERY_S`` seconds and once at the end, is
  appended to that file, and the regenerator's terminal shows it. Nothing is printed, so the
  executed notebook holds results, not progress logs.
* standard error is a terminal (the command line): a tqdm bar there.
* inside a Jupyter kernel (a plain notebook session): tqdm's notebook-aware bar.
* otherwise (a CI log, a redirected run): a plain line on standard error at most every
  ``PLAIN_EVERY_S`` seconds, and one when the bar closes.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

ENV_FILE = "ESMERGE_PROGRESS_FILE"
FILE_EVERY_S = 1.0  # the regenerator redraws about once a second; more lines would be noise
PLAIN_EVERY_S = 30.0  # a log line every 30 s shows life without flooding a CI log

_ids = itertools.count()


def format_seconds(seconds: float) -> str:
    """Short human duration.

    >>> format_seconds(7.4), format_seconds(75), format_seconds(3725)
    ('7s', '1m15s', '1h02m')
    """
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_bar(desc: str, n: int, total: int | None, unit: str = "it", elapsed: float = 0.0,
               initial: int = 0, postfix: dict | None = None) -> str:
    """One line describing a bar: done/total, elapsed, and what is left at the rate so far.

    The rate counts only the work done since the bar started (``n - initial``), so a resumed
    run does not look faster than it is.

    >>> format_bar("evaluate BindingDB", 16, 64, "ex", elapsed=30.0)
    'evaluate BindingDB 16/64 ex (25%), 30s elapsed, ~1m30s left'
    >>> format_bar("train molecule", 40, 150, "step", elapsed=10.0, initial=30, postfix={"loss": "0.51"})
    'train molecule 40/150 step (26%), 10s elapsed, ~1m50s left, loss=0.51'
    >>> format_bar("scan", 3, None, elapsed=2.0)
    'scan 3 it, 2s elapsed'
    """
    parts = [f"{desc} {n}/{total} {unit} ({100 * n // max(total, 1)}%)" if total else f"{desc} {n} {unit}",
             f"{format_seconds(elapsed)} elapsed"]
    if total and n > initial and n < total:
        parts.append(f"~{format_seconds(elapsed * (total - n) / (n - initial))} left")
    parts += [f"{k}={v}" for k, v in (postfix or {}).items()]
    return ", ".join(parts)


def _in_kernel() -> bool:
    shell = sys.modules.get("IPython")
    get = getattr(shell, "get_ipython", None)
    return bool(get and get() is not None and "ipykernel" in sys.modules)


def destination() -> str:
    """Where a bar created now goes: ``"file"``, ``"terminal"``, ``"notebook"`` or ``"log"``."""
    if os.environ.get(ENV_FILE):
        return "file"
    if getattr(sys.stderr, "isatty", lambda: False)():
        return "terminal"
    return "notebook" if _in_kernel() else "log"


class Bar:
    """A progress bar over ``total`` units (or over ``iterable``); see the module docstring for where it shows.

    ``disable=True`` makes every method a no-op, so callers can pass their ``progress`` flag.
    Use as an iterator, a context manager, or by calling ``update``/``close`` by hand.
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False, stream: TextIO | None = None):
        if total is None and iterable is not None:
            try:
                total = len(iterable)  # type: ignore[arg-type]
            except TypeError:
                total = None
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.initial = initial
        self.postfix: dict[str, Any] = {}
        self.disabled = disable
        self.closed = False
        self._start = self._last = time.monotonic()
        self._id = f"{os.getpid()}-{next(_ids)}"
        self._tqdm = None
        self._stream = stream
        self.where = "off" if disable else destination()
        if self.where in ("terminal", "notebook"):
            if self.where == "terminal":
                from tqdm import tqdm  # deferred: tqdm.auto imports IPython machinery
            else:
                from tqdm.auto import tqdm
            self._tqdm = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream or sys.stderr,
                              leave=self.where == "terminal")
        elif self.where == "file":
            self._emit()

    # ---------------------------------------------------------------- use
    def __iter__(self) -> Iterator:
        if self.iterable is None:
            raise TypeError("this bar was made without an iterable; call update() instead")
        try:
            for item in self.iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> "Bar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        if self.disabled or self.closed:
            return
        self.n += n
        if self._tqdm is not None:
            self._tqdm.update(n)
            return
        now = time.monotonic()
        if now - self._last >= (FILE_EVERY_S if self.where == "file" else PLAIN_EVERY_S):
            self._last = now
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        """Show ``key=value`` pairs after the count (a loss, an objective); they replace the previous ones."""
        if self.disabled or self.closed:
            return
        self.postfix = {k: v for k, v in values.items()}
        if self._tqdm is not None:
            self._tqdm.set_postfix(values, refresh=False)

    def close(self) -> None:
        if self.disabled or self.closed:
            return
        self.closed = True
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._emit()

    # ---------------------------------------------------------------- output
    def line(self) -> str:
        return format_bar(self.desc, self.n, self.total, self.unit, time.monotonic() - self._start,
                          self.initial, self.postfix)

    def _emit(self) -> None:
        if self.where == "file":
            write_event(os.environ[ENV_FILE], {
                "bar": self._id, "desc": self.desc, "n": self.n, "total": self.total, "unit": self.unit,
                "initial": self.initial, "elapsed": round(time.monotonic() - self._start, 2),
                "postfix": {k: str(v) for k, v in self.postfix.items()}, "done": self.closed})
        elif self.where == "log":
            print(("done: " if self.closed else "") + self.line(), file=self._stream or sys.stderr, flush=True)


def track(iterable: Iterable | None = None, total: int | None = None, desc: str = "", unit: str = "it",
          initial: int = 0, disable: bool = False) -> Bar:
    """A ``Bar`` over ``iterable`` (iterate it) or over ``total`` units (call ``update``)."""
    return Bar(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable)


# --------------------------------------------------------------------------- the progress file


def write_event(path: str | os.PathLike, event: dict) -> None:
    """Append one JSON line to ``path``; a single short ``O_APPEND`` write, so writers never interleave.

    A failure to write (disk full, folder gone) is ignored: progress must never stop the work.
    """
    data = (json.dumps(event, sort_keys=True) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return
    try:
        os.write(fd, data)
    except OSError:
        pass
    finally:
        os.close(fd)


class EventReader:
    """Follows a progress file: the latest cell and every bar that is still open.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "p.jsonl"
    >>> write_event(path, {"cell": 2, "cells": 9})
    >>> write_event(path, {"bar": "a", "desc": "models", "n": 3, "total": 16, "unit": "it", "elapsed": 9.0,
    ...                    "initial": 0, "postfix": {}, "done": False})
    >>> write_event(path, {"bar": "b", "desc": "old", "n": 1, "total": 1, "done": True})
    >>> reader = EventReader(path); reader.poll()
    >>> reader.cell, reader.cells, [b["desc"] for b in reader.open_bars()]
    (2, 9, ['models'])
    """

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.offset = 0
        self.cell: int | None = None
        self.cells: int | None = None
        self.bars: dict[str, dict] = {}
        self._rest = b""

    def poll(self) -> None:
        """Read whatever was appended since the last call (a missing file is simply empty)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except FileNotFoundError:
            return
        self.offset += len(chunk)
        *lines, self._rest = (self._rest + chunk).split(b"\n")
        for raw in lines:
            try:
                event = json.loads(raw)
            except ValueError:
                continue  # a torn line cannot happen with O_APPEND, but progress must never crash a run
            if "cell" in event:
                self.cell, self.cells = event["cell"], event.get("cells")
                self.bars.clear()  # bars of a finished cell that never closed (an exception) are over
            elif event.get("done"):
                self.bars.pop(event.get("bar"), None)
            elif "bar" in event:
                self.bars[event["bar"]] = event

    def open_bars(self) -> list[dict]:
        return list(self.bars.values())

    def summary(self) -> str:
        """``cell 3/9 | models 3/16 it (18%), ...`` for the regenerator's status line."""
        parts = [f"cell {self.cell}/{self.cells}"] if self.cell is not None else []
        for bar in self.open_bars():
            parts.append(format_bar(bar.get("desc", ""), bar.get("n", 0), bar.get("total"), bar.get("unit", "it"),
                                    bar.get("elapsed", 0.0), bar.get("initial", 0), bar.get("postfix")))
        return " | ".join(parts)
