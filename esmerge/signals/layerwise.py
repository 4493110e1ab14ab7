r"""Layer-wise global merging coefficients from coarse embedding signals (paper §4.2, Eq. 2).

For specialist :math:`\theta_j`, input modality :math:`m_i` and layer :math:`l`:

.. math::

    \mathrm{SWD}^l_{i\to j} = \mathrm{SWD}\big(\mathcal H^l_{i\to\mathrm{base}},\,
                                               \mathcal H^l_{i\to\theta_j}\big), \qquad
    d^l_{i\to j} = \mathrm{SWD}^l_{i\to j} - \mathrm{SWD}^{l-1}_{i\to j},

    s^l_j = \sum_i \operatorname{zscore}_l\big(d^l_{i\to j}\big), \qquad
    \alpha^l_j = \frac{\exp(s^l_j/\tau)}{\sum_m \exp(s^l_m/\tau)}.

Layer indexing: ``l = 1..L`` are the outputs of the L transformer blocks (tensor index
``l - 1``). "Layer 0" is the input embedding: base and specialists receive the *same* probe
embeddings, so :math:`\mathrm{SWD}^0 = 0` and :math:`d^1 = \mathrm{SWD}^1`. The official code
differs in places; see ``standardize``, ``equal_size`` and ``projections`` of ``swd_table``,
``other_weight`` of ``layer_scores``, and the book's "Paper vs official code".
"""
from __future__ import annotations

import math

import torch

from esmerge.errors import UsageError
from esmerge.signals.sliced import require_finite


def zscore(x: torch.Tensor, dim: int = -1, eps: float = 1e-12) -> torch.Tensor:
    """Z-score along one dimension with the population std (§4.2's normalisation over layers).

    Parameters
    ----------
    x : Tensor
        Any shape.
    dim : int
        The dimension to normalise along.
    eps : float
        A slice whose std is at most ``eps`` is constant: it maps to 0, never NaN.

    Returns
    -------
    Tensor
        Same shape as ``x``.

    Examples
    --------
    >>> zscore(torch.tensor([1., 3.]))  # mean 2, std 1
    tensor([-1.,  1.])
    >>> zscore(torch.tensor([2., 2.]))
    tensor([0., 0.])
    """
    mean = x.mean(dim, keepdim=True)
    std = x.std(dim, unbiased=False, keepdim=True)
    return torch.where(std > eps, (x - mean) / std.clamp_min(eps), torch.zeros_like(x))


def layer_changes(swd: torch.Tensor) -> torch.Tensor:
    r"""Per-layer change of the SWD, :math:`d^l = \mathrm{SWD}^l - \mathrm{SWD}^{l-1}` (§4.2).

    :math:`\mathrm{SWD}^0 = 0`: base and specialists get the same input embeddings, so
    :math:`d^1 = \mathrm{SWD}^1`.

    Parameters
    ----------
    swd : Tensor, shape ``[S, M, L]``
        SWD table (``swd_table``).

    Returns
    -------
    Tensor, shape ``[S, M, L]``
        The changes d.

    Examples
    --------
    >>> layer_changes(torch.tensor([[[1., 3., 4.]]]))
    tensor([[[1., 2., 1.]]])
    """
    return torch.diff(swd, dim=-1, prepend=torch.zeros_like(swd[..., :1]))


def softmax_over_specialists(scores: torch.Tensor, tau: float) -> torch.Tensor:
    r"""Softmax over the specialists with temperature tau (the softmax of Eqs. 2 and 3).

    :math:`\exp(s_j/\tau) / \sum_m \exp(s_m/\tau)` along dim 0.

    Parameters
    ----------
    scores : Tensor, shape ``[S, ...]``
        Scores, specialists first.
    tau : float
        Temperature, a finite number > 0.

    Returns
    -------
    Tensor, shape ``[S, ...]``
        Coefficients summing to 1 over dim 0.

    Raises
    ------
    UsageError
        If ``tau`` is not a finite number > 0, or so small that ``scores / tau`` overflows.

    Examples
    --------
    Scores 0 and 1: 1 / (1 + e) = 0.2689; with tau = 0.5, 1 / (1 + e^2) = 0.1192:

    >>> softmax_over_specialists(torch.tensor([[0.], [1.]]), 1.0)
    tensor([[0.2689],
            [0.7311]])
    >>> softmax_over_specialists(torch.tensor([[0.], [1.]]), 0.5)
    tensor([[0.1192],
            [0.8808]])
    >>> softmax_over_specialists(torch.zeros(2, 1), float("inf"))
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: temperature tau must be a finite number > 0, got inf
    """
    check_tau(tau)
    scaled = scores / tau
    if not torch.isfinite(scaled).all() and torch.isfinite(scores).all():
        raise UsageError(f"temperature tau={tau} is too small: scores / tau overflow (use tau >= {MIN_TAU})")
    return torch.softmax(scaled, dim=0)


