"""Retention over specialist seeds: a two-level bootstrap, over seeds and then over examples.

The specialists are trained at several seeds with one recipe, and every merge method is run on
each seed's specialists, so the retained fraction ``R_m`` (``retention.retained_fraction``) of a
merged model exists once per seed. The point estimate is the mean over seeds of the per-seed
``R_m`` (and, as in ``retention``, ``"mean"`` is the mean over modalities). Its CI comes from a
two-level (hierarchical) bootstrap: each resample draws S seeds with replacement (one draw shared
by every model and modality: a seed is a whole training run), resamples the examples, computes
the retained fraction per drawn seed and averages over the drawn seeds.

The held-out examples are the same at every seed, so by default one set of example indices per
modality is shared by every model of every drawn seed (``examples="shared"``, the crossed design:
seeds and examples are resampled independently of each other). Drawing the examples afresh for
each drawn seed (``examples="per seed"``, the nested design) would treat the seeds' evaluations as
independent samples of examples: with identical seeds it narrows the CI by about sqrt(S).

What 3 seeds can resolve: the seed level of the bootstrap has only C(2S-1, S) = 10 distinct seed
multisets at S = 3, so a seed-level percentile CI is no narrower than the spread between the
seeds allows, and with few clusters it is known to be anti-conservative (too narrow). A sign test
over 3 seeds cannot reach p < 0.05 (its smallest two-sided p is 2 / 2**3 = 0.25), which is why the
two-level bootstrap is used at all; read its CIs next to the per-seed values
(``SeededResampled.per_seed``, ``seed_table``). ``seed_resolution_note`` says this in one sentence.

``retention.retention_table`` and ``retention.retention_claims`` accept a ``SeededResampled`` (it is
a ``Resampled``); the claims' ``detail`` then names the margin at each seed.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from math import comb
from typing import Callable

import numpy as np
import pandas as pd

from esmerge.evaluate.retention import Resampled, resampled_retention

Nlls = dict[str, dict[str, np.ndarray]]  # modality -> model -> [n_m] per-example summed NLL
Tokens = dict[str, np.ndarray]  # modality -> [n_m] answer-token counts


@dataclass(frozen=True)
class SeededResampled(Resampled):
    """``Resampled`` over specialist seeds: ``point`` the mean over seeds, ``draws`` ``[R]`` from the
    two-level bootstrap, ``nll`` and ``gain`` means over seeds, ``n`` examples per modality (per seed)."""

    seeds: tuple[int, ...]  # the specialist seeds used, in the order given
    per_seed: dict[str, dict[str, dict[int, float]]]  # model -> modality (and "mean") -> seed -> retained fraction
    dropped: dict[str, list[int]]  # model -> the seeds it is missing at (left out of every result)


def common_models(by_seed: Mapping[int, tuple[Nlls, Tokens]]) -> tuple[dict[int, Nlls], dict[str, list[int]]]:
    """Keep the models present at every seed on every modality they have at any seed.

    ``by_seed[s] = (nlls, tokens)`` as ``resampled_retention`` takes them. Returns the NLLs of the
    kept models per seed, and ``dropped``: model -> the seeds it is missing at.

    >>> t = {"cell": np.array([1])}
    >>> kept, dropped = common_models({0: ({"cell": {"base": np.ones(1), "avg": np.ones(1)}}, t),
    ...                                1: ({"cell": {"base": np.ones(1)}}, t)})
    >>> [list(kept[s]["cell"]) for s in kept], dropped
    ([['base'], ['base']], {'avg': [1]})
    """
    modalities = list(dict.fromkeys(m for nlls, _ in by_seed.values() for m in nlls))
    anywhere = {m: list(dict.fromkeys(k for nlls, _ in by_seed.values() for k in nlls.get(m, {})))
                for m in modalities}
    dropped: dict[str, list[int]] = {}
    for m in modalities:
        for k in anywhere[m]:
            for s, (nlls, _) in by_seed.items():
                if k not in nlls.get(m, {}) and s not in dropped.setdefault(k, []):
                    dropped[k].append(s)
    dropped = {k: sorted(v) for k, v in dropped.items() if v}
    kept = {s: {m: {k: v for k, v in per.items() if k not in dropped} for m, per in nlls.items()}
            for s, (nlls, _) in by_seed.items()}
    return kept, dropped


def _check_same_examples(by_seed: Mapping[int, tuple[Nlls, Tokens]]) -> Tokens:
    """The token counts shared by every seed; refuses seeds evaluated on other examples."""
    seeds = list(by_seed)
    first = by_seed[seeds[0]][1]
    for s in seeds[1:]:
        tokens = by_seed[s][1]
        if set(tokens) != set(first):
            raise ValueError(f"seed {s} has modalities {sorted(tokens)}, seed {seeds[0]} {sorted(first)}")
        for m in first:
            if not np.array_equal(np.asarray(tokens[m]), np.asarray(first[m])):
                raise ValueError(f"seed {s}, {m}: other examples than seed {seeds[0]} (token counts differ); "
                                 "every seed must be scored on the same held-out examples")
    return first


def seed_draws(n_seeds: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """``[n_resamples, n_seeds]`` positions into the seed list, drawn with replacement (all 0 for one seed).

    >>> seed_draws(1, 3).tolist(), seed_draws(3, 4).shape
    ([[0], [0], [0]], (4, 3))
    """
    if n_seeds == 1:  # nothing to draw: a single seed reduces exactly to the example-level bootstrap
        return np.zeros((n_resamples, 1), dtype=int)
    # a stream of its own, apart from the example draws (which use ``seed + i``)
    return np.random.default_rng([seed, n_seeds]).integers(0, n_seeds, size=(n_resamples, n_seeds))


def seeded_retention(by_seed: Mapping[int, tuple[Nlls, Tokens]], base: str = "base",
                     specialist_of: Callable[[str], str] = lambda m: f"specialist-{m}", n_resamples: int = 1000,
                     seed: int = 0, examples: str = "shared") -> SeededResampled:
    """Retained fraction per model and modality over specialist seeds, with two-level bootstrap draws.

    ``by_seed[s] = (nlls, tokens)``: ``nlls[modality][model]`` ``[n_m]`` per-example summed NLL and
    ``tokens[modality]`` ``[n_m]`` answer-token counts of specialist seed ``s``, the same examples
    (and token counts) at every seed. Models missing at some seed are left out (``dropped``).

    Point: the mean over the S seeds of each seed's ``resampled_retention`` point. Draws ``[R]``:
    resample r draws S seeds with replacement (``seed_draws``) and averages the retained fraction of
    the drawn seeds, each computed on resampled examples: one set of indices per modality, shared by
    every model (base and specialist included) and, with ``examples="shared"``, by every drawn seed
    (the examples are the same at every seed); ``"per seed"`` draws them afresh per drawn seed.
    ``"mean"`` over modalities is taken per draw, as in ``resampled_retention``. With one seed the
    result equals ``resampled_retention(nlls, tokens, ..., seed=seed)`` draw for draw.

    >>> t = {"cell": np.array([1, 1])}
    >>> def at(es):
    ...     return {"cell": {"base": np.array([2.0, 2.0]), "specialist-cell": np.array([1.0, 1.0]), "es": es}}, t
    >>> res = seeded_retention({0: at(np.array([1.2, 1.2])), 1: at(np.array([1.6, 1.6]))}, n_resamples=100)
    >>> round(res.point["es"]["cell"], 3), {s: round(r, 3) for s, r in res.per_seed["es"]["cell"].items()}
    (0.6, {0: 0.8, 1: 0.4})
    >>> sorted(set(np.round(res.draws["es"]["cell"], 3).tolist()))  # drawn seeds {0,0}, {0,1}, {1,1}
    [0.4, 0.6, 0.8]
    """
    if examples not in ("shared", "per seed"):
        raise ValueError(f"examples must be 'shared' or 'per seed', got {examples!r}")
    if not by_seed:
        raise ValueError("no seeds given")
    seeds = tuple(by_seed)
    tokens = _check_same_examples(by_seed)
    kept, dropped = common_models(by_seed)
    n_mod = len(tokens)
    positions = 1 if examples == "shared" else len(seeds)
    # runs[j][i]: seed i's retention on the example draw of position j (example streams seed + j * n_mod + i)
    runs = [[resampled_retention(kept[s], tokens, base, specialist_of, n_resamples, seed + j * n_mod)
             for s in seeds] for j in range(positions)]
    picks = seed_draws(len(seeds), n_resamples, seed)
    rows = np.arange(n_resamples)

    def hierarchical(get: Callable[[Resampled], np.ndarray]) -> np.ndarray:
        """``[R]``: per resample, the mean over drawn seeds of ``get`` at each drawn seed."""
        per_position = [np.stack([get(r) for r in runs[min(j, positions - 1)]])[picks[:, j], rows]
                        for j in range(len(seeds))]
        return np.mean(per_position, axis=0)

    first = runs[0]
    point, draws, nll, per_seed = {}, {}, {}, {}
    for k in first[0].point:
        modalities = [m for m in first[0].point[k] if m != "mean"]
        per_seed[k] = {m: {s: r.point[k][m] for s, r in zip(seeds, first)} for m in first[0].point[k]}
        point[k] = {m: float(np.mean([r.point[k][m] for r in first])) for m in modalities}
        draws[k] = {m: hierarchical(lambda r, k=k, m=m: r.draws[k][m]) for m in modalities}
        nll[k] = {m: float(np.mean([r.nll[k][m] for r in first])) for m in modalities}
        if "mean" in first[0].point[k]:  # as resampled_retention: the mean over modalities, per draw
            point[k]["mean"] = float(np.mean([point[k][m] for m in modalities]))
            draws[k]["mean"] = np.mean([draws[k][m] for m in modalities], axis=0)
    gain = {m: (float(np.mean([r.gain[m][0] for r in first])), hierarchical(lambda r, m=m: r.gain[m][1]))
            for m in first[0].gain}
    return SeededResampled(point, draws, nll, gain, dict(first[0].n), seeds, per_seed, dropped)


def seed_table(res: SeededResampled) -> pd.DataFrame:
    """Every per-seed retained fraction in long form (``method, modality, seed, retained``), for the book.

    >>> r = SeededResampled({}, {}, {}, {}, {}, (0, 1), {"es": {"cell": {0: 0.5, 1: 0.7}}}, {})
    >>> seed_table(r).values.tolist()
    [['es', 'cell', 0, 0.5], ['es', 'cell', 1, 0.7]]
    """
    rows = [{"method": k, "modality": m, "seed": s, "retained": v}
            for k, per in res.per_seed.items() for m, by in per.items() for s, v in by.items()]
    return pd.DataFrame(rows, columns=["method", "modality", "seed", "retained"])


def seed_resolution_note(n_seeds: int) -> str:
    """One sentence on what ``n_seeds`` specialist seeds can resolve, with the numbers computed.

    >>> seed_resolution_note(3)  # doctest: +NORMALIZE_WHITESPACE
    'With 3 specialist seeds the seed level of the bootstrap has only C(5, 3) = 10 distinct seed multisets,
    a sign test over the seeds cannot go below two-sided p = 0.25, and a bootstrap over so few seeds is known
    to give too narrow (anti-conservative) CIs: read each CI next to the margin at every seed.'
    >>> seed_resolution_note(1)  # doctest: +NORMALIZE_WHITESPACE
    'With one specialist seed the CIs are over examples only: they do not say how much retraining the
    specialists would move the results.'
    """
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be at least 1, got {n_seeds}")
    if n_seeds == 1:
        return ("With one specialist seed the CIs are over examples only: they do not say how much retraining "
                "the specialists would move the results.")
    p_min = min(1.0, 2 * 0.5 ** n_seeds)  # every seed agreeing in sign, two-sided
    return (f"With {n_seeds} specialist seeds the seed level of the bootstrap has only "
            f"C({2 * n_seeds - 1}, {n_seeds}) = {comb(2 * n_seeds - 1, n_seeds)} distinct seed multisets, "
            f"a sign test over the seeds cannot go below two-sided p = {p_min:.3g}, and a bootstrap over so few "
            "seeds is known to give too narrow (anti-conservative) CIs: read each CI next to the margin at every seed.")
