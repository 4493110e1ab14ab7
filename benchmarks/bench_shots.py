"""Does the cpu base read its shots? Decision rules and shot counts against the shots-shuffled control.

For each option (a number of shots and a decision rule of ``esmerge.evaluate.calibration``) the
base LLM is scored on the **protocol rows** of all 13 benchmarks (``benchmark_pools.protocol_rows``:
``--n-protocol`` rows per benchmark, stratified, seed ``--seed``, disjoint from the evaluation rows
of ``--scale``; shots retrieved from that scale's context pool), and again on the shots-shuffled
control (same prompts, shot labels permuted across the benchmark's prompts; the decision's fitted
part, from context-pool prompts, is the same in both; a cross-fitted threshold is fitted on each
run's own margins). Printed per option: mean accuracy over the 13 benchmarks with its
paired-bootstrap 95 % CI, the paired differences against the always-majority yardstick and against
the option's own shuffled control (CIs), and the share of positive answers. The retrieval-only
yardsticks (majority, k-NN vote over the same shots) are printed for reference.

    timeout 3h python benchmarks/bench_shots.py --n-protocol 32 --shots 3 5 --dtype bf16

A setting chosen here is chosen on rows no evaluation of ``--scale`` scores: the protocol rows are
the tail of ``benchmark_pools.split_pools``' seeded draw, the evaluation rows its head (at the cpu and
paper sizes every benchmark, the CYP substrate sets included, has up to 87 protocol rows beyond its
evaluation and context rows; with more, a benchmark takes them from its context pool, says so in
the header, and their shots then come from the rest of that pool).

Scores are kept under ``--work`` (one ``.npy`` per benchmark, shot count and prompt set), so an
interrupted run resumes and the table can be reprinted with ``--table-only``. The decisions never
read a label of the rows they decide: the context threshold is fitted on ``--n-fit`` context rows
(never protocol rows) scored with shots retrieved from the rest of the context pool
(``calibration.calibration_pools``); the cross-fitted one on the other folds of the protocol rows.

Measured **before the protocol split existed**, on 8 of the cpu *evaluation* rows per benchmark
(a subset of the 32 that ``07_results`` evaluates; rerun this script for numbers on protocol rows)
(``benchmarks/results/bench_shots_cpu.txt``; bf16, 1 thread per process, two processes
splitting the benchmarks on the shared 2-core machine at load 5-10; 416 prompts in 21 min):
n_eval = 8 per benchmark (104 examples), 8 fitting rows, seed 0, 3 shots. The machine allowed no
more; at this n a paired difference must exceed ~10 points to be resolved.

* argmax: 59.6 % [50.0, 68.3], 4.8 % positive answers; vs its shuffled control +4.8 [-1.0, +9.6]
  (not resolved): the base answers the majority label and barely reads its shots.
* contextual calibration: 55.8 %, 49 % positive; vs control +12.5 [+1.9, +23.1], but -2.9
  [-14.4, +9.6] vs always-majority: it reads the shots but overshoots the prior.
* context-pool threshold: 64.4 % [56.7, 73.1], 32.7 % positive; vs control +11.5 [+2.9, +20.2],
  vs always-majority +5.8 [-3.8, +14.4]: at least the majority rate and uses its shots. Chosen
  as the cpu default (``scales``: ``decision="context-threshold"``, 32 fitting rows).
* the paper's 5 shots (same rows): argmax 59.6 %, +1.9 [-1.9, +5.8] vs control; threshold 60.6 %,
  +9.6 [+1.9, +17.3] vs control but +1.9 [-9.6, +12.5] vs majority: no better than 3 shots here
  (5-shot contextual not finished in the time available).
* yardsticks on the same rows: always-majority 58.7 %, k-NN vote over the 3 shots 68.3 %, over
  5 shots 71.2 %.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.data import benchmark_pools, benchmarks
from esmerge.evaluate import calibration as cal
from esmerge.evaluate import yardstick
from esmerge.specialists.base_llm import load_base

SETS = ("eval", "eval-shuffled", "fit", "cf")


def _prompts(bench, queries, pool, positions, labels, options, tokenizer, content_free=False):
    out = []
    for (_, row), pos, lab in zip(queries.iterrows(), positions, labels):
        shots = cal.relabelled(pool.iloc[pos], lab)
        out.append(ev.build_prompt(bench, cal.content_free(row) if content_free else row, shots, tokenizer, options))
    return out


def _score(model, prompts, tokenizer, batch_size) -> np.ndarray:
    chunks = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = ev.collate(prompts[start: start + batch_size], tokenizer, 8)
            chunks.append(ev.label_logits(model, batch, {}).float().cpu())
    return torch.cat(chunks).numpy()


def protocol_pools(bench: str, args) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``(protocol_df, context_df, source)``: the protocol rows of ``bench`` (``benchmark_pools.protocol_rows``,
    disjoint from ``args.scale``'s evaluation rows) and the context pool their shots and the fitted
    threshold come from -- the scale's context pool, less the protocol rows where they were taken
    from it (``source == "context"``)."""
    config = ev.EvalConfig.for_scale(scales.get(args.scale), seed=args.seed)
    protocol_df = benchmark_pools.protocol_rows(bench, scales.get(args.scale), args.n_protocol, args.seed)
    eval_df, context_df = yardstick.scale_pools(bench, config)
    assert not set(protocol_df.index) & set(eval_df.index), f"{bench}: protocol rows among the evaluation rows"
    return protocol_df, context_df.drop(index=protocol_df.index, errors="ignore"), protocol_df.attrs["protocol_source"]


