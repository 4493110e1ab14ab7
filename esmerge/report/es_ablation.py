"""ES-Merging, paper settings vs the official code's: the tables the book's "Paper vs official code" shows.

``ablation_table`` reads the retention ablation that ``benchmarks/es_code_ablation.py --scale cpu``
writes (one tidy CSV: each variant's retained fraction per modality and its PAIRED 95 % CI of the
difference from ES-paper); ``differences_table`` reads the effect of each difference on the
coefficients α / β that ``benchmarks/es_code_diffs.py --scale cpu`` writes (JSON). Both refuse a
missing or malformed file in one line that names it and the command that makes it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from esmerge.errors import InputError
from esmerge.report import display

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
ABLATION_CSV = RESULTS / "es_code_ablation_cpu.csv"
DIFFS_JSON = RESULTS / "es_code_diffs_cpu.json"
ABLATION_COMMAND = "python benchmarks/es_code_ablation.py --scale cpu"
DIFFS_COMMAND = "python benchmarks/es_code_diffs.py --scale cpu"
ABLATION_COLUMNS = ("variant", "modality", "retained", "lo", "hi", "diff_vs_paper", "diff_lo", "diff_hi", "n")
DIFF_FIELDS = ("point", "difference", "option", "on", "mean_abs", "max_abs", "top_changed", "n_units")
REFERENCE = "es-paper"
# What each variant of benchmarks/es_code_ablation.py is (the rows of the book's table).
VARIANTS = {
    "es-paper": "the paper's settings",
    "es-code": "the official code's settings (variant='code')",
    "es-own": "paper + own-modality element scores (score_modalities='own')",
    "es-postnorm": "paper + last layer after the final norm (final_norm=True)",
    "es-batch2": "paper + absolute gradient of a batch-of-2 MSE (grad_batch=2)",
}


def ci_text(x: float, lo: float, hi: float, digits: int = 3, signed: bool = False) -> str:
    """``x [lo, hi]`` as the ablation tables show it: ``display.ci_text`` at 3 decimals, ``[n/a]`` for a
    missing CI.

    >>> ci_text(0.60549, 0.59831, 0.61275)
    '0.605 [0.598, 0.613]'
    >>> ci_text(-0.0226, -0.0301, -0.0152, signed=True)
    '-0.023 [-0.030, -0.015]'
    >>> ci_text(0.5, float("nan"), float("nan"))
    '0.500 [n/a]'
    """
    return display.ci_text(x, lo, hi, digits, signed, missing_ci="n/a")


def read_ablation(csv_path: str | Path = ABLATION_CSV) -> pd.DataFrame:
    """The tidy ablation CSV, checked: every column of ``ABLATION_COLUMNS`` and an ``es-paper`` row.

    >>> read_ablation("/no/such/file.csv")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    esmerge.errors.InputError: /no/such/file.csv: not found; make it with python benchmarks/es_code_ablation.py ...
    """
    path = Path(csv_path)
    if not path.is_file():
        raise InputError(f"{path}: not found; make it with {ABLATION_COMMAND}")
    table = pd.read_csv(path)
    missing = [c for c in ABLATION_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing columns {missing} (an older or foreign file); remake it with "
                         f"{ABLATION_COMMAND}")
    if not (table["variant"] == REFERENCE).any():
        raise InputError(f"{path}: no {REFERENCE!r} rows, so no paired differences; remake it with {ABLATION_COMMAND}")
    return table


def ablation_table(csv_path: str | Path = ABLATION_CSV, diffs: str = "mean", digits: int = 3) -> pd.DataFrame:
    """The retention ablation as the book shows it: one row per variant.

    Columns: ``variant``, ``setting`` (what it is), ``retained (mean)`` and one column per modality,
    each ``x [lo, hi]`` (95 % bootstrap CI), then the paired difference from ES-paper with its
    paired 95 % CI: of the mean only (``diffs="mean"``), or also per modality (``diffs="all"``).
    ES-paper's own difference reads ``reference``.

    Examples
    --------
    >>> import tempfile
    >>> rows = [("es-paper", "cell", .88, .87, .89, 0, 0, 0), ("es-paper", "mean", .6055, .598, .613, 0, 0, 0),
    ...         ("es-code", "cell", .90, .89, .91, .02, .01, .03),
    ...         ("es-code", "mean", .5829, .576, .590, -.0226, -.0301, -.0152)]
    >>> path = Path(tempfile.mkdtemp()) / "ablation.csv"
    >>> pd.DataFrame([(*r, 200) for r in rows], columns=list(ABLATION_COLUMNS)).to_csv(path, index=False)
    >>> t = ablation_table(path)
    >>> t.columns.tolist()
    ['variant', 'setting', 'retained (mean)', 'cell', 'Δ mean vs es-paper [paired 95% CI]']
    >>> t.iloc[1].tolist()[2:]
    ['0.583 [0.576, 0.590]', '0.900 [0.890, 0.910]', '-0.023 [-0.030, -0.015]']
    >>> t.iloc[0, -1]
    'reference'
    """
    if diffs not in ("mean", "all"):
        raise InputError(f"diffs must be 'mean' or 'all', got {diffs!r}")
    table = read_ablation(csv_path)
    modalities = [m for m in dict.fromkeys(table["modality"]) if m != "mean"]
    variants = list(dict.fromkeys(table["variant"]))
    variants = [REFERENCE] + [v for v in variants if v != REFERENCE]
    rows = []
    for v in variants:
        sub = table[table["variant"] == v].set_index("modality")
        row = {"variant": v, "setting": VARIANTS.get(v, "")}
        for m, label in [("mean", "retained (mean)"), *[(m, m) for m in modalities]]:
            row[label] = (ci_text(sub.at[m, "retained"], sub.at[m, "lo"], sub.at[m, "hi"], digits)
                          if m in sub.index else "")
        for m in ["mean", *(modalities if diffs == "all" else [])]:
            label = f"Δ {m} vs {REFERENCE} [paired 95% CI]"
            if v == REFERENCE:
                row[label] = "reference"
            elif m in sub.index:
                row[label] = ci_text(sub.at[m, "diff_vs_paper"], sub.at[m, "diff_lo"], sub.at[m, "diff_hi"], digits,
                                     signed=True)
            else:
                row[label] = ""
        rows.append(row)
    return pd.DataFrame(rows)


def _top_text(row: dict) -> str:
    if row["on"] == "alpha":
        return f"{int(row['top_changed'])} of {int(row['n_units'])} blocks"
    if row["on"] == "beta":
        return f"{100 * row['top_changed']:.2g} % of elements"
    return "—"


def differences_table(json_path: str | Path = DIFFS_JSON, digits: int = 2) -> pd.DataFrame:
    """Each paper-vs-code difference's effect on α or β at a scale, as the book shows it.

    One row per measurement of ``benchmarks/es_code_diffs.py``: the point, the difference, the
    option that selects it, what it changes (``on``: alpha, beta or weights), mean and max |Δ| to
    ``digits`` significant digits, and how many blocks (α) or what share of LoRA elements (β) get
    another top specialist.

    Examples
    --------
    >>> import tempfile
    >>> rows = [{"point": "1", "difference": "own-modality scores", "option": "score_modalities='own'",
    ...          "on": "beta", "mean_abs": 0.01234, "max_abs": 0.9876, "top_changed": 0.0456, "n_units": 100},
    ...         {"point": "4", "difference": "fresh directions", "option": "projections='fresh'",
    ...          "on": "alpha", "mean_abs": 0.0, "max_abs": 0.0, "top_changed": 0, "n_units": 30}]
    >>> path = Path(tempfile.mkdtemp()) / "diffs.json"
    >>> _ = path.write_text(json.dumps({"rows": rows}))
    >>> t = differences_table(path)
    >>> t[["#", "on", "mean |Δ|", "max |Δ|", "top specialist changes"]].values.tolist()
    [['1', 'beta', '0.012', '0.99', '4.6 % of elements'], ['4', 'alpha', '0', '0', '0 of 30 blocks']]
    """
    path = Path(json_path)
    if not path.is_file():
        raise InputError(f"{path}: not found; make it with {DIFFS_COMMAND}")
    try:
        rows = json.loads(path.read_text())["rows"]
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path}: not a results file of {DIFFS_COMMAND} ({err!r}); remake it") from None
    for i, row in enumerate(rows):
        missing = [f for f in DIFF_FIELDS if f not in row]
        if missing:
            raise InputError(f"{path}: row {i} lacks {missing}; remake it with {DIFFS_COMMAND}")

    def num(v):
        return "0" if v == 0 else f"{v:.{digits}g}"

    return pd.DataFrame([{"#": str(r["point"]), "difference": r["difference"], "option": r["option"], "on": r["on"],
                          "mean |Δ|": num(r["mean_abs"]), "max |Δ|": num(r["max_abs"]),
                          "top specialist changes": _top_text(r), "note": r.get("note", "")} for r in rows])
