"""What a register row's verdict rests on: its caveats, its seeds, and what result would change it.

Every register row carries ``n, seeds, caveats, would_change`` (``CAVEAT_COLUMNS``):

* ``caveats_for``: the caveats (``CAVEATS``) that apply to a row comparing some models, from a
  default per kind of claim (``DEFAULT_CAVEATS``) or the caller's list;
* ``seeds_text``: which specialist seeds the row's models rest on;
* ``would_change``: one sentence, from the row's numbers, on what result would change its verdict.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from esmerge.evaluate.decisions import ALPHA

# What a register row may rest on: key -> the short text the row's ``caveats`` shows.
# tiny base: the scale's base LLM is far smaller than the paper's 7-8B models; random splits: our
# evaluation rows are a random draw, not the paper's splits; seed selection: the specialists are one
# seed, chosen because they pass the Fig. 2 test; oracle routing: EMR as evaluated gets each
# benchmark's (or modality's) own task modulator, which no single merged model gets; budget: the
# baseline ran with fewer steps or rows than its paper's.
SELECTED_SEED = 0  # the specialist seed chosen because it passed the Fig. 2 test; the replicates were not
SELECTION_TEST = "the Fig. 2 test"
CAVEATS = {
    "tiny base": "tiny base LLM",
    "random splits": "our random splits, not the paper's",
    "seed selection": f"one seed, selected by {SELECTION_TEST}",
    "oracle routing": "oracle routing",
    "unequal budgets": "below the paper's budget",
}


# The caveats that apply by default, per kind of register. "oracle routing" and "unequal budgets"
# only show on rows that compare a routed (``ROUTED``) or budget-limited (``BUDGETED``) model, and
# "seed selection" only on rows with a model built from the specialists. Retention is measured on
# the specialists' own held-out examples, so no benchmark split applies there.
DEFAULT_CAVEATS = {
    "accuracy": ("tiny base", "random splits", "seed selection", "oracle routing", "unequal budgets"),
    "yardstick": ("tiny base", "random splits", "seed selection", "oracle routing", "unequal budgets"),
    "retention": ("tiny base", "seed selection", "oracle routing", "unequal budgets"),
    "representation": ("tiny base", "seed selection"),
}


ROUTED = ("emr",)  # EMR as evaluated per benchmark/modality: its task modulators chosen by an oracle




BUDGETED = ("adamerging", "avg-ft")  # baselines run below their papers' budgets (steps, rows)


# Rows that use no specialist: the base, its shots-shuffled control and the retrieval yardsticks.
WITHOUT_SPECIALISTS = ("base", "base-shuffled-shots", "majority", "knn-shots")


CAVEAT_COLUMNS = ("n", "seeds", "caveats", "would_change")  # every register row carries them


def _named(model: str, names) -> bool:
    """``model`` is one of ``names`` or a per-benchmark part of one (``avg-ft/GDSC2``)."""
    return any(model == x or model.startswith(f"{x}/") for x in names)


def caveats_for(applies: Sequence[str], models: Sequence[str], routed: Sequence[str] = ROUTED,
                budgeted: Sequence[str] | Mapping[str, str] = BUDGETED,
                without_specialists: Sequence[str] = WITHOUT_SPECIALISTS, seeds: Sequence[int] = (0,),
                selected_by: str = SELECTION_TEST) -> str:
    """The caveats of a register row that compares ``models``, as one ``"; "``-joined text.

    Parameters
    ----------
    applies : sequence of str
        Keys of ``CAVEATS`` (e.g. ``DEFAULT_CAVEATS["accuracy"]``) or the caller's own short
        texts, shown verbatim.
    models : sequence of str
        The row's models (the claimed one and its competitors), length k.
    routed, budgeted : sequences of str
        Models with oracle routing, and baselines below the paper's budget (a mapping adds each
        one's budget, e.g. ``{"adamerging": "10 steps, paper 500"}``).
    without_specialists : sequence of str
        Models that use no specialist (no seed caveat for a row of only these).
    seeds : sequence of int
        The specialist seeds the row rests on: seed 0 was selected by the Fig. 2 test, the
        others were fixed in advance, so "seed selection" says how many of them were selected.
    selected_by : str
        What selected seed 0, as the caveat names it (a Fig. 2 row says "this very test").

    Returns
    -------
    str
        The texts in ``applies``' order; ``"none"`` when none applies (never empty).

    Examples
    --------
    >>> caveats_for(["tiny base", "oracle routing", "unequal budgets"], ["es", "emr", "avg-ft/GDSC2"])
    "tiny base LLM; oracle routing: emr; below the paper's budget: avg-ft/GDSC2"
    >>> caveats_for(["seed selection", "oracle routing"], ["base", "majority"])
    'none'
    >>> caveats_for(["seed selection"], ["es", "avg"], seeds=[0, 1, 2])
    'seed 0 selected by the Fig. 2 test, seeds 1, 2 not (fixed in advance)'
    >>> caveats_for(["unequal budgets", "n = 8 per benchmark"], ["es", "adamerging"],
    ...             budgeted={"adamerging": "10 steps"})
    "below the paper's budget: adamerging (10 steps); n = 8 per benchmark"
    """
    out = []
    for key in applies:
        if key == "oracle routing":
            names = [m for m in models if _named(m, routed)]
        elif key == "unequal budgets":
            detail = budgeted if isinstance(budgeted, Mapping) else {}
            names = [m + (f" ({detail[b]})" if detail.get(b) else "")
                     for m in models for b in budgeted if _named(m, [b])]
        elif key == "seed selection":
            names = [] if all(m in without_specialists for m in models) else None
            if names is None:
                others = [str(x) for x in seeds if x != SELECTED_SEED]
                out.append(f"one seed, selected by {selected_by}" if not others else
                           f"seed {SELECTED_SEED} selected by {selected_by}, seeds {', '.join(others)} not "
                           "(fixed in advance)")
            continue
        else:
            out.append(CAVEATS.get(key, key))
            continue
        if names:
            out.append(f"{CAVEATS[key]}: {', '.join(names)}")
    return "; ".join(out) or "none"


def seeds_text(seeds: Sequence[int], models: Sequence[str],
               without_specialists: Sequence[str] = WITHOUT_SPECIALISTS) -> str:
    """Which specialist seeds a register row comparing ``models`` rests on.

    Parameters
    ----------
    seeds : sequence of int
        The seeds the specialists (and every model merged from them) were trained at.
    models : sequence of str, length k
        The row's models.
    without_specialists : sequence of str
        Models that use no specialist.

    Returns
    -------
    str
        ``seeds`` joined, or ``"none (no specialist)"`` when every model is one of ``without_specialists``.

    Examples
    --------
    >>> seeds_text([0], ["es", "avg"]), seeds_text([0, 1, 2], ["es"]), seeds_text([0], ["base", "majority"])
    ('0', '0, 1, 2', 'none (no specialist)')
    """
    if all(m in without_specialists for m in models):
        return "none (no specialist)"
    return ", ".join(str(s) for s in seeds)


def would_change(verdict: str, against: str, lo: float, hi: float, *, p_holm: float | None = None,
                 margin: float | None = None, at_least: bool = False, n_competitors: int = 1, digits: int = 1,
                 alpha: float = ALPHA) -> str:
    """One sentence, from a row's numbers, on what result would change its verdict.

    Parameters
    ----------
    verdict : str
        The row's verdict (``superiority_verdict``, ``noninferiority_verdict``, ``retention.verdict``
        words, optionally with a parenthesised qualifier).
    against : str
        The competitor the numbers are against (for "supported", the one with the lowest CI end;
        for "not supported", the significant one).
    lo, hi : float
        That competitor's CI of ``A - competitor``.
    p_holm : float, optional
        Its Holm-adjusted p-value, where the rule uses one.
    margin : float, optional
        The declared non-inferiority margin (``at_least`` claims).
    at_least : bool
        An "A is at least as good" claim.
    n_competitors : int
        How many (groups of) competitors the verdict compares; above 1, "supported" needs every one.
    digits : int
        Decimals of the numbers quoted.

    Returns
    -------
    str

    Examples
    --------
    >>> would_change("inconclusive (no margin declared)", "specialist-molecule", -7.3, 8.3, at_least=True)
    'a non-inferiority margin above 7.3 points declared before the run (the CI vs specialist-molecule starts at -7.3)'
    >>> would_change("not supported", "ties", -19.8, -1.0, p_holm=0.045)
    'ties no longer significantly better: a CI upper bound at or above 0 (now -1.0) or Holm p >= 0.05 (now 0.045)'
    >>> would_change("inconclusive", "adamerging", -10.6, 0.6, n_competitors=7)
    'a CI lower bound above 0 vs every competitor would support it (lowest now -10.6, vs adamerging)'
    >>> would_change("inconclusive", "majority", -6.3, 3.6)
    'a CI lower bound above 0 vs majority would support it (now -6.3)'
    >>> would_change("supported", "avg", 0.006, 0.01, digits=3)
    'a CI lower bound at or below 0 vs avg (now +0.006)'
    """
    kind = re.sub(r"\s*\(.*$", "", verdict.strip())
    f = f"{{:+.{digits}f}}"
    if kind == "not measured":
        return "results for the missing models or benchmarks"
    if "identical" in verdict:
        return f"any example on which the two models answer differently (vs {against})"
    if "no margin declared" in verdict:
        bound = f"above {-lo:.{digits}f} points" if lo < 0 else "of any size"
        return (f"a non-inferiority margin {bound} declared before the run "
                f"(the CI vs {against} starts at {f.format(lo)})")
    if kind == "supported":
        floor = f"-{margin:g}" if at_least and margin is not None else "0"
        return f"a CI lower bound at or below {floor} vs {against} (now {f.format(lo)})"
    if kind == "not supported":
        p = "" if p_holm is None or np.isnan(p_holm) else f" or Holm p >= {alpha:g} (now {p_holm:.3f})"
        return (f"{against} no longer significantly better: a CI upper bound at or above 0 "
                f"(now {f.format(hi)}){p}")
    floor = f"-{margin:g}" if at_least and margin is not None else "0"
    if n_competitors > 1:
        return (f"a CI lower bound above {floor} vs every competitor would support it "
                f"(lowest now {f.format(lo)}, vs {against})")
    return f"a CI lower bound above {floor} vs {against} would support it (now {f.format(lo)})"
