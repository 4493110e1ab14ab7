"""Models named on the command line: ``base``, ``specialist-<modality>`` or a merged-model folder.

What ``esmerge evaluate`` does: every name is checked before a model is loaded, then each model is
evaluated on the chosen benchmarks with the scale's settings (results cached as in ``run.evaluate``)
and one row per (model, benchmark) is returned.

>>> model_kind("base"), model_kind("specialist-cell")
('base', 'specialist')
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from esmerge.data.benchmarks import BENCHMARK_NAMES, load_benchmark
from esmerge.errors import UsageError
from esmerge.evaluate.models import ModelUnderTest
from esmerge.evaluate.sweep import EvalConfig, EvalSession, check_pool_sizes, default_benchmarks, evaluate_all, summary
from esmerge.methods.emr import emr_adapter_for_benchmark
from esmerge.run.merge import build_context
from esmerge.scales import ScaleConfig
from esmerge.specialists.adapters import is_merged, load_merged
from esmerge.specialists.encoders import MODALITIES
from esmerge.specialists.load import projectors_of

SPECIALIST_PREFIX = "specialist-"


def model_kind(name: str) -> str:
    """``base``, ``specialist`` or ``merged`` (a finished merged-model folder); ``UsageError`` otherwise."""
    if name == "base":
        return "base"
    if name.startswith(SPECIALIST_PREFIX) and name[len(SPECIALIST_PREFIX):] in MODALITIES:
        return "specialist"
    if is_merged(Path(name)):
        return "merged"
    raise UsageError(f"--model {name!r}: not 'base', 'specialist-<molecule|protein|cell>' or a finished "
                     "merged-model folder (one with esmerge.json, as `esmerge merge --out` writes)")


def evaluate_by_name(config: ScaleConfig, names: list[str], benchmarks: list[str] | None = None, seed: int = 0,
                     out_dir: Path | None = None, **overrides) -> pd.DataFrame:
    """Evaluate the models ``names`` at scale ``config``; ``overrides`` are ``EvalConfig`` fields (``n_eval``, ...).

    Returns ``run.summary`` rows (method, benchmark, n, seed, accuracy with its CI, ...).
    """
    kinds = {name: model_kind(name) for name in names}
    unknown = sorted(set(benchmarks or []) - set(BENCHMARK_NAMES))
    if unknown:
        raise UsageError(f"--benchmarks: unknown {', '.join(unknown)}; choose from {', '.join(BENCHMARK_NAMES)}")
    bad = {k: v for k, v in overrides.items() if v is not None and isinstance(v, int) and v < 1}
    if bad:
        raise UsageError(f"{', '.join(f'{k}={v}' for k, v in bad.items())}: must be at least 1")
    eval_config = EvalConfig.for_scale(config, seed=seed, **{k: v for k, v in overrides.items() if v is not None})
    benchmarks = list(benchmarks or default_benchmarks(config))
    for benchmark in benchmarks:  # before any model loads (the tables are read again, from memory, later)
        check_pool_sizes(benchmark, eval_config, len(load_benchmark(benchmark)))
    context = build_context(config, seed)
    base, projectors = context.base, projectors_of(context.specialists)
    session, results = EvalSession(), {}
    for name, kind in kinds.items():
        if kind == "base":
            model = ModelUnderTest.base_only(base)
        elif kind == "specialist":
            model = ModelUnderTest.specialist(base, context.specialists[name[len(SPECIALIST_PREFIX):]])
        else:
            merged = load_merged(name)
            label = merged.meta.get("method", Path(name).name)
            if label == "emr":  # one task-specific modulation per benchmark, as in the results chapter
                model = ModelUnderTest.emr(base, lambda b, a=merged.adapter: emr_adapter_for_benchmark(a, b),
                                           projectors, label)
            else:
                model = ModelUnderTest.merged(base, merged.adapter, projectors, label)
        results[model.name] = evaluate_all(model, benchmarks, eval_config, out_dir, session=session)
    return summary(results)
