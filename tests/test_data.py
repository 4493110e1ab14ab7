"""Data layer: loaders, pools, restricted unpickler, manifest verification and the data CLI."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from esmerge.cli import main as cli_main
from esmerge.data import benchmark_pools, benchmarks, files, sources
from esmerge.errors import EsmergeError


def _missing_data() -> str:
    """Why the upstream data cannot be used here ("" when every manifest file resolves and matches)."""
    try:
        bad = [s.path for s in files.verify() if s.status != "ok"]
    except files.DataError as err:  # ESMERGE_DATA_DIR is not a folder
        return str(err)
    if not bad:
        return ""
    named = ", ".join(bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")
    return (f"{len(bad)} upstream data files missing or corrupt ({named}): set ESMERGE_DATA_DIR to a folder "
            "holding them or run `esmerge data fetch` with network access")


# Offline without the data, the tests that read it skip naming what is missing (`make test` fetches
# the data first and stops with that line instead).
MISSING_DATA = _missing_data()
needs_data = pytest.mark.skipif(bool(MISSING_DATA), reason=MISSING_DATA)


def _missing_reference() -> str:
    from esmerge.report import reference_dir

    path = reference_dir() / "paper_results.csv"
    return "" if path.is_file() else (f"{path} not found: put the paper's reference values there "
                                      "(../shared/reference) or set ESMERGE_REFERENCE_DIR to their folder")


# The paper's numbers are read in place from ../shared/reference, never copied here.
MISSING_REFERENCE = _missing_reference()
needs_reference = pytest.mark.skipif(bool(MISSING_REFERENCE), reason=MISSING_REFERENCE)


# --------------------------------------------------------------------------- validation helpers

def test_valid_smiles_and_protein_on_known_inputs():
    assert sources.valid_smiles("CCO")
    assert sources.valid_smiles("c1ccccc1")
    assert not sources.valid_smiles("C1CC")          # unclosed ring
    assert not sources.valid_smiles("C(C)(C)(C)(C)C")  # pentavalent carbon fails sanitisation
    assert not sources.valid_smiles("")
    assert sources.valid_protein("MKTAYIAKQR")
    assert sources.valid_protein("MKUX")  # selenocysteine and unknown are amino-acid codes
    assert not sources.valid_protein("")
    assert not sources.valid_protein("MKT AYI")
    assert not sources.valid_protein("ACGT1")


def test_read_gmt_roundtrip(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text("A_LUNG\t\tG1\tG2\tG3\nB_SKIN\tdesc\tG9\t\n")
    assert sources.read_gmt(path) == {"A_LUNG": ["G1", "G2", "G3"], "B_SKIN": ["G9"]}


# --------------------------------------------------------------------------- training corpora

@needs_data
@pytest.mark.parametrize("split,n_file_rows", [("test", 3300), ("validation", 3301)])
def test_load_chebi20(split, n_file_rows):
    df = sources.load_chebi20(split)
    assert list(df.columns) == ["cid", "smiles", "description"]
    assert df.attrs["n_read"] == n_file_rows
    assert len(df) == n_file_rows - sum(df.attrs["dropped"].values())
    assert len(df) > 3000 and df["cid"].is_unique
    assert df["smiles"].map(sources.valid_smiles).all()
    assert df["description"].str.startswith("The molecule is").mean() > 0.9


@needs_data
def test_load_swissprot_go_joins_the_three_aspects():
    test, val = sources.load_swissprot_go("test"), sources.load_swissprot_go("val")
    assert list(test.columns) == ["accession", "sequence", "description"]
    # SOURCES.md: 6,764 unique proteins over test and val, which are disjoint.
    assert len(test) + len(val) == 6764
    assert not set(test["accession"]) & set(val["accession"])
    assert test["sequence"].map(sources.valid_protein).all()
    # P48347's molecular-function row in the mf file is "ATP binding"; it must open the description.
    row = test.set_index("accession").loc["P48347"]
    assert row["description"].startswith("Molecular function: ATP binding")
    assert row["sequence"].startswith("MENEREKQVYLAKLSEQ")
    assert test["description"].str.contains("Biological process: ").mean() > 0.5


def test_load_swissprot_go_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        sources.load_swissprot_go("train")


@needs_data
def test_load_pbmc68k_ranks_by_expression():
    import h5py

    df = sources.load_pbmc68k()
    assert list(df.columns) == ["cell_id", "genes", "cell_type"]
    assert len(df) == 700 and df["cell_type"].nunique() == 10
    # Recompute the first cell's top gene straight from the CSR arrays.
    with h5py.File(files.data_path(sources.PBMC68K)) as fh:
        start, stop = fh["raw/X/indptr"][0:2]
        values = fh["raw/X/data"][start:stop]
        indices = fh["raw/X/indices"][start:stop]
        names = [n.decode() if isinstance(n, bytes) else n for n in fh["raw/var/index"][()]]
    assert df["genes"].iloc[0][0] == names[indices[np.argmax(values)]]
    assert len(df["genes"].iloc[0]) == int((values > 0).sum())
    assert df["genes"].map(lambda g: len(g) == len(set(g))).all()


@needs_data
def test_load_ccle_cells_joins_annotation():
    df = sources.load_ccle_cells()
    assert list(df.columns) == ["ccle_name", "depmap_id", "genes", "site", "histology"]
    assert 900 < len(df) <= 967
    assert df.attrs["dropped"]["unknown cell line (not in the DeepCDR annotation)"] == 967 - len(df)
    first = df.set_index("ccle_name").loc["NCIH810_LUNG"]
    assert first["genes"][:3] == ["CHGA", "RBFOX1", "C22ORF42"]
    assert first["site"] == "lung" and first["depmap_id"].startswith("ACH-")


# --------------------------------------------------------------------------- restricted unpickler

class _RunsShell:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _CallsEval:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


def test_safe_pickle_load_accepts_arrays_and_containers(tmp_path):
    obj = {"a": np.arange(6, dtype=np.float64).reshape(2, 3), "b": [1, "x", (2.5, None)], "c": {3, 4},
           "d": np.float32(1.5), "e": b"raw", "f": np.array(["u", "v"])}
    for protocol in (2, 3, 4, 5):
        path = tmp_path / f"ok{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        back = files.safe_pickle_load(path)
        np.testing.assert_array_equal(back["a"], obj["a"])
        assert back["b"] == obj["b"] and back["c"] == obj["c"] and back["e"] == b"raw"
        assert back["d"] == np.float32(1.5) and back["f"].tolist() == ["u", "v"]


@pytest.mark.parametrize("protocol", [2, 4])
def test_safe_pickle_load_refuses_code_execution(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = _RunsShell()
    payload.marker = marker
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(files.DataError, match=r"refused global (posix|os|nt)\.system"):
        files.safe_pickle_load(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_CallsEval(), protocol=protocol))
    with pytest.raises(files.DataError, match="refused global builtins.eval"):
        files.safe_pickle_load(path)
    path.write_bytes(pickle.dumps(pd.DataFrame({"x": [1]}), protocol=protocol))  # arbitrary classes too
    with pytest.raises(files.DataError, match="refused global pandas"):
        files.safe_pickle_load(path)


def test_safe_pickle_load_reports_garbage(tmp_path):
    path = tmp_path / "junk.pkl"
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(files.DataError, match="not a readable pickle"):
        files.safe_pickle_load(path)


@needs_data
def test_safe_pickle_load_reads_the_real_tgsa_pickles():
    ic50 = files.safe_pickle_load(files.data_path(sources.TGSA_IC50))
    assert isinstance(ic50, np.ndarray) and ic50.shape == (82833, 3)
    cells = files.safe_pickle_load(files.data_path(sources.TGSA_CELLS))
    drugs = files.safe_pickle_load(files.data_path(sources.TGSA_DRUGS))
    smiles = files.safe_pickle_load(files.data_path(sources.TGSA_SMILES))
    assert len(cells) == 580 and cells[0] == "ACH-000001"
    assert len(drugs) == 170 and set(drugs.values()) == set(smiles)


# --------------------------------------------------------------------------- benchmarks

def test_benchmark_registry_matches_the_paper():
    assert list(benchmarks.BENCHMARKS) == ["BindingDB", "BIOSNAP", "Human", "DrugComb", "GDSC2", "CYP1A2", "CYP2C19",
                                     "CYP2C9", "CYP2D6", "CYP3A4", "CYP2C9-substrate", "CYP2D6-substrate",
                                     "CYP3A4-substrate"]
    groups = pd.Series({n: s.group for n, s in benchmarks.BENCHMARKS.items()}).value_counts().to_dict()
    assert groups == {"Mol-Prot": 3, "Mol-Cell": 2, "CYP Inh.": 5, "CYP Sub.": 3}
    assert benchmarks.GROUPS["CYP Sub."] == ("CYP2C9-substrate", "CYP2D6-substrate", "CYP3A4-substrate")
    assert {s.kind for s in benchmarks.BENCHMARKS.values()} == set(benchmarks.TASKS)
    assert benchmarks.BENCHMARKS["CYP2C19"].paper_dataset == "CYP2C19 Inh."
    assert benchmarks.BENCHMARKS["GDSC2"].labels == ("Resistant", "Sensitive")
    assert benchmarks.BENCHMARKS["CYP2D6-substrate"].labels == ("Not a substrate", "Substrate")
    assert benchmarks.BENCHMARKS["CYP1A2"].labels == ("Does not inhibit", "Inhibit")
    assert benchmarks.BENCHMARKS["DrugComb"].labels == ("Antagonistic", "Synergistic")
    assert benchmarks.BENCHMARKS["Human"].labels == ("Does not interact", "Interacts")
    manifest = files.manifest()
    for spec in benchmarks.BENCHMARKS.values():
        assert all(f in manifest and f"benchmark:{spec.name}" in manifest[f].tasks for f in spec.files)


def test_gdsc2_labels_per_drug_tertiles():
    # Drug 0: ln IC50 1..6 -> tertile cuts at 2.667 and 4.333; drug 1 is drug 0 shifted by +100,
    # so a single global threshold would call every drug-1 pair resistant. Per drug it does not.
    values = np.arange(1.0, 7.0)
    rows = [[0, c, v] for c, v in enumerate(values)] + [[1, c, v + 100] for c, v in enumerate(values)]
    labels = sources.gdsc2_labels(np.array(rows))
    assert labels.tolist() == [1, 1, -1, -1, 0, 0] * 2
    with pytest.raises(ValueError, match="shape"):
        sources.gdsc2_labels(np.zeros((4, 2)))


@needs_data
@pytest.mark.parametrize("name", list(benchmarks.BENCHMARKS))
def test_load_benchmark_schema_and_labels(name):
    spec = benchmarks.BENCHMARKS[name]
    df = benchmarks.load_benchmark(name)
    assert list(df.columns) == benchmarks.BENCHMARK_COLUMNS
    assert set(df["y"]) == {0, 1}
    assert len(df) == df.attrs["n_read"] - sum(df.attrs["dropped"].values())
    assert len(df) > 600  # the smallest (CYP substrate tables) have ~670 rows upstream
    assert df["molecule"].map(sources.valid_smiles).all()
    if spec.group == "Mol-Cell":
        assert df["protein"].isna().all()
        assert df["cell_genes"].map(lambda g: 0 < len(g) <= sources.CELL_TOP_GENES).all()
        assert df["cell_id"].str.contains("_").all()  # CCLE names carry the tissue suffix
    else:
        assert df["protein"].map(sources.valid_protein).all()
        assert df["cell_id"].isna().all() and df["cell_genes"].isna().all()
    if spec.group.startswith("CYP"):
        assert df["protein"].nunique() == 1
        assert df["protein"].iloc[0] == sources.cyp_sequences()[spec.enzyme]
    assert df["molecule2"].notna().all() if name == "DrugComb" else df["molecule2"].isna().all()


@needs_data
def test_drugcomb_cell_mapping_and_drops():
    df = benchmarks.load_benchmark("DrugComb")
    # 31 O'Neil cell lines; A427 has no Enrichr CCLE gene set, LNCAP/MSTO resolve through the aliases.
    assert df["cell_id"].nunique() == 30
    assert {"LNCAPCLONEFGC_PROSTATE", "MSTO211H_PLEURA", "A375_SKIN"} <= set(df["cell_id"])
    raw = pd.read_csv(files.data_path(sources.DRUGCOMB))
    assert df.attrs["dropped"]["unknown cell line"] == int((raw["cell"] == "A427").sum())
    ccle = sources.load_ccle_cells().set_index("ccle_name")
    row = df[df["cell_id"] == "A375_SKIN"].iloc[0]
    assert row["cell_genes"] == ccle.loc["A375_SKIN", "genes"][:sources.CELL_TOP_GENES]


@needs_data
def test_gdsc2_is_balanced_per_drug():
    df = benchmarks.load_benchmark("GDSC2")
    per_drug = df.groupby("molecule")["y"].mean()
    # Tertile labels: every drug has about as many sensitive as resistant lines.
    assert per_drug.between(0.3, 0.7).mean() > 0.95
    assert df.attrs["dropped"]["ambiguous ln IC50 (middle tertile of its drug)"] > 20000


def test_load_benchmark_unknown_name():
    with pytest.raises(ValueError, match="unknown benchmark 'Tox21'"):
        benchmarks.load_benchmark("Tox21")


# --------------------------------------------------------------------------- pools

def _toy(n_pos=30, n_neg=70):
    return pd.DataFrame({"molecule": [f"C{i}" for i in range(n_pos + n_neg)],
                         "y": [1] * n_pos + [0] * n_neg}, index=np.arange(100, 100 + n_pos + n_neg))


def test_split_pools_disjoint_stratified_seeded():
    df = _toy()
    ev, ctx = benchmark_pools.split_pools(df, n_eval=20, n_context=50, seed=3)
    assert len(ev) == 20 and len(ctx) == 50
    assert not set(ev.index) & set(ctx.index)
    assert set(ev.index) | set(ctx.index) <= set(df.index)
    assert ev["y"].sum() == 6 and ctx["y"].sum() == 15  # 30 % positives in each pool
    ev2, ctx2 = benchmark_pools.split_pools(df, n_eval=20, n_context=50, seed=3)
    assert ev.index.tolist() == ev2.index.tolist() and ctx.index.tolist() == ctx2.index.tolist()
    ev3, _ = benchmark_pools.split_pools(df, n_eval=20, n_context=50, seed=4)
    assert set(ev3.index) != set(ev.index)


def test_split_pools_rounding_and_exhaustion():
    df = _toy(n_pos=3, n_neg=7)
    ev, ctx = benchmark_pools.split_pools(df, n_eval=5, n_context=5, seed=0)  # uses every row
    assert sorted(ev.index.tolist() + ctx.index.tolist()) == df.index.tolist()
    assert ev["y"].sum() in (1, 2) and ev["y"].sum() + ctx["y"].sum() == 3
    ev, _ = benchmark_pools.split_pools(df, n_eval=3, n_context=0, seed=0)
    assert ev["y"].sum() == 1  # 0.9 positives rounds to 1 (largest remainder), 2.1 negatives to 2
    with pytest.raises(ValueError, match="exceeds the 10 rows"):
        benchmark_pools.split_pools(df, n_eval=8, n_context=3)


@needs_data
def test_label_balance_counts_match_loaders():
    table = benchmarks.label_balance(["Human", "CYP2D6-substrate"])
    human = benchmarks.load_benchmark("Human")
    row = table.set_index("benchmark").loc["Human"]
    assert (row["n_pos"], row["n_neg"]) == (int(human["y"].sum()), int((human["y"] == 0).sum()))
    assert (row["n_pos"], row["n_neg"]) == (536, 664)  # DrugBAN human/random/test.csv as shipped


# --------------------------------------------------------------------------- manifest, verify, fetch

def _fake_entry(path: str, content: bytes, url: str | None = None) -> files.ManifestEntry:
    import hashlib

    return files.ManifestEntry(path=path, sha256=hashlib.sha256(content).hexdigest(), bytes=len(content),
                              repo="test/repo", commit="0" * 40, url=url, licence="MIT", source="test")


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """ESMERGE_DATA_DIR and ESMERGE_CACHE in tmp; the manifest replaced by one fake entry."""
    (tmp_path / "datadir").mkdir()
    monkeypatch.setenv("ESMERGE_DATA_DIR", str(tmp_path / "datadir"))
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ESMERGE_DATA_CACHE", raising=False)  # the Makefile sets it: the default here
    content = b"hello esmerge\n"
    entry = _fake_entry("fake/hello.txt", content)
    monkeypatch.setattr(files, "manifest", lambda: {entry.path: entry})
    return tmp_path, entry, content


def test_data_path_missing_and_corrupt_name_file_and_hash(isolated):
    tmp_path, entry, content = isolated
    with pytest.raises(files.DataError, match=f"fake/hello.txt: not found .*expected sha256 {entry.sha256}"):
        files.data_path(entry.path)
    copy = tmp_path / "datadir" / entry.path
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(content[:-1] + b"!")
    with pytest.raises(files.DataError, match=f"hello.txt: sha256 mismatch \\(expected {entry.sha256}\\)"):
        files.data_path(entry.path)
    with pytest.raises(files.DataError, match="not in the data manifest"):
        files.data_path("fake/other.txt")


def test_verify_cli_exit_codes_and_messages(isolated, capsys):
    tmp_path, entry, content = isolated
    assert cli_main(["data", "verify"]) == 1
    out, err = capsys.readouterr()
    assert "fake/hello.txt" in out and "missing" in out
    assert err.count("\n") == 1 and entry.sha256 in err and "Traceback" not in err
    copy = tmp_path / "datadir" / entry.path
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(content)
    assert cli_main(["data", "verify"]) == 0
    assert " ok " in capsys.readouterr().out
    copy.write_bytes(b"X" * len(content))  # same size, different bytes: only the hash can tell
    files._verified.cache_clear()
    assert cli_main(["data", "verify"]) == 1
    out, err = capsys.readouterr()
    assert "corrupt" in out and "corrupt copy at" in err and entry.sha256 in err and "Traceback" not in err
    assert cli_main(["data", "nonsense"]) == 2


def test_fetch_downloads_by_url_with_hash_check(isolated, monkeypatch, capsys):
    tmp_path, entry, content = isolated
    upstream = tmp_path / "upstream.txt"
    upstream.write_bytes(content)
    good = files.ManifestEntry(**{**entry.__dict__, "url": upstream.as_uri()})
    monkeypatch.setattr(files, "manifest", lambda: {good.path: good})
    assert cli_main(["data", "fetch"]) == 0
    cached = tmp_path / "cache" / "data" / good.path
    assert cached.read_bytes() == content
    assert files.data_path(good.path) == cached  # resolution now finds the cached copy
    # Upstream changed: the download is refused and nothing is left in the cache.
    upstream.write_bytes(b"tampered\n")
    cached.unlink()
    assert cli_main(["data", "fetch"]) == 1
    err = capsys.readouterr().err
    assert f"expected {good.sha256}" in err and "Traceback" not in err
    assert not cached.exists() and not list(cached.parent.glob(".*"))
    # No URL (a derived file): a clear one-line error.
    monkeypatch.setattr(files, "manifest", lambda: {entry.path: entry})
    assert cli_main(["data", "fetch"]) == 1
    assert "no download URL" in capsys.readouterr().err


@needs_data
def test_verify_reports_corrupt_copy_in_data_dir_first(tmp_path, monkeypatch, capsys):
    # ESMERGE_DATA_DIR is searched first (and alone, before the cache), so its corrupt copy must be
    # reported, not hidden by a good copy elsewhere. The folder links every other file.
    fasta = "derived/cyp_human.fasta"
    for path in files.manifest():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        if path == fasta:
            (tmp_path / path).write_bytes(files.data_path(fasta).read_bytes().replace(b"MALSQ", b"MALSA"))
        else:
            (tmp_path / path).symlink_to(files.data_path(path))
    files._verified.cache_clear()
    monkeypatch.setenv("ESMERGE_DATA_DIR", str(tmp_path))
    assert cli_main(["data", "verify"]) == 1
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line] == [line for line in err.splitlines() if fasta in line]
    assert files.manifest()[fasta].sha256 in err
    assert f"{len(files.manifest()) - 1} of {len(files.manifest())} files ok" in out
    with pytest.raises(files.DataError, match="cyp_human.fasta: sha256 mismatch"):
        files.data_path(fasta)


@needs_data
def test_python_m_esmerge_data_verify():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "esmerge", "data", "verify"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"{len(files.manifest())} of {len(files.manifest())} files ok" in done.stdout


def test_split_pools_property_over_random_sizes():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n_pos, n_neg = int(rng.integers(1, 40)), int(rng.integers(1, 40))
        df = _toy(n_pos, n_neg)
        n_eval = int(rng.integers(0, len(df) + 1))
        n_context = int(rng.integers(0, len(df) - n_eval + 1))
        ev, ctx = benchmark_pools.split_pools(df, n_eval, n_context, seed=trial)
        assert (len(ev), len(ctx)) == (n_eval, n_context)
        assert not set(ev.index) & set(ctx.index)
        p = n_pos / len(df)
        # Eval pool is within one row of proportional; context too unless eval exhausted a label.
        assert abs(ev["y"].sum() - p * n_eval) <= 1
        if n_eval + n_context <= min(n_pos, n_neg):
            assert abs(ctx["y"].sum() - p * n_context) <= 1


def test_module_doctests():
    import doctest

    for module, at_least in ((benchmarks, 4), (sources, 3)):
        result = doctest.testmod(module)
        assert result.attempted >= at_least and result.failed == 0


@needs_data
def test_derive_cyp_fasta_reproduces_the_manifest_file():
    import hashlib

    text = files.derive_cyp_fasta()
    assert hashlib.sha256(text.encode()).hexdigest() == files.manifest()[files.CYP_FASTA].sha256
    assert sources.read_fasta(files.data_path(files.CYP_FASTA)).keys() == files.CYP_ACCESSIONS.keys()


@needs_data
def test_fetch_derives_the_cyp_fasta_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path))
    monkeypatch.delenv("ESMERGE_DATA_CACHE", raising=False)
    path = files.fetch(files.manifest()[files.CYP_FASTA], force=True)
    assert path == tmp_path / "data" / files.CYP_FASTA
    assert path.read_bytes() == files.data_path(files.CYP_FASTA).read_bytes()


# --------------------------------------------------------------------------- bad input

def test_one_text_label_is_refused_naming_file_and_value(tmp_path, monkeypatch):
    """Before: a single "yes" made pandas read the column as text, and every row was dropped as non-binary."""
    path = tmp_path / "val.csv"
    path.write_text("SMILES,Protein,Y\nCCO,MKTAYIAKQR,1\nCCN,MKTAYIAKQR,yes\nCCC,MKTAYIAKQR,0\n")
    monkeypatch.setattr(sources, "data_path", lambda relpath: path)
    spec = benchmarks.BENCHMARKS["Human"]
    with pytest.raises(files.DataError,
                       match=r"^drugban/datasets/human/random/test.csv: label 'yes' \(row 1\) is text"):
        sources.raw_dti(spec, {})
    path.write_text("SMILES,Protein,Y\nCCO,MKTAYIAKQR,1\nCCN,MKTAYIAKQR,2\nCCC,MKTAYIAKQR,0\nCO,MKTAYIAKQR,\n")
    rows, n_read = sources.raw_dti(spec, {})
    assert n_read == 4 and rows["y"].tolist()[:3] == [1, 2, 0] and np.isnan(rows["y"].iloc[3])


def test_data_dir_that_does_not_exist_is_refused(tmp_path, monkeypatch, capsys):
    """Before: ESMERGE_DATA_DIR=/nonexistent was skipped silently and files came from elsewhere."""
    missing = tmp_path / "nonexistent"
    monkeypatch.setenv("ESMERGE_DATA_DIR", str(missing))
    with pytest.raises(files.DataError, match=f"^ESMERGE_DATA_DIR={missing} is not a folder"):
        files.data_path(files.CYP_FASTA)
    assert isinstance(files.DataError("x"), EsmergeError)
    assert cli_main(["data", "verify"]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "is not a folder" in err and "Traceback" not in err


def test_verify_prints_the_table_with_an_unreadable_file(isolated, monkeypatch, capsys):
    """Before: a file (or folder) without read permission crashed `esmerge data verify` with a traceback."""
    tmp_path, entry, content = isolated
    copy = tmp_path / "datadir" / entry.path
    copy.parent.mkdir(parents=True, exist_ok=True)
    copy.write_bytes(content)

    def denied(path, *args, **kwargs):  # what a chmod 000 file gives a non-root user
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(files, "file_sha256", denied)
    files._verified.cache_clear()
    assert cli_main(["data", "verify"]) == 1
    out, err = capsys.readouterr()
    assert "fake/hello.txt" in out and "unreadable" in out and "0 of 1 files ok" in out
    assert err.count("\n") == 1 and "cannot read" in err and "Permission denied" in err
    with pytest.raises(files.DataError, match="cannot be read"):
        files.data_path(entry.path)
    files._verified.cache_clear()


def test_verify_reports_an_unreadable_folder(isolated, monkeypatch, capsys):
    tmp_path, entry, content = isolated
    real_is_file = type(tmp_path).is_file

    def is_file(self):
        if "datadir" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(type(tmp_path), "is_file", is_file)
    assert cli_main(["data", "verify"]) == 1
    assert "unreadable" in capsys.readouterr().out


# --------------------------------------------------------------------------- data set-up (`make data`)

def test_data_dir_replaces_the_shared_folder_and_the_data_cache_comes_last(tmp_path, monkeypatch):
    repo, shared, chosen = tmp_path / "repo", tmp_path / "shared" / "data", tmp_path / "mine"
    for folder in (repo, shared, chosen):
        folder.mkdir(parents=True)
    monkeypatch.setattr(files, "REPO_ROOT", repo)
    monkeypatch.setenv("ESMERGE_DATA_CACHE", str(tmp_path / "fetched"))
    monkeypatch.delenv("ESMERGE_DATA_DIR", raising=False)
    assert files.search_dirs() == [shared, tmp_path / "fetched"]
    monkeypatch.setenv("ESMERGE_DATA_DIR", str(chosen))
    assert files.search_dirs() == [chosen, tmp_path / "fetched"]  # what the user named, not ../shared
    monkeypatch.delenv("ESMERGE_DATA_CACHE")
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))
    assert files.search_dirs()[-1] == tmp_path / "cache" / "data"


def _entries(tmp_path, monkeypatch, n):
    entries = [_fake_entry(f"fake/{i}.txt", f"file {i}\n".encode(), url=f"https://example.invalid/{i}.txt")
               for i in range(n)]
    monkeypatch.setattr(files, "manifest", lambda: {e.path: e for e in entries})
    return entries


def test_fetch_offline_is_one_line_and_reaches_for_the_network_once(isolated, monkeypatch, capsys):
    import urllib.error
    import urllib.request

    tmp_path = isolated[0]
    _entries(tmp_path, monkeypatch, 5)
    calls = []

    def offline(url, timeout=None):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert cli_main(["data", "fetch"]) == 1
    out, err = capsys.readouterr()
    assert len(calls) == 1  # the other four would each wait for the same timeout
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("esmerge data: 5 of 5 upstream data files are missing or unusable (fake/0.txt, ")
    assert "and 2 more" in err and "name resolution" in err
    assert "ESMERGE_DATA_DIR" in err and "`esmerge data fetch` with network access" in err
    assert not list((tmp_path / "cache").rglob("*.txt"))


def test_fetch_http_error_stops_only_that_file(isolated, monkeypatch, capsys):
    import io
    import urllib.error
    import urllib.request

    tmp_path = isolated[0]
    entries = _entries(tmp_path, monkeypatch, 2)

    def upstream(url, timeout=None):
        if url.endswith("0.txt"):
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        return io.BytesIO(b"file 1\n")

    monkeypatch.setattr(urllib.request, "urlopen", upstream)
    assert cli_main(["data", "fetch"]) == 1
    out, err = capsys.readouterr()
    assert f"fetched {entries[1].path}" in out
    assert err.count("\n") == 1 and err.startswith("esmerge data: fake/0.txt: download from") and "404" in err
    assert files.data_path(entries[1].path) == tmp_path / "cache" / "data" / entries[1].path


def test_fetch_is_a_no_op_when_every_file_resolves(isolated, monkeypatch, capsys):
    import urllib.request

    tmp_path, entry, content = isolated
    copy = tmp_path / "datadir" / entry.path
    copy.parent.mkdir(parents=True)
    copy.write_bytes(content)
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download was needed"))
    assert cli_main(["data", "fetch"]) == 0
    assert capsys.readouterr().out == f"1 of 1 upstream data files ok, sha256-checked (in {tmp_path / 'datadir'})\n"


def test_make_fetches_the_data_before_any_work():
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = files.REPO_ROOT
    for target, first_work in (("all", "regenerate --scale cpu"), ("test", "regenerate --scale cpu --check")):
        plan = subprocess.run(["make", "-n", "-C", str(root), target], capture_output=True, text=True,
                              check=True).stdout
        assert "esmerge data fetch" in plan, target
        assert plan.index("esmerge data fetch") < plan.index(first_work), target
