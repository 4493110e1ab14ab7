"""Every merging method at one set of specialists, at the scale's budgets, and the budget curves.

Chapter 6 merges the seed-0 specialists and draws them; the seed replicates (``ScaleConfig.
specialist_seeds``) are merged by the same call into ``seed_folder(root, s)``, so that every method
exists at every seed. The baselines that search (AdaMerging, Avg+FT) also run at the other budgets of
``MergeBudgets.adamerging_curve`` / ``ft_curve_examples`` (first seed only), into ``root/curves/``.
Every merge is saved with its settings and skipped on a rerun with the same settings
(``merge.merge_once``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from esmerge import scales
from esmerge.data.benchmarks import BENCHMARK_NAMES
from esmerge.evaluate.sweep import default_config
from esmerge.paths import MERGE_ROOT_EXTRAS, run_dir
from esmerge.report.budget_curves import curve_name
from esmerge.run import baseline_inputs
from esmerge.run.merge import MergeContext, build_context, merge_once
from esmerge.scales import MergeBudgets
from esmerge.specialists.adapters import Adapter

TRAINING_FREE = ("avg", "ties", "emr", "pcb", "consensus", "graft")
ES_VARIANTS = ("es", "es-layer", "es-element")


def seed_folder(root: str | Path, specialist_seed: int) -> Path:
    """Where the merges of the specialists trained at ``specialist_seed`` live under ``root``.

    >>> seed_folder("runs/cpu/06_merging", 0).as_posix(), seed_folder("runs/cpu/06_merging", 2).as_posix()
    ('runs/cpu/06_merging', 'runs/cpu/06_merging/seeds/seed2')
    """
    return Path(root) if specialist_seed == 0 else Path(root) / MERGE_ROOT_EXTRAS[0] / f"seed{specialist_seed}"


def curve_budgets(budgets: MergeBudgets, method: str) -> tuple[int, ...]:
    """The budgets of ``method``'s curve other than the one it runs at (that run is the method itself).

    >>> curve_budgets(MergeBudgets(adamerging_steps=10, adamerging_curve=(3, 10, 30)), "adamerging")
    (3, 30)
    """
    if method == "adamerging":
        return tuple(b for b in budgets.adamerging_curve if b != budgets.adamerging_steps)
    return tuple(b for b in budgets.ft_curve_examples if b != budgets.ft_examples)


def curve_models(budgets: MergeBudgets, benchmarks: tuple[str, ...] = ()) -> list[str]:
    """The budget-curve runs' names under ``curves/``: ``adamerging@<steps>``, and ``avg-ft@<rows>/<benchmark>``
    for each of ``benchmarks`` (default none: Avg+FT's folders, one per budget, ``avg-ft@<rows>``).

    >>> curve_models(MergeBudgets(adamerging_steps=10, adamerging_curve=(3,), ft_curve_examples=(4,)), ("X",))
    ['adamerging@3', 'avg-ft@4/X']
    """
    names = [curve_name("adamerging", b) for b in curve_budgets(budgets, "adamerging")]
    for n in curve_budgets(budgets, "avg-ft"):
        names += [f"{curve_name('avg-ft', n)}/{b}" for b in benchmarks] if benchmarks else [curve_name("avg-ft", n)]
    return names


@dataclass
class Merges:
    """What ``merge_every_method`` made: one adapter and ``esmerge.json`` per method, and Avg+FT's
    per-benchmark ``esmerge.json`` (its adapters are one per benchmark, in ``out/avg-ft/<benchmark>``)."""

    adapters: dict[str, Adapter] = field(default_factory=dict)
    metas: dict[str, dict] = field(default_factory=dict)
    finetune: dict[str, dict] = field(default_factory=dict)


def method_steps(context: MergeContext, out: str | Path, budgets: MergeBudgets, eval_config, seed: int = 0,
                 es_variants: tuple[str, ...] = ES_VARIANTS) -> list[tuple[str, Callable[[], tuple[Adapter, dict]]]]:
    """``merge_every_method``'s merges as ``(name, run)`` steps, in its order; each step sets up its own inputs.

    ``name`` is the method, or ``avg-ft/<benchmark>`` for Avg+FT's per-benchmark adapters; ``run()``
    merges (or reads the finished merge) into ``out/<name>`` and returns ``(adapter, esmerge.json)``.
    The steps are independent, so they may run in any order (the seed-replicate assist runs them
    backwards).
    """
    out = Path(out)
    chosen = list(budgets.benchmarks or BENCHMARK_NAMES)

    def plain(name: str, **hparams):
        return lambda: merge_once(name, out / name, context, **hparams)

    def adamerging():
        context.extras.update(baseline_inputs.adamerging_extras(
            context.base, context.specialists, chosen, budgets.adamerging_prompts_per_benchmark,
            budgets.adamerging_batch, eval_config, seed))
        return merge_once("adamerging", out / "adamerging", context, steps=budgets.adamerging_steps, progress=False)

    def finetune(benchmark: str):
        def run():
            context.extras.update(baseline_inputs.finetune_extras(
                context.base, context.specialists, benchmark, budgets.ft_examples, budgets.ft_batch, eval_config,
                seed))
            return merge_once("avg-ft", out / "avg-ft" / benchmark, context, epochs=budgets.ft_epochs, progress=False)
        return run

    return [*((name, plain(name)) for name in TRAINING_FREE),
            ("ls-merge", plain("ls-merge", epochs=budgets.lsmerge_epochs, seed=seed, progress=False)),
            ("adamerging", adamerging),
            *((f"avg-ft/{benchmark}", finetune(benchmark)) for benchmark in chosen),
            *((name, plain(name)) for name in es_variants)]


def merge_every_method(context: MergeContext, out: str | Path, budgets: MergeBudgets, eval_config, seed: int = 0,
                       es_variants: tuple[str, ...] = ES_VARIANTS) -> Merges:
    """Merge ``context``'s specialists by every method into ``out/<method>``.

    The training-free methods at their declared defaults; LS-Merge, AdaMerging and Avg+FT at
    ``budgets`` (AdaMerging on unlabeled evaluation prompts of ``budgets.benchmarks``, Avg+FT one
    adapter per benchmark on rows of its in-context pool, ``baseline_inputs``); then
    ``es_variants``. ``seed`` seeds the baselines' data and LS-Merge.
    """
    done = Merges()
    for name, run in method_steps(context, out, budgets, eval_config, seed, es_variants):
        adapter, meta = run()
        if name.startswith("avg-ft/"):
            done.finetune[name.split("/", 1)[1]] = meta
        else:
            done.adapters[name], done.metas[name] = adapter, meta
    return done


def merge_budget_curves(context: MergeContext, out: str | Path, budgets: MergeBudgets, eval_config,
                        seed: int = 0) -> dict[str, dict]:
    """AdaMerging at each of ``budgets.adamerging_curve`` steps and Avg+FT at each of
    ``budgets.ft_curve_examples`` training rows (one epoch) on ``budgets.curve_benchmarks``, into
    ``out/curves/<curve_name>[/<benchmark>]``. Returns ``curve_name -> esmerge.json`` (Avg+FT:
    ``curve_name/benchmark``). Reuses the AdaMerging prompts ``merge_every_method`` put in
    ``context.extras``, or builds them."""
    out = Path(out) / MERGE_ROOT_EXTRAS[1]
    metas = {}
    if budgets.adamerging_curve and "entropy_objective" not in context.extras:
        context.extras.update(baseline_inputs.adamerging_extras(
            context.base, context.specialists, list(budgets.benchmarks or BENCHMARK_NAMES),
            budgets.adamerging_prompts_per_benchmark, budgets.adamerging_batch, eval_config, seed))
    for steps in curve_budgets(budgets, "adamerging"):
        name = curve_name("adamerging", steps)
        metas[name] = merge_once("adamerging", out / name, context, steps=steps, progress=False)[1]
    for n in curve_budgets(budgets, "avg-ft"):
        name = curve_name("avg-ft", n)
        for benchmark in budgets.curve_benchmarks:
            context.extras.update(baseline_inputs.finetune_extras(
                context.base, context.specialists, benchmark, n, budgets.ft_batch, eval_config, seed))
            metas[f"{name}/{benchmark}"] = merge_once("avg-ft", out / name / benchmark, context,
                                                      epochs=budgets.ft_epochs, progress=False)[1]
    return metas


def fill_seed_merges(scale: str, seed: int = 0, specialist_seeds: tuple[int, ...] | None = None,
                     budget_overrides: dict | None = None, device: str | None = None) -> int:
    """``06_merging``'s assist: merge the seed replicates from the far end (last seed, last method first).

    The chapter merges the first seed, its budget curves, then each other seed in order; this walks
    the other seeds' ``method_steps`` backwards, so the two meet in the middle (``merge_once`` keeps
    one copy if both finish the same merge). The defaults are the chapter's parameters (a test keeps
    them equal). Returns the number of merges visited.
    """
    config = scales.get(scale, device=device)
    budgets = replace(config.merge_budgets, **(budget_overrides or {}))
    eval_config = default_config(config)
    out = run_dir(scale, "06_merging")
    visited = 0
    torch.set_num_threads(1)
    for s in reversed(tuple(specialist_seeds or config.specialist_seeds)[1:]):
        torch.manual_seed(seed)
        context = build_context(config, seed, specialist_seed=s)
        for _, run in reversed(method_steps(context, seed_folder(out, s), budgets, eval_config, seed)):
            run()
            visited += 1
    return visited
