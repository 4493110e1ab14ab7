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
# # Retention of each specialist's skill
#
# The benchmarks of the results chapter ask each merged model a yes/no question about an
# interaction; at `cpu` scale their accuracy barely separates the models. This chapter measures
# instead what each specialist was trained to do, on held-out examples of its own task, and how
# much of it a merged model keeps:
#
# * molecule: the ChEBI-20 *test* caption of a molecule (8 projector tokens from its SMILES);
# * protein: the Swiss-Prot GO-term description of a held-out protein (FAPM test split);
# * cell: the cell type of a held-out PBMC68k cell, or the primary site and histology of a
#   held-out CCLE line (the cell is text, its top expressed genes).
#
# Each model's score is its mean answer NLL (nats per answer token, lower is better) on the same
# examples. The **retained fraction** on modality m is
# $R_m = (L_{merged} - L_{base}) / (L_{specialist\ m} - L_{base})$:
# 1 when the merged model is as good as specialist m on m's task, 0 when it is no better than the
# base, below 0 when it is worse. This is the "normalised performance" that parameter-space
# merging papers report, there as merged accuracy over the fine-tuned model's
# {cite}`ilharco2023taskarithmetic,yadav2023ties`; an NLL has no natural zero, so ours takes the
# base as zero. Every model reads modality m through specialist m's projector (as in the probe),
# so models differ only by their LoRA. CIs are 95 % paired-bootstrap intervals: the examples are
# resampled jointly for the base, the specialist and every merged model, so the example-to-example
# spread of difficulty, which dwarfs the differences between models, cancels.
#
# EMR is scored with its task-specific modulation for the specialist's task (EMR Eq. 7). Avg.
# Merging + FT has one adapter per interaction benchmark, each fine-tuned on that benchmark's
# yes/no prompts; it has no single model, so we score the adapters of `avg_ft_benchmarks` (one
# molecule-protein and one molecule-cell benchmark by default) as separate rows.
#
# Cost: one forward pass of ~90-125 tokens per example, model and modality, cached on disk per
# (weights, examples, settings), so a rerun is instant and an interrupted run resumes. At `cpu`
# scale (SmolLM2-135M, float32, one thread) a forward took 0.22-0.32 s of CPU time per example
# (molecule 0.32, protein 0.22, cell 0.24; measured on a busy 2-core machine, so an upper bound),
# so 17 models x 3 x 200 examples take up to about 45 minutes. bfloat16 was slower on that CPU
# (`benchmarks/results/bf16_agreement.json`).
# The paired CIs are narrow: at n = 40 the mean retained fraction of Average merging had a 95 %
# CI of +-0.015 (+-0.02-0.03 per modality); `n_retention = 50` would give about +-0.013 in a
# quarter of the time.

# %% tags=["parameters"]
# esmerge-needs: 06_merging
scale = "cpu"
seed = 0
n_retention = None  # None: esmerge.scales.get(scale).n_retention held-out examples per modality
avg_ft_benchmarks = ("BindingDB", "GDSC2")  # the Avg.+FT adapters scored (each is a model of its own)
batch_size = 8
n_resamples = 1000

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

from esmerge import plots, scales
from esmerge.evaluate import retention
from esmerge.paths import run_dir
from esmerge.run.merge import build_context, merge_once
from esmerge.specialists.captions import heldout_examples

torch.manual_seed(seed)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))  # batched forwards: both cores of the book machine
n_retention = n_retention or scales.get(scale).n_retention
out = run_dir(scale, "09_retention")
context = build_context(scale, seed)
base, specialists = context.base, context.specialists
examples = {m: heldout_examples(m, scale, n_retention, seed) for m in specialists}
caption = (f"scale={scale}, seed={seed}, n={'/'.join(str(len(v)) for v in examples.values())} held-out examples "
           f"({'/'.join(examples)})")
print(caption, "| base:", base.name)

# %% [markdown]
# ## Models
#
# The base, the three specialists, every merged model of `runs/{scale}/06_merging/`, and the
# three ES-Merging variants (merged here with the registry defaults if that chapter did not).

# %%
merge_root = run_dir(scale, "06_merging")
found, _ = retention.retention_models({}, merge_root)
extra = {name: merge_once(name, out / "merged" / name, context)[0]
         for name in ("es", "es-layer", "es-element") if name not in found}
models, notes = retention.retention_models(specialists, merge_root, list(avg_ft_benchmarks), extra)
for note in notes:
    print(note)
print(f"{len(models)} models:", ", ".join(models))

