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
# # Merging and baselines
#
# The paper compares ES-Merging with six merging baselines and a fine-tuned model (§5.1,
# App. A.2): Average, TIES, EMR, layer-wise AdaMerging, PCB, Consensus, LS-Merge and
# Avg. Merging + task-specific fine-tuning. We add Graft (dual-gate LoRA fusion). Every method
# lives in `esmerge.methods` behind one registry and works on the three specialists' LoRA A and
# B matrices element-wise (Eq. 1). This chapter runs each at the chosen scale, saves the merged
# adapters under `runs/{scale}/06_merging/{method}/` for the evaluation chapter, and compares
# them: hyper-parameters and cost, the size of each merged update per layer, and how close each
# lands to each specialist.
#
# Cost at `cpu` scale (SmolLM2-135M, one CPU thread): the training-free methods take about a
# second each and LS-Merge about 7 minutes (1,000 epochs); one AdaMerging step on 2 few-shot
# prompts takes about 30 s and one fine-tuning step on 4 prompts about 12 s. The budgets are the
# scale's (`esmerge.scales.get(scale).merge_budgets`), stated beside the paper's wherever a baseline
# appears; at `cpu` they are far below the paper's, so the searching baselines also run at two more
# budgets (the budget curves below). Every method is merged again from the specialists trained at
# each other seed of the scale (`specialist_seeds`), so that the retention chapter can put the
# spread between seeds inside its CIs. Every merge is saved with its settings and skipped on a
# rerun with the same settings.

# %% tags=["parameters", "remove-cell"]
# esmerge-needs: 02_specialists
scale = "cpu"
seed = 0
device = None  # None: the scale's (the CPU at smoke and cpu); "cuda" runs the same chapter on a GPU
specialist_seeds = None  # None: the scale's (ScaleConfig.specialist_seeds)
budget_overrides = {}  # fields of scales.MergeBudgets to change, e.g. {"adamerging_steps": 500}
compat_prompts = 2

# %% tags=["hide-input"]
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from esmerge import evaluate, plots, scales
from esmerge.paths import run_dir
from esmerge.report import merged_adapters
from esmerge.report.display import Numbered
from esmerge.run import all_methods, baseline_inputs
from esmerge.run.merge import build_context
from esmerge.specialists.adapters import load_merged

config = scales.get(scale, device=device)  # the scale's settings, resolved once (an unknown name is refused here)
book = Numbered(6)
torch.manual_seed(seed)
torch.set_num_threads(1)  # the book's machines are shared; small tensor ops thrash with more threads
budgets = replace(config.merge_budgets, **budget_overrides)
specialist_seeds = tuple(specialist_seeds or config.specialist_seeds)
eval_config = evaluate.default_config(config)
out = run_dir(scale, "06_merging")
context = build_context(config, seed, specialist_seed=specialist_seeds[0])
specialists = context.specialists
names = list(specialists)
adapters = {m: s.adapter for m, s in specialists.items()}
caption = (f"scale={scale}, seed={seed}, n={len(names)} specialists ({', '.join(names)}) "
           f"trained at seed {specialist_seeds[0]}")
print(caption, "| base:", context.base.name)

# %% [markdown]
# ## Every method
#
# Training-free methods at the original papers' defaults where they have one (TIES k=20%, λ=1;
# PCB keeps the top 10% of its balancing scores; Consensus k=2) and a stated choice otherwise:
# see each function's docstring (`help(methods.get("ties").fn)`) for the equations and every
# choice made where the papers are silent; `methods.describe("ties")` lists each
# hyper-parameter's type, default and range. Then the methods that train or search, each at the
# scale's budget:
#
# * **LS-Merge**: a VAE over 16,384-entry parameter chunks with the paper's optimiser settings
#   (App. A.3). Our VAE is a small MLP conditioned on the chunk position, not LS-Merge's transformer.
# * **Layer-wise AdaMerging**: one coefficient per block per specialist, learned by minimising the
#   entropy of the model's two-label answer distribution on unlabeled evaluation prompts of every
#   benchmark (the labels are never read; answers scored with `evaluate.label_logits`, as in the
#   evaluation).
# * **Avg. Merging + task-specific fine-tuning**: one adapter per benchmark, `avg-ft/<benchmark>/`,
#   the averaged LoRA fine-tuned on training prompts of that benchmark (queries from its in-context
#   pool, with retrieved shots) with the negative log-likelihood of the gold answer.
# * **ES-Merging** and its two ablations (layer-wise only, element-wise only), at the paper's settings.

# %% tags=["hide-input"]
merges = all_methods.merge_every_method(context, out, budgets, eval_config, seed)
merged, meta, ft_meta = merges.adapters, merges.metas, merges.finetune
print(f"{len(merged) + 1} methods merged; {caption}")
book.table(merged_adapters.budget_table(budgets, scales.SCALES["paper"].merge_budgets),
           f"The budgets of the methods that train or search, as run at the {scale} scale and in the paper.")

