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
# # Layer-wise coefficients
#
# For every specialist j, input modality i and block l, the sliced Wasserstein distance (SWD)
# between the base's and the specialist's mean-pooled block states measures how far the
# specialist has moved that modality by layer l (paper §4.2). Its growth from one layer to the
# next, z-scored over layers and summed over modalities, is turned into layer coefficients by a
# softmax over specialists (Eq. 2). `esmerge.signals.layerwise` implements each step as a pure function.

# %% tags=["parameters", "remove-cell"]
# esmerge-needs: 03_probe
scale = "cpu"
seed = 0
device = None  # None: the scale's (the CPU at smoke and cpu); "cuda" runs the same chapter on a GPU
specialist_seeds = None  # None: the scale's (ScaleConfig.specialist_seeds)
probe_k = None
tau = 0.5
n_projections = 1024
stability_sizes = (32, 256, 1024)
stability_seeds = 5

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from esmerge import plots, scales
from esmerge.methods.es_signals import signals
from esmerge.paths import run_dir
from esmerge.report.display import Numbered
from esmerge.run.merge import build_context
from esmerge.signals import diagnostics, layerwise, sliced

config = scales.get(scale, device=device)  # the scale's settings, resolved once (an unknown name is refused here)
out = run_dir(scale, "04_layerwise")
book = Numbered(4)
specialist_seeds = tuple(specialist_seeds or config.specialist_seeds)
context = build_context(config, seed, probe_k, specialist_seed=specialist_seeds[0])
names = list(context.specialists)
adapters = [s.adapter for s in context.specialists.values()]
sig = signals(adapters, context, seed=seed, need_scores=False, n_projections=n_projections)
swd, states = sig["swd"], sig["states"]
modalities = list(sig["probes"].positions)
K, L = len(sig["probes"]), swd.shape[-1]
caption = f"scale={scale}, seed={seed}, K={K} probes per modality, {n_projections} projections, p=2"
print(caption)

# %% [markdown]
# ## Specialised vs non-specialised tokens (paper Fig. 2)
#
# Solid: SWD on the specialist's own modality; dashed: mean SWD on the other two modalities.

# %% tags=["hide-input"]
own, other = diagnostics.own_vs_other(swd, [modalities.index(n) for n in names])
fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6), sharey=False)
layers = np.arange(1, L + 1)
for ax, j, name in zip(axes, range(len(names)), names):
    ax.plot(layers, own[j], color=plots.MODALITY_COLORS[name], lw=2, label=f"{name} tokens (own)")
    ax.plot(layers, other[j], color=plots.MODALITY_COLORS[name], lw=2, ls="--", label="other modalities")
    ax.set_title(f"{name} specialist"), ax.set_xlabel("block l"), ax.set_ylabel("SWD(base, specialist)")
    ax.legend(frameon=False, fontsize=8)
fig.suptitle(f"Layer-wise SWD on specialised vs non-specialised tokens; {caption}", y=1.04)
plots.save(fig, out, "fig2_swd_own_vs_other")
gap = pd.DataFrame(diagnostics.specialisation_table(swd, [modalities.index(n) for n in names]), index=names)
gap.index.name = "specialist"
gap.to_csv(out / "fig2_summary.csv")
book.figure(fig, "SWD between the base's and each specialist's mean-pooled block states, on the specialist's own "
            f"modality (solid) and averaged over the other two (dashed); {caption}. Own-modality SWD is the larger at "
            + ", ".join(f"{n}: {row.blocks_above}/{L}" for n, row in gap.iterrows()) + " blocks.")
for name, row in gap.iterrows():
    print(f"{name} specialist: own-modality SWD exceeds other-modality SWD at {row.blocks_above}/{L} blocks "
          f"(mean ratio {row.mean_ratio:.2f}); the paper's Fig. 2 pattern {'holds' if row.passes else 'does NOT hold'} here.")  # noqa: E501
book.table(gap, "The Fig. 2 test per specialist: blocks where own-modality SWD exceeds other-modality SWD, "
           f"mean own/other ratio over blocks, and whether the paper's pattern holds; {caption}.", digits=3)

# %% [markdown]
# ## Fig. 2 at every specialist seed
#
# The seed-0 specialists were chosen because they pass the test above: an earlier molecule
# specialist failed it (see "Massive-activation tokens" below), and the recipe was changed until
# the seed-0 set passed. Its three "holds" are therefore true by construction. The specialists of
# the other seeds were trained with the same recipes, seeds fixed before any of their results were
# seen, and are reported here unselected: they are the test's honest replicates.

# %% tags=["hide-input"]
own_index = [modalities.index(n) for n in names]
swds = {specialist_seeds[0]: swd}
for s in specialist_seeds[1:]:
    seed_context = build_context(config, seed, probe_k, specialist_seed=s)
    swds[s] = signals([sp.adapter for sp in seed_context.specialists.values()], seed_context, seed=seed,
                      need_scores=False, n_projections=n_projections)["swd"]
by_seed = diagnostics.specialisation_by_seed(swds, own_index, names)
by_seed.to_csv(out / "fig2_by_seed.csv", index=False)
fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.2), sharey=True)
for ax, j, name in zip(axes, range(len(names)), names):
    for s, seed_swd in swds.items():
        seed_own, seed_other = diagnostics.own_vs_other(seed_swd, own_index)
        ax.plot(layers, (seed_own[j] / seed_other[j]).numpy(), color=plots.MODALITY_COLORS[name],
                lw=2 if s == specialist_seeds[0] else 1, ls="-" if s == specialist_seeds[0] else "--",
                label=f"seed {s}" + (" (selected)" if s == specialist_seeds[0] else ""))
    ax.axhline(1, color="k", lw=0.8)
    ax.set(title=f"{name} specialist", xlabel="block l", ylabel="own / other SWD")
    ax.legend(frameon=False, fontsize=8)
