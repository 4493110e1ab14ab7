"""Comparing merged adapters with each other and with the specialists (notebook 06).

All comparisons are on the LoRA tensors or on the weight updates they make,
:math:`\\Delta W = \\frac{\\alpha}{r} B A` per module.
"""
from __future__ import annotations

import torch

from esmerge.adapters import Adapter, parse_key


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
    return {name: float(torch.nn.functional.cosine_similarity(v, flat_vector(ref), dim=0)) for name, ref in references.items()}
