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

# %% tags=["parameters"]
# esmerge-needs: 04_layerwise
scale = "cpu"
seed = 0
probe_k = None
tau_layer = 0.5
tau_element = 0.5
code_distance = True  # also compute MSE-based scores (official code) to measure the difference

# %%
import matplotlib.pyplot as plt
import torch

from esmerge import plots
from esmerge.methods.es import coefficients_from_signals
from esmerge.methods.es_signals import signals
from esmerge.paths import run_dir
from esmerge.report import es_coefficients
from esmerge.run.merge import build_context
from esmerge.specialists.adapters import parse_key

out = run_dir(scale, "05_elementwise")
context = build_context(scale, seed, probe_k)
names = list(context.specialists)
adapters = [s.adapter for s in context.specialists.values()]
sig = signals(adapters, context, seed=seed, need_scores=True)
K, L = len(sig["probes"]), sig["swd"].shape[-1]
settings = {"tau_layer": tau_layer, "tau_element": tau_element, "per_tensor": False}
alpha, beta, lam = coefficients_from_signals(sig, adapters[0].state, settings)
caption = f"scale={scale}, seed={seed}, K={K} probes per modality, tau={tau_element}"
print(f"{caption}; signals took {sig['seconds']:.0f} s (0 when cached)")


# %%
def coefficient_map(coefs: dict, layer: int, module: str, part: str) -> torch.Tensor:
    """[S, rows, cols] coefficients of one LoRA matrix."""
    key = next(k for k in coefs if parse_key(k) == (layer, module, part))
    return coefs[key]


def module_grid(coefs: dict, layers: list[int], module: str, title: str, name: str):
    """One module: rows are (layer, LoRA-A/B), columns the three specialists; one shared colour scale."""
    rows = [(l, p) for l in layers for p in "AB"]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(3.4 * len(names), 1.25 * len(rows)), squeeze=False)
    for r, (layer, part) in enumerate(rows):
        m = coefficient_map(coefs, layer, module, part)
        for j, spec in enumerate(names):
            img = m[j] if part == "A" else m[j].T  # B is [d_out, r]: show r as rows like A
            im = axes[r, j].imshow(img.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            axes[r, j].set_xticks([]), axes[r, j].set_yticks([])
            if r == 0:
                axes[r, j].set_title(spec)
            if j == 0:
                axes[r, j].set_ylabel(f"L{layer} {part}", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01)
    fig.suptitle(f"{module}: {title}", y=1.04)
    plots.save(fig, out, f"{name}_{module}")
    plt.show()


four_layers = sorted({0, L // 3, (2 * L) // 3, L - 1})
attn = ["q_proj", "k_proj", "v_proj", "o_proj"]

# %% [markdown]
# ## Element-wise coefficients inside the molecule specialist's top layer (paper Fig. 6)
#
# The block where the molecule specialist's layer coefficient is largest; bars show, per module
# and LoRA matrix, how the element coefficients of the molecule specialist spread.

# %%
mol = names.index("molecule")
top = int(alpha[mol].argmax())
modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
fig, ax = plt.subplots(figsize=(11, 3.4))
data = [coefficient_map(beta, top, mod, part)[mol].flatten().numpy() for mod in modules for part in "AB"]
ax.violinplot(data, showmedians=True)
ax.axhline(1 / len(names), color="grey", ls=":", label="uniform 1/3")
ax.set_xticks(range(1, len(data) + 1), [f"{m}\n{p}" for m in modules for p in "AB"], fontsize=7)
ax.set_ylabel("beta (molecule)")
ax.set_title(f"Molecule specialist's element coefficients in block {top} (alpha={alpha[mol, top]:.2f}); {caption}")
ax.legend(frameon=False)
plots.save(fig, out, "fig6_molecule_top_layer")
plt.show()

# %% [markdown]
# ## Element-wise coefficients of q/k/v/o at four layers (paper Fig. 9)
#
# One figure per attention projection (paper Fig. 9 a-d). Rows are the four layers' LoRA-A and
# LoRA-B matrices (rank on the vertical axis), columns the specialists; each pixel is one
# element's coefficient beta (yellow = high). Uniform coefficients would be 1/3 everywhere.

# %%
for module in attn:
    module_grid(beta, four_layers, module, f"element-wise coefficients beta; {caption}", "fig9_element_coefficients")

# %% [markdown]
# ## Combined coefficients (paper Fig. 10)
#
# The same elements after Eq. 4: the layer coefficient rescales each layer while the
# element-level pattern stays.

# %%
for module in attn:
    module_grid(lam, four_layers, module, f"combined coefficients lambda (Eq. 4); {caption}",
                "fig10_combined_coefficients")
summary = es_coefficients.coefficient_summary(alpha, beta, lam, names)
summary.to_csv(out / "coefficient_summary.csv", index=False)
summary

# %% [markdown]
# ## The merged model's tokens (paper Fig. 8)
#
# Last-block tokens of each specialist and of the ES-merged model. The paper reports the merged
# model sitting between the specialists, closest to the matching specialist on each modality.

# %%
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
plt.show()
closest = es_coefficients.merged_distances(merged_states, states, names, last)
closest.to_csv(out / "fig8_distances.csv")
for modality, (nearest, matches) in es_coefficients.nearest_specialists(closest).items():
    print(f"{modality} tokens: the merged model is nearest the {nearest} specialist"
          f" ({'as the paper reports' if matches else 'NOT the matching specialist, unlike the paper'}).")
closest.style.format("{:.3f}").highlight_min(axis=1)

# %% [markdown]
# ## Paper vs official code: element-wise settings
#
# The official code uses tau = 0.1 for the element-wise softmax, mean squared error instead of
# the Frobenius norm, and z-scores within each LoRA tensor rather than within each layer. Each
# row changes one setting and reports how much the final coefficients lambda move.

# %%
mse_scores = signals(adapters, context, seed=seed, need_scores=True,
                     distance="mse")["scores"] if code_distance else None
code_effect = es_coefficients.code_vs_paper_element(sig["scores"], alpha, lam, tau_element, mse_scores)
code_effect.to_csv(out / "code_vs_paper_element.csv", index=False)
code_effect
