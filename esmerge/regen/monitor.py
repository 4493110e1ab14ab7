"""What ``esmerge regenerate`` shows while notebooks run: cell, elapsed time, and an estimate of what is left.

Each running notebook has a progress file (``esmerge.regen.execute`` appends the cell that starts;
``esmerge.progress`` bars inside the kernel append their counts). A ``Monitor`` thread reads them
and, on a terminal, redraws one line per running notebook about once a second; in a log (CI,
redirected output) it prints a plain line per running notebook at most every 30 s instead.

The estimate is the seconds ``regenerate_state.json`` recorded for that notebook's last run at
this scale, or, before any run, the measured figure in the per-notebook table of ``book/rerun.md``,
read from the page itself so that the figures have one home (and re-measuring them re-keys no notebook).
"""
from __future__ import annotations

import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from esmerge import progress
from esmerge.paths import BOOK_DIR

REDRAW_S = 1.0


@dataclass(frozen=True)
class Estimate:
    seconds: float
    source: str  # "last run" or "rerun.md"


# A row of the per-notebook table: | `07_results` | smoke cold | smoke warm | cpu cold |
_ROW = re.compile(r"^\| `(\d\d_\w+)` \| ([^|]*)\|[^|]*\| ([^|]*)\|$", re.M)
_SECONDS = re.compile(r"\s*(\d+) s")


def rerun_page_seconds(text: str) -> dict[str, dict[str, float]]:
    """Scale -> notebook -> cold seconds, from the per-notebook table of ``book/rerun.md``.

    Cells that do not start with a number of seconds ("(added later)") give no figure.

    >>> page = "| `07_results` | 403 s | 28 s | 5000 s (14 models) |\\n| `09_retention` | (added later) | - | 1511 s |"
    >>> rerun_page_seconds(page)
    {'smoke': {'07_results': 403.0}, 'cpu': {'07_results': 5000.0, '09_retention': 1511.0}}
    """
    figures: dict[str, dict[str, float]] = {"smoke": {}, "cpu": {}}
    for stem, smoke_cold, cpu_cold in _ROW.findall(text):
        for scale, cell in (("smoke", smoke_cold), ("cpu", cpu_cold)):
            if match := _SECONDS.match(cell):
                figures[scale][stem] = float(match.group(1))
    return figures


def cold_seconds(scale: str, page: Path = BOOK_DIR / "rerun.md") -> dict[str, float]:
    """Notebook -> its measured time at ``scale`` with empty caches (``page``'s per-notebook table);
    empty when the page is absent (an installed wheel: then no estimate before a first run)."""
    return rerun_page_seconds(page.read_text()).get(scale, {}) if page.is_file() else {}


def estimate(stem: str, scale: str, state: dict) -> Estimate | None:
    """How long ``stem`` should take: its last recorded run at ``scale``, else the book's measured figure.

    >>> estimate("07_results", "cpu", {"notebooks": {"07_results": {"seconds": 812.5}}})
    Estimate(seconds=812.5, source='last run')
    >>> estimate("07_results", "cpu", {"notebooks": {}}).source
    'rerun.md'
    >>> estimate("99_new", "cpu", {"notebooks": {}}) is None
    True
    """
    seconds = state.get("notebooks", {}).get(stem, {}).get("seconds")
    if seconds:
        return Estimate(float(seconds), "last run")
    measured = cold_seconds(scale).get(stem)
    return Estimate(float(measured), "rerun.md") if measured else None


