"""Retention: how much of each specialist's own skill a merged model keeps.

For modality m, let L be the mean held-out answer NLL (nats per answer token, lower is better)
of the base, specialist m and a merged model, all on the same examples of specialist m's task
(ChEBI-20 test captions, held-out Swiss-Prot GO texts, held-out PBMC68k / CCLE cells). Then

.. math:: R_m = \\frac{L_{merged} - L_{base}}{L_{spec} - L_{base}}

is 1 when the merged model is as good as the specialist on its own task, 0 when it is no better
than the base and negative when it is worse. Parameter-space merging papers report the same
"normalised performance": merged accuracy over the fine-tuned model's (task arithmetic, Ilharco
et al. 2023; TIES-Merging, Yadav et al. 2023). An NLL has no natural zero, so the base is the
zero point here. CIs come from a paired bootstrap: examples are resampled jointly for every
model, so the base, the specialist and each merged model always see the same resample.

This module is the statistic, pure functions over per-example summed NLLs (``mean_nll``,
``retained_fraction``, ``resampled_retention``, ``retention_table``, ``retention_claims``);
``esmerge.evaluate.retention_seeds`` averages it over specialist seeds (a two-level bootstrap) for the
same table and claims; ``esmerge.evaluate.retention_models`` picks the models and produces their
NLLs, cached per (weights, examples, settings) under ``cache_dir()/retention``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from esmerge.evaluate.caveats import BUDGETED, CAVEAT_COLUMNS, DEFAULT_CAVEATS, caveats_for, seeds_text, would_change
from esmerge.evaluate.decisions import ALPHA, bootstrap_pvalue, holm, superiority_verdict

# retention_models and score_models are re-exported: notebooks/09_retention.py calls them as
# ``retention.retention_models`` / ``.score_models``.
from esmerge.evaluate.retention_models import retention_models, score_models  # noqa: F401
from esmerge.evaluate.stats import format_ci

SOURCE = "retention: normalised performance (Ilharco et al. 2023, Yadav et al. 2023)"
VERDICTS = ("supported", "not supported", "inconclusive", "not measured")  # esmerge.report.claims' words


# --------------------------------------------------------------------------- the statistic
def mean_nll(nll: np.ndarray, tokens: np.ndarray, idx: np.ndarray | None = None) -> np.ndarray:
    """Token-weighted mean NLL ``sum(nll) / sum(tokens)`` over examples, as ``heldout.specialist_loss``.

    ``nll``, ``tokens``: ``[n]`` per-example summed NLL and answer-token counts; ``idx``: optional
    ``[R, n]`` bootstrap indices, giving ``[R]`` resampled means.

    >>> float(mean_nll(np.array([2.0, 6.0]), np.array([1, 3])))
    2.0
    >>> mean_nll(np.array([2.0, 6.0]), np.array([1, 3]), np.array([[0, 0], [1, 1]])).tolist()
    [2.0, 2.0]
    """
    nll, tokens = np.asarray(nll, dtype=float), np.asarray(tokens, dtype=float)
    if idx is None:
        return np.float64(nll.sum() / tokens.sum())
    return nll[idx].sum(-1) / tokens[idx].sum(-1)


def retained_fraction(merged, base, specialist):
    """``(merged - base) / (specialist - base)`` on mean NLLs (scalars or ``[R]`` arrays).

    1: as good as the specialist; 0: no better than the base; < 0: worse than the base; NaN where
    the specialist is not better than the base (nothing to retain).

    >>> retained_fraction(1.5, 2.0, 1.0)   # halfway from the base to the specialist
    0.5
    >>> retained_fraction(1.0, 2.0, 1.0), retained_fraction(2.0, 2.0, 1.0), retained_fraction(2.5, 2.0, 1.0)
    (1.0, 0.0, -0.5)
    >>> retained_fraction(1.5, 2.0, 2.0)
    nan
    """
    merged, base, specialist = (np.asarray(x, dtype=float) for x in (merged, base, specialist))
    gain = base - specialist
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(gain > 0, (base - merged) / gain, np.nan)
    return float(out) if out.ndim == 0 else out


def bootstrap_indices(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``[n_resamples, n]`` example indices drawn with replacement; one draw shared by every model (paired)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


@dataclass(frozen=True)
class Resampled:
    """Point estimates and bootstrap draws of retention, shared by the table and the claims."""

    point: dict[str, dict[str, float]]  # model -> modality (and "mean") -> retained fraction
    draws: dict[str, dict[str, np.ndarray]]  # same keys -> [R]
    nll: dict[str, dict[str, float]]  # model -> modality -> mean NLL
    gain: dict[str, tuple[float, np.ndarray]]  # modality -> specialist's NLL gain over the base, and its draws
    n: dict[str, int]  # modality -> examples


def resampled_retention(nlls: dict[str, dict[str, np.ndarray]], tokens: dict[str, np.ndarray],
                        base: str = "base", specialist_of: Callable[[str], str] = lambda m: f"specialist-{m}",
                        n_resamples: int = 1000, seed: int = 0) -> Resampled:
    """Retained fraction of every model on every modality, and its mean over modalities, with draws.

    ``nlls[modality][model]``: ``[n_m]`` per-example summed NLL, the same examples for every model;
    ``tokens[modality]``: ``[n_m]`` answer-token counts. Within a modality one set of bootstrap
    indices is used for every model (the paired design); modalities are resampled independently.
    The mean over modalities is taken per draw, so its CI is paired too.
    """
    modalities = list(nlls)
    models = list(dict.fromkeys(k for m in modalities for k in nlls[m]))
    point = {k: {} for k in models}
    draws = {k: {} for k in models}
    nll = {k: {} for k in models}
    gain = {}
    for i, m in enumerate(modalities):
        spec = specialist_of(m)
        for need in (base, spec):
            if need not in nlls[m]:
                raise KeyError(f"retention on {m} needs the NLLs of {need!r}; have {sorted(nlls[m])}")
        idx = bootstrap_indices(len(tokens[m]), n_resamples, seed + i)
        means = {k: mean_nll(v, tokens[m]) for k, v in nlls[m].items()}
        boots = {k: mean_nll(v, tokens[m], idx) for k, v in nlls[m].items()}
        gain[m] = (float(means[base] - means[spec]), boots[base] - boots[spec])
        for k in nlls[m]:
            nll[k][m] = float(means[k])
            point[k][m] = retained_fraction(means[k], means[base], means[spec])
            draws[k][m] = retained_fraction(boots[k], boots[base], boots[spec])
    for k in models:
        if all(m in point[k] for m in modalities):
            point[k]["mean"] = float(np.mean([point[k][m] for m in modalities]))
            draws[k]["mean"] = np.mean([draws[k][m] for m in modalities], axis=0)
    return Resampled(point, draws, nll, gain, {m: len(tokens[m]) for m in modalities})


def percentile_ci(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile CI of bootstrap ``draws`` ``[R]``; NaN draws (a resample whose specialist is no better
    than the base) are dropped, unless more than ``(1 - level) / 2`` of them are: then ``(nan, nan)``.

    >>> tuple(round(x, 6) for x in percentile_ci(np.arange(101.0), 0.9))
    (5.0, 95.0)
    >>> percentile_ci(np.array([1.0, np.nan, np.nan, 2.0]))
    (nan, nan)
    """
    draws = np.asarray(draws, dtype=float)
    alpha = (1 - level) / 2
    if np.isnan(draws).mean() > alpha:
        return float("nan"), float("nan")
    return float(np.nanquantile(draws, alpha)), float(np.nanquantile(draws, 1 - alpha))