# The HParams' lower bound on both temperatures. Scores are z-scores (a sum of a few), so for
# tau >= 1e-6 scores / tau stay far below float64's limit; and a gap of 1e-3 between two scores
# already gives exp(-1000) = 0, an argmax, so smaller values change nothing but can overflow.
MIN_TAU = 1e-6


def check_tau(tau) -> float:
    """Check a softmax temperature (the tau of Eqs. 2 and 3).

    Parameters
    ----------
    tau : float
        The temperature to check.

    Returns
    -------
    float
        ``tau`` itself, if it is a finite number > 0 (a bool is refused).

    Raises
    ------
    UsageError
        A one-line message otherwise.

    Examples
    --------
    >>> check_tau(0.5)
    0.5
    >>> check_tau(0)
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: temperature tau must be a finite number > 0, got 0
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(tau) or not tau > 0:
        raise UsageError(f"temperature tau must be a finite number > 0, got {tau!r}")
    return tau


def layer_scores(swd: torch.Tensor, own_modality: list[int] | None = None, other_weight: float = 1.0) -> torch.Tensor:
    r"""Layer-wise importance scores, the :math:`s^l_j` inside Eq. 2 (§4.2).

    :math:`s^l_j = \sum_i w_{ij}\,\operatorname{zscore}_l(d^l_{i\to j})`, with d from
    ``layer_changes`` and the z-score taken over layers. The paper sums over all modalities
    (:math:`w = 1`). The official code weighs the other modalities' terms by ``other_weight`` (its
    ``--alpha``; README value 1.0, equal to the paper) and its own by 1.

    Parameters
    ----------
    swd : Tensor, shape ``[S, M, L]``
        SWD table (``swd_table``), finite.
    own_modality : list of int, optional
        ``own_modality[j]`` is specialist j's modality index; needed only when
        ``other_weight != 1``.
    other_weight : float
        Weight of the other modalities' z-scores (paper: 1).

    Returns
    -------
    Tensor, shape ``[S, L]``
        The scores.

    Examples
    --------
    Own modality only: d = [1, 1, 2] has mean 4/3 and std 0.471, so z = [-0.707, -0.707, 1.414].

    >>> swd = torch.tensor([[[1., 2., 4.], [0., 1., 1.]]])   # d = [1, 1, 2] on its own modality, [0, 1, 0] on the other
    >>> [round(v, 3) for v in layer_scores(swd, [0], other_weight=0.0)[0].tolist()]
    [-0.707, -0.707, 1.414]
    """
    if swd.ndim != 3:
        raise ValueError(f"swd must be [n_specialists, n_modalities, n_layers], got {tuple(swd.shape)}")
    require_finite("SWD table", swd)
    z = zscore(layer_changes(swd), dim=-1)
    if other_weight == 1.0:
        return z.sum(dim=1)
    if own_modality is None or len(own_modality) != swd.shape[0]:
        raise UsageError(f"other_weight={other_weight} needs each specialist's own modality (one per specialist)")
    weights = torch.full(swd.shape[:2], float(other_weight), dtype=z.dtype)
    for j, i in enumerate(own_modality):
        weights[j, i] = 1.0
    return (z * weights[..., None]).sum(dim=1)


def layer_coefficients(swd: torch.Tensor, tau: float = 0.5, own_modality: list[int] | None = None,
                       other_weight: float = 1.0) -> torch.Tensor:
    r"""Layer-wise global merging coefficients :math:`\alpha^l_j` (paper §4.2, Eq. 2).

    :math:`\alpha^l_j = \exp(s^l_j/\tau) / \sum_m \exp(s^l_m/\tau)`, with the scores s of
    ``layer_scores``.

    Parameters
    ----------
    swd : Tensor, shape ``[S, M, L]``
        SWD table (``swd_table``): S specialists, M modalities, L layers.
    tau : float
        Softmax temperature (paper: 0.5), a finite number > 0.
    own_modality, other_weight : list of int, float
        See ``layer_scores`` (paper: weight 1, every modality alike).

    Returns
    -------
    Tensor, shape ``[S, L]``
        α; each column sums to 1.

    Examples
    --------
    Specialist 0 changes by d = [1, 2] (z = [-1, 1]), specialist 1 by d = [2, 1] (z = [1, -1]); at
    layer 1 the softmax of (-1, 1) gives 1 / (1 + e^2) = 0.1192:

    >>> layer_coefficients(torch.tensor([[[1., 3.]], [[2., 3.]]]), tau=1.0)
    tensor([[0.1192, 0.8808],
            [0.8808, 0.1192]])
    >>> swd = torch.tensor([[[1., 3., 4.]], [[1., 2., 3.]]])   # 2 specialists, 1 modality, 3 layers
    >>> bool(torch.allclose(layer_coefficients(swd, tau=1.0).sum(0), torch.ones(3)))
    True
    >>> layer_coefficients(torch.full((2, 1, 3), float("nan")))
    Traceback (most recent call last):
    ...
    esmerge.errors.InputError: SWD table has 6 NaN/Inf entries of 6; the states or SWD it came from are broken
    """
    check_tau(tau)
    return softmax_over_specialists(layer_scores(swd, own_modality, other_weight), tau)


