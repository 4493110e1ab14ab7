"""Upstream data: manifest, resolution, hash verification, loaders, benchmarks and pools.

Files are never copied into this repository. ``data_manifest/files.yaml`` records, for every
upstream file, its path (as mirrored in ``../shared/data``), upstream URL at a pinned commit,
sha256, size, licence, citation and the tasks that use it. A file is resolved from, in order:

1. ``$ESMERGE_DATA_DIR``;
2. ``../shared/data`` beside the repository (when it exists);
3. the user cache (``$ESMERGE_CACHE/data``), where ``fetch`` downloads it by URL.

Every resolved file is checked against its sha256 before use. On top of that:

* training corpora, one per specialist: ``load_chebi20``, ``load_swissprot_go``,
  ``load_pbmc68k``, ``load_ccle_cells``;
* the paper's 13 benchmarks: ``BENCHMARKS``, ``load_benchmark``, ``label_balance`` (Fig. 7);
* seeded, stratified, disjoint evaluation / in-context pools: ``split_pools``;
* ``safe_pickle_load``, the restricted unpickler the TGSA (GDSC2) pickles are read with;
* ``cli``: ``esmerge data verify`` and ``esmerge data fetch``.

Loaders count and drop invalid rows (``df.attrs["dropped"]``) and log one summary line; every
processing rule is recorded in ``data_manifest/processing.md``.
"""
from __future__ import annotations

import gzip
import logging
import os
import pickle
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from esmerge.cache import cache_dir, file_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
MANIFEST = REPO_ROOT / "data_manifest" / "files.yaml"


class DataError(RuntimeError):
    """A data file is missing, corrupt or unknown; the message says how to fix it."""


@dataclass(frozen=True)
class ManifestEntry:
    path: str
    sha256: str
    bytes: int
    repo: str
    commit: str
    url: str | None
    licence: str
    source: str
    tasks: tuple[str, ...] = ()
    citation: str = ""


@lru_cache(maxsize=1)
def manifest() -> dict[str, ManifestEntry]:
    """All manifest entries keyed by their path."""
    rows = yaml.safe_load(MANIFEST.read_text())["files"]
    return {row["path"]: ManifestEntry(**{**row, "tasks": tuple(row.get("tasks") or ())}) for row in rows}


def search_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("ESMERGE_DATA_DIR"):
        dirs.append(Path(os.environ["ESMERGE_DATA_DIR"]))
    shared = REPO_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        dirs.append(shared)
    dirs.append(cache_dir() / "data")
    return dirs


def how_to_get(entry: ManifestEntry) -> str:
    where = f"download {entry.url}" if entry.url else f"derive it as described in data_manifest ({entry.source})"
    return f"{where} to $ESMERGE_DATA_DIR/{entry.path} (or run `esmerge data fetch`)"


@lru_cache(maxsize=None)
def _verified(path: str, sha256: str) -> bool:
    return file_sha256(path) == sha256


def data_path(relpath: str) -> Path:
    """The verified local path of manifest file ``relpath`` (e.g. ``molt5/ChEBI-20_data/test.txt``).

    Raises ``DataError`` with a one-line message naming the file, its expected sha256 and how to
    obtain it, if it is unknown, missing or corrupt.
    """
    entries = manifest()
    if relpath not in entries:
        raise DataError(f"{relpath}: not in the data manifest ({MANIFEST})")
    entry = entries[relpath]
    for root in search_dirs():
        candidate = root / relpath
        if candidate.is_file():
            if not _verified(str(candidate), entry.sha256):
                raise DataError(
                    f"{candidate}: sha256 mismatch (expected {entry.sha256}); the file is corrupt or a "
                    f"different version: {how_to_get(entry)}"
                )
            return candidate
    searched = ", ".join(str(d) for d in search_dirs())
    raise DataError(f"{relpath}: not found in {searched} (expected sha256 {entry.sha256}); {how_to_get(entry)}")


# ----------------------------------------------------------------------------------------------
# Validation shared by every loader
# ----------------------------------------------------------------------------------------------

log = logging.getLogger("esmerge.data")

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


def _report(what: str, df: pd.DataFrame, n_read: int, dropped: dict[str, int]) -> pd.DataFrame:
    """Attach the drop counts to ``df.attrs`` and log the loader's one-line summary."""
    dropped = {reason: int(n) for reason, n in dropped.items() if n}
    df.attrs["n_read"] = int(n_read)
    df.attrs["dropped"] = dropped
    detail = ", ".join(f"{n} {reason}" for reason, n in dropped.items()) or "none"
    log.info("%s: kept %d of %d rows (dropped: %s)", what, len(df), n_read, detail)
    return df


