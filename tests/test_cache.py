"""``esmerge.cache``: unique temporary names and a lock per key, so parallel runs neither collide nor duplicate work."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from esmerge import cache
from esmerge.errors import EsmergeError, InputError

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


# --------------------------------------------------------------------------- nothing wrong is kept as finished
class _Planted:
    def __reduce__(self):
        return (print, ("code ran",))


@pytest.mark.parametrize("kind", ["empty", "truncated", "planted", "garbage"])
def test_a_corrupt_or_planted_entry_is_moved_aside_and_recomputed(tmp_path, capsys, kind):
    """Regression: a planted entry gave torch's `weights_only=False` advice, a zero-byte one
    `unexpected EOFError:` on every run (it never healed)."""
    path = tmp_path / "states-0123.pt"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        torch.save({"x": torch.arange(100.0)}, path)
        path.write_bytes(path.read_bytes()[:200])
    elif kind == "planted":
        torch.save({"x": _Planted()}, path)
    else:
        path.write_bytes(b"not a torch file" * 8)
    value = cache.cached(path, lambda: {"x": torch.ones(3)})
    assert torch.equal(value["x"], torch.ones(3))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0] and "computing it again" in err[0], err
    assert "weights_only" not in err[0] and "code ran" not in captured.out
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("states-0123.pt.corrupt-")]
    assert len(aside) == 1
    assert torch.equal(cache.cached(path, lambda: pytest.fail("recomputed a healed entry"))["x"], torch.ones(3))


def test_a_non_finite_value_is_not_cached(tmp_path):
    """Regression (D2): NaN SWD tables, states and scores were stored as finished entries."""
    path = tmp_path / "swd-abcd.pt"
    with pytest.raises(InputError) as err:
        cache.cached(path, lambda: {"table": torch.tensor([[0.5, float("nan")], [float("inf"), 1.0]])})
    message = str(err.value)
    assert "\n" not in message and message.startswith("cache entry swd-abcd.pt: ['table'] has 2 NaN/Inf of 4")
    assert "n_projections" in message
    assert list(tmp_path.iterdir()) == [tmp_path / ".swd-abcd.pt.lock"]
    with pytest.raises(InputError, match="scores-1.pt: the value has 1 NaN/Inf.*gradients overflowed"):
        cache.atomic_torch_save(torch.tensor([float("nan")]), tmp_path / "scores-1.pt")
    cache.atomic_torch_save({"ids": torch.arange(3), "ok": torch.ones(2)}, tmp_path / "probes-1.pt")  # ints, finite


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 3584 vs 3472"),
    OSError(28, "No space left on device"),
])
def test_a_full_cache_file_system_is_one_line_naming_the_folder(tmp_path, monkeypatch, failure):
    def full(obj, f):
        open(f, "wb").write(b"part")
        raise failure

    monkeypatch.setattr(torch, "save", full)
    folder = tmp_path / "es" / "cpu"
    with pytest.raises(cache.CacheWriteError) as err:
        cache.cached(folder / "states-1.pt", lambda: {"x": torch.ones(2)})
    message = str(err.value)
    assert "\n" not in message and str(folder) in message and "ESMERGE_CACHE" in message and "free space" in message
    assert isinstance(err.value, EsmergeError)
    assert sorted(p.name for p in folder.iterdir()) == [".states-1.pt.lock"]
