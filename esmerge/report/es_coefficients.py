"""The tables of the element-wise chapter (notebook 05): ES-Merging's coefficients and the merged model's tokens.

Everything here reads the outputs of :func:`esmerge.methods.es.signals` and
:func:`esmerge.methods.es.coefficients_from_signals`; nothing is recomputed differently from the merge.
"""
from __future__ import annotations

import pandas as pd
import torch

from esmerge.signals import elementwise, probe, probe_states
from esmerge.signals.combine import combine, merge_lora
from esmerge.specialists.adapters import Adapter, attach, parse_key, with_state


def coefficient_summary(alpha: torch.Tensor, beta: dict, lam: dict, names: list[str]) -> pd.DataFrame:
    """Per specialist: mean alpha (Eq. 2), mean beta (Eq. 3), mean lambda (Eq. 4) and where its lambda is largest.

    alpha ``[S, L]``; beta, lam: key -> ``[S, *shape]``.

    >>> key = "layers.0.self_attn.q_proj.lora_A.weight"
    >>> t = coefficient_summary(torch.tensor([[0.75], [0.25]]), {key: torch.tensor([[0.5, 1.0], [0.5, 0.0]])},
    ...                         {key: torch.tensor([[0.75, 1.0], [0.25, 0.0]])}, ["a", "b"])
    >>> t["mean lambda"].tolist(), t["share of elements where it has the largest lambda"].tolist()
    ([0.875, 0.125], [1.0, 0.0])
    """
    return pd.DataFrame([{
        "specialist": n,
        "mean alpha": float(alpha[j].mean()),
        "mean beta": float(torch.cat([b[j].flatten() for b in beta.values()]).mean()),
        "mean lambda": float(torch.cat([v[j].flatten() for v in lam.values()]).mean()),
        "share of elements where it has the largest lambda": float(
            torch.cat([(v.argmax(0) == j).flatten().float() for v in lam.values()]).mean()),
    } for j, n in enumerate(names)])


def merged_adapter(adapters: list[Adapter], lam: dict) -> Adapter:
    """The ES-merged adapter for coefficients ``lam`` (Eq. 1), as ``es_merge`` builds it."""
    return with_state(adapters[0], merge_lora([a.state for a in adapters], lam), "es")


def merged_states(base_model, adapter: Adapter, probes: probe.Probes) -> dict:
    """``probe_states.hidden_states`` of the base with ``adapter`` attached; the base is left clean afterwards."""
    peft_model = attach(base_model, {"es": adapter})
    try:
        return probe_states.hidden_states(peft_model, probes)
    finally:
        peft_model.unload()


def merged_distances(merged: dict, states: dict, names: list[str], layer: int) -> pd.DataFrame:
    """Paper Fig. 8: mean distance between the merged model's and each specialist's pooled states at ``layer``.

    Rows: the probe modality; columns: the specialist. ``merged`` as ``probe_states.hidden_states``
    returns it; ``states[name]`` likewise per specialist.

    >>> pooled = lambda v: {"pooled": {"molecule": torch.full((1, 2, 3), v)}}
    >>> merged_distances(pooled(0.0), {"a": pooled(1.0), "b": pooled(2.0)}, ["a", "b"], 0).round(3).to_dict("index")
    {'molecule': {'a': 1.732, 'b': 3.464}}
    """
    rows = []
    for modality in merged["pooled"]:
        for n in names:
            d = (merged["pooled"][modality][layer] - states[n]["pooled"][modality][layer]).norm(dim=-1).mean()
            rows.append({"modality tokens": modality, "specialist": n, "mean distance merged-specialist": float(d)})
    return pd.DataFrame(rows).pivot(index="modality tokens", columns="specialist",
                                    values="mean distance merged-specialist")


def nearest_specialists(distances: pd.DataFrame) -> dict[str, tuple[str, bool]]:
    """modality -> (the specialist the merged model is nearest, whether it is the matching one: the paper's claim).

    >>> nearest_specialists(pd.DataFrame({"molecule": [1.0, 3.0], "cell": [2.0, 0.5]}, index=["molecule", "cell"]))
    {'molecule': ('molecule', True), 'cell': ('cell', True)}
    """
    return {m: (str(distances.loc[m].idxmin()), distances.loc[m].idxmin() == m) for m in distances.index}


