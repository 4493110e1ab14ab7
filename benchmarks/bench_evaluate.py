"""Per-example cost of ``evaluate`` at cpu scale, the time to evaluate one model on all 13 benchmarks,
``label_logits``' throughput against a plain forward, and the effect of merging LoRA for evaluation.

``--parts`` picks what runs (default all three):

* ``cost``: per benchmark, the mean prompt length and seconds per example for a model that reads every
entity as text (the base LLM) and one that reads molecules and proteins as 8-token blocks (a merged
model), then the extrapolated time for one model on all 13 benchmarks at the chosen ``n_eval``.

* ``throughput``: on the same batches of BindingDB and DrugComb prompts (``--n`` per benchmark, as
  ``evaluate`` builds them), tokens/s of ``label_logits`` and of a plain forward of the same
  model over the same prompt tokens (``model(input_ids, attention_mask)``, last logits only), in
  ``--dtype`` (default bf16), interleaved batch by batch; their ratio (target >= 0.9). A stricter
  reference runs the tokens ``label_logits`` feeds as plain forwards (shared prefix once, then each
  row's own tokens): that ratio is the scoring's own overhead.
* ``merge``: the molecule specialist scored through ``PeftCopies(merge=True)`` (LoRA merged into
  the weights) and ``merge=False`` (PEFT's per-module LoRA), on the same batches; the speed ratio
  and the largest score difference.

    python benchmarks/bench_evaluate.py [--parts cost throughput merge] [--n 8] [--shots 3] [--threads 2]

Measured on 2026-12-03, 2 threads, the 2-core machine otherwise idle (load 1.8-1.9 from the run
itself), 2 batches of BindingDB and DrugComb prompts (9,662 prompt tokens): fp32 ``label_logits``
305 tok/s, plain forward 295 tok/s, ratio 1.03 (target >= 0.9), 0.87 against the plain forward that
runs the shared prefix once; bf16 70 vs 56 tok/s, ratio 1.24 (1.03 against the prefix-once
forward). bf16 is 4.4x slower than fp32 here, so evaluation stays fp32 on this CPU.

Measured on 2026-12-02, 1 thread, on the shared 2 cores (wall-time ratios of 2 interleaved batches
are noisy at these load averages): throughput, bf16, 16 prompts (10,195 prompt tokens), two runs:
``label_logits`` / plain forward 1.53 (41 vs 27 tok/s, load 8.6) and 0.80 (66 vs 83 tok/s, load
5.9); / plain forward with the prefix once 0.72 in the second run, 0.93 on one profiled batch of 4
(22.4 s vs 20.7 s; ``torch.profiler``: 75 % of ``label_logits`` in ``aten::mm``, 16 % in attention,
i.e. the model's own work). LoRA merged for evaluation: 1.24x faster than PEFT's unmerged forward
(15.9 s vs 19.6 s on 8 BindingDB prompts, fp32, load 6.7), largest score difference 2.0e-05.

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

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.data import benchmarks
from esmerge.data.benchmark_pools import split_pools
from esmerge.evaluate.models import PeftCopies
from esmerge.specialists.base_llm import load_base
from esmerge.specialists.encoders import make_projector

PARTS = ("cost", "throughput", "merge")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--n", type=int, default=8, help="examples timed per benchmark")
    cpu = ev.default_config(scales.get("cpu"))
    parser.add_argument("--shots", type=int, default=cpu.n_shots)
    parser.add_argument("--n-eval", type=int, default=cpu.n_eval, help="n_eval to extrapolate to")
    parser.add_argument("--batch-size", type=int, default=cpu.batch_size)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--benchmarks", nargs="*", default=list(ev.BENCHMARK_NAMES))
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS))
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="dtype of the throughput part")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; threads={args.threads}")
    if "throughput" in args.parts:
        throughput(args)
    if "merge" in args.parts:
        merge_effect(args)
    if "cost" in args.parts:
        cost(args)


def _batches(bench: str, n: int, base, token_modalities, cfg, shots: int) -> list:
    """``collate``d batches of the first ``n`` cpu evaluation prompts of ``bench``."""
    frame = benchmarks.load_benchmark(bench)
    eval_df, context_df = split_pools(frame, cfg.n_eval, cfg.n_context, cfg.seed)
    pool, positions = ev.RetrievalCache().shots(benchmarks.spec(bench).kind, bench, eval_df, context_df, shots)
    options = ev.PromptOptions(frozenset(token_modalities), cfg.top_k_genes, cfg.protein_chars, cfg.smiles_chars)
    prompts = [ev.build_prompt(bench, row, pool.iloc[positions[i]], base.tokenizer, options)
               for i, (_, row) in enumerate(list(eval_df.iterrows())[:n])]
    return [ev.collate(prompts[i:i + cfg.batch_size], base.tokenizer) for i in range(0, len(prompts), cfg.batch_size)]


def plain_forward(model, batch) -> torch.Tensor:
    """The reference: one forward over the batch's prompt tokens as they are, last logits only."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions,
                 logits_to_keep=1).logits