def _drop(df: pd.DataFrame, keep: pd.Series, reason: str, dropped: dict[str, int]) -> pd.DataFrame:
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
    df = _drop(df, df["description"].str.strip().astype(bool), "empty description", dropped)
    df = _drop(df, df["smiles"].map(valid_smiles), "invalid SMILES", dropped)
    return _report(f"ChEBI-20 {split}", df.reset_index(drop=True), len(raw), dropped)


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
    return _report(f"Swiss-Prot GO {split}", df, n_accessions, dropped)


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
    return _report("PBMC 68k", df, len(cell_ids), dropped)


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
    return _report("CCLE cell lines", df, len(sets), dropped)


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
# Restricted unpickling (TGSA ships its GDSC2 tables as pickles)
# ----------------------------------------------------------------------------------------------

def _numpy_allowed() -> dict[tuple[str, str], object]:
    """The globals a pickled numpy array needs, under both numpy 1 (``numpy.core``) and numpy 2
    (``numpy._core``) module names; each is bound to the object of the running numpy."""
    from numpy._core import multiarray, numeric  # numpy >= 2; the 1.x names below map here

    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol-5 arrays
    return allowed


# Builtin containers/primitives pickle may name by global (dict, list, tuple, str, ... have opcodes).
# ``_codecs.encode`` is how protocol 2 stores bytes (numpy array buffers); it only encodes a string.
_BUILTINS_ALLOWED = {("builtins", n): getattr(__import__("builtins"), n)
                     for n in ("set", "frozenset", "complex", "bytearray", "slice", "range")}
_BUILTINS_ALLOWED[("_codecs", "encode")] = __import__("codecs").encode


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, source: str):
        super().__init__(fh)
        self.source = source
        self.allowed = {**_numpy_allowed(), **_BUILTINS_ALLOWED}

    def find_class(self, module: str, name: str):
        # Protocols 0-2 name builtins by their Python 2 modules (``__builtin__.set``); map them the
        # way CPython's own Unpickler does before checking the allow-list.
        from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING

        module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: refused global {module}.{name} while unpickling (only numpy arrays "
                f"and builtin containers are allowed); the file is not the expected TGSA table"
            ) from None

    def persistent_load(self, pid):
        raise DataError(f"{self.source}: refused persistent id {pid!r} while unpickling")


