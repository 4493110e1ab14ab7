"""``esmerge regenerate`` shows which cell each running notebook is in, its elapsed time and an estimate,
on the terminal stream and never in the executed notebook; the monitor redraws on a terminal."""
from __future__ import annotations

import io
import json
import re
import time

import nbformat
from test_regenerate import make_layout, run_cli, write_notebook

from esmerge import progress
from esmerge.paths import BOOK_DIR
from esmerge.regen.monitor import Estimate, Monitor

SLEEPY = """\
    import time
    from esmerge import progress
    time.sleep(1.5)

    # %%
    for _ in progress.track(range(4), desc="sleep steps", unit="step"):
        time.sleep(0.6)

    # %%
    time.sleep(1.5)

    # %%
    print("finished")
"""


def test_progress_lines_with_cells_and_estimate_reach_the_terminal_not_the_notebook(tmp_path, monkeypatch, capsys):
    layout = make_layout(tmp_path)
    write_notebook(tmp_path, "01_sleepy", SLEEPY)
    write_notebook(tmp_path, "02_sleepy_too", SLEEPY)
    # A record of an earlier run (its key is out of date, so both run): 01 took a minute last time.
    layout.state_file("smoke").parent.mkdir(parents=True)
    layout.state_file("smoke").write_text(json.dumps({"notebooks": {"01_sleepy": {"key": "old", "seconds": 60}}}))
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.4)  # a CI log line every 0.4 s instead of 30 s

    assert run_cli(["--scale", "smoke", "--no-book", "--jobs", "2"], layout) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("  progress    ")]

    duration = r"(?:(\d+)m)?(\d+)s"
    first = [re.match(rf"  progress    01_sleepy: (?:kernel starting|cell (\d+)/(\d+)), {duration} elapsed, "
                      rf"~{duration} left of ~1m00s \(last run\)", line) for line in lines if "01_sleepy:" in line]
    assert first and all(first), lines
    assert first[0].group(1) is None  # the first line comes while the kernel starts
    cells = {int(m.group(1)) for m in first if m.group(1)}
    assert len(cells) >= 3 and {int(m.group(2)) for m in first if m.group(2)} == {7}, lines
    # markdown, parameters, injected parameters, 4 code cells: 7; the slow ones (4-7) show.
    seconds = [60 * int(m.group(3) or 0) + int(m.group(4)) + 60 * int(m.group(5) or 0) + int(m.group(6))
               for m in first]
    assert all(59 <= s <= 61 for s in seconds), seconds  # elapsed + left = last run's 60 s
    # The notebook without a record has no estimate, and each running notebook has its own line.
    assert any(line.startswith("  progress    02_sleepy_too: cell ") and "no estimate yet" in line for line in lines)
    # The bar inside the kernel shows under its notebook's line.
    assert any(re.search(r"01_sleepy: cell 5/7, .* \| sleep steps [0-3]/4 step", line) for line in lines), lines

    for stem in ("01_sleepy", "02_sleepy_too"):
        executed = nbformat.read(tmp_path / f"book/executed/smoke/{stem}.ipynb", as_version=4)
        outputs = json.dumps([cell.get("outputs", []) for cell in executed.cells])
        assert "finished" in outputs  # outputs are kept ...
        assert "sleep steps" not in outputs and "elapsed" not in outputs  # ... progress is not
    state = json.loads(layout.state_file("smoke").read_text())["notebooks"]
    assert 3 < state["01_sleepy"]["seconds"] < 60  # the new record replaces last time's


def test_on_a_terminal_the_block_is_redrawn_in_place_and_cleared_for_log_lines(tmp_path):
    stream = io.StringIO()
    events = tmp_path / "01_x.jsonl"
    logged = []
    with Monitor(stream=stream, every=0.05, interactive=True) as monitor:
        monitor.start("01_x", events, Estimate(10, "last run"))
        progress.write_event(events, {"cell": 2, "cells": 5})
        time.sleep(0.3)
        monitor.say(logged.append, "  done        01_x in 0.3 s")
        monitor.finish("01_x")
    text = stream.getvalue()
    assert logged == ["  done        01_x in 0.3 s"]
    drawn = re.findall(r"  \.\.\. 01_x: cell 2/5, 0s elapsed, ~10s left of ~10s \(last run\)\n", text)
    assert len(drawn) >= 2  # redrawn, not appended once
    # Every drawn line is erased again (cursor up + erase line), so the terminal ends clean.
    assert text.count("\x1b[1A\x1b[2K") == text.count("\n")


def test_estimates_before_a_first_run_are_the_figures_of_the_rerun_page():
    """The monitor reads book/rerun.md's per-notebook table itself: every notebook has a cpu figure there."""
    from esmerge.paths import NOTEBOOKS_DIR
    from esmerge.regen import monitor
    from esmerge.regen.notebook_graph import discover

    figures = monitor.rerun_page_seconds((BOOK_DIR / "rerun.md").read_text())
    stems = set(discover(NOTEBOOKS_DIR))
    assert set(figures["cpu"]) == stems, "the per-notebook table of book/rerun.md changed shape or lost a notebook"
    assert figures["cpu"]["07_results"] > figures["cpu"]["01_data"]
    for stem, seconds in figures["cpu"].items():
        assert monitor.estimate(stem, "cpu", {"notebooks": {}}) == monitor.Estimate(seconds, "rerun.md")
