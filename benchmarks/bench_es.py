"""Element scores (paper §4.3): the per-sample loop they replaced vs the batched pass, in one run.

    python benchmarks/bench_es.py --scale cpu [--probe-k 110] [--specialists molecule] [--batch-size 16]

Builds the scale's probes and base states, then for each chosen specialist times (1) the
per-sample loop element scores used before batching (one forward and one backward per
modality for every probe sample, ``per_sample_loop_scores``) and (2)
``element_scores_by_distance`` (one forward per batch of probes, one backward per
modality), checks that both give the same scores, and prints the time ratio (issue 12: >= 5x at
``cpu``, K = 110). Run on demand, not in CI. ``per_sample_loop_scores`` is also the oracle of
``tests/test_elementwise.py``.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from esmerge import scales
from esmerge.signals import elementwise, gradients
from esmerge.signals.element_scores import element_scores_by_distance
from esmerge.signals.hooks import block_outputs, lora_parameters
from esmerge.specialists.adapters import layer_of


def per_sample_loop_scores(model, embeds: torch.Tensor, positions: dict, base_tokens: dict) -> dict:
    """Element scores as computed before batching: for each probe sample k, one forward of that
    sample alone (layer inputs detached) and, per modality, one backward of :math:`\\sum_l r^l`
    w.r.t. the LoRA parameters; |gradient| summed over samples and modalities.

    ``embeds [K, T, d]``, ``base_tokens`` modality -> ``[L, K, T_m, d]``.
    Returns distance -> (LoRA key -> scores), as ``element_scores_by_distance``.
    """
    params = lora_parameters(model)
    keys, tensors = list(params), list(params.values())
    for p in tensors:
        p.requires_grad_(True)
    scores = {d: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
              for d in elementwise.DISTANCES}
    width = embeds.shape[-1]
    for k in range(embeds.shape[0]):
        with block_outputs(model, detach_inputs=True) as outputs:
            model(inputs_embeds=embeds[k].unsqueeze(0), use_cache=False)
        for idx, (modality, pos) in enumerate(positions.items()):
            r = torch.stack([elementwise.token_distance(out[0, pos], base_tokens[modality][l, k].to(out.dtype))
                             for l, out in enumerate(outputs)])
            grads = torch.autograd.grad(r.sum(), tensors, retain_graph=idx < len(positions) - 1, allow_unused=True)
            factor = 2.0 * r.detach() / (len(pos) * width)
            for key, g, t in zip(keys, grads, tensors):
                g = (g if g is not None else torch.zeros_like(t)).detach().abs().float()
                scores["frobenius"][key] += g
                scores["mse"][key] += g * float(factor[layer_of(key)])
    return scores


def max_relative_difference(new: dict, old: dict) -> float:
    """Largest |new - old| / |old| over every element of every tensor of every distance."""
    return max(float(((new[d][k] - old[d][k]).abs() / old[d][k].abs().clamp_min(1e-30)).max())
               for d in old for k in old[d])


def main() -> None:
    # Heavy imports here so that the test can import per_sample_loop_scores cheaply.
    from esmerge.methods.es_signals import signals
    from esmerge.run.merge import build_context
    from esmerge.specialists.adapters import attach

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--probe-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--specialists", nargs="*", default=None, help="modalities to score (default: all three)")
    parser.add_argument("--batch-size", type=int, default=gradients.BATCH_SIZE)
    args = parser.parse_args()

    context = build_context(scales.get(args.scale), args.seed, args.probe_k)
    context.cache = Path(tempfile.mkdtemp(prefix="bench_es-"))  # cold: ES-Merging's own probes and states
    adapters = [s.adapter for s in context.specialists.values()]
    sig = signals(adapters, context, seed=args.seed, need_scores=False)
    probes, base_tokens = sig["probes"], sig["states"]["base"]["tokens"]
    chosen = args.specialists or list(context.specialists)
    peft_model = attach(context.base.model, {n: s.adapter for n, s in context.specialists.items()})
    rows = []
    try:
        for name in chosen:
            peft_model.set_adapter(name)
            t = time.perf_counter()
            old = per_sample_loop_scores(peft_model, probes.embeds, probes.positions, base_tokens)
            loop_s = time.perf_counter() - t
            t = time.perf_counter()
            new = element_scores_by_distance(peft_model, probes.embeds, probes.positions, base_tokens,
                                                               progress=False, batch_size=args.batch_size)
            batched_s = time.perf_counter() - t
            rows.append((name, loop_s, batched_s, max_relative_difference(new, old)))
    finally:
        peft_model.unload()

    print(f"element scores, scale={args.scale}, K={len(probes)} per modality, T={probes.embeds.shape[1]} tokens, "
          f"batch size {args.batch_size}, torch threads={torch.get_num_threads()}")
    print(f"  {'specialist':<10} {'per-sample loop':>16} {'batched':>10} {'ratio':>7} {'max rel. diff':>14}")
    for name, loop_s, batched_s, diff in rows:
        print(f"  {name:<10} {loop_s:>14.1f} s {batched_s:>8.1f} s {loop_s / batched_s:>6.1f}x {diff:>14.2e}")
    loop_total, batched_total = sum(r[1] for r in rows), sum(r[2] for r in rows)
    print(f"  {'total':<10} {loop_total:>14.1f} s {batched_total:>8.1f} s {loop_total / batched_total:>6.1f}x")


if __name__ == "__main__":
    main()
