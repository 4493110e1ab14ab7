r"""Element-wise local merging coefficients from fine embedding signals (paper §4.3, Eq. 3): the pure math.

For specialist :math:`\theta_j`, input modality :math:`m_i`, probe sample :math:`k`, layer
:math:`l` and LoRA element :math:`n` of that layer:

.. math::

    r^{l,(k)}_{i\to j} = \big\lVert \mathbf H^{l,(k)}_{i\to\mathrm{base}}
                                   - \mathbf H^{l,(k)}_{i\to\theta_j}\big\rVert_F, \qquad
    s^{l,n}_j = \sum_i \sum_k \Big|\frac{\partial r^{l,(k)}_{i\to j}}{\partial\theta^{l,n}_j}\Big|,

    \hat s^{l,n}_j = \operatorname{zscore}_{n\in l}\big(s^{l,n}_j\big), \qquad
    \beta^{l,n}_j = \frac{\exp(\hat s^{l,n}_j/\tau)}{\sum_m \exp(\hat s^{l,n}_m/\tau)}.

Here are the distance :math:`r` and the map from scores :math:`s` to coefficients :math:`\beta`,
pure functions over tensors; the scores themselves need the specialist's model and its per-sample
gradients, and come from ``esmerge.element_gradients.element_scores``.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from esmerge.adapters import layer_of
from esmerge.errors import InputError
from esmerge.layerwise import check_tau, softmax_over_specialists

DISTANCES = ("frobenius", "mse")


def batch_token_distance(specialist: torch.Tensor, base: torch.Tensor, distance: str = "frobenius") -> torch.Tensor:
    """Per-sample distance of token blocks ``[B, T, d]`` -> ``[B]``: Frobenius norm (paper) or MSE (official code).

    >>> batch_token_distance(torch.tensor([[[3., 4.]], [[0., 1.]]]), torch.zeros(2, 1, 2))
    tensor([5., 1.])
    >>> batch_token_distance(torch.tensor([[[3., 4.]]]), torch.zeros(1, 1, 2), "mse")
    tensor([12.5000])
    """
    diff = specialist - base
    if distance == "frobenius":
        # The epsilon keeps the gradient finite when a specialist equals the base exactly.
        return torch.sqrt(diff.pow(2).sum(dim=(1, 2)) + 1e-20)
    if distance == "mse":
        return diff.pow(2).mean(dim=(1, 2))
    raise ValueError(f"unknown distance {distance!r}; choose one of {DISTANCES}")


def token_distance(specialist: torch.Tensor, base: torch.Tensor, distance: str = "frobenius") -> torch.Tensor:
    """Distance between two token blocks ``[T, d]`` (a scalar); see ``batch_token_distance``.

    >>> float(token_distance(torch.tensor([[3., 4.]]), torch.zeros(1, 2)))
    5.0
    """
    return batch_token_distance(specialist.unsqueeze(0), base.unsqueeze(0), distance)[0]


def _require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise InputError(f"{what} for {key} hold {bad} NaN/Inf value(s); recompute them (the probe states "
                             f"or the adapter behind them are not finite)")


def zscore_within_layers(scores: dict[str, torch.Tensor], per_tensor: bool = False) -> dict[str, torch.Tensor]:
    r"""Z-score one specialist's scores over all LoRA elements of each layer (paper, §4.3 :math:`\hat s`), or of each tensor (code).

    Args:
        scores: LoRA key -> raw scores ``[*shape of key]`` (finite).
        per_tensor: z-score within each tensor instead of within each layer.

    Returns:
        LoRA key -> z-scores, same shapes (float64). A group with zero variance maps to 0 (no NaN).
        A NaN/Inf score raises ``InputError`` naming its key.

    >>> z = zscore_within_layers({"layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([1., 3.]),
    ...                           "layers.0.self_attn.q_proj.lora_B.weight": torch.tensor([1., 3.])})
    >>> z["layers.0.self_attn.q_proj.lora_A.weight"].tolist()
    [-1.0, 1.0]
    """
    _require_finite(scores, "element scores")
    groups: dict[object, list[str]] = defaultdict(list)
    for key in scores:
        groups[key if per_tensor else layer_of(key)].append(key)
    out = {}
    for keys in groups.values():
        flat = torch.cat([scores[k].flatten().double() for k in keys])
        mean, std = flat.mean(), flat.std(unbiased=False)
        for k in keys:
            z = (scores[k].double() - mean) / std if std > 1e-12 else torch.zeros_like(scores[k], dtype=torch.float64)
            out[k] = z
    return out


def element_coefficients(
    scores: list[dict[str, torch.Tensor]], tau: float = 0.5, per_tensor: bool = False
) -> dict[str, torch.Tensor]:
    r"""Element-wise local merging coefficients :math:`\beta^{l,n}_j` (paper Eq. 3).

    Args:
        scores: one dict per specialist (same keys and shapes), LoRA key -> raw scores ``s``
            ``[*shape of key]``; a NaN/Inf score raises ``InputError`` naming its key.
        tau: softmax temperature (paper: 0.5; official code: 0.1), a finite number > 0.
        per_tensor: z-score within each LoRA tensor instead of within each layer (code option).

    Returns:
        LoRA key -> ``[n_specialists, *tensor_shape]`` (float64), summing to 1 over dim 0.

    >>> key = "layers.0.self_attn.q_proj.lora_A.weight"
    >>> beta = element_coefficients([{key: torch.tensor([1., 3.])}, {key: torch.tensor([3., 1.])}], tau=1.0)
    >>> [round(v, 4) for v in beta[key][0].tolist()]  # z-scores -1, 1 vs 1, -1: softmax of (-1, 1)
    [0.1192, 0.8808]
    """
    check_tau(tau)
    if not scores:
        raise ValueError("no specialist scores given")
    keys = list(scores[0])
    for j, s in enumerate(scores[1:], start=1):
        if list(s) != keys:
            raise InputError(f"specialist {j} has different LoRA keys than specialist 0; score the same adapters' layout")
    for j, s in enumerate(scores):
        _require_finite(s, f"specialist {j}'s element scores")
    normalized = [zscore_within_layers(s, per_tensor) for s in scores]
    return {k: softmax_over_specialists(torch.stack([z[k] for z in normalized]), tau) for k in keys}
