"""The evaluation driver: one model on one benchmark -> accuracy, macro-F1, CIs and every answer.

``evaluate`` validates the pools (``benchmarks.check_rows``) before any model work, retrieves the
shots, builds the prompts, scores both answers (``config.scoring="loglik"``) or reads the label from
a greedy reply (``"generate"``, the paper's own scoring) and caches the result as JSON under ``out_dir``
(keyed by the model's weights, the benchmark, the pools and the settings), so an interrupted sweep
resumes. ``EvalSession`` holds what a sweep over models shares: entity features, retrieved shots
and the PEFT copy of the base.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch

from esmerge.cache import atomic_write_json
from esmerge.data.benchmark_pools import split_pools
from esmerge.data.benchmarks import BENCHMARK_NAMES, check_rows, load_benchmark, spec
from esmerge.errors import UsageError
from esmerge.evaluate import calibration, scoring
from esmerge.evaluate.generation import MAX_NEW_TOKENS, SCORINGS, generate_replies, score_replies
from esmerge.evaluate.models import ModelUnderTest, PeftCopies
from esmerge.evaluate.prompts import PromptOptions, build_prompt
from esmerge.evaluate.retrieval import RetrievalCache, frame_digest
from esmerge.evaluate.scoring import FeatureCache, collate, common_n_tokens, label_logits, prompt_token_ids
from esmerge.evaluate.stats import accuracy, auroc, bootstrap_ci, macro_f1
from esmerge.paths import runs_root
from esmerge.progress import track
from esmerge.scales import ScaleConfig

SHOT_LABELS = ("retrieved", "shuffled")
PROMPT_VERSION = 1  # bump when prompts or scoring change, so cached results are recomputed


@dataclass(frozen=True, repr=False, kw_only=True)
class EvalConfig:
    """Everything that decides an evaluation's numbers (and hence its cache key).

    A scale's settings come from ``for_scale(config)`` (its ``ScaleConfig.evaluation``); the fields a
    scale sets have no default of their own (keyword-only, in the order shown). At cpu, n = 64 gives a
    95 % CI of about +-12 points on a per-benchmark accuracy.
    ``scoring``: ``"loglik"`` (the likelier answer, ``evaluate.scoring``) or ``"generate"`` (a greedy
    reply of at most ``max_new_tokens`` read by its ``Final answer:``, ``evaluate.generation``).
    ``decision="cross-fit"`` fits each of ``n_folds`` folds' threshold on the other folds' evaluation
    rows (``calibration.cross_fit_decision``) and scores no calibration prompts.
    """

    n_eval: int
    n_context: int
    n_shots: int
    seed: int = 0
    top_k_genes: int
    protein_chars: int
    smiles_chars: int | None
    batch_size: int
    n_resamples: int
    decision: str  # calibration.DECISIONS
    n_calibration: int  # read by "contextual" and "context-threshold" only
    n_folds: int = calibration.N_FOLDS  # read by decision="cross-fit" only
    shot_labels: str = "retrieved"  # "shuffled": the shots-shuffled control (calibration.shuffled_shot_labels)
    scoring: str  # generation.SCORINGS
    max_new_tokens: int = MAX_NEW_TOKENS  # read only by scoring="generate"

    def prompt_options(self, token_modalities) -> PromptOptions:
        """How this evaluation shows entities, with ``token_modalities`` as projector tokens."""
        return PromptOptions(frozenset(token_modalities), self.top_k_genes, self.protein_chars, self.smiles_chars)

    @classmethod
    def for_scale(cls, config: ScaleConfig, **overrides) -> "EvalConfig":
        """The evaluation settings of a scale (``config.evaluation``), with ``overrides``.

        >>> from esmerge import scales
        >>> EvalConfig.for_scale(scales.get("smoke"), n_eval=5).n_eval, EvalConfig.for_scale(scales.get("cpu")).n_eval
        (5, 32)
        """
        defaults = config.evaluation
        own = {f.name for f in fields(cls)}
        chosen = {**{k: v for k, v in defaults.__dict__.items() if k in own}, **overrides}
        if overrides.get("scoring") == "generate" and "decision" not in overrides:
            chosen["decision"] = "argmax"  # a parsed reply has no scores for the scale's fitted decision to read
        return cls(**chosen)

    def __post_init__(self):
        from esmerge.errors import check_seed

        check_seed(self.seed, "seed")  # the pools' numpy generator takes [0, 2**32)
        if self.decision not in calibration.DECISIONS:
            raise UsageError(f"decision={self.decision!r}: choose one of {', '.join(calibration.DECISIONS)}")
        if self.shot_labels not in SHOT_LABELS:
            raise UsageError(f"shot_labels={self.shot_labels!r}: choose one of {', '.join(SHOT_LABELS)}")
        if self.scoring not in SCORINGS:
            raise UsageError(f"scoring={self.scoring!r}: choose one of {', '.join(SCORINGS)}")
        if isinstance(self.n_folds, bool) or not isinstance(self.n_folds, (int, np.integer)) or self.n_folds < 2:
            raise UsageError(f"n_folds={self.n_folds!r}: cross-fitting needs at least 2 folds")
        if self.scoring == "generate" and self.decision != "argmax":
            raise UsageError(f"decision={self.decision!r} reads the two answers' scores, which "
                             "scoring='generate' has none of: use decision='argmax' or scoring='loglik'")

    def _shown(self) -> dict:
        # The generation fields only when generating, and the fold count only when cross-fitting,
        # so other settings keep the keys (and the printed form) they had before those existed.
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.scoring == "loglik":
            shown.pop("scoring"), shown.pop("max_new_tokens")
        if self.decision != "cross-fit":
            shown.pop("n_folds")
        return shown

    def __repr__(self) -> str:
        return f"EvalConfig({', '.join(f'{k}={v!r}' for k, v in self._shown().items())})"

    def key(self) -> dict:
        """The settings that decide the numbers; the decision fields only when they differ from the
        plain argmax on retrieved shots, and the generation fields only with ``scoring="generate"``,
        so results computed before they existed keep their keys. ``"cross-fit"`` keys its ``n_folds``
        and not ``n_calibration`` (it scores no calibration rows)."""
        key = {k: v for k, v in self._shown().items() if k != "batch_size"}
        if self.decision in ("argmax", "cross-fit"):
            key.pop("n_calibration")
        if self.decision == "argmax":
            key.pop("decision")
        if self.shot_labels == "retrieved":
            key.pop("shot_labels")
        return key


def check_pool_sizes(benchmark: str, config: EvalConfig, rows: int) -> None:
    """Refuse settings whose pools ``benchmark`` (``rows`` usable rows) cannot supply, in one line naming both.

    >>> from esmerge import scales
    >>> config = EvalConfig.for_scale(scales.get("cpu"), n_eval=700, n_context=12)
    >>> check_pool_sizes("CYP2C9-substrate", config, rows=666)
    ... # doctest: +NORMALIZE_WHITESPACE
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: n_eval=700 (--n-eval): CYP2C9-substrate has 666 rows, 12 of them for the in-context
    pool; use at most 654
    """
    if config.n_eval + config.n_context > rows:
        raise UsageError(f"n_eval={config.n_eval} (--n-eval): {benchmark} has {rows} rows, {config.n_context} of them "
                         f"for the in-context pool; use at most {max(rows - config.n_context, 0)}")
    if config.n_shots > config.n_context:
        raise UsageError(f"n_shots={config.n_shots} (--n-shots): the in-context pool of {benchmark} holds "
                         f"{config.n_context} rows; use at most {config.n_context}")


def default_config(config: ScaleConfig) -> EvalConfig:
    """A scale's evaluation settings: ``EvalConfig.for_scale(config)``."""
    return EvalConfig.for_scale(config)


