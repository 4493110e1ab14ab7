"""A retrieval-only yardstick: what the in-context examples alone predict, with no LLM.

Two predictors, each returned as a dict shaped like an ``evaluate.evaluate`` result so it can sit
as a row in every results table and claims register:

* ``"majority"`` -- always the majority label of the **context pool** (never of the evaluation
  rows, which would leak their labels);
* ``"knn-shots"`` -- the majority label of the shots each prompt shows (the very examples
  ``evaluate.evaluate`` puts in the LLM's prompt). A tied vote (an even number of shots, or fewer
  shots than asked) goes to the context-pool majority.

A tie in the context pool itself (exactly as many positives as negatives) goes to y = 0.

Two protocols:

* ``yardstick_runs(benchmark, config)`` -- the pools and shots the LLMs see at a scale
  (``benchmark_pools.split_pools`` with the ``EvalConfig``'s sizes and seed, ``config.n_shots`` shots);
* ``full_protocol(benchmark, scale_config=...)`` -- the paper's protocol on the whole benchmark (App. A.4: 5 shots
  retrieved from the training side, evaluation on the whole test side). The project has no
  upstream train/test split per benchmark (``data_manifest/processing.md``: one file per
  benchmark), so ``paper_split`` draws one: a seeded, label-stratified 80/20 split of the rows
  ``benchmarks.load_benchmark`` returns (20 % is TDC's test fraction, which the paper's CYP sizes
  match). **These splits are not the paper's**; its test sides have the sizes of its App. A.1.

``esmerge.report.yardstick.verdict_table`` puts the yardstick beside the paper's ES-Merging (``paper_results.csv``).
"""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from esmerge import evaluate
from esmerge.data import benchmarks
from esmerge.data.benchmark_pools import split_pools
from esmerge.errors import UsageError
from esmerge.scales import ScaleConfig

METHODS = ("majority", "knn-shots")
PAPER_SHOTS = 5  # App. A.4
TEST_FRACTION = 0.2  # TDC's test fraction; the paper's CYP test sizes are 20 % of the TDC tables
TIE_LABEL = 0  # a context pool with exactly as many positives as negatives


# --------------------------------------------------------------------------- votes
def majority_vote(labels: Sequence[int], tie_label: int = TIE_LABEL) -> int:
    """The most frequent of the binary ``labels`` (``[n]``); ``tie_label`` on a tie or when empty.

    >>> majority_vote([0, 1, 1])
    1
    >>> majority_vote([0, 1, 0, 1], tie_label=1), majority_vote([], tie_label=0)
    (1, 0)
    """
    labels = np.asarray(labels, dtype=int)
    positives = int((labels == 1).sum())
    negatives = len(labels) - positives
    return 1 if positives > negatives else 0 if negatives > positives else int(tie_label)


def knn_vote(shot_labels: Iterable[Sequence[int]], tie_label: int) -> np.ndarray:
    """Per query, the majority label of its shots; ``shot_labels`` holds one label list per query
    (lists may differ in length). Ties go to ``tie_label`` (the context-pool majority). ``[n]``.

    >>> knn_vote([[1, 1, 0], [0, 0, 1], [1, 0], []], tie_label=0).tolist()
    [1, 0, 0, 0]
    """
    return np.asarray([majority_vote(s, tie_label) for s in shot_labels], dtype=int)


def positive_share(shot_labels: Iterable[Sequence[int]]) -> np.ndarray:
    """Fraction of positive shots per query (0.5 for a query without shots), ``[n]``: the k-NN
    vote as a score, for AUROC.

    >>> positive_share([[1, 1, 0], []]).round(3).tolist()
    [0.667, 0.5]
    """
    return np.asarray([float(np.mean(s)) if len(s) else 0.5 for s in shot_labels])


