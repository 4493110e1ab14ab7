"""Achieved FLOP/s of every heavy pipeline stage against the same run's large-GEMM rate.

In one run, with one thread count for everything, this measures

* the large-GEMM rate: ``torch.mm`` of two ``--gemm-size``-square matrices (2048 at ``cpu``), fp32
  and bf16, best of ``--gemm-reps``. On ``--device cuda`` the CPU fp32 rate is measured as well,
  for the two stages that run on the CPU (below);
* the achieved FLOP/s of each heavy stage on a small slice of its real inputs, through the
  package's own functions:

  ================ ============================================================================
  stage            slice (``cpu`` / ``smoke`` where they differ)
  ================ ============================================================================
  07 scoring       ``evaluate.label_logits`` of a merged model (Avg. Merging of the three
                   specialists, LoRA merged into a copy's weights by ``PeftCopies`` as
                   ``evaluate`` does, every projector) on 16 / 6 evaluation prompts of BindingDB
                   and of GDSC2, from ``run.baseline_inputs.benchmark_prompts``, grouped by length
                   and collated as ``evaluate`` does (the scale's ``batch_size`` 8 / 3): 4 batches
  09 NLL           ``retention_scoring.example_nlls`` of the same merged model on 16 / 8 held-out
                   molecule caption examples (``captions.heldout_examples``), batch 8 / 4: 2 batches
  03 probe states  ``probe_states.collect_states`` (the base with LoRA off, then each of the 3
                   specialists) on 32 probe samples built as ``methods.es.signals`` builds them,
                   batch 16: 2 batches per model, 8 forwards
  05 element       ``methods.es.element_scores`` (``element_scores_by_distance``, as ``signals``
  scores           calls it) of the molecule specialist on the same 32 probes: 2 batches of 16,
                   each one forward and one backward per modality
  06 AdaMerging    ``methods.run("adamerging", steps=2)``: 2 Adam steps, one per batch of 2
                   unlabeled evaluation prompts (BindingDB, GDSC2; batched by length as
                   ``baseline_inputs.prompt_batches`` batches them), plus the method's final
                   entropy forward
  06 LS-Merge      ``methods.run("ls-merge", epochs=4)``: 4 epochs of the chunk VAE (one optimiser
                   step per epoch at ``cpu``: 450 chunks of 16,384 < batch 512), plus its encode
                   and decode passes
  06 Avg+FT        ``methods.run("avg-ft", epochs=1)`` on 8 / 4 BindingDB training prompts in
                   batches of 4 / 2: 2 Adam steps
  ================ ============================================================================

Each stage runs twice on the same inputs: once under ``torch.utils.flop_counter.FlopCounterMode``
(which counts the FLOPs and serves as the warm-up), then timed without the counter (best of
``--reps``). Only the model work is timed: prompts, batches and probes are built beforehand.

    python benchmarks/roofline.py --scale cpu --out benchmarks/results/roofline_cpu.json
    python benchmarks/roofline.py --scale smoke --threads 1          # a quick check of every code path
    python benchmarks/roofline.py --scale cpu --device cuda

How to read it. ``GFLOP/s`` is counted FLOPs over wall time; ``vs fp32 GEMM`` divides it by the
fp32 ``torch.mm`` rate of the same run on the same device and threads. Forward and backward
passes of a 135M-parameter model at batch 8 x ~300 tokens are dominated by GEMMs (SmolLM2:
~2400 x 576 x 576 to ~2400 x 576 x 1536 per projection, and the 49k-vocabulary head where
logits are taken), so a large GEMM is the ceiling they can approach: a ratio near 1 means the
stage runs at the hardware's matmul rate, a ratio of 0.2 means four fifths of its time goes
elsewhere (small or skinny matmuls, LoRA's rank-8 products, uncounted attention, elementwise
ops, Python and framework overhead). ``padded`` is padding tokens / tokens processed, summed
over every call of the decoder in the counting pass, from the attention masks it is given
(``n/a``: no token batches, as for LS-Merge); padded tokens are counted as FLOPs but do no
useful work. At ``smoke`` the model is a hidden-64 toy whose matmuls are tiny: its ratios only
show that every code path runs.

Measured on 2026-12-06 (``benchmarks/results/roofline_cpu.json``), ``--scale cpu``, 2 threads, the
2-core Intel Xeon with AVX-512 and AMX-bf16 otherwise idle (a paused trainer aside; load 1.6-2.1),
3.3 min: fp32 GEMM 269 GFLOP/s, bf16 1,575 (5.9x). Ratios to the fp32 GEMM: 03 probe states 0.68,
05 element scores 0.47, 06 AdaMerging 0.41 (23 % padded), LS-Merge 0.51, Avg+FT 0.40, 07 scoring
0.52 (6.2 % padded), 09 NLL 0.68 (4.5 % padded). On this CPU bf16 matmuls are far faster than
fp32, unlike the AMD EPYC machines the evaluation's fp32 choice was measured on.

What the counter counts. ``FlopCounterMode`` counts only matmul-like ATen ops (``mm``, ``addmm``,
``bmm``, ``baddbmm``, convolutions and the CUDA scaled-dot-product-attention kernels), 2 FLOPs
per multiply-add. Elementwise ops, norms, softmax, embeddings and optimiser updates count zero,
and on the CPU the fused attention kernel (``_scaled_dot_product_flash_attention_for_cpu`` and
its backward) is not in its registry either, so attention's score and value products count
zero there (for SmolLM2 at ~300 causal tokens, roughly 5-10 % of a forward's matmul FLOPs).
Uncounted matmul-like ops seen during a stage are listed under the table. The FLOP/s are thus
a lower bound of the work done.

Devices. Stages run in the scale's default dtype (fp32 at ``smoke`` and ``cpu``). With
``--device cuda`` the base model, projectors, batches and the adapters AdaMerging combines go to
the GPU; LS-Merge builds its VAE over adapter chunks on the CPU, as ``06_merging`` does, so its
row runs there and is compared with the CPU's fp32 GEMM.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from esmerge import evaluate, methods, scales
from esmerge.evaluate.models import PeftCopies
from esmerge.evaluate.retention_models import example_nlls
from esmerge.evaluate.scoring import common_n_tokens
from esmerge.methods.es_signals import _training_cells, element_scores
from esmerge.run import baseline_inputs
from esmerge.run.merge import build_context
from esmerge.signals import probe, probe_states
from esmerge.specialists.adapters import attach, with_state
from esmerge.specialists.captions import heldout_examples
from esmerge.specialists.load import projectors_of


@dataclass(frozen=True)
class Slice:
    """How much of each stage's real input one run takes (2 batches each, production batch sizes)."""

    eval_benchmarks: tuple[str, ...] = ("BindingDB", "GDSC2")  # two length-grouped scoring batches each
    nll_batch: int = 8  # 09_retention's batch_size
    probe_k: int = 32  # 2 batches of element_gradients.BATCH_SIZE and of hidden_states' 16
    ada_prompts: int = 2  # per benchmark; 06_merging's adamerging_prompts_per_benchmark
    ada_batch: int = 2  # 06_merging's adamerging_batch
    ft_examples: int = 8  # 06_merging's ft_examples
    ft_batch: int = 4  # 06_merging's ft_batch
    vae_epochs: int = 4
    gemm_size: int = 2048


