"""The claims register: each claim of the paper tested against our results, with a verdict.

``claims`` checks the accuracy claims (Tables 1-3, 8; §5) with paired-bootstrap margins;
``yardstick_claims`` those the paper does not make but a reader needs (the yardsticks, the
shots-shuffled control). The representation claims (Figs. 1, 2, 8; Table 7) are checked in
``representation_claims``; ``disagreements``, ``es_ranks`` and ``answer_bias`` (``summaries``)
summarise where and why our numbers differ from the paper's.

Every register row carries what its verdict rests on (``CAVEAT_COLUMNS``): ``n``
(examples), ``seeds`` (specialist seeds), ``caveats`` (``caveats_for``; the defaults per
kind of claim are ``DEFAULT_CAVEATS``) and ``would_change`` (``would_change``).
Accuracy rows add the threshold-free check beside accuracy: the paired AUROC difference of the
answer margin with its CI and its own verdict.

EMR appears in two forms, labelled wherever a row names it (``method_label``): ``emr`` is
evaluated with oracle routing, each benchmark or modality getting its own task modulator
(``emr (routed)``); ``emr-one`` is the one adapter a user would deploy without routing, the mean
of the modulated task vectors (``esmerge.methods.emr.emr_one_model``; ``emr (one model)``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from esmerge.data.benchmarks import BENCHMARK_NAMES, GROUPS
from esmerge.evaluate import decisions
from esmerge.evaluate.caveats import (
    BUDGETED,
    DEFAULT_CAVEATS,
    caveats_for,
    seeds_text,
    would_change,
)
from esmerge.evaluate.stats import paired_bootstrap
from esmerge.methods.emr import ONE_MODEL
from esmerge.report.paper_tables import PAPER_DATASET, paper_results

MERGING_BASELINES = ("avg", "ties", "emr", "adamerging", "pcb", "consensus", "ls-merge")
SPECIALISTS = ("specialist-molecule", "specialist-protein", "specialist-cell")
# rows that are not models: the retrieval-only yardstick (esmerge.evaluate.yardstick.METHODS) and the
# base on its shots-shuffled control (evaluate.calibration)
YARDSTICKS = ("majority", "knn-shots")
SHUFFLED_CONTROL = "base-shuffled-shots"
NOT_MODELS = (*YARDSTICKS, SHUFFLED_CONTROL)
# EMR with oracle routing, and as one merged model (a competitor wherever it was evaluated)
EMR_ROUTED, EMR_ONE_MODEL = "emr", ONE_MODEL
METHOD_LABELS = {EMR_ROUTED: "emr (routed)", EMR_ONE_MODEL: "emr (one model)"}
# The accuracy registers' columns, in order.
COLUMNS = ["claim", "source", "paper", "datasets", "n", "seeds", "ours", "lo", "hi", "n_compared", "p_holm",
           "margin", "verdict", "auroc_diff", "auroc_lo", "auroc_hi", "auroc_vs", "auroc_verdict", "same_answers",
           "caveats", "would_change", "detail"]


def method_label(name: str) -> str:
    """The name a register row shows for a method: EMR says whether it is routed or one model.

    Parameters
    ----------
    name : str
        A key of the results (``emr``: oracle-routed EMR; ``emr-one``: EMR as one merged model).

    Returns
    -------
    str
        ``METHOD_LABELS[name]``, else ``name``.

    Examples
    --------
    >>> method_label("emr"), method_label("emr-one"), method_label("ties")
    ('emr (routed)', 'emr (one model)', 'ties')
    """
    return METHOD_LABELS.get(name, name)


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: method ``a`` beats each of ``b`` on the mean accuracy over ``benchmarks``."""

    claim: str
    source: str
    a: str
    b: tuple[str, ...]
    group: str | None  # None: all 13 benchmarks
    table: str
    at_least: bool = False  # ">=": supported only with a declared non-inferiority margin
    optional: tuple[str, ...] = ()  # competitors compared when evaluated; their absence is not "partial"


