"""Data layer: loaders, pools, restricted unpickler, manifest verification and the data CLI."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esmerge import data

SHARED = data.REPO_ROOT.parent / "shared" / "data"


def _have_data() -> bool:
    try:
        data.data_path("molt5/ChEBI-20_data/test.txt")
        return True
    except data.DataError:
        return False


needs_data = pytest.mark.skipif(not _have_data(), reason="upstream data not available (see `esmerge data verify`)")


# --------------------------------------------------------------------------- validation helpers

def test_valid_smiles_and_protein_on_known_inputs():
    assert data.valid_smiles("CCO")
    assert data.valid_smiles("c1ccccc1")
    assert not data.valid_smiles("C1CC")          # unclosed ring
    assert not data.valid_smiles("C(C)(C)(C)(C)C")  # pentavalent carbon fails sanitisation
    assert not data.valid_smiles("")
    assert data.valid_protein("MKTAYIAKQR")
    assert data.valid_protein("MKUX")  # selenocysteine and unknown are amino-acid codes
    assert not data.valid_protein("")
    assert not data.valid_protein("MKT AYI")
    assert not data.valid_protein("ACGT1")


def test_read_gmt_roundtrip(tmp_path):
    path = tmp_path / "sets.gmt"
    path.write_text("A_LUNG\t\tG1\tG2\tG3\nB_SKIN\tdesc\tG9\t\n")
    assert data.read_gmt(path) == {"A_LUNG": ["G1", "G2", "G3"], "B_SKIN": ["G9"]}


# --------------------------------------------------------------------------- training corpora

@needs_data
@pytest.mark.parametrize("split,n_file_rows", [("test", 3300), ("validation", 3301)])
def test_load_chebi20(split, n_file_rows):
    df = data.load_chebi20(split)
    assert list(df.columns) == ["cid", "smiles", "description"]
    assert df.attrs["n_read"] == n_file_rows
    assert len(df) == n_file_rows - sum(df.attrs["dropped"].values())
    assert len(df) > 3000 and df["cid"].is_unique
    assert df["smiles"].map(data.valid_smiles).all()
    assert df["description"].str.startswith("The molecule is").mean() > 0.9


@needs_data
def test_load_swissprot_go_joins_the_three_aspects():
    test, val = data.load_swissprot_go("test"), data.load_swissprot_go("val")
    assert list(test.columns) == ["accession", "sequence", "description"]
    # SOURCES.md: 6,764 unique proteins over test and val, which are disjoint.
    assert len(test) + len(val) == 6764
    assert not set(test["accession"]) & set(val["accession"])
    assert test["sequence"].map(data.valid_protein).all()
    # P48347's molecular-function row in the mf file is "ATP binding"; it must open the description.
    row = test.set_index("accession").loc["P48347"]
    assert row["description"].startswith("Molecular function: ATP binding")
    assert row["sequence"].startswith("MENEREKQVYLAKLSEQ")
    assert test["description"].str.contains("Biological process: ").mean() > 0.5


def test_load_swissprot_go_rejects_unknown_split():
    with pytest.raises(ValueError, match="split"):
        data.load_swissprot_go("train")


@needs_data
def test_load_pbmc68k_ranks_by_expression():
    import h5py

    df = data.load_pbmc68k()
    assert list(df.columns) == ["cell_id", "genes", "cell_type"]
    assert len(df) == 700 and df["cell_type"].nunique() == 10
    # Recompute the first cell's top gene straight from the CSR arrays.
    with h5py.File(data.data_path(data.PBMC68K)) as fh:
        start, stop = fh["raw/X/indptr"][0:2]
        values = fh["raw/X/data"][start:stop]
        indices = fh["raw/X/indices"][start:stop]
        names = [n.decode() if isinstance(n, bytes) else n for n in fh["raw/var/index"][()]]
    assert df["genes"].iloc[0][0] == names[indices[np.argmax(values)]]
    assert len(df["genes"].iloc[0]) == int((values > 0).sum())
    assert df["genes"].map(lambda g: len(g) == len(set(g))).all()


@needs_data
def test_load_ccle_cells_joins_annotation():
    df = data.load_ccle_cells()
    assert list(df.columns) == ["ccle_name", "depmap_id", "genes", "site", "histology"]
    assert 900 < len(df) <= 967
    assert df.attrs["dropped"]["unknown cell line (not in the DeepCDR annotation)"] == 967 - len(df)
    first = df.set_index("ccle_name").loc["NCIH810_LUNG"]
    assert first["genes"][:3] == ["CHGA", "RBFOX1", "C22ORF42"]
    assert first["site"] == "lung" and first["depmap_id"].startswith("ACH-")
