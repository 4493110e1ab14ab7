"""Summaries of the claims chapter: what this n can resolve, which verdicts are decided, where ours
and the paper's disagree, ES-Merging's ranks, and how the models' answers lean.

These read the registers of ``report.claims`` and the per-example results of the results chapter;
nothing here decides a verdict.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from esmerge.evaluate.stats import discordance, format_ci, paired_mde


def power_table(results: dict[str, dict[str, dict]], reference: str = "es", alpha: float = 0.05,
                power: float = 0.8) -> pd.DataFrame:
    """How small a paired difference from ``reference`` the mean over its benchmarks can resolve:
    per other row, the mean discordance rate (share of examples where exactly one of the two is
    right) and ``stats.paired_mde`` at ``alpha`` and ``power``. Columns ``method, n, discordance,
    mde``; empty when ``reference`` is missing."""
    if reference not in results:
        return pd.DataFrame(columns=["method", "n", "discordance", "mde"])
    ref = results[reference]
    rows = []
    for method, runs in results.items():
        if method == reference:
            continue
        shared = [b for b in ref if b in runs]
        if not shared:
            continue
        pair_a, pair_b = {b: ref[b] for b in shared}, {b: runs[b] for b in shared}
        rows.append({"method": method, "n": sum(len(ref[b]["y"]) for b in shared),
                     "discordance": float(np.mean([discordance(pair_a[b], pair_b[b]) for b in shared])),
                     "mde": paired_mde(pair_a, pair_b, alpha, power)})
    return pd.DataFrame(rows, columns=["method", "n", "discordance", "mde"])


def decided_verdicts(register: pd.DataFrame, power: pd.DataFrame | None = None) -> list[str]:
    """One line per register row whose verdict is neither inconclusive nor not measured; when there
    is none, why: the claims' margins beside the smallest difference this n resolves (``power``,
    a ``power_table``), with the numbers."""
    decided = register[~register["verdict"].str.startswith(("inconclusive", "not measured"))]
    if len(decided):
        return [f"{len(decided)} of {len(register)} verdicts are not inconclusive:"] + [
            f"- {r['claim']}: {format_ci(r['ours'], r['lo'], r['hi'], signed=True)} -> {r['verdict']}"
            for _, r in decided.iterrows()]
    measured = register.dropna(subset=["ours"])
    lines = [f"No verdict of the {len(register)} is decided at this n."]
    if len(measured):
        lines.append(f"The measured margins lie between {measured['ours'].min():+.1f} and "
                     f"{measured['ours'].max():+.1f} points; "
                     f"{measured['verdict'].str.contains('identical').sum()} compare models that answer "
                     "identically on every example.")
    if power is not None and len(power):
        lines.append(f"Paired differences from ES-Merging this n resolves (80 % power, alpha 0.05): "
                     f"{power['mde'].min():.1f}-{power['mde'].max():.1f} points (discordance "
                     f"{power['discordance'].min():.0%}-{power['discordance'].max():.0%}).")
    return lines


def disagreements(mechanism: pd.DataFrame, register: pd.DataFrame) -> list[str]:
    """One line per claim that does not hold or is not supported here, then one per claim whose
    margin is already <= 0 in the paper's own numbers, then a count of the verdicts."""
    lines = [f"- {r['source']}: {r['claim']} -> does not hold here ({r['evidence']})"
             for _, r in mechanism[mechanism["verdict"] != "holds"].iterrows()]
    for _, r in register[~register["verdict"].str.startswith("supported")].iterrows():
        ours = "not measured" if pd.isna(r["ours"]) else format_ci(r["ours"], r["lo"], r["hi"], signed=True)
        paper = "not a claim of the paper" if pd.isna(r["paper"]) else f"paper margin {r['paper']:+.1f} pts"
        lines.append(f"- {r['source']}: {r['claim']}: {paper}; ours {ours} -> {r['verdict']}")
    lines += [f"- note: the paper's own numbers give this claim a margin of {r['paper']:+.1f} pts: {r['claim']}"
              for _, r in register[register["paper"] <= 0].iterrows()]
    verdicts = register["verdict"]
    lines.append(f"\nRepresentation: {(mechanism['verdict'] == 'holds').sum()} of {len(mechanism)} hold. "
                 f"Accuracy: {verdicts.str.startswith('supported').sum()} of {len(register)} supported, "
                 f"{(verdicts == 'not supported').sum()} contradicted, "
                 f"{verdicts.str.startswith('inconclusive').sum()} inconclusive, "
                 f"{(verdicts == 'not measured').sum()} not measured.")
    return lines