def default_benchmarks(config: ScaleConfig) -> tuple[str, ...]:
    """The benchmarks a scale evaluates by default (all 13 unless its ``evaluation.benchmarks`` names fewer)."""
    return config.evaluation.benchmarks or BENCHMARK_NAMES


def eval_dir(scale: str) -> Path:
    """Default cache of evaluation results: ``runs/{scale}/07_results/evals`` (``$ESMERGE_RUNS_DIR`` honoured)."""
    return runs_root() / scale / "07_results" / "evals"


@dataclass
class EvalSession:
    """What a sweep over models and benchmarks shares; pass one to every ``evaluate`` call of a sweep."""

    features: FeatureCache = field(default_factory=FeatureCache)
    retrieval: RetrievalCache = field(default_factory=RetrievalCache)
    copies: PeftCopies = field(default_factory=PeftCopies)


def evaluate(mut: ModelUnderTest, benchmark: str, config: EvalConfig, *,
             pools: tuple[pd.DataFrame, pd.DataFrame] | None = None, out_dir: Path | None = None,
             progress: bool = True, session: EvalSession | None = None) -> dict:
    """Evaluate ``mut`` on ``benchmark``; cached as JSON under ``out_dir``.

    ``pools = (eval_df, context_df)`` overrides ``split_pools(load_benchmark(...))``; both are
    checked by ``benchmarks.check_rows`` first (``InputError`` naming the row: a label other than
    0/1, a repeated row, an unknown cell line, ...). ``session`` shares caches across calls. No
    default evaluation row is a protocol row (``benchmark_pools.protocol_rows``, where a decision rule or
    shot count may be chosen): the evaluation rows are the head of ``split_pools``' draw, those the tail.
    Returns ``{method, benchmark, model_id, accuracy, accuracy_ci, macro_f1, macro_f1_ci, n, seed,
    config, example_ids, y, pred, scores, seconds}`` (metrics in percent, CIs at 95 %); a fitted
    ``config.decision`` (``evaluate.calibration``) adds ``decision`` (its ``rule``, ``n_calibration``
    the calibration rows scored, and what was fitted: on context rows only, or for ``"cross-fit"``
    ``k``, each row's ``folds`` and the per-fold ``fold_thresholds``, each fitted on the other folds'
    evaluation rows) and ``pred_argmax``; ``decision_rule(result)`` names the rule of any result.
    ``config.shot_labels="shuffled"`` is the shots-shuffled control.
    ``config.scoring="generate"`` answers by greedy replies: ``pred`` is -1 for a reply naming no label
    (counted wrong), ``scores`` is None and ``auroc`` NaN, and the result adds ``scoring``, ``replies``,
    ``invalid_rate`` (percent) and ``n_invalid``.
    """
    session = session or EvalSession()
    kind = spec(benchmark).kind
    if pools is None:
        frame = load_benchmark(benchmark)
        check_pool_sizes(benchmark, config, len(frame))
        pools = split_pools(frame, config.n_eval, config.n_context, config.seed)
    eval_df, context_df = pools
    check_rows(benchmark, eval_df, "eval pool")
    check_rows(benchmark, context_df, "context pool")
    if len(context_df) < config.n_shots:
        raise UsageError(f"n_shots={config.n_shots} (--n-shots): the in-context pool of {benchmark} holds "
                         f"{len(context_df)} rows; use at most {len(context_df)}")
    options = config.prompt_options(mut.projectors)
    key_parts = [PROMPT_VERSION, mut.model_id(benchmark), benchmark, config.key(), options.key(),
                 frame_digest(eval_df), frame_digest(context_df)]
    digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = (out_dir or eval_dir(mut.base.scale)) / mut.name / f"{benchmark}-{digest}.json"
    if path.exists():
        return json.loads(path.read_text())

    started = time.time()
    tokenizer = mut.base.tokenizer
    n_tokens = common_n_tokens(mut.projectors)  # None: each projector gives its own block lengths
    prompts = _prompts(benchmark, kind, eval_df, context_df, config, options, tokenizer, session)
    y = eval_df["y"].astype(int).to_numpy()
    desc = f"{mut.name} / {benchmark}"
    if config.scoring == "generate":
        replies = _generate_all(mut, benchmark, prompts, config, session, n_tokens, progress, desc)
        scored = score_replies(replies, prompts[0].labels if prompts else ("", ""), y)
        pred, score, decision = np.asarray(scored["pred"], dtype=int), None, {}
    else:
        fit_prompts, fit_y = _fitting_prompts(benchmark, kind, context_df, config, options, tokenizer, session)
        score, fit_score = _score_all(mut, benchmark, [prompts, fit_prompts], config, session, n_tokens, progress,
                                      [desc, f"{desc} (calibration)"])
        pred, decision = _decide(score, fit_score if fit_prompts else None, fit_y, config, y)
    result = {
        "method": mut.name, "benchmark": benchmark, "model_id": mut.model_id(benchmark),
        "n": int(len(y)), "seed": config.seed, "config": config.key(), "options": options.key(),
        "accuracy": float(accuracy(y, pred)),
        "accuracy_ci": list(bootstrap_ci(y, pred, "accuracy", config.n_resamples, config.seed)),
        "macro_f1": float(macro_f1(y, pred)),
        "macro_f1_ci": list(bootstrap_ci(y, pred, "macro_f1", config.n_resamples, config.seed)),
        "auroc": auroc(y, score[:, 1] - score[:, 0]) if score is not None else float("nan"),
        "mean_prompt_tokens": float(np.mean([len(prompt_token_ids(p, tokenizer, n_tokens, 0, mut.projectors)[0])
                                             for p in prompts])),
        "seconds": time.time() - started,
        "example_ids": [str(i) for i in eval_df.index], "y": y.tolist(), "pred": pred.tolist(),
        "scores": score.round(4).tolist() if score is not None else None,
    }
    if decision:
        result["decision"] = decision
        result["pred_argmax"] = score.argmax(1).tolist()
    if config.scoring == "generate":
        result.update(scoring="generate", replies=replies, invalid_rate=scored["invalid_rate"],
                      n_invalid=scored["n_invalid"])
    atomic_write_json(path, result)
    return result


