"""The retrieval-only yardstick (``esmerge.evaluate.yardstick``) beside the paper's ES-Merging numbers."""
from __future__ import annotations

import numpy as np
import pandas as pd

from esmerge.data import benchmarks
from esmerge.evaluate.stats import paired_bootstrap
from esmerge.report.paper_tables import paper_results


# --------------------------------------------------------------------------- beside the paper
def paper_verdict(lo: float, hi: float, paper: float) -> str:
    """Where the paper's value falls against our CI ``[lo, hi]`` (the paper gives no CI).

    >>> paper_verdict(70.0, 80.0, 66.0), paper_verdict(70.0, 80.0, 94.1), paper_verdict(70.0, 80.0, 74.5)
    ('above', 'below', 'within CI')
    >>> paper_verdict(70.0, 80.0, float("nan"))
    'no paper value'
    """
    if paper is None or not np.isfinite(paper):
        return "no paper value"
    return "above" if lo > paper else "below" if hi < paper else "within CI"


def _paper_values(paper_method: str, metric: str) -> dict[str, float]:
    paper = paper_results()
    sub = paper[(paper["method"] == paper_method) & (paper["metric"] == metric)
                & paper["table"].isin(("Table 1", "Table 2"))]
    return dict(zip(sub["dataset"], sub["value"]))


def verdict_table(runs: dict[str, dict[str, dict]], paper_method: str = "es", metric: str = "accuracy",
                  paper: dict[str, float] | None = None, n_resamples: int = 1000, seed: int = 0,
                  paper_label: str = "ES-Merging") -> pd.DataFrame:
    """The yardstick beside the paper's ``paper_method`` (default ES-Merging), one row per dataset,
    per group average and for the mean over all benchmarks present.

    ``runs`` is ``{"majority": {benchmark: result}, "knn-shots": {benchmark: result}}``; averages
    are means of per-dataset values with ``paired_bootstrap`` CIs. ``paper`` maps a paper
    dataset name (``benchmarks.spec(b).paper_dataset``, ``"Avg. <group>"``) to its value; by default it
    is read from ``paper_results.csv``. The mean over all 13 is the mean of the paper's 13 values.
    ``verdict`` reads "k-NN vote <above|below|within CI of> the paper's <paper_label>".
    """
    paper = _paper_values(paper_method, metric) if paper is None else paper
    knn, majority = runs["knn-shots"], runs["majority"]
    units = [(benchmarks.spec(b).paper_dataset, [b]) for b in benchmarks.BENCHMARK_NAMES if b in knn]
    units += [(f"Avg. {g}", [b for b in benches if b in knn]) for g, benches in benchmarks.GROUPS.items()
              if all(b in knn for b in benches)]
    if all(b in knn for b in benchmarks.BENCHMARK_NAMES):
        units.append(("Mean of 13", list(benchmarks.BENCHMARK_NAMES)))
        values = [paper.get(benchmarks.spec(b).paper_dataset, np.nan) for b in benchmarks.BENCHMARK_NAMES]
        paper = {**paper, "Mean of 13": float(np.mean(values))}
    rows = []
    for name, benches in units:
        row = {"dataset": name, "benchmarks": len(benches),
               "n_eval": sum(knn[b]["n"] for b in benches),
               "n_context": sum(knn[b].get("n_context", np.nan) for b in benches)}
        for label, res in (("majority", majority), ("knn", knn)):
            if len(benches) == 1:
                r = res[benches[0]]
                point, (lo, hi) = r[metric], r[f"{metric}_ci"]
            else:
                point, lo, hi = paired_bootstrap({b: res[b] for b in benches}, None, metric, n_resamples, seed)
            row.update({label: point, f"{label}_lo": lo, f"{label}_hi": hi})
        row["paper"] = paper.get(name, np.nan)
        where = paper_verdict(row["knn_lo"], row["knn_hi"], row["paper"])
        row["verdict"] = where if where == "no paper value" else (
            f"k-NN vote {'within CI of' if where == 'within CI' else where} the paper's {paper_label}")
        rows.append(row)
    return pd.DataFrame(rows)
