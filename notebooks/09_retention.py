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

# %% tags=["parameters", "remove-cell"]
# esmerge-needs: 06_merging
scale = "cpu"
seed = 0
device = None  # None: the scale's (the CPU at smoke and cpu); "cuda" runs the same chapter on a GPU
specialist_seeds = None  # None: the scale's (ScaleConfig.specialist_seeds)
n_retention = None  # None: the scale's ScaleConfig.n_retention held-out examples per modality
avg_ft_benchmarks = ("BindingDB", "GDSC2")  # the Avg.+FT adapters scored (each is a model of its own)
batch_size = 8
n_resamples = 1000

# %% tags=["hide-input"]
import time

import torch
from IPython.display import display

from esmerge import plots, scales
from esmerge.evaluate import retention, retention_seeds
from esmerge.paths import run_dir
from esmerge.report import budget_curves, figures
from esmerge.report.display import Numbered
from esmerge.run.merge import build_context
from esmerge.run.retention_runs import seed_models
from esmerge.specialists.captions import heldout_examples

config = scales.get(scale, device=device)  # the scale's settings, resolved once (an unknown name is refused here)
book = Numbered(9)
torch.manual_seed(seed)
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))  # batched forwards: both cores of the book machine
budgets = config.merge_budgets
budget_notes = budget_curves.budget_notes(budgets, scales.get("paper").merge_budgets)
specialist_seeds = tuple(specialist_seeds or config.specialist_seeds)
n_retention = n_retention or config.n_retention
out = run_dir(scale, "09_retention")
merge_root = run_dir(scale, "06_merging")
context = build_context(config, seed, specialist_seed=specialist_seeds[0])
base = context.base
examples = {m: heldout_examples(m, config, n_retention, seed) for m in context.specialists}
caption = (f"scale={scale}, seed={seed}, specialist seeds {', '.join(map(str, specialist_seeds))}, "
           f"n={'/'.join(str(len(v)) for v in examples.values())} held-out examples ({'/'.join(examples)})")
print(caption, "| base:", base.name)

# %% [markdown]
# ## Models
#
# At every specialist seed: the base, the three specialists and every merged model that
# `06_merging` made from them, EMR both with its task routing (`emr`: each modality's own task
# modulator, which an oracle chooses) and as one merged model (`emr-one`: the mean of its modulated
# adapters, what a user would deploy). At the first seed also the budget-curve runs of AdaMerging
# and Avg+FT. Every (model, modality) score is cached on disk, so a rerun reads them.

# %% tags=["hide-input"]
start = time.perf_counter()
by_seed, notes = {}, []
for s, seed_context, models, seed_notes in seed_models(config, seed, specialist_seeds, merge_root,
                                                       tuple(avg_ft_benchmarks), {specialist_seeds[0]: context}):
    notes += [f"seed {s}: {n}" for n in seed_notes]
    by_seed[s] = retention.score_models(models, base, seed_context.specialists, examples, config.train,
                                     batch_size=batch_size)
seconds = time.perf_counter() - start
for note in notes:
    print(note)
nlls, tokens = by_seed[specialist_seeds[0]]
uids = {m: [ex.uid for ex in v] for m, v in examples.items()}
for s, (seed_nlls, seed_tokens) in by_seed.items():
    retention.nll_frame(seed_nlls, seed_tokens, uids).to_csv(out / f"retention_nlls_seed{s}.csv", index=False)
print(f"{len(models)} models x {len(examples)} modalities x {len(by_seed)} seeds: {seconds:.0f} s (cached entries "
      f"are read, not computed); mean answer tokens per example: "
      + ", ".join(f"{m} {t.mean():.1f}" for m, t in tokens.items()))

# %% [markdown]
# ## Retained fraction
#
# Mean answer NLL and retained fraction [95 % CI] per model and modality; `mean` is the mean of
# the three fractions. Each value is the mean over the specialist seeds of that seed's retained
# fraction, and its CI comes from a two-level bootstrap: each resample draws the seeds with
# replacement, then the examples (one draw per modality, shared by every model and seed, since
# every seed is scored on the same examples), so the spread between seeds is inside the CI
# (`esmerge.evaluate.retention_seeds`). `specialist_gain` (base NLL minus specialist NLL) is what
# there is to retain: where its CI reaches 0 every fraction on that modality is unstable.

# %% tags=["hide-input"]
res = retention_seeds.seeded_retention(by_seed, n_resamples=n_resamples, seed=seed)
print(retention_seeds.seed_resolution_note(len(res.seeds)))
left_out = [k for k in res.dropped if "@" not in k]  # the budget curves run at the first seed only
if left_out:
    print("left out (not merged at every seed):", ", ".join(left_out))
