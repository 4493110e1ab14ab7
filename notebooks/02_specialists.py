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
# # Specialists
#
# ES-Merging merges modality-specialised MLLMs that share one base LLM (paper §3, §5.1). The
# paper's specialists are Mol-LLaMA, Prot2Text-V2 and Cell-o1 on LLaMA-3.1-8B-Instruct; none of
# them runs on a laptop CPU, so at `cpu` scale we build our own three on SmolLM2-135M-Instruct.
# Each is the frozen base LLM plus
#
# * a **modality projector** (trained): fixed features (Morgan fingerprint + descriptors for a
#   molecule, amino-acid / dipeptide composition for a protein, `esmerge.specialists.encoders`) mapped by a
#   2-layer MLP to **8 tokens** in the LLM's embedding space, spliced into the prompt as
#   `inputs_embeds` (paper §3: $\mathbf H^0 = [\mathbf H_\text{text}; \mathbf H_m; \dots]$);
#   cells have no projector: like Cell-o1, a cell is text, its top-k genes comma-separated;
# * a **LoRA** (trained) with *one shared configuration* (r=8, alpha=32 on q/k/v/o/gate/up/down
#   of every block, paper App. A.3), so the three adapters merge element-wise (Eq. 1).
#
# | specialist | input | trained to write | training data | held out |
# |---|---|---|---|---|
# | molecule | SMILES -> 8 projector tokens | the ChEBI-20 description | ChEBI-20 `validation` | ChEBI-20 `test` |
# | protein | sequence -> 8 projector tokens | its Swiss-Prot GO terms (FAPM) | FAPM `val` | FAPM `test` |
# | cell | top-k genes as text | PBMC68k cell type; CCLE primary site + histology | 80% of PBMC cells and CCLE lines | a fixed seeded 20% |
#
# The probe (next chapter) draws its entities from the held-out sets, as the paper does
# (App. A.3). Molecules, proteins and cell lines that any benchmark uses are removed from
# training as well; each specialist's `card.json` lists what was excluded.
#
# Choices forced by the environment, and how they differ from the paper:
#
# * **Protein text.** Prot2Text-V2 learns free-text UniProt "Function" comments; those are not
#   obtainable here (only on a model hub), so the protein specialist writes the protein's
#   experimental GO terms (molecular function, biological process, cellular component) from
#   FAPM's Swiss-Prot files instead.
# * **Cell genes.** Cell-o1 reads the top 50 genes. SmolLM2's tokenizer spends ~4.5 tokens on a
#   gene symbol, so at `cpu` scale a cell is its top **12** genes (prompts up to ~135 tokens,
#   cell sequences capped at 160 tokens; molecule and protein sequences at 128). CCLE "top genes"
#   are the Enrichr up-regulated gene sets (see the Data chapter).
# * **Size of training.** AdamW on batches of 4 examples, on one CPU thread, 15 to 23 minutes
#   per specialist, versus full instruction tuning in the paper: the molecule and cell specialists
#   take 200 steps in fp32, the molecule projector learning at 0.1x the LoRA's rate (cells are
#   text, without a projector); the protein specialist takes 100 steps with bf16 autocast and one
#   learning rate (`scales.TrainRecipe`; Table 2.1 reads each card). A molecule projector at
#   the full rate made tokens that SmolLM2 turns into massive activations, and those broke the
#   paper's Fig. 2 pattern (the Layer-wise chapter and `paper_vs_code.md`). The point is not
#   captioning quality but a measurable, modality-specific change of the base, which is what
#   ES-Merging reads.
#
# Shipped `cpu` specialists live in `data_manifest/specialists/cpu/<modality>/` (a standard PEFT
# adapter directory + `projector.safetensors` + `card.json`), checked against the sha256 in
# `data_manifest/specialists.yaml` when loaded. Retrain one with
# `esmerge train --scale cpu --modality molecule --threads 1 --force`: the `cpu` recipe holds each
# modality's settings, so this reproduces the shipped card.
# At `smoke` scale three tiny specialists are trained in seconds on hand-made examples.

# %% tags=["parameters", "remove-cell"]
# esmerge-needs:
scale = "cpu"
seed = 0
device = None  # None: the scale's (the CPU at smoke and cpu); "cuda" runs the same chapter on a GPU
n_heldout = 32  # held-out examples per modality for the loss table
n_show = 2  # greedy answers shown per specialist

# %% tags=["hide-input"]
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import display

from esmerge import plots, scales
from esmerge.cache import cached, content_key, keyed_on_device
from esmerge.paths import run_dir
from esmerge.report.display import Numbered
from esmerge.specialists import captions, heldout
from esmerge.specialists import load as S
from esmerge.specialists.adapters import adapter_digest
from esmerge.specialists.base_llm import load_base
from esmerge.specialists.per_scale import load_specialists

torch.set_num_threads(1)
config = scales.get(scale, device=device)  # the scale's settings, resolved once (an unknown name is refused here)
out = run_dir(scale, "02_specialists")
book = Numbered(2)
base = load_base(config, seed=seed)
specs = load_specialists(config, base)
print(f"scale={scale} seed={seed} base: {base.name} ({base.num_layers} blocks, hidden {base.hidden_size})")

