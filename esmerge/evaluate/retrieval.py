"""In-context example retrieval (App. A.4): which pool rows are shown as examples for a query.

``ContextIndex`` computes a context pool's similarity features once; ``retrieve_examples`` ranks
the pool for one query; ``RetrievalCache`` keeps the shots of a whole evaluation pool, since
retrieval does not depend on the model and a sweep scores many models on the same pools.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from esmerge.specialists.encoders import protein_features


def _fingerprint(smiles: str):
    from rdkit import Chem, DataStructs, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles) if isinstance(smiles, str) and smiles else None
    if mol is None:  # an unparsable or missing molecule is similar to nothing
        return DataStructs.ExplicitBitVect(2048)
    return rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048).GetFingerprint(mol)


def tanimoto(query: str, pool: list[str]) -> np.ndarray:
    """Tanimoto similarity of Morgan fingerprints (radius 2, 2048 bits), ``[len(pool)]``."""
    from rdkit import DataStructs

    return np.asarray(DataStructs.BulkTanimotoSimilarity(_fingerprint(query), [_fingerprint(s) for s in pool]))


def as_text(value) -> str:
    """A text entity, or ``""`` when it is missing (None or NaN)."""
    return value if isinstance(value, str) else ""


def _key(value) -> str:
    """An entity as a comparable string; None and NaN (a missing entity) are both ``""``."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _gene_set(genes, top: int = 50) -> frozenset:
    return frozenset(list(genes)[:top]) if genes is not None and len(genes) else frozenset()


class ContextIndex:
    """A context pool with the similarity features App. A.4 ranks by, computed once.

    ``pool`` has the columns of ``benchmarks.load_benchmark``. Fingerprints, protein features
    (unit-normalised ``encoders.protein_features``, our stand-in for ESM2 embeddings) and
    top-50 gene sets are computed per distinct entity.
    """

    def __init__(self, pool: pd.DataFrame, kind: str):
        from rdkit import DataStructs

        self.pool, self.kind = pool.reset_index(drop=True), kind
        self._bulk = DataStructs.BulkTanimotoSimilarity
        fps: dict[str, object] = {}
        self.mol_fps = [fps.setdefault(s, _fingerprint(s)) for s in self.pool["molecule"].map(as_text)]
        self._fps = fps
        if kind == "drugcomb":
            self.mol2_fps = [fps.setdefault(s, _fingerprint(s)) for s in self.pool["molecule2"].map(as_text)]
        if kind == "mol-prot":
            self.proteins = self.pool["protein"].map(as_text).tolist()
            distinct = sorted(set(self.proteins))
            feats = protein_features(distinct).double()
            feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self._prot_row = {p: i for i, p in enumerate(distinct)}
            self._prot_feats = feats
        if kind in ("gdsc", "drugcomb"):
            self.gene_sets = [_gene_set(g) for g in self.pool["cell_genes"]]

    def _tan(self, smiles: str, fps: list) -> np.ndarray:
        query = self._fps.get(smiles) or _fingerprint(smiles)
        return np.asarray(self._bulk(query, fps))

    def scores(self, query: pd.Series) -> list[np.ndarray]:
        """Sort keys, most important first; larger is better. Each ``[len(pool)]``."""
        tan = self._tan(as_text(query["molecule"]), self.mol_fps)
        if self.kind == "drugcomb":
            # Drug order within a pair is arbitrary: take the better of the two alignments.
            q1, q2 = as_text(query["molecule"]), as_text(query["molecule2"])
            aligned = (tan + self._tan(q2, self.mol2_fps)) / 2
            crossed = (self._tan(q1, self.mol2_fps) + self._tan(q2, self.mol_fps)) / 2
            tan = np.maximum(aligned, crossed)
        if self.kind == "mol-prot":
            protein = as_text(query["protein"])
            exact = np.asarray([p == protein for p in self.proteins], dtype=float)
            q = protein_features([protein]).double()[0] if protein else None
            if q is None:
                cos = np.zeros(len(self.pool))
            else:
                q = q / q.norm().clamp_min(1e-12)
                per_protein = (self._prot_feats @ q).numpy()
                cos = np.asarray([per_protein[self._prot_row[p]] for p in self.proteins])
            return [exact, cos, tan]
        if self.kind in ("gdsc", "drugcomb"):
            q = _gene_set(query["cell_genes"])
            exact = np.asarray([g == q and bool(q) for g in self.gene_sets], dtype=float)
            jac = np.asarray([len(g & q) / len(g | q) if (g or q) else 0.0 for g in self.gene_sets])
            return [exact, jac, tan]
        return [tan]  # CYP: all samples share the enzyme, molecules alone decide

    def _same_entities(self, query: pd.Series) -> np.ndarray:
        """Pool rows showing exactly the query's entities (duplicates across the split would leak the label)."""
        same = np.ones(len(self.pool), dtype=bool)
        for col in ("molecule", "molecule2", "protein", "cell_id"):
            if col in self.pool:
                same &= np.asarray([_key(v) for v in self.pool[col]]) == _key(query.get(col))
        return same


def retrieve_examples(index: ContextIndex, query: pd.Series, k: int = 5) -> list[int]:
    """Positions in ``index.pool`` of the ``k`` in-context examples for ``query`` (App. A.4).

    * mol-prot: pool rows with exactly the query's protein first, ranked by Tanimoto similarity
      of Morgan fingerprints to the query molecule; remaining slots from the most similar proteins
      (cosine of protein features in place of the paper's ESM2 embeddings), Tanimoto breaking ties
      within a protein.
    * mol-cell: rows whose cell has exactly the query's top-50 gene set first, then by Jaccard
      similarity of top-50 gene sets, Tanimoto breaking ties (DrugComb: mean over the two drugs,
      the better of the two pairings).
    * CYP: Tanimoto only.

    Rows with exactly the query's entities are never chosen. Ties left after all keys are broken
    by pool position, so retrieval is deterministic. The paper's Table 9 shows examples in the
    order retrieved (most similar first); so do we.
    """
    keys = index.scores(query)
    allowed = ~index._same_entities(query)
    order = np.lexsort([np.arange(len(index.pool))] + [-key for key in reversed(keys)])
    return [int(i) for i in order if allowed[i]][:k]



def frame_digest(frame: pd.DataFrame) -> str:
    """Hash of a pool's entities, labels and index (what retrieval and scoring depend on)."""
    cols = [c for c in ("molecule", "molecule2", "protein", "cell_id", "y") if c in frame]
    blob = frame[cols].astype(str).to_csv().encode() + ",".join(map(str, frame.index)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class RetrievalCache:
    """The shots of every query of an evaluation pool, kept per ``(benchmark, pools, n_shots)``.

    Retrieval does not depend on the model, so one cache serves a sweep over models; at most
    ``limit`` pool pairs are kept (the oldest half is forgotten beyond that).
    """

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._shots: dict[tuple, tuple[pd.DataFrame, list[list[int]]]] = {}

    def shots(self, kind: str, benchmark: str, eval_df: pd.DataFrame, context_df: pd.DataFrame,
              n_shots: int) -> tuple[pd.DataFrame, list[list[int]]]:
        """``(pool, positions of the shots in pool for each query of eval_df)``."""
        key = (benchmark, frame_digest(eval_df), frame_digest(context_df), n_shots)
        if key not in self._shots:
            if len(self._shots) > self.limit:
                self._shots.clear()
            index = ContextIndex(context_df, kind)
            self._shots[key] = (index.pool, [retrieve_examples(index, row, n_shots) for _, row in eval_df.iterrows()])
        return self._shots[key]
