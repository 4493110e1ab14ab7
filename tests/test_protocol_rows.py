"""Protocol rows (where a decision rule, shot count or threshold rows may be chosen) never overlap the
evaluation rows, and drawing them changes no scale's evaluation rows."""
from __future__ import annotations

import hashlib
import importlib.util
from argparse import Namespace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_data import needs_data  # skips when the upstream data is not here

from esmerge import scales
from esmerge.data import benchmark_pools, benchmarks

SIZES = {name: (scales.get(name).evaluation.n_eval, scales.get(name).evaluation.n_context) for name in scales.NAMES}


def _ids(df: pd.DataFrame) -> set:
    return set(df.index)


# --------------------------------------------------------------------------- synthetic frames
def test_protocol_pool_never_overlaps_the_evaluation_rows_on_random_sizes():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(8, 80))
        df = pd.DataFrame({"y": (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)},
                          index=rng.permutation(1000)[:n])
        if df["y"].nunique() < 2:
            continue
        n_eval, n_context = int(rng.integers(0, n // 2)), int(rng.integers(1, n // 2))
        n_protocol = int(rng.integers(0, n))
        ev, ctx = benchmark_pools.split_pools(df, n_eval, n_context, seed=trial)
        try:
            prot = benchmark_pools.protocol_pool(df, n_protocol, n_eval, n_context, seed=trial)
        except ValueError as err:
            assert n_protocol > len(df) - n_eval - n_context and "exceeds" in str(err)
            continue
        assert len(prot) == n_protocol and not prot.index.duplicated().any()
        assert not _ids(prot) & _ids(ev), trial
        if prot.attrs["protocol_source"] == "held-out":
            assert not _ids(prot) & _ids(ctx), trial
        else:
            assert prot.attrs["protocol_source"] == "context" and _ids(prot) <= _ids(ctx), trial
        # the draw of split_pools is untouched by asking for protocol rows
        ev2, ctx2 = benchmark_pools.split_pools(df, n_eval, n_context, seed=trial)
        assert ev2.index.equals(ev.index) and ctx2.index.equals(ctx.index)


def test_held_out_protocol_rows_do_not_depend_on_the_evaluation_sizes_and_are_stratified():
    df = pd.DataFrame({"y": [0] * 70 + [1] * 30})
    a = benchmark_pools.protocol_pool(df, 10, 20, 40, seed=5)
    b = benchmark_pools.protocol_pool(df, 10, 5, 60, seed=5)
    assert a.attrs["protocol_source"] == b.attrs["protocol_source"] == "held-out"
    assert sorted(a.index) == sorted(b.index)
    assert int(a["y"].sum()) == 3
    # too many for the rows left: from the context pool, still none an evaluation row
    tight = benchmark_pools.protocol_pool(df, 10, 40, 55, seed=5)
    ev, ctx = benchmark_pools.split_pools(df, 40, 55, seed=5)
    assert tight.attrs["protocol_source"] == "context" and _ids(tight) <= _ids(ctx) and not _ids(tight) & _ids(ev)
    with pytest.raises(ValueError, match="n_protocol = 60 exceeds"):
        benchmark_pools.protocol_pool(df, 60, 40, 55, seed=5)


# --------------------------------------------------------------------------- the 13 benchmarks
@needs_data
@pytest.mark.parametrize("name", benchmarks.BENCHMARK_NAMES)
def test_no_evaluation_row_is_a_protocol_row(name):
    df = benchmarks.load_benchmark(name)
    n_eval, n_context = SIZES["cpu"]
    ev, ctx = benchmark_pools.split_pools(df, n_eval, n_context, seed=0)
    prot = benchmark_pools.protocol_rows(name, scales.get("cpu"))  # the cpu scale's, benchmark_pools.PROTOCOL_ROWS rows
    assert len(prot) == benchmark_pools.PROTOCOL_ROWS
    assert not _ids(prot) & _ids(ev), f"{name}: {sorted(_ids(prot) & _ids(ev))[:5]} are evaluation rows"
    assert not benchmarks.instance_keys(prot).isin(benchmarks.instance_keys(ev)).any()
    # at the cpu sizes every benchmark, the CYP substrate sets included, has them beyond its pools
    assert prot.attrs["protocol_source"] == "held-out" and not _ids(prot) & _ids(ctx)
    # and the same rows stay clear of the other scales' evaluation rows (same seed)
    for scale in ("smoke", "paper"):
        other_ev, _ = benchmark_pools.split_pools(df, *SIZES[scale], seed=0)
        assert not _ids(prot) & _ids(other_ev), scale
        assert sorted(benchmark_pools.protocol_rows(name, scales.get(scale)).index) == sorted(prot.index)
    # more rows than the small CYP substrate sets hold beyond their pools: from the context pool, never eval
    big = benchmark_pools.protocol_rows(name, scales.get("cpu"), n_protocol=150)
    assert not _ids(big) & _ids(ev)
    if len(df) < 1000:
        assert big.attrs["protocol_source"] == "context" and _ids(big) <= _ids(ctx)


# the evaluation and context rows of every scale at seed 0, before the protocol split existed
POOL_DIGESTS = {"smoke": "a41161f108b60f63", "cpu": "eba5a8b6427f5572", "paper": "15959fa609fa1f81"}


@needs_data
@pytest.mark.parametrize("scale", scales.NAMES)
def test_every_scale_keeps_its_evaluation_rows(scale):
    digest = hashlib.sha256()
    for name in benchmarks.BENCHMARK_NAMES:
        ev, ctx = benchmark_pools.split_pools(benchmarks.load_benchmark(name), *SIZES[scale], seed=0)
        digest.update((name + repr(list(map(int, ev.index))) + repr(list(map(int, ctx.index)))).encode())
    assert digest.hexdigest()[:16] == POOL_DIGESTS[scale]


def _bench_shots():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_shots.py"
    spec = importlib.util.spec_from_file_location("bench_shots", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_data
@pytest.mark.parametrize("name, n_protocol, source", [("Human", 32, "held-out"),
                                                      ("CYP2D6-substrate", 32, "held-out"),
                                                      ("CYP2D6-substrate", 150, "context")])
def test_bench_shots_scores_protocol_rows_only(name, n_protocol, source):
    """benchmarks/bench_shots.py, which chose the cpu decision rule and shot count, queries the
    protocol rows, and retrieves their shots and fits its threshold on context rows that are not
    among them."""
    module = _bench_shots()
    args = Namespace(n_protocol=n_protocol, scale="cpu", seed=0)
    queries, context, got = module.protocol_pools(name, args)
    ev, ctx = benchmark_pools.split_pools(benchmarks.load_benchmark(name), *SIZES["cpu"], seed=0)
    assert got == source
    assert sorted(queries.index) == sorted(benchmark_pools.protocol_rows(name, scales.get("cpu"), n_protocol).index)
    assert not _ids(queries) & _ids(ev) and not _ids(queries) & _ids(context)
    assert _ids(context) == _ids(ctx) - _ids(queries)
