"""Graft's dataset compatibility score (Dai et al., Graft Eqs. 9-14), from one model's activations.

How well a dataset suits a model, read off per-module activation statistics (mean magnitude,
sparsity, variance). It is a diagnostic beside the merge (``esmerge.run.baseline_inputs`` reports
it), not part of the dual-gate fusion in ``esmerge.methods.graft``: it needs activations, the
fusion only the LoRA matrices.
"""
from __future__ import annotations

import torch


def activation_statistics(samples: list[torch.Tensor], eps: float = 1e-3) -> tuple[float, float, float]:
    r"""Mean magnitude, sparsity and variance of one module's activations (Graft Eqs. 9-11).

    :math:`\mu = \frac1K\sum_k \|A^{(k)}\|_1/\dim`, :math:`s = \frac1K\sum_k \#\{|a|<\epsilon\}/\dim`,
    :math:`v = \frac1K\sum_k \mathrm{Var}(A^{(k)})` (population variance).

    Parameters
    ----------
    samples : list of Tensor
        K activation tensors of any shape.
    eps : float
        Magnitude below which an activation counts as zero; not given in the paper, 1e-3.

    Returns
    -------
    tuple of float
        (mu, sparsity, variance).

    Examples
    --------
    [0, 2]: mean magnitude 1, half of the entries zero, variance 1:

    >>> activation_statistics([torch.tensor([0., 2.])])
    (1.0, 0.5, 1.0)
    """
    if not samples:
        raise ValueError("compatibility needs at least one activation sample per module")
    mu = sum(float(s.float().abs().mean()) for s in samples) / len(samples)
    sparsity = sum(float((s.float().abs() < eps).float().mean()) for s in samples) / len(samples)
    var = sum(float(s.float().var(unbiased=False)) for s in samples) / len(samples)
    return mu, sparsity, var


def compatibility_score(activations: dict[str, list[torch.Tensor]], eps: float = 1e-3) -> dict:
    r"""Graft's dataset compatibility (Eqs. 12-14) from per-module activations.

    :math:`\rho_i = \mu_i (1 - s_i)\sqrt{v_i}` (Eq. 12); with min-max normalisation of each
    statistic across modules, :math:`\rho'_i = \mu'_i(1-s'_i)\sqrt{v'_i}` (Eq. 13);
    compatibility :math:`= \frac1M \sum_i \rho'_i` (Eq. 14).

    Parameters
    ----------
    activations : dict of str to list of Tensor
        Module name -> its K activation samples (``esmerge.signals.hooks.module_outputs``).
    eps : float
        See ``activation_statistics``.

    Returns
    -------
    dict
        ``{"compatibility": float, "rho": {name: float}, "rho_normalized": {name: float}}``.

    Examples
    --------
    Statistics (mu, s, v): a (2, 0.5, 4), b (2, 0, 1), c (1, 0, 0). Raw rho: a = 2·0.5·2 = 2,
    b = 2·1·1 = 2, c = 0. Min-max normalised: a (1, 1, 1), b (1, 0, 0.25), c (0, 0, 0), so
    rho' = (0, 0.5, 0) and the compatibility is 0.5 / 3:

    >>> acts = {"a": [torch.tensor([0., 4.])], "b": [torch.tensor([1., 3.])], "c": [torch.tensor([1., 1.])]}
    >>> score = compatibility_score(acts)
    >>> score["rho"], score["rho_normalized"]
    ({'a': 2.0, 'b': 2.0, 'c': 0.0}, {'a': 0.0, 'b': 0.5, 'c': 0.0})
    >>> round(score["compatibility"], 4)
    0.1667
    """
    names = sorted(activations)
    stats = torch.tensor([activation_statistics(activations[n], eps) for n in names], dtype=torch.float64)
    rho = stats[:, 0] * (1 - stats[:, 1]) * stats[:, 2].sqrt()
    lo, hi = stats.min(dim=0).values, stats.max(dim=0).values
    normed = torch.where(hi > lo, (stats - lo) / (hi - lo).clamp(min=1e-300), torch.zeros_like(stats))
    rho_n = normed[:, 0] * (1 - normed[:, 1]) * normed[:, 2].sqrt()
    return {
        "compatibility": float(rho_n.mean()),
        "rho": dict(zip(names, rho.tolist())),
        "rho_normalized": dict(zip(names, rho_n.tolist())),
    }
