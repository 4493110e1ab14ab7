"""Compare two runs folders (``runs/<scale>/``) file by file, ignoring only what measures time.

Two cold runs of ``esmerge regenerate --scale smoke`` with the same seed write byte-identical
adapters, figures and tables, except for the fields that record how long something took (or when);
those are *volatile* and compared by name only. Everything else must match byte for byte (binary
files) or value for value (CSV and JSON, with volatile fields dropped).

    python -m esmerge.regen.reproducibility RUNS_A RUNS_B    # exit 1 and list differences, 0 if none

>>> _close([1.0, {"s": 47.94}], [1.0, {"s": 47.95}]), _close(0.5, 0.6)
(False, False)
>>> _close([-47.93999, float("nan")], [-47.94000, float("nan")])
True
>>> is_volatile("wall_seconds"), is_volatile("cost.wall_s"), is_volatile("s / step"), is_volatile("accuracy")
(True, True, True, False)
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
import sys
from pathlib import Path

# Field names (JSON keys, CSV headers) that hold a duration or a timestamp, or say which commit a
# notebook ran from (regenerate_state.json: an up-to-date notebook keeps the commit of its older run).
# Peak memory (a process's RSS high-water mark) and whether a cost was read from a cache differ between
# runs of the same code as times do.
_VOLATILE = re.compile(r"(^|[ _.])(seconds|wall|wall_s|s / step|s_per_step|elapsed|elapsed_s|started|"
                       r"finished_utc|timings|wall time \(min\)|commit|uncommitted_changes|peak_memory_mib|"
                       r"peak_memory|memory_measured_as|cached)($|[ _.(])")
# produced.json records each file's sha256, which differs exactly when a volatile field does.
_HASH_OF_FILE = "sha256"


def is_volatile(name: str) -> bool:
    """Whether a JSON key or CSV column named ``name`` records time rather than a result."""
    return bool(_VOLATILE.search(name))


# Scores are float32 log-likelihoods; summation order (threads) may move their last digits.
REL_TOL = 1e-5


def _close(a, b) -> bool:
    """Equal, with floats compared to ``REL_TOL`` (relative) inside any nesting of lists and dicts."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            if math.isnan(float(a)) and math.isnan(float(b)):
                return True
            return a == b or abs(float(a) - float(b)) <= REL_TOL * max(abs(float(a)), abs(float(b)), 1e-12)
        except (TypeError, ValueError):
            return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def _strip(value, drop_hashes: bool):
    if isinstance(value, dict):
        return {k: _strip(v, drop_hashes) for k, v in value.items()
                if not is_volatile(k) and not (drop_hashes and k == _HASH_OF_FILE)}
    if isinstance(value, list):
        return [_strip(v, drop_hashes) for v in value]
    return value


def _products(listing: dict) -> dict:
    """``produced.json`` without file hashes, each file named relative to its runs folder (which may move)."""
    scale = listing.get("scale", "")
    files = [dict(f, file=f["file"].rsplit(f"{scale}/", 1)[-1]) for f in listing.get("files", [])]
    return _strip(dict(listing, files=files), drop_hashes=True)


def _csv_rows(text: str) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return rows
    keep = [i for i, name in enumerate(rows[0]) if not is_volatile(name)]
    return [[row[i] for i in keep if i < len(row)] for row in rows]


def same_content(a: Path, b: Path) -> bool:
    """``a`` and ``b`` hold the same result: bytes, or CSV/JSON values without volatile fields."""
    raw_a, raw_b = a.read_bytes(), b.read_bytes()
    if raw_a == raw_b:
        return True
    if a.suffix == ".json":
        try:
            if a.name == "produced.json":
                return _products(json.loads(raw_a)) == _products(json.loads(raw_b))
            return _close(_strip(json.loads(raw_a), False), _strip(json.loads(raw_b), False))
        except ValueError:
            return False
    if a.suffix == ".csv":
        return _csv_rows(raw_a.decode()) == _csv_rows(raw_b.decode())
    return False


def compare_runs(a: Path, b: Path) -> list[str]:
    """Lines naming each file that is missing on one side or differs in content (empty: reproducible)."""
    a, b = Path(a), Path(b)
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    lines = [f"only in {a}: {p}" for p in sorted(files_a - files_b)]
    lines += [f"only in {b}: {p}" for p in sorted(files_b - files_a)]
    lines += [f"differs: {p}" for p in sorted(files_a & files_b) if not same_content(a / p, b / p)]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m esmerge.regen.reproducibility RUNS_A RUNS_B", file=sys.stderr)
        return 2
    lines = compare_runs(Path(argv[0]), Path(argv[1]))
    for line in lines:
        print(line)
    n = sum(1 for p in Path(argv[0]).rglob("*") if p.is_file())
    print(f"{n - len(lines)} of {n} files reproduce ({len(lines)} differ)" if lines else
          f"all {n} files reproduce (timings aside)")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
