"""What the embedding signals say about the specialists, beside the coefficients (chapters 4 and 8).

The Fig. 2 test of specialisation (``specialisation_table``, ``specialisation_verdict``: each
specialist's own modality moves more than the others), massive activations (``massive_tokens``)
and how stable the SWD table is across random directions (``projection_stability``).
"""
from __future__ import annotations

import pandas as pd
import torch

from esmerge.signals.layerwise import layer_coefficients
from esmerge.signals.sliced import swd_table


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
        Token states of one modality block (``probe_states.hidden_states``).
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


def specialisation_by_seed(swds: dict[int, torch.Tensor], own_modality: list[int], names: list[str]) -> pd.DataFrame:
    """Paper Fig. 2's test at every specialist seed: ``specialisation_table`` of each seed's SWD table.

    Parameters
    ----------
    swds : dict of int to Tensor, each ``[S, M, L]``
        Specialist seed -> its SWD table.
    own_modality : list of int, length S
        Each specialist's modality index.
    names : list of str, length S
        The specialists' names.

    Returns
    -------
    DataFrame
        One row per (seed, specialist): ``seed, specialist, blocks_above, blocks, mean_ratio, passes``.

    Examples
    --------
    >>> swd = torch.tensor([[[2., 2., 0.5], [1., 1., 1.]], [[1., 1., 1.], [3., 0.5, 0.5]]])
    >>> t = specialisation_by_seed({0: swd, 1: swd.flip(0)}, [0, 1], ["a", "b"])
    >>> t[["seed", "specialist", "blocks_above", "passes"]].values.tolist()
    [[0, 'a', 2, True], [0, 'b', 1, False], [1, 'a', 2, False], [1, 'b', 1, False]]
    """
    return pd.DataFrame([{"seed": s, "specialist": name, **row}
                         for s, swd in swds.items()
                         for name, row in zip(names, specialisation_table(swd, own_modality))])


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
