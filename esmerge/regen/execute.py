"""Run one notebook with papermill; keep the executed copy only when every cell ran.

papermill writes to a hidden ``.{stem}.partial.ipynb`` beside the final file, which is renamed
into place on success, so an interruption never leaves half a notebook where the book would
render it. A failing cell raises ``NotebookFailed`` naming the notebook and the cell, and the
partly executed copy is kept in ``runs/{scale}/failed/{stem}.ipynb`` for inspection. That folder
may sit on another file system (``$ESMERGE_RUNS_DIR``), where a rename fails with ``EXDEV``: the
copy is then copied and removed (``outputs.move_file``), and if it cannot be moved at all it stays
where it is, named in the message; the cell's error is reported in every case.

With a ``progress_file``, the kernel is started with ``$ESMERGE_PROGRESS_FILE`` pointing at it
(so ``esmerge.progress`` bars inside the notebook report there, not in its outputs), and a
papermill engine hook appends ``{"cell": i, "cells": n}`` as each cell starts.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from papermill.engines import NBClientEngine, papermill_engines

from esmerge import outputs, progress
from esmerge.regen.notebook_graph import RegenerateError

KERNEL = "python3"
KERNEL_START_ATTEMPTS = 3
ENGINE = "esmerge"


class NotebookFailed(RegenerateError):
    """A cell of a notebook raised; carries the notebook, the cell and the error."""

    def __init__(self, stem: str, cell: int | None, source: str, error: str, kept: Path | None, note: str = ""):
        self.stem, self.cell, self.source, self.error, self.kept = stem, cell, source, error, kept
        where = f"cell {cell}" if cell is not None else "before any cell ran"
        lines = [f"notebook {stem} failed in {where}: {error}"]
        if source:
            head = source.strip().splitlines()
            lines.append("  cell source: " + "\n               ".join(head[:6]) + (" ..." if len(head) > 6 else ""))
        if kept:
            lines.append(f"  partly executed copy: {kept}{note}")
        super().__init__("\n".join(lines))


class CellProgressEngine(NBClientEngine):
    """papermill's nbclient engine, also appending each cell's start to ``$ESMERGE_PROGRESS_FILE``."""

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, **kwargs):
        """Run the notebook as papermill does, first wrapping ``nb_man.cell_start`` to report each cell."""
        path = os.environ.get(progress.ENV_FILE)
        if path:
            start_cell, n = nb_man.cell_start, len(nb_man.nb.cells)

            def cell_start(cell, cell_index=None, **kw):
                if cell_index is not None:  # 1-based, as a reader counts cells
                    progress.write_event(path, {"cell": cell_index + 1, "cells": n})
                return start_cell(cell, cell_index, **kw)

            nb_man.cell_start = cell_start
        return super().execute_managed_notebook(nb_man, kernel_name, **kwargs)


papermill_engines.register(ENGINE, CellProgressEngine)


@contextlib.contextmanager
def environ(**values: str | None):
    """Set (or, for ``None``, remove) environment variables for the block; restore them after."""
    old = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _has_parameters_cell(nb) -> bool:
    return any("parameters" in cell.metadata.get("tags", []) for cell in nb.cells)


def execute_notebook(stem: str, source: Path, executed: Path, parameters: dict, cwd: Path, failed_dir: Path,
                     progress_file: Path | None = None) -> float:
    """Execute jupytext notebook ``source`` with papermill into ``executed`` (only on success).

    Returns the seconds it took; raises ``NotebookFailed`` naming the failing cell.
    """
    import jupytext  # deferred with papermill's own imports: only a regeneration needs them
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
    start = time.perf_counter()
    kept = None
    try:
        nbformat.write(nb, partial_in)
        # The kernel inherits the environment when it starts: the progress file must be set by then.
        with environ(**{progress.ENV_FILE: str(progress_file) if progress_file else None}):
            _run_papermill(papermill, stem, partial_in, partial_out, parameters, cwd)
        remove_injected_parameters(partial_out)
        os.replace(partial_out, executed)
    except PapermillExecutionError as err:
        kept, note = _keep_failed(partial_out, failed_dir / f"{stem}.ipynb")
        raise NotebookFailed(stem, err.cell_index, err.source, f"{err.ename}: {err.evalue}", kept, note) from None
    finally:
        partial_in.unlink(missing_ok=True)
        if kept != partial_out:
            partial_out.unlink(missing_ok=True)
    (failed_dir / f"{stem}.ipynb").unlink(missing_ok=True)
    return time.perf_counter() - start


def remove_injected_parameters(path: Path) -> None:
    """Tag papermill's injected parameters cell ``remove-cell``, so the book shows no second
    parameters cell (the notebook keeps it, for anyone rerunning it)."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.setdefault("tags", [])
        if "injected-parameters" in tags and "remove-cell" not in tags:
            tags.append("remove-cell")
    nbformat.write(nb, path)


def _keep_failed(partial: Path, kept: Path) -> tuple[Path | None, str]:
    """Move the partly executed copy to ``kept`` (across file systems too); if that fails, leave it in place.

    Returns where it is and a note for the message; never raises, so the cell's error is what is reported.
    """
    if not partial.exists():
        return None, ""
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        return outputs.move_file(partial, kept), ""
    except OSError as err:
        return partial, (f" (left here: moving it to {kept.parent} failed: {err.strerror or err}; "
                         "the next run removes it)")


def _run_papermill(papermill, stem: str, partial_in: Path, partial_out: Path, parameters: dict, cwd: Path) -> None:
    for attempt in range(KERNEL_START_ATTEMPTS):
        try:
            papermill.execute_notebook(
                str(partial_in), str(partial_out), parameters=parameters, kernel_name=KERNEL,
                language="python", cwd=str(cwd), progress_bar=False, log_output=False, engine_name=ENGINE,
                # The kernel's own log is noise here: a "TCP without encryption" warning (it listens
                # on 127.0.0.1 only) and "KeyboardInterrupt caught" when jupyter_client interrupts it
                # as part of a normal shutdown. Cell errors reach us through papermill, not this log.
                extra_arguments=["--IPKernelApp.log_level=CRITICAL"],
            )
            return
        except RuntimeError as err:
            # Kernels started at the same moment (--jobs N) can be handed the same free TCP port
            # and one dies before its first reply. No cell has run then, so starting again is safe.
            if "Kernel died before replying to kernel_info" not in str(err) or attempt + 1 == KERNEL_START_ATTEMPTS:
                raise
            print(f"  retrying   {stem}: its kernel died while starting ({err})", file=sys.stderr)


def execute_job(job: dict) -> dict:
    """Process-pool entry point: run one notebook, report success or the failure as plain data."""
    try:
        seconds = execute_notebook(
            job["stem"], Path(job["source"]), Path(job["executed"]), job["parameters"],
            Path(job["cwd"]), Path(job["failed_dir"]),
            Path(job["progress_file"]) if job.get("progress_file") else None,
        )
        return {"stem": job["stem"], "ok": True, "seconds": seconds}
    except NotebookFailed as err:
        return {"stem": job["stem"], "ok": False, "message": str(err)}
    except Exception as err:  # noqa: BLE001 - any other failure is reported, not swallowed
        return {"stem": job["stem"], "ok": False,
                "message": f"notebook {job['stem']} failed: {type(err).__name__}: {err}"}
