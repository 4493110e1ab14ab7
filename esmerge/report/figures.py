"""The results' figures from the tables the notebooks build, each with a caption computed from the same numbers.

No I/O: each figure function returns a matplotlib ``Figure`` (saved by the notebook with ``plots.save``) and its
``*_caption`` companion says what it shows and what to conclude. ``forest_plot``: the claims registers, one panel
per family (accuracy, AUROC, retention); ``accuracy_heatmap``: models x benchmarks beside the paper's values;
``retention_bars``: retained fraction per modality with CIs. Artists carry a ``gid`` (``ci``, ``zero``,
``estimate``, ``paper``, ``p_holm``, ``cell``) so tests can find them.
"""
from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.transforms import offset_copy

from esmerge.data.benchmarks import BENCHMARK_NAMES
from esmerge.plots import MODALITY_COLORS, OKABE_ITO, method_color
from esmerge.report.claims import method_label
from esmerge.report.paper_tables import PAPER_DATASET, paper_results

# Verdict prefixes in the registers' words -> marker colour ("not supported" before "supported").
VERDICT_COLORS = {"not supported": OKABE_ITO[5], "supported": OKABE_ITO[2], "inconclusive": OKABE_ITO[8]}
ALPHA = 0.05
_UNITS = {"accuracy": "accuracy points", "AUROC": "AUROC points", "retention": "retained fraction"}


def _verdict_color(verdict) -> str:
    return next((c for v, c in VERDICT_COLORS.items() if str(verdict).startswith(v)), "#000000")


