"""esmerge.report.figures: forest plots of the registers, the accuracy heatmap, retention bars, and their captions."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from test_data import needs_reference  # noqa: E402

from esmerge.data.benchmarks import BENCHMARK_NAMES  # noqa: E402
from esmerge.plots import MODALITY_COLORS  # noqa: E402
from esmerge.report import figures  # noqa: E402
from esmerge.report.paper_tables import PAPER_DATASET  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _by_gid(ax, gid, kind="collections"):
    return [a for a in getattr(ax, kind) if a.get_gid() == gid]


def _accuracy_register():
    """Three claims: one resolved above 0 (Holm p 0.01), one straddling 0, one not measured; AUROC on two."""
    return pd.DataFrame({
        "claim": ["es beats avg", "es beats ties", "es beats ls-merge"],
        "ours": [3.0, -1.0, np.nan], "lo": [1.0, -4.0, np.nan], "hi": [5.0, 2.0, np.nan],
        "p_holm": [0.01, 0.6, np.nan], "paper": [2.5, 6.0, 1.0],
        "verdict": ["supported", "inconclusive", "not measured"],
        "auroc_diff": [4.0, -6.0, np.nan], "auroc_lo": [-1.0, -9.0, np.nan], "auroc_hi": [8.0, -2.0, np.nan],
        "auroc_vs": ["avg", "ties", "-"], "auroc_verdict": ["inconclusive", "not supported", "not measured"]})


def _retention_register():
    """retention.retention_claims' shape: the head row (smallest margin), then one row per baseline."""
    return pd.DataFrame({
        "claim": ["es retains more than every baseline", "es retains more than avg", "es retains more than ties"],
        "a": ["es"] * 3, "b": ["every baseline", "avg", "ties"], "paper": [np.nan] * 3,
        "ours": [-0.2, 0.1, -0.2], "lo": [-0.3, 0.05, -0.3], "hi": [-0.1, 0.15, -0.1],
        "verdict": ["not supported", "supported", "not supported"]})


def test_forest_plot_has_a_panel_per_family_with_whiskers_zero_line_and_holm_p():
    fig = figures.forest_plot({"accuracy": _accuracy_register(), "retention": _retention_register()})
    acc, auroc, ret = fig.axes
    assert [len(ax.get_yticks()) for ax in fig.axes] == [2, 2, 3]  # the unmeasured claim is left out
    # CI whiskers at the given positions, top row first
    segments = _by_gid(acc, "ci")[0].get_segments()
    assert [tuple(map(tuple, s)) for s in segments] == [((1.0, 1.0), (5.0, 1.0)), ((-4.0, 0.0), (2.0, 0.0))]
    ret_segments = _by_gid(ret, "ci")[0].get_segments()
    assert [(s[0][0], s[1][0]) for s in ret_segments] == [(-0.3, -0.1), (0.05, 0.15), (-0.3, -0.1)]
    # the zero line, on every panel
    for ax in fig.axes:
        (zero,) = _by_gid(ax, "zero", "lines")
        assert list(zero.get_xdata()) == [0, 0]
    # Holm p where the register has it (accuracy only), the paper's margin as a tick
    texts = [t.get_text() for t in _by_gid(acc, "p_holm", "texts")]
    assert texts == ["p=0.010", "p=0.600"] and not _by_gid(auroc, "p_holm", "texts")
    assert _by_gid(acc, "paper")[0].get_offsets()[:, 0].tolist() == [2.5, 6.0]
    # markers coloured by verdict
    colors = [to_hex(c) for c in _by_gid(auroc, "estimate")[0].get_facecolors()]
    assert colors == [to_hex(figures.VERDICT_COLORS["inconclusive"]), to_hex(figures.VERDICT_COLORS["not supported"])]
    assert "1 of 2 CIs exclude 0" in acc.get_title("left") and "3 of 3 CIs exclude 0" in ret.get_title("left")


