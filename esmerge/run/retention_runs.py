"""The models ``09_retention`` scores at each specialist seed, and its assist.

``seed_models`` is the one place that says which models are scored at which seed: at every seed
the base, the specialists, every merged model of ``06_merging`` at that seed and EMR as one merged
model; at the first seed also the budget-curve runs (the list the chapter's "Models" cell builds).
``fill_retention``, the chapter's assist (``esmerge.regen.assist``), walks it from the other end and
computes the cached (model, modality) entries the chapter will read.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from esmerge import scales
from esmerge.evaluate.retention_models import RetentionModel, retention_models, score_models
from esmerge.methods.emr import ONE_MODEL, emr_one_model
from esmerge.paths import run_dir
from esmerge.run.all_methods import curve_models, seed_folder
from esmerge.run.merge import MergeContext, build_context
from esmerge.scales import ScaleConfig
from esmerge.specialists.adapters import load_merged
from esmerge.specialists.captions import heldout_examples


def seed_models(config: ScaleConfig, seed: int, specialist_seeds: tuple[int, ...], merge_root: Path,
                avg_ft_benchmarks: tuple[str, ...], contexts: dict[int, MergeContext] | None = None,
                ) -> Iterator[tuple[int, MergeContext, dict[str, RetentionModel], list[str]]]:
    """``(specialist seed, its context, name -> model, notes)`` for each of ``specialist_seeds`` in order.

    ``specialist_seeds[0]`` is the first seed, whose budget-curve runs are scored too. Contexts in
    ``contexts`` (by seed) are used as they are; the others are built with ``build_context``, on the
    base of the first context built or given (one base in memory, loaded once).
    """
    first = specialist_seeds[0]
    contexts = dict(contexts or {})
    for s in specialist_seeds:
        base = next(iter(contexts.values())).base if contexts else None
        context = contexts.get(s) or build_context(config, seed, specialist_seed=s, base=base)
        contexts[s] = context
        folder = seed_folder(merge_root, s)
        extra = {ONE_MODEL: emr_one_model(load_merged(folder / "emr").adapter)}
        if s == first:
            budgets = config.merge_budgets
            for name in curve_models(budgets, tuple(b for b in avg_ft_benchmarks if b in budgets.curve_benchmarks)):
                extra[name] = load_merged(merge_root / "curves" / name).adapter
        models, notes = retention_models(context.specialists, folder, list(avg_ft_benchmarks), extra)
        yield s, context, models, notes


def fill_retention(scale: str, seed: int = 0, specialist_seeds: tuple[int, ...] | None = None,
                   n_retention: int | None = None, avg_ft_benchmarks: tuple[str, ...] = ("BindingDB", "GDSC2"),
                   batch_size: int = 8, device: str | None = None) -> int:
    """Compute ``09_retention``'s cached NLL entries from the far end: last seed, modality and model first.

    The defaults are the chapter's parameters (a test keeps them equal). Entries already cached
    are read, not recomputed. Returns the number of entries visited.
    """
    config = scales.get(scale, device=device)
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    seeds = tuple(specialist_seeds or config.specialist_seeds)
    n = n_retention or config.n_retention
    first = build_context(config, seed, specialist_seed=seeds[0])
    examples = {m: heldout_examples(m, config, n, seed) for m in first.specialists}
    runs = list(seed_models(config, seed, seeds, run_dir(scale, "06_merging"), tuple(avg_ft_benchmarks),
                            {seeds[0]: first}))
    visited = 0
    for s, context, models, _ in reversed(runs):
        for modality in reversed(list(examples)):
            for name in reversed(list(models)):
                score_models({name: models[name]}, first.base, context.specialists, {modality: examples[modality]},
                             config.train, batch_size=batch_size, progress=False)
                visited += 1
    return visited
