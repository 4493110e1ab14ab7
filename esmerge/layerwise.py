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
    """Seeded unit directions ``[dim, n_projections]`` (float64), identical on every backend.

    Drawn with NumPy from ``seed`` (POT's ``get_random_projections``), then converted, so the
    same seed gives the same SWD on CPU, GPU, NumPy or torch.

    >>> sliced_projections(3, 0)
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: n_projections must be an integer >= 1, got 0 (an SWD over no directions is NaN)
    """
    if isinstance(n_projections, bool) or not isinstance(n_projections, int) or n_projections < 1:
        raise UsageError(f"n_projections must be an integer >= 1, got {n_projections!r} (an SWD over no directions is NaN)")
    return torch.from_numpy(np.asarray(ot.sliced.get_random_projections(dim, n_projections, seed=seed)))


def fresh_projections(rng: np.random.RandomState, dim: int, n_projections: int) -> torch.Tensor:
    """``n_projections`` unit directions ``[dim, n_projections]`` (float64) drawn from ``rng``, as the official code
    draws them for every layer and pair: a standard normal ``[n_projections, dim]`` matrix, rows scaled to norm 1.

    >>> d = fresh_projections(np.random.RandomState(0), 3, 5)
    >>> tuple(d.shape), bool(torch.allclose(d.norm(dim=0), torch.ones(5, dtype=torch.float64)))
    ((3, 5), True)
    """
    directions = rng.randn(n_projections, dim)
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return torch.from_numpy(np.ascontiguousarray(directions.T))


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, projections: torch.Tensor, p: float = 2.0) -> float:
    r"""Sliced Wasserstein distance between two empirical distributions (uniform weights).

    :math:`\mathrm{SWD}_p(X, Y) = \big(\frac1P\sum_{\omega} W_p^p(\omega^\top X, \omega^\top Y)\big)^{1/p}`,
    computed by POT's ``ot.sliced_wasserstein_distance`` with the given projections.

    Args:
        x: ``[n, d]`` samples; y: ``[m, d]`` samples; projections: ``[d, P]``.

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
    """Z-score both sets with the mean and std of their union, per dimension (official-code option)."""
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
    """SWD between base and each specialist's mean-pooled states, per modality and layer.

    Args:
        base_states: modality -> pooled base states ``[L, K, d]`` (modality order = dict order).
        specialist_states: one such dict per specialist.
        n_projections, p, seed: SWD settings (paper A.3: 1024 projections, p = 2).
        standardize: jointly z-score base and specialist states per layer before SWD
            (official code; off in the paper).
        equal_size: if set, subsample both sets to this many probe samples (seeded, the same
            samples for base and specialist) before SWD (``None`` uses all K).
        projections: ``"shared"``: one set of directions (``sliced_projections(seed)``) for every
            layer and pair; ``"fresh"`` (official code): new directions for every (modality,
            specialist, layer), drawn in that order from one ``np.random.RandomState(seed)``
            (``fresh_projections``).

    Returns:
        ``[n_specialists, n_modalities, L]`` float64 tensor.

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
    """Z-score along ``dim`` with the population std; a constant slice maps to 0, never NaN."""
    mean = x.mean(dim, keepdim=True)
    std = x.std(dim, unbiased=False, keepdim=True)
    return torch.where(std > eps, (x - mean) / std.clamp_min(eps), torch.zeros_like(x))


def layer_changes(swd: torch.Tensor) -> torch.Tensor:
    r"""Per-layer change :math:`d^l = \mathrm{SWD}^l - \mathrm{SWD}^{l-1}` with :math:`\mathrm{SWD}^0 = 0`.

    ``swd``: ``[S, M, L]`` -> ``[S, M, L]``.
    """
    return torch.diff(swd, dim=-1, prepend=torch.zeros_like(swd[..., :1]))


