r"""Combining coefficients and merging LoRA adapters (paper Eqs. 1 and 4).

.. math::

    \lambda^{l,n}_j = \frac{\alpha^l_j\,\beta^{l,n}_j}{\sum_m \alpha^l_m\,\beta^{l,n}_m}
    \quad\text{(Eq. 4)}, \qquad
    \theta^{l,n}_{\text{uni}} = \sum_j \lambda^{l,n}_j\,\theta^{l,n}_j \quad\text{(Eq. 1)}.

As in the paper and its code, Eq. 1 is applied to the LoRA A and B matrices element-wise (not
to the products BA). Running a method on models and writing its result is ``esmerge.pipeline``.
"""
from __future__ import annotations

import torch

from esmerge.adapters import LoraState, layer_of
from esmerge.errors import InputError


def _finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise InputError(f"{name} contains NaN or Inf; the signals it came from are broken (rerun with a fresh cache)")


def combine(alpha: torch.Tensor, beta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""Final coefficients :math:`\lambda = \alpha\beta / \sum_m \alpha_m\beta_m` (paper Eq. 4).

    Args:
        alpha: ``[S, L]`` layer-wise coefficients (``layer_coefficients``).
        beta: LoRA key -> ``[S, *tensor_shape]`` element-wise coefficients (``element_coefficients``).

    Returns:
        LoRA key -> ``[S, *tensor_shape]``, summing to 1 over dim 0.

    >>> alpha = torch.tensor([[0.5], [0.5]])
    >>> beta = {"layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([[0.2, 0.9], [0.8, 0.1]])}
    >>> combine(alpha, beta)["layers.0.self_attn.q_proj.lora_A.weight"]
    tensor([[0.2000, 0.9000],
            [0.8000, 0.1000]])
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
        out[key] = torch.where(total > 0, product / total.clamp_min(1e-300), torch.full_like(product, 1.0 / b.shape[0]))
    return out


def uniform_layer_coefficients(n_specialists: int, n_layers: int) -> torch.Tensor:
    """``[S, L]`` of ``1/S``: the neutral alpha (used by element-only ES-Merging).

    >>> uniform_layer_coefficients(2, 3)
    tensor([[0.5000, 0.5000, 0.5000],
            [0.5000, 0.5000, 0.5000]], dtype=torch.float64)
    """
    return torch.full((n_specialists, n_layers), 1.0 / n_specialists, dtype=torch.float64)


def uniform_element_coefficients(template: LoraState, n_specialists: int) -> dict[str, torch.Tensor]:
    """Key -> ``[S, *shape]`` of ``1/S``: the neutral beta (used by layer-only ES-Merging).

    >>> uniform_element_coefficients({"w": torch.zeros(2)}, 4)["w"].shape
    torch.Size([4, 2])
    """
    return {k: torch.full((n_specialists, *v.shape), 1.0 / n_specialists, dtype=torch.float64)
            for k, v in template.items()}


def merge_lora(states: list[LoraState], coefficients: dict[str, torch.Tensor]) -> LoraState:
    r"""Weighted element-wise sum of LoRA tensors (paper Eq. 1).

    Args:
        states: one LoRA state dict per specialist (same keys and shapes).
        coefficients: key -> ``[S, *shape]`` (or ``[S]``, broadcast over the tensor).

    Returns:
        The merged state dict (dtype of the inputs).

    >>> a = {"w": torch.tensor([1.0, 2.0])}; b = {"w": torch.tensor([3.0, 6.0])}
    >>> merge_lora([a, b], {"w": torch.tensor([[1.0, 0.5], [0.0, 0.5]])})["w"]
    tensor([1., 4.])
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
