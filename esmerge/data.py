"""Upstream data: manifest, resolution, hash verification, and loaders.

Files are never copied into this repository. ``data_manifest/files.yaml`` records, for every
upstream file, its path (as mirrored in ``../shared/data``), upstream URL at a pinned commit,
sha256, size and licence. A file is resolved from, in order:

1. ``$ESMERGE_DATA_DIR``;
2. ``../shared/data`` beside the repository (when it exists);
3. the user cache (``$ESMERGE_CACHE/data``), where ``fetch`` downloads it by URL.

Every resolved file is checked against its sha256 before use.
"""
from __future__ import annotations

import gzip
import logging
import os
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
