"""Padding in the batches of the whole cpu (or smoke) regeneration: in the order prompts come vs
grouped by length (``evaluate.length_batches``), as each stage batches them.

No model runs: the prompts of every workload are built and collated exactly as the stage does
(tokenizer, retrieval, projectors of the scale's specialists), and the padding is read from each
``PromptBatch``. ``label_logits`` runs a batch's shared prefix once and then every row's own tokens,
so a batch processes ``shared + B * (L - shared)`` tokens, of which ``B * L - sum(mask)`` are padding.

  workload     what is batched
  07 scoring   every benchmark's evaluation prompts, in batches of the scale's ``batch_size``
  AdaMerging   ``adamerging_prompts_per_benchmark`` unlabeled prompts of every benchmark, mixed,
               in batches of ``adamerging_batch`` (before: a seeded shuffle; after: by length,
               the batches' order shuffled)
  Avg+FT       ``ft_examples`` training prompts of one benchmark, in batches of ``ft_batch``

Before/after are measured in one run, on the same prompts:

    python benchmarks/padding.py --scale cpu
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from esmerge import evaluate, scales
from esmerge.data.benchmarks import BENCHMARK_NAMES
from esmerge.evaluate.scoring import common_n_tokens
from esmerge.run import baseline_inputs
from esmerge.run.merge import build_context
from esmerge.specialists.load import projectors_of


def padding(prompts: list, groups: list[list[int]], tokenizer, projectors: dict) -> tuple[int, int]:
    """(tokens processed, of which padding) over ``groups`` of ``prompts`` collated as the stages do."""
    n_tokens = common_n_tokens(projectors)
    tokens = padded = 0
    for rows in groups:
        batch = evaluate.collate([prompts[i] for i in rows], tokenizer, n_tokens, projectors=projectors)
        b, width = batch.input_ids.shape
        shared = batch.shared_len
        tokens += shared + b * (width - shared)
        padded += b * width - int(batch.attention_mask.sum())
    return tokens, padded


def in_order(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def shuffled(n: int, batch_size: int, seed: int) -> list[list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[s: s + batch_size] for s in range(0, n, batch_size)]


def lengths_of(prompts: list, tokenizer, projectors: dict) -> list[int]:
    n_tokens = common_n_tokens(projectors)
    return [len(evaluate.prompt_token_ids(p, tokenizer, n_tokens, 0, projectors)[0]) for p in prompts]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("smoke", "cpu"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    config = scales.get(args.scale)
    context = build_context(config, args.seed)
    tok, projectors = context.base.tokenizer, projectors_of(context.specialists)
    eval_config = evaluate.default_config(config)
    budgets = config.merge_budgets
    rows = {}

    def add(name: str, prompts: list, batch_size: int, before: list[list[int]]):
        after = evaluate.length_batches(lengths_of(prompts, tok, projectors), batch_size, seed=args.seed)
        rows.setdefault(name, {"before": [0, 0], "after": [0, 0], "prompts": 0})
        for label, groups in (("before", before), ("after", after)):
            t, p = padding(prompts, groups, tok, projectors)
            rows[name][label][0] += t
            rows[name][label][1] += p
        rows[name]["prompts"] += len(prompts)

    benchmarks = budgets.benchmarks or BENCHMARK_NAMES
    ada = []
    for bench in benchmarks:
        prompts = baseline_inputs.benchmark_prompts(bench, tok, projectors, eval_config, "eval", None, args.seed)
        add("07 scoring", prompts, eval_config.batch_size, in_order(len(prompts), eval_config.batch_size))
        ada += baseline_inputs.benchmark_prompts(bench, tok, projectors, eval_config, "eval",
                                                 budgets.adamerging_prompts_per_benchmark, args.seed)
        train = baseline_inputs.benchmark_prompts(bench, tok, projectors, eval_config, "train", budgets.ft_examples,
                                                  args.seed)
        add("Avg+FT", train, budgets.ft_batch, shuffled(len(train), budgets.ft_batch, args.seed))
    add("AdaMerging", ada, budgets.adamerging_batch, shuffled(len(ada), budgets.adamerging_batch, args.seed))

    print(f"scale={args.scale}: padded tokens / tokens processed, one run, the same prompts")
    print(f"{'workload':<12} {'prompts':>8} {'before':>16} {'after':>16}")
    result = {}
    for name, r in rows.items():
        before, after = r["before"][1] / r["before"][0], r["after"][1] / r["after"][0]
        print(f"{name:<12} {r['prompts']:>8} {before:>8.1%} of {r['before'][0]:>6} {after:>7.1%} of {r['after'][0]:>6}")
        result[name] = {"prompts": r["prompts"], "before": {"tokens": r["before"][0], "padded": r["before"][1]},
                        "after": {"tokens": r["after"][0], "padded": r["after"][1]}}
    if args.out:
        args.out.write_text(json.dumps({"scale": args.scale, "seed": args.seed, "workloads": result}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