# %% [markdown]
# ## What was trained
#
# One row per specialist, from its `card.json`: the recipe, the data it saw, what was excluded,
# and the measured wall time.

# %% tags=["hide-input"]
rows = []
for m, spec in specs.items():
    c = spec.card
    excluded = {k: len(v) for k, v in c.get("exclusions", {}).items()}
    rows.append({
        "specialist": m, "steps": c["steps"], "batch": c["batch_size"], "lr": c["lr"], "max tokens": c["max_tokens"],
        "train examples": c["data"]["n_train"], "modality tokens": c["n_tokens"] or "genes as text",
        "loss (first 10 steps)": round(c["loss_first10"], 3), "loss (last 10 steps)": round(c["loss_last10"], 3),
        "wall time (min)": round(c["timings"]["wall_s"] / 60, 1), "s / step": c["timings"]["s_per_step"],
        "excluded": ", ".join(f"{k}: {v}" for k, v in excluded.items()) or "-",
    })
cards = pd.DataFrame(rows)
cards.to_csv(out / "specialist_cards.csv", index=False)
book.table(cards.assign(lr=cards["lr"].map("{:g}".format)),
           f"Recipe and outcome of each specialist, from its card.json (scale={scale}, seed={seed}, one training run "
           "each): steps, batch size, learning rate, token cap, training examples, mean training loss over the first "
           "and last 10 steps, wall time, and the benchmark entities excluded from training.", digits=3)

# %% [markdown]
# ## Loss curves
#
# Training loss (nats per answer token) at every step, and its 10-step moving average.

# %% tags=["hide-input"]
fig, axes = plt.subplots(1, len(specs), figsize=(4.6 * len(specs), 3.2), sharey=False)
for ax, (m, spec) in zip(np.atleast_1d(axes), specs.items()):
    curve = np.asarray(spec.card["loss_curve"])
    window = min(10, len(curve))
    smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
    ax.plot(np.arange(1, len(curve) + 1), curve, color=plots.MODALITY_COLORS[m], alpha=0.35, lw=1)
    ax.plot(np.arange(window, len(curve) + 1), smooth, color=plots.MODALITY_COLORS[m], lw=2)
    ax.set_title(f"{m} specialist (batch {spec.card['batch_size']})")
    ax.set_xlabel("step"), ax.set_ylabel("caption loss")
fig.suptitle(f"Training loss per specialist; scale={scale}, seed={seed}, n=1 run each", y=1.03)
plots.save(fig, out, "loss_curves")
book.figure(fig, "Training loss (nats per answer token) of each specialist at every step (faint) and its 10-step "
            f"moving average (bold); scale={scale}, seed={seed}, one run each. Mean loss over the first and last 10 "
            "steps: " + ", ".join(f"{m} {s.card['loss_first10']:.2f} to {s.card['loss_last10']:.2f}"
                                 for m, s in specs.items()) + ".")

# %% [markdown]
# ## Specialisation on held-out data
#
# Mean caption loss (nats per answer token) on `n_heldout` held-out examples of each modality,
# for the base and each specialist. **How the base sees a molecule or protein**: through the
# same projector as the specialists, the one trained with that modality's specialist (the
# modality's encoder $f_m$). This is how the probe feeds every model the same modality tokens
# (paper §4.1), so the rows differ only by their LoRA, the part that is merged. The base row is
# therefore "the molecule specialist with its LoRA removed" on molecules, and so on.
#
# A specialist has specialised if it beats the base on its own modality (the diagonal) by much
# more than on the others. At `smoke` scale the "held-out" examples are the hand-made training
# examples, so that table only checks the plumbing.

# %% tags=["hide-input"]
examples = {m: captions.heldout_examples(m, config, n_heldout, seed) for m in specs}
key = content_key(keyed_on_device(base.weights_sha256, base.model),
                  {m: adapter_digest(s.adapter) for m, s in specs.items()},
                  {m: [e.uid for e in ex] for m, ex in examples.items()}, captions.CODE_VERSION)
table = cached(out / f"heldout_loss-{key}.pt", lambda: heldout.cross_loss_table(base, specs, examples, config.train))
row_names = ["base"] + [f"{m} specialist" for m in specs]
loss = pd.DataFrame(table.numpy(), index=row_names, columns=[f"{m} (n={len(examples[m])})" for m in specs])
loss.to_csv(out / "heldout_loss.csv")
delta = pd.DataFrame((table[1:] - table[0]).numpy(), index=row_names[1:], columns=list(specs))
delta.to_csv(out / "heldout_loss_minus_base.csv")
n_shown = "/".join(str(n) for n in sorted({len(ex) for ex in examples.values()}))  # held-out n per modality
display(book.table(loss.rename_axis("model"), "Mean held-out caption loss (nats per answer token) of the base and "
                   "each specialist (rows) on each modality's held-out examples (columns, with n); "
                   f"scale={scale}, seed={seed}.", digits=3))