def score_benchmark(base, bench: str, k: int, args, work: Path, retrieval, sets=SETS) -> dict:
    """Scores ``[n, 2]`` of the prompt sets ``sets`` (of ``SETS``) for ``bench`` at ``k`` shots on
    its protocol rows (cached; with ``base=None`` only what the cache holds)."""
    config = ev.EvalConfig.for_scale(scales.get(args.scale), n_shots=k, seed=args.seed)
    eval_df, context_df, source = protocol_pools(bench, args)  # eval_df: the protocol rows
    fit_df, rest_df = cal.calibration_pools(context_df, args.n_fit, args.seed)
    kind = benchmarks.spec(bench).kind
    pool, eval_pos = retrieval.shots(kind, bench, eval_df, context_df, k)
    rest, fit_pos = retrieval.shots(kind, bench, fit_df, rest_df, k)
    eval_lab = [pool["y"].to_numpy()[p].tolist() for p in eval_pos]
    fit_lab = [rest["y"].to_numpy()[p].tolist() for p in fit_pos]
    eval_shuf = cal.shuffled_shot_labels(eval_lab, args.seed)
    options = ev.PromptOptions(frozenset(), config.top_k_genes, config.protein_chars, config.smiles_chars)
    tok = base.tokenizer if base is not None else None
    plan = {"eval": (eval_df, pool, eval_pos, eval_lab, False),
            "eval-shuffled": (eval_df, pool, eval_pos, eval_shuf, False),
            "fit": (fit_df, rest, fit_pos, fit_lab, False), "cf": (fit_df, rest, fit_pos, fit_lab, True)}
    out = {"y": eval_df["y"].astype(int).to_numpy(), "fit_y": fit_df["y"].astype(int).to_numpy(),
           "protocol_source": source,
           "ids": [str(i) for i in eval_df.index], "eval_shot_labels": eval_lab,
           "context_majority": yardstick.majority_vote(context_df["y"].astype(int).to_numpy())}
    for name, (queries, p, positions, labels, cf) in plan.items():
        path = work / f"{bench}-k{k}-{name}.npy".replace(" ", "_")
        if name not in sets or (base is None and not path.exists()):
            continue
        if not path.exists():
            started = time.time()
            scores = _score(base.model, _prompts(bench, queries, p, positions, labels, options, tok, cf), tok,
                            args.batch_size)
            np.save(path, scores)
            print(f"  {bench} k={k} {name}: {len(scores)} prompts in {time.time() - started:.0f} s", flush=True)
        out[name] = np.load(path)
    return out


def decisions(s: dict, shuffled: bool, seed: int = 0, n_folds: int = cal.N_FOLDS) -> dict[str, np.ndarray]:
    """Every decision rule's predictions on the protocol rows, for the real run or its control (the
    control's prompts have shuffled shot labels; what a context-fitted rule fits comes from the same
    context-pool prompts in both, so the two differ only in the scored prompts' shot labels; the
    cross-fitted threshold is fitted on each run's own margins, never a row's own label)."""
    m = cal.margin(s["eval-shuffled" if shuffled else "eval"])
    out = {"argmax": (m > 0).astype(int), "cross-fit": cal.cross_fit_decision(m, s["y"], n_folds, seed)[0]}
    if "cf" in s:
        out["contextual"] = cal.threshold_decision(m, cal.content_free_bias(s["cf"]))
    if "fit" in s:
        out["context-threshold"] = cal.threshold_decision(m, cal.fit_threshold(cal.margin(s["fit"]), s["fit_y"]))
    return out


def _run(ids, y, pred) -> dict:
    return {"example_ids": ids, "y": np.asarray(y).tolist(), "pred": np.asarray(pred).tolist()}