def retention_table(res: Resampled, level: float = 0.95) -> pd.DataFrame:
    """One row per (model, modality or "mean"): mean NLL, retained fraction and its paired CI.

    Columns ``method, modality, n, nll, retained, lo, hi``; plus ``specialist_gain`` (base NLL -
    specialist NLL, nats per token) with ``gain_lo, gain_hi``, which says whether there is
    anything to retain on that modality (a CI reaching 0 makes every retained fraction unstable).
    """
    rows = []
    for k, per in res.point.items():
        for m, value in per.items():
            lo, hi = percentile_ci(res.draws[k][m], level)
            row = {"method": k, "modality": m, "n": res.n.get(m, sum(res.n.values())),
                   "nll": res.nll[k].get(m, np.nan), "retained": value, "lo": lo, "hi": hi}
            if m in res.gain:
                g, gd = res.gain[m]
                row.update(specialist_gain=g, gain_lo=percentile_ci(gd, level)[0], gain_hi=percentile_ci(gd, level)[1])
            rows.append(row)
    return pd.DataFrame(rows, columns=["method", "modality", "n", "nll", "retained", "lo", "hi",
                                       "specialist_gain", "gain_lo", "gain_hi"])


def retention_wide(table: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """``retention_table`` as one row per method, one column per modality: ``"0.500 [0.400, 0.600]"``.

    >>> t = pd.DataFrame({"method": ["avg", "avg"], "modality": ["cell", "mean"], "retained": [0.5, 0.25],
    ...                   "lo": [0.4, 0.1], "hi": [0.6, 0.4]})
    >>> retention_wide(t).loc["avg"].tolist()
    ['0.500 [0.400, 0.600]', '0.250 [0.100, 0.400]']
    """
    text = table.assign(text=[format_ci(r.retained, r.lo, r.hi, digits) for r in table.itertuples()])
    wide = text.pivot(index="method", columns="modality", values="text")
    return wide.reindex(index=list(dict.fromkeys(table["method"])), columns=list(dict.fromkeys(table["modality"])))


def split_by_source(nlls: dict[str, dict[str, np.ndarray]], tokens: dict[str, np.ndarray],
                    uids: dict[str, list[str]]) -> tuple[dict, dict]:
    """Split each modality's examples by the source in their uid (``pbmc:...`` -> ``cell/pbmc``).

    Modalities whose uids name no source (or one source only) are kept whole. Use with
    ``resampled_retention(..., specialist_of=lambda m: "specialist-" + m.split("/")[0])``.

    >>> n, t = split_by_source({"cell": {"base": np.array([1.0, 2.0, 3.0])}}, {"cell": np.array([1, 1, 2])},
    ...                        {"cell": ["pbmc:a", "ccle:b", "pbmc:c"]})
    >>> {k: v["base"].tolist() for k, v in n.items()}, {k: v.tolist() for k, v in t.items()}
    ({'cell/pbmc': [1.0, 3.0], 'cell/ccle': [2.0]}, {'cell/pbmc': [1, 2], 'cell/ccle': [1]})
    """
    out_nlls, out_tokens = {}, {}
    for m, per in nlls.items():
        sources = [u.split(":", 1)[0] if ":" in u else "" for u in uids[m]]
        names = list(dict.fromkeys(sources))
        if len(names) < 2 or "" in names:
            out_nlls[m], out_tokens[m] = per, tokens[m]
            continue
        for src in names:
            keep = np.array([s == src for s in sources])
            out_nlls[f"{m}/{src}"] = {k: v[keep] for k, v in per.items()}
            out_tokens[f"{m}/{src}"] = tokens[m][keep]
    return out_nlls, out_tokens


def nll_frame(nlls: dict[str, dict[str, np.ndarray]], tokens: dict[str, np.ndarray],
              uids: dict[str, list[str]]) -> pd.DataFrame:
    """Every per-example NLL in long form (``modality, uid, tokens, method, nll``), for re-analysis.

    >>> nll_frame({"cell": {"base": np.array([2.0])}}, {"cell": np.array([4])}, {"cell": ["pbmc:1"]}).to_dict("records")
    [{'modality': 'cell', 'uid': 'pbmc:1', 'tokens': 4, 'method': 'base', 'nll': 2.0}]
    """
    rows = [{"modality": m, "uid": u, "tokens": int(t), "method": k, "nll": float(v[i])}
            for m, per in nlls.items() for k, v in per.items() for i, (u, t) in enumerate(zip(uids[m], tokens[m]))]
    return pd.DataFrame(rows, columns=["modality", "uid", "tokens", "method", "nll"])


def verdict(lo: float, hi: float) -> str:
    """``supported`` when a CI of ``a - b`` lies above 0, ``not supported`` below, else ``inconclusive``.

    >>> verdict(0.1, 0.3), verdict(-0.3, -0.1), verdict(-0.1, 0.2), verdict(float("nan"), 0.2)
    ('supported', 'not supported', 'inconclusive', 'not measured')
    """
    if np.isnan(lo) or np.isnan(hi):
        return "not measured"
    return "supported" if lo > 0 else "not supported" if hi < 0 else "inconclusive"


def gated_verdict(lo: float, hi: float, p_holm: float, alpha: float = ALPHA) -> str:
    """``verdict`` of a margin's CI, kept only where its Holm-adjusted p-value is below ``alpha`` too.

    A CI that excludes 0 but does not survive the family-wise correction is ``inconclusive``.

    >>> gated_verdict(0.1, 0.3, 0.01), gated_verdict(0.1, 0.3, 0.2), gated_verdict(-0.3, -0.1, 0.04)
    ('supported', 'inconclusive', 'not supported')
    """
    v = verdict(lo, hi)
    return v if v in ("inconclusive", "not measured") or p_holm < alpha else "inconclusive"


def _margin(res: Resampled, a: str, b: str, m: str, level: float) -> tuple[float, float, float, float]:
    """``(point, lo, hi, p)`` of ``R(a) - R(b)`` on ``m`` from the paired draws; ``p`` two-sided bootstrap."""
    diff = res.draws[a][m] - res.draws[b][m]
    return (res.point[a][m] - res.point[b][m], *percentile_ci(diff, level), bootstrap_pvalue(diff))


def _holm(p: Mapping[str, float]) -> dict[str, float]:
    """``decisions.holm`` over the measured p-values; NaN (nothing measured) stays NaN, outside the family."""
    adjusted = holm({k: v for k, v in p.items() if not np.isnan(v)})
    return {k: adjusted.get(k, float("nan")) for k in p}


def _seed_text(res: Resampled, a: str, b: str, m: str) -> str:
    """The margin at each specialist seed and how many seeds share the sign of their mean ("" for one seed set)."""
    per = getattr(res, "per_seed", None)
    if not per or m not in per.get(a, {}) or m not in per.get(b, {}):
        return ""
    seeds = list(per[a][m])
    d = [per[a][m][s] - per[b][m][s] for s in seeds]
    agree = int(np.sum(np.sign(d) == np.sign(np.mean(d))))
    return (f"; seeds {'/'.join(map(str, seeds))}: {'/'.join(f'{x:+.3f}' for x in d)} "
            f"({agree} of {len(d)} agree in sign)")


def _row_would_change(v: str, b: str, lo: float, hi: float, p_holm: float, alpha: float) -> str:
    """``would_change``, plus the case it has no words for: a CI excluding 0 that Holm leaves inconclusive."""
    if v == "inconclusive" and (lo > 0 or hi < 0):
        return f"Holm p < {alpha:g} vs {b} (now {p_holm:.3f}; the CI [{lo:+.3f}, {hi:+.3f}] already excludes 0)"
    return would_change(v, b, lo, hi, p_holm=p_holm if v == "not supported" else None, digits=3)


def retention_claims(res: Resampled, a: str = "es", baselines: list[str] | None = None,
                     level: float = 0.95, *, seeds: Sequence[int] | None = None, caveats: Sequence[str] | None = None,
                     budgets: Sequence[str] | Mapping[str, str] | None = None, alpha: float = ALPHA) -> pd.DataFrame:
    """The claims-register section: ``a`` beats each baseline on mean retention over modalities.

    ``res``: ``resampled_retention`` (one seed set) or ``retention_seeds.seeded_retention`` (its
    draws from the two-level bootstrap, and per-seed values). ``baselines``: default every model
    except ``a``, the base, the specialists and ``a``'s ablations (``es-*``). Each row: the margin
    ``mean R(a) - mean R(b)`` with its paired-bootstrap percentile CI, its two-sided bootstrap
    p-value (``bootstrap_pvalue``) Holm-adjusted over the compared baselines (``p_holm``),
    ``rank`` of ``a`` among ``a`` and the baselines (1 = best) and a verdict (``gated_verdict``):
    *supported* / *not supported* only when the CI excludes 0 on that side AND ``p_holm < alpha``.
    ``detail`` names the per-modality margins and, for seeded results, the margin at each seed.

    Where a comparison's per-modality margins are significant (CI excluding 0) with opposite
    signs, the mean nets them out: its ``detail`` says so and one row per modality follows it
    (``modality``, claim "... on <modality>"), Holm-corrected within those modality rows.

    The first row is the claim over all baselines, its margin the smallest one, judged as
    ``decisions.superiority_verdict`` (as the accuracy register): *supported* when every CI lies
    above 0 (an intersection-union test needs no correction), *not supported* only when some
    baseline is significantly better after Holm. Columns ``claim, source, paper`` (NaN: the paper
    reports no retention) ``, a, b, modality, ours, lo, hi, verdict, rank, of, detail, n_compared,
    p_holm``, margins rounded to 3 decimals, then ``CAVEAT_COLUMNS``: ``n`` (examples over the
    row's modalities, per seed), ``seeds`` (``seeds``, default ``res.seeds`` or ``(0,)``),
    ``caveats`` (``caveats_for``; default ``DEFAULT_CAVEATS["retention"]``, below-budget
    baselines ``budgets``, default ``BUDGETED``) and ``would_change``.

    >>> t = np.array([1, 1])
    >>> nl = {"base": np.array([2.0, 2.0]), "specialist-cell": np.array([1.0, 1.0]),
    ...       "es": np.array([1.2, 1.3]), "avg": np.array([1.8, 1.9])}
    >>> c = retention_claims(resampled_retention({"cell": nl}, {"cell": t}, n_resamples=200))
    >>> c[["b", "ours", "verdict", "p_holm"]].values.tolist()
    [['every baseline', 0.6, 'supported', 0.01], ['avg', 0.6, 'supported', 0.01]]
    """
    if baselines is None:
        baselines = [k for k in res.point if k != a and k != "base" and not k.startswith("specialist-")
                     and not k.startswith(f"{a}-")]
    columns = ["claim", "source", "paper", "a", "b", "modality", "ours", "lo", "hi", "verdict", "rank", "of",
               "detail", "n_compared", "p_holm", *CAVEAT_COLUMNS]
    applies = tuple(DEFAULT_CAVEATS["retention"] if caveats is None else caveats)
    budgets = BUDGETED if budgets is None else budgets
    seeds = tuple(getattr(res, "seeds", (0,))) if seeds is None else tuple(seeds)
    dropped = getattr(res, "dropped", {})
    left_out = ("; not at every seed, left out: " + ", ".join(f"{k} (missing at seed {'/'.join(map(str, s))})"
                                                               for k, s in dropped.items())) if dropped else ""

    def caveat_columns(models: list[str], m: str = "mean") -> dict:
        return {"n": int(sum(res.n.values()) if m == "mean" else res.n[m]), "seeds": seeds_text(seeds, models),
                "caveats": caveats_for(applies, models, budgeted=budgets, seeds=seeds)}

    if a not in res.point or "mean" not in res.point[a] or not baselines:
        return pd.DataFrame([{"claim": f"{a} retains more of the specialists' skill than every baseline",
                              "source": SOURCE, "paper": np.nan, "a": a, "b": "every baseline", "modality": "mean",
                              "ours": np.nan, "lo": np.nan, "hi": np.nan, "verdict": "not measured", "rank": np.nan,
                              "of": 0, "detail": f"missing: {a if a not in res.point else 'baselines'}" + left_out,
                              "n_compared": 0, "p_holm": np.nan, **caveat_columns([a, *(baselines or [])]),
                              "would_change": would_change("not measured", "", np.nan, np.nan)}],
                            columns=columns)
    compared = [b for b in baselines if "mean" in res.point.get(b, {})]

    def rank_of(m: str) -> tuple[int, int]:
        ranked = sorted([a, *(b for b in compared if m in res.point[b])], key=lambda k: -res.point[k][m])
        return ranked.index(a) + 1, len(ranked)

    def row(b: str, m: str, margin: tuple, p_holm: float, family: str, extra: str = "") -> dict:
        point, lo, hi, p = margin
        v = gated_verdict(lo, hi, p_holm, alpha)
        on = "mean over modalities" if m == "mean" else f"on {m}"
        rank, of = rank_of(m)
        return {"claim": f"{a} retains more of the specialists' skill than {b} ({on})", "source": SOURCE,
                "paper": np.nan, "a": a, "b": b, "modality": m, "ours": point, "lo": lo, "hi": hi, "verdict": v,
                "rank": rank, "of": of, "n_compared": 1, "p_holm": p_holm,
                "detail": f"{a} {res.point[a][m]:.3f} vs {b} {res.point[b][m]:.3f}; {extra}p {p:.3f}, "
                          f"Holm p {p_holm:.3f} over {family}" + _seed_text(res, a, b, m),
                **caveat_columns([a, b], m), "would_change": _row_would_change(v, b, lo, hi, p_holm, alpha)}

    margins = {b: _margin(res, a, b, "mean", level) for b in compared}
    adjusted = _holm({b: x[3] for b, x in margins.items()})
    modalities = [m for m in res.point[a] if m != "mean"]
    family = f"{len(compared)} baseline" + "s" * (len(compared) != 1)
    mean_rows, rows = [], []
    for b in compared:
        per = {m: _margin(res, a, b, m, level) for m in modalities if m in res.point[b]}
        # the mean can net a significant gain on one modality against a significant loss on another
        split = any(x[1] > 0 for x in per.values()) and any(x[2] < 0 for x in per.values())
        text = "per modality: " + "; ".join(f"{m} {x[0]:+.3f}" for m, x in per.items()) + "; "
        mean_rows.append(row(b, "mean", margins[b], adjusted[b], family,
                             text + ("nets opposite per-modality effects; " if split else "")))
        rows.append(mean_rows[-1])
        if split:
            within = _holm({m: x[3] for m, x in per.items()})
            rows += [row(b, m, x, within[m], f"{len(per)} modalities vs {b}") for m, x in per.items()]
    worst = min(mean_rows, key=lambda r: r["ours"]) if mean_rows else None
    if not mean_rows or all(r["verdict"] == "not measured" for r in mean_rows):
        overall = "not measured"
    else:
        overall = superiority_verdict({r["b"]: (r["ours"], r["lo"], r["hi"]) for r in mean_rows}, adjusted, alpha)
    # the row that decides the head verdict: the significant one, else the lowest CI end
    significant = [r for r in mean_rows if r["verdict"] == "not supported"]
    measured = [r for r in mean_rows if r["verdict"] != "not measured"]
    against = (min(significant, key=lambda r: r["hi"]) if overall == "not supported"
               else min(measured, key=lambda r: r["lo"]) if measured else None)
    if len(compared) < len(baselines):
        overall += " (partial)"
    head = {"claim": f"{a} retains more of the specialists' skill than every baseline (mean over modalities)",
            "source": SOURCE, "paper": np.nan, "a": a, "b": "every baseline", "modality": "mean",
            "ours": worst["ours"] if worst else np.nan, "lo": worst["lo"] if worst else np.nan,
            "hi": worst["hi"] if worst else np.nan, "verdict": overall, "rank": rank_of("mean")[0],
            "of": rank_of("mean")[1], "n_compared": len(compared),
            "p_holm": against["p_holm"] if against else np.nan,
            "detail": (f"smallest margin vs {worst['b']}; " if worst else "") + f"baselines: {', '.join(compared)}"
                      + left_out, **caveat_columns([a, *compared]),
            "would_change": (would_change(overall, against["b"], against["lo"], against["hi"], digits=3,
                                          p_holm=against["p_holm"] if overall.startswith("not supported") else None,
                                          n_competitors=len(mean_rows))
                             if against else would_change("not measured", "", np.nan, np.nan))}
    return pd.DataFrame([head, *rows], columns=columns).round({"ours": 3, "lo": 3, "hi": 3, "p_holm": 4})
