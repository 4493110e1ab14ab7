"""The retrieval-only yardstick (issue 10) on all 13 benchmarks, no LLM, in a few minutes of CPU.

Two protocols, both written beside the paper's ES-Merging (``paper_results.csv``) with a verdict:

* ``yardstick_full.csv`` -- the paper's protocol (App. A.4) on the **whole** benchmark: a seeded,
  label-stratified 80/20 split of every processed benchmark (``esmerge.evaluate.yardstick.paper_split``;
  our splits, not the paper's), 5 shots retrieved from the 80 % side, evaluation on the whole 20 %;
* ``yardstick_cpu.csv`` -- the pools and shots the LLMs see at ``cpu`` scale
  (``evaluate.default_config("cpu")``: 64 evaluation rows, a 512-row context pool, 3 shots).

``yardstick.json`` (written last: the completion marker) holds the settings, per-benchmark sizes
and times, and the means over the 13 benchmarks and per group.

    timeout 900 python benchmarks/yardstick_full.py [--out benchmarks/results] [--force]
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import pandas as pd

from esmerge import evaluate, report, scales
from esmerge.cache import atomic_write_json
from esmerge.data import benchmarks
from esmerge.errors import OutputExistsError
from esmerge.evaluate import yardstick
from esmerge.report import yardstick as report_yardstick

OUT = Path(__file__).resolve().parent / "results"
FILES = ("yardstick_full.csv", "yardstick_cpu.csv", "yardstick.json")


def table(runs: dict[str, dict[str, dict]], n_resamples: int, seed: int, protocol: str) -> pd.DataFrame:
    """Accuracy and macro-F1 verdict tables side by side, rounded for the committed CSV."""
    acc = report_yardstick.verdict_table(runs, "es", "accuracy", n_resamples=n_resamples, seed=seed)
    f1 = report_yardstick.verdict_table(runs, "es", "macro_f1", n_resamples=n_resamples, seed=seed)
    f1 = f1.drop(columns=["benchmarks", "n_eval", "n_context"]).add_suffix("_f1").rename(
        columns={"dataset_f1": "dataset"})
    merged = acc.rename(columns={"majority": "majority_acc", "knn": "knn_acc", "paper": "paper_es_acc"}).merge(
        f1.rename(columns={"paper_f1": "paper_es_f1"}), on="dataset")
    return merged.round(2).assign(protocol=protocol)


def summary(runs: dict[str, dict[str, dict]]) -> dict:
    """Mean accuracy over the 13 benchmarks and per group, for each yardstick."""
    out = {}
    for method, per in runs.items():
        out[method] = {"mean of 13": round(sum(per[b]["accuracy"] for b in per) / len(per), 2),
                       **{g: round(sum(per[b]["accuracy"] for b in bs) / len(bs), 2)
                          for g, bs in benchmarks.GROUPS.items()}}
    return out


def write_csv(frame: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=yardstick.PAPER_SHOTS)
    parser.add_argument("--test-fraction", type=float, default=yardstick.TEST_FRACTION)
    parser.add_argument("--n-resamples", type=int, default=1000)
    parser.add_argument("--force", action="store_true", help="replace results already there")
    args = parser.parse_args(argv)
    marker = args.out / FILES[-1]
    if marker.exists() and not args.force:
        raise OutputExistsError(f"{marker} exists: pass --force to recompute the yardstick")
    report.paper_results()  # fail now, not after minutes of retrieval, if the reference is missing
    args.out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    full: dict[str, dict[str, dict]] = {m: {} for m in yardstick.METHODS}
    seconds = {}
    for name in benchmarks.BENCHMARK_NAMES:
        t0 = time.time()
        for method, result in yardstick.full_protocol(name, args.seed, args.shots, args.test_fraction,
                                                      args.n_resamples, scale_config=scales.get("cpu")).items():
            full[method][name] = result
        seconds[name] = round(time.time() - t0, 1)
        r = full["knn-shots"][name]
        print(f"full {name}: n_eval {r['n']}, n_context {r['n_context']}, majority "
              f"{full['majority'][name]['accuracy']:.1f}, knn {r['accuracy']:.1f} "
              f"[{r['accuracy_ci'][0]:.1f}, {r['accuracy_ci'][1]:.1f}] ({seconds[name]} s)", flush=True)
    full_seconds = time.time() - started
    write_csv(table(full, args.n_resamples, args.seed,
                    f"our seeded stratified {1 - args.test_fraction:.0%}/{args.test_fraction:.0%} split, "
                    f"not the paper's; {args.shots} shots; seed {args.seed}"), args.out / FILES[0])

    t0 = time.time()
    cpu_config = evaluate.default_config(scales.get("cpu"))
    cpu = yardstick.yardstick_all(benchmarks.BENCHMARK_NAMES, cpu_config)
    cpu_seconds = time.time() - t0
    write_csv(table(cpu, cpu_config.n_resamples, cpu_config.seed,
                    f"cpu pools of the LLM evaluation: {cpu_config.n_eval} eval / {cpu_config.n_context} context rows, "
                    f"{cpu_config.n_shots} shots; seed {cpu_config.seed}"), args.out / FILES[1])

    meta = {
        "what": "retrieval-only yardstick (issue 10): always-majority of the context pool; k-NN vote "
                "over the retrieved shots, ties to the context-pool majority, a tied pool to y = 0",
        "full_protocol": {"split": f"seeded label-stratified {1 - args.test_fraction:.0%}/{args.test_fraction:.0%} "
                                   "split of each processed benchmark (esmerge.evaluate.yardstick.paper_split); "
                                   "NOT the paper's splits (its test sizes are App. A.1's)",
                          "seed": args.seed, "shots": args.shots, "n_resamples": args.n_resamples,
                          "n_eval": {b: full["knn-shots"][b]["n"] for b in full["knn-shots"]},
                          "n_context": {b: full["knn-shots"][b]["n_context"] for b in full["knn-shots"]},
                          "seconds": seconds, "total_seconds": round(full_seconds, 1),
                          "mean_accuracy": summary(full)},
        "cpu_scale": {"config": cpu_config.key(), "seconds": round(cpu_seconds, 1), "mean_accuracy": summary(cpu)},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), python {platform.python_version()}",
    }
    atomic_write_json(marker, meta)
    print(f"full protocol {full_seconds:.0f} s, cpu pools {cpu_seconds:.0f} s; means: "
          f"full {meta['full_protocol']['mean_accuracy']}, cpu {meta['cpu_scale']['mean_accuracy']}")


if __name__ == "__main__":
    main()