# %%
start = time.perf_counter()
nlls, tokens = retention.score_models(models, base, specialists, examples, batch_size=batch_size)
seconds = time.perf_counter() - start
uids = {m: [ex.uid for ex in v] for m, v in examples.items()}
retention.nll_frame(nlls, tokens, uids).to_csv(out / "retention_nlls.csv", index=False)
print(f"{len(models)} models x {len(examples)} modalities: {seconds:.0f} s (cached entries are read, not computed); "
      f"mean answer tokens per example: " + ", ".join(f"{m} {t.mean():.1f}" for m, t in tokens.items()))

# %% [markdown]
# ## Retained fraction
#
# Mean answer NLL and retained fraction [95 % CI] per model and modality; `mean` is the mean of
# the three fractions. `specialist_gain` (base NLL minus specialist NLL) is what there is to
# retain: where its CI reaches 0 every fraction on that modality is unstable.

# %%
res = retention.resampled_retention(nlls, tokens, n_resamples=n_resamples, seed=seed)
table = retention.retention_table(res)
table.to_csv(out / "retention.csv", index=False)
print(f"Retained fraction of each specialist's held-out skill [95 % paired-bootstrap CI]; {caption}")
retention.retention_wide(table)

# %%
gains = table[table["method"] == "base"].set_index("modality")[["specialist_gain", "gain_lo", "gain_hi"]].dropna()
nll_wide = table.pivot(index="method", columns="modality", values="nll").reindex(models)[list(examples)]
print("Specialist gain over the base (nats per answer token):")
print(gains.round(3).to_string())
print("\nMean answer NLL (nats per answer token):")
nll_wide.round(3)

# %% [markdown]
# The held-out cells mix PBMC68k cells (answer: a cell type) and CCLE lines (answer: primary site
# and histology). Split by source (same resampling scheme within each):

# %%
by_source = retention.resampled_retention(*retention.split_by_source(nlls, tokens, uids), n_resamples=n_resamples,
                                          seed=seed, specialist_of=lambda m: "specialist-" + m.split("/")[0])
source_table = retention.retention_table(by_source)
source_table = source_table[source_table["modality"].str.startswith("cell/")]
source_table.to_csv(out / "retention_cell_sources.csv", index=False)
print(f"Retained fraction on held-out cells by source; {caption}")
retention.retention_wide(source_table)

# %%
merged_names = [k for k in models if k != "base" and not k.startswith("specialist-")]
columns = [*examples, "mean"]
fig, ax = plt.subplots(figsize=(max(8, 0.75 * len(merged_names) * len(columns) / 3), 4))
width = 0.8 / len(columns)
for j, m in enumerate(columns):
    part = table[table["modality"] == m].set_index("method").reindex(merged_names)
    x = np.arange(len(merged_names)) + (j - (len(columns) - 1) / 2) * width
    err = np.abs(part[["lo", "hi"]].to_numpy().T - part["retained"].to_numpy())
    ax.bar(x, part["retained"], width, yerr=err, capsize=2, label=m,
           color=plots.MODALITY_COLORS.get(m, "#444444"), error_kw={"lw": 0.8})
ax.axhline(1, color="k", lw=0.8, ls="--")
ax.axhline(0, color="k", lw=0.8)
ax.set_xticks(np.arange(len(merged_names)), merged_names, rotation=30, ha="right")
ax.set(ylabel="retained fraction  (1 = specialist, 0 = base)",
       title="How much of each specialist's held-out skill a merged model keeps")
ax.legend(frameon=False, ncol=len(columns), fontsize=8)
fig.suptitle(f"95 % paired-bootstrap CIs over examples; {caption}", fontsize=9)
fig.tight_layout()
plots.save(fig, out, "retention")
plt.show()

# %% [markdown]
# ## Claims: ES-Merging against every baseline
#
# For each baseline, the margin *mean retention of ES-Merging minus the baseline's* with a paired
# 95 % CI (one resample of the examples for every model). Verdicts in the claims register's
# words: *supported* (the CI lies above 0), *not supported* (below 0: the baseline retains
# significantly more), *inconclusive* (the CI straddles 0). The first row is the claim over all
# baselines (its margin is the smallest); `rank` is ES-Merging's rank among ES-Merging and the
# baselines by mean retention.

# %%
claims = retention.retention_claims(res)
claims.to_csv(out / "retention_claims.csv", index=False)
print(f"ES-Merging vs every baseline on mean retention; {caption}")
claims[["b", "ours", "lo", "hi", "verdict", "rank", "of"]].rename(columns={"b": "ES-Merging vs"}).round(3)
