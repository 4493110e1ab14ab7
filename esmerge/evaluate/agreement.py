"""How often two runs of the results chapter decide alike, prompt by prompt.

The same chapter run on a GPU (``esmerge regenerate --device cuda``) sums in another order than on
the CPU, so a label score can move in its last digits and a near-tie can flip; a model trained on
the way (AdaMerging, Avg+FT) can land elsewhere. ``decision_agreement`` pairs two
``07_results/results.json`` files cell by cell (model x benchmark, on the same examples in the same
order) and counts the prompts whose decision is the same. What counts is the decision the chapter
scores (``pred``), after the scale's decision rule.

    python -m esmerge.evaluate.agreement A/results.json B/results.json [--at-least 0.99]

prints the agreement per model and overall, and exits 1 when the overall share is below ``--at-least``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "benchmark", "n", "same", "agreement"]


def decision_agreement(runs_a: Mapping[str, Mapping[str, dict]],
                       runs_b: Mapping[str, Mapping[str, dict]]) -> pd.DataFrame:
    """Per (model, benchmark) both runs hold: prompts ``n``, same decisions ``same``, their share.

    ``runs_*``: ``results.json`` as loaded, model -> benchmark -> a result with ``example_ids`` and
    ``pred``. Cells only one run holds are left out (``unpaired`` names them). A cell whose examples
    differ between the runs is refused (``ValueError`` naming it): they are not the same prompts.

    >>> a = {"avg": {"BBBP": {"example_ids": ["1", "2", "3", "4"], "pred": [1, 0, 1, 1]}}}
    >>> b = {"avg": {"BBBP": {"example_ids": ["1", "2", "3", "4"], "pred": [1, 0, 0, 1]}}, "es": {}}
    >>> decision_agreement(a, b).to_dict("records")
    [{'model': 'avg', 'benchmark': 'BBBP', 'n': 4, 'same': 3, 'agreement': 0.75}]
    """
    rows = []
    for model in sorted(set(runs_a) & set(runs_b)):
        for bench in sorted(set(runs_a[model]) & set(runs_b[model])):
            a, b = runs_a[model][bench], runs_b[model][bench]
            if list(a["example_ids"]) != list(b["example_ids"]):
                raise ValueError(f"{model} on {bench}: the two runs scored different examples; they cannot be paired")
            same = sum(int(x == y) for x, y in zip(a["pred"], b["pred"]))
            n = len(a["pred"])
            rows.append({"model": model, "benchmark": bench, "n": n, "same": same, "agreement": same / n if n else 1.0})
    return pd.DataFrame(rows, columns=COLUMNS)


def unpaired(runs_a: Mapping[str, Mapping], runs_b: Mapping[str, Mapping]) -> list[str]:
    """``model/benchmark`` cells that only one of the two runs holds.

    >>> unpaired({"avg": {"BBBP": {}}, "es": {"BBBP": {}}}, {"avg": {"BBBP": {}, "HIV": {}}})
    ['avg/HIV', 'es/BBBP']
    """
    cells = [{(m, b) for m, by in runs.items() for b in by} for runs in (runs_a, runs_b)]
    return [f"{m}/{b}" for m, b in sorted(cells[0] ^ cells[1])]


def by_model(table: pd.DataFrame) -> pd.DataFrame:
    """``decision_agreement``'s table summed over benchmarks: one row per model.

    >>> t = pd.DataFrame([["avg", "A", 4, 3, .75], ["avg", "B", 4, 4, 1.], ["es", "A", 2, 2, 1.]], columns=COLUMNS)
    >>> by_model(t).to_dict("records")
    [{'model': 'avg', 'n': 8, 'same': 7, 'agreement': 0.875}, {'model': 'es', 'n': 2, 'same': 2, 'agreement': 1.0}]
    """
    summed = table.groupby("model", sort=True)[["n", "same"]].sum().reset_index()
    summed["agreement"] = summed["same"] / summed["n"]
    return summed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m esmerge.evaluate.agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("a", type=Path, help="a results.json (07_results), e.g. the shipped CPU run's")
    parser.add_argument("b", type=Path, help="another, e.g. the same chapter run with --device cuda")
    parser.add_argument("--at-least", type=float, default=0.99, help="the overall share required (default 0.99)")
    args = parser.parse_args(argv)
    runs = []
    for path in (args.a, args.b):
        try:
            runs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as err:
            print(f"{path}: cannot be read as a results.json ({err}); give 07_results/results.json", file=sys.stderr)
            return 2
    table = decision_agreement(*runs)
    if table.empty:
        print(f"{args.a} and {args.b} share no (model, benchmark) cell: nothing to compare", file=sys.stderr)
        return 2
    print(by_model(table).to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    same, n = int(table["same"].sum()), int(table["n"].sum())
    print(f"overall: {same} of {n} decisions agree ({same / n:.2%}) over {len(table)} model x benchmark cells")
    if unpaired(*runs):
        print(f"in one run only (not compared): {', '.join(unpaired(*runs))}")
    return 0 if same / n >= args.at_least else 1


if __name__ == "__main__":
    sys.exit(main())
