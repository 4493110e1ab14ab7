"""Stage 5, evaluation: models scored on the paper's 13 interaction benchmarks (§5.1-5.4, App. A.4-A.5).

One module per step; the names below are importable from ``esmerge.evaluate``:

1. ``retrieval`` -- the in-context examples of App. A.4 (``ContextIndex``, ``retrieve_examples``).
2. ``prompts`` -- the system + user messages of Tables 9-10 (``build_prompt``).
3. ``scoring`` -- ``collate`` into a ``PromptBatch`` and ``label_logits``, the log-likelihood of
   ``"Final answer: <label>"`` for both labels, ``[B, 2]``, differentiable.
4. ``stats`` and ``decisions`` -- accuracy, macro-F1 (App. A.5), AUROC, bootstrap CIs; the sign-flip
   test and Holm's correction. ``calibration`` -- decision rules that read the prompt.
5. ``models`` -- ``ModelUnderTest`` (base, specialist, merged, per-benchmark adapters).
6. ``sweep`` -- ``evaluate`` / ``evaluate_all`` with ``EvalConfig``, results cached on disk.
7. ``yardstick`` (retrieval-only baseline) and ``retention`` / ``retention_models`` (each specialist's
   own skill after merging).

The benchmarks themselves are described once, in ``esmerge.data.benchmarks``; the tables and claim
registers built from these results are in ``esmerge.report``.
"""
from esmerge.data.benchmarks import BENCHMARK_NAMES, GROUPS, TASKS, TaskPrompt, benchmark_kind
from esmerge.evaluate.models import ModelUnderTest, PeftCopies, merged_models, models_table
from esmerge.evaluate.prompts import ANSWER_PREFIX, Prompt, PromptOptions, build_prompt
from esmerge.evaluate.retrieval import ContextIndex, RetrievalCache, retrieve_examples, tanimoto
from esmerge.evaluate.scoring import (
                                      FeatureCache,
                                      PromptBatch,
                                      answer_tokens,
                                      collate,
                                      label_logits,
                                      length_batches,
                                      prompt_token_ids,
                                      splice_embeddings,
)
from esmerge.evaluate.stats import (
                                      METRICS,
                                      accuracy,
                                      auroc,
                                      bootstrap_ci,
                                      discordance,
                                      macro_f1,
                                      minimal_detectable_difference,
                                      paired_bootstrap,
                                      paired_mde,
)
from esmerge.evaluate.sweep import (
                                      EvalConfig,
                                      EvalSession,
                                      default_benchmarks,
                                      default_config,
                                      eval_dir,
                                      evaluate,
                                      evaluate_all,
                                      overview,
                                      summary,
)

__all__ = [
    "ANSWER_PREFIX", "BENCHMARK_NAMES", "ContextIndex", "EvalConfig", "EvalSession", "FeatureCache", "GROUPS",
    "METRICS", "ModelUnderTest", "PeftCopies", "Prompt", "PromptBatch", "PromptOptions", "RetrievalCache", "TASKS",
    "TaskPrompt", "accuracy", "answer_tokens", "auroc", "benchmark_kind", "bootstrap_ci", "build_prompt", "collate",
    "default_benchmarks", "default_config", "discordance", "eval_dir", "evaluate", "evaluate_all", "label_logits",
    "length_batches", "macro_f1", "merged_models", "minimal_detectable_difference", "models_table", "overview",
    "paired_bootstrap", "paired_mde", "prompt_token_ids", "retrieve_examples", "splice_embeddings", "summary",
    "tanimoto",
]