def _score_all(mut, benchmark, prompt_lists, config, session, n_tokens, progress, descs) -> list:
    """``label_logits`` ``[n, 2]`` (numpy) of each list of prompts, in the prompts' order (None for an
    empty list). Prompts are scored in ``length_batches`` of ``config.batch_size``: similar lengths
    together, so little of each batch is padding."""
    tokenizer = mut.base.tokenizer
    out = []
    with mut.model_for(benchmark, session.copies) as model, torch.no_grad():
        for todo, desc in zip(prompt_lists, descs):
            if not todo:
                out.append(None)
                continue
            groups = scoring.length_batches(_token_counts(todo, tokenizer, n_tokens, mut.projectors), config.batch_size)
            scores = torch.empty(len(todo), 2)
            for rows in track(groups, desc=desc, unit="batch", disable=not progress):
                batch = collate([todo[i] for i in rows], tokenizer, n_tokens, session.features, mut.projectors)
                scores[rows] = label_logits(model, batch, mut.projectors).float().cpu()
            out.append(scores.numpy())
    return out


def _token_counts(prompts, tokenizer, n_tokens, projectors) -> list[int]:
    return [len(prompt_token_ids(p, tokenizer, n_tokens, 0, projectors)[0]) for p in prompts]


def _generate_all(mut, benchmark, prompts, config, session, n_tokens, progress, desc) -> list[str]:
    """Greedy replies (``generation.generate_replies``) to ``prompts``, in their order, generated in
    ``length_batches`` of ``config.batch_size``."""
    replies: list[str] = [""] * len(prompts)
    lengths = _token_counts(prompts, mut.base.tokenizer, n_tokens, mut.projectors)
    groups = scoring.length_batches(lengths, config.batch_size)
    with mut.model_for(benchmark, session.copies) as model:
        for rows in track(groups, desc=desc, unit="batch", disable=not progress):
            got = generate_replies(model, [prompts[i] for i in rows], mut.base.tokenizer, mut.projectors,
                                   n_tokens, config.max_new_tokens, features=session.features)
            for i, reply in zip(rows, got):
                replies[i] = reply
    return replies


