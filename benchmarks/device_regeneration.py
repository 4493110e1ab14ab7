"""The whole cpu regeneration on another device, timed, and its decisions against the shipped CPU run's.

    python benchmarks/device_regeneration.py [--device cuda] [--jobs 2] [--runs DIR] [--cache DIR]

runs ``esmerge regenerate --scale cpu --device DEVICE --no-book`` cold (a fresh runs folder and a
fresh intermediate cache: ``--runs``/``--cache``, default temporary folders; the data cache is the
caller's, as ``make`` keeps it), times it, then pairs the decisions of its ``07_results/results.json``
with those shipped in ``book/shipped/cpu`` (``esmerge.evaluate.agreement``) and writes
``benchmarks/results/regeneration_<device>.json``: wall seconds, per-notebook seconds (the run's
``regenerate_state.json``), the GPU's name, torch's version, and the agreement overall and per
model. It exits 1 when fewer than 99 % of the decisions agree (#30's bar).

A run stopped midway resumes when given the same ``--runs`` and ``--cache`` (everything is cached by
content), but its wall time then covers the last part only: the per-notebook seconds say which.

On the lent GPU machine of this workplace (``device`` tool): its image holds torch with CUDA,
transformers, peft, pandas and matplotlib; papermill, nbclient, ipykernel, jupytext and this
package's other pins travel as wheels (the tool's README), and the SmolLM2 GGUF (94 MB, over the
64 MiB a call carries) in two halves over two calls to the same warm machine. Not measured yet: no
GPU has been lent to this project's sessions so far.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
SHIPPED = REPO / "book" / "shipped" / "cpu" / "runs" / "07_results" / "results.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--runs", type=Path, default=None, help="runs folder (default: a new temporary one)")
    parser.add_argument("--cache", type=Path, default=None, help="intermediate cache (default: a new temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/regeneration_<device>.json")
    args = parser.parse_args(argv)

    import torch

    from esmerge.evaluate import agreement

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"--device {args.device}: torch sees no GPU here; run this on a machine with one", file=sys.stderr)
        return 2
    runs = args.runs or Path(tempfile.mkdtemp(prefix="esmerge-runs-"))
    cache = args.cache or Path(tempfile.mkdtemp(prefix="esmerge-cache-"))
    env = dict(os.environ, ESMERGE_RUNS_DIR=str(runs), ESMERGE_CACHE=str(cache))
    command = [sys.executable, "-m", "esmerge", "regenerate", "--scale", "cpu", "--device", args.device,
               "--jobs", str(args.jobs), "--no-book"]
    start = time.perf_counter()
    rc = subprocess.call(command, cwd=REPO, env=env)
    wall = time.perf_counter() - start
    if rc != 0:
        print(f"the regeneration failed (exit {rc}) after {wall:.0f} s; rerun with --runs {runs} --cache {cache} "
              "to resume", file=sys.stderr)
        return rc
    state = json.loads((runs / "cpu" / "regenerate_state.json").read_text())["notebooks"]
    produced = json.loads((runs / "cpu" / "07_results" / "results.json").read_text())
    shipped = json.loads(SHIPPED.read_text())
    table = agreement.decision_agreement(shipped, produced)
    same, n = int(table["same"].sum()), int(table["n"].sum())
    report = {
        "device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "torch": torch.__version__, "python": platform.python_version(), "jobs": args.jobs,
        "wall_seconds": round(wall, 1),
        "notebook_seconds": {stem: entry.get("seconds") for stem, entry in sorted(state.items())},
        "agreement": {"same": same, "n": n, "share": same / n,
                      "by_model": agreement.by_model(table).to_dict("records"),
                      "unpaired": agreement.unpaired(shipped, produced)},
        "compared_with": str(SHIPPED.relative_to(REPO)),
    }
    out = args.out or RESULTS / f"regeneration_{args.device.replace(':', '')}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{args.device}: {wall / 60:.1f} min; {same} of {n} decisions agree with the CPU's ({same / n:.2%}); "
          f"written to {out}")
    return 0 if same / n >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
