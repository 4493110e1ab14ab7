"""``esmerge.progress``: where a bar goes (progress file, terminal, notebook, log) and what it says."""
from __future__ import annotations

import io
import json

import pytest

from esmerge import progress


@pytest.fixture(autouse=True)
def no_progress_file(monkeypatch):
    monkeypatch.delenv(progress.ENV_FILE, raising=False)


def events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_under_regenerate_bars_go_to_the_progress_file_and_print_nothing(tmp_path, monkeypatch, capsys):
    path = tmp_path / "nb.jsonl"
    monkeypatch.setenv(progress.ENV_FILE, str(path))
    monkeypatch.setattr(progress, "FILE_EVERY_S", 0.0)  # every update is written
    assert progress.destination() == "file"
    seen = list(progress.track(range(3), desc="evaluate BindingDB", unit="ex"))
    assert seen == [0, 1, 2]
    assert capsys.readouterr() == ("", "")  # nothing for the notebook's outputs
    got = events(path)
    assert [(e["n"], e["total"], e["done"]) for e in got] == [(0, 3, False), (1, 3, False), (2, 3, False),
                                                                 (3, 3, False), (3, 3, True)]
    assert {e["desc"] for e in got} == {"evaluate BindingDB"} and len({e["bar"] for e in got}) == 1


def test_progress_file_is_throttled_but_the_end_is_always_written(tmp_path, monkeypatch):
    path = tmp_path / "nb.jsonl"
    monkeypatch.setenv(progress.ENV_FILE, str(path))
    monkeypatch.setattr(progress, "FILE_EVERY_S", 3600.0)
    bar = progress.track(total=1000, desc="element scores")
    for _ in range(1000):
        bar.update()
    bar.set_postfix(loss="0.5")
    bar.close()
    bar.close()  # a second close writes nothing more
    assert [(e["n"], e["done"], e["postfix"]) for e in events(path)] == [(0, False, {}), (1000, True, {"loss": "0.5"})]


def test_reader_follows_cells_and_open_bars_across_partial_writes(tmp_path):
    path = tmp_path / "nb.jsonl"
    reader = progress.EventReader(path)
    reader.poll()  # no file yet: nothing, no error
    assert reader.summary() == ""
    progress.write_event(path, {"cell": 4, "cells": 12})
    line = json.dumps({"bar": "x", "desc": "models", "n": 2, "total": 8, "unit": "it", "elapsed": 10.0,
                       "initial": 0, "postfix": {}, "done": False}) + "\n"
    with open(path, "a") as fh:
        fh.write(line[:20])  # half a line: not yet an event
    reader.poll()
    assert reader.summary() == "cell 4/12"
    with open(path, "a") as fh:
        fh.write(line[20:])
    reader.poll()
    assert reader.summary() == "cell 4/12 | models 2/8 it (25%), 10s elapsed, ~30s left"
    progress.write_event(path, {"cell": 5, "cells": 12})  # a new cell: the old cell's bars are over
    reader.poll()
    assert reader.summary() == "cell 5/12"


def test_in_a_log_a_plain_line_at_most_every_interval_and_one_at_the_end(monkeypatch):
    stream = io.StringIO()
    assert progress.destination() == "log"  # pytest's captured stderr is not a terminal
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 3600.0)
    bar = progress.Bar(total=4, desc="train molecule", unit="step", stream=stream)
    for _ in range(4):
        bar.update()
    bar.close()
    assert stream.getvalue().splitlines() == ["done: train molecule 4/4 step (100%), 0s elapsed"]

    stream = io.StringIO()
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    bar = progress.Bar(total=150, desc="train", unit="step", initial=148, stream=stream)
    bar.update()
    bar.set_postfix(loss="0.123")
    bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("train 149/150 step (99%), 0s elapsed, ~0s left")
    assert lines[-1] == "done: train 150/150 step (100%), 0s elapsed, loss=0.123"


def test_on_a_terminal_a_tqdm_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert progress.destination() == "terminal"
    assert sum(progress.track([1, 2, 3], desc="hidden states")) == 6
    assert "hidden states" in tty.getvalue() and "3/3" in tty.getvalue()


def test_disabled_bar_does_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(progress.ENV_FILE, str(tmp_path / "nb.jsonl"))
    assert list(progress.track(range(2), disable=True)) == [0, 1]
    bar = progress.track(total=3, disable=True)
    bar.update()
    bar.set_postfix(a=1)
    bar.close()
    assert not (tmp_path / "nb.jsonl").exists() and capsys.readouterr() == ("", "")