# %% tags=["hide-input"]
vae = meta["ls-merge"]["info"]["vae"]
print(f"LS-Merge VAE reconstruction MSE (standardised units): {vae['recon_mse_before']:.3f} -> "
      f"{vae['recon_mse_after']:.3f}")
ada = meta["adamerging"]["info"]
coeff = pd.DataFrame(ada["coefficients"])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for m in coeff.columns:
    axes[0].plot(range(len(coeff)), coeff[m], label=m, color=plots.MODALITY_COLORS.get(m))
axes[0].set(xlabel="block l", ylabel="λ", title="AdaMerging coefficients")
axes[0].legend(frameon=False)
axes[1].plot(ada["entropy"]["history"])
axes[1].set(xlabel="step", ylabel="mean entropy (nats)", title="entropy objective")
fig.suptitle(f"AdaMerging, {budgets.adamerging_steps} steps on {context.adamerging_prompts} unlabeled prompts; "
             f"{caption}", fontsize=9)
fig.tight_layout()
plots.save(fig, out, "adamerging")
book.figure(fig, f"AdaMerging's learned coefficient per block and specialist (left) and its entropy objective per "
                 f"step (right), {ada['entropy']['history'][0]:.3f} -> {ada['entropy']['history'][-1]:.3f} nats over "
                 f"{budgets.adamerging_steps} steps." if ada["entropy"]["history"] else "AdaMerging (no steps).")

# %% tags=["hide-input"]
ft_table = merged_adapters.finetune_table(ft_meta)
ft_table.to_csv(out / "avg_ft.csv", index=False)
book.table(ft_table, f"Avg. Merging + FT per benchmark: first and last training loss, wall time and FLOPs "
                     f"({budgets.ft_examples} rows, {budgets.ft_epochs} epoch(s), batch {budgets.ft_batch}); "
                     f"{caption}.",
           digits=3)

# %% [markdown]
# ## Hyper-parameters and cost
#
# Wall time on this machine and, for the methods that train, the FLOPs counted by
# `torch.utils.flop_counter` (forward and backward passes). Avg+FT is summed over benchmarks.

# %% tags=["hide-input"]
searched = [k for k in meta if k not in all_methods.ES_VARIANTS]
cost = merged_adapters.cost_table({name: meta[name] for name in searched}, ft_table,
                                  {"examples": budgets.ft_examples, "epochs": budgets.ft_epochs,
                                   "batch": budgets.ft_batch, "benchmarks": len(ft_meta)})
cost.to_csv(out / "methods.csv", index=False)
book.table(cost, f"Every method's hyper-parameters, wall time and (for those that train) FLOPs; {caption}.", digits=2)

# %% [markdown]
# ## Budget curves
#
# AdaMerging and Avg+FT at the budget above and at the others of the scale
# (`budgets.adamerging_curve`, `budgets.ft_curve_examples`; Avg+FT on
# `budgets.curve_benchmarks` only), so that the results and retention chapters can show whether
# each has plateaued by the budget it runs at. First specialist seed only.

# %% tags=["hide-input"]
curves = all_methods.merge_budget_curves(context, out, budgets, eval_config, seed)
curve_table = merged_adapters.curve_cost_table(curves, meta["adamerging"], ft_meta, budgets)
curve_table.to_csv(out / "budget_curves.csv", index=False)
book.table(curve_table, f"Budget curves: the cost of each run of AdaMerging and Avg+FT (Avg+FT summed over "
                       f"{', '.join(budgets.curve_benchmarks)}); {caption}.", digits=2)

# %% [markdown]
# ## How the merged adapters differ
#
# Left: the size of each merged update per block, $\|\frac{\alpha}{r}BA\|_F$ over the block's
# modules. Merging A's and B's separately (Eq. 1) shrinks the product: averaging three
# LoRAs leaves roughly a third of each one's $BA$ per module when they are unrelated. Right: cosine
# similarity of each merged update $\{BA\}$ to each specialist's, over all modules (the A and B
# vectors themselves are dominated by A, which moves little from its shared initialisation).

# %% tags=["hide-input"]
compare = {**{f"specialist {m}": a for m, a in adapters.items()},
           **{k: v for k, v in merged.items()},
           f"avg-ft ({next(iter(ft_meta))})": load_merged(out / "avg-ft" / next(iter(ft_meta))).adapter}
