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
# prompts takes about 30 s and one fine-tuning step on 4 prompts about 12 s, so the defaults
# below run 10 AdaMerging steps and 2 fine-tuning steps per benchmark, far below the paper's
# budgets, and the chapter takes about 20 minutes. Every merge is
# saved with its settings and skipped on a rerun with the same settings.

# %% tags=["parameters"]
# esmerge-needs: 02_specialists
scale = "cpu"
seed = 0
adamerging_steps = 10  # original: 500
adamerging_benchmarks = None  # None: all 13 benchmarks
adamerging_prompts_per_benchmark = 2
adamerging_batch = 2
ft_benchmarks = None  # None: all 13 benchmarks
ft_examples = 8  # paper: 2,000
ft_epochs = 1  # paper: 10
ft_batch = 4  # paper: 16
lsmerge_epochs = 1000  # paper: 1,000
compat_benchmarks = ("BindingDB", "CYP3A4", "GDSC2", "DrugComb")
compat_prompts = 2

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from esmerge import evaluate, plots
from esmerge.paths import run_dir
from esmerge.report import merged_adapters
from esmerge.run import baseline_inputs
from esmerge.run.merge import build_context, merge_once
from esmerge.specialists.adapters import load_merged

torch.manual_seed(seed)
torch.set_num_threads(1)  # the book's machines are shared; small tensor ops thrash with more threads
if scale == "smoke":  # keep the smoke run well under a minute
    adamerging_steps, adamerging_prompts_per_benchmark, ft_examples, ft_epochs, lsmerge_epochs = 2, 2, 4, 1, 5
    ft_benchmarks = ft_benchmarks or ["GDSC2"]
    adamerging_benchmarks = adamerging_benchmarks or ["GDSC2"]
    compat_benchmarks = ("GDSC2",)
ft_benchmarks = list(ft_benchmarks or evaluate.BENCHMARK_NAMES)
adamerging_benchmarks = list(adamerging_benchmarks or evaluate.BENCHMARK_NAMES)
eval_config = evaluate.default_config(scale)
out = run_dir(scale, "06_merging")
context = build_context(scale, seed)
specialists = context.specialists
names = list(specialists)
adapters = {m: s.adapter for m, s in specialists.items()}
caption = f"scale={scale}, seed={seed}, n={len(names)} specialists ({', '.join(names)})"
print(caption, "| base:", context.base.name)

# %% [markdown]
# ## Training-free methods
#
# Defaults are those of the original papers where they have one (TIES k=20%, λ=1; PCB keeps
# the top 10% of its balancing scores; Consensus k=2) and a stated choice otherwise: see each
# function's docstring (`help(methods.get("ties").fn)`) for the equations and every choice made
# where the papers are silent; `methods.describe("ties")` lists each hyper-parameter's type,
# default and range.

# %%
static_methods = ["avg", "ties", "emr", "pcb", "consensus", "graft"]
merged, meta = {}, {}
for name in static_methods:
    merged[name], meta[name] = merge_once(name, out / name, context)

# %% [markdown]
# ## LS-Merge
#
# A VAE over 16,384-entry parameter chunks with the paper's optimiser settings (App. A.3). Our
# VAE is a small MLP conditioned on the chunk position, not LS-Merge's transformer.

# %%
merged["ls-merge"], meta["ls-merge"] = merge_once(
    "ls-merge", out / "ls-merge", context, epochs=lsmerge_epochs, seed=seed, progress=False)
vae = meta["ls-merge"]["info"]["vae"]
print(f"VAE reconstruction MSE (standardised units): {vae['recon_mse_before']:.3f} -> {vae['recon_mse_after']:.3f}")

# %% [markdown]
# ## Layer-wise AdaMerging
#
# One coefficient per block per specialist, learned by minimising the entropy of the model's
# two-label answer distribution on unlabeled evaluation prompts of every benchmark (the labels
# are never read). The objective scores answers with `evaluate.label_logits`, as the evaluation does.

# %%
context.extras.update(baseline_inputs.adamerging_extras(
    context.base, specialists, adamerging_benchmarks, adamerging_prompts_per_benchmark,
    adamerging_batch, eval_config, seed))
merged["adamerging"], meta["adamerging"] = merge_once(
    "adamerging", out / "adamerging", context, steps=adamerging_steps, progress=False)
ada = meta["adamerging"]["info"]
coeff = pd.DataFrame(ada["coefficients"])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
for m in coeff.columns:
    axes[0].plot(range(len(coeff)), coeff[m], label=m, color=plots.MODALITY_COLORS.get(m))
