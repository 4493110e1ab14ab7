"""fp32 vs bf16 evaluation at cpu scale, in one run: decision agreement and speed ratio.

    timeout 1500 python benchmarks/bench_bf16.py [--queries 0 20] [--threads auto] [--budget-s 1400] [--force]
    python benchmarks/bench_bf16.py --combine a.json b.json [--force]   # runs over disjoint --queries

The prompts are the ones ``evaluate`` builds at ``cpu`` scale: each benchmark's evaluation pool
(``benchmark_pools.split_pools`` with the cpu ``EvalConfig``), shots from ``RetrievalCache``, prompts
from ``build_prompt``, batches from ``collate``; queries ``--queries START STOP`` of each of
the 13 pools, for two models: the base LLM (every entity as text) and the element-wise average of
the three shipped cpu specialists with all their projectors (molecules and proteins as tokens,
LoRA merged into the weights as ``PeftCopies`` does for evaluation). Each batch is scored by the
fp32 base and by the same weights cast to bf16 (``load_base("cpu", dtype=torch.bfloat16)``),
alternately, so both see the same contention; only ``label_logits`` is timed. Batches go
round-robin over the 13 benchmarks, so a run stopped by ``--budget-s`` still spreads over all.

Measured 2026-12-02 (5 runs over disjoint query ranges, combined; 1 thread; load average 4-10 on
the shared 2 cores): 660 of 664 decisions agree (99.40 %, every benchmark covered; the 4 flips had
fp32 margins of 0.0002-0.10 nats), but bf16 ``label_logits`` was 0.72x as fast as fp32 (2,933 s vs
2,107 s over 246,000 tokens), so fp32 stays the cpu default.

A decision is ``argmax`` of the two label scores; agreement is the share of prompts with the same
decision. ``--threads auto`` uses 2 threads when the 1-minute load average is below 1, else 1.

Output: ``benchmarks/results/bf16_agreement.json`` (atomic; an existing file is refused unless
``--force``): settings, load averages, per-benchmark counts, agreement, seconds and tokens per
dtype, the speed ratio, and every disagreement with its two margins.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.cache import atomic_write_json
from esmerge.data import benchmarks
from esmerge.data.benchmark_pools import split_pools
from esmerge.errors import OutputExistsError
from esmerge.specialists.adapters import Adapter
from esmerge.specialists.base_llm import load_base
from esmerge.specialists.per_scale import load_specialists

RESULTS = Path(__file__).resolve().parent / "results"


def average_adapter(adapters: list[Adapter]) -> Adapter:
    """Element-wise mean of LoRA states (the paper's weight-averaging baseline)."""
    state = {k: torch.stack([a.state[k].float() for a in adapters]).mean(0) for k in adapters[0].state}
    return Adapter(state, dict(adapters[0].config), "average")


def threads_for(choice: str) -> int:
    if choice != "auto":
        return int(choice)
    return 2 if os.getloadavg()[0] < 1.0 else 1


def _prompts(bench: str, queries: tuple[int, int], config, retrieval, tokenizer, token_modalities) -> tuple[list, list]:
    """Prompts ``queries[0]:queries[1]`` of those ``evaluate`` builds for ``bench`` at cpu, and their example ids."""
    frame = benchmarks.load_benchmark(bench)
    eval_df, context_df = split_pools(frame, config.n_eval, config.n_context, config.seed)
    pool, positions = retrieval.shots(benchmarks.spec(bench).kind, bench, eval_df, context_df, config.n_shots)
    options = ev.PromptOptions(frozenset(token_modalities), config.top_k_genes, config.protein_chars,
                               config.smiles_chars)
    queries = list(eval_df.iterrows())[slice(*queries)]
    prompts = [ev.build_prompt(bench, row, pool.iloc[positions[i]], tokenizer, options)
               for i, (_, row) in enumerate(queries)]
    return prompts, [str(index) for index, _ in queries]


def measure(queries: tuple[int, int], threads: int, bench_names=ev.BENCHMARK_NAMES,
            budget_s: float = float("inf")) -> dict:
    """Score the same batches in fp32 and bf16; returns the record written to JSON.

    Batches go round-robin over benchmarks and models, so a run cut short by ``budget_s`` (no new
    batch starts after it) still covers every benchmark; the record counts what was scored.
    """
    started = time.perf_counter()
    config = ev.default_config(scales.get("cpu"))
    bases = {"fp32": load_base(scales.get("cpu")), "bf16": load_base(scales.get("cpu"), dtype=torch.bfloat16)}
    specs = load_specialists(scales.get("cpu"), bases["fp32"])
    adapter = average_adapter([s.adapter for s in specs.values()])
    projectors = {m: s.projector for m, s in specs.items() if s.projector is not None}
    muts = {"base": {dt: ev.ModelUnderTest.base_only(b) for dt, b in bases.items()},
            "average": {dt: ev.ModelUnderTest.merged(b, adapter, projectors, "average") for dt, b in bases.items()}}
    tokenizer = bases["fp32"].tokenizer
    retrieval, features, copies = ev.RetrievalCache(), ev.FeatureCache(), ev.PeftCopies()
    work = {(bench, name): _prompts(bench, queries, config, retrieval, tokenizer, muts[name]["fp32"].projectors)
            for bench in bench_names for name in muts}
    seconds = {"fp32": 0.0, "bf16": 0.0}
    tokens, decisions, stopped_early = 0, [], False
    torch.set_num_threads(threads)
    load_start = os.getloadavg()
    with ExitStack() as stack, torch.no_grad():
        # The average model uses one adapter on every benchmark: load (and merge) it once per dtype.
        torch_models = {(name, dt): stack.enter_context(mut.model_for(bench_names[0], copies))
                        for name, per_dt in muts.items() for dt, mut in per_dt.items()}
        for first in range(0, queries[1] - queries[0], config.batch_size):
            for (bench, name), (prompts, ids) in work.items():
                if time.perf_counter() - started > budget_s:
                    stopped_early = True
                    break
                chunk = prompts[first:first + config.batch_size]
                if not chunk:
                    continue
                batch = ev.collate(chunk, tokenizer, 8, features)
                tokens += int(batch.attention_mask.sum()) + int(batch.continuation_mask.sum())
                scores = {}
                # alternate which dtype goes first, so neither always follows the other's cache state
                order = ("fp32", "bf16") if (first // config.batch_size) % 2 == 0 else ("bf16", "fp32")
                for dt in order:
                    t0 = time.perf_counter()
                    scores[dt] = ev.label_logits(torch_models[name, dt], batch,
                                                 muts[name][dt].projectors).float().numpy()
                    seconds[dt] += time.perf_counter() - t0
                for i, example in enumerate(ids[first:first + config.batch_size]):
                    s32, s16 = scores["fp32"][i], scores["bf16"][i]
                    decisions.append({"benchmark": bench, "model": name, "example_id": example,
                                      "margin_fp32": float(s32[1] - s32[0]), "margin_bf16": float(s16[1] - s16[0]),
                                      "max_abs_score_diff": float(np.abs(s32 - s16).max())})
            print(f"queries {queries[0] + first}-{queries[0] + first + config.batch_size - 1} of each benchmark: "
                  f"{len(decisions)} prompts, "
                  f"fp32 {seconds['fp32']:.0f} s, bf16 {seconds['bf16']:.0f} s, load {os.getloadavg()[0]:.1f}",
                  flush=True)
            if stopped_early:
                break
    same = [(d["margin_fp32"] > 0) == (d["margin_bf16"] > 0) for d in decisions]
    per_bench = {}
    for d, agree in zip(decisions, same):
        entry = per_bench.setdefault(d["benchmark"], {}).setdefault(d["model"],
                                                                    {"n": 0, "agree": 0, "max_abs_score_diff": 0.0})
        entry["n"] += 1
        entry["agree"] += int(agree)
        entry["max_abs_score_diff"] = max(entry["max_abs_score_diff"], d["max_abs_score_diff"])
    return {
        "scale": "cpu", "queries": list(queries), "stopped_at_budget": stopped_early,
        "budget_s": budget_s, "n_prompts": len(decisions), "n_agree": int(sum(same)),
        "agreement_percent": 100 * sum(same) / max(len(decisions), 1), "seconds": seconds, "tokens": tokens,
        "speed_ratio_fp32_over_bf16": seconds["fp32"] / seconds["bf16"] if seconds["bf16"] else None,
        "tokens_per_second": {dt: tokens / s for dt, s in seconds.items() if s},
        "threads": threads, "load_average_start": list(load_start), "load_average_end": list(os.getloadavg()),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "models": {"base": "SmolLM2-135M-Instruct, every entity as text",
                   "average": "element-wise mean of the 3 shipped cpu specialists' LoRA, all projectors, merged"},
        "per_benchmark": per_bench,
        "disagreements": [d for d, agree in zip(decisions, same) if not agree],
    }


def combine(records: list[dict]) -> dict:
    """One record from runs over disjoint query ranges (``--queries``): counts and seconds summed."""
    seconds = {dt: sum(r["seconds"][dt] for r in records) for dt in ("fp32", "bf16")}
    tokens = sum(r["tokens"] for r in records)
    per_bench: dict = {}
    for r in records:
        for bench, models in r["per_benchmark"].items():
            for model, m in models.items():
                entry = per_bench.setdefault(bench, {}).setdefault(model,
                                                                   {"n": 0, "agree": 0, "max_abs_score_diff": 0.0})
                entry["n"] += m["n"]
                entry["agree"] += m["agree"]
                entry["max_abs_score_diff"] = max(entry["max_abs_score_diff"], m["max_abs_score_diff"])
    n, agree = sum(r["n_prompts"] for r in records), sum(r["n_agree"] for r in records)
    return {**{k: records[0][k] for k in ("scale", "cpu", "torch", "models")},
            "n_prompts": n, "n_agree": agree, "agreement_percent": 100 * agree / max(n, 1),
            "seconds": seconds, "tokens": tokens, "speed_ratio_fp32_over_bf16": seconds["fp32"] / seconds["bf16"],
            "tokens_per_second": {dt: tokens / v for dt, v in seconds.items()}, "per_benchmark": per_bench,
            "disagreements": [d for r in records for d in r["disagreements"]],
            "runs": [{k: r.get(k) for k in ("queries", "n_prompts", "n_agree", "seconds", "threads", "budget_s",
                                        "stopped_at_budget", "load_average_start", "load_average_end")}
                     for r in records]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, nargs=2, default=(0, 20), metavar=("START", "STOP"),
                        help="query positions scored in each benchmark's evaluation pool, per model")
    parser.add_argument("--threads", default="auto", help="torch threads for the timed part, or 'auto'")
    parser.add_argument("--benchmarks", nargs="*", default=list(ev.BENCHMARK_NAMES))
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="start no batch after this many seconds")
    parser.add_argument("--out", type=Path, default=RESULTS / "bf16_agreement.json")
    parser.add_argument("--combine", type=Path, nargs="*", help="records of disjoint --queries runs to sum into --out")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        raise OutputExistsError(f"{args.out} exists; pass --force to replace it")
    if args.combine:
        record = combine([json.loads(p.read_text()) for p in args.combine])
    else:
        threads = threads_for(args.threads)
        print(f"threads={threads} load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; queries "
              f"{args.queries[0]}-{args.queries[1] - 1} x 2 models x {len(args.benchmarks)} benchmarks", flush=True)
        record = measure(tuple(args.queries), threads, tuple(args.benchmarks), args.budget_s)
    print(f"agreement: {record['n_agree']}/{record['n_prompts']} = {record['agreement_percent']:.2f} %")
    print(f"label_logits seconds: fp32 {record['seconds']['fp32']:.1f}, bf16 {record['seconds']['bf16']:.1f}; "
          f"speed ratio fp32/bf16 = {record['speed_ratio_fp32_over_bf16']:.2f}x over {record['tokens']} tokens")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
