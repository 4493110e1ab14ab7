r"""Sliced Wasserstein distances between the hidden states of the base and of a specialist (paper §4.2).

:math:`\mathrm{SWD}^l_{i\to j}` compares the states at block ``l`` of modality ``i``'s probe tokens
in the base and in specialist ``j``, over random unit directions (``sliced_projections``, or
``fresh_projections`` as the official code draws them); ``swd_table`` fills the ``[S, M, L]``
table that ``esmerge.signals.layerwise`` turns into Eq. 2's coefficients. The 1-D distances are
POT's (``ot.wasserstein_1d``).
"""
from __future__ import annotations

import numpy as np
import ot
import torch

from esmerge.errors import InputError, UsageError


def require_finite(name: str, x: torch.Tensor) -> None:
    """Refuse NaN/Inf loudly: a softmax of NaN is NaN, and z-scores of it silently become 0 (uniform weights)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name} has {bad} NaN/Inf entries of {x.numel()}; the states or SWD it came from are broken")


def sliced_projections(dim: int, n_projections: int = 1024, seed: int = 0) -> torch.Tensor:
    """Seeded random unit directions for the sliced Wasserstein distance (§4.2, Eq. 2's SWD).

    Drawn with NumPy from ``seed`` (POT's ``get_random_projections``), then converted, so the
    same seed gives the same SWD on CPU, GPU, NumPy or torch.

    Parameters
    ----------
    dim : int
        d, the width of the states.
    n_projections : int
        P, the number of directions (paper A.3: 1024), an integer >= 1.
    seed : int
        NumPy seed of the draw.

    Returns
    -------
    Tensor, shape ``[d, P]``
        One unit column per direction (float64).

    Examples
    --------
    In one dimension every unit direction is +1 or -1:

    >>> sliced_projections(1, 3).abs().tolist()
    [[1.0, 1.0, 1.0]]
    >>> sliced_projections(3, 0)
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: n_projections must be an integer >= 1, got 0 (an SWD over no directions is NaN)
    """
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise UsageError(f"n_projections must be an integer >= 1, got {n_projections!r} "
                         "(an SWD over no directions is NaN)")
    return torch.from_numpy(np.asarray(ot.sliced.get_random_projections(dim, n_projections, seed=seed)))


def fresh_projections(rng: np.random.RandomState, dim: int, n_projections: int) -> torch.Tensor:
    """Fresh unit directions drawn from ``rng``, as the official code draws them for every layer and pair.

    A standard normal ``[n_projections, dim]`` matrix with each row scaled to norm 1, returned
    transposed. Used by ``swd_table(projections="fresh")``.

    Parameters
    ----------
    rng : numpy.random.RandomState
        The generator; each call advances it.
    dim : int
        d, the width of the states.
    n_projections : int
        P, the number of directions.

    Returns
    -------
    Tensor, shape ``[d, P]``
        One unit column per direction (float64).

    Examples
    --------
    >>> d = fresh_projections(np.random.RandomState(0), 3, 5)
    >>> tuple(d.shape), bool(torch.allclose(d.norm(dim=0), torch.ones(5, dtype=torch.float64)))
    ((3, 5), True)
    """
    directions = rng.randn(n_projections, dim)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(directions.T))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: torch.Tensor, p: float = 2.0) -> float:
    r"""Sliced Wasserstein distance between two sets of samples with uniform weights (§4.2).

    :math:`\mathrm{SWD}_p(X, Y) = \big(\frac1P\sum_{\omega} W_p^p(\omega^\top X, \omega^\top Y)\big)^{1/p}`,
    computed by POT's ``ot.sliced_wasserstein_distance`` with the given projections, in float64
    on the CPU. It is the SWD of Eq. 2's layer signal.

    Parameters
    ----------
    x : Tensor, shape ``[n, d]``
        Samples of the first distribution.
    y : Tensor, shape ``[m, d]``
        Samples of the second distribution.
    projections : Tensor, shape ``[d, P]``
        Unit directions (``sliced_projections`` or ``fresh_projections``).
    p : float
        Order of the Wasserstein distance (paper A.3: 2).

    Returns
    -------
    float
        The distance.

    Examples
    --------
    In one dimension, {0, 1} moved to {2, 3} travels 2 per sample:

    >>> sliced_wasserstein(torch.tensor([[0.], [1.]]), torch.tensor([[2.], [3.]]), torch.ones(1, 1))
    2.0
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(20, 4, generator=g)
    >>> sliced_wasserstein(x, x, sliced_projections(4, 8))
    0.0
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need [n, d] and [m, d] samples, got {tuple(x.shape)} and {tuple(y.shape)}")
    if projections.shape[0] != x.shape[1]:
        raise ValueError(f"projections {tuple(projections.shape)} do not match dimension {x.shape[1]}")
    xs, ys = x.detach().double().cpu(), y.detach().double().cpu()
    return float(ot.sliced_wasserstein_distance(xs, ys, projections=projections.double(), p=p))


def standardize_jointly(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Z-score two sets of samples with the mean and std of their union, per dimension.

    The official code does this before each SWD (``swd_table(standardize=True)``); the paper
    does not. The std is the population one, clamped at ``eps``.

    Parameters
    ----------
    x : Tensor, shape ``[n, d]``
        First set.
    y : Tensor, shape ``[m, d]``
        Second set.
    eps : float
        Smallest std used, so a constant dimension does not divide by 0.

    Returns
    -------
    tuple of Tensor, shapes ``[n, d]`` and ``[m, d]``
        The standardised ``x`` and ``y``.

    Examples
    --------
    The union {0, 0, 2, 2} has mean 1 and std 1:

    >>> x, y = standardize_jointly(torch.tensor([[0.], [0.]]), torch.tensor([[2.], [2.]]))
    >>> x.flatten().tolist(), y.flatten().tolist()
    ([-1.0, -1.0], [1.0, 1.0])
    """
    both = torch.cat([x, y])
    mean, std = both.mean(0), both.std(0, unbiased=False).clamp_min(eps)
    return (x - mean) / std, (y - mean) / std


def swd_table(
    base_states: dict[str, torch.Tensor],
    specialist_states: list[dict[str, torch.Tensor]],
    n_projections: int = 1024,
    p: float = 2.0,
    seed: int = 0,
    standardize: bool = False,
    equal_size: int | None = None,
    projections: str = "shared",
) -> torch.Tensor:
    r"""SWD between the base's and each specialist's mean-pooled states, per modality and layer (§4.2).

    Entry ``[j, i, l - 1]`` is :math:`\mathrm{SWD}^l_{i\to j} = \mathrm{SWD}(\mathcal H^l_{i\to\mathrm{base}},
    \mathcal H^l_{i\to\theta_j})`, the coarse embedding signal behind Eq. 2.

    Parameters
    ----------
    base_states : dict of str to Tensor, shape ``[L, K, d]``
        Modality -> pooled base states of K probes (modality order = dict order).
    specialist_states : list of dict of str to Tensor, shape ``[L, K, d]``
        One such dict per specialist (S of them).
    n_projections, p, seed : int, float, int
        SWD settings (paper A.3: 1024 projections, p = 2).
    standardize : bool
        Jointly z-score base and specialist states per layer before SWD (official code; off in
        the paper).
    equal_size : int, optional
        If set, subsample both sets to this many probe samples (seeded, the same samples for
        base and specialist) before SWD; ``None`` uses all K.
    projections : {"shared", "fresh"}
        ``"shared"``: one set of directions (``sliced_projections(seed)``) for every layer and
        pair; ``"fresh"`` (official code): new directions for every (modality, specialist,
        layer), drawn in that order from one ``np.random.RandomState(seed)``
        (``fresh_projections``).

    Returns
    -------
    Tensor, shape ``[S, M, L]``
        The SWD table (float64), M = number of modalities.

    Examples
    --------
    States of width 1 that all move from 0 to 1 are at distance 1 at every layer:

    >>> swd_table({"m": torch.zeros(2, 4, 1)}, [{"m": torch.ones(2, 4, 1)}], n_projections=8).tolist()
    [[[1.0, 1.0]]]
    >>> x = {"m": torch.zeros(2, 4, 3)}; y = [{"m": torch.ones(2, 4, 3)}]
    >>> swd_table(x, y, n_projections=8, projections="fresh").shape
    torch.Size([1, 1, 2])
    """
    if projections not in ("shared", "fresh"):
        raise UsageError(f"projections must be 'shared' or 'fresh', got {projections!r}")
    modalities = list(base_states)
    first = base_states[modalities[0]]
    n_layers, _, dim = first.shape
    shared = sliced_projections(dim, n_projections, seed)
    rng = np.random.RandomState(seed) if projections == "fresh" else None
    gen = torch.Generator().manual_seed(seed)
    subsets = {}  # drawn specialist-major, as before, so a seed keeps its subsamples
    for j, spec in enumerate(specialist_states):
        for i, modality in enumerate(modalities):
            base, other = base_states[modality], spec[modality]
            if base.shape != other.shape:
                raise ValueError(f"{modality}: base states {tuple(base.shape)} vs specialist {tuple(other.shape)}")
            if equal_size is not None:
                idx = torch.randperm(base.shape[1], generator=gen)[:equal_size]
                base, other = base[:, idx], other[:, idx]
            subsets[j, i] = (base, other)
    table = torch.zeros(len(specialist_states), len(modalities), n_layers, dtype=torch.float64)
    # Modality-major, then specialist, then layer: the official code's order of fresh draws.
    for i in range(len(modalities)):
        for j in range(len(specialist_states)):
            base, other = subsets[j, i]
            for layer in range(n_layers):
                x, y = base[layer].double(), other[layer].double()
                if standardize:
                    x, y = standardize_jointly(x, y)
                directions = shared if rng is None else fresh_projections(rng, dim, n_projections)
                table[j, i, layer] = sliced_wasserstein(x, y, directions, p)
    return table