def test_forest_caption_states_the_counts_per_family():
    text = figures.forest_caption({"accuracy": _accuracy_register(), "retention": _retention_register()})
    assert "accuracy: 1 of 2 CIs exclude 0 (1 above, 0 below); 1 of 2 Holm-adjusted p < 0.05" in text
    assert "the paper's margin lies inside our CI on 1 of 2" in text  # 2.5 inside [1, 5]; 6.0 outside [-4, 2]
    assert "1 not measured" in text
    assert "AUROC: 1 of 2 CIs exclude 0 (0 above, 1 below)" in text
    assert "retention: 3 of 3 CIs exclude 0 (1 above, 2 below)" in text
    assert "2 margins are resolved in the claimed direction and 3 against it" in text


def test_a_ci_touching_zero_does_not_exclude_it_and_a_plain_register_is_one_family():
    reg = pd.DataFrame({"claim": ["x"], "ours": [1.0], "lo": [0.0], "hi": [2.0], "verdict": ["inconclusive"]})
    rows = figures.forest_rows(reg)
    assert rows["family"].tolist() == ["accuracy"] and np.isnan(rows["p_holm"][0])
    assert "accuracy: 0 of 1 CIs exclude 0" in figures.forest_caption(reg)
    assert figures.forest_rows(_retention_register())["family"].unique().tolist() == ["retention"]
    assert figures.forest_rows(_retention_register())["label"][1] == "es vs avg"


def _per_benchmark(methods=("base", "avg", "es")):
    """evaluate.summary's shape: accuracy = 40 + 2 * benchmark index + 5 * method index."""
    return pd.DataFrame([{"method": m, "benchmark": b, "accuracy": 40.0 + 2 * j + 5 * i}
                         for i, m in enumerate(methods) for j, b in enumerate(BENCHMARK_NAMES)])


def _paper(methods=("avg", "es")):
    """paper_results' shape for two methods (Tables 1-2), each 20 points above ours, plus an Avg. row."""
    rows = [{"table": "Table 1" if j < 5 else "Table 2", "method": m, "paper_name": m,
             "dataset": PAPER_DATASET[b], "metric": "accuracy", "value": 60.0 + 2 * j + 5 * (i + 1)}
            for i, m in enumerate(methods) for j, b in enumerate(BENCHMARK_NAMES)]
    rows.append({"table": "Table 1", "method": "es", "paper_name": "es", "dataset": "Avg. Mol-Prot",
                 "metric": "accuracy", "value": 99.0})
    return pd.DataFrame(rows)


def test_accuracy_heatmap_annotates_every_cell_beside_the_papers_values():
    fig = figures.accuracy_heatmap(_per_benchmark(), _paper())
    ours, paper = fig.axes[:2]
    ours_cells, paper_cells = _by_gid(ours, "cell", "texts"), _by_gid(paper, "cell", "texts")
    assert len(ours_cells) == 3 * 13 and len(paper_cells) == 2 * 13  # the paper has no "base" row here
    assert [t.get_text() for t in ours_cells[:3]] == ["40", "42", "44"]
    assert ours_cells[13].get_position() == (0, 1) and ours_cells[13].get_text() == "45"  # avg, BindingDB
    assert paper_cells[0].get_position() == (0, 1) and paper_cells[0].get_text() == "65"  # avg row 1, not base
    assert [t.get_text() for t in ours.get_yticklabels()] == ["base", "avg", "es"]
    assert [t.get_text() for t in ours.get_xticklabels()] == [PAPER_DATASET[b] for b in BENCHMARK_NAMES]
    assert len(figures.accuracy_heatmap(_per_benchmark(), paper=False).axes) == 2  # ours and its colour bar


def test_accuracy_matrix_reads_results_table_rows_and_drops_group_averages():
    per = _per_benchmark()
    long = per.assign(dataset=per["benchmark"].map(PAPER_DATASET), metric="accuracy", ours=per["accuracy"])
    long = pd.concat([long, pd.DataFrame([{"method": "es", "dataset": "Avg. Mol-Prot", "metric": "accuracy",
                                           "ours": 1.0}])], ignore_index=True)
    pd.testing.assert_frame_equal(figures.accuracy_matrix(long.drop(columns=["benchmark", "accuracy"])),
                                  figures.accuracy_matrix(per), check_names=False)