def _claims_list() -> list[Claim]:
    out = []
    for group, table in (("Mol-Prot", "Table 1"), ("Mol-Cell", "Table 1"),
                         ("CYP Inh.", "Table 2"), ("CYP Sub.", "Table 2")):
        out.append(Claim(f"ES-Merging beats every merging baseline on {group} (avg. accuracy)",
                         "§5.2-5.3", "es", MERGING_BASELINES, group, table, optional=(EMR_ONE_MODEL,)))
    out.append(Claim("ES-Merging beats every merging baseline on all 13 benchmarks (avg.)", "§5.2-5.3",
                     "es", MERGING_BASELINES, None, "Table 1+2", optional=(EMR_ONE_MODEL,)))
    out.append(Claim("ES-Merging beats Avg. Merging + FT on Mol-Prot", "§5.2", "es", ("avg-ft",), "Mol-Prot",
                     "Table 1"))
    out.append(Claim("ES-Merging is at least as good as Mol-LLaMA on CYP Sub.", "§5.3", "es",
                     ("specialist-molecule",), "CYP Sub.", "Table 2", at_least=True))
    out.append(Claim("ES-Merging beats the base LLM on all 13 benchmarks (avg.)", "Tables 1-2", "es", ("base",),
                     None, "Table 1+2"))
    out.append(Claim("ES-Merging beats every specialist on all 13 benchmarks (avg.)", "Tables 1-2", "es",
                     SPECIALISTS, None, "Table 1+2"))
    for group in GROUPS:
        out.append(Claim(f"Layer x element >= each alone on {group}", "§5.4, Table 3", "es",
                         ("es-layer", "es-element"), group, "Table 8", at_least=True))
    for group in ("Mol-Prot", "CYP Inh."):
        out.append(Claim(f"ES-Layer alone beats every merging baseline on {group}", "§5.4", "es-layer",
                         MERGING_BASELINES, group, "Table 2" if group.startswith("CYP") else "Table 1",
                         optional=(EMR_ONE_MODEL,)))
    return out


CLAIMS = _claims_list()


def _paper_group_value(paper: pd.DataFrame, method: str, group: str | None, table: str) -> float:
    tables = ("Table 1", "Table 2") if table == "Table 1+2" else (table,)
    if method not in set(paper[paper["table"].isin(tables)]["method"]):
        tables = ("Table 8",)  # the ablation variants appear only there
    sub = paper[(paper["method"] == method) & paper["table"].isin(tables) & (paper["metric"] == "accuracy")]
    if group is None:
        datasets = [PAPER_DATASET[b] for b in BENCHMARK_NAMES]
    else:
        datasets = [f"Avg. {group}"]
    values = sub[sub["dataset"].isin(datasets)]["value"]
    return float(values.mean()) if len(values) == len(datasets) else float("nan")