def es_ranks(tables: list[pd.DataFrame], method: str = "es") -> pd.DataFrame:
    """``method``'s rank among the evaluated models on each group-average accuracy, ours and the paper's.

    ``tables``: ``results_table`` outputs (Tables 1-2). Rank 1 is best; ``paper_rank`` is NaN where
    the paper has no value (a partial group). Columns ``group, rank, of, paper_rank, paper_of``.
    """
    rows = pd.concat(tables)
    rows = rows[(rows["metric"] == "accuracy") & rows["dataset"].str.startswith("Avg.")]
    ours = rows.pivot(index="method", columns="dataset", values="ours").rank(ascending=False)
    paper = rows.dropna(subset=["paper"]).pivot(index="method", columns="dataset", values="paper").rank(ascending=False)
    out = []
    for col in ours.columns if method in ours.index else []:
        has_paper = col in paper.columns and method in paper.index
        out.append({"group": col, "rank": ours.loc[method, col], "of": int(ours[col].notna().sum()),
                    "paper_rank": paper.loc[method, col] if has_paper else np.nan,
                    "paper_of": int(paper[col].notna().sum()) if has_paper else 0})
    return pd.DataFrame(out, columns=["group", "rank", "of", "paper_rank", "paper_of"])


def answer_bias(results: dict[str, dict[str, dict]]) -> dict:
    """How one-sided the answers are: per model the % of positive answers and the mean AUROC over
    benchmarks; the % of positive examples; the median width of a per-benchmark accuracy CI."""
    # pred == 1, not mean(pred): a generated reply without a valid answer is stored as -1
    return {"positive_answers": {m: np.mean([np.mean(np.asarray(r["pred"]) == 1) for r in runs.values()]) * 100
                                 for m, runs in results.items()},
            "positive_rate": np.mean([np.mean(r["y"]) for r in next(iter(results.values())).values()]) * 100,
            "auroc": {m: np.nanmean([r["auroc"] for r in runs.values()]) for m, runs in results.items()},
            "median_ci_width": float(np.median([r["accuracy_ci"][1] - r["accuracy_ci"][0]
                                                for runs in results.values() for r in runs.values()]))}


def resolution_sentence(median_ci_width: float, power: pd.DataFrame, caption: str) -> str:
    """What differences this n resolves, from both the per-benchmark CIs and the paired power table.

    A per-benchmark accuracy's CI is wide, but claims compare two models on the same examples and
    average over benchmarks, which resolves far smaller differences (``power_table``'s ``mde``).

    >>> power = pd.DataFrame({"method": ["avg", "ties"], "mde": [3.2, 7.9]})
    >>> print(resolution_sentence(31.0, power, "n=32"))  # doctest: +NORMALIZE_WHITESPACE
    A single benchmark's accuracy has a median 95% CI width of 31 points (n=32); a paired difference
    between ES-Merging and another model on the mean over the benchmarks is resolved (80% power, alpha 0.05)
    from 3.2 to 7.9 points, depending on how often the two disagree.
    """
    text = f"A single benchmark's accuracy has a median 95% CI width of {median_ci_width:.0f} points ({caption})"
    if power is None or not len(power):
        return text + "."
    return (f"{text}; a paired difference between ES-Merging and another model on the mean over the "
            f"benchmarks is resolved (80% power, alpha 0.05) from {power['mde'].min():.1f} to "
            f"{power['mde'].max():.1f} points, depending on how often the two disagree.")
