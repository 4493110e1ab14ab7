"""What Tables 1-2 cost at ``paper`` scale: FLOPs measured on the real LLaMA-3.1-8B architecture,
prompt lengths measured on the real prompts, then time and memory on one GPU.

    timeout 900 python benchmarks/paper_cost.py [--rows 48] [--force]

Nobody here can download the 8B weights, and no GPU is at hand. What is measured:

* **FLOPs.** ``torch.utils.flop_counter`` counts a forward of ``LlamaForCausalLM`` built with
  LLaMA-3.1-8B-Instruct's configuration on the ``meta`` device (shapes only, no memory), at each
  prompt length: prefill with the prompt, and one decoding step at that past length. The rotary
  embedding is replaced by an empty tensor of its shape (it forces float32 autocast, which the
  meta device refuses; it costs no matrix FLOPs).
* **Prompt lengths.** For every benchmark, ``--rows`` test rows of the paper-protocol split
  (``yardstick.paper_split``), 5 retrieved shots (``yardstick.retrieve_all``), the prompt of
  ``evaluate.build_prompt`` with the ``paper`` scale's options, for two kinds of model: the base
  (every entity as text) and a merged model (molecules as Mol-LLaMA's 8 tokens, proteins as
  Prot2Text-V2's ``min(length, 1022) + 2`` ESM-2 tokens, cells as top-50-gene text). Text is
  counted with SmolLM2's tokenizer, a stand-in for LLaMA-3's (both byte-level BPE; LLaMA-3's
  larger vocabulary makes its counts somewhat lower, so these lengths err long).

What is assumed (printed with the result): the test sizes of our 80/20 split (27,506 rows over
the 13 benchmarks; the paper's App. A.1 sizes differ), 16 models as in ``07_results``, the
reply length of greedy decoding (``--reply-tokens``; the cap is
``evaluate.generation.MAX_NEW_TOKENS``), and an H200's throughput: prefill at ``--mfu`` of its
989 TFLOP/s dense bf16 peak, decoding bound by reading the weights and the key/value cache
from its 4.8 TB/s memory once per step for a batch of ``--batch`` replies.

Output: ``benchmarks/results/paper_cost.json`` (refused if present unless ``--force``) and a
table on stdout, which ``book/paper_scale.md`` quotes.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from esmerge import evaluate, scales
from esmerge.cache import atomic_write_json
from esmerge.data import benchmarks
from esmerge.errors import OutputExistsError
from esmerge.evaluate import yardstick
from esmerge.evaluate.generation import MAX_NEW_TOKENS
from esmerge.specialists.base_llm import load_cpu

OUT = Path(__file__).resolve().parent / "results" / "paper_cost.json"
# LLaMA-3.1-8B-Instruct's config.json (meta-llama/Llama-3.1-8B-Instruct)
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rope_theta=500000.0, tie_word_embeddings=False)
H200 = {"bf16_dense_tflops": 989.0, "memory_tb_s": 4.8, "memory_gib": 141}
ESM2_3B_PARAMS = 2.84e9  # facebook/esm2_t36_3B_UR50D
PROTEIN_TOKENS_MAX = 1022  # ESM-2 residues per sequence; +2 for its begin/end tokens
MOLECULE_TOKENS = 8  # Mol-LLaMA's Q-Former queries


class ShapeOnlyRope(nn.Module):
    """Rotary cos/sin of the right shape; their values do not matter to a FLOP count."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim

    def forward(self, x, position_ids):
        shape = (*position_ids.shape, self.head_dim)
        return torch.empty(shape, device=x.device, dtype=x.dtype), torch.empty(shape, device=x.device, dtype=x.dtype)


