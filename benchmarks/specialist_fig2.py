"""Does a retrained molecule specialist pass the paper's Fig. 2 test, and what does it do to the others?

    python benchmarks/specialist_fig2.py [--molecule DIR ...] [--specialists DIR ...] [--heldout 200] [--json OUT]

For the shipped ``cpu`` specialists, for each candidate molecule specialist given (a folder
written by ``esmerge train --scale cpu --modality molecule --out DIR``), with the shipped protein
and cell ones beside it, and for each candidate set (a folder with ``molecule/``, ``protein/``
and ``cell/`` specialist folders; a missing one stays the shipped one), this prints per specialist:

* the Fig. 2 test (``diagnostics.own_vs_other`` / ``specialisation_verdict``): blocks where the SWD
  on its own modality exceeds the mean SWD on the others, and the mean ratio, with the paper's
  SWD and with the official code's joint standardisation;
* the massive-activation tokens (``diagnostics.massive_tokens``, the most at any block) that each
  model's states hold on each input modality;
* optionally each candidate's held-out loss on ``--heldout`` examples of its own task (ChEBI-20
  test captions, held-out Swiss-Prot GO text, held-out cells), in nats per answer token.

Every model is probed as ``04_layerwise`` probes it (``methods.es.signals``), so states are cached
under ``$ESMERGE_CACHE`` and a second run is quick. Run on demand, not in CI (issue 10, item 3).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from esmerge import scales
from esmerge.signals import diagnostics

NAMES = ("molecule", "protein", "cell")
RECIPE_KEYS = ("steps", "batch_size", "lr", "seed", "bf16_autocast", "projector_lr_scale")


def fig2_rows(swd_by_variant: dict) -> list[dict]:
    """Fig. 2 verdicts of each specialist, for each SWD table ``[S, M, L]`` in ``swd_by_variant``."""
    rows = []
    for variant, swd in swd_by_variant.items():
        for name, row in zip(NAMES, diagnostics.specialisation_table(swd, list(range(len(NAMES))))):
            rows.append({"specialist": name, "swd": variant, **row, "mean_ratio": round(row["mean_ratio"], 3)})
    return rows


def massive_counts(states: dict) -> dict:
    """model -> input modality -> the most massive-activation tokens at any block."""

    return diagnostics.massive_token_counts({model: {m: states[model]["tokens"][m] for m in NAMES}
                                           for model in ("base",) + NAMES})


def main() -> None:
    from esmerge.methods.es_signals import signals
    from esmerge.run.merge import build_context
    from esmerge.signals import sliced
    from esmerge.specialists import captions, heldout
    from esmerge.specialists.load import attach_specialist, load_specialist

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecule", nargs="*", default=[], help="candidate molecule specialist folders")
    parser.add_argument("--specialists", nargs="*", default=[], type=Path,
                        help="candidate sets: folders holding molecule/, protein/ and cell/ specialists")
    parser.add_argument("--heldout", type=int, default=0,
                        help="held-out examples of each candidate's own task to score (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    context = build_context(scales.get("cpu"), args.seed)
    shipped = dict(context.specialists)
    results = []
    candidates = [{}] + [{"molecule": Path(f)} for f in args.molecule] + \
        [{m: d / m for m in NAMES if (d / m).is_dir()} for d in args.specialists]
    for folders in candidates:
        t0 = time.perf_counter()
        context.specialists = dict(shipped)
        for name, folder in folders.items():
            context.specialists[name] = load_specialist(folder, context.base)
        sig = signals([s.adapter for s in context.specialists.values()], context, seed=args.seed, need_scores=False)
        states = sig["states"]
        # signals' table is the paper's SWD (es.PAPER_SETTINGS); the code's standardises first
        code_swd = sliced.swd_table(states["base"]["pooled"], [states[n]["pooled"] for n in NAMES],
                                       seed=args.seed, standardize=True)
        entry = {"specialists": {n: str(folders.get(n, "shipped")) for n in NAMES},
                 "recipes": {n: {k: context.specialists[n].card.get(k) for k in RECIPE_KEYS} for n in NAMES},
                 "fig2": fig2_rows({"paper": sig["swd"], "code (standardised)": code_swd}),
                 "massive_tokens": massive_counts(states)}
        if args.heldout:
            # the shipped specialists' losses are measured once, with the first (shipped) set
            for name in (NAMES if not folders else folders):
                examples = captions.heldout_examples(name, scales.get("cpu"), args.heldout, args.seed)
                spec = context.specialists[name]
                model = attach_specialist(context.base, spec)
                loss = round(heldout.specialist_loss(model, context.base, spec, examples,
                                                     max_tokens=scales.get("cpu").train.max_tokens_for(name)), 4)
                entry.setdefault("heldout_loss", {})[name] = loss
                del model
            entry["n_heldout"] = args.heldout
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        results.append(entry)
        print(f"specialists {entry['specialists']}, molecule recipe {entry['recipes']['molecule']}"
              + (f", held-out loss {entry['heldout_loss']} (n={args.heldout})" if args.heldout else ""))
        for row in entry["fig2"]:
            print(f"  {row['swd']:<20} {row['specialist']:<9} {row['blocks_above']:>2}/{row['blocks']} blocks, "
                  f"mean ratio {row['mean_ratio']:.3f}: {'passes' if row['passes'] else 'fails'}")
        print("  massive-activation tokens (most at any block), model -> input modality:", entry["massive_tokens"])
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "probe_k": context.probe_k, "results": results},
                                        indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
