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
# # Overview
#
# Specialist multimodal LLMs for biology each learn one modality: a molecule model, a protein
# model, a single-cell model, all built on the same base LLM with a small LoRA adapter and a
# projector that turns the modality into tokens. Questions such as "does this drug bind this
# protein?" or "does this drug kill this cell line?" need two modalities at once. Merging the
# adapters gives one model that reads both, without training on cross-modal data.
#
# ES-Merging {cite:p}`lee2026esmerging` chooses *how much* of each adapter to keep from what the
# adapters do to the model's hidden states, rather than from the adapter weights alone:
#
# 1. **Probe.** One input holds tokens of every modality; it is passed through the base LLM and
#    through each specialist, and the hidden states of every layer are kept.
# 2. **Layer-wise signal.** For each specialist and layer, the sliced Wasserstein distance
#    {cite:p}`bonneel2015sliced` between its hidden states and the base model's says how far that
#    specialist moved the representation there; where the distance *grows* most, the layer
#    matters most to that specialist.
# 3. **Element-wise signal.** The gradient of that representation shift with respect to each
#    adapter weight says which individual weights cause it.
# 4. **Combine and merge.** The two signals are combined into one coefficient per specialist and
#    weight, and the adapters are summed with those coefficients.
#
# The merged model is then evaluated on drug-target interaction, drug synergy, drug response and
# cytochrome P450 benchmarks, against the specialists and against parameter-space merging methods
# such as TIES-Merging {cite:p}`yadav2023ties`. Each later chapter runs one stage of this pipeline
# through the `esmerge` package and shows its result next to the paper's.

# %% tags=["parameters"]
# esmerge-needs:
scale = "cpu"
seed = 0

# %%

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import Markdown, display
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

from esmerge import report
from esmerge.paths import NOTEBOOKS_DIR, REPO_ROOT, run_dir
from esmerge.regen.notebook_graph import discover
from esmerge.specialists import base_llm

pd.set_option("display.max_colwidth", None)  # the tables here are prose: show it whole
out = run_dir(scale, "00_overview")
print(f"scale={scale} seed={seed}; figures and tables go to {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}")  # noqa: E501

# %% [markdown]
# ## The pipeline
#
# Boxes are the stages; each names the `esmerge` module that implements it.

# %%
STAGES = [  # (label, module, column, row)
    ("3 specialists\n(LoRA + projector)", "specialists", 0, 1.5),
    ("probe input\n(all modalities)", "probe", 1, 1.5),
    ("layer-wise\nhidden states", "probe", 2, 1.5),
    ("layer coefficients\n(SWD growth)", "layerwise", 3, 2.4),
    ("element scores\n(gradients)", "elementwise", 3, 0.6),
    ("merged adapter", "merge", 4, 1.5),
    ("evaluation\nvs. paper", "evaluate", 5, 1.5),
]
EDGES = [(0, 1), (1, 2), (2, 3), (2, 4), (3, 5), (4, 5), (5, 6)]
W, H, DX = 1.95, 0.95, 2.25  # box width, box height, column spacing

fig, ax = plt.subplots(figsize=(10, 4.2))
centres = []
for label, module, col, y in STAGES:
    x = col * DX
    centres.append((x, y))
    ax.add_patch(FancyBboxPatch((x - W / 2, y - H / 2), W, H, boxstyle="round,pad=0.04",
                                facecolor="#e8f0fb", edgecolor="#3b6fb6"))
    ax.text(x, y + 0.1, label, ha="center", va="center", fontsize=11)
    ax.text(x, y - 0.32, f"esmerge.{module}", ha="center", va="center", fontsize=8.5, family="monospace",
            color="#555555")
for a, b in EDGES:
    (xa, ya), (xb, yb) = centres[a], centres[b]
    ax.add_patch(FancyArrowPatch((xa + W / 2 + 0.03, ya), (xb - W / 2 - 0.03, yb), arrowstyle="-|>",
                                 mutation_scale=12, color="#444444"))
