"""``esmerge`` command line: a thin dispatcher; each subcommand lives with the module it drives.

    esmerge data verify                         check every upstream file against the manifest
    esmerge train --scale cpu --modality molecule   train one specialist
    esmerge merge --scale cpu --method es --out DIR merge the three specialists
    esmerge regenerate --scale cpu              run every notebook (papermill) and build the book
"""
from __future__ import annotations

import importlib
import sys

SUBCOMMANDS = {
    "data": ("esmerge.data", "Data manifest: verify / fetch upstream files."),
    "train": ("esmerge.specialists", "Train a modality specialist (LoRA + projector)."),
    "merge": ("esmerge.merge", "Merge the specialists with any registered method."),
    "regenerate": ("esmerge.regenerate", "Run all notebooks with papermill, in dependency order."),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        print(__doc__.strip())
        for name, (_, summary) in SUBCOMMANDS.items():
            print(f"  {name:<11} {summary}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(SUBCOMMANDS[argv[0]][0])
    return int(module.cli(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
