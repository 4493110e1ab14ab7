"""``esmerge.cache``: unique temporary names and a lock per key, so parallel runs neither collide nor duplicate work."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from esmerge import cache

# Both processes ask for the same missing entry; compute() takes a second and logs each call.
WORKER = textwrap.dedent("""\
    import sys, time, torch
    from pathlib import Path
    from esmerge import cache
    entry, calls, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    while not go.exists():  # start together
        time.sleep(0.01)
    def compute():
        with calls.open("a") as fh:
            fh.write("computed\\n")
        time.sleep(1.0)
        return {"x": torch.arange(4.0)}
    value = cache.cached(entry, compute)
    for i in range(40):  # and hammer one JSON file: a shared temporary name made this fail
        cache.atomic_write_json(entry.with_name("state.json"), {"writer": sys.argv[4], "i": i})
    print(value["x"].tolist())
""")


def test_two_processes_compute_a_missing_entry_once_and_both_get_it(tmp_path):
    entry, calls, go = tmp_path / "states-abc.pt", tmp_path / "calls.txt", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(entry), str(calls), str(go), str(n)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(2)]
    go.touch()
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert [out.strip() for out, _ in results] == ["[0.0, 1.0, 2.0, 3.0]"] * 2
    assert calls.read_text() == "computed\n"  # the second process waited and reused the result
    assert json.loads((tmp_path / "state.json").read_text())["i"] == 39
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_a_failed_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    class Unserialisable:
        def __repr__(self):
            raise RuntimeError("cannot")

    target = tmp_path / "out.json"
    target.write_text('{"old": true}\n')
    with pytest.raises(RuntimeError):
        cache.atomic_write_json(target, {"bad": Unserialisable()})
    assert target.read_text() == '{"old": true}\n'  # the previous complete file is untouched

    def boom(obj, f):
        open(f, "wb").write(b"half")
        raise OSError("disk full")

    original = torch.save
    torch.save = boom
    try:
        with pytest.raises(OSError, match="disk full"):
            cache.atomic_torch_save({"a": 1}, tmp_path / "x.pt")
    finally:
        torch.save = original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_cached_computes_once_then_loads(tmp_path):
    calls = []
    path = tmp_path / "k.pt"
    first = cache.cached(path, lambda: calls.append(1) or torch.ones(2))
    second = cache.cached(path, lambda: calls.append(1) or torch.zeros(2))
    assert calls == [1] and torch.equal(first, second)
    assert torch.equal(cache.cached(path, lambda: torch.zeros(2), refresh=True), torch.zeros(2))
