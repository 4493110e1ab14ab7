"""Evaluation on the paper's 13 interaction benchmarks (§5.1-5.4, App. A.4-A.5, Tables 1-4, 8-10).

One module per step; every name below is importable from ``esmerge.evaluate``:

1. ``retrieval`` -- the in-context examples of App. A.4 (``ContextIndex``, ``retrieve_examples``).
2. ``prompts`` -- the system + user messages of Tables 9-10 (``build_prompt``).
3. ``scoring`` -- ``collate`` into a ``PromptBatch`` and ``label_logits``, the log-likelihood of
   ``"Final answer: <label>"`` for both labels, ``[B, 2]``, differentiable.
4. ``stats`` -- accuracy, macro-F1 (App. A.5), AUROC, bootstrap and paired-bootstrap CIs, the
   minimal detectable paired difference.
   ``calibration`` -- decisions that read the prompt (contextual calibration, a threshold fitted
   on the context pool) and the shots-shuffled control.
5. ``under_test`` -- ``ModelUnderTest`` (base, specialist, merged, per-benchmark adapters).
6. ``run`` -- ``evaluate`` / ``evaluate_all`` with ``EvalConfig`` (defaults from ``esmerge.scales``),
   rows validated before any model work, results cached on disk so an interrupted sweep resumes.
7. ``report`` -- our numbers beside ``paper_results.csv`` (Tables 1-3, 8) and the cost of Table 4.
8. ``claims`` -- the register of the paper's claims checked against ours with paired-bootstrap CIs.

The benchmarks themselves (groups, kinds, prompts, labels) are described once, in ``esmerge.benchmarks``.
"""
from esmerge.benchmarks import BENCHMARK_NAMES, GROUPS, TASKS, TaskPrompt, benchmark_kind
from esmerge.evaluate.claims import (CLAIMS, MERGING_BASELINES, NOT_MODELS, SHUFFLED_CONTROL, SPECIALISTS, YARDSTICKS,
                                     Claim, answer_bias, claims, decided_verdicts, disagreements, es_ranks,
                                     mechanism_claims,
                                     power_table, yardstick_claims)
from esmerge.evaluate.prompts import ANSWER_PREFIX, Prompt, PromptOptions, build_prompt
from esmerge.evaluate.report import (PAPER_DATASET, TABLE_GROUPS, cost_table, group_averages, merge_folders,
                                     paper_results, reference_dir, results_table, wide_table)
from esmerge.evaluate.retrieval import ContextIndex, RetrievalCache, retrieve_examples, tanimoto
from esmerge.evaluate.run import (EvalConfig, EvalSession, default_benchmarks, default_config, eval_dir, evaluate,
                                  evaluate_all, overview, summary)
from esmerge.evaluate.scoring import (FeatureCache, PromptBatch, answer_tokens, collate, label_logits,
                                      prompt_token_ids, splice_embeddings)
from esmerge.evaluate.stats import (METRICS, accuracy, auroc, bootstrap_ci, discordance, macro_f1,
                                    minimal_detectable_difference, paired_bootstrap, paired_mde)
from esmerge.evaluate.under_test import ModelUnderTest, PeftCopies, merged_models, models_table

__all__ = [
    "NOT_MODELS", "SHUFFLED_CONTROL", "YARDSTICKS", "decided_verdicts", "power_table", "yardstick_claims",
    "ANSWER_PREFIX", "BENCHMARK_NAMES", "CLAIMS", "Claim", "ContextIndex", "EvalConfig", "EvalSession",
    "FeatureCache", "GROUPS", "MERGING_BASELINES", "METRICS", "ModelUnderTest", "PAPER_DATASET", "PeftCopies",
    "Prompt", "PromptBatch", "PromptOptions", "RetrievalCache", "SPECIALISTS", "TABLE_GROUPS", "TASKS",
    "TaskPrompt", "accuracy", "answer_bias", "answer_tokens", "auroc", "benchmark_kind", "bootstrap_ci", "build_prompt", "claims",
    "collate", "cost_table", "default_benchmarks", "default_config", "disagreements", "discordance", "es_ranks", "eval_dir", "evaluate", "evaluate_all",
    "group_averages", "label_logits", "macro_f1", "mechanism_claims", "merge_folders", "merged_models",
    "minimal_detectable_difference", "paired_mde",
    "models_table", "overview", "paired_bootstrap", "paper_results", "prompt_token_ids", "reference_dir",
    "results_table", "retrieve_examples", "splice_embeddings", "summary", "tanimoto", "wide_table",
]
