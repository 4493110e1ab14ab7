"""Upstream file readers: the training corpora and the raw rows of each benchmark file.

Every reader resolves its files through ``files.data_path`` (so each is hash-checked), counts and
drops invalid rows (``df.attrs["dropped"]``) and logs one summary line; the rules are recorded in
``data_manifest/processing.md``.

* training corpora, one per specialist: ``load_chebi20``, ``load_swissprot_go``,
  ``load_pbmc68k``, ``load_ccle_cells``;
* file formats: ``read_gmt``, ``read_fasta``;
* raw benchmark rows (``benchmarks.load_benchmark`` cleans and deduplicates them):
  ``raw_dti``, ``raw_cyp``, ``raw_drugcomb``, ``raw_gdsc2``, each ``(spec, dropped) -> (rows, n_read)``;
* ``binary_labels``: a label column as 0/1 numbers, refusing text labels by name.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from esmerge.data.files import CYP_FASTA, DataError, data_path, safe_pickle_load

log = logging.getLogger("esmerge.data.sources")

# The 20 standard residues plus the IUPAC extras (selenocysteine U, pyrrolysine O, ambiguity codes
# B/Z/J and unknown X) that UniProt sequences legitimately contain.
PROTEIN_ALPHABET = frozenset("ACDEFGHIKLMNPQRSTVWYUOBZJX")


@lru_cache(maxsize=None)
def valid_smiles(smiles: str) -> bool:
    """True if RDKit parses ``smiles`` into a molecule (sanitised). Cached: benchmarks repeat drugs."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")  # invalid rows are counted and reported once, not per molecule
    return isinstance(smiles, str) and bool(smiles.strip()) and Chem.MolFromSmiles(smiles) is not None


def valid_protein(sequence: str) -> bool:
    """True for a non-empty string over the (upper-case) IUPAC amino-acid alphabet."""
    return isinstance(sequence, str) and bool(sequence) and set(sequence) <= PROTEIN_ALPHABET


def summarise(what: str, df: pd.DataFrame, n_read: int, dropped: dict[str, int]) -> pd.DataFrame:
    """Attach the drop counts to ``df.attrs`` and log the loader's one-line summary."""
    dropped = {reason: int(n) for reason, n in dropped.items() if n}
    df.attrs["n_read"] = int(n_read)
    df.attrs["dropped"] = dropped
    detail = ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "none"
    log.info("%s: kept %d of %d rows (dropped: %s)", what, len(df), n_read, detail)
    return df


def drop_rows(df: pd.DataFrame, keep: pd.Series, reason: str, dropped: dict[str, int]) -> pd.DataFrame:
    keep = keep.astype(bool)
    dropped[reason] = dropped.get(reason, 0) + int((~keep).sum())
    return df[keep]


# ----------------------------------------------------------------------------------------------
# Training corpora (one per modality specialist)
# ----------------------------------------------------------------------------------------------

def load_chebi20(split: str = "test") -> pd.DataFrame:
    """ChEBI-20 molecule -> description pairs (Edwards et al. 2022; molecule specialist corpus).

    Returns columns ``cid`` (int), ``smiles``, ``description``; rows RDKit cannot parse are dropped.
    Only ``test`` and ``validation`` are mirrored (train.txt is over the mirror's size limit).
    """
    if split not in ("test", "validation"):
        raise ValueError(f"ChEBI-20 split must be 'test' or 'validation', got {split!r}")
    raw = pd.read_csv(data_path(f"molt5/ChEBI-20_data/{split}.txt"), sep="\t", quoting=3,
                      dtype={"SMILES": str, "description": str}, keep_default_na=False)
    df = raw.rename(columns={"CID": "cid", "SMILES": "smiles"})[["cid", "smiles", "description"]]
    dropped: dict[str, int] = {}
    df = drop_rows(df, df["description"].str.strip().astype(bool), "empty description", dropped)
    df = drop_rows(df, df["smiles"].map(valid_smiles), "invalid SMILES", dropped)
    return summarise(f"ChEBI-20 {split}", df.reset_index(drop=True), len(raw), dropped)


GO_ASPECTS = (("mf", "Molecular function"), ("bp", "Biological process"), ("cc", "Cellular component"))