def coefficient_shift(label: str, lam: dict, lam_other: dict) -> dict:
    """How far other coefficients move from ``lam``: mean and max ``|delta lambda|``, share of top-specialist flips.

    >>> lam = {"w": torch.tensor([[0.75, 0.5], [0.25, 0.5]])}
    >>> coefficient_shift("x", lam, {"w": torch.tensor([[0.25, 0.5], [0.75, 0.5]])})  # doctest: +NORMALIZE_WHITESPACE
    {'setting': 'x', 'mean |delta lambda|': 0.25, 'max |delta lambda|': 0.5,
     'elements whose top specialist changes': 0.5}
    """
    delta = torch.cat([(lam_other[k] - lam[k]).abs().flatten() for k in lam])
    flips = torch.cat([(lam_other[k].argmax(0) != lam[k].argmax(0)).flatten().float() for k in lam])
    return {"setting": label, "mean |delta lambda|": float(delta.mean()), "max |delta lambda|": float(delta.max()),
            "elements whose top specialist changes": float(flips.mean())}


def code_vs_paper_element(scores: list, alpha: torch.Tensor, lam: dict, tau_element: float,
                          mse_scores: list | None = None) -> pd.DataFrame:
    """The official code's element-wise settings, one at a time, against the paper's ``lam``.

    Element tau 0.1; per-tensor z-scores; and, when ``mse_scores`` (scores with the MSE
    distance) are given, MSE instead of the Frobenius norm.
    """
    rows = [coefficient_shift("element tau 0.1 (code)", lam,
                              combine(alpha, elementwise.element_coefficients(scores, 0.1))),
            coefficient_shift("per-tensor z-score (code)", lam,
                              combine(alpha, elementwise.element_coefficients(scores, tau_element, per_tensor=True)))]
    if mse_scores is not None:
        rows.append(coefficient_shift("MSE instead of Frobenius (code)", lam,
                                      combine(alpha, elementwise.element_coefficients(mse_scores, tau_element))))
    return pd.DataFrame(rows)


def coefficient_map(coefs: dict[str, torch.Tensor], layer: int, module: str, part: str) -> torch.Tensor:
    """The coefficients ``[S, rows, cols]`` of one LoRA matrix (``part`` "A" or "B") of ``module`` at ``layer``.

    >>> key = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    >>> coefficient_map({key: torch.ones(3, 4, 8)}, 2, "q_proj", "A").shape
    torch.Size([3, 4, 8])
    """
    return coefs[next(k for k in coefs if parse_key(k) == (layer, module, part))]


def module_grid(coefs: dict[str, torch.Tensor], layers: list[int], module: str, names: list[str], title: str):
    """One module's coefficients as images: rows (layer, LoRA A/B), columns the specialists ``names``,
    one colour scale from 0 to 1 (paper Figs. 9-10). B ``[d_out, r]`` is drawn transposed, rank as rows
    like A. Returns the Figure.

    >>> key = "base_model.model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    >>> coefs = {key.format("A"): torch.rand(2, 4, 6), key.format("B"): torch.rand(2, 6, 4)}
    >>> fig = module_grid(coefs, [0], "q_proj", ["a", "b"], "t"); len(fig.axes)  # 2 x 2 images + colour bar
    5
    """
    import matplotlib.pyplot as plt

    rows = [(layer, p) for layer in layers for p in "AB"]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(3.4 * len(names), 1.25 * len(rows)), squeeze=False)
    for r, (layer, part) in enumerate(rows):
        m = coefficient_map(coefs, layer, module, part)
        for j, spec in enumerate(names):
            img = m[j] if part == "A" else m[j].T
            im = axes[r, j].imshow(img.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            axes[r, j].set_xticks([]), axes[r, j].set_yticks([])
            if r == 0:
                axes[r, j].set_title(spec)
            if j == 0:
                axes[r, j].set_ylabel(f"L{layer} {part}", fontsize=8)
    fig.colorbar(im, ax=axes, fraction=0.02, pad=0.01)
    fig.suptitle(f"{module}: {title}", y=1.04)
    return fig