fig.suptitle(f"Fig. 2 test at every specialist seed (ratio above 1: own modality moved more); {caption}",
             y=1.04, fontsize=9)
plots.save(fig, out, "fig2_by_seed")
passes = by_seed.groupby("seed")["passes"].sum()
book.figure(fig, "Own/other SWD ratio per block for each specialist at every specialist seed (bold: seed "
            f"{specialist_seeds[0]}, selected by this test; dashed: unselected replicates); {caption}. Specialists "
            "passing: " + ", ".join(f"seed {s}: {n} of {len(names)}" for s, n in passes.items()) + ".")
print("Specialists passing the Fig. 2 test per seed: "
      + ", ".join(f"seed {s}: {n} of {len(names)}" for s, n in passes.items())
      + f"; seed {specialist_seeds[0]} was selected by this test")
book.table(by_seed, f"The Fig. 2 test per specialist seed and specialist (seed {specialist_seeds[0]} selected by "
           f"it, the others unselected replicates); {caption}.", digits=3)

# %% [markdown]
# ## Massive-activation tokens
#
# A token whose state norm exceeds 20x the median of its block (`diagnostics.massive_tokens`)
# dominates a mean-pooled state, and with it the SWD. Our first cpu molecule specialist, trained
# with its projector at the full learning rate, produced such tokens and failed the Fig. 2 test
# (`book/paper_vs_code.md`). The most massive tokens at any block, per model and input modality:

# %% tags=["hide-input"]
massive = pd.DataFrame(diagnostics.massive_token_counts({m: states[m]["tokens"] for m in ["base", *names]})).T
massive.index.name = "model"
massive.to_csv(out / "massive_tokens.csv")
book.table(massive, "Largest per-block count of massive-activation tokens (state norm above 20x the block's median) "
           f"per model (rows) and input modality (columns); {caption}.")

# %% [markdown]
# ## Layer-wise coefficients (paper Fig. 5)
#
# Column l is the coefficient of each specialist at block l (Eq. 2, tau as set above); each
# column sums to one.

# %% tags=["hide-input"]
alpha = layerwise.layer_coefficients(swd, tau)
fig, ax = plt.subplots(figsize=(min(2 + 0.35 * L, 14), 2.4))
plots.coefficient_heatmap(ax, alpha.numpy(), names, f"Layer-wise coefficients alpha (tau={tau}); {caption}",
                          vmin=0, vmax=1, xlabel="block l (0-based)")
plots.save(fig, out, "fig5_layer_coefficients")
book.figure(fig, f"Layer-wise coefficient alpha of each specialist (rows) at each block (columns; Eq. 2, tau={tau}); "
            f"each column sums to one; {caption}. Blocks where each specialist has the largest alpha: "
            + ", ".join(f"{names[j]} {int((alpha.argmax(0) == j).sum())}" for j in range(len(names)))
            + f" (of {L}).")
pd.DataFrame(alpha.numpy(), index=names).to_csv(out / "alpha.csv")
book.table(pd.DataFrame({"specialist": names, "mean alpha": alpha.mean(1).numpy(),
                         "max alpha": alpha.max(1).values.numpy(), "argmax block": alpha.argmax(1).numpy()}),
           f"Mean and largest layer coefficient of each specialist over blocks, and the block (0-based) where it "
           f"peaks; tau={tau}, {caption}.", digits=3)

# %% [markdown]
# ## Stability vs number of projections (paper Table 7 analogue)
#
# The paper reports downstream accuracy for 32/256/1024 projections. Here we measure the quantity
# those projections control directly: the spread of the layer coefficients across projection
# seeds (standard deviation over seeds, averaged over specialists and layers).

# %% tags=["hide-input"]
alphas = diagnostics.projection_stability(states["base"]["pooled"], [states[n]["pooled"] for n in names],
                                        stability_sizes, range(stability_seeds), tau)
stability = pd.DataFrame([{"projections": size, "seeds": stability_seeds,
                           "mean std of alpha over seeds": float(a.std(0, unbiased=True).mean()),
                           "max std": float(a.std(0, unbiased=True).max())} for size, a in alphas.items()])
stability.to_csv(out / "table7_projection_stability.csv", index=False)
book.table(stability, f"Spread of the layer coefficients alpha across {stability_seeds} projection seeds per number "
           f"of projections (std over seeds, mean and max over specialists and blocks); tau={tau}, {caption}.",
           digits=3)

# %% [markdown]
# ## Paper vs official code: standardisation and subsampling before SWD
#
# The official code z-scores base and specialist states jointly before SWD and subsamples both
# sets to equal size. The paper mentions neither; we implement the paper by default and measure
# what the code's choice changes in alpha.

# %% tags=["hide-input"]
swd_code = sliced.swd_table(states["base"]["pooled"], [states[n]["pooled"] for n in names],
                               n_projections, seed=seed, standardize=True, equal_size=K)
alpha_code = layerwise.layer_coefficients(swd_code, tau)
effect = pd.DataFrame([{
    "setting": "joint standardisation before SWD (code)",
    "mean |delta alpha|": float((alpha_code - alpha).abs().mean()),
    "max |delta alpha|": float((alpha_code - alpha).abs().max()),
    "blocks whose top specialist changes": int((alpha_code.argmax(0) != alpha.argmax(0)).sum()),
    "of blocks": L}])
effect.to_csv(out / "code_vs_paper_swd.csv", index=False)
book.table(effect, "Change in alpha when base and specialist states are jointly z-scored and subsampled to equal "
           f"size before SWD (official code) instead of as the paper describes; tau={tau}, {caption}.", digits=3)