SLICES = {"cpu": Slice(), "smoke": Slice(nll_batch=4, ft_examples=4, ft_batch=2, gemm_size=1024)}
MATMUL_LIKE = {"mv", "addmv", "dot", "vdot", "addr", "outer", "_int_mm", "_weight_int8pack_mm"}


@dataclass
class Row:
    """One line of the table."""

    stage: str
    slice: str
    device: str
    flops: int = 0
    seconds: float = float("nan")
    tokens: int = 0
    padded: int = 0
    uncounted_ops: list = field(default_factory=list)

    @property
    def gflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e9

    @property
    def padded_fraction(self) -> float | None:
        return self.padded / self.tokens if self.tokens else None


# --------------------------------------------------------------------------- measuring
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_rate(n: int, dtype: torch.dtype, device: str, reps: int) -> float:
    """FLOP/s of ``torch.mm`` on two random ``n x n`` matrices: best of ``reps`` after one warm-up."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    torch.mm(a, b)  # warm-up: oneDNN / cuBLAS pick and cache their kernels on the first call
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class _OpNames(TorchDispatchMode):
    """Records the name of every ATen op that runs, to list matmul-like ones the counter skips."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def uncounted(names: set[str]) -> list[str]:
    """Matmul-like ops (attention kernels included) that ``FlopCounterMode`` has no formula for."""
    counted = {str(op) for op in flop_registry}
    return sorted(n for n in names - counted
                  if "attention" in n or n.removeprefix("aten.") in MATMUL_LIKE)


