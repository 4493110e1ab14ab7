"""Comparing merged adapters with each other and with the specialists (notebook 06).

All comparisons are on the LoRA tensors or on the weight updates they make,
:math:`\\Delta W = \\frac{\\alpha}{r} B A` per module.
"""
from __future__ import annotations

import itertools
import json

import pandas as pd
import torch

from esmerge import methods
from esmerge.report.budget_curves import UNITS, curve_member
from esmerge.specialists.adapters import Adapter, parse_key


def _pairs(adapter: Adapter):
    """``{(layer, module): (A [r, d_in], B [d_out, r])}`` of an adapter."""
    out = {}
    for key, a in adapter.state.items():
        layer, module, which = parse_key(key)
        if which == "A":
            out[(layer, module)] = (a.float(), adapter.state[key.replace("lora_A", "lora_B")].float())
    return out


def delta_inner(a1: torch.Tensor, b1: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor) -> float:
    r"""Frobenius inner product of two LoRA updates without forming them.

    :math:`\langle B_1A_1, B_2A_2\rangle_F = \mathrm{tr}\big((B_1^\top B_2)(A_2A_1^\top)\big)`, an
    ``r x r`` product. a : ``[r, d_in]``, b : ``[d_out, r]``.
    """
    return float(((b1.T @ b2) * (a1 @ a2.T)).sum())


def delta_weight_norms(adapter: Adapter) -> torch.Tensor:
    r"""Per-layer Frobenius norm of the LoRA update, :math:`\sqrt{\sum_{m} \|\tfrac{\alpha}{r} B_m A_m\|_F^2}`.

    Sums over the layer's target modules m. Returns Tensor of shape (n_layers,).
    """
    scaling = adapter.config.get("lora_alpha", 1) / adapter.config.get("r", 1)
    per_layer: dict[int, float] = {}
    for (layer, _), (a, b) in _pairs(adapter).items():
        per_layer[layer] = per_layer.get(layer, 0.0) + scaling**2 * delta_inner(a, b, a, b)
    return torch.tensor([max(per_layer[layer], 0.0) ** 0.5 for layer in sorted(per_layer)])


def delta_cosine_to(merged: Adapter, references: dict[str, Adapter]) -> dict[str, float]:
    r"""Cosine similarity of the whole-model updates :math:`\{B_mA_m\}_m`, merged vs each reference."""
    mine = _pairs(merged)
    own = sum(delta_inner(a, b, a, b) for a, b in mine.values())
    out = {}
    for name, ref in references.items():
        theirs = _pairs(ref)
        dot = sum(delta_inner(*mine[k], *theirs[k]) for k in mine)
        norm = sum(delta_inner(a, b, a, b) for a, b in theirs.values())
        out[name] = dot / max((own * norm) ** 0.5, 1e-30)
    return out


def flat_vector(adapter: Adapter) -> torch.Tensor:
    """All LoRA tensors of ``adapter`` concatenated in sorted key order, shape (P,)."""
    return torch.cat([adapter.state[k].float().reshape(-1) for k in sorted(adapter.state)])


def cosine_to(merged: Adapter, references: dict[str, Adapter]) -> dict[str, float]:
    """Cosine similarity of the merged LoRA vector to each reference adapter's."""
    v = flat_vector(merged)
    return {name: float(torch.nn.functional.cosine_similarity(v, flat_vector(ref), dim=0))
            for name, ref in references.items()}


# --------------------------------------------------------------------------- the tables of notebook 06
def finetune_table(metas: dict[str, dict]) -> pd.DataFrame:
    """Avg+FT per benchmark: first and last training loss, wall time, FLOPs (``metas``: benchmark -> esmerge.json).

    >>> meta = {"info": {"loss": {"first": 2.0, "last": 1.5}, "cost": {"wall_seconds": 3.0, "flops": 10}}}
    >>> finetune_table({"GDSC2": meta}).to_dict("records")
    [{'benchmark': 'GDSC2', 'first loss': 2.0, 'last loss': 1.5, 'wall_s': 3.0, 'FLOPs': 10}]
    """
    return pd.DataFrame([{"benchmark": b, "first loss": m["info"]["loss"]["first"],
                          "last loss": m["info"]["loss"]["last"],
                          "wall_s": m["info"]["cost"]["wall_seconds"], "FLOPs": m["info"]["cost"]["flops"]}
                         for b, m in metas.items()])


def cost_table(metas: dict[str, dict], finetune: pd.DataFrame | None = None, finetune_settings: dict | None = None
               ) -> pd.DataFrame:
    """One row per method: hyper-parameters (JSON, first 120 characters), wall time, FLOPs.

    ``metas``: method -> esmerge.json; Avg+FT (one merge per benchmark) is one row summed over
    ``finetune`` (``finetune_table``) with ``finetune_settings`` as its hyper-parameters.

    >>> meta = {"info": {"hparams": {"keep": 0.2}, "cost": {"wall_seconds": 0.123, "flops": None}}}
    >>> cost_table({"ties": meta}).to_dict("records")
    [{'method': 'ties', 'name': 'TIES-Merging', 'hyper-parameters': '{"keep": 0.2}', 'wall_s': 0.12, 'FLOPs': None}]
    """
    rows = []
    for name, meta in metas.items():
        info = meta["info"]
        rows.append({"method": name, "name": methods.get(name).pretty_name,
                     "hyper-parameters": json.dumps(info.get("hparams", {}), default=str)[:120],
                     "wall_s": round(info["cost"]["wall_seconds"], 2), "FLOPs": info["cost"]["flops"]})
    if finetune is not None:
        rows.append({"method": "avg-ft", "name": methods.get("avg-ft").pretty_name,
                     "hyper-parameters": json.dumps(finetune_settings or {}),
                     "wall_s": round(float(finetune["wall_s"].sum()), 2), "FLOPs": int(finetune["FLOPs"].sum())})
    return pd.DataFrame(rows)