def safe_pickle_load(path: str | os.PathLike):
    """Unpickle ``path`` allowing only numpy arrays/dtypes/scalars and builtin containers.

    Any other global (``os.system``, ``builtins.eval``, a class) raises ``DataError`` naming it
    before anything is called, so a tampered file cannot execute code.
    """
    with open(path, "rb") as fh:
        try:
            return _RestrictedUnpickler(fh, str(path)).load()
        except DataError:
            raise
        except Exception as err:  # truncated or not a pickle at all
            raise DataError(f"{path}: not a readable pickle ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------------------------
# Evaluation benchmarks (paper §5, App. A.1, Fig. 7)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BenchmarkSpec:
    """One evaluation benchmark: its task group, answer strings (paper Tables 9-10) and files."""
    name: str
    group: str            # mol-prot | mol-cell | cyp-inhibition | cyp-substrate
    positive: str         # answer string for y = 1
    negative: str         # answer string for y = 0
    files: tuple[str, ...]
    enzyme: str | None = None  # CYP tasks: the fixed target in derived/cyp_human.fasta

    @property
    def labels(self) -> tuple[str, str]:
        return (self.negative, self.positive)


_DTI = ("Interacts", "Does not interact")
_INHIBIT = ("Inhibit", "Does not inhibit")
_SUBSTRATE = ("Substrate", "Not a substrate")
CYP_FASTA = "derived/cyp_human.fasta"
TGSA_DIR = "tgsa/data/similarity_augment/dict"
TGSA_IC50 = f"{TGSA_DIR}/drug_idx_cell_idx_ic50"
TGSA_CELLS = f"{TGSA_DIR}/cell_idx2id_dict"
TGSA_DRUGS = f"{TGSA_DIR}/drug_idx2name_dict"
TGSA_SMILES = f"{TGSA_DIR}/drug_name2smiles_dict"
DRUGCOMB = "deepdds/data/new_labels_0_10.csv"

BENCHMARKS: dict[str, BenchmarkSpec] = {
    spec.name: spec for spec in [
        BenchmarkSpec("BindingDB", "mol-prot", *_DTI, ("drugban/datasets/bindingdb/random/val.csv",)),
        BenchmarkSpec("BIOSNAP", "mol-prot", *_DTI, ("drugban/datasets/biosnap/random/test.csv",)),
        BenchmarkSpec("Human", "mol-prot", *_DTI, ("drugban/datasets/human/random/test.csv",)),
        BenchmarkSpec("DrugComb", "mol-cell", "Synergistic", "Antagonistic", (DRUGCOMB, CCLE_GMT, CCLE_ANNOTATION)),
        BenchmarkSpec("GDSC2", "mol-cell", "Sensitive", "Resistant",
                      (TGSA_IC50, TGSA_CELLS, TGSA_DRUGS, TGSA_SMILES, CCLE_GMT, CCLE_ANNOTATION)),
        *[BenchmarkSpec(e, "cyp-inhibition", *_INHIBIT, (f"tdc-cyp/data/{e.lower()}_veith.tab", CYP_FASTA), e)
          for e in ("CYP1A2", "CYP2C19", "CYP2C9", "CYP2D6", "CYP3A4")],
        *[BenchmarkSpec(f"{e}-substrate", "cyp-substrate", *_SUBSTRATE,
                        (f"tdc-cyp/data/{e.lower()}_substrate_carbonmangels.tab", CYP_FASTA), e)
          for e in ("CYP2C9", "CYP2D6", "CYP3A4")],
    ]
}
BENCHMARK_GROUPS = ("mol-prot", "mol-cell", "cyp-inhibition", "cyp-substrate")
BENCHMARK_COLUMNS = ["molecule", "molecule2", "protein", "cell_id", "cell_genes", "y", "label"]
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
    df = _drop(df, cell_rows.notna(), "unknown cell line", dropped)
    cell_rows = cell_rows[df.index]
    return df.assign(cell_id=[r["ccle_name"] for r in cell_rows],
                     cell_genes=[list(r["genes"][:CELL_TOP_GENES]) for r in cell_rows])


def _raw_drugcomb(dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    raw = pd.read_csv(data_path(DRUGCOMB), dtype={"drug1": str, "drug2": str, "cell": str})
    df = pd.DataFrame({"molecule": raw["drug1"], "molecule2": raw["drug2"], "y": raw["label"]})
    stems = ccle_by_stem()
    cells = raw["cell"].map(lambda c: stems.get(DRUGCOMB_CELL_ALIASES.get(_normalise_cell_name(c),
                                                                        _normalise_cell_name(c))))
    df = _drop(df, df["molecule"].map(valid_smiles) & df["molecule2"].map(valid_smiles),
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


def _raw_gdsc2(dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
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
    df = _drop(df, df["y"] >= 0, "ambiguous ln IC50 (middle tertile of its drug)", dropped)
    df = _drop(df, df["molecule"].map(lambda s: isinstance(s, str) and valid_smiles(s)), "invalid SMILES", dropped)
    by_depmap = {r["depmap_id"]: r for _, r in _ccle_cells().iterrows() if r["depmap_id"]}
    return _with_cells(df, df["depmap_id"].map(by_depmap), dropped), len(ic50)


def _raw_dti(spec: BenchmarkSpec, dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    raw = pd.read_csv(data_path(spec.files[0]), dtype={"SMILES": str, "Protein": str})
    df = pd.DataFrame({"molecule": raw["SMILES"], "protein": raw["Protein"].str.strip().str.upper(), "y": raw["Y"]})
    df = _drop(df, df["protein"].map(valid_protein), "empty or non-amino-acid sequence", dropped)
    df = _drop(df, df["molecule"].map(valid_smiles), "invalid SMILES", dropped)
    return df, len(raw)


def _raw_cyp(spec: BenchmarkSpec, dropped: dict[str, int]) -> tuple[pd.DataFrame, int]:
    raw = pd.read_csv(data_path(spec.files[0]), sep="\t", dtype={"Drug": str})
    sequence = cyp_sequences().get(spec.enzyme)
    if not sequence:
        raise DataError(f"{CYP_FASTA}: no sequence for {spec.enzyme}")
    df = pd.DataFrame({"molecule": raw["Drug"], "protein": sequence, "y": raw["Y"]})
    df = _drop(df, df["molecule"].map(valid_smiles), "invalid SMILES", dropped)
    return df, len(raw)


def _deduplicate(df: pd.DataFrame, dropped: dict[str, int]) -> pd.DataFrame:
    """One row per instance: repeated instances with one label collapse to one row; instances seen
    with both labels are dropped. Keeps eval and context pools free of the same instance."""
    pair = [tuple(sorted(p)) if isinstance(p[1], str) else (p[0],) for p in zip(df["molecule"], df["molecule2"])]
    key = pd.Series(["\x1f".join(map(str, (*p, prot, cell)))
                     for p, prot, cell in zip(pair, df["protein"], df["cell_id"])], index=df.index)
    n_labels = df.groupby(key)["y"].transform("nunique")
    df = _drop(df, n_labels == 1, "instance seen with both labels", dropped)
    return _drop(df, ~key[df.index].duplicated(), "duplicate instance", dropped)


@lru_cache(maxsize=None)
def _benchmark(name: str) -> pd.DataFrame:
    spec = BENCHMARKS[name]
    dropped: dict[str, int] = {}
    if spec.group == "mol-prot":
        df, n_read = _raw_dti(spec, dropped)
    elif spec.name == "DrugComb":
        df, n_read = _raw_drugcomb(dropped)
    elif spec.name == "GDSC2":
        df, n_read = _raw_gdsc2(dropped)
    else:
        df, n_read = _raw_cyp(spec, dropped)
    df = df.copy()
    for column in BENCHMARK_COLUMNS:
        if column not in df:
            df[column] = None
    df = _drop(df, df["y"].isin([0, 1]), "missing or non-binary label", dropped)
    df = df.astype({"y": int})
    df = _deduplicate(df, dropped)
    df["label"] = np.where(df["y"] == 1, spec.positive, spec.negative)
    return _report(f"benchmark {name}", df[BENCHMARK_COLUMNS].reset_index(drop=True), n_read, dropped)


def load_benchmark(name: str) -> pd.DataFrame:
    """All usable instances of benchmark ``name`` (a key of ``BENCHMARKS``).

    Columns: ``molecule`` (SMILES), ``molecule2`` (DrugComb's second drug, else None), ``protein``
    (sequence; the fixed enzyme for CYP tasks, else None for cell tasks), ``cell_id`` (CCLE name)
    and ``cell_genes`` (its top-50 Enrichr CCLE genes) for DrugComb/GDSC2 (else None), ``y`` (0/1)
    and ``label`` (the answer string of paper Tables 9-10). Invalid SMILES or sequences, unknown
    cell lines, duplicates and conflicting labels are dropped; ``df.attrs["dropped"]`` counts them
    and the rules are in ``data_manifest/processing.md``. Pools are drawn with ``split_pools``.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    df = _benchmark(name)
    out = df.copy()
    out["cell_genes"] = out["cell_genes"].map(lambda g: list(g) if isinstance(g, list) else None)
    out.attrs = {k: (dict(v) if isinstance(v, dict) else v) for k, v in df.attrs.items()}
    out.attrs["benchmark"] = name
    return out


def _stratified_counts(available: pd.Series, n: int, proportions: pd.Series) -> pd.Series:
    """Largest-remainder allocation of ``n`` rows over labels in ``proportions``, capped by what is
    ``available`` per label (any shortfall goes to the labels that still have rows).

    >>> _stratified_counts(pd.Series([3, 7]), 3, pd.Series([0.3, 0.7])).tolist()  # 0.9, 2.1 -> 1, 2
    [1, 2]
    """
    quota = proportions * n
    take = np.floor(quota).astype(int).clip(upper=available)
    for label in (quota - np.floor(quota)).sort_values(ascending=False, kind="stable").index:
        if take.sum() >= n:
            break
        if take[label] < available[label]:
            take[label] += 1
    while take.sum() < n:  # a label ran out: fill from the label with the most rows left
        take[(available - take).idxmax()] += 1
    return take


def split_pools(df: pd.DataFrame, n_eval: int, n_context: int, seed: int = 0,
                label_column: str = "y") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Disjoint evaluation and in-context pools, each stratified by label.

    Each pool holds the benchmark's label proportions (largest-remainder rounding); rows are drawn
    with ``numpy.random.default_rng(seed)`` so a seed gives the same pools on every machine.
    Returns ``(eval_df, context_df)`` in shuffled order with ``df``'s index preserved.
    Raises ``ValueError`` if ``n_eval + n_context`` exceeds the rows available.
    """
    if n_eval < 0 or n_context < 0:
        raise ValueError(f"pool sizes must be non-negative, got n_eval={n_eval}, n_context={n_context}")
    if n_eval + n_context > len(df):
        raise ValueError(f"n_eval + n_context = {n_eval + n_context} exceeds the {len(df)} rows available")
    rng = np.random.default_rng(seed)
    labels = df[label_column]
    counts = labels.value_counts().sort_index()
    proportions = counts / counts.sum()
    shuffled = {label: rng.permutation(np.flatnonzero((labels == label).to_numpy())) for label in counts.index}
    eval_take = _stratified_counts(counts, n_eval, proportions)
    context_take = _stratified_counts(counts - eval_take, n_context, proportions)
    eval_pos = np.concatenate([shuffled[lab][:eval_take[lab]] for lab in counts.index]).astype(int)
    context_pos = np.concatenate([shuffled[lab][eval_take[lab]:eval_take[lab] + context_take[lab]]
                                  for lab in counts.index]).astype(int)
    return df.iloc[rng.permutation(eval_pos)], df.iloc[rng.permutation(context_pos)]


def label_balance(names: list[str] | None = None) -> pd.DataFrame:
    """Positive/negative counts per benchmark (the analogue of paper Fig. 7).

    Returns columns ``benchmark``, ``group``, ``n_pos``, ``n_neg``, ``n_dropped``.
    """
    rows = []
    for name in names or list(BENCHMARKS):
        df = load_benchmark(name)
        rows.append((name, BENCHMARKS[name].group, int((df["y"] == 1).sum()), int((df["y"] == 0).sum()),
                     sum(df.attrs["dropped"].values())))
    return pd.DataFrame(rows, columns=["benchmark", "group", "n_pos", "n_neg", "n_dropped"])


# ----------------------------------------------------------------------------------------------
# Verification, download, command line (`esmerge data verify|fetch`)
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FileStatus:
    """Where a manifest file was found and whether it matches: ``ok``, ``missing`` or ``corrupt``."""
    path: str
    bytes: int
    status: str
    location: Path | None
    message: str = ""


def check_file(entry: ManifestEntry) -> FileStatus:
    """Status of one manifest entry, resolved in ``data_path``'s order (first copy found decides)."""
    for root in search_dirs():
        candidate = root / entry.path
        if candidate.is_file():
            size = candidate.stat().st_size
            if size == entry.bytes and _verified(str(candidate), entry.sha256):
                return FileStatus(entry.path, size, "ok", candidate)
            return FileStatus(entry.path, size, "corrupt", candidate,
                              f"{entry.path}: corrupt copy at {candidate} ({size} bytes; expected {entry.bytes} "
                              f"bytes, sha256 {entry.sha256}); remove it and {how_to_get(entry)}")
    return FileStatus(entry.path, 0, "missing", None,
                      f"{entry.path}: missing (expected sha256 {entry.sha256}); {how_to_get(entry)}")


def verify() -> list[FileStatus]:
    """Check every manifest file (size, then sha256)."""
    return [check_file(entry) for entry in manifest().values()]


def fetch(entry: ManifestEntry, force: bool = False) -> Path:
    """Download ``entry`` by its URL into the cache (``$ESMERGE_CACHE/data``), checking its sha256.

    The file is written under a temporary name and renamed into place only when the hash matches,
    so an interrupted or tampered download leaves nothing behind. Returns the cached path.
    """
    import shutil
    import tempfile
    import urllib.request

    target = cache_dir() / "data" / entry.path
    if target.is_file() and not force and file_sha256(target) == entry.sha256:
        return target
    derive = DERIVED.get(entry.path)
    if not entry.url and derive is None:
        raise DataError(f"{entry.path}: no download URL; {how_to_get(entry)}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            if derive is not None:
                out.write(derive().encode())
            else:
                with urllib.request.urlopen(entry.url, timeout=60) as response:
                    shutil.copyfileobj(response, out)
        got = file_sha256(tmp)
        if got != entry.sha256:
            origin = "derived" if derive is not None else f"downloaded from {entry.url}"
            raise DataError(f"{entry.path}: {origin} but sha256 is {got}, expected "
                            f"{entry.sha256}; the upstream file changed or the download was altered")
        os.replace(tmp, target)
    except OSError as err:  # URLError is an OSError: no network, 404, refused
        raise DataError(f"{entry.path}: download from {entry.url} failed ({err}); "
                        f"copy the file to $ESMERGE_DATA_DIR/{entry.path} by hand") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _verified.cache_clear()
    return target


CYP_ACCESSIONS = {"CYP1A2": "P05177", "CYP2C19": "P33261", "CYP2C9": "P11712", "CYP2D6": "P10635",
                  "CYP3A4": "P08684"}
MOLTRANS_BIOSNAP = "moltrans/dataset/BIOSNAP/full_data/test.csv"


def derive_cyp_fasta() -> str:
    """The text of ``derived/cyp_human.fasta``: each human CYP enzyme's sequence, taken from MolTrans
    BIOSNAP by its UniProt accession (column ``Gene``), as ``>NAME ACCESSION len=N`` + 60-column lines."""
    import textwrap

    biosnap = pd.read_csv(data_path(MOLTRANS_BIOSNAP), usecols=["Gene", "Target Sequence"], dtype=str)
    records = []
    for name, accession in CYP_ACCESSIONS.items():
        sequences = biosnap.loc[biosnap["Gene"] == accession, "Target Sequence"].unique()
        if len(sequences) != 1:
            raise DataError(f"{MOLTRANS_BIOSNAP}: expected one sequence for {accession}, found {len(sequences)}")
        seq = sequences[0]
        records.append(f">{name} {accession} len={len(seq)}\n" + "\n".join(textwrap.wrap(seq, 60)) + "\n")
    return "".join(records)


# Manifest files made here rather than downloaded: path -> function returning the file's text.
DERIVED = {CYP_FASTA: derive_cyp_fasta}


def _print_table(statuses: list[FileStatus]) -> None:
    width = max([len(s.path) for s in statuses] + [4])
    print(f"{'file':<{width}}  {'bytes':>9}  {'status':<7}  where")
    for s in statuses:
        root = str(s.location)[: -len(s.path) - 1] if s.location else "-"  # the search dir it came from
        print(f"{s.path:<{width}}  {s.bytes:>9}  {s.status:<7}  {root}")


def cli(argv: list[str]) -> int:
    """``esmerge data verify`` | ``esmerge data fetch [--force] [FILE ...]``; returns the exit code."""
    import argparse

    parser = argparse.ArgumentParser(prog="esmerge data", description="Upstream data files of the manifest.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("verify", help="check every file against its sha256; exit 0 only if all match")
    fetch_parser = sub.add_parser("fetch", help="download missing files by URL into the cache, hash-checked")
    fetch_parser.add_argument("files", nargs="*", help="manifest paths (default: every missing file)")
    fetch_parser.add_argument("--force", action="store_true", help="download even if a good copy exists")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse has already printed the usage error
        return int(stop.code or 0)
    try:
        entries = manifest()
    except (OSError, yaml.YAMLError, TypeError, KeyError) as err:
        print(f"error: cannot read the data manifest {MANIFEST}: {err}", file=sys.stderr)
        return 1

    if args.command == "verify":
        statuses = verify()
        _print_table(statuses)
        bad = [s for s in statuses if s.status != "ok"]
        for s in bad:
            print(f"error: {s.message}", file=sys.stderr)
        print(f"{len(statuses) - len(bad)} of {len(statuses)} files ok")
        return 1 if bad else 0

    unknown = [f for f in args.files if f not in entries]
    if unknown:
        print(f"error: not in the data manifest: {', '.join(unknown)}", file=sys.stderr)
        return 2
    failures = 0
    for entry in (entries[f] for f in args.files or entries):
        status = check_file(entry)
        in_cache = status.location is not None and cache_dir() / "data" in status.location.parents
        if status.status == "ok" and not args.force:
            continue
        if status.status == "corrupt" and not in_cache:
            print(f"error: {status.message}", file=sys.stderr)  # it would shadow a fresh download
            failures += 1
            continue
        try:
            print(f"fetched {entry.path} -> {fetch(entry, force=True)}")
        except DataError as err:
            print(f"error: {err}", file=sys.stderr)
            failures += 1
    return 1 if failures else 0