def claims(results: dict[str, dict[str, dict]], n_resamples: int = 1000, seed: int = 0,
           level: float = 0.95, noninferiority_margin: float | None = None, *, seeds: Sequence[int] = (0,),
           caveats: Sequence[str] | None = None, budgets: Sequence[str] | Mapping[str, str] | None = None,
           auroc_noninferiority_margin: float | None = None) -> pd.DataFrame:
    """The claims register: each paper claim, the paper's margin, ours with a paired-bootstrap CI.

    For "A beats B" the margin is ``mean accuracy(A) - mean accuracy(B)`` over the group's
    benchmarks, minimised over the B's; ``p_holm`` is that competitor's sign-flip p-value after
    Holm's correction over the compared competitors (``decisions.compare``). Competitors that give
    identical answers on every example of every benchmark of the claim are one model: counted once
    in the Holm family (``n_compared`` counts groups) and named together in ``same_answers`` and
    ``detail`` (e.g. ``adamerging = consensus``). Verdicts (``decisions``):

    * "beats": *supported* when the CI of every margin lies above 0; *not supported* when some
      competitor is significantly better after the correction; *inconclusive* otherwise;
    * ">=": *supported* only with a ``noninferiority_margin`` (points, declared in the scale before
      the run; recorded in the ``margin`` column) that every CI's lower end clears; *not
      supported* as above; without a margin a null result is *inconclusive (no margin declared)*;
    * *inconclusive (identical answers)* when every competitor answers exactly as ``a`` on every
      example (a margin of 0 with a CI of [0, 0] tests nothing); *not measured* when a method or
      benchmark is missing.

    Parameters
    ----------
    results : dict
        ``results[method][benchmark]``: ``evaluate`` results (``example_ids, y, pred`` and, for the
        AUROC columns, ``scores`` ``[n, 2]``), the same examples for every method.
    n_resamples, seed, level :
        The paired bootstrap (accuracy and AUROC) and the sign-flip test's seed.
    noninferiority_margin : float, optional
        Accuracy points, for the ">=" claims; ``None``: none declared.
    seeds : sequence of int
        The specialist seeds the evaluated models were built from (column ``seeds``).
    caveats : sequence of str, optional
        What applies (``CAVEATS`` keys or short texts); default
        ``DEFAULT_CAVEATS["accuracy"]``: tiny base, our random splits, seed selection,
        EMR's oracle routing (rows comparing ``emr``), baseline budgets below the paper's (rows
        comparing ``BUDGETED``).
    budgets : sequence of str or mapping, optional
        The budget-limited baselines (a mapping adds each one's budget text); default
        ``BUDGETED``.
    auroc_noninferiority_margin : float, optional
        AUROC points, for the ">=" claims' AUROC verdict.

    Returns
    -------
    DataFrame
        One row per claim, columns ``COLUMNS``: ``n`` examples of ``a`` over the claim's
        benchmarks; the AUROC columns ``auroc_diff, auroc_lo, auroc_hi`` (points, against the
        competitor ``auroc_vs`` with the smallest AUROC margin), ``auroc_verdict`` by the same rules
        on the AUROC margins (bootstrap p-values, Holm over competitors with distinct scores); NaN
        and a ``not measured (no answer margins: ...)`` verdict when a run has no per-example
        ``scores``. EMR is named ``emr (routed)`` or ``emr (one model)`` (``method_label``).
    """
    paper = paper_results()
    ctx = _Context(tuple(seeds), tuple(DEFAULT_CAVEATS["accuracy"] if caveats is None else caveats),
                   BUDGETED if budgets is None else budgets, auroc_noninferiority_margin)
    return pd.DataFrame([_check(c, results, paper, n_resamples, seed, level, noninferiority_margin, ctx=ctx)
                         for c in CLAIMS], columns=COLUMNS)


@dataclass(frozen=True)
class _Context:
    """What a row's caveat and AUROC columns need beyond the claim."""

    seeds: tuple[int, ...] = (0,)
    caveats: tuple[str, ...] = DEFAULT_CAVEATS["accuracy"]
    budgets: Sequence[str] | Mapping[str, str] = BUDGETED
    auroc_margin: float | None = None


def _auroc_columns(c: Claim, results: dict, competitors: list[str], benches: list[str], n_resamples: int,
                   seed: int, level: float, margin: float | None) -> tuple[dict, str]:
    """The AUROC columns of a row and the detail's AUROC text (see ``claims``)."""
    out = {"auroc_diff": np.nan, "auroc_lo": np.nan, "auroc_hi": np.nan, "auroc_vs": "-"}
    runs = {m: {x: results[m][x] for x in benches} for m in (c.a, *competitors)}
    without = [method_label(m) for m in runs if not decisions.has_margins(runs[m])]
    if not decisions.has_margins(runs[c.a]) or len(without) == len(competitors):
        return {**out, "auroc_verdict": f"not measured (no answer margins: {', '.join(without)})"}, ""
    scored = {m: runs[m] for m in competitors if decisions.has_margins(runs[m])}
    groups = decisions.answer_groups(scored, benches, field="scores")
    alpha = (1 - level) / 2
    margins, pvalues = {}, {}
    for group in groups:
        point, draws = decisions.paired_auroc_draws(runs[c.a], runs[group[0]], n_resamples, seed)
        if np.isnan(point) or np.isnan(draws).all():
            continue
        margins[group[0]] = (point, float(np.nanquantile(draws, alpha)), float(np.nanquantile(draws, 1 - alpha)))
        pvalues[group[0]] = decisions.bootstrap_pvalue(draws)
    if not margins:
        return {**out, "auroc_verdict": "not measured (one class only in every benchmark)"}, ""
    adjusted = decisions.holm(pvalues)
    same = [b for b in margins if all(np.array_equal(np.asarray(runs[c.a][x]["scores"], dtype=float),
                                                     np.asarray(runs[b][x]["scores"], dtype=float)) for x in benches)]
    if len(same) == len(margins):
        verdict = "inconclusive (identical scores)"
    elif c.at_least:
        verdict = decisions.noninferiority_verdict(margins, adjusted, margin)
    else:
        verdict = decisions.superiority_verdict(margins, adjusted)
    if without:
        verdict += f" (partial: no answer margins: {', '.join(without)})"
    worst = min(margins, key=lambda b: margins[b][0])
    names = {g[0]: " = ".join(method_label(m) for m in g) for g in groups}
    text = "AUROC: " + "; ".join(f"vs {names[b]}: {m[0]:+.1f} [{m[1]:+.1f}, {m[2]:+.1f}], Holm p {adjusted[b]:.3f}"
                                 for b, m in margins.items())
    point, lo, hi = margins[worst]
    return {"auroc_diff": round(point, 1), "auroc_lo": round(lo, 1), "auroc_hi": round(hi, 1),
            "auroc_vs": names[worst], "auroc_verdict": verdict}, text