def status_line(stem: str, elapsed: float, expected: Estimate | None, detail: str = "") -> str:
    """One notebook's status: where it is, how long it has run, and what is left.

    >>> status_line("07_results", 125, Estimate(600, "last run"), "cell 12/40")
    '07_results: cell 12/40, 2m05s elapsed, ~7m55s left of ~10m00s (last run)'
    >>> status_line("07_results", 700, Estimate(600, "rerun.md"))
    '07_results: 11m40s elapsed, 1m40s over the estimate of 10m00s (rerun.md)'
    >>> status_line("09_new", 5, None, "cell 2/9 | models 1/4 it (25%), 4s elapsed, ~12s left")
    '09_new: cell 2/9, 5s elapsed, no estimate yet (first run) | models 1/4 it (25%), 4s elapsed, ~12s left'
    """
    cell, _, bars = detail.partition(" | ")
    parts = [cell] if cell else []
    parts.append(f"{progress.format_seconds(elapsed)} elapsed")
    fmt = progress.format_seconds
    if expected is None:
        parts.append("no estimate yet (first run)")
    elif elapsed <= expected.seconds:
        parts.append(f"~{fmt(expected.seconds - elapsed)} left of ~{fmt(expected.seconds)} ({expected.source})")
    else:
        parts.append(f"{fmt(elapsed - expected.seconds)} over the estimate of {fmt(expected.seconds)} "
                     f"({expected.source})")
    return f"{stem}: " + ", ".join(parts) + (f" | {bars}" if bars else "")


@dataclass
class _Running:
    started: float
    reader: progress.EventReader
    expected: Estimate | None
    last_plain: float = field(default=0.0)


class Monitor:
    """Shows every running notebook's status on ``stream`` from a background thread.

    ``interactive`` (default: ``stream.isatty()``) redraws a block of lines in place every
    ``every`` seconds (default ``REDRAW_S``); otherwise one plain line per notebook is printed
    every ``every`` seconds (default ``progress.PLAIN_EVERY_S``). Log messages should go through
    ``say`` so that they are not drawn over.
    """

    def __init__(self, stream: TextIO | None = None, every: float | None = None, interactive: bool | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.stream = stream or sys.stderr
        self.interactive = getattr(self.stream, "isatty", lambda: False)() if interactive is None else interactive
        self.every = every if every is not None else (REDRAW_S if self.interactive else progress.PLAIN_EVERY_S)
        self.clock = clock
        self.running: dict[str, _Running] = {}
        self._lock = threading.RLock()
        self._drawn = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="esmerge-monitor", daemon=True)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._clear()

    def start(self, stem: str, progress_file: Path, expected: Estimate | None) -> None:
        with self._lock:
            now = self.clock()
            self.running[stem] = _Running(now, progress.EventReader(progress_file), expected, last_plain=now)

    def finish(self, stem: str) -> None:
        with self._lock:
            self._clear()
            self.running.pop(stem, None)
            self._draw()

    def say(self, log: Callable[[str], None], message: str) -> None:
        """``log(message)`` with the status block cleared first and redrawn after."""
        with self._lock:
            self._clear()
            log(message)
            sys.stdout.flush()
            self._draw()

    def lines(self) -> list[str]:
        """The current status line of every running notebook (reads their progress files)."""
        now = self.clock()
        out = []
        for stem, run in self.running.items():
            run.reader.poll()
            detail = run.reader.summary() if run.reader.cell is not None else "kernel starting"
            out.append(status_line(stem, now - run.started, run.expected, detail))
        return out

    # ---------------------------------------------------------------- drawing
    def _loop(self) -> None:
        while not self._stop.wait(min(self.every, REDRAW_S)):
            with self._lock:
                if self.interactive:
                    self._clear()
                    self._draw()
                else:
                    self._plain()

    def _plain(self) -> None:
        now = self.clock()
        due = [stem for stem, run in self.running.items() if now - run.last_plain >= self.every]
        if not due:
            return
        for stem, line in zip(list(self.running), self.lines()):
            if stem in due:
                self.running[stem].last_plain = now
                print(f"  progress    {line}", file=self.stream, flush=True)

    def _draw(self) -> None:
        if not self.interactive or not self.running:
            return
        width = max(20, shutil.get_terminal_size((120, 20)).columns - 1)
        text = [f"  ... {line}"[:width] for line in self.lines()]  # cut, so no line wraps and breaks the redraw
        self.stream.write("".join(line + "\n" for line in text))
        self.stream.flush()
        self._drawn = len(text)

    def _clear(self) -> None:
        if self.interactive and self._drawn:
            self.stream.write("\x1b[1A\x1b[2K" * self._drawn)  # up one line and erase it, per line drawn
            self.stream.flush()
        self._drawn = 0
