"""Table 4: what finding the merge cost, ES-Merging against the baselines that search, beside the paper.

Every method records its cost in its merge folder's ``esmerge.json`` (``info.cost``). FLOPs are
counted the same way for the three methods of Table 4: ``torch.utils.flop_counter.FlopCounterMode``
over every forward and backward pass of the search (ES-Merging: the probe forward passes through
the base and every specialist, the SWD projections and the element-score gradient passes,
``esmerge.methods.es_signals.counted``; AdaMerging: every entropy step; Avg. Merging + FT: every
training step, summed over benchmarks). ``table4`` builds the one tidy table and a note with the
ratios; ``cost_table`` is the raw table of every cost key as recorded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from esmerge.report.paper_tables import paper_results

NOT_RECORDED = "not recorded"
# The methods of Table 4, in its order, and what each one's search is.
SEARCH = {"es": "probe forward passes (base + specialists), SWD, one gradient pass per probe and specialist",
          "adamerging": "Adam steps minimising answer entropy on unlabeled test prompts",
          "avg-ft": "Adam steps fine-tuning the averaged LoRA, one run per benchmark"}
LABELS = {"es": "ES-Merging", "adamerging": "AdaMerging", "avg-ft": "Avg. Merging + FT"}
PAPER_BUDGET = {"es": "110 probes x 3 modalities (330 samples), one gradient pass (App. A.3)",
                "adamerging": "the original AdaMerging's: 500 steps (App. A.3 follows the originals)",
                "avg-ft": "2,000 examples x 10 epochs, batch 16, per benchmark (App. A.2)"}
# §5.6's text, which rounds differently from its own Table 4 (those ratios come from paper_results.csv).
PAPER_TEXT_RATIOS = {"adamerging": 3.4, "avg-ft": 6.1}
COLUMNS = ["method", "search", "budget", "paper_budget", "flops", "seconds", "peak_memory_mib", "memory_measured_as",
           "flops_vs_es", "paper_flops", "paper_flops_vs_es", "notes"]


class Table4(NamedTuple):
    """``table4``'s answer: the table (``COLUMNS``) and a note stating the ratios, ours and the paper's."""

    table: pd.DataFrame
    note: str


# --------------------------------------------------------------------------- the merge folders
def merge_folders(*roots: Path) -> dict[str, Path]:
    """Method name -> its folder under ``roots`` (a later root's folder replaces an earlier one of
    the same name); folders holding one merged model come first, per-benchmark folders last.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for sub in ("avg-ft/GDSC2", "es"):
    ...     (root / sub).mkdir(parents=True); _ = (root / sub / "esmerge.json").write_text("{}")
    >>> list(merge_folders(root))
    ['es', 'avg-ft']
    """
    found: dict[str, Path] = {}
    for root in roots:
        found.update({p.name: p for p in sorted(Path(root).glob("*")) if p.is_dir()})
    whole = {name: p for name, p in found.items() if (p / "esmerge.json").is_file()}
    return {**whole, **{name: p for name, p in found.items() if name not in whole}}


def _metas(folder: Path) -> list[dict]:
    """The ``esmerge.json`` of a merged model, or of each per-benchmark model under it (Avg. Merging + FT)."""
    marker = Path(folder) / "esmerge.json"
    files = [marker] if marker.is_file() else sorted(Path(folder).glob("*/esmerge.json"))
    return [json.loads(f.read_text()) for f in files]


def _cost_of(folder: Path) -> dict | None:
    """``esmerge.json`` of a merged model; for a folder of per-benchmark models (Avg. Merging + FT),
    their costs summed: top-level ``wall_seconds`` and every number under ``info.cost``."""
    metas = _metas(folder)
    if len(metas) == 1 and (Path(folder) / "esmerge.json").is_file():
        return metas[0]
    if not metas:
        return None
    keys = list(dict.fromkeys(k for m in metas for k in m.get("info", {}).get("cost", {})))
    cost = {k: sum(v for m in metas if _number(v := m.get("info", {}).get("cost", {}).get(k))) for k in keys}
    return {"wall_seconds": sum(m.get("wall_seconds", 0) or 0 for m in metas), "info": {"cost": cost}}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cost_table(method_dirs: dict[str, Path]) -> pd.DataFrame:
    """Every cost key each merged method recorded (``esmerge.json`` ``info``), beside the paper's Table 4.

    Keys of ``info`` that mention flops, wall time, seconds or steps are reported as recorded,
    with the merge's total ``wall_seconds``. A folder holding one merged model per benchmark
    reports their sums; folders with no ``esmerge.json`` at all are left out. ``table4`` is the
    tidy Table 4; this is the raw record.
    """
    paper = paper_results()
    paper = paper[paper["table"] == "Table 4"].set_index("method")["value"]
    rows = []
    for method, folder in method_dirs.items():
        meta = _cost_of(Path(folder))
        if meta is None:
            continue
        flat = _flatten(meta.get("info", {}))
        cost = {k: v for k, v in flat.items() if re.search(r"flop|wall|second|time|step|backward|forward", k, re.I)
                and _number(v)}
        rows.append({"method": method, "wall_seconds": meta.get("wall_seconds", np.nan), **cost,
                     "paper_total_flops": paper.get(method, np.nan)})
    return pd.DataFrame(rows)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


# --------------------------------------------------------------------------- Table 4
def paper_flops(paper: pd.DataFrame | None = None) -> dict[str, float]:
    """The paper's Table 4 total FLOPs (no unit given) per method, from ``paper_results.csv``.

    >>> paper = pd.DataFrame({"table": ["Table 4", "Table 4", "Table 1"], "method": ["es", "avg-ft", "es"],
    ...                       "value": [2.0, 9.0, 60.0]})
    >>> paper_flops(paper)
    {'es': 2.0, 'avg-ft': 9.0}
    """
    paper = paper_results() if paper is None else paper
    rows = paper[paper["table"] == "Table 4"]
    return {m: float(v) for m, v in zip(rows["method"], rows["value"])}


def paper_ratios(paper: pd.DataFrame | None = None) -> dict[str, float]:
    """Each baseline's Table 4 FLOPs over ES-Merging's, from ``paper_results.csv`` (the paper's text says 3.4, 6.1).

    >>> paper = pd.DataFrame({"table": ["Table 4"] * 2, "method": ["es", "adamerging"], "value": [2.0, 7.0]})
    >>> paper_ratios(paper)
    {'adamerging': 3.5}
    """
    flops = paper_flops(paper)
    return {m: v / flops["es"] for m, v in flops.items() if m != "es"}


def _budget(method: str, metas: list[dict]) -> str:
    """The search budget as run, from what ``esmerge.json`` records."""
    info = [m.get("info", {}) for m in metas]
    if method in ("es", "es-layer", "es-element"):
        i = info[0]
        k, s, blocks = i.get("probe_k"), i.get("n_specialists"), len(i.get("modalities", [])) or "?"
        grads = "one gradient pass per probe and specialist" if i.get("use_element", True) else "no gradient pass"
        return f"{k} probes x {blocks} modality blocks through the base and {s or '?'} specialists; {grads}"
    if method == "adamerging":
        steps = (info[0].get("hparams") or {}).get("steps", NOT_RECORDED)
        return f"{steps} Adam steps (prompts: {NOT_RECORDED})"
    if method == "avg-ft":
        steps = sum(len((i.get("loss") or {}).get("history", [])) for i in info)
        hp = [i.get("hparams") or {} for i in info]
        parts = {f"{h.get('n_batches', '?')} batches x {h.get('epochs', '?')} epochs" for h in hp}
        return (f"{len(info)} benchmark(s) x ({' / '.join(sorted(parts))}) = {steps} steps "
                f"(examples per batch: {NOT_RECORDED})")
    return "none"


def _row(method: str, metas: list[dict], paper: dict[str, float]) -> dict:
    """One Table 4 row (``flops_vs_es`` and ``paper_flops_vs_es`` are filled by ``table4``)."""
    costs = [m.get("info", {}).get("cost") or {} for m in metas]
    flops = [c.get("flops") for c in costs]
    # ES: the signals' compute time as recorded (also when read back from the cache); others: the run's
    seconds = [c.get("seconds", c.get("wall_seconds")) if method.startswith("es") else
               c.get("wall_seconds", m.get("wall_seconds")) for c, m in zip(costs, metas)]
    peaks = [c["peak_memory_mib"] for c in costs if _number(c.get("peak_memory_mib"))]
    kinds = list(dict.fromkeys(c["peak_memory_kind"] for c in costs if c.get("peak_memory_kind")))
    notes = [c["note"] for c in costs if c.get("note")]
    if method.startswith("es") and any(c.get("cached") for c in costs) and not notes:
        notes.append("signals read from the cache: FLOPs and seconds as recorded when they were computed")
    searches = method in SEARCH or method in ("es-layer", "es-element") or any(_number(f) for f in flops)
    if not searches:
        return {"method": method, "search": "no search step (training-free)", "budget": "none",
                "paper_budget": "no search step", "flops": "none (no search step)",
                "seconds": _total(seconds, 2), "peak_memory_mib": _peak(peaks), "memory_measured_as": _kind(kinds),
                "paper_flops": "not in Table 4", "notes": "merging itself only"}
    if not costs or not any(costs):
        notes.append("merged before costs were recorded")
    return {"method": method, "search": SEARCH.get(method, "trains before merging (not in the paper's Table 4)"),
            "budget": _budget(method, metas), "paper_budget": PAPER_BUDGET.get(method, "not in Table 4"),
            "flops": int(sum(flops)) if flops and all(_number(f) for f in flops) else notes[0]
            if notes and notes[0].startswith(NOT_RECORDED) else NOT_RECORDED + (f" ({notes[0]})" * bool(notes)),
            "seconds": _total(seconds, 1), "peak_memory_mib": _peak(peaks), "memory_measured_as": _kind(kinds),
            "paper_flops": int(paper[method]) if method in paper else "not in Table 4", "notes": "; ".join(notes)}


def _total(values: list, digits: int):
    return round(float(sum(values)), digits) if values and all(_number(v) for v in values) else NOT_RECORDED


def _peak(peaks: list):
    return round(max(peaks), 1) if peaks else NOT_RECORDED


def _kind(kinds: list):
    return "; ".join(kinds) if kinds else NOT_RECORDED


def table4(method_dirs: dict[str, Path], paper: pd.DataFrame | None = None) -> Table4:
    """Table 4 done properly: one tidy row per method from the merge folders' ``esmerge.json`` ``info.cost``.

    Parameters
    ----------
    method_dirs : dict of str to Path
        Method -> its merge folder (``merge_folders``); Avg. Merging + FT's holds one merge per
        benchmark, summed (FLOPs, seconds, steps) or maximised (peak memory).
    paper : DataFrame, optional
        ``paper_results()`` (read from ``../shared/reference`` when not given).

    Returns
    -------
    Table4
        ``table`` with ``COLUMNS``: ES-Merging, AdaMerging, Avg. Merging + FT first, then every
        other method (``search`` says "no search step" for the training-free ones, with their
        seconds); ``flops_vs_es`` is each row's FLOPs over ES-Merging's, ``paper_flops_vs_es``
        the same from Table 4. No cell is NaN: a value that was not recorded says so. ``note``
        states the ratios, ours and the paper's (text and table).

    Examples
    --------
    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> for name, cost in {"es": {"flops": 10, "seconds": 1.0}, "adamerging": {"flops": 40, "wall_seconds": 2.0},
    ...                    "ties": {"wall_seconds": 0.1, "flops": None}}.items():
    ...     (root / name).mkdir(); _ = (root / name / "esmerge.json").write_text(json.dumps({"info": {"cost": cost}}))
    >>> paper = pd.DataFrame({"table": ["Table 4"] * 2, "method": ["es", "adamerging"], "value": [2.0, 7.0]})
    >>> t = table4(merge_folders(root), paper).table.set_index("method")
    >>> t.loc["adamerging", ["flops", "flops_vs_es", "paper_flops_vs_es"]].tolist()
    [40, 4.0, 3.5]
    >>> t.loc["ties", "search"], float(t.loc["ties", "seconds"])
    ('no search step (training-free)', 0.1)
    """
    paper = paper_results() if paper is None else paper
    flops_paper, ratios_paper = paper_flops(paper), paper_ratios(paper)
    found = {m: metas for m, folder in method_dirs.items() if (metas := _metas(folder))}
    order = [m for m in SEARCH if m in found] + [m for m in found if m not in SEARCH]
    rows = [_row(m, found[m], flops_paper) for m in order]
    es_flops = next((r["flops"] for r in rows if r["method"] == "es"), None)
    for r in rows:
        if r["paper_budget"] == "no search step":
            r["flops_vs_es"] = r["paper_flops_vs_es"] = "n/a (no search step)"
            continue
        r["flops_vs_es"] = (round(r["flops"] / es_flops, 2) if _number(r["flops"]) and _number(es_flops) and es_flops
                            else NOT_RECORDED if r["method"] != "es" or not _number(r["flops"]) else 1.0)
        r["paper_flops_vs_es"] = (1.0 if r["method"] == "es" and "es" in flops_paper else
                                  round(ratios_paper[r["method"]], 1) if r["method"] in ratios_paper
                                  else "not in Table 4")
    table = pd.DataFrame(rows, columns=COLUMNS)
    return Table4(table, _note(rows, flops_paper, ratios_paper))


def _note(rows: list[dict], flops_paper: dict, ratios_paper: dict) -> str:
    """The ratios in words: the paper's text, the paper's table, ours."""
    paper_text = " and ".join(f"{PAPER_TEXT_RATIOS[m]}x cheaper than {LABELS[m]}" for m in PAPER_TEXT_RATIOS)
    table_text = " and ".join(f"{flops_paper[m]:,.0f} / {flops_paper['es']:,.0f} = {ratios_paper[m]:.1f}x"
                              f" ({LABELS[m]})" for m in PAPER_TEXT_RATIOS if m in ratios_paper)
    ours = {r["method"]: r for r in rows}
    if "es" not in ours:
        mine = "ours: no ES-Merging merge folder found."
    elif not _number(ours["es"]["flops"]):
        mine = f"ours: ES-Merging's FLOPs are {ours['es']['flops']}, so no ratio is computed."
    else:
        parts = [f"{LABELS[m]} {ours[m]['flops_vs_es']}x" for m in PAPER_TEXT_RATIOS
                 if m in ours and _number(ours[m]["flops_vs_es"])]
        missing = [LABELS[m] for m in PAPER_TEXT_RATIOS if m in ours and not _number(ours[m]["flops_vs_es"])]
        absent = [LABELS[m] for m in PAPER_TEXT_RATIOS if m not in ours]
        mine = ("ours (FLOPs by torch.utils.flop_counter's formulas over every forward and backward pass of each "
                "search, at the budgets in the table, not the paper's): baseline FLOPs over ES-Merging's: "
                + (", ".join(parts) or "none") + (f"; not recorded: {', '.join(missing)}" if missing else "")
                + (f"; not run: {', '.join(absent)}" if absent else "") + ".")
    kinds = {r["memory_measured_as"] for r in rows if r["memory_measured_as"] != NOT_RECORDED}
    memory = f" Peak memory is {'; '.join(sorted(kinds))}." if kinds else ""
    return (f"The paper's text (§5.6) says ES-Merging is {paper_text}; its Table 4 numbers (no unit given) give "
            f"{table_text}. {mine[0].upper()}{mine[1:]}{memory}")
