"""benchmarks/bench_bf16.py: records of disjoint query ranges combine into one (hand-made records)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_bf16.py"
    spec = importlib.util.spec_from_file_location("bench_bf16", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(queries, per_bench, seconds, tokens, disagreements):
    n = sum(m["n"] for b in per_bench.values() for m in b.values())
    agree = sum(m["agree"] for b in per_bench.values() for m in b.values())
    return {"scale": "cpu", "cpu": "x", "torch": "t", "models": {}, "queries": queries, "n_prompts": n,
            "n_agree": agree, "seconds": seconds, "tokens": tokens, "per_benchmark": per_bench,
            "disagreements": disagreements, "threads": 1, "budget_s": 10.0, "stopped_at_budget": True,
            "load_average_start": [1, 1, 1], "load_average_end": [2, 2, 2]}


def test_combine_sums_counts_seconds_and_keeps_every_disagreement(bench):
    flip = {"benchmark": "Human", "model": "average", "example_id": "7", "margin_fp32": -1e-4, "margin_bf16": 0.02}
    a = _record([0, 8], {"Human": {"base": {"n": 8, "agree": 8, "max_abs_score_diff": 0.1},
                                   "average": {"n": 8, "agree": 7, "max_abs_score_diff": 0.2}}},
                {"fp32": 30.0, "bf16": 40.0}, 1000, [flip])
    b = _record([8, 16], {"Human": {"base": {"n": 8, "agree": 8, "max_abs_score_diff": 0.3}},
                          "CYP1A2": {"base": {"n": 4, "agree": 4, "max_abs_score_diff": 0.05}}},
                {"fp32": 10.0, "bf16": 20.0}, 500, [])
    out = bench.combine([a, b])
    assert (out["n_prompts"], out["n_agree"]) == (28, 27)
    assert out["agreement_percent"] == pytest.approx(100 * 27 / 28)
    assert out["seconds"] == {"fp32": 40.0, "bf16": 60.0}
    assert out["speed_ratio_fp32_over_bf16"] == pytest.approx(40 / 60)
    assert out["tokens_per_second"]["bf16"] == pytest.approx(1500 / 60)
    assert out["per_benchmark"]["Human"]["base"] == {"n": 16, "agree": 16, "max_abs_score_diff": 0.3}
    assert out["per_benchmark"]["CYP1A2"]["base"]["n"] == 4
    assert out["disagreements"] == [flip]
    assert [r["queries"] for r in out["runs"]] == [[0, 8], [8, 16]]


def test_average_adapter_is_the_element_wise_mean(bench):
    from esmerge.specialists.adapters import Adapter

    one = Adapter({"k": torch.tensor([1.0, 2.0])}, {"r": 8}, "a")
    two = Adapter({"k": torch.tensor([3.0, 6.0])}, {"r": 8}, "b")
    assert torch.equal(bench.average_adapter([one, two]).state["k"], torch.tensor([2.0, 4.0]))