norms, cosines, lora_cosines = merged_adapters.comparison_tables(compare, adapters)
norms.to_csv(out / "delta_norms.csv", index_label="layer")
cosines.to_csv(out / "delta_cosine_to_specialists.csv")
lora_cosines.to_csv(out / "lora_cosine_to_specialists.csv")
fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.4, 1]})
for k in norms.columns:
    is_spec = k.startswith("specialist")
    color = plots.method_color(k if is_spec else k.split()[0])
    axes[0].plot(norms.index, norms[k], label=k, color=color, lw=2.2 if is_spec else 1.2, ls="--" if is_spec else "-")
axes[0].set(xlabel="block l", ylabel=r"$\|\alpha/r\,BA\|_F$", yscale="log", title="update size per block")
axes[0].legend(frameon=False, fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
axes[0].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
im = axes[1].imshow(cosines.to_numpy(), cmap="viridis", vmin=-0.2, vmax=1, aspect="auto")
axes[1].set_xticks(range(len(cosines.columns)), cosines.columns)
axes[1].set_yticks(range(len(cosines.index)), cosines.index)
for (i, j), v in np.ndenumerate(cosines.to_numpy()):
    axes[1].text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
axes[1].set_title(r"cosine of the update $\{BA\}$ to each specialist's")
fig.colorbar(im, ax=axes[1], fraction=0.04)
fig.suptitle(f"Merged adapters; {caption}", fontsize=9)
fig.tight_layout()
plots.save(fig, out, "merged_adapters")
book.figure(fig, "Left: the size of each merged update per block (dashed: the specialists). Right: the cosine of "
                 "each merged update {BA} to each specialist's; a method that keeps each specialist's update "
                 "whole would show high values in every column.")

# %% [markdown]
# ## Graft: the order of grafting
#
# Graft fuses two LoRAs; we extend it to three by grafting sequentially in a given order
# (default molecule → protein → cell). Each fusion gives the newcomer about half the weight,
# so the last expert dominates. The table shows the merged update's cosine to each
# specialist's for all six orders.

# %% tags=["hide-input"]
graft_orders = merged_adapters.graft_order_table(adapters)
graft_orders.to_csv(out / "graft_orders.csv")
book.table(graft_orders, f"Graft's order effect: the cosine of the merged update BA to each specialist's, for "
                         f"every grafting order; {caption}.", digits=3)

# %% [markdown]
# ## Graft's compatibility score
#
# Graft proposes an activation statistic to judge whether an expert suits a dataset before
# fusing it (Eqs. 9-14): mean magnitude, non-sparsity and spread of module outputs, min-max
# normalised across modules. Here: each specialist on a few evaluation prompts of one
# benchmark per task kind, activations of every block's MLP output. A diagnostic only; no
# method uses it.

# %% tags=["hide-input"]
compat = pd.DataFrame(baseline_inputs.compatibility_table(context.base, specialists, list(budgets.compat_benchmarks),
                                                   compat_prompts, eval_config, seed))
compat.to_csv(out / "graft_compatibility.csv", index=False)
book.table(compat.pivot(index="specialist", columns="benchmark", values="compatibility"),
           f"Graft compatibility (Eq. 14) of each specialist with each benchmark, {compat_prompts} prompts per "
           f"benchmark; {caption}.", digits=3)

# %% [markdown]
# ## EMR on cross-modal benchmarks
#
# EMR keeps a mask and a rescaler per task and applies one task's at inference. Our benchmarks
# each hold two modalities, so the evaluation uses, identically for all benchmarks, the mean
# of the modulated adapters of the modalities present (`emr_adapter_for_benchmark`).

# %% tags=["hide-input"]
book.table(merged_adapters.emr_table(meta["emr"]["info"]),
           f"EMR's task modulators: each task's mask density and rescaler; {caption}.", digits=3)

# %% [markdown]
# ## Seed replicates
#
# The specialists of the other training seeds (the same recipes, only the seed changed; trained
# and shipped before any of their results were seen), each merged by every method above, into
# `seeds/seed<N>/`. Below, for each seed: how close each merged update lands to each specialist's
# (the mean cosine of $\{BA\}$ to the three), the figure above reduced to one number per method, so
# the seeds can be compared at a glance.

# %% tags=["hide-input"]
by_seed = {specialist_seeds[0]: (merged, adapters)}
for s in specialist_seeds[1:]:
    seed_context = build_context(config, seed, specialist_seed=s)
    seed_merges = all_methods.merge_every_method(seed_context, all_methods.seed_folder(out, s), budgets,
                                                 eval_config, seed)
    by_seed[s] = (seed_merges.adapters, {m: sp.adapter for m, sp in seed_context.specialists.items()})
seed_table = merged_adapters.seed_cosine_table(by_seed)
seed_table.to_csv(out / "seed_replicates.csv")
book.table(seed_table, f"Mean cosine of each method's merged update to its own seed's specialists' updates, at "
                       f"every specialist seed (scale={scale}, seed={seed}).", digits=3)
