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
gradients, and come from ``esmerge.signals.gradients.element_scores``.
"""
from __future__ import annotations

from collections import defaultdict

import torch

from esmerge.errors import InputError
from esmerge.signals.layerwise import check_tau, softmax_over_specialists
from esmerge.specialists.adapters import layer_of

DISTANCES = ("frobenius", "mse")


def batch_token_distance(specialist: torch.Tensor, base: torch.Tensor, distance: str = "frobenius") -> torch.Tensor:
    r"""Distance between the token states of a specialist and of the base, one per sample (§4.3).

    The paper's fine embedding signal is the Frobenius norm
    :math:`r = \lVert \mathbf H_{\mathrm{base}} - \mathbf H_{\theta_j}\rVert_F` of a modality's token block;
    the official code uses the mean squared error :math:`r_F^2 / (T d)` instead.

    Parameters
    ----------
    specialist, base : Tensor, shape ``[B, T, d]``
        Token states of B samples, T tokens of width d each.
    distance : {"frobenius", "mse"}
        ``"frobenius"`` (paper) or ``"mse"`` (official code).

    Returns
    -------
    Tensor, shape ``[B]``
        One distance per sample.

    Examples
    --------
    A 3-4-5 triangle gives 5; its MSE is (9 + 16) / 2 = 12.5:

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
    r"""Distance between one sample's token states in a specialist and in the base (§4.3).

    The single-sample form of ``batch_token_distance``: :math:`r^{l,(k)}_{i\to j}` of the paper.

    Parameters
    ----------
    specialist, base : Tensor, shape ``[T, d]``
        Token states of one modality block.
    distance : {"frobenius", "mse"}
        ``"frobenius"`` (paper) or ``"mse"`` (official code).

    Returns
    -------
    Tensor, shape ``[]``
        The distance, a scalar tensor.

    Examples
    --------
    >>> float(token_distance(torch.tensor([[3., 4.]]), torch.zeros(1, 2)))
    5.0
    >>> float(token_distance(torch.tensor([[1., 2.], [2., 0.]]), torch.zeros(2, 2), "mse"))  # (1 + 4 + 4) / 4
    2.25
    """
    return batch_token_distance(specialist.unsqueeze(0), base.unsqueeze(0), distance)[0]


def _require_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise InputError(f"{what} for {key} hold {bad} NaN/Inf value(s); recompute them (the probe states "
                             f"or the adapter behind them are not finite)")


def zscore_within_layers(scores: dict[str, torch.Tensor], per_tensor: bool = False) -> dict[str, torch.Tensor]:
    r"""Z-score one specialist's element scores within each layer (§4.3, :math:`\hat s^{l,n}_j`).

    The paper normalises the raw scores :math:`s^{l,n}_j` over all LoRA elements n of layer l (A and
    B matrices of every module together). The official code z-scores each LoRA tensor on its own
    (``per_tensor=True``). The std is the population one.

    Parameters
    ----------
    scores : dict of str to Tensor, shape ``[*shape of key]``
        LoRA key -> raw scores (finite). The layer of a key is read from its name.
    per_tensor : bool
        Z-score within each tensor instead of within each layer.

    Returns
    -------
    dict of str to Tensor, shape ``[*shape of key]``
        LoRA key -> z-scores (float64). A group with zero variance maps to 0, not NaN.

    Raises
    ------
    InputError
        If a score is NaN or Inf; the message names its key.

    Examples
    --------
    Two tensors of one layer, each of mean 2 and population std 1:

    >>> z = zscore_within_layers({"layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([1., 3.]),
    ...                           "layers.0.self_attn.q_proj.lora_B.weight": torch.tensor([1., 3.])})
    >>> z["layers.0.self_attn.q_proj.lora_A.weight"].tolist()
    [-1.0, 1.0]
    >>> zscore_within_layers({"layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([4., 4.])})  # no variance
    {'layers.0.self_attn.q_proj.lora_A.weight': tensor([0., 0.], dtype=torch.float64)}
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
    r"""Element-wise local merging coefficients :math:`\beta^{l,n}_j` (paper §4.3, Eq. 3).

    Each specialist's raw scores are z-scored within each layer (``zscore_within_layers``), then
    :math:`\beta^{l,n}_j = \exp(\hat s^{l,n}_j/\tau) / \sum_m \exp(\hat s^{l,n}_m/\tau)`, a softmax over
    the specialists for every element.

    Parameters
    ----------
    scores : list of dict of str to Tensor, shape ``[*shape of key]``
        One dict per specialist (S of them, same keys and shapes): LoRA key -> raw scores s.
    tau : float
        Softmax temperature (paper: 0.5; official code: 0.1), a finite number > 0.
    per_tensor : bool
        Z-score within each LoRA tensor instead of within each layer (official code).

    Returns
    -------
    dict of str to Tensor, shape ``[S, *shape of key]``
        LoRA key -> β (float64), summing to 1 over dim 0.

    Raises
    ------
    InputError
        If a score is NaN or Inf (naming its key), or the specialists' keys differ.

    Examples
    --------
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
            raise InputError(f"specialist {j} has different LoRA keys than specialist 0; "
                             "score the same adapters' layout")
    for j, s in enumerate(scores):
        _require_finite(s, f"specialist {j}'s element scores")
    normalized = [zscore_within_layers(s, per_tensor) for s in scores]
    return {k: softmax_over_specialists(torch.stack([z[k] for z in normalized]), tau) for k in keys}
