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
# # Element-wise coefficients
#
# Within a layer, some LoRA weights matter more than others. ES-Merging scores every LoRA
# element by how strongly the token-level distance between base and specialist states at its
# own layer reacts to it: the absolute gradient, summed over probe samples and modalities
# (paper §4.3). Scores are z-scored within each layer and turned into coefficients by a softmax
# over specialists (Eq. 3), then multiplied with the layer coefficients and renormalised
# (Eq. 4). `esmerge.signals.elementwise` computes the per-sample gradients with each layer's input
# detached, so the distance at layer l is differentiated through layer l's parameters only; a
# test checks these gradients against finite differences.

# %% tags=["parameters", "remove-cell"]
# esmerge-needs: 04_layerwise
scale = "cpu"
seed = 0
device = None  # None: the scale's (the CPU at smoke and cpu); "cuda" runs the same chapter on a GPU
probe_k = None
tau_layer = 0.5
tau_element = 0.5
code_distance = True  # also compute MSE-based scores (official code) to measure the difference

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import torch

from esmerge import plots, scales
from esmerge.methods.es import coefficients_from_signals
from esmerge.methods.es_signals import signals
from esmerge.paths import run_dir
from esmerge.report import es_coefficients
from esmerge.report.display import Numbered
from esmerge.report.es_ablation import ablation_table, differences_table
from esmerge.run.merge import build_context

config = scales.get(scale, device=device)  # the scale's settings, resolved once (an unknown name is refused here)
out = run_dir(scale, "05_elementwise")
book = Numbered(5)
context = build_context(config, seed, probe_k)
names = list(context.specialists)
adapters = [s.adapter for s in context.specialists.values()]
sig = signals(adapters, context, seed=seed, need_scores=True)
K, L = len(sig["probes"]), sig["swd"].shape[-1]
settings = {"tau_layer": tau_layer, "tau_element": tau_element, "per_tensor": False}
alpha, beta, lam = coefficients_from_signals(sig, adapters[0].state, settings)
caption = f"scale={scale}, seed={seed}, K={K} probes per modality, tau={tau_element}"
print(f"{caption}; signals took {sig['seconds']:.0f} s (0 when cached)")