def table(all_scores: dict[int, dict[str, dict]], n_resamples: int, seed: int, n_folds: int = cal.N_FOLDS
          ) -> pd.DataFrame:
    rows = []
    any_k = next(iter(all_scores))
    majority = {b: _run(s["ids"], s["y"], np.full(len(s["y"]), s["context_majority"]))
                for b, s in all_scores[any_k].items()}

    def row(option, runs, control=None):
        point, lo, hi = ev.paired_bootstrap(runs, None, "accuracy", n_resamples, seed)
        d_maj = ev.paired_bootstrap(runs, majority, "accuracy", n_resamples, seed)
        out = {"option": option, "mean_acc": point, "lo": lo, "hi": hi,
               "vs_majority": d_maj[0], "vs_majority_lo": d_maj[1], "vs_majority_hi": d_maj[2],
               "positive_answers": 100 * np.mean([np.mean(r["pred"]) for r in runs.values()])}
        if control is not None:
            d = ev.paired_bootstrap(runs, control, "accuracy", n_resamples, seed)
            out.update({"vs_shuffled": d[0], "vs_shuffled_lo": d[1], "vs_shuffled_hi": d[2],
                        "shuffled_acc": ev.paired_bootstrap(control, None, "accuracy", n_resamples, seed)[0]})
        rows.append(out)

    row("yardstick: always-majority (context pool)", majority)
    for k, per_bench in all_scores.items():
        knn = {b: _run(s["ids"], s["y"], yardstick.knn_vote(s["eval_shot_labels"], s["context_majority"]))
               for b, s in per_bench.items()}
        row(f"yardstick: k-NN vote over the {k} shots", knn)
        real = {b: decisions(s, False, seed, n_folds) for b, s in per_bench.items()}
        ctrl = {b: decisions(s, True, seed, n_folds) for b, s in per_bench.items()}
        for rule in cal.DECISIONS:
            if not all(rule in real[b] for b in per_bench):
                continue  # not every benchmark has the prompts this rule is fitted on
            row(f"base, {k} shots, {rule}", {b: _run(s["ids"], s["y"], real[b][rule]) for b, s in per_bench.items()},
                {b: _run(s["ids"], s["y"], ctrl[b][rule]) for b, s in per_bench.items()})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-protocol", type=int, default=benchmark_pools.PROTOCOL_ROWS,
                        help="protocol rows per benchmark (benchmark_pools.protocol_rows), never evaluation rows")
    parser.add_argument("--scale", default="cpu", help="whose evaluation rows the protocol rows avoid and whose "
                        "context pool gives the shots")
    parser.add_argument("--n-folds", type=int, default=cal.N_FOLDS, help="folds of the cross-fitted threshold")
    parser.add_argument("--n-fit", type=int, default=32, help="context rows the threshold is fitted on")
    parser.add_argument("--shots", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-resamples", type=int, default=2000)
    parser.add_argument("--benchmarks", nargs="*", default=list(ev.BENCHMARK_NAMES))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_shots"))
    parser.add_argument("--out", type=Path, default=None, help="write the table here (.csv, and .json beside it)")
    parser.add_argument("--table-only", action="store_true", help="only print what --work holds")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = args.work / f"protocol{args.n_protocol}-{args.scale}-f{args.n_fit}-s{args.seed}-{args.dtype}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    dtype = torch.bfloat16 if args.dtype == "bf16" else None
    base = None if args.table_only else load_base(scales.get("cpu"), dtype=dtype)
    retrieval = ev.RetrievalCache()
    all_scores: dict[int, dict[str, dict]] = {}
    for k in args.shots:
        # set by set over all benchmarks, so that whatever finishes covers all 13
        for i in range(len(SETS)):
            all_scores[k] = {}
            for bench in args.benchmarks:
                scores = score_benchmark(base, bench, k, args, work, retrieval, SETS[: i + 1])
                if "eval-shuffled" in scores:
                    all_scores[k][bench] = scores
        if not all_scores[k]:
            del all_scores[k]
    result = table(all_scores, args.n_resamples, args.seed, args.n_folds)
    benches = sorted({b for per in all_scores.values() for b in per})
    from_context = sorted({b for per in all_scores.values() for b, s in per.items()
                           if s["protocol_source"] == "context"})
    n_context = ev.EvalConfig.for_scale(scales.get(args.scale)).n_context
    header = (f"bench_shots: cpu base ({args.dtype}), {args.n_protocol} protocol rows per benchmark (disjoint from "
              f"the {args.scale} evaluation rows) x {len(benches)} benchmarks, shots from the {args.scale} context "
              f"pool ({n_context} rows), threshold fitted on {args.n_fit} context rows or cross-fitted over "
              f"{args.n_folds} folds, seed {args.seed}, {args.n_resamples} paired-bootstrap resamples; "
              f"{time.time() - started:.0f} s"
              + (f"; protocol rows taken from the context pool: {', '.join(from_context)}" if from_context else ""))
    print(header)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(result.round(1).to_string(index=False))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        result.round(2).to_csv(args.out, index=False)
        args.out.with_suffix(".json").write_text(json.dumps({"header": header, "benchmarks": benches,
                                                             "rows": result.round(3).to_dict("records")}, indent=1))


if __name__ == "__main__":
    main()