def comparison_tables(compare: dict[str, Adapter], references: dict[str, Adapter]
                      ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(update norm per layer [layer x adapter], cosine of {BA} to each reference, cosine of the LoRA vectors)``."""
    norms = pd.DataFrame({k: delta_weight_norms(v).numpy() for k, v in compare.items()})
    cosines = pd.DataFrame({k: delta_cosine_to(v, references) for k, v in compare.items()}).T
    lora_cosines = pd.DataFrame({k: cosine_to(v, references) for k, v in compare.items()}).T
    return norms, cosines, lora_cosines


def graft_order_table(adapters: dict[str, Adapter]) -> pd.DataFrame:
    """Graft merged in every order of the tasks: cosine of the update to each specialist's and the total update size."""
    rows = []
    for order in itertools.permutations(adapters):
        result = methods.run("graft", list(adapters.values()), order=list(order))
        rows.append({"order": " → ".join(order), **delta_cosine_to(result.adapter, adapters),
                     "Σ‖ΔW‖": float(delta_weight_norms(result.adapter).sum())})
    return pd.DataFrame(rows).set_index("order")


def emr_table(info: dict) -> pd.DataFrame:
    """EMR's rescaler and mask density per task, from its ``esmerge.json`` ``info``.

    >>> emr_table({"rescalers": {"cell": 1.5}, "mask_density": {"cell": 0.25}}).to_dict("index")
    {'cell': {'rescaler': 1.5, 'mask density': 0.25}}
    """
    return pd.DataFrame({"rescaler": info["rescalers"], "mask density": info["mask_density"]})


def budget_table(budgets, paper) -> pd.DataFrame:
    """The searching baselines' budgets as run beside the paper's (``scales.MergeBudgets`` each).

    >>> from esmerge.scales import MergeBudgets
    >>> t = budget_table(MergeBudgets(adamerging_steps=10), MergeBudgets())
    >>> t.loc[0].to_dict()
    {'method': 'adamerging', 'setting': 'Adam steps', 'as run': 10, 'paper': 500}
    """
    fields = [("adamerging", "Adam steps", "adamerging_steps"),
              ("adamerging", "unlabeled prompts per benchmark", "adamerging_prompts_per_benchmark"),
              ("avg-ft", "training rows per benchmark", "ft_examples"), ("avg-ft", "epochs", "ft_epochs"),
              ("avg-ft", "batch", "ft_batch"), ("ls-merge", "VAE epochs", "lsmerge_epochs")]
    return pd.DataFrame([{"method": m, "setting": label, "as run": getattr(budgets, f), "paper": getattr(paper, f)}
                         for m, label, f in fields])


def curve_cost_table(curves: dict[str, dict], adamerging: dict, finetune: dict[str, dict], budgets) -> pd.DataFrame:
    """One row per run of a budget curve: method, budget, wall time and FLOPs; the runs at the scale's
    own budget (``adamerging``: its ``esmerge.json``; ``finetune``: benchmark -> ``esmerge.json``) are
    included and marked, Avg+FT on ``budgets.curve_benchmarks`` only, summed over them.

    >>> m = lambda s, f: {"info": {"cost": {"wall_seconds": s, "flops": f}}}
    >>> from esmerge.scales import MergeBudgets
    >>> b = MergeBudgets(adamerging_steps=10, ft_examples=8, curve_benchmarks=("X",))
    >>> t = curve_cost_table({"adamerging@3": m(3.0, 30), "avg-ft@4/X": m(1.0, 4)}, m(10.0, 100), {"X": m(2.0, 8)}, b)
    >>> t[["method", "budget", "wall_s", "FLOPs", "as run"]].values.tolist()
    [['adamerging', 3, 3.0, 30, False], ['adamerging', 10, 10.0, 100, True], ['avg-ft', 4, 1.0, 4, False], \
['avg-ft', 8, 2.0, 8, True]]
    """
    rows = {}
    # the runs at the scale's own budget keep the method's plain name (budget_curves.curve_member)
    runs = {**curves, "adamerging": adamerging,
            **{f"avg-ft/{b}": finetune[b] for b in budgets.curve_benchmarks if b in finetune}}
    for name, meta in runs.items():
        method, _, budget = curve_member(name, budgets)
        row = rows.setdefault((method, budget), {"method": method, "budget": budget, "wall_s": 0.0, "FLOPs": 0,
                                                 "as run": budget == curve_member(method, budgets)[2]})
        row["wall_s"] = round(row["wall_s"] + meta["info"]["cost"]["wall_seconds"], 2)
        row["FLOPs"] += meta["info"]["cost"]["flops"] or 0
    table = pd.DataFrame(sorted(rows.values(), key=lambda r: (r["method"], r["budget"])))
    table.insert(2, "unit", table["method"].map(UNITS))
    return table


def seed_cosine_table(by_seed: dict[int, tuple[dict[str, Adapter], dict[str, Adapter]]]) -> pd.DataFrame:
    """Mean cosine of each merged update ``{BA}`` to its own seed's specialists' (``delta_cosine_to``),
    methods x seeds; ``by_seed``: seed -> (method -> merged adapter, modality -> specialist adapter)."""
    return pd.DataFrame({f"seed {s}": {name: sum(c := delta_cosine_to(a, specs).values()) / len(c)
                                       for name, a in merged.items()}
                         for s, (merged, specs) in by_seed.items()})
