"""The data chapter's tables, on hand-made frames and a one-file manifest."""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from esmerge.data import files, tables


def _frame(n_read, dropped, **columns):
    df = pd.DataFrame(columns)
    df.attrs = {"n_read": n_read, "dropped": dropped}
    return df


def test_manifest_and_citation_tables(tmp_path, monkeypatch):
    content = b"hello\n"
    entries = {p: files.ManifestEntry(path=p, sha256=hashlib.sha256(content).hexdigest(), bytes=len(content),
                                     repo=repo, commit="0" * 40, url=None, licence="MIT", source="t",
                                     tasks=("a", "b"), citation=f"cite {repo}")
               for p, repo in (("x/one.txt", "o/r1"), ("x/two.txt", "o/r1"), ("x/three.txt", "o/r2"))}
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "one.txt").write_bytes(content)
    (tmp_path / "x" / "two.txt").write_bytes(b"other!\n")
    monkeypatch.setenv("ESMERGE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(files, "manifest", lambda: entries)
    table = tables.manifest_table()
    assert table["status"].tolist() == ["ok", "corrupt", "missing"]
    assert table.columns.tolist() == ["file", "bytes", "status", "licence", "use", "source"]
    assert table["use"].iloc[0] == "a, b"
    assert tables.citations_table().values.tolist() == [["o/r1", "cite o/r1"], ["o/r2", "cite o/r2"]]


def test_corpus_and_benchmark_tables():
    corpora = {"A": _frame(5, {"empty description": 2}, x=[1, 2, 3]), "B": _frame(1, {}, x=[1])}
    assert tables.corpus_table(corpora).values.tolist() == [["A", 5, 3, "2 empty description"],
                                                                 ["B", 1, 1, "none"]]
    frames = {"Human": _frame(6, {"invalid SMILES": 1, "duplicate instance": 1}, y=[1, 0, 0, 1]),
              "GDSC2": _frame(4, {}, y=[1, 0, 1, 0])}
    counts = tables.benchmark_counts(frames).set_index("benchmark")
    assert counts.loc["Human"].tolist() == ["Mol-Prot", 6, 4, 2, "Interacts / Does not interact"]
    assert counts.loc["GDSC2", "labels (1 / 0)"] == "Sensitive / Resistant"
    assert tables.dropped_rows(frames).values.tolist() == [["Human", "invalid SMILES", 1],
                                                                ["Human", "duplicate instance", 1]]


def test_pool_balance_scales_small_benchmarks_down():
    big = _frame(100, {}, y=[1] * 30 + [0] * 70)
    small = _frame(10, {}, y=[1] * 5 + [0] * 5)
    pools = tables.pool_balance({"big": big, "small": small}, n_eval=20, n_context=30, seed=1).set_index("benchmark")
    assert pools.loc["big", ["n_eval", "n_context"]].tolist() == [20, 30]
    assert (pools.loc["big", "positive fraction (eval)"] == 0.3
            and pools.loc["big", "positive fraction (context)"] == 0.3)
    assert pools.loc["small", ["n_eval", "n_context"]].tolist() == [4, 6]  # 10 rows for 50 asked: scaled by 1/5
    assert np.isclose(pools.loc["small", "positive fraction (all)"], 0.5)
