"""esmerge.report.es_ablation: the book's paper-vs-code tables from hand-made result files."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from esmerge.errors import InputError
from esmerge.report.es_ablation import ABLATION_COLUMNS, ablation_table, ci_text, differences_table


def _ablation_csv(path, rows):
    pd.DataFrame(rows, columns=list(ABLATION_COLUMNS)).to_csv(path, index=False)
    return path


ROWS = [
    # variant, modality, retained, lo, hi, diff, diff_lo, diff_hi, n
    ("es-code", "molecule", 0.3987, 0.3894, 0.4075, -0.0069, -0.0120, -0.0020, 200),
    ("es-code", "mean", 0.5829, 0.5758, 0.5903, -0.0226, -0.0301, -0.0152, 600),
    ("es-paper", "molecule", 0.4056, 0.3966, 0.4139, 0.0, 0.0, 0.0, 200),
    ("es-paper", "mean", 0.6055, 0.5983, 0.6127, 0.0, 0.0, 0.0, 600),
    ("es-own", "molecule", 0.3853, 0.3763, 0.3938, -0.0202, -0.0260, -0.0150, 200),
    ("es-own", "mean", 0.5967, 0.5895, 0.6040, -0.0088, -0.0120, -0.0050, 600),
]


def test_ablation_table_puts_the_reference_first_and_formats_cis(tmp_path):
    table = ablation_table(_ablation_csv(tmp_path / "a.csv", ROWS))
    assert table["variant"].tolist() == ["es-paper", "es-code", "es-own"]
    code = table.set_index("variant").loc["es-code"]
    assert code["retained (mean)"] == "0.583 [0.576, 0.590]"
    assert code["molecule"] == "0.399 [0.389, 0.407]"
    assert code["Δ mean vs es-paper [paired 95% CI]"] == "-0.023 [-0.030, -0.015]"
    assert table.set_index("variant").loc["es-paper", "Δ mean vs es-paper [paired 95% CI]"] == "reference"
    assert "own-modality" in table.set_index("variant").loc["es-own", "setting"]


def test_ablation_table_all_diffs_adds_one_paired_column_per_modality(tmp_path):
    table = ablation_table(_ablation_csv(tmp_path / "a.csv", ROWS), diffs="all")
    assert table.set_index("variant").loc["es-own", "Δ molecule vs es-paper [paired 95% CI]"] == \
        "-0.020 [-0.026, -0.015]"
    assert list(table.columns).count("molecule") == 1


def test_a_positive_difference_keeps_its_sign_and_a_nan_ci_says_so():
    assert ci_text(0.0123, 0.001, 0.02, signed=True) == "+0.012 [+0.001, +0.020]"
    assert ci_text(0.1, float("nan"), 0.2) == "0.100 [n/a]"


def test_a_missing_file_names_it_and_the_command(tmp_path):
    with pytest.raises(InputError, match=r"nope\.csv: not found; make it with python benchmarks/es_code_ablation"):
        ablation_table(tmp_path / "nope.csv")
    with pytest.raises(InputError, match=r"es_code_diffs.py --scale cpu"):
        differences_table(tmp_path / "nope.json")


def test_missing_columns_or_reference_are_refused(tmp_path):
    path = tmp_path / "old.csv"
    pd.DataFrame(ROWS, columns=list(ABLATION_COLUMNS)).drop(columns=["diff_lo"]).to_csv(path, index=False)
    with pytest.raises(InputError, match=r"old\.csv: missing columns \['diff_lo'\]"):
        ablation_table(path)
    no_ref = _ablation_csv(tmp_path / "noref.csv", [r for r in ROWS if r[0] != "es-paper"])
    with pytest.raises(InputError, match="no 'es-paper' rows"):
        ablation_table(no_ref)
    with pytest.raises(InputError, match="diffs must be"):
        ablation_table(_ablation_csv(tmp_path / "a.csv", ROWS), diffs="some")


def test_differences_table_formats_alpha_blocks_and_beta_shares(tmp_path):
    rows = [{"point": 1, "difference": "own", "option": "score_modalities='own'", "on": "beta",
             "mean_abs": 0.031, "max_abs": 0.97, "top_changed": 0.125, "n_units": 8},
            {"point": "6a", "difference": "other weight", "option": "other_weight=1.0", "on": "alpha",
             "mean_abs": 0.0, "max_abs": 0.0, "top_changed": 0, "n_units": 30, "note": "identical"},
            {"point": "6d", "difference": "float32", "option": "none", "on": "weights",
             "mean_abs": 1.5e-9, "max_abs": 6.04e-8, "top_changed": 0, "n_units": 5}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": rows}))
    table = differences_table(path)
    assert table["#"].tolist() == ["1", "6a", "6d"]
    assert table["top specialist changes"].tolist() == ["12 % of elements", "0 of 30 blocks", "—"]
    assert table["mean |Δ|"].tolist() == ["0.031", "0", "1.5e-09"]
    assert table["max |Δ|"].tolist() == ["0.97", "0", "6e-08"]
    assert table.loc[1, "note"] == "identical" and table.loc[0, "note"] == ""


def test_differences_table_refuses_a_row_without_its_measures(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": [{"point": "1", "on": "beta"}]}))
    with pytest.raises(InputError, match=r"row 0 lacks \['difference', 'option', 'mean_abs'"):
        differences_table(path)
    path.write_text("[1, 2]")
    with pytest.raises(InputError, match="not a results file"):
        differences_table(path)
