"""``esmerge regenerate``: ordering, skipping, re-running, failure reporting, TOC and link checks.

Every test works in a temporary repository layout with tiny notebooks that run in a second or
two under papermill's ``python3`` kernel; nothing here touches the real notebooks or book.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from esmerge.cli import main as cli_main
from esmerge.paths import BOOK_DIR, Layout
from esmerge.regen import regenerate as rg

NOTEBOOK = """\
# %% [markdown]
# # {title}

# %% tags=["parameters"]
# esmerge-needs: {needs}
scale = "cpu"
seed = 0

# %%
from pathlib import Path
out = Path("runs") / scale / "{stem}"
out.mkdir(parents=True, exist_ok=True)
"""


def write_notebook(root: Path, stem: str, body: str, needs: str = "") -> Path:
    path = root / "notebooks" / f"{stem}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(NOTEBOOK.format(title=stem, needs=needs, stem=stem) + textwrap.dedent(body))
    return path


def run_cli(argv: list[str], layout) -> int:
    """``esmerge regenerate ARGV`` through the real command line, with every folder in ``layout``."""
    from unittest import mock

    with mock.patch.object(Layout, "default", classmethod(lambda cls: layout)):
        return cli_main(["regenerate", *argv])


def make_layout(root: Path) -> rg.Layout:
    package = root / "pkg"
    package.mkdir(parents=True, exist_ok=True)
    (package / "helpers.py").write_text("VALUE = 1\n")
    (package / "plots.py").write_text("from . import helpers\n")
    manifest = root / "files.yaml"
    manifest.write_text("files: []\n")
    return rg.Layout(notebooks=root / "notebooks", runs=root / "runs", book=root / "book",
                     package=package, manifest=manifest, cwd=root)


def quiet(*_args):
    pass


# ----------------------------------------------------------------------------- pure parts


def test_parse_needs_reads_the_comment_line():
    assert rg.parse_needs("x = 1\n# esmerge-needs: 01_data, 02_specialists\n") == ("01_data", "02_specialists")
    assert rg.parse_needs("# esmerge-needs:\nscale = 'cpu'\n") == ()  # blank list, not the next line
    assert rg.parse_needs("scale = 'cpu'\n") == ()


def test_topological_order_puts_needs_first_and_rejects_bad_graphs(tmp_path):
    nbs = {s: rg.Notebook(s, tmp_path / f"{s}.py", needs) for s, needs in
           [("01_a", ("03_c",)), ("02_b", ()), ("03_c", ()), ("04_d", ("01_a", "02_b"))]}
    assert rg.topological_order(nbs) == ["02_b", "03_c", "01_a", "04_d"]

    cyclic = {**nbs, "02_b": rg.Notebook("02_b", tmp_path / "02_b.py", ("04_d",))}
    with pytest.raises(rg.RegenerateError, match="cycle among: 02_b, 04_d$"):  # 01_a, 03_c can still run
        rg.topological_order(cyclic)
    missing = {"01_a": rg.Notebook("01_a", tmp_path / "01_a.py", ("09_nope",))}
    with pytest.raises(rg.RegenerateError, match="01_a.py needs '09_nope'"):
        rg.topological_order(missing)


def test_with_ancestors_follows_needs_transitively(tmp_path):
    nbs = {s: rg.Notebook(s, tmp_path / f"{s}.py", needs) for s, needs in
           [("01_a", ()), ("02_b", ("01_a",)), ("03_c", ("02_b",)), ("04_d", ())]}
    assert rg.with_ancestors(nbs, ["03_c"]) == {"01_a", "02_b", "03_c"}
    with pytest.raises(rg.RegenerateError, match="no notebook named 07_x"):
        rg.with_ancestors(nbs, ["07_x"])


def test_toc_lists_only_chapters_and_pages_that_exist(tmp_path):
    book = tmp_path / "book"
    for scale, stem in [("smoke", "00_overview"), ("smoke", "02_specialists"), ("cpu", "01_data")]:
        (book / "executed" / scale).mkdir(parents=True, exist_ok=True)
        nbformat.write(nbformat.v4.new_notebook(), book / "executed" / scale / f"{stem}.ipynb")
    (book / "rerun.md").write_text("# Rerun\n")
    (book / "glossary.md").write_text("# Glossary\n")  # a page nobody listed still gets in, last
    (book / "executed" / "smoke" / ".03_probe.partial.ipynb").write_text("{}")  # an interrupted run

    toc = yaml.safe_load(rg.write_toc(book, "smoke").read_text())
    listed = [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]
    # 01_data ran only at cpu, 03_probe never finished, claims.md does not exist: none is listed.
    assert listed == ["executed/smoke/00_overview", "executed/smoke/02_specialists", "rerun", "glossary"]

    # With the notebooks folder given, a chapter whose source was renamed away is dropped as well.
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "00_overview.py").write_text("")
    toc = yaml.safe_load(rg.write_toc(book, "smoke", tmp_path / "notebooks").read_text())
    assert toc["root"] == "executed/smoke/00_overview"
    assert [c["file"] for part in toc["parts"] for c in part["chapters"]] == ["rerun", "glossary"]

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(rg.RegenerateError, match="nothing to put in the book"):
        rg.write_toc(empty, "smoke")


def test_broken_links_reports_missing_files_and_anchors_only(tmp_path):
    html = tmp_path / "html"
    (html / "sub").mkdir(parents=True)
    (html / "ok.png").write_bytes(b"png")
    (html / "sub" / "b.html").write_text('<h1 id="there">B</h1><a href="../a.html">back</a>')
    (html / "a.html").write_text(
        '<a href="sub/b.html">fine</a> <a href="sub/b.html#there">anchor</a> <img src="ok.png">'
        '<a href="https://example.org/x.html">external</a> <a href="#top" id="top">self</a>'
        '<a href="sub/missing.html">gone</a> <img src="figures/none.png"> <a href="sub/b.html#nowhere">bad</a>'
    )
    assert rg.broken_links(html) == [
        "a.html: <a> sub/missing.html (no such file)",
        "a.html: <img> figures/none.png (no such file)",
        "a.html: <a> sub/b.html#nowhere (no anchor #nowhere)",
    ]


def test_api_page_lists_only_existing_modules(tmp_path):
    package = tmp_path / "esmerge"
    (package / "methods").mkdir(parents=True)
    (package / "signals").mkdir(parents=True)
    (package / "signals" / "probe.py").write_text("")
    (package / "methods" / "__init__.py").write_text("")
    (package / "unlisted.py").write_text("")
    text = rg.write_api_page(tmp_path, package).read_text()
    assert [line for line in text.splitlines() if line.startswith(".. automodule::")] == [
        ".. automodule:: esmerge.signals.probe", ".. automodule:: esmerge.methods"]


# ----------------------------------------------------------------------------- execution


def test_runs_in_order_then_skips_then_reruns_what_changed(tmp_path):
    layout = make_layout(tmp_path)
    first = write_notebook(tmp_path, "01_first", """\
        from pkg import helpers
        (out / "value.csv").write_text(f"value\\n{seed + 40 + helpers.VALUE}\\n")
    """)
    write_notebook(tmp_path, "02_second", """\
        upstream = int((Path("runs") / scale / "01_first" / "value.csv").read_text().split()[1])
        (out / "plus_one.csv").write_text(f"value,scale\\n{upstream + 1},{scale}\\n")
    """, needs="01_first")
    write_notebook(tmp_path, "03_alone", """\
        import pkg.plots
        (out / "figure.png").write_bytes(b"not really a png")
    """)
    write_notebook(tmp_path, "04_no_package", "print('imports nothing of pkg')\n")

    report = rg.run_notebooks("smoke", layout, seed=1, log=quiet)
    assert report.executed == ["01_first", "03_alone", "04_no_package", "02_second"] and report.failed is None
    # 02 read what 01 wrote, with the injected parameters (seed=1, scale=smoke), in the layout's cwd.
    assert (tmp_path / "runs/smoke/02_second/plus_one.csv").read_text() == "value,scale\n43,smoke\n"
    executed = nbformat.read(tmp_path / "book/executed/smoke/02_second.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and 'scale = "smoke"' in injected[0].source

    # Nothing changed: nothing runs, and a partial file left by a killed run is cleared.
    (tmp_path / "book/executed/smoke/.02_second.partial.ipynb").write_text("{")
    report = rg.run_notebooks("smoke", layout, seed=1, log=quiet)
    assert report.executed == [] and report.skipped == ["01_first", "03_alone", "04_no_package", "02_second"]
    assert not list((tmp_path / "book/executed/smoke").glob(".*"))

    # --only X --force re-runs X alone when what it needs is up to date.
    report = rg.run_notebooks("smoke", layout, seed=1, only=["02_second"], force=True, log=quiet)
    assert report.executed == ["02_second"] and report.skipped == ["01_first"]

    # A changed notebook re-runs with everything downstream of it, and nothing else.
    first.write_text(first.read_text() + "# a comment is a change\n")
    assert rg.stale_chapters("smoke", layout, seed=1) == ["01_first", "02_second"]  # the book would warn
    report = rg.run_notebooks("smoke", layout, seed=1, log=quiet)
    assert report.executed == ["01_first", "02_second"] and report.skipped == ["03_alone", "04_no_package"]

    # Package code re-runs the notebooks that import it, directly (01; 02 reads 01's output) or
    # through another module (03 imports plots, which imports helpers), here two at a time;
    # 04 imports nothing of the package and stays up to date.
    (layout.package / "helpers.py").write_text("VALUE = 1  # same value, new text\n")
    report = rg.run_notebooks("smoke", layout, seed=1, jobs=2, log=quiet)
    assert sorted(report.executed) == ["01_first", "02_second", "03_alone"] and report.skipped == ["04_no_package"]
    assert report.executed.index("01_first") < report.executed.index("02_second")
    # A module only 03 reaches re-runs 03 alone.
    (layout.package / "plots.py").write_text("from . import helpers  # edited\n")
    assert rg.stale_chapters("smoke", layout, seed=1) == ["03_alone"]
    report = rg.run_notebooks("smoke", layout, seed=1, log=quiet)
    assert report.executed == ["03_alone"]

    # produced.json names every figure/table with the notebook and input key that made it.
    state = json.loads(layout.state_file("smoke").read_text())["notebooks"]
    produced = json.loads(rg.write_produced("smoke", layout).read_text())["files"]
    assert {(row["file"], row["notebook"], row["input_key"], row["kind"]) for row in produced} == {
        ("runs/smoke/01_first/value.csv", "01_first.py", state["01_first"]["key"], "table"),
        ("runs/smoke/02_second/plus_one.csv", "02_second.py", state["02_second"]["key"], "table"),
        ("runs/smoke/03_alone/figure.png", "03_alone.py", state["03_alone"]["key"], "figure"),
    }
    assert all(row["parameters"] == {"scale": "smoke", "seed": 1} and not row["stale"] for row in produced)


def test_failure_names_notebook_and_cell_and_keeps_no_half_notebook(tmp_path, capsys):
    layout = make_layout(tmp_path)
    write_notebook(tmp_path, "01_ok", "(out / 'a.csv').write_text('a\\n1\\n')\n")
    write_notebook(tmp_path, "02_broken", """\
        print("this cell runs")

        # %%
        raise ValueError("deliberately broken")
    """, needs="01_ok")
    write_notebook(tmp_path, "03_after", "print('must not run')\n", needs="02_broken")

    assert run_cli(["--scale", "smoke", "--no-book"], layout) == 1
    out = capsys.readouterr().out
    assert "notebook 02_broken failed in cell" in out
    assert "ValueError: deliberately broken" in out
    assert 'raise ValueError("deliberately broken")' in out  # the failing cell's source
    assert "not run because of the failure: 03_after" in out

    executed = tmp_path / "book/executed/smoke"
    assert sorted(p.name for p in executed.iterdir()) == ["01_ok.ipynb"]  # no half notebook, no partials
    kept = nbformat.read(tmp_path / "runs/smoke/failed/02_broken.ipynb", as_version=4)
    assert any(o.get("ename") == "ValueError" for c in kept.cells for o in c.get("outputs", []))
    state = json.loads(layout.state_file("smoke").read_text())["notebooks"]
    assert sorted(state) == ["01_ok"]


def test_interrupt_keeps_finished_notebooks_and_leaves_no_partial(tmp_path):
    make_layout(tmp_path)
    write_notebook(tmp_path, "01_quick", "(out / 'done.csv').write_text('x\\n1\\n')\n")
    write_notebook(tmp_path, "02_slow", """\
        (out / "started").write_text("yes")
        import time
        time.sleep(120)
    """, needs="01_quick")
    script = (
        # SIGUSR1 dumps every thread's stack to stderr: if the interrupt ever hangs, the failure says where.
        "import faulthandler, signal\nfaulthandler.register(signal.SIGUSR1, all_threads=True)\n"
        "from pathlib import Path\nfrom esmerge.regen import regenerate as rg\n"
        f"root = Path({str(tmp_path)!r})\n"
        "rg.run_notebooks('smoke', rg.Layout(notebooks=root / 'notebooks', runs=root / 'runs', book=root / 'book',"
        " package=root / 'pkg', manifest=root / 'files.yaml', cwd=root))\n"
    )
    # Its own process group, as a terminal's Ctrl-C reaches the regenerator and its kernel together.
    stderr = (tmp_path / "stderr.txt").open("w")
    # A shell starts background jobs with SIGINT ignored, and children inherit that; a terminal's
    # foreground job has the default disposition, which is what Ctrl-C meets. Restore it here, so
    # the test means the same however pytest itself was started.
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=(tmp_path / "stdout.txt").open("w"), stderr=stderr)
    started = tmp_path / "runs/smoke/02_slow/started"
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert started.exists(), "02_slow never started"
    os.killpg(proc.pid, signal.SIGINT)
    try:
        assert proc.wait(timeout=60) != 0
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("regenerate did not exit within 60 s of Ctrl-C; its threads were at:\n"
                    + (tmp_path / "stderr.txt").read_text()[-6000:])

    executed = tmp_path / "book/executed/smoke"
    assert sorted(p.name for p in executed.iterdir()) == ["01_quick.ipynb"]
    assert sorted(json.loads((tmp_path / "runs/smoke/regenerate_state.json").read_text())["notebooks"]) == ["01_quick"]
    said = (tmp_path / "stdout.txt").read_text()  # what was kept and how to resume
    assert "interrupted stopped 02_slow: its unfinished run was discarded" in said
    assert "kept: finished in this run: 01_quick; up to date: none; 1 executed notebook in" in said
    assert "resume: run the same command again" in said


def test_notebook_without_parameters_cell_is_refused(tmp_path):
    layout = make_layout(tmp_path)
    path = tmp_path / "notebooks" / "01_plain.py"
    path.parent.mkdir(parents=True)
    path.write_text("# %%\nscale = 'cpu'\n")
    report = rg.run_notebooks("smoke", layout, log=quiet)
    assert report.failed == "01_plain" and "no cell tagged 'parameters'" in report.message


def test_book_build_fails_on_sphinx_warning_and_builds_only_existing_chapters(tmp_path):
    layout = make_layout(tmp_path)
    layout.book.mkdir()
    repo_book = BOOK_DIR
    for name in ("_config.yml", "references.bib"):
        shutil.copy(repo_book / name, layout.book / name)
    write_notebook(tmp_path, "01_only", "print('hello from the only chapter')\n")
    assert rg.run_notebooks("smoke", layout, log=quiet).executed == ["01_only"]

    (layout.book / "claims.md").write_text("# Claims\n\nSee {ref}`no-such-label`.\n")
    with pytest.raises(rg.RegenerateError, match="no-such-label"):
        rg.build_book("smoke", layout, log=quiet)

    (layout.book / "claims.md").write_text("# Claims\n\nSee [the chapter](executed/smoke/01_only.ipynb).\n")
    index = rg.build_book("smoke", layout, log=quiet)
    html = index.parent
    assert (html / "executed/smoke/01_only.html").exists() and (html / "claims.html").exists()
    assert "hello from the only chapter" in (html / "executed/smoke/01_only.html").read_text()
    assert not (html / "rerun.html").exists()  # no placeholder for a page that does not exist


def test_conda_environment_pins_what_pyproject_pins():
    """environment.yml (conda route) and pyproject.toml (pip route) must not drift apart."""
    import re

    tomllib = pytest.importorskip("tomllib" if sys.version_info >= (3, 11) else "tomli")

    repo = Path(__file__).resolve().parents[1]
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]
    pip_route = set(project["dependencies"]) | set(project["optional-dependencies"]["test"])
    pip_entries = next(d["pip"] for d in yaml.safe_load((repo / "environment.yml").read_text())["dependencies"]
                       if isinstance(d, dict))
    conda_route = {e for e in pip_entries if not e.startswith("-") and e != "torch==2.13.0"}
    assert conda_route == pip_route, (sorted(conda_route - pip_route), sorted(pip_route - conda_route))
    assert "torch==2.13.0" in pip_entries
    assert re.search(r"^\s+- --extra-index-url https://download\.pytorch\.org/whl/cpu$",
                     (repo / "environment.yml").read_text(), re.M), "conda route must take torch's CPU build"


def test_kernel_that_dies_while_starting_is_started_again_then_reported(tmp_path, monkeypatch, capsys):
    """Parallel kernels can race for a TCP port; that start-up failure is retried, nothing else is."""
    import papermill

    make_layout(tmp_path)
    source = write_notebook(tmp_path, "01_ok", "(out / 'x.txt').write_text('1')\n")
    calls = []

    def flaky(input_path, output_path, **kwargs):
        calls.append(kwargs["kernel_name"])
        if len(calls) < failures_before_success:
            raise RuntimeError("Kernel died before replying to kernel_info")
        shutil.copy(input_path, output_path)

    monkeypatch.setattr(papermill, "execute_notebook", flaky)
    executed = tmp_path / "book/executed/smoke/01_ok.ipynb"
    args = ("01_ok", source, executed, {"scale": "smoke"}, tmp_path, tmp_path / "failed")

    failures_before_success = 2  # one failed start, then success
    rg.execute_notebook(*args)
    assert len(calls) == 2 and executed.is_file()
    assert "retrying" in capsys.readouterr().err

    calls.clear()
    executed.unlink()
    failures_before_success = rg.KERNEL_START_ATTEMPTS + 1  # never starts: the error is raised, no notebook kept
    with pytest.raises(RuntimeError, match="kernel_info"):
        rg.execute_notebook(*args)
    assert len(calls) == rg.KERNEL_START_ATTEMPTS and not executed.exists()

    calls.clear()
    monkeypatch.setattr(papermill, "execute_notebook",
                        lambda *a, **k: calls.append(1) or (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):
        rg.execute_notebook(*args)
    assert len(calls) == 1  # any other error is not retried
