"""Stop a regeneration at every file write in turn: the next run resumes to the same result, and
nothing half-written ever looks finished (fault injection).

papermill is replaced by an in-process stand-in that executes the cells itself, saving the output
notebook as papermill does (once when it starts, again when done), so that every write of the run
- the notebooks' own files, the output notebook, the renames, the state, produced.json - happens
in this process where a monkeypatched writer can fail it.
"""
from __future__ import annotations

import argparse
import builtins
import io
import json
import os
from pathlib import Path

import nbformat
import papermill
import pytest
from test_regenerate import make_layout, write_notebook

from esmerge.regen import regenerate as rg


class InjectedFault(OSError):
    pass


def fake_papermill(input_path, output_path, parameters=None, cwd=None, **_kwargs):
    nb = nbformat.read(input_path, as_version=4)
    nb.metadata["papermill"] = {"status": "running"}
    nbformat.write(nb, output_path)  # papermill saves the output notebook before the first cell
    namespace: dict = {}
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for cell in nb.cells:
            if cell.cell_type == "code":
                exec(cell.source, namespace)  # noqa: S102 - the test's own notebooks
                if "parameters" in cell.metadata.get("tags", []):
                    namespace.update(parameters)
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="ran\n")]
    finally:
        os.chdir(old)
    nb.metadata["papermill"] = {"status": "completed"}
    nbformat.write(nb, output_path)


class FailingWriter:
    """Counts file writes (open for writing, rename) and raises at the ``fail_at``-th; 0 never fails."""

    def __init__(self, monkeypatch, fail_at: int):
        self.count, self.fail_at, self.fired = 0, fail_at, False
        real_open, real_replace, real_rename = builtins.open, os.replace, os.rename

        def tick(what, half_write=None):
            self.count += 1
            if self.count == self.fail_at:
                self.fired = True
                if half_write:
                    half_write()  # the file now exists, created or truncated, without its content
                raise InjectedFault(f"injected fault at write {self.count}: {what}")

        def open_(file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                tick(f"open {file}", lambda: real_open(file, mode, *args, **kwargs).close())
            return real_open(file, mode, *args, **kwargs)

        def replace(src, dst, *args, **kwargs):
            tick(f"rename {src} -> {dst}")
            return real_replace(src, dst, *args, **kwargs)

        def rename(src, dst, *args, **kwargs):
            tick(f"rename {src} -> {dst}")
            return real_rename(src, dst, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)  # pathlib's write_text goes through io.open
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)


def build(root: Path) -> rg.Layout:
    layout = make_layout(root)
    write_notebook(root, "01_first", "(out / 'value.csv').write_text(f'value\\n{seed + 41}\\n')\n")
    write_notebook(root, "02_second", """\
        upstream = (Path("runs") / scale / "01_first" / "value.csv").read_text().split()[1]
        (out / "plus_one.csv").write_text(f"value\\n{int(upstream) + 1}\\n")
        (out / "figure.png").write_bytes(b"png")
    """, needs="01_first")
    return layout