def _check(c: Claim, results: dict[str, dict[str, dict]], paper: pd.DataFrame | None, n_resamples: int,
           seed: int, level: float, noninferiority_margin: float | None = None,
           n_permutations: int = 10000, ctx: _Context | None = None) -> dict:
    """One register row for claim ``c`` (see ``claims``); ``paper=None``: a claim the paper does not make."""
    ctx = ctx or _Context()
    benches = list(BENCHMARK_NAMES) if c.group is None else list(GROUPS[c.group])
    if paper is None:
        paper_margin = float("nan")
    else:
        paper_a = _paper_group_value(paper, c.a, c.group, c.table)
        paper_b = {b: _paper_group_value(paper, b, c.group, c.table) for b in c.b}
        paper_margin = paper_a - max(paper_b.values()) if paper_b else float("nan")
    all_benches = benches
    benches = [x for x in benches if x in results.get(c.a, {})]
    everyone = (c.a, *c.b, *c.optional)
    have = [m for m in everyone if m in results and benches and all(x in results[m] for x in benches)]
    models = [m for m in everyone if m in have]
    row = {"claim": c.claim, "source": c.source, "paper": round(paper_margin, 1),
           "datasets": f"{len(benches)}/{len(all_benches)}",
           "n": int(sum(len(results[c.a][x]["y"]) for x in benches)),
           "seeds": seeds_text(ctx.seeds, models or [c.a, *c.b]),
           "margin": noninferiority_margin if c.at_least and noninferiority_margin is not None else np.nan,
           "caveats": caveats_for(ctx.caveats, models or [c.a, *c.b], budgeted=ctx.budgets)}
    if c.a not in have or not any(b in have for b in (*c.b, *c.optional)):
        missing = sorted(set((c.a, *c.b)) - set(have))
        return {**row, "ours": np.nan, "lo": np.nan, "hi": np.nan, "n_compared": 0, "p_holm": np.nan,
                "verdict": "not measured", "auroc_diff": np.nan, "auroc_lo": np.nan, "auroc_hi": np.nan,
                "auroc_vs": "-", "auroc_verdict": "not measured", "same_answers": "-",
                "would_change": f"results for {', '.join(map(method_label, missing))}",
                "detail": f"missing: {missing}"}
    # paired: both runs of each benchmark are resampled with the same example indices
    competitors = {b: results[b] for b in (*c.b, *c.optional) if b in have}
    margins = {b: paired_bootstrap({x: results[c.a][x] for x in benches}, {x: results[b][x] for x in benches},
                                   "accuracy", n_resamples, seed, level) for b in competitors}
    # Competitors answering identically form one comparison of the family (decisions.answer_groups).
    groups, _, adjusted = decisions.compare(results[c.a], competitors, benches, n_permutations, seed)
    margins = {g[0]: margins[g[0]] for g in groups}
    worst = min(margins, key=lambda b: margins[b][0])
    point, lo, hi = margins[worst]
    # A competitor that gives A's answer on every example has a margin of exactly 0 with a CI of
    # [0, 0]: that tests nothing.
    identical = [g[0] for g in groups if all(results[c.a][x]["pred"] == results[g[0]][x]["pred"] for x in benches)]
    if len(identical) == len(margins):
        verdict = "inconclusive (identical answers)"
    elif c.at_least:
        verdict = decisions.noninferiority_verdict(margins, adjusted, noninferiority_margin)
    else:
        verdict = decisions.superiority_verdict(margins, adjusted)
    if sum(b in competitors for b in c.b) < len(c.b) or len(benches) < len(all_benches):
        verdict += " (partial)"
    names = {g[0]: " = ".join(method_label(m) for m in g) for g in groups}
    detail = "; ".join(f"vs {names[b]}: {m[0]:+.1f} [{m[1]:+.1f}, {m[2]:+.1f}], Holm p {adjusted[b]:.3f}"
                       + (" (identical answers)" if b in identical else "") for b, m in margins.items())
    auroc, auroc_text = _auroc_columns(c, results, list(competitors), benches, n_resamples, seed, level,
                                       ctx.auroc_margin)
    return {**row, "ours": round(point, 1), "lo": round(lo, 1), "hi": round(hi, 1),
            "n_compared": len(margins), "p_holm": round(adjusted[worst], 4), "verdict": verdict, **auroc,
            "same_answers": "; ".join(names[g[0]] for g in groups if len(g) > 1) or "-",
            "would_change": _would_change(verdict, margins, adjusted, names, identical, c.at_least,
                                          noninferiority_margin),
            "detail": detail + (f"; {auroc_text}" if auroc_text else "")}