def load_swissprot_go(split: str = "test") -> pd.DataFrame:
    """Swiss-Prot proteins with their experimental GO terms as one text (FAPM; protein corpus).

    The three FAPM aspect files are joined per UniProt accession into
    ``"Molecular function: a; b. Biological process: c. Cellular component: d."`` (aspects without
    terms are omitted). Returns columns ``accession``, ``sequence``, ``description``. Rows with an
    empty or non-amino-acid sequence, or with conflicting sequences across aspects, are dropped.
    """
    if split not in ("test", "val"):
        raise ValueError(f"FAPM Swiss-Prot split must be 'test' or 'val', got {split!r}")
    frames = []
    for aspect, _ in GO_ASPECTS:
        part = pd.read_csv(data_path(f"fapm/data/swissprot_exp/{split}_exp_prompt_{aspect}_new.csv"),
                           sep="|", dtype=str, keep_default_na=False, quoting=3)
        frames.append(part.assign(aspect=aspect)[["name", "protein", "function", "aspect"]])
    raw = pd.concat(frames, ignore_index=True)
    raw["protein"] = raw["protein"].str.strip().str.upper()
    dropped: dict[str, int] = {}
    n_accessions = raw["name"].nunique()
    bad_seq = raw.groupby("name")["protein"].agg(lambda s: not all(valid_protein(x) for x in s))
    conflict = raw.groupby("name")["protein"].nunique() > 1
    dropped["empty or non-amino-acid sequence"] = int(bad_seq.sum())
    dropped["conflicting sequences across aspects"] = int((conflict & ~bad_seq).sum())
    raw = raw[~raw["name"].isin(bad_seq.index[bad_seq | conflict])]
    rows = []
    for accession, group in raw.groupby("name", sort=True):
        by_aspect = dict(zip(group["aspect"], group["function"].str.strip()))
        parts = [f"{title}: {by_aspect[a]}." for a, title in GO_ASPECTS if by_aspect.get(a)]
        if parts:
            rows.append((accession, group["protein"].iloc[0], " ".join(parts)))
    dropped["no GO term text"] = raw["name"].nunique() - len(rows)
    df = pd.DataFrame(rows, columns=["accession", "sequence", "description"])
    return summarise(f"Swiss-Prot GO {split}", df, n_accessions, dropped)


PBMC68K = "scanpy/src/scanpy/datasets/10x_pbmc68k_reduced.h5ad"


def _h5_strings(dataset) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in dataset[()]]


def load_pbmc68k() -> pd.DataFrame:
    """10x PBMC 68k (reduced) cells as ranked gene lists with their cell type (cell corpus).

    Genes are ranked by the log-normalised expression in ``raw/X`` (the stored ``X`` is scaled per
    gene, so its order says how unusual a gene is, not how expressed it is); only expressed genes
    (value > 0) are kept, ties broken by the file's gene order. Returns columns ``cell_id``,
    ``genes`` (list[str], highest first), ``cell_type`` (obs ``bulk_labels``). Cells with no
    expressed gene or no label are dropped.
    """
    import h5py

    with h5py.File(data_path(PBMC68K), "r") as fh:
        cell_ids = _h5_strings(fh["obs/index"])
        genes = np.asarray(_h5_strings(fh["raw/var/index"]))
        categories = _h5_strings(fh["obs/bulk_labels/categories"])
        codes = fh["obs/bulk_labels/codes"][()]
        raw = fh["raw/X"]
        if raw.attrs.get("encoding-type") != "csr_matrix":
            raise DataError(f"{PBMC68K}: expected raw/X as csr_matrix, found {raw.attrs.get('encoding-type')}")
        values, indices, indptr = raw["data"][()], raw["indices"][()], raw["indptr"][()]
    rows = []
    dropped = {"no expressed gene": 0, "no cell type": 0}
    for i, cell in enumerate(cell_ids):
        vals, idx = values[indptr[i]:indptr[i + 1]], indices[indptr[i]:indptr[i + 1]]
        keep = vals > 0
        vals, idx = vals[keep], idx[keep]
        order = np.lexsort((idx, -vals))  # by expression descending, then gene position
        if codes[i] < 0:
            dropped["no cell type"] += 1
        elif not len(order):
            dropped["no expressed gene"] += 1
        else:
            rows.append((cell, genes[idx[order]].tolist(), categories[codes[i]]))
    df = pd.DataFrame(rows, columns=["cell_id", "genes", "cell_type"])
    return summarise("PBMC 68k", df, len(cell_ids), dropped)