table = retention.retention_table(res)
table.to_csv(out / "retention.csv", index=False)
book.table(retention.retention_wide(table, digits=3),
           f"Retained fraction of each specialist's held-out skill [95 % two-level bootstrap CI, seeds and "
           f"examples]; {caption}.")

# %% tags=["hide-input"]
per_seed = retention_seeds.seed_table(res)
per_seed.to_csv(out / "retention_by_seed.csv", index=False)
book.table(per_seed[per_seed["modality"] == "mean"].pivot(index="method", columns="seed", values="retained"),
           f"Mean retained fraction at each specialist seed (columns); {caption}.", digits=3)

# %% tags=["hide-input"]
gains = table[table["method"] == "base"].set_index("modality")[["specialist_gain", "gain_lo", "gain_hi"]].dropna()
nll_wide = table.pivot(index="method", columns="modality", values="nll")[list(examples)]
display(book.table(gains, "Specialist gain over the base (nats per answer token, mean over seeds) [95 % CI]; "
                          f"{caption}.", digits=3))
book.table(nll_wide, f"Mean answer NLL (nats per answer token, mean over seeds); {caption}.", digits=3)

# %% [markdown]
# The held-out cells mix PBMC68k cells (answer: a cell type) and CCLE lines (answer: primary site
# and histology). Split by source, at the first specialist seed (same resampling scheme within each):

# %% tags=["hide-input"]
by_source = retention.resampled_retention(*retention.split_by_source(nlls, tokens, uids), n_resamples=n_resamples,
                                          seed=seed, specialist_of=lambda m: "specialist-" + m.split("/")[0])
source_table = retention.retention_table(by_source)
source_table = source_table[source_table["modality"].str.startswith("cell/")]
source_table.to_csv(out / "retention_cell_sources.csv", index=False)
book.table(retention.retention_wide(source_table, digits=3),
           f"Retained fraction on held-out cells by source, specialist seed {specialist_seeds[0]}; {caption}.")

# %% tags=["hide-input"]
merged_names = [k for k in res.point if k != "base" and not k.startswith("specialist-") and "@" not in k]
fig = figures.retention_bars(table[table["method"].isin(merged_names)])
fig.suptitle(f"95 % two-level bootstrap CIs (seeds and examples); {caption}", fontsize=9)
plots.save(fig, out, "retention")
book.figure(fig, figures.retention_caption(table[table["method"].isin(merged_names)]))

# %% [markdown]
# ## Claims: ES-Merging against every baseline
#
# For each baseline, the margin *mean retention of ES-Merging minus the baseline's* with its 95 %
# CI from the same two-level bootstrap, and a bootstrap p-value Holm-adjusted over the compared
# baselines. Verdicts in the claims register's words: *supported* (the CI lies above 0 and Holm
# p < 0.05), *not supported* (the baseline retains significantly more, by the same two tests),
# *inconclusive* otherwise. Where a mean over modalities nets significant effects of opposite sign,
# each modality gets a row of its own. The first row is the claim over all baselines; `rank` is
# ES-Merging's rank among ES-Merging and the baselines by mean retention. Every row carries the
# seeds, the caveats that apply and what result would change it.

# %% tags=["hide-input"]
baselines = [k for k in merged_names if not k.startswith("es")]
claims = retention.retention_claims(res, baselines=baselines, budgets=budget_notes)
claims.to_csv(out / "retention_claims.csv", index=False)
book.table(claims.rename(columns={"b": "ES-Merging vs"}),
           f"ES-Merging minus each baseline in retained fraction [95 % CI], Holm p and verdict; {caption}.",
           digits=3, columns=["ES-Merging vs", "modality", "ours", "p_holm", "verdict", "rank", "of", "detail"])

# %% [markdown]
# ## Budget curves
#
# AdaMerging and Avg+FT at every budget they ran at (the first specialist seed only): whether
# each had plateaued by the budget of the claims above.

# %% tags=["hide-input"]
first = retention.resampled_retention(nlls, tokens, n_resamples=n_resamples, seed=seed)
curve = budget_curves.retention_curve(retention.retention_table(first), budgets)
curve.to_csv(out / "retention_budget_curves.csv", index=False)
book.table(curve, f"Mean retained fraction [95 % CI] of AdaMerging and Avg+FT at each budget they ran at, "
                  f"specialist seed {specialist_seeds[0]}; {caption}.", digits=3)