axes[0].set(xlabel="block l", ylabel="λ", title="AdaMerging coefficients")
axes[0].legend(frameon=False)
axes[1].plot(ada["entropy"]["history"])
axes[1].set(xlabel="step", ylabel="mean entropy (nats)", title="entropy objective")
fig.suptitle(f"AdaMerging, {adamerging_steps} steps on {context.adamerging_prompts} unlabeled prompts; {caption}",
             fontsize=9)
fig.tight_layout()
plots.save(fig, out, "adamerging")
plt.show()

# %% [markdown]
# ## Avg. Merging + task-specific fine-tuning
#
# One adapter per benchmark, `avg-ft/<benchmark>/`: the averaged LoRA fine-tuned on training
# prompts of that benchmark (queries from its in-context pool, with retrieved shots) with the
# negative log-likelihood of the gold answer. The paper uses 2,000 examples, 10 epochs, batch 16.

# %%
ft_meta = {}
for benchmark in ft_benchmarks:
    context.extras.update(baseline_inputs.finetune_extras(context.base, specialists, benchmark, ft_examples, ft_batch,
                                                   eval_config, seed))
    _, ft_meta[benchmark] = merge_once("avg-ft", out / "avg-ft" / benchmark, context, epochs=ft_epochs, progress=False)
ft_table = merged_adapters.finetune_table(ft_meta)
ft_table.to_csv(out / "avg_ft.csv", index=False)
ft_table

# %% [markdown]
# ## Hyper-parameters and cost
#
# Wall time on this machine and, for the methods that train, the FLOPs counted by
# `torch.utils.flop_counter` (forward and backward passes). Avg+FT is summed over benchmarks.

# %%
cost = merged_adapters.cost_table({name: meta[name] for name in static_methods + ["ls-merge", "adamerging"]},
                                  ft_table,
                                  {"examples": ft_examples, "epochs": ft_epochs, "batch": ft_batch,
                                   "benchmarks": len(ft_benchmarks)})
cost.to_csv(out / "methods.csv", index=False)
print(caption)
cost

# %% [markdown]
# ## How the merged adapters differ
#
# Left: the size of each merged update per block, $\|\frac{\alpha}{r}BA\|_F$ over the block's
# modules. Merging A's and B's separately (Eq. 1) shrinks the product: averaging three
# LoRAs leaves roughly a third of each one's $BA$ per module when they are unrelated. Right: cosine
# similarity of each merged update $\{BA\}$ to each specialist's, over all modules (the A and B
# vectors themselves are dominated by A, which moves little from its shared initialisation).

# %%
compare = {**{f"specialist {m}": a for m, a in adapters.items()},
           **{k: v for k, v in merged.items()},
           f"avg-ft ({ft_benchmarks[0]})": load_merged(out / "avg-ft" / ft_benchmarks[0]).adapter}
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
plt.show()

# %% [markdown]
# ## Graft: the order of grafting
#
# Graft fuses two LoRAs; we extend it to three by grafting sequentially in a given order
# (default molecule → protein → cell). Each fusion gives the newcomer about half the weight,
# so the last expert dominates. The table shows the merged update's cosine to each
# specialist's for all six orders.

# %%
graft_orders = merged_adapters.graft_order_table(adapters)
graft_orders.to_csv(out / "graft_orders.csv")
print(f"Graft order effect (cosine of the merged update BA to each specialist's); {caption}")
graft_orders.round(3)

# %% [markdown]
# ## Graft's compatibility score
#
# Graft proposes an activation statistic to judge whether an expert suits a dataset before
# fusing it (Eqs. 9-14): mean magnitude, non-sparsity and spread of module outputs, min-max
# normalised across modules. Here: each specialist on a few evaluation prompts of one
# benchmark per task kind, activations of every block's MLP output. A diagnostic only; no
# method uses it.

# %%
compat = pd.DataFrame(baseline_inputs.compatibility_table(context.base, specialists, list(compat_benchmarks),
                                                   compat_prompts, eval_config, seed))
compat.to_csv(out / "graft_compatibility.csv", index=False)
print(f"Graft compatibility (Eq. 14), {compat_prompts} prompts per benchmark; {caption}")
compat.pivot(index="specialist", columns="benchmark", values="compatibility").round(3)

# %% [markdown]
# ## EMR on cross-modal benchmarks
#
# EMR keeps a mask and a rescaler per task and applies one task's at inference. Our benchmarks
# each hold two modalities, so the evaluation uses, identically for all benchmarks, the mean
# of the modulated adapters of the modalities present (`emr_adapter_for_benchmark`).

# %%
merged_adapters.emr_table(meta["emr"]["info"]).round(3)