def _prompts(benchmark, kind, queries, pool_df, config, options, tokenizer, session, content_free=False,
             shuffle=None):
    """The prompts of ``queries`` with shots retrieved from ``pool_df``: shot labels shuffled when
    ``shuffle`` (default: ``config.shot_labels == "shuffled"``), queries blanked when ``content_free``."""
    pool, positions = session.retrieval.shots(kind, benchmark, queries, pool_df, config.n_shots)
    labels = [pool["y"].to_numpy()[p].astype(int).tolist() for p in positions]
    if config.shot_labels == "shuffled" if shuffle is None else shuffle:
        labels = calibration.shuffled_shot_labels(labels, config.seed)
    return [build_prompt(benchmark, calibration.content_free(row) if content_free else row,
                         calibration.relabelled(pool.iloc[p], lab), tokenizer, options)
            for (_, row), p, lab in zip(queries.iterrows(), positions, labels)]


def _fitting_prompts(benchmark, kind, context_df, config, options, tokenizer, session):
    """``(prompts, labels)`` a fitted decision is fitted on: context rows only
    (``calibration.calibration_pools``), shots from the rest of the context pool, their labels as
    retrieved even in the shuffled control (which differs from the real run only in the evaluation
    prompts' shot labels); ``([], None)`` for argmax and cross-fit, which score no calibration rows."""
    if config.decision in ("argmax", "cross-fit"):
        return [], None
    fit_df, rest_df = calibration.calibration_pools(context_df, config.n_calibration, config.seed, keep=config.n_shots)
    content_free = config.decision == "contextual"
    return (_prompts(benchmark, kind, fit_df, rest_df, config, options, tokenizer, session, content_free, False),
            fit_df["y"].astype(int).to_numpy())


