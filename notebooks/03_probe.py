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
# # Probe inputs
#
# ES-Merging reads each specialist through its *embedding space* (paper §4.1). A probe sample
# holds one token block per modality behind a short text prefix: a molecule's projector tokens,
# a protein's projector tokens, and a cell's top genes as text. The same probe embeddings go
# through the base LLM (LoRA off) and through every specialist, and the hidden states of each
# block are kept at the output of every transformer block.
#
# Probe entities are sampled (seeded) from held-out sets, as in the paper's App. A.3: ChEBI-20
# *test* molecules, Swiss-Prot/FAPM *test* proteins, and CCLE cell lines the cell specialist
# did not train on.

# %% tags=["parameters", "remove-cell"]
# esmerge-needs: 02_specialists
scale = "cpu"
seed = 0
device = None  # None: the scale's (the CPU at smoke and cpu); "cuda" runs the same chapter on a GPU
# probe samples per modality; None means the scale default, 110 as in the paper at cpu scale
probe_k = None
embedding_method = "pca"  # or "tsne"

# %% tags=["hide-input"]
import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display

from esmerge import plots, scales
from esmerge.methods.es_signals import signals
from esmerge.paths import run_dir
from esmerge.report.display import Numbered
from esmerge.run.merge import build_context

config = scales.get(scale, device=device)  # the scale's settings, resolved once (an unknown name is refused here)
out = run_dir(scale, "03_probe")
book = Numbered(3)
context = build_context(config, seed, probe_k)
adapters = [s.adapter for s in context.specialists.values()]
sig = signals(adapters, context, seed=seed, need_scores=False)
probes, states = sig["probes"], sig["states"]
K = len(probes)
print(f"scale={scale} seed={seed} K={K} probe samples per modality; base: {context.base.name}")

# %% [markdown]
# ## The probe template (paper Fig. 4)
#
# `<|molecule|>`, `<|protein|>` and `<|cell|>` mark where each modality's token block is spliced
# into the input embeddings.

# %% tags=["hide-input"]
display(Markdown("```text\n" + probes.template + "\n```"))
layout = pd.DataFrame(
    [{"modality": m, "first position": int(p[0]), "tokens in block": len(p),
      "example input": str(probes.raw[m][0])[:70]} for m, p in probes.positions.items()])
layout.to_csv(out / "probe_layout.csv", index=False)
print(f"probe length T = {probes.embeds.shape[1]} tokens, hidden size d = {probes.embeds.shape[2]}")
book.table(layout, f"Where each modality's token block sits in the probe (T={probes.embeds.shape[1]} tokens) and "
           f"an example input of the block; scale={scale}, seed={seed}, K={K} probe samples per modality.")

# %% [markdown]
# ## Modality tokens in the last block (paper Fig. 1 and Fig. 8 a-c)
#
# Each panel embeds one modality's tokens at the output of the last transformer block, for the
# base LLM and each specialist, jointly in 2-D. The paper observes that the specialist of the
# matching modality moves its tokens furthest from the base.

# %% tags=["hide-input"]
last = context.base.num_layers - 1
names = ["base"] + list(context.specialists)
colors = {"base": plots.MODALITY_COLORS["base"], **{m: plots.MODALITY_COLORS[m] for m in context.specialists}}
fig, axes = plt.subplots(1, len(probes.positions), figsize=(5 * len(probes.positions), 4.4))
for ax, modality in zip(axes, probes.positions):
    groups = {("base" if n == "base" else f"{n} specialist"): states[n]["tokens"][modality][last] for n in names}
    xy = plots.project_2d(groups, embedding_method, seed)
    plots.embedding_scatter(ax, xy, {("base" if n == "base" else f"{n} specialist"): colors[n] for n in names},
                            f"{modality} tokens, block {last + 1}")
fig.suptitle(f"Last-block token embeddings ({embedding_method.upper()}); scale={scale}, seed={seed}, "
             f"K={K} probes x block tokens per model", y=1.04)
plots.save(fig, out, "fig1_last_block_tokens")
book.figure(fig, f"Joint 2-D {embedding_method.upper()} embedding of each modality's token states at the output of "
            f"the last block ({last + 1}), for the base LLM and each specialist; scale={scale}, seed={seed}, K={K} "
            "probe samples per modality. Table 3.2 measures how far each specialist moves each modality.")

# %% [markdown]
# ## How far each specialist moves each modality
#
# Mean Frobenius distance per token between base and specialist states in the last block, by
# input modality (rows: specialists). The diagonal should dominate if specialisation is real.

# %% tags=["hide-input"]

rows = []
for name in context.specialists:
    row = {"specialist": name}
    for modality in probes.positions:
        diff = states[name]["tokens"][modality][last] - states["base"]["tokens"][modality][last]
        row[modality] = float(diff.norm(dim=-1).mean())
    rows.append(row)
shift = pd.DataFrame(rows).set_index("specialist")
shift.to_csv(out / "last_block_shift.csv")
own_largest = sum(shift.loc[name].idxmax() == name for name in shift.index)
book.table(shift, f"Mean Frobenius distance per token between base and specialist states in the last block "
           f"({last + 1}): rows the specialists, columns the input modality; scale={scale}, seed={seed}, K={K}. "
           f"{own_largest} of {len(shift)} specialists move their own modality furthest.", digits=3)
