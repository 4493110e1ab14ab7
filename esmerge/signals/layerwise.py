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

import numpy as np
import ot
import torch

from esmerge.errors import InputError, UsageError


def _require_finite(name: str, x: torch.Tensor) -> None:
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
    _require_finite("SWD table", swd)
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


def own_vs_other(swd: torch.Tensor, own_modality: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """SWD on each specialist's own modality and the mean SWD on the other modalities (paper Fig. 2).

    Parameters
    ----------
    swd : Tensor, shape ``[S, M, L]``
        SWD table (``swd_table``).
    own_modality : list of int
        For each specialist, the index of its modality.

    Returns
    -------
    tuple of Tensor, each of shape ``[S, L]``
        (own, other).

    Examples
    --------
    One specialist, three modalities, two layers; the other two modalities average to [2, 1]:

    >>> own, other = own_vs_other(torch.tensor([[[2., 4.], [1., 1.], [3., 1.]]]), [0])
    >>> own.tolist(), other.tolist()
    ([[2.0, 4.0]], [[2.0, 1.0]])
    """
    n_spec, n_mod, _ = swd.shape
    if len(own_modality) != n_spec:
        raise ValueError(f"need one own modality per specialist ({n_spec}), got {len(own_modality)}")
    own = torch.stack([swd[j, own_modality[j]] for j in range(n_spec)])
    other = torch.stack([swd[j, [i for i in range(n_mod) if i != own_modality[j]]].mean(0) for j in range(n_spec)])
    return own, other


def massive_tokens(tokens: torch.Tensor, factor: float = 20.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Count the massive-activation tokens at each layer of one modality block.

    After Sun et al., 2024, "Massive activations in large language models". A diagnostic of the
    probe states (§4.1), not part of Eq. 2. A token state is massive at layer l when its norm
    exceeds ``factor`` times the median norm of that layer's tokens. One such token (norms of ~2e4
    beside ~1e2 in SmolLM2) dominates a mean-pooled block state, and with it the SWD between two
    models that scale it differently.

    Parameters
    ----------
    tokens : Tensor, shape ``[L, K, T, d]``
        Token states of one modality block (``probe.hidden_states``).
    factor : float
        How many times the median norm a massive token exceeds.
    mask : Tensor, shape ``[K, T]``, optional
        Bool, True on real tokens (``Probes.block_mask``); the others are skipped.

    Returns
    -------
    Tensor, shape ``[L]``
        Massive tokens per layer (int64), counted over the K x T tokens.

    Examples
    --------
    One token of layer 1 is 100 times the others:

    >>> t = torch.ones(2, 3, 4, 5); t[1, 0, 2] *= 100
    >>> massive_tokens(t).tolist()
    [0, 1]
    """
    if tokens.dim() != 4:
        raise ValueError(f"tokens must be [L, K, T, d], got {tuple(tokens.shape)}")
    norms = tokens.float().norm(dim=-1).flatten(1)  # [L, K*T]
    if mask is not None:
        norms = norms[:, mask.flatten().bool()]
    median = norms.median(dim=1, keepdim=True).values
    return (norms > factor * median).sum(dim=1)


def massive_token_counts(tokens: dict[str, dict[str, torch.Tensor]], factor: float = 20.0) -> dict[str, dict[str, int]]:
    """The largest per-layer count of massive-activation tokens, per model and modality.

    The maximum over layers of ``massive_tokens``; a diagnostic of the probe states (§4.1).

    Parameters
    ----------
    tokens : dict of str to dict of str to Tensor, shape ``[L, K, T, d]``
        Model -> input modality -> token states (``states[model]["tokens"]``).
    factor : float
        As in ``massive_tokens``.

    Returns
    -------
    dict of str to dict of str to int
        Model -> modality -> count (0 when no block has a massive token).

    Examples
    --------
    >>> t = torch.ones(2, 3, 4, 5); t[1, 0, 2] *= 100
    >>> massive_token_counts({"base": {"molecule": torch.ones(2, 3, 4, 5)}, "spec": {"molecule": t}})
    {'base': {'molecule': 0}, 'spec': {'molecule': 1}}
    """
    return {model: {m: int(massive_tokens(t, factor).max()) for m, t in by_modality.items()}
            for model, by_modality in tokens.items()}


def specialisation_verdict(blocks_above: int, n_blocks: int, mean_ratio: float) -> bool:
    """Whether one specialist shows paper Fig. 2's pattern of specialisation.

    The pattern holds when the SWD on its own modality exceeds the mean SWD on the other
    modalities at a clear majority of blocks (more than half) and on average (``mean_ratio``,
    mean own / mean other from ``own_vs_other``, above 1).

    Parameters
    ----------
    blocks_above : int
        Blocks where the own-modality SWD is the larger.
    n_blocks : int
        L, the number of blocks.
    mean_ratio : float
        Mean own SWD / mean other SWD.

    Returns
    -------
    bool
        True when both conditions hold.

    Examples
    --------
    3 of 4 blocks and a ratio of 1.2 pass; 2 of 4 is no majority; a ratio of 0.9 fails:

    >>> specialisation_verdict(3, 4, 1.2), specialisation_verdict(2, 4, 1.5), specialisation_verdict(4, 4, 0.9)
    (True, False, False)
    """
    return bool(blocks_above > n_blocks / 2 and mean_ratio > 1)


def specialisation_table(swd: torch.Tensor, own_modality: list[int]) -> list[dict]:
    """Paper Fig. 2's test of specialisation for every specialist, from one SWD table.

    Parameters
    ----------
    swd : Tensor, shape ``[S, M, L]``
        SWD table (``swd_table``).
    own_modality : list of int
        For each specialist, its modality's index.

    Returns
    -------
    list of dict
        One dict per specialist: ``blocks_above`` (blocks where the SWD on its own modality
        exceeds the mean over the others, ``own_vs_other``), ``blocks`` (L), ``mean_ratio`` (mean
        own / mean other) and ``passes`` (``specialisation_verdict``).

    Examples
    --------
    Specialist 0: own [2, 2, 0.5] vs other [1, 1, 1], above at 2 blocks, ratio 4.5 / 3 = 1.5.
    Specialist 1: own [3, 0.5, 0.5] vs other [1, 1, 1], above at 1 block only:

    >>> swd = torch.tensor([[[2., 2., 0.5], [1., 1., 1.]], [[1., 1., 1.], [3., 0.5, 0.5]]])
    >>> [(r["blocks_above"], round(r["mean_ratio"], 2), r["passes"]) for r in specialisation_table(swd, [0, 1])]
    [(2, 1.5, True), (1, 1.33, False)]
    """
    own, other = own_vs_other(swd, own_modality)
    rows = []
    for j in range(own.shape[0]):
        above, ratio = int((own[j] > other[j]).sum()), float(own[j].mean() / other[j].mean())
        rows.append({"blocks_above": above, "blocks": own.shape[1], "mean_ratio": ratio,
                     "passes": specialisation_verdict(above, own.shape[1], ratio)})
    return rows


def projection_stability(base_states: dict[str, torch.Tensor], specialist_states: list[dict[str, torch.Tensor]],
                         sizes=(32, 256, 1024), seeds=range(5), tau: float = 0.5,
                         p: float = 2.0) -> dict[int, torch.Tensor]:
    """Layer coefficients recomputed with several projection counts and seeds (paper Table 7 analogue).

    Each entry is Eq. 2's α from ``swd_table`` with shared projections of that size and seed.
    The variance across seeds measures how stable α is for that number of projections.

    Parameters
    ----------
    base_states : dict of str to Tensor, shape ``[L, K, d]``
        Modality -> pooled base states.
    specialist_states : list of dict of str to Tensor, shape ``[L, K, d]``
        One such dict per specialist (S of them).
    sizes : iterable of int
        Numbers of projections to try.
    seeds : iterable of int
        Seeds of the projections.
    tau, p : float
        Softmax temperature of Eq. 2 and SWD order.

    Returns
    -------
    dict of int to Tensor, shape ``[n_seeds, S, L]``
        ``{n_projections: alphas}``.

    Examples
    --------
    With states of width 1 every direction is +1 or -1, so α does not depend on the seed. The
    SWDs [1, 3] and [2, 3] give α = softmax(-1, 1) = (0.1192, 0.8808) at layer 1, as in
    ``layer_coefficients``:

    >>> s0 = torch.tensor([1., 3.]).view(2, 1, 1).expand(2, 4, 1)
    >>> s1 = torch.tensor([2., 3.]).view(2, 1, 1).expand(2, 4, 1)
    >>> out = projection_stability({"m": torch.zeros(2, 4, 1)}, [{"m": s0}, {"m": s1}], sizes=(2,),
    ...                            seeds=range(2), tau=1.0)
    >>> out[2].shape
    torch.Size([2, 2, 2])
    >>> out[2][:, :, 0]
    tensor([[0.1192, 0.8808],
            [0.1192, 0.8808]], dtype=torch.float64)
    """
    return {size: torch.stack([layer_coefficients(swd_table(base_states, specialist_states, size, p, seed), tau)
                               for seed in seeds]) for size in sizes}
