"""Ship a finished regeneration with the repository: ``book/shipped/{scale}/``, committed to git.

A fresh clone then renders the full book of that scale without executing a notebook or loading a
model (``esmerge regenerate --book-only`` renders the shipped chapters when no local run exists).
What is shipped, and what is not:

* ``NN_name.ipynb``: every executed notebook, as ``esmerge regenerate`` wrote it. Its figures are
  the PNG outputs embedded in it: the book renders those, so images are stored once, there.
* ``runs/{stem}/``: the small result files each notebook wrote at the top of its run folder
  (``.csv``, ``.tsv``, ``.json``, ``.tex``, each at most ``MAX_RESULT_BYTES``). Not shipped: the
  PNG copies of the embedded figures, model weights and adapters (sub-folders), cached tensors
  (``.pt``), and anything from the data folder (notebooks never write there).
* ``regenerate_state.json``: each chapter's input key, parameters, commit and text sha256 (what
  ``esmerge regenerate --check`` and the chapter banners compare with the code now).
* ``SHIPPED.json``, written last (its presence marks a complete shipment): scale, date, commit,
  every file with its size, what was left out and why.

A shipment is refused while any chapter is stale or missing, and an existing one is replaced
only with ``force``; it is assembled in a hidden sibling folder and renamed into place.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from pathlib import Path

from esmerge.cache import atomic_write_json, file_sha256, key_lock
from esmerge.errors import OutputExistsError
from esmerge.paths import Layout
from esmerge.regen.freshness import (
    FAILING,
    FRESH,
    chapter_statuses,
    same_but_imports,
    source_commit,
    summary_lines,
    text_sha256,
)
from esmerge.regen.input_keys import current_keys, keys_now, load_state
from esmerge.regen.notebook_graph import RegenerateError, discover, topological_order

RESULT_SUFFIXES = (".csv", ".tsv", ".json", ".tex")
MAX_RESULT_BYTES = 2 * 1024 * 1024
MARKER = "SHIPPED.json"


def shipped_dir(layout: Layout, scale: str) -> Path:
    """``book/shipped/{scale}``: where shipped results of ``scale`` live in git."""
    return layout.book / "shipped" / scale


def load_shipment(layout: Layout, scale: str) -> dict | None:
    """The ``SHIPPED.json`` of a complete shipment of ``scale``, or ``None`` if none is shipped."""
    marker = shipped_dir(layout, scale) / MARKER
    if not marker.exists():
        return None
    return json.loads(marker.read_text())


def _result_files(run_folder: Path) -> tuple[list[Path], list[dict]]:
    """(files to ship, left out with why) among the top-level files of one notebook's run folder."""
    keep, left = [], []
    for path in sorted(run_folder.iterdir()) if run_folder.is_dir() else []:
        name = path.name
        if name.startswith("."):
            continue  # lock files and partial writes: not results
        if path.is_dir():
            left.append({"path": name + "/", "why": "folder (merged models, evaluation caches)"})
        elif path.suffix.lower() not in RESULT_SUFFIXES:
            why = {".png": "figure: embedded in the executed notebook", ".pt": "cached tensors"}.get(
                path.suffix.lower(), "not a result table")
            left.append({"path": name, "why": why})
        elif path.stat().st_size > MAX_RESULT_BYTES:
            left.append({"path": name, "why": f"larger than {MAX_RESULT_BYTES} bytes"})
        else:
            keep.append(path)
    return keep, left


def ship(scale: str, layout: Layout, *, seed: int = 0, force: bool = False, log=print) -> Path:
    """Copy the finished regeneration of ``scale`` into ``book/shipped/{scale}``; return that folder.

    Raises ``RegenerateError`` naming the chapters that are stale or not executed, and
    ``OutputExistsError`` when a shipment exists and ``force`` is not given.
    """
    notebooks = discover(layout.notebooks)
    order = topological_order(notebooks)
    keys = keys_now(notebooks, order, {"scale": scale, "seed": seed}, layout)
    texts = {stem: text_sha256(notebooks[stem].path) for stem in order}
    executed_dir = layout.executed(scale)
    state = load_state(layout.state_file(scale))
    executed = {p.stem for p in executed_dir.glob("[0-9][0-9]_*.ipynb")}
    not_ready = [s for s in chapter_statuses(state, executed, keys, texts) if s.status != FRESH and s.stem in keys]
    if not_ready:
        raise RegenerateError(
            f"cannot ship {scale}: {', '.join(f'{s.stem} ({s.status})' for s in not_ready)}; "
            f"run `esmerge regenerate --scale {scale} --seed {seed}` first")
    target = shipped_dir(layout, scale)
    with key_lock(target):
        if target.exists() and not force:
            raise OutputExistsError(f"{target} already holds shipped {scale} results; pass --force to replace them")
        now_commit = source_commit(layout.cwd)
        tmp = target.with_name(f".{scale}.{os.getpid()}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            files, left_out = [], []
            shipped_state = {"notebooks": {}}
            for stem in order:
                shutil.copy2(executed_dir / f"{stem}.ipynb", tmp / f"{stem}.ipynb")
                files.append(f"{stem}.ipynb")
                keep, left = _result_files(layout.runs / scale / stem)
                for path in keep:
                    (tmp / "runs" / stem).mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, tmp / "runs" / stem / path.name)
                    files.append(f"runs/{stem}/{path.name}")
                left_out += [{**row, "path": f"runs/{stem}/{row['path']}"} for row in left]
                entry = dict(state["notebooks"][stem])
                entry["text_sha256"] = texts[stem]  # equal to the executed text: its key is fresh
                if not entry.get("commit"):  # a run from before commits were recorded: its inputs are HEAD's
                    entry.update(now_commit)
                shipped_state["notebooks"][stem] = entry
            atomic_write_json(tmp / "regenerate_state.json", shipped_state)
            files.append("regenerate_state.json")
            sizes = {name: (tmp / name).stat().st_size for name in files}
            atomic_write_json(tmp / MARKER, {
                "scale": scale, "seed": seed,
                "shipped": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                **now_commit, "chapters": order, "total_bytes": sum(sizes.values()),
                "files": [{"path": name, "bytes": sizes[name], "sha256": file_sha256(tmp / name)} for name in files],
                "left_out": left_out,
            })
            if target.exists():
                old = target.with_name(f".{scale}.{os.getpid()}.old")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old)
            else:
                os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(sizes.values())
    log(f"  shipped     {len(order)} chapters and {len(files) - len(order) - 1} result files of {scale} "
        f"({total / 1e6:.2f} MB) to {target}; commit it: git add {target}")
    return target


