"""The findings page cannot drop what a verdict rests on: every caveat value a register carries is
on the page, and a register without caveat columns is marked (or refused), never silently shown."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from esmerge import report
from esmerge.data.benchmarks import BENCHMARK_NAMES
from esmerge.evaluate import retention as R
from esmerge.evaluate.caveats import CAVEAT_COLUMNS
from esmerge.regen import findings

ACCURACY = (
    "claim,source,paper,datasets,n,seeds,ours,lo,hi,n_compared,verdict,auroc_diff,auroc_lo,auroc_hi,"
    "auroc_verdict,caveats,would_change,detail\n"
    "ES beats avg on Mol-Prot,§5.2,1.5,3/3,96,0,-2.0,-4.5,0.5,7,inconclusive,-3.7,-10.3,1.9,inconclusive,"
    "\"tiny base LLM; our random splits, not the paper's; oracle routing: emr\","
    "\"a CI lower bound above 0 vs every competitor would support it (lowest now -4.5, vs ties)\",vs avg: -2.0\n"
    "ES is at least as good as Mol-LLaMA,§5.3,2.0,3/3,96,\"0, 1, 2\",0.0,-7.3,8.3,1,"
    "inconclusive (no margin declared),-9.3,-21.2,2.4,inconclusive (no margin declared),"
    "\"tiny base LLM; below the paper's budget: adamerging (10 steps, paper 500)\","
    "\"a non-inferiority margin above 7.3 points declared before the run (the CI vs mol starts at -7.3)\",x\n")


def _values(path):
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(c, row[c]) for row in rows for c in CAVEAT_COLUMNS if c in row]


def _write(tmp_path, name="accuracy_claims.csv", text=ACCURACY, stem="08_claims"):
    folder = tmp_path / "runs" / stem
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


def _assert_every_caveat_on_the_page(text, path):
    values = _values(path)
    assert values, "the register has no caveat values to check"
    for column, value in values:
        assert " ".join(value.split()) in text, f"{path.name}: {column} value {value!r} is not on the page"


def test_every_caveat_value_of_a_register_is_on_the_page(tmp_path):
    path = _write(tmp_path)
    text = findings.findings_page(tmp_path / "runs", "cpu")
    _assert_every_caveat_on_the_page(text, path)
    header = next(line for line in text.splitlines() if line.startswith("| claim"))
    for column in ("n", "seeds", "caveats", "would change the verdict", "AUROC diff. [95 % CI]"):
        assert f"| {column} |" in header
    assert "| -3.7 [-10.3, 1.9] |" in text  # the AUROC difference beside accuracy, with its CI
    assert "No caveats recorded" not in text and "carry no caveats" not in text


def test_the_caveat_columns_cannot_be_skipped(tmp_path, monkeypatch):
    path = _write(tmp_path)
    monkeypatch.setattr(findings, "SKIPPED_COLUMNS", ("detail", *CAVEAT_COLUMNS, "auroc_verdict"))
    text = findings.findings_page(tmp_path / "runs", "cpu")
    _assert_every_caveat_on_the_page(text, path)
    header = next(line for line in text.splitlines() if line.startswith("| claim"))
    assert "AUROC verdict" not in header and "| caveats |" in header  # other columns may be skipped


def test_registers_the_report_writes_keep_every_caveat_on_the_page(tmp_path):
    y = np.array([0, 1] * 8)
    run = {"example_ids": [str(i) for i in range(16)], "y": y.tolist(), "pred": y.tolist(),
           "scores": np.stack([np.zeros(16), y], 1).tolist()}
    results = {m: {b: {**run, "pred": (1 - y if m == "base" else y).tolist()} for b in BENCHMARK_NAMES}
               for m in ("es", "base", "emr", "adamerging")}
    register = report.claims(results, n_resamples=50)
    paths = [_write(tmp_path)]
    register.to_csv(paths[0], index=False)
    rng = np.random.default_rng(0)
    tokens = {m: rng.integers(5, 20, 50) for m in ("molecule", "protein", "cell")}
    nlls = {m: {"base": 2.0 * t, f"specialist-{m}": 1.0 * t, "es": 1.5 * t + rng.random(50), "emr": 1.2 * t}
            for m, t in tokens.items()}
    paths.append(_write(tmp_path, "retention_claims.csv", stem="09_retention"))
    R.retention_claims(R.resampled_retention(nlls, tokens, n_resamples=50)).to_csv(paths[1], index=False)
    text = findings.findings_page(tmp_path / "runs", "cpu")
    for path in paths:
        _assert_every_caveat_on_the_page(text, path)
    assert "oracle routing: emr" in text and "No caveats recorded" not in text


def test_a_register_without_caveat_columns_is_marked_or_refused(tmp_path):
    _write(tmp_path)
    _write(tmp_path, "representation_claims.csv", "claim,source,evidence,verdict\nmolecule moves most,Fig. 1,e,holds\n")
    text = findings.findings_page(tmp_path / "runs", "cpu")
    section = text[text.index("## Representation claims"):text.index("## Accuracy claims")]
    assert "**No caveats recorded:** this register has no `n`, `seeds`, `caveats`, `would_change` column(s)" in section
    assert "1 of 2 registers carry no caveats: Representation claims." in text
    accuracy = text[text.index("## Accuracy claims"):]
    assert "No caveats recorded" not in accuracy
    with pytest.raises(findings.CaveatError, match="representation claims|Representation claims"):
        findings.findings_page(tmp_path / "runs", "cpu", strict=True)
    assert findings.missing_caveat_columns([{"claim": "c", "verdict": "holds", "caveats": "x"}]) == \
        ["n", "seeds", "would_change"]


def test_an_empty_caveat_cell_is_shown_as_not_recorded(tmp_path):
    _write(tmp_path, text="claim,verdict,n,seeds,caveats,would_change\nc,holds,,0,tiny base LLM,\n")
    text = findings.findings_page(tmp_path / "runs", "cpu")
    assert "| c | holds | *not recorded* | 0 | tiny base LLM | *not recorded* |" in text
