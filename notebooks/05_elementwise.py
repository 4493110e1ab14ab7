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
# (Eq. 4). `esmerge.elementwise` computes the per-sample gradients with each layer's input
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
import pandas as pd
import torch

from esmerge import elementwise, layerwise, plots, probe
from esmerge.adapters import attach, parse_key
from esmerge.merge import build_context, combine, merge_lora
from esmerge.methods.es import signals
from esmerge.paths import run_dir

out = run_dir(scale, "05_elementwise")
context = build_context(scale, seed, probe_k)
names = list(context.specialists)
adapters = [s.adapter for s in context.specialists.values()]
sig = signals(adapters, context, seed=seed, need_scores=True)
K, L = len(sig["probes"]), sig["swd"].shape[-1]
alpha = layerwise.layer_coefficients(sig["swd"], tau_layer)
beta = elementwise.element_coefficients(sig["scores"], tau_element)
lam = combine(alpha, beta)
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
    module_grid(lam, four_layers, module, f"combined coefficients lambda (Eq. 4); {caption}", "fig10_combined_coefficients")
summary = pd.DataFrame([{
    "specialist": n,
    "mean alpha": float(alpha[j].mean()),
    "mean beta": float(torch.cat([b[j].flatten() for b in beta.values()]).mean()),
    "mean lambda": float(torch.cat([v[j].flatten() for v in lam.values()]).mean()),
    "share of elements where it has the largest lambda": float(
        torch.cat([(v.argmax(0) == j).flatten().float() for v in lam.values()]).mean()),
} for j, n in enumerate(names)])
summary.to_csv(out / "coefficient_summary.csv", index=False)
summary

# %% [markdown]
# ## The merged model's tokens (paper Fig. 8)
#
# Last-block tokens of each specialist and of the ES-merged model. The paper reports the merged
# model sitting between the specialists, closest to the matching specialist on each modality.

# %%
merged = merge_lora([a.state for a in adapters], lam)
from esmerge.adapters import with_state

probes, states = sig["probes"], sig["states"]
peft_model = attach(context.base.model, {"es": with_state(adapters[0], merged, "es")})
try:
    merged_states = probe.hidden_states(peft_model, probes)
finally:
    peft_model.unload()
last = L - 1
fig, axes = plt.subplots(1, len(probes.positions), figsize=(5 * len(probes.positions), 4.4))
distances = []
for ax, modality in zip(axes, probes.positions):
    groups = {f"{n} specialist": states[n]["tokens"][modality][last] for n in names}
    groups["ES-merged"] = merged_states["tokens"][modality][last]
    colors = {f"{n} specialist": plots.MODALITY_COLORS[n] for n in names} | {"ES-merged": plots.MODALITY_COLORS["merged"]}
    plots.embedding_scatter(ax, plots.project_2d(groups, "pca", seed), colors, f"{modality} tokens, block {last + 1}")
    for n in names:
        d = (merged_states["pooled"][modality][last] - states[n]["pooled"][modality][last]).norm(dim=-1).mean()
        distances.append({"modality tokens": modality, "specialist": n, "mean distance merged-specialist": float(d)})
fig.suptitle(f"Specialists and the ES-merged model, last block (PCA); {caption}", y=1.04)
plots.save(fig, out, "fig8_merged_embeddings")
plt.show()
closest = pd.DataFrame(distances).pivot(index="modality tokens", columns="specialist", values="mean distance merged-specialist")
closest.to_csv(out / "fig8_distances.csv")
for modality in closest.index:
    nearest = closest.loc[modality].idxmin()
    print(f"{modality} tokens: the merged model is nearest the {nearest} specialist"
          f" ({'as the paper reports' if nearest == modality else 'NOT the matching specialist, unlike the paper'}).")
closest.style.format("{:.3f}").highlight_min(axis=1)

# %% [markdown]
# ## Paper vs official code: element-wise settings
#
# The official code uses tau = 0.1 for the element-wise softmax, mean squared error instead of
# the Frobenius norm, and z-scores within each LoRA tensor rather than within each layer. Each
# row changes one setting and reports how much the final coefficients lambda move.

# %%
def effect(label, lam_other):
    delta = torch.cat([(lam_other[k] - lam[k]).abs().flatten() for k in lam])
    flips = torch.cat([(lam_other[k].argmax(0) != lam[k].argmax(0)).flatten().float() for k in lam])
    return {"setting": label, "mean |delta lambda|": float(delta.mean()), "max |delta lambda|": float(delta.max()),
            "elements whose top specialist changes": float(flips.mean())}


rows = [effect("element tau 0.1 (code)", combine(alpha, elementwise.element_coefficients(sig["scores"], 0.1))),
        effect("per-tensor z-score (code)",
               combine(alpha, elementwise.element_coefficients(sig["scores"], tau_element, per_tensor=True)))]
if code_distance:
    sig_mse = signals(adapters, context, seed=seed, need_scores=True, distance="mse")
    rows.append(effect("MSE instead of Frobenius (code)",
                       combine(alpha, elementwise.element_coefficients(sig_mse["scores"], tau_element))))
code_effect = pd.DataFrame(rows)
code_effect.to_csv(out / "code_vs_paper_element.csv", index=False)
code_effect
