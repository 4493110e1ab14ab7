"""The book's answer in a few numbers: what the Overview glues into its first paragraph.

Everything here is read off the registers the claims and retention chapters write, so the Overview
never types a number: ``headline_numbers`` picks them for MyST-NB's ``glue``.
"""
from __future__ import annotations

import pandas as pd

VERDICTS = ("supported", "not supported", "inconclusive", "not measured")


def _count(verdicts: pd.Series, kind: str) -> int:
    # "supported (partial)" counts as supported; "not supported" never as "supported"
    return int(sum(str(v) == kind or str(v).startswith(kind + " ") for v in verdicts))


def headline_numbers(retention: pd.DataFrame, retention_claims: pd.DataFrame, accuracy_claims: pd.DataFrame,
                     a: str = "es") -> dict:
    """The Overview's numbers.

    Parameters
    ----------
    retention : DataFrame
        ``retention_table`` (columns ``method, modality, retained, lo, hi``).
    retention_claims : DataFrame
        ``retention_claims`` rows (``b, modality, ours, lo, hi, verdict, rank, of``; the first row is
        the claim over every baseline, per-modality rows have a ``modality`` other than ``mean``).
    accuracy_claims : DataFrame
        The accuracy register (``source, verdict, auroc_verdict``); rows of source ``yardstick`` are
        not claims of the paper and are left out.

    Returns
    -------
    dict
        ``retained, retained_lo, retained_hi`` (``a``'s mean retained fraction), ``rank, of`` (among
        ``a`` and the baselines), ``best`` and ``best_retained`` (the best baseline), counts
        ``retention_<verdict>`` over the baselines' mean rows, ``accuracy_<verdict>`` and
        ``auroc_<verdict>`` over the paper's accuracy claims (``<verdict>``: ``supported``,
        ``not_supported``, ``inconclusive``, ``not_measured``), ``claims`` (how many), ``head_verdict``
        (the retention claim over every baseline).

    Examples
    --------
    >>> ret = pd.DataFrame({"method": ["es", "avg", "ties"], "modality": ["mean"] * 3,
    ...                     "retained": [0.6, 0.62, 0.4], "lo": [0.55, 0.57, 0.35], "hi": [0.65, 0.67, 0.45]})
    >>> claims = pd.DataFrame({"b": ["every baseline", "avg", "ties"], "modality": ["mean"] * 3,
    ...                        "ours": [-0.02, -0.02, 0.2], "lo": [-0.05, -0.05, 0.1], "hi": [0.01, 0.01, 0.3],
    ...                        "verdict": ["inconclusive", "inconclusive", "supported"],
    ...                        "rank": [2] * 3, "of": [3] * 3})
    >>> acc = pd.DataFrame({"source": ["§5.2", "yardstick"], "verdict": ["not supported", "supported"],
    ...                     "auroc_verdict": ["inconclusive", "supported"]})
    >>> n = headline_numbers(ret, claims, acc)
    >>> (n["retained"], n["rank"], n["of"], n["best"], n["retention_supported"], n["accuracy_not_supported"])
    (0.6, 2, 3, 'avg', 1, 1)
    """
    mean = retention[retention["modality"] == "mean"].set_index("method")
    head = retention_claims.iloc[0]
    rows = retention_claims.iloc[1:]
    rows = rows[rows["modality"].fillna("mean") == "mean"] if "modality" in rows else rows
    baselines = [b for b in rows["b"] if b in mean.index]
    best = max(baselines, key=lambda b: mean.loc[b, "retained"]) if baselines else None
    paper_claims = accuracy_claims[accuracy_claims["source"] != "yardstick"]
    numbers = {"retained": float(mean.loc[a, "retained"]), "retained_lo": float(mean.loc[a, "lo"]),
               "retained_hi": float(mean.loc[a, "hi"]), "rank": int(head["rank"]), "of": int(head["of"]),
               "best": best, "best_retained": float(mean.loc[best, "retained"]) if best else float("nan"),
               "head_verdict": str(head["verdict"]), "baselines": len(rows), "claims": len(paper_claims)}
    for kind in VERDICTS:
        key = kind.replace(" ", "_")  # glue names take no spaces
        numbers[f"retention_{key}"] = _count(rows["verdict"], kind)
        numbers[f"accuracy_{key}"] = _count(paper_claims["verdict"], kind)
        numbers[f"auroc_{key}"] = (_count(paper_claims["auroc_verdict"], kind)
                                   if "auroc_verdict" in paper_claims else 0)
    return numbers
