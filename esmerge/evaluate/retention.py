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
``esmerge.evaluate.retention_models`` picks the models and produces their NLLs, cached per (weights,
examples, settings) under ``cache_dir()/retention``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from esmerge.evaluate.caveats import BUDGETED, CAVEAT_COLUMNS, DEFAULT_CAVEATS, caveats_for, seeds_text, would_change

# Re-exported: notebooks/09_retention.py calls them as ``retention.retention_models`` / ``.score_models``.
from esmerge.evaluate.retention_models import retention_models, score_models  # noqa: F401

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


def retention_wide(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """``retention_table`` as one row per method, one column per modality: ``"0.50 [0.40, 0.60]"``.

    >>> t = pd.DataFrame({"method": ["avg", "avg"], "modality": ["cell", "mean"], "retained": [0.5, 0.25],
    ...                   "lo": [0.4, 0.1], "hi": [0.6, 0.4]})
    >>> retention_wide(t).loc["avg"].tolist()
    ['0.50 [0.40, 0.60]', '0.25 [0.10, 0.40]']
    """
    cell = lambda r: f"{r.retained:.{digits}f} [{r.lo:.{digits}f}, {r.hi:.{digits}f}]"  # noqa: E731
    text = table.assign(text=[cell(r) for r in table.itertuples()])
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


def retention_claims(res: Resampled, a: str = "es", baselines: list[str] | None = None,
                     level: float = 0.95, *, seeds: Sequence[int] = (0,), caveats: Sequence[str] | None = None,
                     budgets: Sequence[str] | Mapping[str, str] | None = None) -> pd.DataFrame:
    """The claims-register section: ``a`` beats each baseline on mean retention over modalities.

    ``baselines``: default every model except ``a``, the base, the specialists and ``a``'s
    ablations (``es-*``). Each row: the paired-bootstrap margin ``mean R(a) - mean R(b)``
    (resampling examples jointly for a, b, the base and the specialists), ``rank`` of ``a``
    among ``a`` and the baselines by mean retention (1 = best) and a verdict (``verdict``). The
    first row is the claim over all baselines: its margin the smallest one, supported only when
    every margin is, not supported when some margin's CI lies below 0 (as in ``claims.claims``).
    Columns ``claim, source, paper`` (NaN: the paper reports no retention) ``, a, b, ours, lo, hi,
    verdict, rank, of, detail, n_compared``, as the claims register's; margins rounded to 3 decimals.

    Every row also carries what its verdict rests on (``CAVEAT_COLUMNS``): ``n`` (the
    examples over all modalities), ``seeds`` (the specialist seeds, ``seeds``), ``caveats``
    (``caveats_for``; default ``DEFAULT_CAVEATS["retention"]``: tiny base, seed
    selection, EMR's oracle routing on rows comparing ``emr``, below-budget baselines
    ``budgets``, default ``BUDGETED``) and ``would_change`` (``would_change``).
    """
    if baselines is None:
        baselines = [k for k in res.point if k != a and k != "base" and not k.startswith("specialist-")
                     and not k.startswith(f"{a}-")]
    columns = ["claim", "source", "paper", "a", "b", "ours", "lo", "hi", "verdict", "rank", "of", "detail",
               "n_compared", *CAVEAT_COLUMNS]
    applies = tuple(DEFAULT_CAVEATS["retention"] if caveats is None else caveats)
    budgets = BUDGETED if budgets is None else budgets

    def caveat_columns(models: list[str]) -> dict:
        return {"n": int(sum(res.n.values())), "seeds": seeds_text(seeds, models),
                "caveats": caveats_for(applies, models, budgeted=budgets)}

    if a not in res.point or "mean" not in res.point[a] or not baselines:
        return pd.DataFrame([{"claim": f"{a} retains more of the specialists' skill than every baseline",
                              "source": SOURCE, "paper": np.nan, "a": a, "b": "every baseline", "ours": np.nan,
                              "lo": np.nan, "hi": np.nan, "verdict": "not measured", "rank": np.nan, "of": 0,
                              "detail": f"missing: {a if a not in res.point else 'baselines'}", "n_compared": 0,
                              **caveat_columns([a, *(baselines or [])]),
                              "would_change": would_change("not measured", "", np.nan, np.nan)}],
                            columns=columns)
    compared = [b for b in baselines if "mean" in res.point.get(b, {})]
    ranked = sorted([a, *compared], key=lambda k: -res.point[k]["mean"])
    rank, of = ranked.index(a) + 1, len(ranked)
    rows = []
    for b in compared:
        diff = res.draws[a]["mean"] - res.draws[b]["mean"]
        lo, hi = percentile_ci(diff, level)
        per = "; ".join(f"{m} {res.point[a][m] - res.point[b][m]:+.3f}" for m in res.point[a] if m != "mean")
        rows.append({"claim": f"{a} retains more of the specialists' skill than {b} (mean over modalities)",
                     "source": SOURCE, "a": a, "b": b, "ours": res.point[a]["mean"] - res.point[b]["mean"],
                     "lo": lo, "hi": hi, "verdict": verdict(lo, hi), "rank": rank, "of": of,
                     "detail": f"{a} {res.point[a]['mean']:.3f} vs {b} {res.point[b]['mean']:.3f}; "
                               f"per modality: {per}", **caveat_columns([a, b]),
                     "would_change": would_change(verdict(lo, hi), b, lo, hi, digits=3)})
    worst = min(rows, key=lambda r: r["ours"]) if rows else None
    verdicts = [r["verdict"] for r in rows]
    overall = ("supported" if verdicts and all(v == "supported" for v in verdicts)
               else "not supported" if "not supported" in verdicts
               else "not measured" if not verdicts or all(v == "not measured" for v in verdicts) else "inconclusive")
    if len(compared) < len(baselines):
        overall += " (partial)"
    head = {"claim": f"{a} retains more of the specialists' skill than every baseline (mean over modalities)",
            "source": SOURCE, "a": a, "b": "every baseline", "ours": worst["ours"] if worst else np.nan,
            "lo": worst["lo"] if worst else np.nan, "hi": worst["hi"] if worst else np.nan, "verdict": overall,
            "rank": rank, "of": of,
            "detail": (f"smallest margin vs {worst['b']}; " if worst else "") + f"baselines: {', '.join(compared)}",
            **caveat_columns([a, *compared])}
    # the row that decides the head verdict: the significant one, else the lowest CI end
    measured = [r for r in rows if r["verdict"] != "not measured"]
    against = (min((r for r in rows if r["verdict"] == "not supported"), key=lambda r: r["hi"])
               if "not supported" in verdicts else min(measured, key=lambda r: r["lo"]) if measured else None)
    head["would_change"] = (would_change(overall, against["b"], against["lo"], against["hi"], digits=3,
                                                   n_competitors=len(rows))
                            if against else would_change("not measured", "", np.nan, np.nan))
    # the register's shape (esmerge.report.claims.claims); the paper reports no retention
    head.update(paper=np.nan, n_compared=len(compared))
    rows = [{**r, "paper": np.nan, "n_compared": 1} for r in rows]
    return pd.DataFrame([head, *rows], columns=columns).round({"ours": 3, "lo": 3, "hi": 3})