display(book.table(delta.rename_axis("specialist"), "Held-out caption loss of each specialist minus the base's "
                   f"(negative = better than the base), from Table 2.2; scale={scale}, seed={seed}, "
                   f"n={n_shown} per modality.", digits=3))

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(4.8, 3.2))
im = ax.imshow(delta.to_numpy(), cmap="RdBu", vmin=-abs(delta.to_numpy()).max(), vmax=abs(delta.to_numpy()).max())
ax.set_xticks(range(len(specs)), list(specs)), ax.set_yticks(range(len(specs)), row_names[1:])
ax.set_xlabel("held-out data of modality")
strong = 0.6 * abs(delta.to_numpy()).max()
for i in range(len(specs)):
    for j in range(len(specs)):
        value = delta.iat[i, j]
        ax.text(j, i, f"{value:+.2f}", ha="center", va="center", fontsize=9,
                color="white" if abs(value) > strong else "black")
fig.colorbar(im, ax=ax, label="loss - base loss")
ax.set_title(f"Held-out loss change vs base\nscale={scale}, seed={seed}, n={n_heldout} per modality", fontsize=9)
diagonal = np.diag(delta.to_numpy())
off = [np.delete(delta.to_numpy()[i], i).mean() for i in range(len(specs))]
plots.save(fig, out, "heldout_loss_delta")
book.figure(fig, "Held-out caption loss of each specialist minus the base's, by modality of the held-out data "
            f"(red: lower than the base; scale={scale}, seed={seed}, n={n_shown} per modality). "
            f"{int((diagonal < np.asarray(off)).sum())} of {len(specs)} specialists gain most on their own "
            "modality (own vs mean other: " + ", ".join(f"{m} {d:+.2f} vs {o:+.2f}"
                                                          for m, d, o in zip(specs, diagonal, off)) + ").")
summary = pd.DataFrame({"specialist": list(specs), "own-modality change": diagonal,
                        "mean change on other modalities": off,
                        "specialised (own < others)": diagonal < np.asarray(off)})
summary.to_csv(out / "specialisation_summary.csv", index=False)
book.table(summary, "Held-out loss change of each specialist on its own modality and on average on the other two; "
           "a specialist counts as specialised when its own-modality change is the lower; "
           f"scale={scale}, seed={seed}, n={n_shown} per modality.", digits=3)

# %% [markdown]
# With the shipped `cpu` specialists every specialist lowers the held-out loss on its own
# modality by far more than on the others, which is the modality-specific change ES-Merging's
# embedding signals are meant to pick up. Off-diagonal entries are mostly positive: a LoRA
# tuned to one kind of answer makes the base worse at the others. The exception to look for is
# the protein specialist on cells: its answers ("Molecular function: ... Biological process:
# ...") share the "Key: value." layout of the CCLE answers ("Primary site: ... Histology: ..."),
# so part of what it learned is answer *format*, not protein knowledge. The cell specialist's very
# low loss reflects short, repetitive answers (ten PBMC cell types, a few dozen CCLE sites).

# %% [markdown]
# ## What the specialists write
#
# Greedy answers to held-out prompts (at `cpu` scale; the `smoke` models are random and
# write bytes). The base answers through the same projector tokens. After 100 to 200 steps the
# specialists have learned each task's answer form (ChEBI's "The molecule is a ...", GO
# aspects, cell-type names) and some content (cell types are often right); their molecule and
# protein captions are generic and repetitive. This is a small-model, few-step stand-in for
# Mol-LLaMA and Prot2Text-V2, not a replacement.

# %% tags=["hide-input"]
if not config.random_models:
    shown = []
    for m, spec in specs.items():
        model = S.attach_specialist(base, spec)
        for ex in examples[m][:n_show]:
            shown.append({"specialist": m, "input": (ex.raw or ex.instruction)[:60], "reference": ex.answer[:160],
                          "specialist answer": heldout.generate_answer(model, base, spec.projector, ex)[:160],
                          "base answer": heldout.generate_answer(base.model, base, spec.projector, ex)[:160]})
        del model
    answers = pd.DataFrame(shown)
    answers.to_csv(out / "greedy_answers.csv", index=False)
    with pd.option_context("display.max_colwidth", 200):
        display(book.table(answers, f"Greedy answers of each specialist and of the base to {n_show} held-out prompts "
                           f"per modality, with the reference (scale={scale}, seed={seed}); inputs shortened to 60 "
                           "characters, answers to 160."))

# %% [markdown]
# The layer-wise view of the same specialisation, the SWD between base and specialist states on
# each modality's tokens at every block (paper Fig. 2), is in the Layer-wise chapter: it is
# computed from the probe states that chapter and the Probe chapter share.

# %% tags=["hide-input"]
print(json.dumps({m: {"steps": s.card["steps"], "wall_s": s.card["timings"]["wall_s"],
                      "loss_last10": round(s.card["loss_last10"], 3)} for m, s in specs.items()}, indent=1))