def verify_shipment(layout: Layout, scale: str) -> list[str]:
    """Files of a shipment that are missing or differ from ``SHIPPED.json`` (empty when intact)."""
    shipment = load_shipment(layout, scale)
    if shipment is None:
        return []
    folder = shipped_dir(layout, scale)
    problems = []
    for row in shipment["files"]:
        path = folder / row["path"]
        if not path.exists():
            problems.append(f"{path}: listed in {MARKER} but missing")
        elif file_sha256(path) != row["sha256"]:
            problems.append(f"{path}: differs from the shipped file (edited by hand?)")
    return problems


def _cell_sources(path: Path) -> list[str]:
    """The sources of a notebook's cells (a jupytext ``.py`` or an executed ``.ipynb``), papermill's
    injected parameters left out."""
    import jupytext  # only a check of shipped results needs it

    notebook = jupytext.read(path)
    return [cell.source for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]


def check_shipped(scale: str, layout: Layout, log=print) -> int:
    """``esmerge regenerate --check``: compare the shipped results of ``scale`` with the code now; the exit code.

    Lists every chapter that is not fresh. Fails (1) when a shipped file was edited or a chapter's
    notebook *text* changed (or a notebook has no shipped chapter) without re-execution; a change
    of code, data or an upstream chapter alone only warns (0). Passes when nothing is shipped.
    """
    shipment = load_shipment(layout, scale)
    folder = shipped_dir(layout, scale)
    if shipment is None:
        log(f"  check       no shipped {scale} results in {folder}: nothing to check")
        return 0
    problems = verify_shipment(layout, scale)
    notebooks = discover(layout.notebooks)
    keys = current_keys(scale, layout, seed=shipment.get("seed", 0))
    texts = {stem: text_sha256(notebooks[stem].path) for stem in keys}
    executed = {p.stem for p in folder.glob("[0-9][0-9]_*.ipynb")}
    state = load_state(folder / "regenerate_state.json")
    for stem in sorted(executed & set(texts)):
        recorded = state.get("notebooks", {}).get(stem, {}).get("text_sha256")
        if recorded not in (None, texts[stem]) and same_but_imports(
                _cell_sources(folder / f"{stem}.ipynb"), _cell_sources(notebooks[stem].path)):
            texts[stem] = recorded  # only where its esmerge names are imported from changed: code, not text
            log(f"  note        {stem}: its text differs from the shipped run only in its esmerge imports "
                "(counted as a code change)")
    statuses = chapter_statuses(state, executed, keys, texts)
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.status] = counts.get(s.status, 0) + 1
    log(f"  check       shipped {scale} results of commit {(shipment.get('commit') or '?')[:12]} "
        f"({shipment.get('shipped', '?')[:10]}): " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    for line in problems:
        log(f"  STALE       {line}")
    for line in summary_lines(statuses, f"shipped {scale}"):
        log(line)
    failing = [s.stem for s in statuses if s.status in FAILING]
    if failing or problems:
        log(f"esmerge regenerate --check: FAILED: shipped {scale} chapters out of date with their notebook text: "
            f"{', '.join(failing) or 'none'}{'; shipped files edited' if problems else ''}; re-run "
            f"`esmerge regenerate --scale {scale}` then `esmerge regenerate --scale {scale} --ship --force`")
        return 1
    warned = [s.stem for s in statuses if s.status != FRESH]
    if warned:
        log(f"  warning     code or data changed since these shipped {scale} chapters ran: {', '.join(warned)} "
            "(not a failure: a full run does not fit in CI; refresh them with a regeneration and --ship --force)")
    return 0