# --------------------------------------------------------------------------- forest plots of the registers
def forest_rows(registers: pd.DataFrame | Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The registers as tidy forest-plot rows: ``family, label, diff, lo, hi, verdict, p_holm, paper``.

    A register with columns ``a, b`` is a retention register (family ``retention``), any other an
    accuracy register (``accuracy``, from ``ours, lo, hi``), which adds an ``AUROC`` family from
    ``auroc_diff, auroc_lo, auroc_hi`` when some are measured. A mapping names each register's family
    (its AUROC family is ``"<name> (AUROC)"``, or ``AUROC`` for ``accuracy``). Unmeasured rows keep
    NaN ``diff``.

    >>> reg = pd.DataFrame({"claim": ["es beats avg"], "ours": [1.5], "lo": [0.5], "hi": [2.5], "p_holm": [0.01],
    ...                     "verdict": ["supported"], "paper": [2.0], "auroc_diff": [np.nan]})
    >>> forest_rows(reg)[["family", "label", "diff", "lo", "p_holm"]].values.tolist()
    [['accuracy', 'es beats avg', 1.5, 0.5, 0.01]]
    >>> ret = pd.DataFrame({"a": ["es", "es"], "b": ["avg", "avg"], "modality": ["mean", "cell"], "ours": [0.1, 0.2],
    ...                     "lo": [0.0, 0.1], "hi": [0.2, 0.3]})
    >>> forest_rows(ret)["label"].tolist()  # a per-modality row names its modality
    ['es vs avg', 'es vs avg (cell)']
    """
    if isinstance(registers, pd.DataFrame):
        registers = {"retention" if {"a", "b"} <= set(registers.columns) else "accuracy": registers}
    parts = []
    for family, reg in registers.items():
        retention = {"a", "b"} <= set(reg.columns)
        modality = reg["modality"].fillna("mean") if "modality" in reg else pd.Series("mean", index=reg.index)
        labels = ([f"{method_label(a)} vs {method_label(b)}" + ("" if m == "mean" else f" ({m})")
                   for a, b, m in zip(reg["a"], reg["b"], modality)] if retention
                  else [str(c) for c in reg["claim"]])
        nan = pd.Series(np.nan, index=reg.index)
        parts.append(pd.DataFrame({"family": family, "label": labels, "diff": reg["ours"], "lo": reg["lo"],
                                   "hi": reg["hi"], "verdict": reg.get("verdict", nan),
                                   "p_holm": reg.get("p_holm", nan), "paper": reg.get("paper", nan)}))
        if "auroc_diff" in reg and reg["auroc_diff"].notna().any():
            vs = reg.get("auroc_vs", pd.Series("-", index=reg.index))
            parts.append(pd.DataFrame({"family": "AUROC" if family == "accuracy" else f"{family} (AUROC)",
                                       "label": [f"{lab} [vs {v}]" for lab, v in zip(labels, vs)],
                                       "diff": reg["auroc_diff"], "lo": reg["auroc_lo"], "hi": reg["auroc_hi"],
                                       "verdict": reg.get("auroc_verdict", nan), "p_holm": np.nan, "paper": np.nan}))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["family", "label", "diff", "lo", "hi", "verdict", "p_holm", "paper"])
    return out.astype({c: float for c in ("diff", "lo", "hi", "p_holm", "paper")})


def _family_counts(rows: pd.DataFrame) -> dict:
    measured = rows[rows["diff"].notna() & rows["lo"].notna() & rows["hi"].notna()]
    p = measured["p_holm"].dropna()
    paper = measured[measured["paper"].notna()]
    return {"n": len(measured), "missing": len(rows) - len(measured),
            "above": int((measured["lo"] > 0).sum()), "below": int((measured["hi"] < 0).sum()),
            "n_p": len(p), "holm": int((p < ALPHA).sum()), "n_paper": len(paper),
            "paper_inside": int(((paper["paper"] >= paper["lo"]) & (paper["paper"] <= paper["hi"])).sum()),
            "verdicts": measured["verdict"].dropna().astype(str).str.split(" (", regex=False).str[0]
            .value_counts().to_dict()}


def forest_caption(registers: pd.DataFrame | Mapping[str, pd.DataFrame], level: float = 0.95) -> str:
    """What ``forest_plot`` shows, with its counts: per family how many CIs exclude 0, Holm p, verdicts.

    >>> reg = pd.DataFrame({"claim": ["x", "y", "z"], "ours": [1.5, -0.5, np.nan], "lo": [0.5, -1.0, np.nan],
    ...                     "hi": [2.5, 0.2, np.nan], "p_holm": [0.01, 0.4, np.nan], "paper": [2.0, 1.0, 3.0],
    ...                     "verdict": ["supported", "inconclusive", "not measured"]})
    >>> print(forest_caption(reg))  # doctest: +NORMALIZE_WHITESPACE
    Claimed method minus its competitor, 95% CIs. accuracy: 1 of 2 CIs exclude 0 (1 above, 0 below);
    1 of 2 Holm-adjusted p < 0.05; the paper's margin lies inside our CI on 1 of 2; verdicts: 1 supported,
    1 inconclusive; 1 not measured. Conclusion: 1 margin is resolved in the claimed direction and none
    against it; the rest are untested at this n, not refuted.
    """
    rows = forest_rows(registers)
    parts, above, below, total = [], 0, 0, 0
    for family, part in rows.groupby("family", sort=False):
        c = _family_counts(part)
        above, below, total = above + c["above"], below + c["below"], total + c["n"]
        text = f"{family}: {c['above'] + c['below']} of {c['n']} CIs exclude 0 ({c['above']} above, {c['below']} below)"
        if c["n_p"]:
            text += f"; {c['holm']} of {c['n_p']} Holm-adjusted p < {ALPHA:g}"
        if c["n_paper"]:
            text += f"; the paper's margin lies inside our CI on {c['paper_inside']} of {c['n_paper']}"
        if c["verdicts"]:
            text += "; verdicts: " + ", ".join(f"{k} {v}" for v, k in c["verdicts"].items())
        if c["missing"]:
            text += f"; {c['missing']} not measured"
        parts.append(text)
    if total == 0:
        return "Nothing measured: every register row is 'not measured'."
    rest = ("the rest are untested at this n, not refuted" if above + below < total
            else "every margin is resolved")
    conclusion = (f"{above} margin{'s are' if above != 1 else ' is'} resolved in the claimed direction and "
                  f"{below or 'none'} against it; {rest}.")
    return f"Claimed method minus its competitor, {level:.0%} CIs. " + ". ".join(parts) + f". Conclusion: {conclusion}"


def forest_plot(registers: pd.DataFrame | Mapping[str, pd.DataFrame], title: str = "", max_label: int = 70):
    """One forest plot per claim family: each row a claimed-minus-competitor margin with its CI.

    ``registers``: ``claims.claims`` / ``yardstick_claims`` rows (``ours, lo, hi, p_holm, verdict, paper``,
    AUROC columns), ``retention.retention_claims`` rows, or a mapping family -> register (``forest_rows``).
    Returns a Figure, one panel per family with a measured row: per row a CI whisker (``gid="ci"``), a
    marker coloured by verdict (``VERDICT_COLORS``), the paper's margin as a black tick where it has one,
    ``p=...`` (Holm) at the right where the register has it; a zero line (``gid="zero"``). Labels longer
    than ``max_label`` are cut.

    >>> reg = pd.DataFrame({"claim": ["x", "y"], "ours": [1.5, -0.5], "lo": [0.5, -1.0], "hi": [2.5, 0.2],
    ...                     "p_holm": [0.01, 0.4], "verdict": ["supported", "inconclusive"]})
    >>> fig = forest_plot(reg)
    >>> [len(ax.get_yticks()) for ax in fig.axes], len([t for t in fig.axes[0].texts if t.get_gid() == "p_holm"])
    ([2], 2)
    >>> plt.close(fig)
    """
    rows = forest_rows(registers)
    rows = rows[rows["diff"].notna() & rows["lo"].notna() & rows["hi"].notna()]
    families = list(dict.fromkeys(rows["family"])) or ["nothing measured"]
    heights = [max(1, (rows["family"] == f).sum()) for f in families]
    fig, axes = plt.subplots(len(families), 1, figsize=(9, 0.42 * sum(heights) + 1.3 * len(families)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, family in zip(axes[:, 0], families):
        part = rows[rows["family"] == family].reset_index(drop=True)
        y = np.arange(len(part))[::-1]
        ax.hlines(y, part["lo"], part["hi"], color="k", lw=1.0, gid="ci")
        ax.scatter(part["diff"], y, c=[_verdict_color(v) for v in part["verdict"]], s=40, zorder=3, gid="estimate")
        paper = part["paper"].notna()
        ax.scatter(part.loc[paper, "paper"], y[paper.to_numpy()], marker="|", s=200, color="k", zorder=4, gid="paper")
        ax.axvline(0, color="gray", ls=":", lw=0.9, gid="zero")
        for yi, p in zip(y, part["p_holm"]):
            if np.isfinite(p):  # in axes coordinates on x, so it sits right of every whisker
                ax.text(1.01, yi, f"p={p:.3f}", transform=ax.get_yaxis_transform(), va="center", fontsize=7,
                        gid="p_holm")
        labels = [lab if len(lab) <= max_label else lab[:max_label - 3] + "..." for lab in part["label"]]
        ax.set_yticks(y, labels, fontsize=7)
        ax.set_ylim(-0.7, len(part) - 0.3)
        c = _family_counts(part)
        ax.set_title(f"{family}: {c['above'] + c['below']} of {c['n']} CIs exclude 0", fontsize=9, loc="left")
        ax.set_xlabel(f"claimed minus competitor ({_UNITS.get(family.split(' (')[0], 'points')})", fontsize=8)
    handles = [plt.Line2D([], [], marker=mk, ls="", color=c, label=v, ms=ms) for v, c, mk, ms in
               [*((v, c, "o", 6) for v, c in VERDICT_COLORS.items()), ("paper", "k", "|", 12)]]
    fig.legend(handles=handles, frameon=False, fontsize=7, loc="lower center", ncol=len(handles))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))  # room for the legend below
    return fig


def _method_squares(ax, positions, methods, axis: str = "y"):
    """A square in ``plots.method_color`` beside each row (or under each column), between axis and tick label."""
    ax.tick_params(axis=axis, pad=14)
    base = ax.get_yaxis_transform() if axis == "y" else ax.get_xaxis_transform()
    where = offset_copy(base, fig=ax.figure, units="points", **({"x": -7} if axis == "y" else {"y": -7}))
    xy = ([0] * len(positions), positions) if axis == "y" else (positions, [0] * len(positions))
    ax.scatter(*xy, marker="s", s=30, clip_on=False, transform=where, c=[method_color(m) for m in methods],
               gid="method_color")


# --------------------------------------------------------------------------- accuracy heatmap
def _bench_of(name: str) -> str | None:
    return name if name in PAPER_DATASET else {v: k for k, v in PAPER_DATASET.items()}.get(name)


def accuracy_matrix(data, metric: str = "accuracy") -> pd.DataFrame:
    """Models x benchmarks (``BENCHMARK_NAMES`` order, those present) from any table the notebooks have.

    ``data``: ``evaluate.summary`` rows (``method, benchmark, <metric>``), ``results_table`` rows
    (``method, dataset, metric, ours``; group averages are dropped) or a list of them, or the results
    dict ``{method: {benchmark: result}}``. Methods keep their order of appearance.

    >>> per = pd.DataFrame({"method": ["es", "es", "avg"], "benchmark": ["GDSC2", "BindingDB", "GDSC2"],
    ...                     "accuracy": [60.0, 55.0, 50.0]})
    >>> accuracy_matrix(per).to_dict("index")
    {'es': {'BindingDB': 55.0, 'GDSC2': 60.0}, 'avg': {'BindingDB': nan, 'GDSC2': 50.0}}
    """
    if isinstance(data, Mapping):
        data = pd.DataFrame([{"method": m, "benchmark": b, metric: r[metric]}
                             for m, rs in data.items() for b, r in rs.items()])
    elif isinstance(data, (list, tuple)):
        data = pd.concat(list(data), ignore_index=True)
    if "benchmark" not in data:  # results_table rows
        data = data[data["metric"] == metric]
        data = data.assign(benchmark=data["dataset"].map(_bench_of), **{metric: data["ours"]}).dropna(
            subset=["benchmark"])
    wide = data.drop_duplicates(["method", "benchmark"]).pivot(index="method", columns="benchmark", values=metric)
    benches = [b for b in BENCHMARK_NAMES if b in set(data["benchmark"])]
    return wide.reindex(index=list(dict.fromkeys(data["method"])), columns=benches).astype(float)


def paper_matrix(paper: pd.DataFrame, methods: list[str], benchmarks: list[str],
                 metric: str = "accuracy") -> pd.DataFrame:
    """The paper's values for these methods x benchmarks (Tables 1-2; the ablation variants from Table 8), NaN where
    it has none.

    >>> paper = pd.DataFrame({"table": ["Table 1", "Table 8"], "method": ["es", "es-layer"],
    ...                       "dataset": ["GDSC2", "GDSC2"], "metric": ["accuracy"] * 2, "value": [70.1, 66.0]})
    >>> paper_matrix(paper, ["es", "es-layer", "majority"], ["GDSC2"])["GDSC2"].tolist()
    [70.1, 66.0, nan]
    """
    rows = paper[(paper["metric"] == metric) & paper["table"].isin(("Table 1", "Table 2", "Table 8"))]
    rows = rows.assign(benchmark=rows["dataset"].map(_bench_of), first=~rows["table"].eq("Table 8"))
    rows = rows.dropna(subset=["benchmark"]).sort_values("first", ascending=False, kind="stable")
    wide = rows.drop_duplicates(["method", "benchmark"]).pivot(index="method", columns="benchmark", values="value")
    return wide.reindex(index=methods, columns=benchmarks).astype(float)


def _paper_of(paper):
    return paper_results() if paper is True else paper if isinstance(paper, pd.DataFrame) else None


def accuracy_heatmap(data, paper: pd.DataFrame | bool = True, metric: str = "accuracy", title: str = ""):
    """Models x benchmarks ``metric`` (%), annotated, beside the paper's values for the same methods.

    ``data``: anything ``accuracy_matrix`` reads (``per_benchmark.csv``, Tables 1-2 long rows, results);
    ``paper``: ``paper_results()`` rows, ``True`` to read them in place (``../shared/reference``), ``False``
    for ours alone; ``metric``: ``accuracy`` or ``macro_f1``. Returns a Figure: ours (left) and the paper's
    (right) on one viridis scale, every finite cell annotated (``gid="cell"``), a square in
    ``plots.method_color`` beside each row.

    >>> per = pd.DataFrame({"method": ["es", "avg"], "benchmark": ["GDSC2"] * 2, "accuracy": [60.0, 50.0]})
    >>> paper = pd.DataFrame({"table": ["Table 1"], "method": ["es"], "dataset": ["GDSC2"],
    ...                       "metric": ["accuracy"], "value": [70.1]})
    >>> fig = accuracy_heatmap(per, paper)
    >>> [len([t for t in ax.texts if t.get_gid() == "cell"]) for ax in fig.axes[:2]]
    [2, 1]
    >>> plt.close(fig)
    """
    ours = accuracy_matrix(data, metric)
    ref = _paper_of(paper)
    panels = [("ours", ours)]
    if ref is not None:
        panels.append(("paper", paper_matrix(ref, list(ours.index), list(ours.columns), metric)))
    values = np.concatenate([m.to_numpy().ravel() for _, m in panels])
    vmin, vmax = (np.nanmin(values), np.nanmax(values)) if np.isfinite(values).any() else (0.0, 100.0)
    n_rows, n_cols = ours.shape
    fig, axes = plt.subplots(1, len(panels), figsize=(0.55 * n_cols * len(panels) + 3, 0.34 * n_rows + 2.2),
                             sharey=True, squeeze=False)
    for ax, (name, matrix) in zip(axes[0], panels):
        im = ax.imshow(matrix.to_numpy(), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        for (i, j), v in np.ndenumerate(matrix.to_numpy()):
            if np.isfinite(v):  # light text on the dark half of viridis
                dark = (v - vmin) / ((vmax - vmin) or 1) < 0.6
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=6.5,
                        color="white" if dark else "black", gid="cell")
        ax.set_xticks(range(n_cols), [PAPER_DATASET.get(b, b) for b in matrix.columns], rotation=70, fontsize=7)
        ax.set_title(f"{name}: {metric} (%)", fontsize=9)
    axes[0, 0].set_yticks(range(n_rows), [method_label(m) for m in ours.index], fontsize=7)
    _method_squares(axes[0, 0], list(range(n_rows)), list(ours.index))
    fig.colorbar(im, ax=list(axes[0]), fraction=0.03, pad=0.02)
    fig.suptitle(title, fontsize=9)
    return fig


def heatmap_caption(data, paper: pd.DataFrame | bool = True, metric: str = "accuracy") -> str:
    """What ``accuracy_heatmap`` shows: the cells, means over benchmarks ours vs paper, and whether the order carries.

    >>> per = pd.DataFrame({"method": ["es", "avg", "es", "avg"], "benchmark": ["GDSC2"] * 2 + ["Human"] * 2,
    ...                     "accuracy": [60.0, 50.0, 56.0, 52.0]})
    >>> paper = pd.DataFrame({"table": ["Table 1"] * 4, "method": ["es", "avg"] * 2, "metric": ["accuracy"] * 4,
    ...                       "dataset": ["GDSC2", "GDSC2", "Human", "Human"], "value": [70.0, 60.0, 80.0, 66.0]})
    >>> print(heatmap_caption(per, paper))  # doctest: +NORMALIZE_WHITESPACE
    accuracy (%) of 2 models on 2 benchmarks (left), beside the paper's values for the 2 of them it reports
    (right), on one colour scale. Mean over the benchmarks, ours vs paper: es 58.0 vs 75.0, avg 51.0 vs 63.0;
    ours is 14.5 points below the paper on average. Spearman rank correlation of these 2 methods' means,
    ours vs paper: 1.00 (1: the paper's ordering carries over). Best mean of ours: es (58.0).
    """
    ours = accuracy_matrix(data, metric)
    ref = _paper_of(paper)
    text = f"{metric} (%) of {len(ours)} models on {ours.shape[1]} benchmarks"
    best = ours.mean(axis=1).dropna()
    tail = f" Best mean of ours: {method_label(best.idxmax())} ({best.max():.1f})." if len(best) else ""
    if ref is None:
        return text + "." + tail
    theirs = paper_matrix(ref, list(ours.index), list(ours.columns), metric)
    both = theirs.notna() & ours.notna()
    have = [m for m in ours.index if both.loc[m].any()]
    if not have:
        return text + "; the paper reports none of these methods on these benchmarks." + tail
    # means over the benchmarks where both have a value, so the comparison is like for like
    mine = pd.Series({m: ours.loc[m][both.loc[m]].mean() for m in have})
    pap = pd.Series({m: theirs.loc[m][both.loc[m]].mean() for m in have})
    gap = float((mine - pap).mean())
    means = ", ".join(f"{method_label(m)} {mine[m]:.1f} vs {pap[m]:.1f}" for m in have)
    text += (f" (left), beside the paper's values for the {len(have)} of them it reports (right), on one colour "
             f"scale. Mean over the benchmarks, ours vs paper: {means}; ours is {abs(gap):.1f} points "
             f"{'below' if gap < 0 else 'above'} the paper on average.")
    if len(have) >= 2:
        rho = float(np.corrcoef(mine.rank(), pap.rank())[0, 1])
        text += (f" Spearman rank correlation of these {len(have)} methods' means, ours vs paper: {rho:.2f} "
                 "(1: the paper's ordering carries over).")
    return text + tail


# --------------------------------------------------------------------------- retention bars
def _merged(table: pd.DataFrame, methods) -> list[str]:
    return list(methods) if methods is not None else [
        m for m in dict.fromkeys(table["method"]) if m != "base" and not str(m).startswith("specialist")]


def _modalities(table: pd.DataFrame) -> list[str]:  # "mean" last
    return sorted(dict.fromkeys(table["modality"]), key=lambda m: m == "mean")


def retention_bars(table: pd.DataFrame, methods: list[str] | None = None, title: str = ""):
    """Retained fraction per modality for every merged model: grouped bars with their CIs.

    ``table``: ``retention.retention_table`` rows (``method, modality, retained, lo, hi``); ``methods``: the
    models drawn, default all but the base and the specialists. Returns a Figure: one group per model, one
    bar per modality (``plots.MODALITY_COLORS``, ``mean`` last), a whisker per bar with a CI (``gid="ci"``),
    lines at 0 (base, ``gid="zero"``) and 1 (specialist).

    >>> t = pd.DataFrame({"method": ["base", "es", "es", "avg", "avg"], "modality": ["cell", "cell", "mean"] * 1 +
    ...                   ["cell", "mean"], "retained": [0.0, 0.5, 0.4, 0.2, 0.1], "lo": [0.0, 0.4, 0.3, 0.1, 0.0],
    ...                   "hi": [0.0, 0.6, 0.5, 0.3, 0.2]})
    >>> fig = retention_bars(t)
    >>> len(fig.axes[0].patches), len(next(c for c in fig.axes[0].collections if c.get_gid() == "ci").get_segments())
    (4, 4)
    >>> plt.close(fig)
    """
    merged, modalities = _merged(table, methods), _modalities(table)
    fig, ax = plt.subplots(figsize=(max(7.0, 0.3 * len(merged) * len(modalities) + 2), 4))
    width = 0.8 / max(1, len(modalities))
    xs, los, his = [], [], []
    for j, m in enumerate(modalities):
        part = table[table["modality"] == m].drop_duplicates("method").set_index("method").reindex(merged)
        x = np.arange(len(merged)) + (j - (len(modalities) - 1) / 2) * width
        ax.bar(x, part["retained"], width, label=m, color=MODALITY_COLORS.get(m, "#444444"),
               edgecolor="white", lw=0.5)
        ok = part[["lo", "hi"]].notna().all(axis=1).to_numpy()
        xs += list(x[ok]); los += list(part["lo"][ok]); his += list(part["hi"][ok])  # noqa: E702
    ax.vlines(xs, los, his, color="k", lw=0.9, gid="ci")
    ax.axhline(0, color="k", lw=0.8, gid="zero")
    ax.axhline(1, color="k", lw=0.8, ls="--", gid="specialist")
    ax.set_xticks(np.arange(len(merged)), [method_label(m) for m in merged], rotation=30, ha="right")
    _method_squares(ax, list(np.arange(len(merged))), merged, axis="x")
    ax.set_ylabel("retained fraction (1 = specialist, 0 = base)")
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def retention_caption(table: pd.DataFrame, methods: list[str] | None = None, a: str = "es",
                      level: float = 0.95) -> str:
    """What ``retention_bars`` shows: the convention, the best model, ``a``'s rank, CIs against 0 and 1.

    >>> t = pd.DataFrame({"method": ["es", "es", "avg", "avg"], "modality": ["cell", "mean"] * 2,
    ...                   "retained": [0.5, 0.4, 0.2, 0.1], "lo": [0.4, 0.3, -0.1, -0.2], "hi": [0.6, 0.5, 0.3, 0.2]})
    >>> print(retention_caption(t))  # doctest: +NORMALIZE_WHITESPACE
    Retained fraction R of each specialist's held-out skill for 2 merged models on 1 modality (+ their mean),
    95% paired-bootstrap CIs. R = (L_merged - L_base) / (L_specialist - L_base) on answer NLL: 1 = as good as
    the specialist, 0 = no better than the base. This is the 'normalised performance' of task arithmetic and
    TIES-Merging (merged accuracy over the fine-tuned model's), with the base as zero because an NLL has none;
    it is not a share of accuracy. Highest mean: es 0.40 [0.30, 0.50]; es ranks 1 of 2. Of the 2 per-modality
    CIs, 1 lie above 0 (some skill kept), 0 below 0 (worse than the base), 0 reach 1 (as good as the
    specialist).
    """
    merged, modalities = _merged(table, methods), _modalities(table)
    per = [m for m in modalities if m != "mean"]
    rows = table[table["method"].isin(merged) & table["modality"].isin(per)].dropna(subset=["lo", "hi"])
    text = (f"Retained fraction R of each specialist's held-out skill for {len(merged)} merged models on "
            f"{len(per)} modalit{'y' if len(per) == 1 else 'ies'}{' (+ their mean)' if 'mean' in modalities else ''}, "
            f"{level:.0%} paired-bootstrap CIs. R = (L_merged - L_base) / (L_specialist - L_base) on answer NLL: "
            "1 = as good as the specialist, 0 = no better than the base. This is the 'normalised performance' of "
            "task arithmetic and TIES-Merging (merged accuracy over the fine-tuned model's), with the base as zero "
            "because an NLL has none; it is not a share of accuracy.")
    mean = table[(table["modality"] == "mean") & table["method"].isin(merged)].drop_duplicates("method")
    mean = mean.set_index("method").dropna(subset=["retained"])
    if len(mean):
        top = mean["retained"].idxmax()
        text += f" Highest mean: {method_label(top)} {mean.loc[top, 'retained']:.2f} " \
                f"[{mean.loc[top, 'lo']:.2f}, {mean.loc[top, 'hi']:.2f}]"
        if a in mean.index:
            rank = int((mean["retained"] > mean.loc[a, "retained"]).sum()) + 1
            text += f"; {method_label(a)} ranks {rank} of {len(mean)}"
        text += "."
    text += (f" Of the {len(rows)} per-modality CIs, {int((rows['lo'] > 0).sum())} lie above 0 (some skill kept), "
             f"{int((rows['hi'] < 0).sum())} below 0 (worse than the base), {int((rows['hi'] >= 1).sum())} reach 1 "
             "(as good as the specialist).")
    return text