@contextmanager
def padding_tally():
    """Counts tokens and padding tokens fed to every LLaMA-style decoder (the module holding
    ``embed_tokens`` and ``layers``) while active; yields ``{"tokens", "padded"}``.

    A call's new tokens are the last ``T`` columns of its 2-D attention mask (the rest is the
    key/value cache); no mask means no padding.
    """
    tally = {"tokens": 0, "padded": 0}

    def hook(module, args, kwargs, output):
        if "layers" not in module._modules or "embed_tokens" not in module._modules:
            return
        inputs = kwargs.get("inputs_embeds")
        if inputs is None:
            inputs = kwargs.get("input_ids", args[0] if args else None)
        b, t = inputs.shape[:2]
        tally["tokens"] += b * t
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            tally["padded"] += b * t - int(mask[:, -t:].sum())

    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield tally
    finally:
        handle.remove()


def measure(stage: str, what: str, device: str, fn, reps: int):
    """Count ``fn()``'s FLOPs and padding once, then time it ``reps`` times; returns (Row, the counted run's result)."""
    ops = _OpNames()
    with padding_tally() as tally, FlopCounterMode(display=False) as counter, ops:
        result = fn()
    row = Row(stage, what, device, int(counter.get_total_flops()), tokens=tally["tokens"], padded=tally["padded"],
              uncounted_ops=uncounted(ops.names))
    best = float("inf")
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    row.seconds = best
    print(f"  {stage}: {row.flops / 1e9:.2f} GFLOP in {best:.2f} s", flush=True)
    return row, result


# --------------------------------------------------------------------------- the stages' inputs
def on_device(adapter, device: str):
    """``adapter`` with its tensors on ``device`` (methods build merged states from them)."""
    return with_state(adapter, {k: v.to(device) for k, v in adapter.state.items()}, adapter.name)


def projectors_on(context, device: str) -> dict:
    """Every specialist's projector on ``device`` (a copy when it lives elsewhere)."""
    out = {}
    for m, p in projectors_of(context.specialists).items():
        here = next(p.parameters()).device
        out[m] = p if here == torch.device(device) else copy.deepcopy(p).to(device)
    return out


def scoring_batches(context, sl: Slice) -> list:
    """Two evaluation batches per benchmark of ``sl``: its first 2 x ``batch_size`` evaluation prompts,
    built as ``evaluate`` builds them and grouped by length (``evaluate.length_batches``) as it groups them."""
    config = evaluate.default_config(scales.get(context.scale))
    projectors = projectors_of(context.specialists)
    tok = context.base.tokenizer
    n_tokens = common_n_tokens(projectors)
    batches = []
    for bench in sl.eval_benchmarks:
        prompts = baseline_inputs.benchmark_prompts(bench, tok, projectors, config, "eval", 2 * config.batch_size,
                                                    context.seed)
        lengths = [len(evaluate.prompt_token_ids(p, tok, n_tokens, 0, projectors)[0]) for p in prompts]
        batches += [evaluate.collate([prompts[i] for i in rows], tok, n_tokens, projectors=projectors)
                    for rows in evaluate.length_batches(lengths, config.batch_size)]
    return batches


def make_probes(context, k: int) -> probe.Probes:
    """``k`` probe samples built as ``methods.es.signals`` builds them (its ``make_probes``)."""
    base = context.base
    raw = probe.probe_entities(k=k, seed=context.seed, exclude_cells=_training_cells(context))
    blocks = probe.encode_blocks(base, projectors_of(context.specialists), raw,
                                 {"molecule": 8, "protein": 8, "cell": 24})
    return probe.build_probes(base.tokenizer, base.model.get_input_embeddings(), blocks, raw)


# --------------------------------------------------------------------------- the stages
def evaluation_stages(context, merged, sl: Slice, device: str, reps: int) -> list[Row]:
    """07 scoring and 09 NLL, both on the merged model as ``evaluate`` and ``score_models`` load it."""
    base = context.base
    model = PeftCopies().load(base, merged)  # LoRA merged into a copy's weights, as in evaluation
    projectors = projectors_of(context.specialists)
    batches = scoring_batches(context, sl)

    def score():
        with torch.no_grad():
            return [evaluate.label_logits(model, b, projectors) for b in batches]

    sizes = "+".join(f"{b.input_ids.shape[0]}x{b.input_ids.shape[1]}" for b in batches)
    rows = [measure("07 scoring", f"label_logits, merged model, {'/'.join(sl.eval_benchmarks)} batches {sizes}",
                    device, score, reps)[0]]

    examples = heldout_examples("molecule", scales.get(context.scale), 2 * sl.nll_batch, context.seed)
    max_tokens = scales.get(context.scale).train.max_tokens_for("molecule")
    spec = context.specialists["molecule"]
    nll = lambda: example_nlls(model, base.tokenizer, spec.projector, examples, max_tokens, sl.nll_batch)  # noqa: E731
    rows.append(measure("09 NLL", f"example_nlls, merged model, {len(examples)} held-out molecule examples, "
                        f"batch {sl.nll_batch}", device, nll, reps)[0])
    return rows