def _would_change(verdict: str, margins: dict, adjusted: dict, names: dict, identical: list, at_least: bool,
                  margin: float | None) -> str:
    """``would_change`` against the competitor that decides the verdict."""
    if verdict.startswith("not supported"):
        significant = [b for b, (_, _, hi) in margins.items() if hi < 0 and adjusted[b] < decisions.ALPHA]
        against = min(significant, key=lambda b: adjusted[b])
    elif "identical" in verdict:
        return would_change(verdict, " and ".join(names[b] for b in identical), 0.0, 0.0)
    else:  # the lowest CI end: the one a "supported" rests on, and the one an "inconclusive" waits for
        against = min(margins, key=lambda b: margins[b][1])
    _, lo, hi = margins[against]
    return would_change(verdict, names[against], lo, hi, p_holm=adjusted[against],
                                  margin=margin, at_least=at_least, n_competitors=len(margins))


def yardstick_claims(results: dict[str, dict[str, dict]], n_resamples: int = 1000, seed: int = 0,
                     level: float = 0.95, *, seeds: Sequence[int] = (0,), caveats: Sequence[str] | None = None,
                     budgets: Sequence[str] | Mapping[str, str] | None = None) -> pd.DataFrame:
    """Claims the paper does not make but a reader needs, in ``claims``' columns and
    verdicts (``paper`` NaN), on the mean accuracy over all 13 benchmarks:

    * every model beats the always-majority yardstick, and beats the k-NN vote over its own shots
      (``YARDSTICKS``; *not supported* there means the yardstick is significantly better);
    * the base uses its shots: it beats its shots-shuffled control (``SHUFFLED_CONTROL``).

    Only the rows present in ``results`` are checked; margins are paired over the same examples.
    ``seeds``, ``caveats`` and ``budgets`` as in ``claims``; the default caveats are
    ``DEFAULT_CAVEATS["yardstick"]`` (rows of the base and the yardsticks alone carry no
    seed caveat: no specialist is involved).
    """
    out = []
    models = [m for m in results if m not in NOT_MODELS]
    if SHUFFLED_CONTROL in results and "base" in results:
        out.append(Claim("the base uses its shots: it beats its shots-shuffled control (all 13, avg.)",
                         "yardstick", "base", (SHUFFLED_CONTROL,), None, "-"))
    names = {"majority": "the always-majority yardstick", "knn-shots": "the k-NN vote over its own shots"}
    for yard in YARDSTICKS:
        if yard in results:
            out += [Claim(f"{method_label(m)} beats {names[yard]} (all 13, avg.)", "yardstick", m, (yard,), None,
                          "-") for m in models]
    ctx = _Context(tuple(seeds), tuple(DEFAULT_CAVEATS["yardstick"] if caveats is None else caveats),
                   BUDGETED if budgets is None else budgets)
    return pd.DataFrame([_check(c, results, None, n_resamples, seed, level, ctx=ctx) for c in out], columns=COLUMNS)
