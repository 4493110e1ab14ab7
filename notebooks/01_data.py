# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Data
#
# Everything this book trains on or evaluates comes from public repositories at pinned commits.
# No data file lives in this repository: `data_manifest/files.yaml` lists each upstream file with
# its URL, sha256, size, licence, citation and the tasks that use it, and `esmerge.data.files` resolves
# and hash-checks every file before reading it (`esmerge data verify`, `esmerge data fetch`).
# The processing rules (which file each benchmark uses, how GDSC2 is binarised, how cell lines are
# matched, how pools are drawn) are recorded in `data_manifest/processing.md`; this chapter shows
# their outcome.

# %% tags=["parameters", "remove-cell"]
# esmerge-needs:
scale = "cpu"
seed = 0
device = None  # None: the scale's (the CPU at smoke and cpu); "cuda" runs the same chapter on a GPU
n_eval = 200  # example pool sizes for the pool illustration below
n_context = 1000

# %% tags=["hide-input"]
import logging

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display

from esmerge import scales
from esmerge.data import benchmarks as bm
from esmerge.data import tables
from esmerge.paths import run_dir
from esmerge.report.display import Numbered

logging.basicConfig(level=logging.WARNING)
config = scales.get(scale, device=device)  # the scale's settings, resolved once (an unknown name is refused here)
out = run_dir(scale, "01_data")
book = Numbered(1)
print(f"scale={scale} seed={seed}; results in {out}")

# %% [markdown]
# ## The manifest
#
# Each upstream file, where it was found, whether its sha256 matches, its licence and what uses it.
# The data are the same at every scale; `scale` only selects where results are written.

# %% tags=["hide-input"]
manifest_table = tables.manifest_table()
manifest_table.to_csv(out / "manifest.csv", index=False)
n_verified = int((manifest_table["status"] == "ok").sum())
display(book.table(manifest_table, "Upstream data files: size in bytes, sha256 check status, licence, the tasks "
                   f"that use each and its source repository; {n_verified} of {len(manifest_table)} files verified "
                   f"(the same at every scale; scale={scale})."))

# %% tags=["hide-input"]
citations = tables.citations_table()
citations.to_csv(out / "citations.csv", index=False)
display(book.table(citations, f"Citation for each of the {len(citations)} upstream sources."))

# %% [markdown]
# ## Training corpora
#
# One text corpus per specialist: ChEBI-20 molecule descriptions, Swiss-Prot proteins with their
# experimental GO terms (three aspects joined into one description), and cells as ranked gene lists
# (PBMC 68k cell types; CCLE lines with tissue and histology). Loaders count and drop invalid rows.

# %% tags=["hide-input"]
corpora = tables.load_corpora()
corpus_table = tables.corpus_table(corpora)
corpus_table.to_csv(out / "corpora.csv", index=False)
display(book.table(corpus_table, "The specialists' training corpora: rows read, rows kept, and the dropped rows "
                   "with their reasons."))

# %% tags=["hide-input"]
examples = tables.corpus_examples(corpora)
with pd.option_context("display.max_colwidth", 120):
    display(book.table(examples, "The first row of each corpus: the specialist's input (long inputs shortened) "
                       "and the text it is trained to write."))

# %% [markdown]
# ## Benchmarks and their label balance (paper Fig. 7)
#
# Thirteen binary benchmarks in four groups. Counts are of all usable instances in the file each
# benchmark uses, before evaluation and in-context pools are drawn, so they differ from the
# paper's test-split counts (see `data_manifest/processing.md`).

# %% tags=["hide-input"]
balance = bm.label_balance()
balance.to_csv(out / "label_balance.csv", index=False)
display(book.table(balance, f"Positive and negative instances and dropped rows of each of the {len(balance)} "
                   "benchmarks, over all usable instances before pools are drawn (data are seed-independent)."))

# %% tags=["hide-input"]
titles = {"Mol-Prot": "Molecule-protein interaction", "CYP Inh.": "CYP inhibition",
          "CYP Sub.": "CYP substrate", "Mol-Cell": "Molecule-cell interaction"}
fig, axes = plt.subplots(1, 4, figsize=(16, 3.6), gridspec_kw={"width_ratios": [3, 5, 3, 2]})
for ax, (group, title) in zip(axes, titles.items()):
    part = balance[balance["group"] == group]
    x = range(len(part))
    pos = ax.bar([i - 0.2 for i in x], part["n_pos"], width=0.4, label="positive", color="#3b7dd8")
    neg = ax.bar([i + 0.2 for i in x], part["n_neg"], width=0.4, label="negative", color="#d8823b")
    for bars in (pos, neg):
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(list(x), [n.replace("-substrate", "") for n in part["benchmark"]], rotation=30, ha="right")
    ax.set_title(title, fontsize=10)
    ax.margins(y=0.12)
axes[0].set_ylabel("instances")
axes[0].legend(fontsize=8)
n_total = int(balance[["n_pos", "n_neg"]].to_numpy().sum())
fig.suptitle(f"Label balance per benchmark (scale={scale}, seed={seed}: data are seed-independent; "
             f"n={n_total} instances over {len(balance)} benchmarks)", fontsize=10)
fig.tight_layout()
fig.savefig(out / "label_balance.png", dpi=150)
positive_share = balance["n_pos"] / (balance["n_pos"] + balance["n_neg"])
low, high = balance.loc[positive_share.idxmin()], balance.loc[positive_share.idxmax()]
book.figure(fig, f"Positive (blue) and negative (orange) instances per benchmark, by task group ({n_total} "
            f"instances over {len(balance)} benchmarks). The positive share ranges from "
            f"{positive_share.min():.0%} ({low['benchmark']}) to {positive_share.max():.0%} ({high['benchmark']}): "
            f"a constant answer would reach {max(1 - positive_share.min(), positive_share.max()):.0%} accuracy "
            "on the most skewed.")

# %% [markdown]
# ## Dropped rows
#
# Every loader keeps a count per reason. Unknown cell lines are DrugComb's A427 (no Enrichr CCLE
# gene set) and GDSC2 lines without a gene set or annotation; GDSC2's middle ln IC50 tertile per
# drug is left out as ambiguous by our binarisation rule.

# %% tags=["hide-input"]
benchmarks = {name: bm.load_benchmark(name) for name in bm.BENCHMARKS}
counts = tables.benchmark_counts(benchmarks)
dropped = tables.dropped_rows(benchmarks)
counts.to_csv(out / "benchmark_counts.csv", index=False)
dropped.to_csv(out / "dropped_rows.csv", index=False)
display(book.table(counts, f"Rows read, kept and dropped per benchmark ({len(counts)} benchmarks), with the "
                   "answer labels for 1 / 0."))
display(book.table(dropped, f"Dropped rows per benchmark and reason ({int(dropped['rows'].sum())} rows in all)."))

# %% [markdown]
# ## Evaluation and in-context pools
#
# `split_pools` draws a seeded evaluation pool and a disjoint in-context pool, each with the
# benchmark's label proportions. Table 1.8: the positive fraction of each pool next to the benchmark's
# (benchmarks smaller than the requested pools are scaled down to fit).

# %% tags=["hide-input"]
pools = tables.pool_balance(benchmarks, n_eval, n_context, seed)
pools.to_csv(out / "pools.csv", index=False)
display(book.table(pools, "Positive fraction of each benchmark and of its evaluation and in-context pools, drawn "
                   f"with seed={seed}, requested n_eval={n_eval}, n_context={n_context} (scale={scale}).", digits=3))
