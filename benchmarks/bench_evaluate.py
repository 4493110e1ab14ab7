"""Per-example cost of ``evaluate`` at cpu scale, and the time to evaluate one model on all 13 benchmarks.

Prints, per benchmark, the mean prompt length and seconds per example for a model that reads every
entity as text (the base LLM) and one that reads molecules and proteins as 8-token blocks (a merged
model), then the extrapolated time for one model on all 13 benchmarks at the chosen ``n_eval``.

    python benchmarks/bench_evaluate.py [--n 8] [--shots 3] [--threads 2] [--benchmarks BindingDB GDSC2]

Projectors are freshly initialised (cost does not depend on their weights). Nothing is cached.

Measured on the project's 2-core Xeon (avx512): a plain SmolLM2-135M forward costs about 1.35 ms
per token in fp32 with 2 threads when the machine is idle (bf16 was not faster here), i.e.
~0.24 s per example with molecules/proteins as tokens (~250-token prompts, the shared system
prompt run once per batch of 8) and ~0.5 s with every entity as text (~450 tokens). With other
jobs on the two cores (load average 4-7), wall times were 10-20x higher: a merged model on all 13
benchmarks at n_eval=16 took 2.5-5 s per example (BindingDB 2.5, CYP1A2 4.4, DrugComb 5.2), i.e.
~50 min per model at n_eval=64. The cpu-s/thread column is then the better guide.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from esmerge import benchmarks
from esmerge import evaluate as ev
from esmerge.encoders import make_projector
from esmerge.models import load_base


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--n", type=int, default=8, help="examples timed per benchmark")
    parser.add_argument("--shots", type=int, default=ev.default_config("cpu").n_shots)
    parser.add_argument("--n-eval", type=int, default=ev.default_config("cpu").n_eval, help="n_eval to extrapolate to")
    parser.add_argument("--batch-size", type=int, default=ev.default_config("cpu").batch_size)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--benchmarks", nargs="*", default=list(ev.BENCHMARK_NAMES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_base(args.scale)
    emb = base.model.get_input_embeddings()
    projectors = {m: make_projector(m, emb) for m in ("molecule", "protein")}
    models = {"text entities (base)": {}, "token entities (merged)": projectors}
    cfg = ev.default_config("cpu")
    totals = {name: 0.0 for name in models}
    totals_idle = {name: 0.0 for name in models}
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work slows wall time)")
    print(f"scale={args.scale} shots={args.shots} batch={args.batch_size} threads={args.threads} "
          f"timed n={args.n}/benchmark; extrapolating to n_eval={args.n_eval}")
    print(f"{'benchmark':18s} {'model':26s} {'tokens':>7s} {'s/example':>10s} {'cpu-s/thread':>13s}")
    for bench in args.benchmarks:
        frame = benchmarks.load_benchmark(bench)
        eval_df, context_df = benchmarks.split_pools(frame, args.n, min(cfg.n_context, len(frame) - args.n), 0)
        index = ev.ContextIndex(context_df, ev.benchmark_kind(bench))
        for name, projs in models.items():
            options = ev.PromptOptions(frozenset(projs), cfg.top_k_genes, cfg.protein_chars, cfg.smiles_chars)
            start, cpu_start = time.perf_counter(), time.process_time()
            prompts = [ev.build_prompt(bench, row, index.pool.iloc[ev.retrieve_examples(index, row, args.shots)],
                                       base.tokenizer, options) for _, row in eval_df.iterrows()]
            lengths = [len(ev.prompt_token_ids(p, base.tokenizer, 8, 0)[0]) for p in prompts]
            with torch.no_grad():
                for i in range(0, len(prompts), args.batch_size):
                    ev.label_logits(base.model, ev.collate(prompts[i:i + args.batch_size], base.tokenizer), projs)
            per_example = (time.perf_counter() - start) / len(prompts)
            # CPU seconds / threads approximates the wall time on an otherwise idle machine; under
            # contention it overstates it (threads spin and miss cache), so it is an upper estimate
            cpu_per_example = (time.process_time() - cpu_start) / len(prompts) / args.threads
            totals[name] += per_example * args.n_eval
            totals_idle[name] += cpu_per_example * args.n_eval
            print(f"{bench:18s} {name:26s} {np.mean(lengths):7.0f} {per_example:10.3f} {cpu_per_example:13.3f}",
                  flush=True)
    for name, total in totals.items():
        print(f"one model, {len(args.benchmarks)} benchmarks x n_eval={args.n_eval}: {name}: "
              f"{total / 60:.1f} min wall here, <= ~{totals_idle[name] / 60:.1f} min on an idle machine (cpu-s/thread)")


if __name__ == "__main__":
    main()