CCLE_GMT = "snakes-cca/gene_sets/Cancer_Cell_Line_Encyclopedia.gmt.gz"
CCLE_ANNOTATION = "deepcdr/data/CCLE/Cell_lines_annotations_20181226.txt"


def read_gmt(path: str | os.PathLike) -> dict[str, list[str]]:
    """Gene sets of a (optionally gzipped) GMT file: name -> genes in file order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    sets = {}
    with opener(path, "rt") as fh:
        for line in fh:
            fields = line.rstrip("\n").split("\t")
            if fields and fields[0]:
                sets[fields[0]] = [g for g in fields[2:] if g]
    return sets


@lru_cache(maxsize=1)
def _ccle_cells() -> pd.DataFrame:
    sets = read_gmt(data_path(CCLE_GMT))
    annotation = pd.read_csv(data_path(CCLE_ANNOTATION), sep="\t", dtype=str, keep_default_na=False)
    annotation = annotation.drop_duplicates("CCLE_ID").set_index("CCLE_ID")
    rows, dropped = [], {"unknown cell line (not in the DeepCDR annotation)": 0, "empty gene set": 0}
    for name, genes in sets.items():
        if name not in annotation.index:
            dropped["unknown cell line (not in the DeepCDR annotation)"] += 1
        elif not genes:
            dropped["empty gene set"] += 1
        else:
            a = annotation.loc[name]
            rows.append((name, a["depMapID"] or None, genes, a["Site_Primary"], a["Histology"]))
    df = pd.DataFrame(rows, columns=["ccle_name", "depmap_id", "genes", "site", "histology"])
    return summarise("CCLE cell lines", df, len(sets), dropped)


def load_ccle_cells() -> pd.DataFrame:
    """CCLE cell lines as ranked gene lists with tissue annotation (cell corpus; benchmark cells).

    Joins the Enrichr ``Cancer_Cell_Line_Encyclopedia`` gene sets (per line, genes up-regulated
    relative to other lines, in Enrichr's rank order; our stand-in for the paper's "top expressed
    genes") with the DeepCDR CCLE annotation on the CCLE name. Returns columns ``ccle_name``,
    ``depmap_id`` (``ACH-...`` or None), ``genes`` (list[str]), ``site``, ``histology``. Gene sets
    of lines absent from the annotation are dropped and counted.
    """
    df = _ccle_cells()
    out = df.copy()
    out["genes"] = out["genes"].map(list)  # callers may mutate; the cached frame stays intact
    out.attrs = dict(df.attrs)
    return out


# ----------------------------------------------------------------------------------------------
# Raw benchmark rows (cleaned, deduplicated and labelled by ``benchmarks.load_benchmark``)
# ----------------------------------------------------------------------------------------------

TGSA_DIR = "tgsa/data/similarity_augment/dict"
TGSA_IC50 = f"{TGSA_DIR}/drug_idx_cell_idx_ic50"
TGSA_CELLS = f"{TGSA_DIR}/cell_idx2id_dict"
TGSA_DRUGS = f"{TGSA_DIR}/drug_idx2name_dict"
TGSA_SMILES = f"{TGSA_DIR}/drug_name2smiles_dict"
DRUGCOMB = "deepdds/data/new_labels_0_10.csv"
CELL_TOP_GENES = 50  # paper A.4: cells are described by their top-50 genes
GDSC2_QUANTILES = (1 / 3, 2 / 3)  # per-drug ln IC50 tertiles: below = Sensitive, above = Resistant


def read_fasta(path: str | os.PathLike) -> dict[str, str]:
    """Sequences of a FASTA file keyed by the first word of each header."""
    records, name = {}, None
    for line in Path(path).read_text().splitlines():
        if line.startswith(">"):
            name = line[1:].split()[0]
            records[name] = ""
        elif name is not None:
            records[name] += line.strip()
    return records


def cyp_sequences() -> dict[str, str]:
    """Human CYP enzyme sequences (CYP1A2, CYP2C19, CYP2C9, CYP2D6, CYP3A4) from the derived FASTA."""
    return read_fasta(data_path(CYP_FASTA))


def _normalise_cell_name(name: str) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(name).upper())


# DeepDDs (O'Neil) names that differ from the CCLE name stem; checked against the CCLE gene sets.
DRUGCOMB_CELL_ALIASES = {"LNCAP": "LNCAPCLONEFGC", "MSTO": "MSTO211H"}


def ccle_by_stem() -> dict[str, pd.Series]:
    """CCLE lines keyed by the name stem before the tissue suffix (``A375_SKIN`` -> ``A375``).

    Stems shared by two lines (e.g. ``TT`` oesophagus/thyroid) are ambiguous and left out.
    """
    cells = _ccle_cells()
    stems = cells["ccle_name"].str.split("_", n=1).str[0]
    unique = stems[~stems.duplicated(keep=False)]
    return {stem: cells.loc[i] for i, stem in unique.items()}


def _with_cells(df: pd.DataFrame, cell_rows: pd.Series, dropped: dict[str, int]) -> pd.DataFrame:
    """Attach ``cell_id`` (CCLE name) and ``cell_genes`` (top genes); rows whose cell is unknown drop."""
    df = drop_rows(df, cell_rows.notna(), "unknown cell line", dropped)
    cell_rows = cell_rows[df.index]
    return df.assign(cell_id=[r["ccle_name"] for r in cell_rows],
                     cell_genes=[list(r["genes"][:CELL_TOP_GENES]) for r in cell_rows])


def binary_labels(values: pd.Series, source: str) -> pd.Series:
    """A file's label column as numbers (NaN where empty); text labels are refused by name.

    Numbers other than 0 and 1 (and missing values) are left for the caller to drop and count.
    A text label ("yes", "active") means the file is not the version the rules were written for;
    guessing its meaning could flip labels, so it is refused with ``DataError`` naming the file,
    the value and how many rows hold text.

    >>> binary_labels(pd.Series(["1", "0", " ", None, "2"]), "f.csv").tolist()
    [1.0, 0.0, nan, nan, 2.0]
    >>> binary_labels(pd.Series(["1", "yes", "0", "no"]), "f.csv")  # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    esmerge.data.files.DataError: f.csv: label 'yes' (row 1) is text, not 0/1 (2 text labels);
    use a file with numeric labels
    """
    numbers = pd.to_numeric(values, errors="coerce")
    blank = values.map(lambda v: isinstance(v, str) and not v.strip())
    text = values[numbers.isna() & values.notna() & ~blank]
    if len(text):
        raise DataError(f"{source}: label {text.iloc[0]!r} (row {text.index[0]}) is text, not 0/1 "
                        f"({len(text)} text labels); use a file with numeric labels")
    return numbers


def raw_drugcomb(spec, dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    """DeepDDs O'Neil drug pairs with their CCLE cell line; ``y`` 1 = Synergistic."""
    raw = pd.read_csv(data_path(DRUGCOMB), dtype={"drug1": str, "drug2": str, "cell": str})
    df = pd.DataFrame({"molecule": raw["drug1"], "molecule2": raw["drug2"],
                       "y": binary_labels(raw["label"], DRUGCOMB)})
    stems = ccle_by_stem()
    cells = raw["cell"].map(lambda c: stems.get(DRUGCOMB_CELL_ALIASES.get(_normalise_cell_name(c),
                                                                        _normalise_cell_name(c))))
    df = drop_rows(df, df["molecule"].map(valid_smiles) & df["molecule2"].map(valid_smiles),
               "invalid SMILES", dropped)
    return _with_cells(df, cells, dropped), len(raw)


def gdsc2_labels(ic50: np.ndarray, quantiles: tuple[float, float] = GDSC2_QUANTILES) -> np.ndarray:
    """Binarise GDSC2 ln IC50 per drug: 1 (Sensitive) at or below the drug's lower quantile, 0
    (Resistant) at or above its upper quantile, -1 (ambiguous, dropped) in between.

    ``ic50``: array, shape (n, 3) with columns (drug_idx, cell_idx, ln IC50) as in TGSA.
    Returns an int array, shape (n,). Drugs are thresholded separately because their tested
    concentration ranges differ, so one global ln IC50 cut would label whole drugs at once.

    >>> gdsc2_labels(np.array([[0, 0, 1.0], [0, 1, 2.0], [0, 2, 3.0], [1, 0, 9.0], [1, 1, 8.0], [1, 2, 7.0]])).tolist()
    [1, -1, 0, 0, -1, 1]
    """
    ic50 = np.asarray(ic50, dtype=float)
    if ic50.ndim != 2 or ic50.shape[1] != 3:
        raise ValueError(f"expected ic50 of shape (n, 3), got {ic50.shape}")
    frame = pd.DataFrame({"drug": ic50[:, 0].astype(int), "v": ic50[:, 2]})
    low = frame.groupby("drug")["v"].transform(lambda v: v.quantile(quantiles[0]))
    high = frame.groupby("drug")["v"].transform(lambda v: v.quantile(quantiles[1]))
    labels = np.full(len(frame), -1)
    labels[(frame["v"] <= low).to_numpy()] = 1
    labels[(frame["v"] >= high).to_numpy()] = 0
    return labels


def raw_gdsc2(spec, dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    """TGSA GDSC2 drug-cell pairs labelled by ``gdsc2_labels``; ``y`` 1 = Sensitive."""
    ic50 = safe_pickle_load(data_path(TGSA_IC50))
    cell_ids = safe_pickle_load(data_path(TGSA_CELLS))
    drug_names = safe_pickle_load(data_path(TGSA_DRUGS))
    smiles = safe_pickle_load(data_path(TGSA_SMILES))
    if not isinstance(ic50, np.ndarray) or not all(isinstance(d, dict) for d in (cell_ids, drug_names, smiles)):
        raise DataError(f"{TGSA_DIR}: unexpected TGSA pickle contents (want an array and three dicts)")
    y = gdsc2_labels(ic50)
    df = pd.DataFrame({"molecule": [smiles.get(drug_names.get(int(d))) for d in ic50[:, 0]],
                       "molecule2": None, "y": y,
                       "depmap_id": [cell_ids.get(int(c)) for c in ic50[:, 1]]})
    df = drop_rows(df, df["y"] >= 0, "ambiguous ln IC50 (middle tertile of its drug)", dropped)
    df = drop_rows(df, df["molecule"].map(lambda s: isinstance(s, str) and valid_smiles(s)), "invalid SMILES", dropped)
    by_depmap = {r["depmap_id"]: r for _, r in _ccle_cells().iterrows() if r["depmap_id"]}
    return _with_cells(df, df["depmap_id"].map(by_depmap), dropped), len(ic50)


def raw_dti(spec, dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    """DrugBAN molecule-protein pairs of ``spec.files[0]``; ``y`` 1 = Interacts."""
    raw = pd.read_csv(data_path(spec.files[0]), dtype={"SMILES": str, "Protein": str})
    df = pd.DataFrame({"molecule": raw["SMILES"], "protein": raw["Protein"].str.strip().str.upper(),
                       "y": binary_labels(raw["Y"], spec.files[0])})
    df = drop_rows(df, df["protein"].map(valid_protein), "empty or non-amino-acid sequence", dropped)
    df = drop_rows(df, df["molecule"].map(valid_smiles), "invalid SMILES", dropped)
    return df, len(raw)


def raw_cyp(spec, dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    """TDC CYP molecules of ``spec.files[0]``, each paired with the fixed enzyme ``spec.enzyme``."""
    raw = pd.read_csv(data_path(spec.files[0]), sep="\t", dtype={"Drug": str})
    sequence = cyp_sequences().get(spec.enzyme)
    if not sequence:
        raise DataError(f"{CYP_FASTA}: no sequence for {spec.enzyme}")
    df = pd.DataFrame({"molecule": raw["Drug"], "protein": sequence, "y": binary_labels(raw["Y"], spec.files[0])})
    df = drop_rows(df, df["molecule"].map(valid_smiles), "invalid SMILES", dropped)
    return df, len(raw)