def probe_stages(context, sl: Slice, device: str, reps: int) -> list[Row]:
    """03 probe states and 05 element scores on one set of probes, specialists attached as ``signals`` does."""
    probes = make_probes(context, sl.probe_k)
    names = list(context.specialists)
    peft_model = attach(context.base.model, {n: s.adapter for n, s in context.specialists.items()})
    try:
        shape = "x".join(map(str, probes.embeds.shape[:2]))
        what = f"collect_states, base + {len(names)} specialists, probes {shape}, batch 16"
        row03, states = measure("03 probe states", what, device,
                                lambda: probe_states.collect_states(peft_model, names, probes), reps)
        peft_model.set_adapter(names[0])
        scores = lambda: element_scores(peft_model, probes, states["base"]["tokens"])  # noqa: E731
        what = f"element_scores, {names[0]} specialist, probes {shape}, batch 16"
        row05, _ = measure("05 element scores", what, device, scores, reps)
    finally:
        peft_model.unload()  # base.model is the plain base again
    return [row03, row05]


def adamerging_stage(context, sl: Slice, device: str, reps: int) -> Row:
    """2 AdaMerging steps over 2 batches of unlabeled evaluation prompts, built as
    ``baseline_inputs.adamerging_extras`` builds them (kept here so that each run gets a fresh objective)."""
    projectors = projectors_on(context, device)
    tok = context.base.tokenizer
    config = evaluate.default_config(scales.get(context.scale))
    prompts = [p for bench in sl.eval_benchmarks for p in
               baseline_inputs.benchmark_prompts(bench, tok, projectors, config, "eval", sl.ada_prompts, context.seed)]
    batches = baseline_inputs.prompt_batches(prompts, tok, projectors, sl.ada_batch, context.seed)
    model = baseline_inputs.trainable_copy(context.base, context.specialists["molecule"].adapter).to(device)
    adapters = [on_device(s.adapter, device) for s in context.specialists.values()]
    steps = len(batches)

    def run():
        # a fresh objective each run: it cycles through the batches, so both runs see the same ones
        objective = baseline_inputs.label_entropy_objective(model, batches, projectors)
        return methods.run("adamerging", adapters, {"entropy_objective": objective}, steps=steps,
                           count_cost=False, progress=False)

    what = f"adamerging, {steps} steps, {len(prompts)} eval prompts in batches of {sl.ada_batch}, + final entropy"
    return measure("06 AdaMerging", what, device, run, reps)[0]


def lsmerge_stage(context, sl: Slice, reps: int) -> Row:
    """LS-Merge for a few epochs (its VAE lives on the CPU)."""
    adapters = [on_device(s.adapter, "cpu") for s in context.specialists.values()]
    def run():
        return methods.run("ls-merge", adapters, epochs=sl.vae_epochs, count_cost=False, progress=False)

    row, result = measure("06 LS-Merge", "", "cpu", run, reps)
    chunks = result.info["n_chunks"]
    row.slice = f"ls-merge, {sl.vae_epochs} epochs of {chunks} chunks (batch 512), + encode/decode"
    return row


def finetune_stage(context, sl: Slice, device: str, reps: int) -> Row:
    """Avg+FT: 2 Adam steps over BindingDB training prompts (``baseline_inputs.finetune_extras``)."""
    extras = baseline_inputs.finetune_extras(context.base, context.specialists, "BindingDB", sl.ft_examples,
                                      sl.ft_batch, evaluate.default_config(scales.get(context.scale)), context.seed)
    adapters = [on_device(s.adapter, device) for s in context.specialists.values()]
    def run():
        return methods.run("avg-ft", adapters, extras, epochs=1, count_cost=False, progress=False)

    what = (f"avg-ft, {len(extras['train_batches'])} steps, {sl.ft_examples} BindingDB training prompts "
            f"in batches of {sl.ft_batch}")
    return measure("06 Avg+FT", what, device, run, reps)[0]