def meta_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # deferred: heavy import

    config = LlamaConfig(**LLAMA_31_8B)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.model.rotary_emb = ShapeOnlyRope(config.hidden_size // config.num_attention_heads)
    return model


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def prefill_flops(model: nn.Module, n_tokens: int) -> int:
    ids = torch.zeros(1, n_tokens, dtype=torch.long, device="meta")
    return counted(lambda: model(input_ids=ids, logits_to_keep=1))


def decode_step_flops(model: nn.Module, past: int) -> int:
    """One greedy step at ``past`` cached tokens: the new token's projections, attention over the
    past, and the output head (a prefill of past+1 minus a prefill of past, with the head once)."""
    return prefill_flops(model, past + 1) - prefill_flops(model, past) + counted(
        lambda: model.lm_head(torch.zeros(1, 1, LLAMA_31_8B["hidden_size"], dtype=torch.bfloat16, device="meta")))


def prompt_lengths(name: str, rows: int, tokenizer, seed: int = 0) -> dict[str, list[int]]:
    """Token counts of ``rows`` paper-protocol prompts of benchmark ``name``, for the base and a merged model."""
    test_df, train_df = yardstick.paper_split(benchmarks.load_benchmark(name), seed)
    test_df = test_df.sample(n=min(rows, len(test_df)), random_state=seed)
    shots = yardstick.retrieve_all(train_df, test_df, benchmarks.spec(name).kind, yardstick.PAPER_SHOTS)
    paper = scales.get("paper").evaluation
    out = {}
    for kind, token_modalities in (("base", frozenset()), ("merged", frozenset({"molecule", "protein"}))):
        options = evaluate.PromptOptions(token_modalities=token_modalities, top_k_genes=scales.get("paper").cell_top_k,
                                         protein_chars=paper.protein_chars, smiles_chars=paper.smiles_chars)
        lengths = []
        for (_, query), idx in zip(test_df.iterrows(), shots):
            prompt = evaluate.build_prompt(name, query, train_df.iloc[idx], tokenizer, options)
            text = len(tokenizer(prompt.text, add_special_tokens=False)["input_ids"])
            blocks = sum(MOLECULE_TOKENS if m == "molecule" else min(len(raw), PROTEIN_TOKENS_MAX) + 2
                         for m, raw in prompt.entities)
            lengths.append(text + blocks)
        out[kind] = lengths
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=48, help="test rows per benchmark whose prompts are measured")
    parser.add_argument("--models", type=int, default=16, help="models scored (07_results: 16)")
    parser.add_argument("--reply-tokens", type=int, nargs="+", default=[32, MAX_NEW_TOKENS])
    parser.add_argument("--mfu", type=float, default=0.4, help="share of the GPU's bf16 peak a prefill reaches")
    parser.add_argument("--batch", type=int, default=16, help="replies decoded together")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    if args.out.exists() and not args.force:
        raise OutputExistsError(f"{args.out} exists: pass --force to measure again")
    torch.set_num_threads(1)
    started = time.time()
    tokenizer = load_cpu().tokenizer
    model = meta_llama()
    n_params = sum(p.numel() for p in model.parameters())
    test_sizes = {name: len(yardstick.paper_split(benchmarks.load_benchmark(name), 0)[0])
                  for name in benchmarks.BENCHMARK_NAMES}

    per_benchmark = {}
    for name in benchmarks.BENCHMARK_NAMES:
        lengths = prompt_lengths(name, args.rows, tokenizer)
        row = {"test_rows": test_sizes[name]}
        for kind, values in lengths.items():
            mean = int(round(np.mean(values)))
            row[kind] = {"mean_tokens": mean, "p90_tokens": int(np.percentile(values, 90)),
                         "prefill_flops": prefill_flops(model, mean),
                         "decode_step_flops": decode_step_flops(model, mean)}
        per_benchmark[name] = row
        print(f"{name}: {test_sizes[name]} test rows; prompt tokens base {row['base']['mean_tokens']}, "
              f"merged {row['merged']['mean_tokens']} (p90 {row['merged']['p90_tokens']})", flush=True)

    peak = H200["bf16_dense_tflops"] * 1e12
    kv_bytes_per_token = 2 * LLAMA_31_8B["num_hidden_layers"] * LLAMA_31_8B["num_key_value_heads"] * (
        LLAMA_31_8B["hidden_size"] // LLAMA_31_8B["num_attention_heads"]) * 2
    weight_bytes = 2 * n_params
    jobs = {}
    for reply in args.reply_tokens:
        flops = seconds = 0.0
        for row in per_benchmark.values():
            # one base-like model (text) and the rest merged-like (token blocks), each on every test row
            for kind, n_models in (("base", 1), ("merged", args.models - 1)):
                r = row[kind]
                prompts = row["test_rows"] * n_models
                flops += prompts * (r["prefill_flops"] + reply * r["decode_step_flops"])
                prefill_s = r["prefill_flops"] / (args.mfu * peak)
                step_bytes = weight_bytes + args.batch * kv_bytes_per_token * (r["mean_tokens"] + reply / 2)
                decode_s = reply * step_bytes / (H200["memory_tb_s"] * 1e12) / args.batch
                seconds += prompts * (prefill_s + decode_s)
        jobs[str(reply)] = {"flops": flops, "gpu_hours": seconds / 3600}
    longest = max(r["merged"]["p90_tokens"] for r in per_benchmark.values())
    memory_gib = {
        "llama_weights_bf16": weight_bytes / 2**30,
        "esm2_3b_bf16": 2 * ESM2_3B_PARAMS / 2**30,
        "kv_cache_batch_at_p90_longest": args.batch * kv_bytes_per_token * (longest + max(args.reply_tokens)) / 2**30,
    }
    memory_gib["total"] = sum(memory_gib.values())
    record = {
        "what": "cost of Tables 1-2 at paper scale on one GPU, from FLOPs counted on LLaMA-3.1-8B's architecture",
        "measured": {"params": n_params, "per_benchmark": per_benchmark, "rows_measured_per_benchmark": args.rows,
                     "tokenizer": "SmolLM2 (stand-in for LLaMA-3's)"},
        "assumed": {"models": args.models, "reply_tokens": args.reply_tokens, "mfu_prefill": args.mfu,
                    "decode_batch": args.batch, "gpu": H200,
                    "test_rows": "our seeded 80/20 split (yardstick.paper_split), not the paper's"},
        "tables_1_2": jobs, "memory_gib": memory_gib, "seconds": round(time.time() - started, 1),
        "machine": f"{os.cpu_count()} CPUs",
    }
    atomic_write_json(args.out, record)
    print(f"{n_params / 1e9:.2f} B parameters; {sum(test_sizes.values())} test rows x {args.models} models")
    for reply, job in jobs.items():
        print(f"replies of {reply} tokens: {job['flops'] / 1e18:.1f} EFLOP, ~{job['gpu_hours']:.1f} H200-hours")
    print("memory (GiB): " + ", ".join(f"{k} {v:.1f}" for k, v in memory_gib.items()))


if __name__ == "__main__":
    main()
