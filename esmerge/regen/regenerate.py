"""Run every notebook (papermill, in dependency order, skipping what is unchanged) and build the book.

Usage::

    esmerge regenerate [--scale smoke|cpu|paper] [--jobs N] [--only STEM ...] [--force]
                       [--seed S] [--device cuda] [--book-only [--shipped]] [--no-book]
    esmerge regenerate --scale cpu --ship [--force]    copy the finished run into book/shipped/cpu
    esmerge regenerate --scale cpu --check             are the shipped results still those of the code?

This module drives the pieces, one module each: ``notebook_graph`` (which notebooks, in which
order), ``input_keys`` (when one must run again: its text, parameters, data, upstream keys and
the package modules it imports), ``execute`` (one notebook under papermill; the executed copy
at ``book/executed/{scale}/{stem}.ipynb`` appears only when every cell ran), ``monitor`` (cell,
elapsed time and an estimate of what is left, on the terminal, never in the notebook), ``assist``
(a second process that fills a lone notebook's caches on the idle core) and ``book`` (TOC, API
page, Sphinx build, link check).

A failing notebook stops the run (its dependents are not started) with a message naming the
notebook and the cell. ``Ctrl-C`` stops the running notebook without keeping any of it, keeps
every notebook that finished, and says how to resume. ``runs/{scale}/produced.json`` lists every
figure and table with the notebook, parameters and input key that made it.

One regeneration at a time per runs folder: ``regenerate`` holds an exclusive ``flock`` on
``runs/.regenerate.lock`` while it runs notebooks, ships or builds the book. A second run on the
same runs folder *waits* (it says so, once) and then starts: it finds the first one's notebooks
up to date and skips them, so the same command typed twice gives one result, not two runs racing
over the same files. ``--check`` only reads and takes no lock. The kernel drops the lock when its
holder dies, so a killed run never blocks the next.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import datetime as _dt
import fcntl
import multiprocessing
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from esmerge import scales
from esmerge.cache import atomic_write_json, file_sha256
from esmerge.errors import UsageError
from esmerge.paths import Layout
from esmerge.regen.assist import ASSISTS, Assists, free_assist_slots
from esmerge.regen.execute import KERNEL, KERNEL_START_ATTEMPTS, NotebookFailed, environ, execute_job, execute_notebook
from esmerge.regen.freshness import source_commit, text_sha256
from esmerge.regen.input_keys import current_keys, import_closure, input_keys, keys_now, load_state, stale_chapters
from esmerge.regen.monitor import Monitor, estimate
from esmerge.regen.notebook_graph import (
    NEEDS_RE,
    STEM_RE,
    Notebook,
    RegenerateError,
    discover,
    parse_needs,
    topological_order,
    with_ancestors,
)
from esmerge.regen.pages import (
    API_MODULES,
    STATIC_PAGES,
    broken_links,
    build_book,
    toc_entries,
    write_api_page,
    write_toc,
)
from esmerge.regen.ship import check_shipped, ship

# Importers of the pre-split module find these names here still.
__all__ = [
    "API_MODULES", "KERNEL", "KERNEL_START_ATTEMPTS", "Layout", "NEEDS_RE", "Notebook", "NotebookFailed",
    "PRODUCT_SUFFIXES", "RegenerateError", "RunReport", "STATIC_PAGES", "STEM_RE", "broken_links", "build_book",
    "check_shipped", "current_keys", "discover", "execute_notebook", "import_closure", "input_keys", "load_state",
    "parse_needs", "regenerate", "run_notebooks", "ship", "stale_chapters", "toc_entries", "topological_order",
    "with_ancestors", "write_api_page", "write_produced", "write_toc",
]

# Files under runs/{scale}/{stem}/ that count as a figure or a table in produced.json.
PRODUCT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".csv", ".tsv", ".tex")


@dataclass
class RunReport:
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: str | None = None
    not_run: list[str] = field(default_factory=list)
    message: str = ""


def kernel_threads(jobs: int, cores: int | None = None, preset: str | None = None) -> str:
    """``OMP_NUM_THREADS`` for each notebook kernel: the cores shared among ``jobs`` kernels.

    More compute threads than cores stalls every OpenMP team at its barriers: a two-thread
    ``07_results`` beside a one-thread ``09_retention`` on two cores ran its batches 3x slower.
    A value the user set (``preset``, default ``$OMP_NUM_THREADS``) is kept.

    >>> (kernel_threads(2, cores=2, preset=""), kernel_threads(1, cores=2, preset=""),
    ...  kernel_threads(4, cores=2, preset=""))
    ('1', '2', '1')
    >>> kernel_threads(2, cores=2, preset="3")
    '3'
    """
    preset = os.environ.get("OMP_NUM_THREADS", "") if preset is None else preset
    if preset:
        return preset
    return str(max(1, (cores or os.cpu_count() or 1) // max(1, jobs)))


def run_notebooks(
    scale: str,
    layout: Layout,
    *,
    seed: int = 0,
    jobs: int = 1,
    only: list[str] | None = None,
    force: bool = False,
    log=print,
    monitor: Monitor | None = None,
    device: str | None = None,
) -> RunReport:
    """Execute every stale notebook of ``scale`` in dependency order, ``jobs`` at a time.

    A notebook is stale when its input key differs from the stored one or its executed notebook
    is missing; ``force`` re-runs the selected notebooks regardless. ``only`` restricts the run to
    those stems plus any stale notebook they need. Stops starting notebooks at the first failure.
    ``monitor`` shows progress while they run (default: a ``Monitor`` on standard error).
    ``device`` (``"cuda"``, say) is injected into every notebook beside ``scale`` and ``seed``, and so
    enters every input key: a run on a GPU and one on the CPU are never taken for each other.
    """
    if scale not in scales.NAMES:
        raise RegenerateError(f"unknown scale {scale!r}: expected one of {', '.join(scales.NAMES)}")
    # the device only when given: the CPU's keys stay those of every run made before devices were injected
    parameters = {"scale": scale, "seed": seed} | ({"device": scales.check_device(device)} if device else {})
    notebooks = discover(layout.notebooks)
    if not notebooks:
        raise RegenerateError(f"no NN_*.py notebooks in {layout.notebooks}")
    if only:  # only the selected notebooks and what they need are ordered (and validated)
        wanted = with_ancestors(notebooks, only)
        notebooks = {s: nb for s, nb in notebooks.items() if s in wanted}
    order = topological_order(notebooks)
    keys = keys_now(notebooks, order, parameters, layout)

    executed_dir = layout.executed(scale)
    executed_dir.mkdir(parents=True, exist_ok=True)
    for stale in executed_dir.glob(".*.partial.ipynb"):  # left by a killed run
        stale.unlink()
    state_path = layout.state_file(scale)
    state = load_state(state_path)
    forced = set(only or order) if force else set()

    def up_to_date(stem: str) -> bool:
        entry = state["notebooks"].get(stem, {})
        return entry.get("key") == keys[stem] and (executed_dir / f"{stem}.ipynb").exists()

    todo = [s for s in order if s in forced or not up_to_date(s)]
    report = RunReport(skipped=[s for s in order if s not in todo])
    for stem in report.skipped:
        log(f"  up to date  {stem}")
    if not todo:
        return report

    monitor = monitor or Monitor()
    provenance = source_commit(layout.cwd)  # the commit each chapter is executed from, shown in the book
    progress_dir = Path(tempfile.mkdtemp(prefix="esmerge-progress-"))

    def say(message: str) -> None:
        monitor.say(log, message)

    def job(stem: str) -> dict:
        return {
            "stem": stem, "source": str(notebooks[stem].path), "executed": str(executed_dir / f"{stem}.ipynb"),
            "parameters": parameters, "cwd": str(layout.cwd), "failed_dir": str(layout.failed_dir(scale)),
            "progress_file": str(progress_dir / f"{stem}.jsonl"),
        }

    def record(stem: str, seconds: float, started: str) -> None:
        state["notebooks"][stem] = {"key": keys[stem], "parameters": parameters, "started": started,
                                    "seconds": round(seconds, 2), **provenance,
                                    "text_sha256": text_sha256(notebooks[stem].path)}
        atomic_write_json(state_path, state)

    pending = list(todo)
    done = set(order) - set(todo)  # what is already up to date counts as finished
    running: dict = {}
    width = len(todo)
    assists = Assists(progress_dir, layout.cwd, say)
    # Workers (and the kernels they start) inherit the environment, so set it before they exist.
    with environ(ESMERGE_RUNS_DIR=str(layout.runs), OMP_NUM_THREADS=kernel_threads(jobs)), monitor:
        pool = (futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
                if jobs > 1 else None)
        try:
            while pending or running:
                ready = [s for s in pending if set(notebooks[s].needs) <= done] if report.failed is None else []
                starting = ready[: max(0, jobs - len(running))]
                assists.keep(free_assist_slots(jobs, len(running), len(starting)))  # notebooks take slots back
                for stem in starting:
                    pending.remove(stem)
                    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                    say(f"  running     {stem} [{len(report.executed) + len(running) + 1}/{width}] ...")
                    monitor.start(stem, progress_dir / f"{stem}.jsonl", estimate(stem, scale, state))
                    if pool is None:
                        running[stem] = (started, None)  # known as running while it runs, for Ctrl-C
                        running[stem] = (started, execute_job(job(stem)))
                    else:
                        running[stem] = (started, pool.submit(execute_job, job(stem)))
                if not running:
                    break  # nothing can start: a dependency failed
                if pool is None:
                    finished = list(running)
                else:
                    for stem in running:  # an idle core helps a running notebook fill its caches
                        if stem in ASSISTS and stem not in assists and free_assist_slots(
                                jobs, len(running) + len(assists), 0) and report.failed is None:
                            assists.start(stem, ASSISTS[stem], parameters)
                    wait_on = {fut: stem for stem, (_, fut) in running.items()}
                    done_futs, _ = futures.wait(wait_on, return_when=futures.FIRST_COMPLETED)
                    finished = [wait_on[f] for f in done_futs]
                for stem in finished:
                    started, outcome = running.pop(stem)
                    assists.stop(stem)
                    monitor.finish(stem)
                    result = outcome if pool is None else outcome.result()
                    if result["ok"]:
                        record(stem, result["seconds"], started)
                        done.add(stem)
                        report.executed.append(stem)
                        say(f"  done        {stem} in {result['seconds']:.1f} s")
                    elif report.failed is None:
                        report.failed, report.message = stem, result["message"]
                        say("  FAILED      " + result["message"].replace("\n", "\n              "))
                    else:
                        report.message += "\n" + result["message"]
        except KeyboardInterrupt:
            for stem in running:
                monitor.finish(stem)
            say(interrupted_message(list(running), report, executed_dir, state_path))
            raise
        finally:
            assists.stop_all()
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            for path in progress_dir.glob("*"):
                path.unlink()
            progress_dir.rmdir()
    report.not_run = pending
    return report


def interrupted_message(stopped: list[str], report: RunReport, executed_dir: Path, state_path: Path) -> str:
    """What Ctrl-C kept and how to resume.

    >>> import tempfile
    >>> executed = Path(tempfile.mkdtemp())
    >>> for stem in ("00_overview", "06_merging", "07_results"):
    ...     _ = (executed / f"{stem}.ipynb").write_text("{}")
    >>> print(interrupted_message(["07_results"], RunReport(executed=["06_merging"], skipped=["00_overview"]),
    ...                           executed, Path("runs/cpu/regenerate_state.json")))  # doctest: +ELLIPSIS
      interrupted stopped 07_results: its unfinished run was discarded; its last complete copy, if any, is untouched
                  kept: finished in this run: 06_merging; up to date: 00_overview; 3 executed notebooks in ...
                  resume: run the same command again; finished and up-to-date notebooks are skipped (keys in ...)
    """
    on_disk = len(list(executed_dir.glob("[0-9][0-9]_*.ipynb")))
    return "\n".join([
        f"  interrupted stopped {', '.join(stopped) or 'between notebooks'}: its unfinished run was discarded; "
        "its last complete copy, if any, is untouched",
        f"              kept: finished in this run: {', '.join(report.executed) or 'none'}; "
        f"up to date: {', '.join(report.skipped) or 'none'}; {on_disk} executed notebook{'s' * (on_disk != 1)} "
        f"in {executed_dir}",
        "              resume: run the same command again; finished and up-to-date notebooks are skipped "
        f"(keys in {state_path})",
    ])


# --------------------------------------------------------------------------- products


def write_produced(scale: str, layout: Layout) -> Path:
    """``runs/{scale}/produced.json``: every figure/table under ``runs/{scale}/{stem}/`` and what made it.

    A file older than the notebook's last run was not rewritten by it and is marked ``stale``.
    """
    state = load_state(layout.state_file(scale))["notebooks"]
    rows = []
    for stem, entry in sorted(state.items()):
        folder = layout.runs / scale / stem
        if not folder.is_dir():
            continue
        started = _dt.datetime.fromisoformat(entry["started"]).timestamp() if entry.get("started") else 0.0
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PRODUCT_SUFFIXES):
            rows.append({
                "file": _display_path(path, layout.cwd),
                "kind": "table" if path.suffix.lower() in (".csv", ".tsv", ".tex") else "figure",
                "notebook": f"{stem}.py",
                "parameters": entry.get("parameters"),
                "input_key": entry.get("key"),
                "sha256": file_sha256(path),
                "stale": path.stat().st_mtime + 1 < started,
            })
    out = layout.runs / scale / "produced.json"
    atomic_write_json(out, {"scale": scale, "files": rows})
    return out


def _display_path(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)


# --------------------------------------------------------------------------- command line


def check_options(args: argparse.Namespace) -> None:
    """Refuse (``UsageError``) option values and combinations that mean nothing, before any work."""
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if args.book_only and args.no_book:
        raise UsageError("--book-only and --no-book together do nothing; drop one")
    ship_, check, shipped = (getattr(args, name, False) for name in ("ship", "check", "shipped"))
    if ship_ and check:
        raise UsageError("--ship and --check are separate steps: ship first, then check")
    if (ship_ or check) and (args.book_only or args.no_book or args.only):
        raise UsageError("--ship and --check run no notebooks and build no book: drop --book-only/--no-book/--only")
    if shipped and not args.book_only:
        raise UsageError("--shipped renders the shipped results: use it with --book-only")
    if getattr(args, "device", None) and (ship_ or check or args.book_only):
        raise UsageError("--device says where notebooks run; --ship, --check and --book-only run none: drop --device")


LOCK_FILE = ".regenerate.lock"


@contextlib.contextmanager
def run_lock(runs: Path, log=print):
    """Hold the run-level lock on ``runs`` (module docstring); if another run holds it, say so and wait."""
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"  waiting     another esmerge regenerate is running on {runs}; this one starts when it "
                "finishes (Ctrl-C to stop)")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def regenerate(args: argparse.Namespace, layout: Layout | None = None, log=print) -> int:
    """Run the notebooks and/or build the book as ``args`` (from ``esmerge.cli.parser()``) says; the exit code.

    Runs under ``run_lock(layout.runs)``: a second regeneration on the same runs folder waits.
    """
    layout = layout or Layout.default()
    check_options(args)
    if getattr(args, "check", False):
        return check_shipped(args.scale, layout, log=log)
    with run_lock(layout.runs, log):
        return _regenerate_locked(args, layout, log)


def _regenerate_locked(args: argparse.Namespace, layout: Layout, log) -> int:
    if getattr(args, "ship", False):
        ship(args.scale, layout, seed=args.seed, force=args.force, log=log)
        return 0
    if not args.book_only:
        t0 = time.perf_counter()
        try:
            report = run_notebooks(args.scale, layout, seed=args.seed, jobs=args.jobs, only=args.only,
                                   force=args.force, log=log, device=getattr(args, "device", None))
        except KeyboardInterrupt:
            write_produced(args.scale, layout)  # lists what the kept notebooks made
            return 130
        produced = write_produced(args.scale, layout)
        log(f"  notebooks   executed {len(report.executed)}, up to date {len(report.skipped)} "
            f"in {time.perf_counter() - t0:.1f} s; products listed in {produced}")
        if report.failed:
            log(f"\nesmerge regenerate: FAILED\n{report.message}")
            if report.not_run:
                log(f"not run because of the failure: {', '.join(report.not_run)}")
            return 1
    if not args.no_book:
        index = build_book(args.scale, layout, log=log,
                           prefer="shipped" if getattr(args, "shipped", False) else "auto")
        log(str(index))
    return 0