# %% tags=["hide-input"]
four_layers = sorted({0, L // 3, (2 * L) // 3, L - 1})
attn = ["q_proj", "k_proj", "v_proj", "o_proj"]


def module_means(coefs, module):
    """Each specialist's mean coefficient over one module's LoRA A and B elements at `four_layers` (for captions)."""
    maps = [es_coefficients.coefficient_map(coefs, layer, module, part) for layer in four_layers for part in "AB"]
    return ", ".join(f"{n} {float(torch.cat([m[j].flatten() for m in maps]).mean()):.3f}" for j, n in enumerate(names))

# %% [markdown]
# ## Element-wise coefficients inside the molecule specialist's top layer (paper Fig. 6)
#
# The block where the molecule specialist's layer coefficient is largest; bars show, per module
# and LoRA matrix, how the element coefficients of the molecule specialist spread.

# %% tags=["hide-input"]
mol = names.index("molecule")
top = int(alpha[mol].argmax())
modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
fig, ax = plt.subplots(figsize=(11, 3.4))
data = [es_coefficients.coefficient_map(beta, top, mod, part)[mol].flatten().numpy()
        for mod in modules for part in "AB"]
ax.violinplot(data, showmedians=True)
ax.axhline(1 / len(names), color="grey", ls=":", label="uniform 1/3")
ax.set_xticks(range(1, len(data) + 1), [f"{m}\n{p}" for m in modules for p in "AB"], fontsize=7)
ax.set_ylabel("beta (molecule)")
ax.set_title(f"Molecule specialist's element coefficients in block {top} (alpha={alpha[mol, top]:.2f}); {caption}")
ax.legend(frameon=False)
plots.save(fig, out, "fig6_molecule_top_layer")
above = sum(int((d > 1 / len(names)).sum()) for d in data) / sum(d.size for d in data)
book.figure(fig, f"Distribution of the molecule specialist's element coefficients beta in each module's LoRA A and B "
            f"matrices at block {top}, where its layer coefficient is largest (alpha={alpha[mol, top]:.2f}); dotted: "
            f"uniform 1/{len(names)}; {caption}. {above:.0%} of these elements are above uniform.")

# %% [markdown]
# ## Element-wise coefficients of q/k/v/o at four layers (paper Fig. 9)
#
# One figure per attention projection (paper Fig. 9 a-d). Rows are the four layers' LoRA-A and
# LoRA-B matrices (rank on the vertical axis), columns the specialists; each pixel is one
# element's coefficient beta (yellow = high). Uniform coefficients would be 1/3 everywhere.

# %% tags=["hide-input"]
for module in attn:
    fig = es_coefficients.module_grid(beta, four_layers, module, names, f"element-wise coefficients beta; {caption}")
    plots.save(fig, out, f"fig9_element_coefficients_{module}")
    book.figure(fig, f"Element-wise coefficients beta of the {module} LoRA A and B matrices (rank vertical) at blocks "
                f"{', '.join(map(str, four_layers))} (rows), per specialist (columns); {caption}. Mean beta per "
                f"specialist: {module_means(beta, module)} (uniform: {1 / len(names):.3f}).")

# %% [markdown]
# ## Combined coefficients (paper Fig. 10)
#
# The same elements after Eq. 4: the layer coefficient rescales each layer while the
# element-level pattern stays.

# %% tags=["hide-input"]
for module in attn:
    fig = es_coefficients.module_grid(lam, four_layers, module, names,
                                      f"combined coefficients lambda (Eq. 4); {caption}")
    plots.save(fig, out, f"fig10_combined_coefficients_{module}")
    book.figure(fig, f"Combined coefficients lambda (Eq. 4) of the {module} LoRA A and B matrices at blocks "
                f"{', '.join(map(str, four_layers))} (rows), per specialist (columns); {caption}. Mean lambda per "
                f"specialist: {module_means(lam, module)}.")
summary = es_coefficients.coefficient_summary(alpha, beta, lam, names)
summary.to_csv(out / "coefficient_summary.csv", index=False)
book.table(summary, "Per specialist, the mean layer (alpha), element (beta) and combined (lambda) coefficient over "
           f"all LoRA elements, and the share of elements where its lambda is the largest; {caption}.", digits=3)

# %% [markdown]
# ## The merged model's tokens (paper Fig. 8)
#
# Last-block tokens of each specialist and of the ES-merged model. The paper reports the merged
# model sitting between the specialists, closest to the matching specialist on each modality.

# %% tags=["hide-input"]
probes, states = sig["probes"], sig["states"]
merged_states = es_coefficients.merged_states(context.base.model, es_coefficients.merged_adapter(adapters, lam), probes)
last = L - 1
fig, axes = plt.subplots(1, len(probes.positions), figsize=(5 * len(probes.positions), 4.4))
for ax, modality in zip(axes, probes.positions):
    groups = {f"{n} specialist": states[n]["tokens"][modality][last] for n in names}
    groups["ES-merged"] = merged_states["tokens"][modality][last]
    colors = {f"{n} specialist": plots.MODALITY_COLORS[n] for n in names} | {
        "ES-merged": plots.MODALITY_COLORS["merged"]}
    plots.embedding_scatter(ax, plots.project_2d(groups, "pca", seed), colors, f"{modality} tokens, block {last + 1}")
fig.suptitle(f"Specialists and the ES-merged model, last block (PCA); {caption}", y=1.04)
plots.save(fig, out, "fig8_merged_embeddings")
closest = es_coefficients.merged_distances(merged_states, states, names, last)
closest.to_csv(out / "fig8_distances.csv")
nearest_by_modality = es_coefficients.nearest_specialists(closest)
book.figure(fig, f"Joint 2-D PCA of each modality's token states at the last block ({last + 1}) for each specialist "
            f"and the ES-merged model; {caption}. The merged model is nearest the matching specialist on "
            f"{sum(matches for _, matches in nearest_by_modality.values())} of {len(nearest_by_modality)} "
            "modalities (Table 5.2).")
for modality, (nearest, matches) in nearest_by_modality.items():
    print(f"{modality} tokens: the merged model is nearest the {nearest} specialist"
          f" ({'as the paper reports' if matches else 'NOT the matching specialist, unlike the paper'}).")
book.table(closest, f"Mean distance between the ES-merged model's and each specialist's (columns) pooled states in "
           f"the last block ({last + 1}), per input modality (rows); the smallest in each row is the nearest "
           f"specialist; {caption}.", digits=3)

# %% [markdown]
# ## Paper vs official code: element-wise settings
#
# The official code uses tau = 0.1 for the element-wise softmax, mean squared error instead of
# the Frobenius norm, and z-scores within each LoRA tensor rather than within each layer. Each
# row changes one setting and reports how much the final coefficients lambda move.

# %% tags=["hide-input"]
mse_scores = signals(adapters, context, seed=seed, need_scores=True,
                     distance="mse")["scores"] if code_distance else None
code_effect = es_coefficients.code_vs_paper_element(sig["scores"], alpha, lam, tau_element, mse_scores)
code_effect.to_csv(out / "code_vs_paper_element.csv", index=False)
book.table(code_effect, "How far the final coefficients lambda move when one element-wise setting (one per row) "
           "follows the official code instead of the paper, and the share of elements whose top specialist changes; "
           f"{caption}.", digits=3)

# %% [markdown]
# ## Paper vs official code: every difference, measured at `cpu` scale
#
# The book's page "Paper vs official code" lists every place where the authors' public code does
# something the paper does not say, with the `es` option that selects it. Below, each difference's
# effect on the coefficients when it alone is switched on (`benchmarks/es_code_diffs.py`), then the
# retention each ES variant reaches (`benchmarks/es_code_ablation.py`; the measure of the retention
# chapter, 200 held-out examples per modality, specialist seed 0, paired CIs of the difference from
# the paper's settings). Both were computed at `cpu` scale by those scripts, whose outputs this
# chapter reads; at other scales the tables are the `cpu` ones.

# %% tags=["hide-input"]
book.table(differences_table(), "What each official-code choice alone changes in the layer (alpha) or element (beta) "
           "coefficients at cpu scale: mean and largest absolute change, and the blocks or the share of elements "
           "whose top specialist changes.", digits=3)

# %% tags=["hide-input"]
book.table(ablation_table(), "Retained fraction of the specialists' held-out skill [95 % CI] for ES-Merging with the "
           "paper's settings, the official code's, and each of the three element-score differences alone; the last "
           "column is the paired difference from the paper's settings (cpu scale, specialist seed 0).")