# --------------------------------------------------------------------------- results
def _result(method: str, benchmark: str, eval_df: pd.DataFrame, pred: np.ndarray, score: np.ndarray,
            config: "evaluate.EvalConfig", seconds: float, **extra) -> dict:
    """The fields of an ``evaluate.evaluate`` result (``scores`` = ``[n, 2]`` share of shots per label)."""
    y = eval_df["y"].astype(int).to_numpy()
    pred = np.asarray(pred, dtype=int)
    return {
        "method": method, "benchmark": benchmark, "model_id": f"yardstick-{method}",
        "n": int(len(y)), "seed": config.seed, "config": config.key(),
        "accuracy": float(evaluate.accuracy(y, pred)),
        "accuracy_ci": list(evaluate.bootstrap_ci(y, pred, "accuracy", config.n_resamples, config.seed)),
        "macro_f1": float(evaluate.macro_f1(y, pred)),
        "macro_f1_ci": list(evaluate.bootstrap_ci(y, pred, "macro_f1", config.n_resamples, config.seed)),
        "auroc": evaluate.auroc(y, 2 * score - 1),
        "mean_prompt_tokens": float("nan"), "seconds": float(seconds),  # no prompt: no LLM
        "example_ids": [str(i) for i in eval_df.index], "y": y.tolist(), "pred": pred.tolist(),
        "scores": np.stack([1 - score, score], 1).round(4).tolist(), **extra,
    }


def yardstick_from_shots(benchmark: str, eval_df: pd.DataFrame, context_df: pd.DataFrame,
                         shots: Sequence[Sequence[int]], config: "evaluate.EvalConfig",
                         seconds: float = 0.0) -> dict[str, dict]:
    """Both yardsticks given each query's shots (positions in ``context_df``, as
    ``retrieve_examples`` returns them). Only ``context_df``'s labels are read to predict."""
    pool_y = context_df["y"].astype(int).to_numpy()
    pool_majority = majority_vote(pool_y)
    shot_labels = [pool_y[list(s)] for s in shots]
    n_context = int(len(context_df))
    constant = np.full(len(eval_df), pool_majority)
    return {
        "majority": _result("majority", benchmark, eval_df, constant, constant.astype(float), config, seconds,
                            n_context=n_context, context_majority=pool_majority),
        "knn-shots": _result("knn-shots", benchmark, eval_df, knn_vote(shot_labels, pool_majority),
                             positive_share(shot_labels), config, seconds, n_context=n_context,
                             context_majority=pool_majority, shots_per_query=float(np.mean([len(s) for s in shots]))),
    }


def scale_pools(benchmark: str, config: "evaluate.EvalConfig") -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(eval_df, context_df)`` exactly as ``evaluate.evaluate`` draws them for ``config``."""
    return split_pools(benchmarks.load_benchmark(benchmark), config.n_eval, config.n_context, config.seed)


def yardstick_runs(benchmark: str, config: "evaluate.EvalConfig", *,
                   pools: tuple[pd.DataFrame, pd.DataFrame] | None = None,
                   retrieval: "evaluate.RetrievalCache | None" = None) -> dict[str, dict]:
    """``{"majority": result, "knn-shots": result}`` at the evaluation's pools and shots.

    The shots come from ``evaluate.RetrievalCache.shots`` with ``config.n_shots``: the call that
    picks the LLM's in-context examples in ``evaluate.evaluate`` (pass the sweep's
    ``EvalSession.retrieval`` to reuse its shots).
    """
    started = time.time()
    eval_df, context_df = pools if pools is not None else scale_pools(benchmark, config)
    retrieval = retrieval if retrieval is not None else evaluate.RetrievalCache()
    _, shots = retrieval.shots(benchmarks.spec(benchmark).kind, benchmark, eval_df, context_df, config.n_shots)
    return yardstick_from_shots(benchmark, eval_df, context_df, shots, config, time.time() - started)


def yardstick_run(benchmark: str, config: "evaluate.EvalConfig", method: str = "knn-shots", *,
                  pools: tuple[pd.DataFrame, pd.DataFrame] | None = None) -> dict:
    """One yardstick (``"majority"`` or ``"knn-shots"``) on ``benchmark`` at ``config``'s pools."""
    if method not in METHODS:
        raise UsageError(f"unknown yardstick {method!r}: choose {' or '.join(METHODS)}")
    return yardstick_runs(benchmark, config, pools=pools)[method]


def yardstick_all(names: Iterable[str], config: "evaluate.EvalConfig",
                  retrieval: "evaluate.RetrievalCache | None" = None) -> dict[str, dict[str, dict]]:
    """``{method: {benchmark: result}}`` over benchmarks ``names``: the shape ``esmerge.report.results_table``
    and ``esmerge.report.claims`` take."""
    out: dict[str, dict[str, dict]] = {m: {} for m in METHODS}
    for bench in names:
        for method, result in yardstick_runs(bench, config, retrieval=retrieval).items():
            out[method][bench] = result
    return out