def _decide(score: np.ndarray, cal_scores: np.ndarray | None, cal_y: np.ndarray | None,
            config: EvalConfig, y: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Answers from scores ``[n, 2]`` by ``config.decision``, and what was fitted (``{}`` for argmax).
    ``cal_scores`` ``[n_cal, 2]`` and ``cal_y`` ``[n_cal]`` are the context rows' (never evaluation rows').
    ``y`` ``[n]``, the evaluation labels, is read by ``"cross-fit"`` only, each row's threshold
    from the other folds' rows (``calibration.cross_fit_decision``)."""
    if config.decision == "argmax":
        return score.argmax(1), {}
    if config.decision == "cross-fit":
        pred, folds, thresholds = calibration.cross_fit_decision(calibration.margin(score), y, config.n_folds,
                                                                 config.seed)
        return pred, {"rule": "cross-fit", "n_calibration": 0, "shot_labels": config.shot_labels,
                      "k": int(len(thresholds)), "folds": folds.tolist(),
                      "fold_thresholds": [float(t) for t in thresholds]}
    info = {"rule": config.decision, "n_calibration": int(len(cal_scores)), "shot_labels": config.shot_labels}
    if config.decision == "contextual":
        bias = calibration.content_free_bias(cal_scores)
        return calibration.threshold_decision(calibration.margin(score), bias), {**info, "content_free_bias": bias}
    threshold = calibration.fit_threshold(calibration.margin(cal_scores), cal_y)
    return calibration.threshold_decision(calibration.margin(score), threshold), {**info, "threshold": threshold}


def decision_rule(result: dict) -> str:
    """The decision rule (``calibration.DECISIONS``) that turned ``result``'s scores into answers:
    ``result["decision"]["rule"]`` where a rule was fitted, else ``"argmax"`` (argmax results keep
    the fields they had before the other rules existed).

    >>> decision_rule({"pred": [1]}), decision_rule({"decision": {"rule": "cross-fit", "k": 5}})
    ('argmax', 'cross-fit')
    """
    return result.get("decision", {}).get("rule", "argmax")


def evaluate_all(mut: ModelUnderTest, benchmarks: Iterable[str], config: EvalConfig, out_dir: Path | None = None,
                 pools: dict[str, tuple[pd.DataFrame, pd.DataFrame]] | None = None,
                 session: EvalSession | None = None) -> dict[str, dict]:
    """``evaluate`` on each benchmark, sharing one ``session``; returns ``{benchmark: result}``
    (each cached separately)."""
    session = session or EvalSession()
    return {b: evaluate(mut, b, config, pools=(pools or {}).get(b), out_dir=out_dir, session=session)
            for b in benchmarks}


def summary(results: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """One row per (method, benchmark) from ``{method: {benchmark: result}}``."""
    rows = []
    for method, runs in results.items():
        for bench, r in runs.items():
            rows.append({"method": method, "benchmark": bench, "n": r["n"], "seed": r["seed"],
                         "accuracy": r["accuracy"], "acc_lo": r["accuracy_ci"][0], "acc_hi": r["accuracy_ci"][1],
                         "macro_f1": r["macro_f1"], "f1_lo": r["macro_f1_ci"][0], "f1_hi": r["macro_f1_ci"][1],
                         "auroc": r.get("auroc", np.nan),
                         "predicted_positive": float(np.mean(np.asarray(r["pred"]) == 1)),
                         "seconds": r["seconds"], "prompt_tokens": r["mean_prompt_tokens"]})
    return pd.DataFrame(rows)


def overview(per_benchmark: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy, macro-F1, AUROC and share of positive answers over the benchmarks, per method
    (``summary`` rows in, methods in their order of appearance)."""
    return per_benchmark.groupby("method", sort=False)[["accuracy", "macro_f1", "auroc", "predicted_positive"]].mean()
