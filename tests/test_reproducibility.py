"""compare_runs: timings may differ between two runs, nothing else may."""
from __future__ import annotations

import json

from esmerge.regen.reproducibility import compare_runs, main


def _write(root, files: dict):
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())


def _run(root, wall="0.1", acc="61.5", seconds=1.0, weights=b"\x00\x01", where="runs"):
    _write(root, {
        "06_merging/methods.csv": f"method,wall_s,accuracy\navg,{wall},{acc}\n",
        "07_results/evals/base/x.json": json.dumps({"accuracy": float(acc), "seconds": seconds,
                                                     "cost": {"wall_seconds": seconds, "flops": 7}}),
        "06_merging/avg/adapter_model.safetensors": weights,
        "produced.json": json.dumps({"scale": "smoke", "files": [
            {"file": f"{where}/smoke/06_merging/methods.csv", "sha256": wall, "kind": "table"}]}),
    })


def test_runs_that_differ_only_in_timings_reproduce(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b", wall="0.9", seconds=5.0, where="/elsewhere/runs")
    assert compare_runs(tmp_path / "a", tmp_path / "b") == []
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0


def test_a_changed_result_a_changed_adapter_and_a_missing_file_are_named(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b", acc="62.0", weights=b"\x00\x02")
    _write(tmp_path / "b", {"08_claims/extra.csv": "x\n1\n"})
    lines = compare_runs(tmp_path / "a", tmp_path / "b")
    assert sorted(lines) == sorted([
        f"only in {tmp_path / 'b'}: 08_claims/extra.csv",
        "differs: 06_merging/avg/adapter_model.safetensors",
        "differs: 06_merging/methods.csv",
        "differs: 07_results/evals/base/x.json",
    ])
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1


def test_a_non_timing_field_in_produced_json_counts(tmp_path):
    _run(tmp_path / "a")
    _run(tmp_path / "b")
    listing = json.loads((tmp_path / "b" / "produced.json").read_text())
    listing["files"][0]["kind"] = "figure"
    (tmp_path / "b" / "produced.json").write_text(json.dumps(listing))
    assert compare_runs(tmp_path / "a", tmp_path / "b") == ["differs: produced.json"]