def plain_forward_prefix_once(model, batch) -> torch.Tensor:
    """A stricter reference: the tokens ``label_logits`` feeds, as plain forwards -- the shared
    prefix once (one row), then every row's own tokens (without attending to the prefix)."""
    positions = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    n = batch.shared_len
    if n:
        model(input_ids=batch.input_ids[:1, :n], position_ids=positions[:1, :n], logits_to_keep=1)
    return model(input_ids=batch.input_ids[:, n:], attention_mask=batch.attention_mask[:, n:],
                 position_ids=positions[:, n:], logits_to_keep=1).logits


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def throughput(args) -> None:
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base = load_base(scales.get(args.scale), dtype=dtype)
    cfg = ev.default_config(scales.get(args.scale))
    batches = [b for bench in ("BindingDB", "DrugComb") for b in _batches(bench, args.n, base, (), cfg, args.shots)]
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    passes = {"label_logits": ev.label_logits, "plain forward": plain_forward,
              "plain forward, prefix once": plain_forward_prefix_once}
    seconds = dict.fromkeys(passes, 0.0)
    with torch.no_grad():
        ev.label_logits(base.model, batches[0]), plain_forward(base.model, batches[0])  # warm-up, untimed
        for i, batch in enumerate(batches):  # interleaved, rotating order: all see the same contention
            names = list(passes)[i % 3:] + list(passes)[:i % 3]
            for name in names:
                seconds[name] += _timed(lambda: passes[name](base.model, batch))
    rate = {k: tokens / v for k, v in seconds.items()}
    print(f"throughput ({args.dtype}, {len(batches)} batches, {tokens} prompt tokens, load {os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{k} {v:.0f} tok/s" for k, v in rate.items())
          + f"; ratio label_logits / plain forward {rate['label_logits'] / rate['plain forward']:.2f} (target >= 0.9), "
          f"/ plain forward with the prefix once {rate['label_logits'] / rate['plain forward, prefix once']:.2f}",
          flush=True)


def merge_effect(args) -> None:
    from esmerge.specialists.per_scale import load_specialists  # only this part needs the shipped specialists

    base = load_base(scales.get(args.scale))
    spec = load_specialists(scales.get(args.scale), base)["molecule"]
    mut = ev.ModelUnderTest.specialist(base, spec)
    cfg = ev.default_config(scales.get(args.scale))
    batches = _batches("BindingDB", args.n, base, mut.projectors, cfg, args.shots)
    seconds, scores = {}, {}
    with torch.no_grad():
        models = {merge: PeftCopies(merge=merge).load(base, spec.adapter) for merge in (True, False)}
        for merge, model in models.items():
            ev.label_logits(model, batches[0], mut.projectors)  # warm-up, untimed
            seconds[merge], scores[merge] = 0.0, []
        for i, batch in enumerate(batches):
            for merge in ((True, False) if i % 2 == 0 else (False, True)):
                start = time.perf_counter()
                scores[merge].append(ev.label_logits(models[merge], batch, mut.projectors))
                seconds[merge] += time.perf_counter() - start
    diff = (torch.cat(scores[True]) - torch.cat(scores[False])).abs().max().item()
    print(f"LoRA merged for evaluation (molecule specialist, {sum(len(b.y) for b in batches)} BindingDB prompts, fp32, "
          f"load {os.getloadavg()[0]:.1f}): merged {seconds[True]:.1f} s, unmerged {seconds[False]:.1f} s, "
          f"speed-up {seconds[False] / seconds[True]:.2f}x, max |score difference| {diff:.2e}", flush=True)


def cost(args) -> None:
    base = load_base(scales.get(args.scale))
    emb = base.model.get_input_embeddings()
    projectors = {m: make_projector(m, emb) for m in ("molecule", "protein")}
    models = {"text entities (base)": {}, "token entities (merged)": projectors}
    cfg = ev.default_config(scales.get("cpu"))
    totals = {name: 0.0 for name in models}
    totals_idle = {name: 0.0 for name in models}
    print(f"scale={args.scale} shots={args.shots} batch={args.batch_size} threads={args.threads} "
          f"timed n={args.n}/benchmark; extrapolating to n_eval={args.n_eval}")
    print(f"{'benchmark':18s} {'model':26s} {'tokens':>7s} {'s/example':>10s} {'cpu-s/thread':>13s}")
    for bench in args.benchmarks:
        frame = benchmarks.load_benchmark(bench)
        eval_df, context_df = split_pools(frame, args.n, min(cfg.n_context, len(frame) - args.n), 0)
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
