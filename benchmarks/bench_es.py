"""Cost of ES-Merging's coefficient estimation (paper Table 4): wall time and FLOPs.

    python benchmarks/bench_es.py --scale cpu [--probe-k 110]

Runs probe -> states -> SWD -> element scores once with an empty cache, counting FLOPs with
``torch.utils.flop_counter.FlopCounterMode`` (forward and backward matmuls), and prints the
time of each stage and the ratio of element-score cost to state-collection cost.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from esmerge import elementwise, layerwise, probe
from esmerge.adapters import attach
from esmerge.merge import build_context


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--probe-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    context = build_context(args.scale, args.seed, args.probe_k)
    context.cache = Path(tempfile.mkdtemp())
    names = list(context.specialists)
    adapters = [s.adapter for s in context.specialists.values()]
    base = context.base
    projectors = {m: s.projector for m, s in context.specialists.items() if s.projector is not None}

    timings, flops = {}, {}
    t = time.perf_counter()
    raw = probe.probe_entities(k=context.probe_k, seed=args.seed)
    blocks = probe.encode_blocks(base, projectors, raw, {"molecule": 8, "protein": 8, "cell": 24})
    probes = probe.build_probes(base.tokenizer, base.model.get_input_embeddings(), blocks, raw)
    timings["probe construction"] = time.perf_counter() - t

    peft_model = attach(base.model, dict(zip(names, adapters)))
    try:
        counter = FlopCounterMode(display=False)
        t = time.perf_counter()
        with counter:
            states = probe.collect_states(peft_model, names, probes)
        timings["hidden states (base + 3)"] = time.perf_counter() - t
        flops["hidden states (base + 3)"] = counter.get_total_flops()

        t = time.perf_counter()
        swd = layerwise.swd_table(states["base"]["pooled"], [states[n]["pooled"] for n in names])
        layerwise.layer_coefficients(swd)
        timings["SWD + layer coefficients"] = time.perf_counter() - t

        counter = FlopCounterMode(display=False)
        t = time.perf_counter()
        with counter:
            scores = []
            for name in names:
                peft_model.set_adapter(name)
                scores.append(elementwise.element_scores(peft_model, probes.embeds, probes.positions,
                                                         states["base"]["tokens"]))
        timings["element scores (3 specialists)"] = time.perf_counter() - t
        flops["element scores (3 specialists)"] = counter.get_total_flops()
        elementwise.element_coefficients(scores)
    finally:
        peft_model.unload()

    total = sum(timings.values())
    print(f"ES-Merging coefficient estimation, scale={args.scale}, K={len(probes)} per modality, "
          f"T={probes.embeds.shape[1]} tokens, torch threads={torch.get_num_threads()}")
    for stage, seconds in timings.items():
        extra = f"  {flops[stage] / 1e12:8.3f} TFLOP" if stage in flops else ""
        print(f"  {stage:<32} {seconds:8.1f} s{extra}")
    print(f"  {'total':<32} {total:8.1f} s  {sum(flops.values()) / 1e12:8.3f} TFLOP")
    ratio = timings["element scores (3 specialists)"] / timings["hidden states (base + 3)"]
    print(f"  element scores / hidden states time ratio: {ratio:.1f}x")


if __name__ == "__main__":
    main()
