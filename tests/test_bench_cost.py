"""benchmarks/bench_cost.py (paper Table 4) at smoke scale: one real run, the JSON schema and its arithmetic."""
import importlib.util
import json
from pathlib import Path

import pytest
from test_data import needs_data  # skips when the upstream data are not here

from esmerge.errors import OutputExistsError


def _bench_cost():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cost.py"
    spec = importlib.util.spec_from_file_location("bench_cost", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_data
def test_table4_cost_at_smoke_writes_a_consistent_record(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))
    bench = _bench_cost()
    out = tmp_path / "table4_cost_smoke.json"
    assert bench.main(["--scale", "smoke", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record["methods"]) == {"es", "adamerging", "avg-ft"}
    assert record["budget"]["probe_k"] == 8 and record["budget"]["benchmarks"] == ["GDSC2"]
    for name, row in record["methods"].items():
        assert row["flops"] > 0 and row["wall_s"] > 0, name
        assert row["flops_at_paper_budget"] == pytest.approx(row["flops"] * row["paper_budget_passes"] / row["passes"])
        assert row["paper_table4"] == bench.PAPER_FLOPS[name]
    es, ada = record["methods"]["es"], record["methods"]["adamerging"]
    assert es["passes"] == 8 and es["paper_budget_passes"] == 110
    assert ada["passes"] == 2 and ada["paper_budget_passes"] == 500
    ratios = record["ratios"]["adamerging/es"]
    assert ratios["flops"] == pytest.approx(ada["flops"] / es["flops"])
    assert ratios["paper"] == pytest.approx(493_694 / 149_807) and round(ratios["paper"], 1) == 3.3
    assert round(record["ratios"]["avg-ft/es"]["paper"], 1) == 5.9
    printed = capsys.readouterr().out
    assert "ES-Merging" in printed and "paper 3.3x" in printed and "paper 5.9x" in printed

    # An existing result is refused (before any work through the CLI, and by the writer).
    with pytest.raises(SystemExit):
        bench.main(["--scale", "smoke", "--out", str(out)])
    with pytest.raises(OutputExistsError, match="--force"):
        bench.write(record, out)
    assert bench.write(record, out, force=True) == out