# The coefficients weight the specialists' own adapters: that edge runs under the analysis.
(xa, ya), (xb, yb) = centres[0], centres[5]
low = min(y for *_, y in STAGES) - H / 2 - 0.3
ax.plot([xa, xa, xb], [ya - H / 2 - 0.04, low, low], color="#3b6fb6", linestyle="--", linewidth=1)
ax.add_patch(FancyArrowPatch((xb, low), (xb, yb - H / 2 - 0.06), arrowstyle="-|>", mutation_scale=12,
                             color="#3b6fb6", linestyle="--"))
ax.text((xa + xb) / 2, low + 0.07, "the specialists' adapters, weighted by the coefficients", ha="center",
        fontsize=10, color="#3b6fb6")
ax.set_xlim(-W / 2 - 0.15, 5 * DX + W / 2 + 0.15)
ax.set_ylim(low - 0.15, 3.05)
ax.axis("off")
ax.set_title(f"ES-Merging pipeline as implemented here (scale={scale}, seed={seed}, n=3 specialists)", fontsize=11)
fig.tight_layout()
fig.savefig(out / "pipeline.png", dpi=120)
plt.show()

# %% [markdown]
# ## Three scales
#
# Every notebook takes a `scale` parameter. The code path is the same at every scale; only the
# base model and the amount of data change. This book was built at the scale shown in its table
# of contents; `esmerge regenerate --scale ...` rebuilds it at another.

# %%
scales = pd.DataFrame(
    [
        ("smoke", "tiny random LLaMA (4 layers, hidden 64), byte tokenizer", "a handful of examples per task",
         "CI and tests: every notebook in well under a minute"),
        ("cpu", "SmolLM2-135M-Instruct (30 layers, hidden 576)", "small subsets of every benchmark",
         "a laptop CPU; the default"),
        ("paper", f"{base_llm.PAPER_MODEL_ID} (bf16)", "the paper's splits", "a GPU; as in the paper"),
    ],
    columns=["scale", "base model", "data", "meant for"],
).set_index("scale")
assert tuple(scales.index) == base_llm.SCALES, "scale table is out of date with esmerge.specialists.base_llm.SCALES"
scales["LoRA"] = f"r={base_llm.LORA_RANK}, alpha={base_llm.LORA_ALPHA}, " + "/".join(
    m.removesuffix("_proj") for m in base_llm.LORA_TARGET_MODULES)
scales.to_csv(out / "scales.csv")
scales

# %% [markdown]
# ## What the paper reports
#
# The paper's numbers are kept outside this repository, in `shared/reference/paper_results.csv`
# beside it, or in the folder `$ESMERGE_REFERENCE_DIR` names (one row per table, method, dataset
# and metric). Later chapters compare against these rows; here is the shape of each table.

# %%
paper = report.paper_results()
shape = (
    paper.groupby("table")
    .agg(
        methods=("method", "nunique"),
        datasets=("dataset", "nunique"),
        metrics=("metric", lambda s: ", ".join(sorted(set(s)))),
        values=("value", "size"),
    )
    .reset_index()
)
shape.to_csv(out / "paper_tables.csv", index=False)
display(Markdown(f"{len(paper)} reported values in {len(shape)} tables (n={len(paper)} rows, scale={scale}, seed={seed})."))  # noqa: E501
shape

# %% [markdown]
# ## Chapters
#
# Each chapter is one notebook in `notebooks/`, run top to bottom by `esmerge regenerate`;
# results are files under `runs/<scale>/<notebook>/`, so a chapter never depends on another
# chapter's *notebook*, only on the files it wrote.

# %%
rows = []
for nb in discover(NOTEBOOKS_DIR).values():  # the regenerator's own parser of `# esmerge-needs:`
    title = next((line[4:].strip() for line in nb.path.read_text().splitlines() if line.startswith("# # ")), nb.stem)
    rows.append((nb.path.name, title, ", ".join(nb.needs) or "-"))
chapters = pd.DataFrame(rows, columns=["notebook", "title", "needs"])
chapters