def test_heatmap_caption_states_the_gap_and_the_rank_correlation():
    text = figures.heatmap_caption(_per_benchmark(), _paper())
    assert "accuracy (%) of 3 models on 13 benchmarks" in text and "the 2 of them it reports" in text
    assert "ours is 20.0 points below the paper on average" in text
    assert "Spearman rank correlation of these 2 methods' means, ours vs paper: 1.00" in text
    assert "Best mean of ours: es (62.0)" in text


@needs_reference
def test_heatmap_reads_the_papers_own_values():
    fig = figures.accuracy_heatmap(_per_benchmark(), paper=True)
    paper = figures.paper_results()
    value = paper[(paper["table"] == "Table 1") & (paper["method"] == "es") & (paper["dataset"] == "BindingDB")
                  & (paper["metric"] == "accuracy")]["value"].item()
    cell = next(t for t in _by_gid(fig.axes[1], "cell", "texts") if t.get_position() == (0, 2))
    assert cell.get_text() == f"{value:.0f}"


def _retention_table():
    """retention_table's shape: base and a specialist (left out), two merged models, three modalities + mean."""
    rows = []
    for method, base in (("base", 0.0), ("specialist-cell", 1.0), ("avg", 0.2), ("es", 0.5)):
        for k, modality in enumerate(("molecule", "protein", "cell", "mean")):
            value = base + 0.1 * k
            rows.append({"method": method, "modality": modality, "retained": value, "lo": value - 0.15,
                         "hi": value + 0.6 * (method == "es" and modality == "cell") + 0.05})
    table = pd.DataFrame(rows)
    table.loc[(table["method"] == "avg") & (table["modality"] == "protein"), ["lo", "hi"]] = np.nan
    return table


def test_retention_bars_group_every_merged_model_with_ci_whiskers():
    fig = figures.retention_bars(_retention_table())
    (ax,) = fig.axes
    assert len(ax.patches) == 2 * 4  # avg and es, three modalities and their mean
    assert [to_hex(p.get_facecolor()) for p in ax.patches[::2][:3]] == [
        to_hex(MODALITY_COLORS[m]) for m in ("molecule", "protein", "cell")]
    segments = _by_gid(ax, "ci")[0].get_segments()
    assert len(segments) == 7  # avg's protein CI is missing, so no whisker there
    centres = {round(p.get_x() + p.get_width() / 2, 6): p.get_height() for p in ax.patches}
    for (x0, lo), (x1, hi) in segments:
        assert x0 == x1 and lo < centres[round(x0, 6)] < hi
    first = segments[0]
    assert first[0][1] == pytest.approx(0.2 - 0.15) and first[1][1] == pytest.approx(0.25)  # avg, molecule
    assert list(_by_gid(ax, "zero", "lines")[0].get_ydata()) == [0, 0]
    assert list(_by_gid(ax, "specialist", "lines")[0].get_ydata()) == [1, 1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["avg", "es"]


def test_retention_caption_states_the_convention_and_the_counts():
    text = figures.retention_caption(_retention_table())
    assert "2 merged models on 3 modalities (+ their mean)" in text
    assert "'normalised performance'" in text and "with the base as zero" in text
    assert "Highest mean: es 0.80 [0.65, 0.85]; es ranks 1 of 2" in text
    # per-modality CIs (5 measured): avg molecule [0.05, 0.25], avg cell [0.25, 0.45], es [0.35, 0.55],
    # [0.45, 0.65], es cell [0.55, 1.35] -> all above 0, none below, one reaches 1
    assert "Of the 5 per-modality CIs, 5 lie above 0 (some skill kept), 0 below 0" in text
    assert "1 reach 1" in text