def regenerate(layout: rg.Layout) -> int:
    args = argparse.Namespace(scale="smoke", seed=0, jobs=1, only=None, force=False, book_only=False, no_book=True)
    return rg.regenerate(args, layout, log=lambda *_: None)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every result file and executed notebook (what a reader of the book or of runs/ sees)."""
    files = {}
    for base in (root / "runs" / "smoke", root / "book" / "executed" / "smoke"):
        for path in sorted(base.rglob("*")):
            if path.is_file() and path.name not in ("regenerate_state.json", "produced.json"):
                data = path.read_bytes()
                if path.suffix == ".ipynb":  # cell ids are random per conversion: compare the rest
                    nb = json.loads(data)
                    data = json.dumps([{k: v for k, v in c.items() if k != "id"} for c in nb["cells"]]).encode()
                files[path.relative_to(root).as_posix()] = data
    return files


def check_nothing_half_written_looks_finished(root: Path) -> None:
    executed = root / "book" / "executed" / "smoke"
    stray = [p for p in root.rglob("*") if "partial" in p.name]
    assert not stray, f"temporary files left behind: {stray}"
    for nb_path in executed.glob("*.ipynb"):
        nb = nbformat.read(nb_path, as_version=4)  # parses: not half a file
        assert nb.metadata["papermill"]["status"] == "completed", f"{nb_path.name} is an unfinished run"
    state_path = root / "runs" / "smoke" / "regenerate_state.json"
    state = json.loads(state_path.read_text())["notebooks"] if state_path.exists() else {}
    for stem in state:  # a recorded key promises a complete executed notebook
        assert (executed / f"{stem}.ipynb").exists(), f"{stem} recorded as done without its notebook"
    produced = root / "runs" / "smoke" / "produced.json"
    if produced.exists():
        json.loads(produced.read_text())


def test_a_regeneration_stopped_at_any_write_resumes_to_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(papermill, "execute_notebook", fake_papermill)
    reference_root = tmp_path / "reference"
    assert regenerate(build(reference_root)) == 0
    reference = snapshot(reference_root)
    assert sorted(reference) == [
        "book/executed/smoke/01_first.ipynb", "book/executed/smoke/02_second.ipynb",
        "runs/smoke/01_first/value.csv", "runs/smoke/02_second/figure.png", "runs/smoke/02_second/plus_one.csv"]

    fail_at = 0
    while True:
        fail_at += 1
        root = tmp_path / f"fault-{fail_at}"
        layout = build(root)
        with monkeypatch.context() as patch:
            writer = FailingWriter(patch, fail_at)
            try:
                code = regenerate(layout)
            except InjectedFault:
                code = "raised"
        if not writer.fired:
            assert code == 0
            break
        assert code in (1, "raised"), f"a fault at write {fail_at} was reported as success"
        check_nothing_half_written_looks_finished(root)
        assert regenerate(layout) == 0, f"no resume after a fault at write {fail_at}"
        check_nothing_half_written_looks_finished(root)
        assert snapshot(root) == {k.replace("reference", root.name): v for k, v in reference.items()}, fail_at
    assert fail_at > 10  # every write point of the run was exercised (two notebooks, state, produced.json)


# --------------------------------------------------------------------------- one run at a time, failures kept
def test_a_second_regeneration_on_the_same_runs_folder_waits_for_the_first(tmp_path, monkeypatch):
    """Regression (D4): two cold runs on one runs folder raced (one failed in notebook 06); now the
    second says it waits, runs when the first is done, and finds everything up to date."""
    import fcntl
    import threading

    monkeypatch.setattr(papermill, "execute_notebook", fake_papermill)
    layout = build(tmp_path)
    layout.runs.mkdir(parents=True)
    said, result = [], {}
    with open(layout.runs / ".regenerate.lock", "a") as held:  # the first run, holding its lock
        fcntl.flock(held, fcntl.LOCK_EX)
        args = argparse.Namespace(scale="smoke", seed=0, jobs=1, only=None, force=False, book_only=False, no_book=True)
        second = threading.Thread(target=lambda: result.update(code=rg.regenerate(args, layout, log=said.append)))
        second.start()
        second.join(1.5)
        assert second.is_alive() and any("waiting" in line and str(layout.runs) in line for line in said), said
        assert not (tmp_path / "book" / "executed" / "smoke" / "01_first.ipynb").exists()
        fcntl.flock(held, fcntl.LOCK_UN)
    second.join(60)
    assert result["code"] == 0 and (tmp_path / "book" / "executed" / "smoke" / "02_second.ipynb").exists()


def _failing_papermill(input_path, output_path, **_kwargs):
    from papermill.exceptions import PapermillExecutionError

    nb = nbformat.read(input_path, as_version=4)
    nb.metadata["papermill"] = {"status": "failed"}
    nbformat.write(nb, output_path)
    raise PapermillExecutionError(2, 1, "x = 1 / 0", "ZeroDivisionError", "division by zero", [])


def _run_failing(tmp_path, failed_dir):
    from esmerge.regen.execute import NotebookFailed, execute_notebook

    source = write_notebook(tmp_path, "01_first", "x = 1 / 0\n")
    executed = tmp_path / "book" / "executed" / "smoke" / "01_first.ipynb"
    with pytest.raises(NotebookFailed) as err:
        execute_notebook("01_first", source, executed, {"scale": "smoke", "seed": 0}, tmp_path, failed_dir)
    assert "notebook 01_first failed in cell 2: ZeroDivisionError: division by zero" in str(err.value)
    assert not executed.exists()
    return err.value, executed.parent


def test_a_failing_notebook_with_runs_on_another_file_system_keeps_its_error_and_copy(tmp_path, monkeypatch):
    """Regression (D5): with ESMERGE_RUNS_DIR on another file system the failure was reported as
    `OSError: [Errno 18] Invalid cross-device link` and the partly executed copy was lost."""
    import errno

    monkeypatch.setattr(papermill, "execute_notebook", _failing_papermill)
    real_replace, real_rename = os.replace, os.rename

    def cross_device(real):
        def move(src, dst, *args, **kwargs):
            if Path(src).parent != Path(dst).parent:
                raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), None, str(dst))
            return real(src, dst, *args, **kwargs)
        return move

    monkeypatch.setattr(os, "replace", cross_device(real_replace))
    monkeypatch.setattr(os, "rename", cross_device(real_rename))
    failed = tmp_path / "elsewhere" / "runs" / "smoke" / "failed"
    error, executed_dir = _run_failing(tmp_path, failed)
    assert error.kept == failed / "01_first.ipynb"
    assert nbformat.read(error.kept, as_version=4).metadata["papermill"]["status"] == "failed"
    assert sorted(p.name for p in failed.iterdir()) == ["01_first.ipynb"] and list(executed_dir.iterdir()) == []


def test_a_failing_notebook_keeps_its_copy_in_place_when_it_cannot_be_moved(tmp_path, monkeypatch):
    monkeypatch.setattr(papermill, "execute_notebook", _failing_papermill)
    blocked = tmp_path / "runs"
    blocked.write_text("a file where the runs folder should be")
    error, executed_dir = _run_failing(tmp_path, blocked / "smoke" / "failed")
    assert error.kept == executed_dir / ".01_first.partial.ipynb" and error.kept.exists()
    assert "left here" in str(error) and "the next run removes it" in str(error)


@pytest.mark.skipif(not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(os.getcwd()).st_dev,
                    reason="needs a second file system (/dev/shm)")
def test_a_failing_notebook_is_kept_on_a_real_second_file_system(tmp_path, monkeypatch):
    import shutil
    import tempfile

    monkeypatch.setattr(papermill, "execute_notebook", _failing_papermill)
    other = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        error, _ = _run_failing(tmp_path, other / "failed")
        assert error.kept == other / "failed" / "01_first.ipynb" and error.kept.exists()
    finally:
        shutil.rmtree(other)