# --------------------------------------------------------------------------- report
def table(rows: list[Row], gemm: dict) -> str:
    lines = [f"{'stage':<18} {'device':<6} {'GFLOP':>9} {'seconds':>8} {'GFLOP/s':>8} {'vs fp32 GEMM':>13} "
             f"{'padded':>7}"]
    for r in rows:
        ratio = r.gflops_per_s * 1e9 / gemm[r.device]["fp32"]
        padded = f"{r.padded_fraction:.1%}" if r.padded_fraction is not None else "n/a"
        lines.append(f"{r.stage:<18} {r.device:<6} {r.flops / 1e9:>9.2f} {r.seconds:>8.2f} {r.gflops_per_s:>8.1f} "
                     f"{ratio:>13.2f} {padded:>7}")
    lines.append("")
    lines += [f"{r.stage:<18} {r.slice}" for r in rows]
    missed = sorted({op for r in rows for op in r.uncounted_ops})
    if missed:
        lines.append(f"uncounted matmul-like ops (0 FLOPs): {', '.join(missed)} "
                     f"(in {', '.join(r.stage for r in rows if r.uncounted_ops)})")
    return "\n".join(lines)


def record(args, rows: list[Row], gemm: dict, load: tuple[float, float]) -> dict:
    """The JSON ``--out`` writes: settings, GEMM rates and one entry per stage."""
    stages = []
    for r in rows:
        entry = asdict(r) | {"gflops_per_s": r.gflops_per_s, "padded_fraction": r.padded_fraction,
                             "ratio_to_fp32_gemm": r.gflops_per_s * 1e9 / gemm[r.device]["fp32"]}
        stages.append(entry)
    return {"scale": args.scale, "device": args.device, "threads": torch.get_num_threads(), "reps": args.reps,
            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "date": datetime.date.today().isoformat(),
            "load_average": {"start": load[0], "end": load[1]},
            "gemm": {dev: {"size": args.gemm_size, **{k: v / 1e9 for k, v in rates.items()}, "unit": "GFLOP/s"}
                     for dev, rates in gemm.items()},
            "stages": stages}


# --------------------------------------------------------------------------- main
def gemm_rates(args) -> dict:
    """device -> {"fp32", "bf16"} FLOP/s; the CPU always (LS-Merge runs there)."""
    gemm = {}
    for dev in dict.fromkeys([args.device, "cpu"]):
        gemm[dev] = {name: gemm_rate(args.gemm_size, dtype, dev, args.gemm_reps)
                     for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        print(f"  GEMM {args.gemm_size}^2 on {dev}: "
              + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in gemm[dev].items()), flush=True)
    return gemm


def load_context(args):
    """The scale's base and specialists (``pipeline.build_context``), model and projectors on ``--device``."""
    context = build_context(scales.get(args.scale), args.seed)
    context.base.model.to(args.device)
    for spec in context.specialists.values():
        if spec.projector is not None:
            spec.projector.to(args.device)
    return context


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=tuple(SLICES))
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--reps", type=int, default=1, help="timed runs per stage (best is kept)")
    parser.add_argument("--gemm-size", type=int, default=None, help="default: 2048 at cpu, 1024 at smoke")
    parser.add_argument("--gemm-reps", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    sl = SLICES[args.scale]
    args.gemm_size = args.gemm_size or sl.gemm_size
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    load_start = os.getloadavg()[0]
    print(f"scale={args.scale} device={args.device} threads={torch.get_num_threads()} on {os.cpu_count()} cores, "
          f"load average {load_start:.1f}", flush=True)

    gemm = gemm_rates(args)
    context = load_context(args)
    merged = methods.run("avg", [s.adapter for s in context.specialists.values()]).adapter  # what 07 and 09 score

    rows = evaluation_stages(context, merged, sl, args.device, args.reps)
    rows += probe_stages(context, sl, args.device, args.reps)
    rows.append(adamerging_stage(context, sl, args.device, args.reps))
    rows.append(lsmerge_stage(context, sl, args.reps))
    rows.append(finetune_stage(context, sl, args.device, args.reps))

    load = (load_start, os.getloadavg()[0])
    print(f"\nscale={args.scale}, threads={torch.get_num_threads()}, load average {load[0]:.1f} -> {load[1]:.1f}")
    for dev, rates in gemm.items():
        print(f"GEMM {args.gemm_size}x{args.gemm_size} on {dev}: fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bf16 {rates['bf16'] / 1e9:.1f} GFLOP/s (best of {args.gemm_reps})")
    rows.sort(key=lambda r: r.stage[:2])  # pipeline order (stable within 06)
    print(table(rows, gemm))
    result = record(args, rows, gemm, load)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
