"""Run every notebook (papermill, in dependency order, skipping what is unchanged) and build the book.

    esmerge regenerate [--scale smoke|cpu|paper] [--jobs N] [--only STEM ...] [--force]
                       [--seed S] [--book-only] [--no-book]

A notebook is ``notebooks/NN_name.py`` (jupytext percent format) with a ``parameters`` cell and a
line ``# esmerge-needs: 01_data, 02_specialists`` naming the notebooks whose results it reads.
Each one runs at most once per set of inputs: its *input key* hashes its own text, the injected
parameters, every ``esmerge/**/*.py`` file, the data manifest and the keys of the notebooks it
needs, so a change anywhere upstream re-runs exactly the notebooks downstream of it. Keys live in
``runs/{scale}/regenerate_state.json``.

The executed notebook appears at ``book/executed/{scale}/{stem}.ipynb`` only when every cell ran:
papermill writes to a hidden ``.{stem}.partial.ipynb`` file that is renamed into place on success, so an
interruption never leaves half a notebook where the book would render it. A failing notebook
stops the run (its dependents are not started) with a message naming the notebook and the cell;
the partly executed copy is kept in ``runs/{scale}/failed/{stem}.ipynb`` for inspection.

The book (Jupyter Book 1.x, no execution at build time) renders the executed notebooks of one
scale; its ``_toc.yml`` is generated from the chapters that exist, so a chapter that has not run
is absent rather than a placeholder. Sphinx warnings are errors, and relative links and images in
the built HTML are checked.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import contextlib
import datetime as _dt
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

from esmerge.cache import atomic_write_json, file_sha256
from esmerge.paths import REPO_ROOT, SCALES

NEEDS_RE = re.compile(r"^#\s*esmerge-needs:[ \t]*(.*)$", re.MULTILINE)
STEM_RE = re.compile(r"^\d\d_[A-Za-z0-9_]+$")
# Files under runs/{scale}/{stem}/ that count as a figure or a table in produced.json.
PRODUCT_SUFFIXES = (".png", ".svg", ".pdf", ".jpg", ".jpeg", ".csv", ".tsv", ".tex")
# Static pages of the book, in TOC order, each listed only if it exists; any other book/*.md
# (but README.md) follows them alphabetically.
STATIC_PAGES = ("paper_vs_code.md", "rerun.md", "api.md", "references.md")
# Modules documented on the API page, when present in the package.
API_MODULES = (
    "models", "adapters", "encoders", "data", "probe", "layerwise", "elementwise", "merge",
    "methods", "specialists", "evaluate", "cache", "paths", "regenerate",
)
KERNEL = "python3"


class RegenerateError(RuntimeError):
    """The notebooks or the book could not be (re)built; the message says which and why."""


class NotebookFailed(RegenerateError):
    """A cell of a notebook raised; carries the notebook, the cell and the error."""

    def __init__(self, stem: str, cell: int | None, source: str, error: str, kept: Path | None):
        self.stem, self.cell, self.source, self.error, self.kept = stem, cell, source, error, kept
        where = f"cell {cell}" if cell is not None else "before any cell ran"
        lines = [f"notebook {stem} failed in {where}: {error}"]
        if source:
            head = source.strip().splitlines()
            lines.append("  cell source: " + "\n               ".join(head[:6]) + (" ..." if len(head) > 6 else ""))
        if kept:
            lines.append(f"  partly executed copy: {kept}")
        super().__init__("\n".join(lines))


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """The folders one regeneration reads and writes (the repository's own by default).

    Tests point every field at a temporary directory.
    """

    notebooks: Path  # notebooks/NN_*.py
    runs: Path  # runs/{scale}/{stem}/, state and produced.json
    book: Path  # Jupyter Book source: _config.yml, static pages, executed/{scale}/
    package: Path  # source tree hashed into every input key
    manifest: Path  # data manifest hashed into every input key
    cwd: Path  # working directory of every notebook kernel

    @classmethod
    def default(cls) -> "Layout":
        from esmerge.paths import runs_root

        return cls(
            notebooks=REPO_ROOT / "notebooks",
            runs=runs_root(),
            book=REPO_ROOT / "book",
            package=REPO_ROOT / "esmerge",
            manifest=REPO_ROOT / "data_manifest" / "files.yaml",
            cwd=REPO_ROOT,
        )

    def executed(self, scale: str) -> Path:
        return self.book / "executed" / scale

    def state_file(self, scale: str) -> Path:
        return self.runs / scale / "regenerate_state.json"


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Notebook:
    stem: str
    path: Path
    needs: tuple[str, ...] = field(default=())


def parse_needs(text: str) -> tuple[str, ...]:
    """Stems listed on the notebook's ``# esmerge-needs:`` line (empty when absent or blank).

    >>> parse_needs("# %%\\n# esmerge-needs: 01_data, 02_specialists\\nx = 1")
    ('01_data', '02_specialists')
    """
    match = NEEDS_RE.search(text)
    if not match:
        return ()
    return tuple(s.strip() for s in match.group(1).split(",") if s.strip())


def discover(notebooks_dir: Path) -> dict[str, Notebook]:
    """Every ``NN_name.py`` notebook in ``notebooks_dir``, keyed by stem, in file-name order."""
    if not notebooks_dir.is_dir():
        raise RegenerateError(f"no notebooks folder at {notebooks_dir}")
    found = {}
    for path in sorted(notebooks_dir.glob("[0-9][0-9]_*.py")):
        if STEM_RE.match(path.stem):
            found[path.stem] = Notebook(path.stem, path, parse_needs(path.read_text()))
    return found


def topological_order(notebooks: dict[str, Notebook]) -> list[str]:
    """Stems ordered so that every notebook comes after those it needs (ties by file name).

    Raises ``RegenerateError`` naming an unknown dependency or the notebooks on a cycle.
    """
    for nb in notebooks.values():
        for dep in nb.needs:
            if dep not in notebooks:
                raise RegenerateError(
                    f"{nb.path.name} needs {dep!r} (esmerge-needs line), but there is no "
                    f"notebook {dep}.py in {nb.path.parent}"
                )
    order: list[str] = []
    done: set[str] = set()
    remaining = dict(notebooks)
    while remaining:
        ready = sorted(s for s, nb in remaining.items() if set(nb.needs) <= done)
        if not ready:
            raise RegenerateError("esmerge-needs lines form a cycle among: " + ", ".join(sorted(remaining)))
        order.extend(ready)
        done.update(ready)
        for stem in ready:
            del remaining[stem]
    return order


def with_ancestors(notebooks: dict[str, Notebook], stems: list[str]) -> set[str]:
    """``stems`` plus every notebook they need, directly or transitively."""
    unknown = [s for s in stems if s not in notebooks]
    if unknown:
        raise RegenerateError(f"--only: no notebook named {', '.join(unknown)} (have: {', '.join(notebooks)})")
    out: set[str] = set()
    stack = list(stems)
    while stack:
        stem = stack.pop()
        if stem not in out:
            out.add(stem)
            for dep in notebooks[stem].needs:
                if dep not in notebooks:
                    raise RegenerateError(f"{stem} needs {dep!r} (esmerge-needs line), but there is no notebook {dep}.py")
                stack.append(dep)
    return out


# --------------------------------------------------------------------------- input keys


def _sha256(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(len(chunk).to_bytes(8, "little"))
        digest.update(chunk)
    return digest.hexdigest()


def tree_hash(package: Path) -> str:
    """sha256 over the relative path and bytes of every ``*.py`` file under ``package``."""
    chunks = []
    for path in sorted(package.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        chunks += [path.relative_to(package).as_posix().encode(), path.read_bytes()]
    return _sha256(*chunks)


def input_keys(
    notebooks: dict[str, Notebook], order: list[str], parameters: dict, code_hash: str, data_hash: str
) -> dict[str, str]:
    """Input key of every notebook: hash(text, parameters, code, data, keys of what it needs)."""
    keys: dict[str, str] = {}
    params = json.dumps(parameters, sort_keys=True).encode()
    for stem in order:
        nb = notebooks[stem]
        upstream = json.dumps({dep: keys[dep] for dep in sorted(nb.needs)}).encode()
        keys[stem] = _sha256(nb.path.read_bytes(), params, code_hash.encode(), data_hash.encode(), upstream)[:20]
    return keys


def load_state(path: Path) -> dict:
    if not path.exists():
        return {"notebooks": {}}
    try:
        state = json.loads(path.read_text())
    except json.JSONDecodeError:
        return {"notebooks": {}}  # a corrupt state only costs a re-run
    state.setdefault("notebooks", {})
    return state


# --------------------------------------------------------------------------- execution


KERNEL_START_ATTEMPTS = 3


def _has_parameters_cell(nb) -> bool:
    return any("parameters" in cell.metadata.get("tags", []) for cell in nb.cells)


def execute_notebook(
    stem: str, source: Path, executed: Path, parameters: dict, cwd: Path, failed_dir: Path
) -> float:
    """Execute jupytext notebook ``source`` with papermill into ``executed`` (only on success).

    Returns the seconds it took; raises ``NotebookFailed`` naming the failing cell.
    """
    import jupytext
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    nb = jupytext.read(source)
    if not _has_parameters_cell(nb):
        raise NotebookFailed(stem, None, "", f"{source.name} has no cell tagged 'parameters' "
                             "(add `# %% tags=[\"parameters\"]` above `scale = \"cpu\"`)", None)
    # A .py without a jupytext header carries no kernel; every chapter runs in the same one.
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    executed.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the final file, so the rename on success is atomic; the dot and the
    # ``.partial.ipynb`` suffix keep it out of the book (see exclude_patterns in _config.yml).
    partial_in = executed.with_name(f".{stem}.input.partial.ipynb")
    partial_out = executed.with_name(f".{stem}.partial.ipynb")
    nbformat.write(nb, partial_in)
    start = time.perf_counter()
    try:
        for attempt in range(KERNEL_START_ATTEMPTS):
            try:
                papermill.execute_notebook(
                    str(partial_in), str(partial_out), parameters=parameters, kernel_name=KERNEL,
                    language="python", cwd=str(cwd), progress_bar=False, log_output=False,
                    # The kernel's own log is noise here: a "TCP without encryption" warning (it listens
                    # on 127.0.0.1 only) and "KeyboardInterrupt caught" when jupyter_client interrupts it
                    # as part of a normal shutdown. Cell errors reach us through papermill, not this log.
                    extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
                )
                break
            except RuntimeError as err:
                # Kernels started at the same moment (--jobs N) can be handed the same free TCP port
                # and one dies before its first reply. No cell has run then, so starting again is safe.
                if "Kernel died before replying to kernel_info" not in str(err) or attempt + 1 == KERNEL_START_ATTEMPTS:
                    raise
                print(f"  retrying   {stem}: its kernel died while starting ({err})", file=sys.stderr)
        os.replace(partial_out, executed)
    except PapermillExecutionError as err:
        failed_dir.mkdir(parents=True, exist_ok=True)
        kept = failed_dir / f"{stem}.ipynb"
        os.replace(partial_out, kept)
        raise NotebookFailed(stem, err.cell_index, err.source, f"{err.ename}: {err.evalue}", kept) from None
    finally:
        partial_in.unlink(missing_ok=True)
        partial_out.unlink(missing_ok=True)
    (failed_dir / f"{stem}.ipynb").unlink(missing_ok=True)
    return time.perf_counter() - start


def _execute_job(job: dict) -> dict:
    """Process-pool entry point: run one notebook, report success or the failure as plain data."""
    try:
        seconds = execute_notebook(
            job["stem"], Path(job["source"]), Path(job["executed"]), job["parameters"],
            Path(job["cwd"]), Path(job["failed_dir"]),
        )
        return {"stem": job["stem"], "ok": True, "seconds": seconds}
    except NotebookFailed as err:
        return {"stem": job["stem"], "ok": False, "message": str(err)}
    except Exception as err:  # noqa: BLE001 - any other failure is reported, not swallowed
        return {"stem": job["stem"], "ok": False, "message": f"notebook {job['stem']} failed: {type(err).__name__}: {err}"}


@contextlib.contextmanager
def _environ(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class RunReport:
    executed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: str | None = None
    not_run: list[str] = field(default_factory=list)
    message: str = ""


def _keys_now(notebooks: dict[str, Notebook], order: list[str], parameters: dict, layout: Layout) -> dict[str, str]:
    data_hash = _sha256(layout.manifest.read_bytes()) if layout.manifest.exists() else ""
    return input_keys(notebooks, order, parameters, tree_hash(layout.package), data_hash)


def current_keys(scale: str, layout: Layout, seed: int = 0) -> dict[str, str]:
    """Input key every notebook would have now (see ``input_keys``)."""
    notebooks = discover(layout.notebooks)
    return _keys_now(notebooks, topological_order(notebooks), {"scale": scale, "seed": seed}, layout)


def stale_chapters(scale: str, layout: Layout, seed: int = 0) -> list[str]:
    """Executed notebooks of ``scale`` whose inputs changed since they ran (the book would show old results)."""
    try:
        keys = current_keys(scale, layout, seed)
    except RegenerateError:
        return []  # an unrunnable notebook set is reported by the run itself
    state = load_state(layout.state_file(scale))["notebooks"]
    return [stem for stem in keys if (layout.executed(scale) / f"{stem}.ipynb").exists()
            and state.get(stem, {}).get("key") != keys[stem]]


def run_notebooks(
    scale: str,
    layout: Layout,
    *,
    seed: int = 0,
    jobs: int = 1,
    only: list[str] | None = None,
    force: bool = False,
    log=print,
) -> RunReport:
    """Execute every stale notebook of ``scale`` in dependency order, ``jobs`` at a time.

    A notebook is stale when its input key differs from the stored one or its executed notebook
    is missing; ``force`` re-runs the selected notebooks regardless. ``only`` restricts the run to
    those stems plus any stale notebook they need. Stops starting notebooks at the first failure.
    """
    if scale not in SCALES:
        raise RegenerateError(f"unknown scale {scale!r}: expected one of {', '.join(SCALES)}")
    notebooks = discover(layout.notebooks)
    if not notebooks:
        raise RegenerateError(f"no NN_*.py notebooks in {layout.notebooks}")
    if only:  # only the selected notebooks and what they need are ordered (and validated)
        wanted = with_ancestors(notebooks, only)
        notebooks = {s: nb for s, nb in notebooks.items() if s in wanted}
    order = topological_order(notebooks)
    parameters = {"scale": scale, "seed": seed}
    keys = _keys_now(notebooks, order, parameters, layout)

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

    def job(stem: str) -> dict:
        return {
            "stem": stem, "source": str(notebooks[stem].path), "executed": str(executed_dir / f"{stem}.ipynb"),
            "parameters": parameters, "cwd": str(layout.cwd), "failed_dir": str(layout.runs / scale / "failed"),
        }

    def record(stem: str, seconds: float, started: str) -> None:
        state["notebooks"][stem] = {"key": keys[stem], "parameters": parameters, "started": started,
                                    "seconds": round(seconds, 2)}
        atomic_write_json(state_path, state)

    pending = list(todo)
    done = set(order) - set(todo)  # what is already up to date counts as finished
    running: dict = {}
    width = len(todo)
    # Workers (and the kernels they start) inherit the environment, so set it before they exist.
    with _environ(ESMERGE_RUNS_DIR=str(layout.runs)):
        pool = (futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))
                if jobs > 1 else None)
        try:
            while pending or running:
                ready = [s for s in pending if set(notebooks[s].needs) <= done] if report.failed is None else []
                for stem in ready[: max(0, jobs - len(running))]:
                    pending.remove(stem)
                    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                    log(f"  running     {stem} [{len(report.executed) + len(running) + 1}/{width}] ...")
                    if pool is None:
                        result = _execute_job(job(stem))
                        running[stem] = (started, result)
                    else:
                        running[stem] = (started, pool.submit(_execute_job, job(stem)))
                if not running:
                    break  # nothing can start: a dependency failed
                if pool is None:
                    finished = list(running)
                else:
                    wait_on = {fut: stem for stem, (_, fut) in running.items()}
                    done_futs, _ = futures.wait(wait_on, return_when=futures.FIRST_COMPLETED)
                    finished = [wait_on[f] for f in done_futs]
                for stem in finished:
                    started, outcome = running.pop(stem)
                    result = outcome if pool is None else outcome.result()
                    if result["ok"]:
                        record(stem, result["seconds"], started)
                        done.add(stem)
                        report.executed.append(stem)
                        log(f"  done        {stem} in {result['seconds']:.1f} s")
                    elif report.failed is None:
                        report.failed, report.message = stem, result["message"]
                        log("  FAILED      " + result["message"].replace("\n", "\n              "))
                    else:
                        report.message += "\n" + result["message"]
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
    report.not_run = pending
    return report


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


# --------------------------------------------------------------------------- book


def toc_entries(book: Path, scale: str, notebooks: Path | None = None) -> tuple[list[str], list[str]]:
    """(chapters, static pages) to list: executed notebooks of ``scale`` that exist, static pages that exist.

    With ``notebooks``, an executed notebook whose source ``.py`` is gone (renamed or deleted) is
    left out too. Paths are relative to ``book`` without suffix, as ``_toc.yml`` wants them.
    """
    executed = book / "executed" / scale
    chapters = [f"executed/{scale}/{p.stem}" for p in sorted(executed.glob("[0-9][0-9]_*.ipynb"))
                if notebooks is None or (notebooks / f"{p.stem}.py").exists()]
    known = [name for name in STATIC_PAGES if (book / name).exists()]
    others = sorted(p.name for p in book.glob("*.md") if p.name not in STATIC_PAGES and p.name != "README.md")
    return chapters, [Path(name).stem for name in known + others]


def write_toc(book: Path, scale: str, notebooks: Path | None = None) -> Path:
    """Generate ``book/_toc.yml`` from what exists: no chapter is listed without its content."""
    chapters, pages = toc_entries(book, scale, notebooks)
    entries = chapters + pages
    if not entries:
        raise RegenerateError(
            f"nothing to put in the book: no executed notebooks in {book / 'executed' / scale} "
            f"and no static pages; run `esmerge regenerate --scale {scale}` first"
        )
    root = entries[0]
    lines = ["# Generated by `esmerge regenerate`: chapters whose executed notebook exists.",
             "format: jb-book", f"root: {root}", "parts:"]
    rest_chapters = [c for c in chapters if c != root]
    rest_pages = [p for p in pages if p != root]
    for caption, files in ((f"Chapters (scale: {scale})", rest_chapters), ("Reference", rest_pages)):
        if files:
            lines += [f"  - caption: \"{caption}\"", "    chapters:"] + [f"      - file: {f}" for f in files]
    if lines[-1] == "parts:":
        lines.pop()
    toc = book / "_toc.yml"
    toc.write_text("\n".join(lines) + "\n")
    return toc


def write_api_page(book: Path, package: Path) -> Path | None:
    """Generate ``book/api.md`` with an ``automodule`` for each documented module that exists."""
    present = [m for m in API_MODULES if (package / f"{m}.py").exists() or (package / m / "__init__.py").exists()]
    page = book / "api.md"
    if not present:
        page.unlink(missing_ok=True)
        return None
    name = package.name
    parts = ["# API reference", "",
             f"The `{name}` package, module by module (generated from the docstrings of the modules that exist).", ""]
    for module in present:
        parts += [f"## `{name}.{module}`", "", "```{eval-rst}", f".. automodule:: {name}.{module}",
                  "   :members:", "   :show-inheritance:", "```", ""]
    text = "\n".join(parts)
    if not page.exists() or page.read_text() != text:  # unchanged file keeps Sphinx's cache valid
        page.write_text(text)
    return page


def _jupyter_book() -> list[str]:
    script = Path(sys.executable).with_name("jupyter-book")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jupyter_book.cli.main"]


def build_book(scale: str, layout: Layout, log=print) -> Path:
    """Build the HTML book for ``scale`` with warnings as errors; check links; return ``index.html``."""
    if not (layout.book / "_config.yml").exists():
        raise RegenerateError(f"no {layout.book / '_config.yml'}")
    write_api_page(layout.book, layout.package)
    write_toc(layout.book, scale, layout.notebooks)
    out = layout.book / "_build"
    marker = out / ".esmerge_scale"
    cmd = _jupyter_book() + ["build", str(layout.book), "--builder", "html", "--warningiserror",
                             "--keep-going", "--quiet"]
    if not marker.exists() or marker.read_text() != scale:
        cmd.append("--all")  # another scale's pages are in the Sphinx cache
    log("  building    book: " + " ".join(cmd[1:]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=layout.book, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-40:])
        raise RegenerateError(f"book build failed (Sphinx warnings are errors):\n{tail}")
    marker.write_text(scale)
    html = out / "html"
    broken = broken_links(html)
    if broken:
        raise RegenerateError("broken links in the built book:\n  " + "\n  ".join(broken[:50]))
    log(f"  built       book in {time.perf_counter() - start:.1f} s; links checked")
    return html / "index.html"


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        for attr in ("href", "src"):
            if attrs.get(attr) and tag in ("a", "img", "link", "script", "source", "iframe"):
                self.refs.append((tag, attrs[attr]))


def broken_links(html_dir: Path) -> list[str]:
    """Relative links, images, scripts and stylesheets in ``html_dir`` whose target (or anchor) is missing.

    External URLs are not fetched. Returns ``"page: target (why)"`` strings, empty when all resolve.
    """
    parsed: dict[Path, _Refs] = {}

    def parse(path: Path) -> _Refs:
        if path not in parsed:
            parser = _Refs()
            parser.feed(path.read_text(errors="replace"))
            parsed[path] = parser
        return parsed[path]

    problems = []
    for page in sorted(html_dir.rglob("*.html")):
        if "_static" in page.relative_to(html_dir).parts:
            continue
        for tag, ref in parse(page).refs:
            parts = urlsplit(ref)
            if parts.scheme or ref.startswith("//"):
                continue  # external: not checked offline
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if parts.path.endswith("/") or target.is_dir():
                target = target / "index.html"
            where = page.relative_to(html_dir).as_posix()
            if not target.exists():
                problems.append(f"{where}: <{tag}> {ref} (no such file)")
            elif parts.fragment and target.suffix == ".html" and unquote(parts.fragment) not in parse(target).ids:
                problems.append(f"{where}: <{tag}> {ref} (no anchor #{parts.fragment})")
    return problems


# --------------------------------------------------------------------------- command line


def regenerate(args: argparse.Namespace, layout: Layout | None = None, log=print) -> int:
    layout = layout or Layout.default()
    if not args.book_only:
        t0 = time.perf_counter()
        report = run_notebooks(args.scale, layout, seed=args.seed, jobs=args.jobs, only=args.only,
                               force=args.force, log=log)
        produced = write_produced(args.scale, layout)
        log(f"  notebooks   executed {len(report.executed)}, up to date {len(report.skipped)} "
            f"in {time.perf_counter() - t0:.1f} s; products listed in {produced}")
        if report.failed:
            log(f"\nesmerge regenerate: FAILED\n{report.message}")
            if report.not_run:
                log(f"not run because of the failure: {', '.join(report.not_run)}")
            return 1
    if not args.no_book:
        stale = stale_chapters(args.scale, layout, args.seed)
        if stale:
            log(f"  note        executed with older inputs (re-run to refresh): {', '.join(stale)}")
        index = build_book(args.scale, layout, log=log)
        log(str(index))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="esmerge regenerate", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cpu", choices=SCALES, help="model/data scale (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed injected into every notebook (default: 0)")
    p.add_argument("--jobs", type=int, default=1, help="notebooks run in parallel when independent")
    p.add_argument("--only", nargs="+", metavar="STEM", help="run these notebooks (and any stale one they need)")
    p.add_argument("--force", action="store_true", help="re-run the selected notebooks even if unchanged")
    p.add_argument("--book-only", action="store_true", help="build the book from existing executed notebooks")
    p.add_argument("--no-book", action="store_true", help="run notebooks only; do not build the book")
    return p


def cli(argv: list[str], layout: Layout | None = None) -> int:
    args = parser().parse_args(argv)
    if args.jobs < 1:
        parser().error("--jobs must be at least 1")
    if args.book_only and args.no_book:
        parser().error("--book-only and --no-book together do nothing")
    try:
        return regenerate(args, layout)
    except RegenerateError as err:
        print(f"esmerge regenerate: {err}", file=sys.stderr)
        return 1