# --------------------------------------------------------------------------- the paper's protocol
def paper_split(df: pd.DataFrame, seed: int = 0, test_fraction: float = TEST_FRACTION
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(test_df, train_df)``: a seeded, label-stratified split of all of ``df``'s rows
    (``benchmark_pools.split_pools`` with ``n_eval = round(test_fraction * len(df))`` and the rest as context).

    >>> frame = pd.DataFrame({"y": [0] * 6 + [1] * 4})
    >>> test, train = paper_split(frame, seed=0, test_fraction=0.5)
    >>> len(test), len(train), int(test["y"].sum()), sorted(set(test.index) | set(train.index)) == list(range(10))
    (5, 5, 2, True)
    """
    if not 0 < test_fraction < 1:
        raise UsageError(f"test_fraction={test_fraction}: choose a fraction strictly between 0 and 1")
    n_test = int(round(test_fraction * len(df)))
    return split_pools(df, n_test, len(df) - n_test, seed)


def full_protocol(benchmark: str, seed: int = 0, n_shots: int = PAPER_SHOTS, test_fraction: float = TEST_FRACTION,
                  n_resamples: int = 1000, *, scale_config: ScaleConfig) -> dict[str, dict]:
    """Both yardsticks under the paper's protocol on the whole benchmark (``paper_split``; shots by
    ``retrieve_all``, equal to ``evaluate.retrieve_examples`` but fast on a 40,000-row pool). The
    settings the protocol leaves open (recorded in each result's ``config``) are ``scale_config``'s."""
    started = time.time()
    test_df, train_df = paper_split(benchmarks.load_benchmark(benchmark), seed, test_fraction)
    config = evaluate.EvalConfig.for_scale(scale_config, n_eval=len(test_df), n_context=len(train_df),
                                           n_shots=n_shots, seed=seed, n_resamples=n_resamples)
    shots = retrieve_all(train_df, test_df, benchmarks.spec(benchmark).kind, n_shots)
    return yardstick_from_shots(benchmark, test_df, train_df, shots, config, time.time() - started)


# --------------------------------------------------------------------------- fast retrieval
def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _entity_key(value) -> str:
    """As ``evaluate``'s rule: None and NaN (a missing entity) are both ``""``."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _fingerprints(smiles: list[str]) -> list:
    """Morgan fingerprints (radius 2, 2048 bits) as App. A.4 and ``evaluate.tanimoto`` use them;
    an unparsable or missing molecule gets an empty one (similar to nothing)."""
    from rdkit import Chem, DataStructs, RDLogger  # deferred: rdkit is slow to import
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    out = []
    for s in smiles:
        mol = Chem.MolFromSmiles(s) if s else None
        out.append(generator.GetFingerprint(mol) if mol is not None else DataStructs.ExplicitBitVect(2048))
    return out


class _Vocabulary:
    """Distinct values of pool entities; a query's similarity to each is computed once and memoised."""

    def __init__(self, values: list, similarity):
        self.items = list(dict.fromkeys(values))
        self.row = {v: i for i, v in enumerate(self.items)}
        self._similarity, self._memo = similarity, {}

    def ids(self, values: list) -> np.ndarray:
        return np.asarray([self.row[v] for v in values], dtype=np.int64)

    def to(self, query) -> np.ndarray:
        if query not in self._memo:
            if len(self._memo) * len(self.items) > 5_000_000:  # CYP: every query molecule is new
                self._memo.clear()
            self._memo[query] = np.asarray(self._similarity(query, self.items), dtype=float)
        return self._memo[query]


def _lex_top(keys: list[np.ndarray], idx: np.ndarray, k: int) -> list[int]:
    """The ``k`` of ``idx`` (ascending) that sort first by ``keys`` (each larger-first), then by
    position: ``np.lexsort`` restricted, by pruning, to the rows that can still make the cut.

    >>> _lex_top([np.array([1., 0., 1., 1.]), np.array([.2, .9, .5, .5])], np.arange(4), 2)
    [2, 3]
    """
    if k <= 0 or len(idx) == 0:
        return []
    if len(idx) <= k or not keys:
        order = np.lexsort([idx] + [-key[idx] for key in reversed(keys)])
        return [int(i) for i in idx[order][:k]]
    values = keys[0][idx]
    cut = np.partition(values, len(values) - k)[len(values) - k]  # the k-th largest value
    ahead = idx[values > cut]  # fewer than k rows: all of them are in
    return _lex_top(keys, ahead, len(ahead)) + _lex_top(keys[1:], idx[values == cut], k - len(ahead))


def retrieve_all(context_df: pd.DataFrame, queries: pd.DataFrame, kind: str, k: int) -> list[list[int]]:
    """``[evaluate.retrieve_examples(ContextIndex(context_df, kind), q, k) for q in queries]``,
    computed per distinct entity: same keys (exact match, cosine or Jaccard, Tanimoto), same float
    arithmetic, same exclusion of rows showing the query's entities, same tie-break by position."""
    from rdkit import DataStructs  # deferred: rdkit is slow to import

    pool = context_df.reset_index(drop=True)
    mols = pool["molecule"].map(_text).tolist()
    mols2 = pool["molecule2"].map(_text).tolist() if kind == "drugcomb" else []
    fps = dict(zip(dict.fromkeys(mols + mols2), _fingerprints(list(dict.fromkeys(mols + mols2)))))
    tanimoto = _Vocabulary(list(fps), lambda q, items: DataStructs.BulkTanimotoSimilarity(
        fps[q] if q in fps else _fingerprints([q])[0], [fps[s] for s in items]))
    mol_id, mol2_id = tanimoto.ids(mols), tanimoto.ids(mols2)
    columns = [c for c in ("molecule", "molecule2", "protein", "cell_id") if c in pool]
    entity = lambda row: "\x1f".join(_entity_key(row.get(c)) for c in columns)  # noqa: E731
    entity_ids: dict[str, int] = {}
    pool_entities = np.asarray([entity_ids.setdefault(entity(r), len(entity_ids)) for _, r in pool.iterrows()])
    if kind == "mol-prot":
        from esmerge.specialists.encoders import protein_features

        proteins = pool["protein"].map(_text).tolist()
        distinct = sorted(set(proteins))
        feats = protein_features(distinct).double()
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)

        def cosine(protein, items):  # the query's features are computed as evaluate computes them
            if not protein:
                return np.zeros(len(items))
            q = protein_features([protein]).double()[0]
            return (feats @ (q / q.norm().clamp_min(1e-12))).numpy()

        prot = _Vocabulary(distinct, cosine)
        prot_id = prot.ids(proteins)
    if kind in ("gdsc", "drugcomb"):
        gene_sets = [frozenset(list(g)[:50]) if g is not None and len(g) else frozenset() for g in pool["cell_genes"]]
        cells = _Vocabulary(gene_sets, lambda q, items: [
            (len(g & q) / len(g | q) if (g or q) else 0.0, float(g == q and bool(q))) for g in items])
        cell_id = cells.ids(gene_sets)
    out = []
    for _, query in queries.iterrows():
        tan = tanimoto.to(_text(query["molecule"]))[mol_id]
        if kind == "drugcomb":
            q1, q2 = _text(query["molecule"]), _text(query["molecule2"])
            aligned = (tan + tanimoto.to(q2)[mol2_id]) / 2
            crossed = (tanimoto.to(q1)[mol2_id] + tanimoto.to(q2)[mol_id]) / 2
            tan = np.maximum(aligned, crossed)
        if kind == "mol-prot":
            protein = _text(query["protein"])
            exact = (prot_id == prot.row.get(protein, -1)).astype(float)
            keys = [exact, prot.to(protein)[prot_id], tan]
        elif kind in ("gdsc", "drugcomb"):
            g = query["cell_genes"]
            q = frozenset(list(g)[:50]) if g is not None and len(g) else frozenset()
            jaccard_exact = cells.to(q)[cell_id]
            keys = [jaccard_exact[:, 1], jaccard_exact[:, 0], tan]
        else:
            keys = [tan]
        allowed = np.flatnonzero(pool_entities != entity_ids.get(entity(query), -1))
        out.append(_lex_top(keys, allowed, k))
    return out


