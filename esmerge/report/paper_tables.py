"""The paper's tables from our results: Tables 1-3 and 8 beside ``paper_results.csv`` (Table 4: ``cost``).

``results`` everywhere is ``{method: {benchmark: evaluate(...) result}}``. The paper's numbers are
read in place from ``../shared/reference`` (``$ESMERGE_REFERENCE_DIR``) and never copied here.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from esmerge.data.benchmarks import BENCHMARKS, GROUPS
from esmerge.evaluate.stats import format_ci, paired_bootstrap
from esmerge.paths import REPO_ROOT

TABLE_GROUPS = {"Table 1": ("Mol-Prot", "Mol-Cell"), "Table 2": ("CYP Inh.", "CYP Sub."),
                "Table 8": tuple(GROUPS)}
# Our benchmark name -> the dataset name in paper_results.csv.
PAPER_DATASET = {name: s.paper_dataset for name, s in BENCHMARKS.items()}


def reference_dir() -> Path:
    """Where ``paper_results.csv`` is read from: ``$ESMERGE_REFERENCE_DIR`` or ``../shared/reference``."""
    return Path(os.environ.get("ESMERGE_REFERENCE_DIR") or REPO_ROOT.parent / "shared" / "reference")


def paper_results() -> pd.DataFrame:
    """The paper's numbers (``paper_results.csv``), read in place and never copied into the repo."""
    path = reference_dir() / "paper_results.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the paper's reference values live beside the repository in "
            "../shared/reference/paper_results.csv (or set ESMERGE_REFERENCE_DIR to its folder)")
    return pd.read_csv(path)


def results_table(results: dict[str, dict[str, dict]], table: str = "Table 1", n_resamples: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """Our numbers beside the paper's for Table 1, 2 or 8 (Table 3 = Table 8's "Avg." rows).

    ``results`` is ``{method: {benchmark: evaluate(...) result}}``. Group averages are the mean of
    the per-dataset values, as the paper computes them; their CIs come from ``paired_bootstrap``.
    Returns a long table: ``method, dataset, metric, ours, lo, hi, n, paper, diff``.
    """
    if table == "Table 3":
        out = results_table(results, "Table 8", n_resamples, seed)
        return out[out["dataset"].str.startswith("Avg.")].reset_index(drop=True)
    if table not in TABLE_GROUPS:
        raise ValueError(f"unknown table {table!r}; choose Table 1, 2, 3 or 8")
    paper = paper_results()
    paper = paper[paper["table"] == table]
    metrics = ("accuracy",) if table == "Table 8" else ("accuracy", "macro_f1")
    rows = []
    for method, runs in results.items():
        for group in TABLE_GROUPS[table]:
            benches = [b for b in GROUPS[group] if b in runs]
            for metric in metrics:
                for bench in benches:
                    r = runs[bench]
                    lo, hi = r[f"{metric}_ci"]
                    rows.append({"method": method, "dataset": PAPER_DATASET[bench], "metric": metric,
                                 "ours": r[metric], "lo": lo, "hi": hi, "n": r["n"]})
                if benches:
                    # an average over part of a group is labelled so, and has no paper value beside it
                    name = f"Avg. {group}" + ("" if len(benches) == len(GROUPS[group])
                                              else f" ({len(benches)}/{len(GROUPS[group])} datasets)")
                    point, lo, hi = paired_bootstrap({b: runs[b] for b in benches}, None, metric, n_resamples, seed)
                    rows.append({"method": method, "dataset": name, "metric": metric, "ours": point,
                                 "lo": lo, "hi": hi, "n": sum(runs[b]["n"] for b in benches)})
    out = pd.DataFrame(rows, columns=["method", "dataset", "metric", "ours", "lo", "hi", "n"])
    ref = paper[["method", "dataset", "metric", "value"]].rename(columns={"value": "paper"})
    out = out.merge(ref, on=["method", "dataset", "metric"], how="left")
    out["diff"] = out["ours"] - out["paper"]
    return out


def wide_table(long: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """``results_table`` output as method x dataset cells ``"ours [lo, hi] (paper)"``."""
    part = long[long["metric"] == metric]
    cell = part.apply(lambda r: format_ci(r.ours, r.lo, r.hi, 1)
                      + (f" ({r.paper:.1f})" if pd.notna(r.paper) else ""), axis=1)
    frame = part.assign(cell=cell).pivot(index="method", columns="dataset", values="cell")
    columns = list(dict.fromkeys(part["dataset"]))
    rows = list(dict.fromkeys(part["method"]))  # the caller's order (base, specialists, merges), not A-Z
    return frame.loc[rows, columns]



def group_averages(tables: list[pd.DataFrame], ablation: pd.DataFrame | None = None) -> pd.DataFrame:
    """The accuracy group-average rows (``Avg. ...``) of ``results_table`` outputs, one frame.

    The ablation variants have paper values only in Table 8: a missing ``paper`` value is taken
    from ``ablation`` (a Table 8 ``results_table``) for the same method and dataset.
    """
    rows = pd.concat(tables)
    rows = rows[(rows["metric"] == "accuracy") & rows["dataset"].str.startswith("Avg.")]
    if ablation is not None:
        t8_paper = ablation.set_index(["method", "dataset"])["paper"]
        rows = rows.assign(paper=[p if pd.notna(p) else t8_paper.get((m, d), np.nan)
                                  for m, d, p in zip(rows["method"], rows["dataset"], rows["paper"])])
    return rows