def softmax_over_specialists(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Softmax along dim 0 (specialists) with temperature ``tau``: a finite number > 0.

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
    """``tau`` if it is a finite number > 0, else a one-line ``UsageError``.

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
    r"""Layer-wise importance :math:`s^l_j = \sum_i w_{ij}\,\operatorname{zscore}_l(d^l_{i\to j})` (§4.2, Eq. 2's scores).

    ``swd``: ``[S, M, L]`` -> ``[S, L]``. The paper sums over all modalities (:math:`w = 1`). The
    official code weighs the other modalities' terms by ``other_weight`` (its ``--alpha``; README
    value 1.0, equal to the paper) and its own by 1; ``own_modality[j]`` is specialist j's
    modality index, needed only when ``other_weight != 1``.

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
    r"""Layer-wise global merging coefficients :math:`\alpha^l_j` (paper Eq. 2).

    Args:
        swd: ``[n_specialists, n_modalities, n_layers]`` SWD table (``swd_table``).
        tau: softmax temperature (paper: 0.5), a finite number > 0.
        own_modality, other_weight: see ``layer_scores`` (paper: weight 1, every modality alike).

    Returns:
        ``[n_specialists, n_layers]``; each column sums to 1.

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
    """Paper Fig. 2: SWD on each specialist's own modality vs the mean over the other modalities.

    Args:
        swd: ``[S, M, L]``; own_modality: for each specialist, the index of its modality.

    Returns:
        (own, other), each ``[S, L]``.
    """
    n_spec, n_mod, _ = swd.shape
    if len(own_modality) != n_spec:
        raise ValueError(f"need one own modality per specialist ({n_spec}), got {len(own_modality)}")
    own = torch.stack([swd[j, own_modality[j]] for j in range(n_spec)])
    other = torch.stack([swd[j, [i for i in range(n_mod) if i != own_modality[j]]].mean(0) for j in range(n_spec)])
    return own, other


def massive_tokens(tokens: torch.Tensor, factor: float = 20.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Massive-activation tokens per layer (Sun et al., 2024, "Massive activations in large language models").

    A token state is massive at layer l when its norm exceeds ``factor`` times the median norm of
    that layer's tokens. One such token (norms of ~2e4 beside ~1e2 in SmolLM2) dominates a
    mean-pooled block state, and with it the SWD between two models that scale it differently.

    Args:
        tokens: ``[L, K, T, d]`` token states of one modality block (``probe.hidden_states``).
        mask: optional ``[K, T]`` bool, True on real tokens (``Probes.block_mask``); others are skipped.

    Returns:
        ``[L]`` int64: massive tokens per layer, counted over the K x T tokens.

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
    """The most massive-activation tokens at any block (``massive_tokens``), per model and modality.

    Args:
        tokens: model -> input modality -> ``[L, K, T, d]`` token states (``states[model]["tokens"]``).

    Returns:
        model -> modality -> count (0 when no block has a massive token).

    >>> t = torch.ones(2, 3, 4, 5); t[1, 0, 2] *= 100
    >>> massive_token_counts({"base": {"molecule": torch.ones(2, 3, 4, 5)}, "spec": {"molecule": t}})
    {'base': {'molecule': 0}, 'spec': {'molecule': 1}}
    """
    return {model: {m: int(massive_tokens(t, factor).max()) for m, t in by_modality.items()}
            for model, by_modality in tokens.items()}


def specialisation_verdict(blocks_above: int, n_blocks: int, mean_ratio: float) -> bool:
    """Paper Fig. 2's pattern for one specialist: SWD on its own modality exceeds the mean SWD on
    the other modalities at a clear majority of blocks (more than half) and on average
    (``mean_ratio`` = mean own / mean other, from ``own_vs_other``, above 1).

    >>> specialisation_verdict(3, 4, 1.2), specialisation_verdict(2, 4, 1.5), specialisation_verdict(4, 4, 0.9)
    (True, False, False)
    """
    return bool(blocks_above > n_blocks / 2 and mean_ratio > 1)


def specialisation_table(swd: torch.Tensor, own_modality: list[int]) -> list[dict]:
    """Paper Fig. 2's test for every specialist, from one SWD table.

    Args:
        swd: ``[S, M, L]`` (``swd_table``); own_modality: for each specialist, its modality's index.

    Returns:
        one dict per specialist: ``blocks_above`` (blocks where the SWD on its own modality exceeds
        the mean over the others, ``own_vs_other``), ``blocks`` (L), ``mean_ratio`` (mean own /
        mean other) and ``passes`` (``specialisation_verdict``).

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
                         sizes=(32, 256, 1024), seeds=range(5), tau: float = 0.5, p: float = 2.0) -> dict[int, torch.Tensor]:
    """Paper Table 7 analogue: layer coefficients recomputed with several projection counts and seeds.

    Returns ``{n_projections: alphas [n_seeds, S, L]}``; their variance across seeds measures how
    stable the coefficients are for that number of projections.
    """
    return {size: torch.stack([layer_coefficients(swd_table(base_states, specialist_states, size, p, seed), tau)
                               for seed in seeds]) for size in sizes}
