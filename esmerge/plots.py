"""Figures shared by the notebooks: one colour-blind-safe palette per modality and per method.

Colours are the Okabe-Ito palette, fixed per name so a modality or method has the same colour
in every chapter. Every ``save`` writes a PNG under the notebook's run directory.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

OKABE_ITO = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000", "#999999"]
MODALITY_COLORS = {"molecule": "#E69F00", "protein": "#56B4E9", "cell": "#009E73", "base": "#999999",
                   "merged": "#CC79A7"}
# Colour-blind-safe (Okabe-Ito and Tol muted), none shared with the modalities above: ES-Merging
# takes the "merged" colour it has in the embedding plots.
METHOD_COLORS = {"base": MODALITY_COLORS["base"], "avg": "#DDCC77", "ties": "#999933", "emr": "#CC6677",
                 "adamerging": "#0072B2", "pcb": "#D55E00", "consensus": "#AA4499", "ls-merge": "#44AA99",
                 "graft": "#332288", "avg-ft": "#882255", "es-layer": "#88CCEE", "es-element": "#000000",
                 "es": MODALITY_COLORS["merged"]}


def method_color(name: str) -> str:
    """One colour per model across the book: a specialist (``specialist-cell`` or ``specialist cell``)
    takes its modality's colour; unknown names are grey."""
    if name.startswith("specialist"):
        return MODALITY_COLORS.get(name[len("specialist"):].strip(" -"), "#999999")
    return METHOD_COLORS.get(name, "#999999")


def save(fig, out_dir: Path, name: str) -> Path:
    """Save ``fig`` as ``out_dir/name.png`` (150 dpi) and return the path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=150, bbox_inches="tight")
    return path


def project_2d(groups: dict[str, torch.Tensor], method: str = "pca", seed: int = 0) -> dict[str, np.ndarray]:
    """Joint 2-D embedding of several point sets ``{name: [N_i, d]}`` -> ``{name: [N_i, 2]}``.

    ``pca`` (deterministic, fast) or ``tsne`` (seeded); fitted on the union so positions compare.
    """
    names = list(groups)
    data = torch.cat([groups[n].reshape(-1, groups[n].shape[-1]).float() for n in names]).numpy()
    if method == "pca":
        from sklearn.decomposition import PCA

        xy = PCA(n_components=2, random_state=seed).fit_transform(data)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        xy = TSNE(n_components=2, random_state=seed, init="pca",
                  perplexity=min(30, len(data) // 4 or 1)).fit_transform(data)
    else:
        raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")
    out, start = {}, 0
    for n in names:
        count = groups[n].reshape(-1, groups[n].shape[-1]).shape[0]
        out[n], start = xy[start:start + count], start + count
    return out


def embedding_scatter(ax, points: dict[str, np.ndarray], colors: dict[str, str] | None = None, title: str = ""):
    """Scatter of 2-D points per model name, one colour each."""
    colors = colors or {}
    for i, (name, xy) in enumerate(points.items()):
        ax.scatter(xy[:, 0], xy[:, 1], s=6, alpha=0.55, label=name,
                   color=colors.get(name, OKABE_ITO[i % len(OKABE_ITO)]))
    ax.set_title(title)
    ax.set_xticks([]), ax.set_yticks([])
    ax.legend(markerscale=3, fontsize=8, frameon=False)


def coefficient_heatmap(ax, matrix: np.ndarray, row_labels: list[str], title: str = "", vmin=0.0, vmax=1.0,
                        xlabel: str = "layer"):
    """Heatmap of a coefficient matrix ``[rows, cols]`` with a colour bar (viridis: colour-blind safe)."""
    im = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    plt.colorbar(im, ax=ax, fraction=0.025, pad=0.01)
    return im


# The pipeline as the book's chapters implement it: (label, module, column, row); edges between boxes.
PIPELINE_STAGES = [
    ("3 specialists\n(LoRA + projector)", "specialists", 0, 1.5),
    ("probe input\n(all modalities)", "signals.probe", 1, 1.5),
    ("layer-wise\nhidden states", "signals.hooks", 2, 1.5),
    ("layer coefficients\n(SWD growth)", "signals.layerwise", 3, 2.4),
    ("element scores\n(gradients)", "signals.elementwise", 3, 0.6),
    ("merged adapter", "signals.combine", 4, 1.5),
    ("evaluation\nvs. paper", "evaluate", 5, 1.5),
]
PIPELINE_EDGES = [(0, 1), (1, 2), (2, 3), (2, 4), (3, 5), (4, 5), (5, 6)]


def pipeline_diagram(title: str):
    """The ES-Merging pipeline as boxes (each naming the ``esmerge`` module that implements it) and arrows.

    >>> fig = pipeline_diagram("t"); len(fig.axes[0].patches)  # 7 boxes, 7 arrows, 1 dashed arrow head
    15
    """
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    w, h, dx = 1.95, 0.95, 2.25  # box width, box height, column spacing
    fig, ax = plt.subplots(figsize=(10, 4.2))
    centres = []
    for label, module, col, y in PIPELINE_STAGES:
        x = col * dx
        centres.append((x, y))
        ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.04",
                                    facecolor="#e8f0fb", edgecolor="#3b6fb6"))
        ax.text(x, y + 0.1, label, ha="center", va="center", fontsize=11)
        ax.text(x, y - 0.32, f"esmerge.{module}", ha="center", va="center", fontsize=8, family="monospace",
                color="#555555")
    for a, b in PIPELINE_EDGES:
        (xa, ya), (xb, yb) = centres[a], centres[b]
        ax.add_patch(FancyArrowPatch((xa + w / 2 + 0.03, ya), (xb - w / 2 - 0.03, yb), arrowstyle="-|>",
                                     mutation_scale=12, color="#444444"))
    # The coefficients weight the specialists' own adapters: that edge runs under the analysis.
    (xa, ya), (xb, yb) = centres[0], centres[5]
    low = min(y for *_, y in PIPELINE_STAGES) - h / 2 - 0.3
    ax.plot([xa, xa, xb], [ya - h / 2 - 0.04, low, low], color="#3b6fb6", linestyle="--", linewidth=1)
    ax.add_patch(FancyArrowPatch((xb, low), (xb, yb - h / 2 - 0.06), arrowstyle="-|>", mutation_scale=12,
                                 color="#3b6fb6", linestyle="--"))
    ax.text((xa + xb) / 2, low + 0.07, "the specialists' adapters, weighted by the coefficients", ha="center",
            fontsize=10, color="#3b6fb6")
    ax.set_xlim(-w / 2 - 0.15, 5 * dx + w / 2 + 0.15)
    ax.set_ylim(low - 0.15, 3.05)
    ax.axis("off")
    ax.set_title(title, fontsize=11)
    fig.tight_layout()
    return fig
