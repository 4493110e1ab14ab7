"""esmerge: merge LoRA specialists with ES-Merging (or any baseline), evaluate them, rebuild the book.

    esmerge data verify                               check every upstream file against the manifest
    esmerge data fetch [FILE ...]                     download missing files (needs internet)
    esmerge train --scale cpu --modality molecule     train one specialist
    esmerge merge --scale cpu --method es --out DIR   merge the three specialists
    esmerge methods [NAME]                            list merge methods and their hyper-parameters
    esmerge methods describe NAME                     one method in full, with the values of its presets
    esmerge evaluate --scale cpu --model base --model DIR   evaluate models on the 13 benchmarks
    esmerge convert mol-llama|prot2text|lora-extract ...    published checkpoints -> specialist folders
    esmerge regenerate --scale cpu                    run every notebook (papermill) and build the book

Every subcommand is declared here, once (``parser``), and names its handler in ``esmerge.cli.commands``,
which calls one library function; ``esmerge.cli.main`` runs it and reports a refusal in one line.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from esmerge import scales
from esmerge.cli import commands
from esmerge.specialists.encoders import MODALITIES

MERGE_DESCRIPTION = """Merge LoRA adapters with a registered method (`esmerge methods` lists them and what each needs).

Two ways: bring your own PEFT LoRA adapters trained on one base (--base, --adapter NAME=PATH per
adapter; ranks, alphas and target modules may differ), or merge this project's three specialists
of a scale (--scale). An option of the other way is refused, as is --probe with a method that
reads no probes. The output folder is a PEFT adapter plus esmerge.json."""
MERGE_EXAMPLES = """examples:
  esmerge merge --base cpu --adapter molecule=adapters/mol --adapter protein=adapters/prot \\
      --probe probes.jsonl --method es --out merged-es
  esmerge merge --base org/model --adapter a=./a --adapter b=./b --method ties --space product --out merged
  esmerge merge --scale cpu --method es --set variant=code --out runs/cpu/es-code"""


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error")

    def scale_option(p, default="cpu"):
        p.add_argument("--scale", default=default, choices=scales.NAMES, help=f"model/data scale (default: {default})")

    top = argparse.ArgumentParser(prog="esmerge", parents=[common], description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("data", parents=[common], help="upstream data files of the manifest: verify / fetch")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("verify", parents=[common], help="check every file against its sha256; exit 0 only if all match")
    fetch = actions.add_parser("fetch", parents=[common],
                               help="download missing files by URL into the cache, hash-checked")
    fetch.add_argument("files", nargs="*", help="manifest paths (default: every missing file)")
    fetch.add_argument("--force", action="store_true", help="download even if a good copy exists")
    p.set_defaults(run=commands.handle_data)

    p = sub.add_parser("train", parents=[common], help="train a modality specialist (LoRA + projector)")
    scale_option(p)
    p.add_argument("--modality", choices=MODALITIES)
    p.add_argument("--steps", type=int, default=None, help="default: the scale's recipe (esmerge.scales)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", type=Path, help="output directory (default data_manifest/specialists/<scale>/<modality>; "
                   "at --seed N > 0, <scale>-seedN)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the recipe's, per modality")
    p.add_argument("--cell-top-k", type=int, default=None, help="genes per cell (default: the scale's)")
    p.add_argument("--checkpoint-every", type=int, default=25)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast of the forward pass (default: the scale's recipe)")
    p.add_argument("--projector-lr-scale", type=float, default=None,
                   help="the projector's learning rate as a multiple of --lr (default: the scale's recipe)")
    p.add_argument("--device", default=None, help="cpu, cuda or auto (default: cpu; paper: device_map auto)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="overwrite a finished specialist")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--write-manifest", action="store_true",
                   help="only (re)write data_manifest/specialists.yaml from the shipped directories")
    p.set_defaults(run=commands.handle_train)

    p = sub.add_parser("merge", parents=[common], help="merge LoRA adapters with any registered method",
                       description=MERGE_DESCRIPTION, epilog=MERGE_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("method and output")
    g.add_argument("--method", default="es", help="a registered method (see `esmerge methods`; default es)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="method hyper-parameter, e.g. --set tau_layer=0.1 (see `esmerge methods`)")
    g.add_argument("--out", type=Path, required=True, help="output directory (refused if it exists, unless --force)")
    g.add_argument("--force", action="store_true", help="replace a finished output directory")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dry-run", action="store_true",
                   help="--scale paper: check files, shapes, encoders and tokenizer without loading a weight, print "
                        "the plan (FLOPs, memory, hours); exit 1 on a blocking problem")
    g = p.add_argument_group("bring your own adapters (PEFT LoRA folders on one base)")
    g.add_argument("--base", default=None, help="the adapters' base: a hub id, a local model folder, or smoke/cpu "
                   "(also the base's hub id or folder at --scale paper)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="a PEFT LoRA folder on --base; repeat for each adapter (ranks, alphas, targets may differ)")
    g.add_argument("--probe", type=Path, default=None,
                   help="probe texts, JSON Lines with marked spans (es, es-layer, es-element only)")
    g.add_argument("--no-chat", action="store_true", help="probes are not wrapped in the chat template")
    g.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "auto"),
                   help="how the base is loaded (default auto: float32 on the CPU, bfloat16 on CUDA)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present for a hub/folder base)")
    g.add_argument("--space", default=None, choices=("factors", "product"),
                   help="avg and ties: merge A and B (factors, default: the paper's way) or each module's B A "
                        "(product, returned as a LoRA by truncated SVD)")
    g.add_argument("--rank", type=int, default=None,
                   help="with --space product: the merged LoRA's rank (default: the largest input rank)")
    g = p.add_argument_group("this project's specialists (a scale)")
    g.add_argument("--scale", default=None, choices=scales.NAMES, help="model/data scale (default: cpu)")
    g.add_argument("--probe-k", type=int, default=None, help="probe samples per modality (default: the scale's)")
    g.add_argument("--specialists", type=Path, default=None,
                   help="paper scale: folder of converted specialists (default data_manifest/specialists/paper)")
    p.set_defaults(run=commands.handle_merge)

    p = sub.add_parser("methods", parents=[common], help="list merge methods and their hyper-parameters")
    p.add_argument("name", nargs="*", metavar="[describe] NAME",
                   help="one method (default: all); `describe NAME`: one method in full, with its presets")
    p.set_defaults(run=commands.handle_methods)

    p = sub.add_parser("evaluate", parents=[common], help="evaluate models on the interaction benchmarks")
    scale_option(p)
    p.add_argument("--model", action="append", required=True, metavar="NAME_OR_DIR",
                   help="base, specialist-<modality> or a merged-model folder; repeat for several")
    p.add_argument("--benchmarks", nargs="+", default=None, help="default: the scale's")
    p.add_argument("--n-eval", type=int, default=None, help="examples per benchmark (default: the scale's)")
    p.add_argument("--n-shots", type=int, default=None, help="in-context examples (default: the scale's)")
    p.add_argument("--scoring", choices=("loglik", "generate"), default=None,
                   help="loglik: the likelier answer; generate: the paper's greedy reply and its `Final answer:`, "
                        "read as is (argmax: a reply has no scores to threshold) (default: the scale's; paper: "
                        "generate)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="with --scoring generate: reply length cap (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="results cache (default runs/<scale>/07_results/evals)")
    p.add_argument("--dry-run", action="store_true",
                   help="--scale paper: check models, files, tokenizer and prompt lengths without loading a weight, "
                        "print the plan (FLOPs, memory, hours); exit 1 on a blocking problem")
    p.set_defaults(run=commands.handle_evaluate)

    p = sub.add_parser("convert", parents=[common], help="convert a published checkpoint to a specialist folder")
    kinds = p.add_subparsers(dest="source_kind", required=True)
    k = kinds.add_parser("mol-llama", parents=[common], help="Mol-LLaMA: its LoRA, Q-Former and projector")
    k.add_argument("src", help="Mol-LLaMA checkpoint folder or file (hub id with internet)")
    k.add_argument("out", type=Path)
    k.add_argument("--base", default=None, help="base model path or id (default: the one the checkpoint names)")
    k.add_argument("--base-sha256", default=None, help="expected weights sha256 of the base (checked, on the card)")
    k = kinds.add_parser("prot2text", parents=[common], help="Prot2Text-V2: a rank-8 LoRA by SVD of its merged decoder")
    k.add_argument("src")
    k.add_argument("out", type=Path)
    k.add_argument("--base", required=True, help="LLaMA-3.1-8B-Instruct path or id")
    k.add_argument("--device", default=None, help="where the SVD runs (default: cuda if present)")
    k = kinds.add_parser("lora-extract", parents=[common], help="any full fine-tune: a LoRA by truncated SVD")
    k.add_argument("finetuned")
    k.add_argument("base")
    k.add_argument("out", type=Path)
    k.add_argument("--rank", type=int, default=8)
    k.add_argument("--modality", default=None, choices=MODALITIES)
    k.add_argument("--device", default=None)
    for name in ("prot2text", "lora-extract"):
        k = kinds.choices[name]
        k.add_argument("--error-budget", type=float, default=None,
                       help="the smallest rank whose worst per-matrix relative error is within this (e.g. 0.05); "
                            "only r = 8 merges with the other specialists")
        k.add_argument("--max-rank", type=int, default=None, help="with --error-budget: the largest rank to consider")
    for k in kinds.choices.values():
        k.add_argument("--force", action="store_true", help="replace a finished output folder")
    p.set_defaults(run=commands.handle_convert)

    p = sub.add_parser("regenerate", parents=[common], help="run every notebook (papermill) and build the book")
    scale_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed injected into every notebook (default: 0)")
    p.add_argument("--device", default=None, help="where the models run, injected into every notebook: cuda runs "
                   "the scale on a GPU with nothing else changed (default: the scale's, the CPU at smoke and cpu)")
    p.add_argument("--jobs", type=int, default=1, help="notebooks run in parallel when independent")
    p.add_argument("--only", nargs="+", metavar="STEM", help="run these notebooks (and any stale one they need)")
    p.add_argument("--force", action="store_true", help="re-run the selected notebooks even if unchanged")
    p.add_argument("--book-only", action="store_true", help="build the book from existing executed notebooks")
    p.add_argument("--no-book", action="store_true", help="run notebooks only; do not build the book")
    p.add_argument("--shipped", action="store_true",
                   help="with --book-only: render the results shipped in book/shipped/SCALE even if a local run exists")
    p.add_argument("--ship", action="store_true", help="copy the finished regeneration of SCALE into "
                   "book/shipped/SCALE (runs nothing; --force replaces an existing shipment)")
    p.add_argument("--check", action="store_true", help="compare the shipped results of SCALE with the code now; "
                   "exit 1 if a notebook's text changed since they ran")
    p.set_defaults(run=commands.handle_regenerate)
    return top
