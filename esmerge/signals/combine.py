r"""Combining coefficients and merging LoRA adapters (paper Eqs. 1 and 4).

.. math::

    \lambda^{l,n}_j = \frac{\alpha^l_j\,\beta^{l,n}_j}{\sum_m \alpha^l_m\,\beta^{l,n}_m}
    \quad\text{(Eq. 4)}, \qquad
    \theta^{l,n}_{\text{uni}} = \sum_j \lambda^{l,n}_j\,\theta^{l,n}_j \quad\text{(Eq. 1)}.

As in the paper and its code, Eq. 1 is applied to the LoRA A and B matrices element-wise (not
to the products BA). Running a method on models and writing its result is ``esmerge.run.merge``.
"""
from __future__ import annotations

import torch

from esmerge.errors import InputError
from esmerge.specialists.adapters import LoraState, layer_of


def _finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name} contains NaN or Inf; the signals it came from are broken (rerun with a fresh cache)")


def combine(alpha: torch.Tensor, beta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""Final merging coefficients λ = α·β, renormalised over specialists (paper §4.4, Eq. 4).

    For every LoRA element n of layer l and specialist j,
    :math:`\lambda^{l,n}_j = \alpha^l_j\beta^{l,n}_j / \sum_m \alpha^l_m\beta^{l,n}_m`. The layer of a
    tensor is read from its key. Where every product underflows to 0, each specialist gets 1/S.

    Parameters
    ----------
    alpha : Tensor, shape ``[S, L]``
        Layer-wise coefficients, from ``layer_coefficients`` (Eq. 2).
    beta : dict of str to Tensor, shape ``[S, *tensor_shape]``
        LoRA key -> element-wise coefficients, from ``element_coefficients`` (Eq. 3).

    Returns
    -------
    dict of str to Tensor, shape ``[S, *tensor_shape]``
        LoRA key -> λ, summing to 1 over dim 0 (the dtype of ``beta``).

    Examples
    --------
    With equal layer weights, λ is β:

    >>> alpha = torch.tensor([[0.5], [0.5]])
    >>> beta = {"layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([[0.2, 0.9], [0.8, 0.1]])}
    >>> combine(alpha, beta)["layers.0.self_attn.q_proj.lora_A.weight"]
    tensor([[0.2000, 0.9000],
            [0.8000, 0.1000]])

    With equal element weights, λ is α: 0.8·0.5 / (0.8·0.5 + 0.2·0.5) = 0.8. The second element
    has β = (0.2, 0.8), so α·β = (0.16, 0.16) and λ = (0.5, 0.5):

    >>> beta = {"layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([[0.5, 0.2], [0.5, 0.8]])}
    >>> combine(torch.tensor([[0.8], [0.2]]), beta)["layers.0.self_attn.q_proj.lora_A.weight"]
    tensor([[0.8000, 0.5000],
            [0.2000, 0.5000]])
    """
    _finite("alpha (layer coefficients)", alpha)
    out = {}
    for key, b in beta.items():
        layer = layer_of(key)
        if b.shape[0] != alpha.shape[0]:
            raise ValueError(f"{key}: beta has {b.shape[0]} specialists, alpha {alpha.shape[0]}")
        if layer >= alpha.shape[1]:
            raise ValueError(f"{key}: layer {layer} but alpha has {alpha.shape[1]} layers")
        _finite(f"beta of {key}", b)
        a = alpha[:, layer].to(b.dtype).view(-1, *([1] * (b.ndim - 1)))
        product = a * b
        total = product.sum(0, keepdim=True)
        # Where every product underflows to 0 no specialist is preferred: weigh them equally.
        out[key] = torch.where(total > 0, product / total.clamp_min(1e-300),
                               torch.full_like(product, 1.0 / b.shape[0]))
    return out


def uniform_layer_coefficients(n_specialists: int, n_layers: int) -> torch.Tensor:
    """Layer coefficients that weigh every specialist equally: the neutral α.

    ES-Merging without its layer-wise part (``es-element``) uses this in place of Eq. 2, so that
    Eq. 4 gives λ = β.

    Parameters
    ----------
    n_specialists : int
        S, the number of specialists.
    n_layers : int
        L, the number of transformer blocks.

    Returns
    -------
    Tensor, shape ``[S, L]``
        Every entry 1/S (float64).

    Examples
    --------
    >>> uniform_layer_coefficients(2, 3)
    tensor([[0.5000, 0.5000, 0.5000],
            [0.5000, 0.5000, 0.5000]], dtype=torch.float64)
    """
    return torch.full((n_specialists, n_layers), 1.0 / n_specialists, dtype=torch.float64)


def uniform_element_coefficients(template: LoraState, n_specialists: int) -> dict[str, torch.Tensor]:
    """Element coefficients that weigh every specialist equally: the neutral β.

    ES-Merging without its element-wise part (``es-layer``) uses this in place of Eq. 3, so that
    Eq. 4 gives λ = α.

    Parameters
    ----------
    template : dict of str to Tensor
        One adapter's LoRA state; only its keys and shapes are used.
    n_specialists : int
        S, the number of specialists.

    Returns
    -------
    dict of str to Tensor, shape ``[S, *shape]``
        LoRA key -> every entry 1/S (float64).

    Examples
    --------
    >>> beta = uniform_element_coefficients({"w": torch.zeros(2)}, 4)
    >>> beta["w"].shape
    torch.Size([4, 2])
    >>> beta["w"][:, 0].tolist()
    [0.25, 0.25, 0.25, 0.25]
    """
    return {k: torch.full((n_specialists, *v.shape), 1.0 / n_specialists, dtype=torch.float64)
            for k, v in template.items()}


def merge_lora(states: list[LoraState], coefficients: dict[str, torch.Tensor]) -> LoraState:
    r"""Merge LoRA adapters by a weighted sum, element by element (paper Eq. 1).

    :math:`\theta^{l,n}_{\text{uni}} = \sum_j \lambda^{l,n}_j\,\theta^{l,n}_j`, applied to the LoRA A
    and B matrices themselves (not to their products BA), as in the paper. The sum runs in float64.

    Parameters
    ----------
    states : list of dict of str to Tensor
        One LoRA state per specialist (S of them), with the same keys and shapes.
    coefficients : dict of str to Tensor, shape ``[S, *shape]`` or ``[S]``
        LoRA key -> λ; an ``[S]`` vector weighs the whole tensor alike.

    Returns
    -------
    dict of str to Tensor
        The merged state, with each key's shape and the dtype of the inputs.

    Examples
    --------
    Element 0 takes adapter a only; element 1 is the mean (2 + 6) / 2 = 4:

    >>> a = {"w": torch.tensor([1.0, 2.0])}; b = {"w": torch.tensor([3.0, 6.0])}
    >>> merge_lora([a, b], {"w": torch.tensor([[1.0, 0.5], [0.0, 0.5]])})["w"]
    tensor([1., 4.])
    >>> merge_lora([a, b], {"w": torch.tensor([0.25, 0.75])})["w"]  # one weight per adapter
    tensor([2.5000, 5.0000])
    """
    if not states:
        raise ValueError("no adapters to merge")
    merged = {}
    for key, ref in states[0].items():
        if key not in coefficients:
            raise KeyError(f"no coefficients for LoRA tensor {key}")
        coef = coefficients[key]
        if coef.shape[0] != len(states):
            raise ValueError(f"{key}: {coef.shape[0]} coefficients for {len(states)} adapters")
        _finite(f"coefficients of {key}", coef)
        coef = coef.view(coef.shape[0], *([1] * ref.ndim)) if coef.ndim == 1 else coef
        stacked = torch.stack([s[key].double() for s in states])
        merged[key] = (coef.double() * stacked).sum(0).to(ref.dtype)
    return merged
