"""Wall time and FLOPs of every registered baseline on adapters of a scale's shapes.

The three adapters are the scale's LoRA layout with random A and B (seeded), so this needs no
trained specialist and no data: it measures the methods, not the models' quality. AdaMerging
and Avg+FT run on short synthetic text prompts with the production objectives of
``esmerge.run.baseline_inputs`` (entropy of the two-label answer distribution; gold-answer NLL).

    python benchmarks/bench_methods.py --scale cpu
    python benchmarks/bench_methods.py --scale smoke --methods avg ties graft
"""
from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from esmerge import evaluate, methods, scales
from esmerge.run.baseline_inputs import answer_nll_loss, label_entropy_objective
from esmerge.specialists.adapters import adapter_from_model
from esmerge.specialists.base_llm import load_base, lora_config

OURS = ("avg", "ties", "emr", "pcb", "consensus", "graft", "ls-merge", "adamerging", "avg-ft")
PROMPTS = ["Does the molecule CCO inhibit CYP3A4? Answer:", "Is the cell line A549 sensitive to cisplatin? Answer:",
           "Does aspirin bind COX-1? Answer:", "Is caffeine a substrate of CYP1A2? Answer:"]


def random_adapters(scale: str, seed: int = 0):
    from peft import get_peft_model

    base = load_base(scales.get(scale), seed=seed)
    model = get_peft_model(base.model, lora_config())
    model.requires_grad_(False)
    adapters = []
    for i, name in enumerate(("molecule", "protein", "cell")):
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.02)
        adapters.append(adapter_from_model(model, name))
    return base, model, adapters


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="smoke", choices=("smoke", "cpu"))
    parser.add_argument("--methods", nargs="*", default=list(OURS))
    parser.add_argument("--lsmerge-epochs", type=int, default=None, help="default: the method's (1,000)")
    parser.add_argument("--steps", type=int, default=10, help="AdaMerging steps / Avg+FT epochs over one batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    base, model, adapters = random_adapters(args.scale)
    if base.tokenizer.pad_token is None:  # SmolLM2's tokenizer ships without one
        base.tokenizer.pad_token = base.tokenizer.eos_token
    tok = base.tokenizer
    prompts = [evaluate.Prompt(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True), [], ("No", "Yes"), i % 2)
               for i, q in enumerate(PROMPTS)]
    batches = [evaluate.collate(prompts, tok)]
    context = {"entropy_objective": label_entropy_objective(model, batches, {}),
               "train_loss": answer_nll_loss(model, {}), "train_batches": batches}
    extra = {"adamerging": {"steps": args.steps, "progress": False},
             "avg-ft": {"epochs": args.steps, "progress": False},
             "ls-merge": {"progress": False, **({"epochs": args.lsmerge_epochs} if args.lsmerge_epochs else {})}}
    n_params = sum(v.numel() for v in adapters[0].state.values())
    rows = []
    for name in args.methods:
        start = time.perf_counter()
        try:
            result = methods.run(name, adapters, context, **extra.get(name, {}))
        except Exception as err:  # report and go on: one broken method should not hide the others' timings
            print(f"{name:>11}: failed: {type(err).__name__}: {str(err).splitlines()[0][:120]}", flush=True)
            rows.append({"method": name, "wall_s": None, "flops": None, "steps": None, "error": type(err).__name__})
            continue
        wall = time.perf_counter() - start
        cost = result.info.get("cost", {})
        steps = extra.get(name, {}).get("steps") or extra.get(name, {}).get("epochs")
        rows.append({"method": name, "wall_s": round(wall, 3), "flops": cost.get("flops"),
                     "steps": steps if name in ("adamerging", "avg-ft")
                     else result.info.get("hparams", {}).get("epochs")})
        print(f"{name:>11}: {wall:8.3f} s   FLOPs {cost.get('flops')}", flush=True)
    table = pd.DataFrame(rows)
    print(f"\nscale={args.scale}, {n_params:,} LoRA entries per adapter, 3 adapters, threads={args.threads}")
    print(table.to_string(index=False))
    return table


if __name__ == "__main__":
    main()
