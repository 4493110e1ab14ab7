"""The paper's Table 4 measured in one run: cost of ES-Merging's coefficient estimation, layer-wise
AdaMerging and Avg. Merging + FT on the same specialists, data and machine.

    python benchmarks/bench_cost.py --scale smoke            # seconds; what the tests run
    python benchmarks/bench_cost.py --scale cpu [--force]    # on demand, ~15 min on 2 cores

Each method runs through ``esmerge.methods.run`` exactly as notebook 06 runs it (ES-Merging from a
cold cache: probes, states, SWD, element scores, coefficients and the merge). FLOPs are counted
by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls of forward and backward passes; ES-Merging
under one counter around the whole method, the two trained methods by their own counter around
their training loop, ``info["cost"]``); wall times are on this machine, in this process.

Data budget (the same benchmarks for both trained methods; defaults = notebook 06's at that scale):
ES-Merging reads K probe inputs per modality; AdaMerging ``ada_steps`` Adam steps over
``ada_prompts`` unlabeled evaluation prompts per benchmark in batches of ``ada_batch``; Avg+FT,
per benchmark, ``ft_epochs`` epochs over ``ft_examples`` labeled training prompts in batches of
``ft_batch``. Because every method's cost is linear in its number of passes, the JSON also gives
each cost scaled to the paper's budgets (K = 110; AdaMerging 500 steps; Avg+FT 2,000 examples x
10 epochs per benchmark) and the ratios at both budgets beside the paper's (Table 4:
149,807 / 493,694 / 891,117 -> 3.3x and 5.9x).

Output: ``benchmarks/results/table4_cost_<scale>.json`` (schema in ``measure``'s docstring),
written atomically; an existing file is refused unless ``--force``.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

PAPER_FLOPS = {"es": 149_807, "adamerging": 493_694, "avg-ft": 891_117}  # Table 4 (units as printed)
PAPER_BUDGET = {"probe_k": 110, "ada_steps": 500, "ft_examples": 2000, "ft_epochs": 10}  # §4.1; AdaMerging; App. A.2
# notebook 06's settings (cpu defaults; its smoke overrides), so the table measures what the book runs.
BUDGETS = {
    "cpu": dict(ada_steps=10, ada_prompts=2, ada_batch=2, ft_examples=8, ft_epochs=1, ft_batch=4, benchmarks=None),
    "smoke": dict(ada_steps=2, ada_prompts=2, ada_batch=2, ft_examples=4, ft_epochs=1, ft_batch=4,
                  benchmarks=("GDSC2",)),
}
RESULTS = Path(__file__).resolve().parent / "results"


def ratio(a, b):
    return None if not a or not b else a / b


def measure(scale: str = "smoke", seed: int = 0, probe_k: int | None = None, **budget) -> dict:
    """Run the three methods once and return the Table 4 record.

    Returns (all FLOPs are counts of floating-point operations, wall times in seconds)::

        {"scale", "seed", "machine": {"torch", "threads", "processor", "python"},
         "budget": {"probe_k", "ada_steps", "ada_prompts", "ada_batch", "ft_examples", "ft_epochs",
                    "ft_batch", "benchmarks": [...]},
         "methods": {"es" | "adamerging" | "avg-ft": {
             "name", "flops", "wall_s", "passes", "paper_budget_passes", "flops_at_paper_budget",
             "paper_table4"}},
         "ratios": {"adamerging/es" | "avg-ft/es": {"flops", "wall_s", "flops_at_paper_budget",
                                                    "paper": 493694/149807 | 891117/149807}}}

    ``passes`` is what the cost is linear in (ES: probe samples per modality; AdaMerging: steps;
    Avg+FT: optimiser steps summed over benchmarks); ``flops_at_paper_budget`` = flops x
    paper_budget_passes / passes.
    """
    from esmerge import evaluate, methods, scales
    from esmerge.run import baseline_inputs
    from esmerge.run.merge import build_context

    settings = dict(BUDGETS.get(scale, BUDGETS["cpu"]), **budget)
    torch.manual_seed(seed)
    context = build_context(scales.get(scale), seed, probe_k)
    context.cache = Path(tempfile.mkdtemp(prefix="bench_cost-"))  # cold: ES-Merging computes every signal
    adapters = [s.adapter for s in context.specialists.values()]
    benchmarks = list(settings["benchmarks"] or evaluate.BENCHMARK_NAMES)
    eval_config = evaluate.default_config(scales.get(scale))
    rows = {}

    from torch.utils.flop_counter import FlopCounterMode

    start = time.perf_counter()
    with FlopCounterMode(display=False) as counter:
        methods.run("es", adapters, context, seed=seed)
    rows["es"] = {"flops": int(counter.get_total_flops()), "wall_s": time.perf_counter() - start,
                  "passes": context.probe_k, "paper_budget_passes": PAPER_BUDGET["probe_k"]}

    context.extras.update(baseline_inputs.adamerging_extras(context.base, context.specialists, benchmarks,
                                                     settings["ada_prompts"], settings["ada_batch"], eval_config, seed))
    info = methods.run("adamerging", adapters, context, steps=settings["ada_steps"], progress=False).info
    rows["adamerging"] = {"flops": info["cost"]["flops"], "wall_s": info["cost"]["wall_seconds"],
                          "passes": settings["ada_steps"], "paper_budget_passes": PAPER_BUDGET["ada_steps"]}

    ft = {"flops": 0, "wall_s": 0.0, "passes": 0, "paper_budget_passes": 0}
    for benchmark in benchmarks:
        context.extras.update(baseline_inputs.finetune_extras(context.base, context.specialists, benchmark,
                                                       settings["ft_examples"], settings["ft_batch"], eval_config,
                                                       seed))
        info = methods.run("avg-ft", adapters, context, epochs=settings["ft_epochs"], progress=False).info
        ft["flops"] += info["cost"]["flops"]
        ft["wall_s"] += info["cost"]["wall_seconds"]
        steps = len(info["loss"]["history"])
        n_read = sum(len(batch.y) for batch in context.train_batches)
        ft["passes"] += steps
        # Paper: 2,000 examples x 10 epochs per benchmark; with our batch size the steps scale with examples x epochs.
        ft["paper_budget_passes"] += steps * PAPER_BUDGET["ft_examples"] * PAPER_BUDGET["ft_epochs"] / (
            n_read * settings["ft_epochs"])
    rows["avg-ft"] = ft

    for name, row in rows.items():
        row["name"] = methods.get(name).pretty_name
        row["flops_at_paper_budget"] = row["flops"] * row["paper_budget_passes"] / row["passes"]
        row["paper_table4"] = PAPER_FLOPS[name]
    ratios = {f"{name}/es": {"flops": ratio(rows[name]["flops"], rows["es"]["flops"]),
                             "wall_s": ratio(rows[name]["wall_s"], rows["es"]["wall_s"]),
                             "flops_at_paper_budget": ratio(rows[name]["flops_at_paper_budget"],
                                                            rows["es"]["flops_at_paper_budget"]),
                             "paper": PAPER_FLOPS[name] / PAPER_FLOPS["es"]}
              for name in ("adamerging", "avg-ft")}
    return {"scale": scale, "seed": seed,
            "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
            "budget": dict(settings, probe_k=context.probe_k, benchmarks=benchmarks),
            "methods": rows, "ratios": ratios}


def render(record: dict) -> str:
    """The record as the printed table (FLOPs in TFLOP)."""
    lines = [f"Table 4 cost, scale={record['scale']}, K={record['budget']['probe_k']}, "
             f"{len(record['budget']['benchmarks'])} benchmark(s), torch threads={record['machine']['threads']}",
             f"  {'method':<22} {'TFLOP':>10} {'wall s':>9} {'TFLOP @ paper budget':>21} {'paper':>9}"]
    for row in record["methods"].values():
        lines.append(f"  {row['name']:<22} {row['flops'] / 1e12:>10.4f} {row['wall_s']:>9.1f} "
                     f"{row['flops_at_paper_budget'] / 1e12:>21.2f} {row['paper_table4']:>9,}")
    for key, r in record["ratios"].items():
        fmt = lambda v: "n/a" if v is None else f"{v:.1f}x"  # noqa: E731
        lines.append(f"  {key:<14} FLOPs {fmt(r['flops'])}, wall {fmt(r['wall_s'])}, "
                     f"at paper budget {fmt(r['flops_at_paper_budget'])}; paper {r['paper']:.1f}x")
    return "\n".join(lines)


def write(record: dict, path: Path, force: bool = False) -> Path:
    """Write the record as JSON, atomically; refuse an existing file unless ``force``."""
    from esmerge.cache import atomic_write_json
    from esmerge.errors import OutputExistsError

    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, record)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu", choices=("smoke", "cpu"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-k", type=int, default=None)
    for name in ("ada_steps", "ada_prompts", "ada_batch", "ft_examples", "ft_epochs", "ft_batch"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None)
    parser.add_argument("--benchmarks", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/table4_cost_<scale>.json")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    out = args.out or RESULTS / f"table4_cost_{args.scale}.json"
    if out.exists() and not args.force:  # refuse before the work, not after
        parser.error(f"{out} exists; pass --force to replace it")
    budget = {k: v for k, v in vars(args).items()
              if k.startswith(("ada_", "ft_")) and v is not None}
    if args.benchmarks:
        budget["benchmarks"] = tuple(args.benchmarks)
    record = measure(args.scale, args.seed, args.probe_k, **budget)
    print(render(record))
    print(f"wrote {write(record, out, force=args.force)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
