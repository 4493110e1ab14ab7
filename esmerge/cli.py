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

Every subcommand is declared here, once, and calls one library function. A refusal is one line
on stderr, ``esmerge <command>: <what and what to do>``, exit code 1 (2 for a usage error);
``--debug`` shows the traceback instead. ``unexpected ...`` is reserved for defects.
Stdout is a report: when it cannot be written (``> /dev/full``, a closed pipe) the command still
finishes, then one warning line says so (none for a closed pipe); the exit code stays the command's,
except for ``methods`` and ``data verify``, whose listing is their product (exit 1).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from esmerge import scales
from esmerge.errors import EsmergeError, GuardedStdout, UsageError
from esmerge.specialists.encoders import MODALITIES


# --------------------------------------------------------------------------- subcommands
def _data(args) -> int:
    from esmerge.data import files

    if args.action == "verify":
        statuses = files.verify()
        width = max([len(s.path) for s in statuses] + [4])
        status_width = max([len(s.status) for s in statuses] + [7])
        print(f"{'file':<{width}}  {'bytes':>9}  {'status':<{status_width}}  where")
        for s in statuses:
            root = str(s.location)[: -len(s.path) - 1] if s.location else "-"  # the search dir it came from
            print(f"{s.path:<{width}}  {s.bytes:>9}  {s.status:<{status_width}}  {root}")
        bad = [s for s in statuses if s.status != "ok"]
        for s in bad:
            print(f"error: {s.message}", file=sys.stderr)
        print(f"{len(statuses) - len(bad)} of {len(statuses)} files ok")
        return 1 if bad else 0
    # What `make data` runs before `make all` / `make test`: a no-op (one line) when every file is
    # already resolved, else the downloads; anything still missing is one refusal line, not one per file.
    failures = {}
    for path, outcome in files.fetch_missing(args.files, force=args.force):
        if isinstance(outcome, Exception):
            failures[path] = outcome
        else:
            print(f"fetched {path} -> {outcome}")
    wanted = [files.manifest()[p] for p in args.files or files.manifest()]
    if failures:
        raise files.DataError(files.fetch_summary(failures, len(wanted)))
    statuses = [files.check_file(entry) for entry in wanted]  # hashes are memoised: no second read
    roots = sorted({str(s.location)[: -len(s.path) - 1] for s in statuses if s.location is not None})
    print(f"{len(statuses)} of {len(statuses)} upstream data files ok, sha256-checked (in {', '.join(roots)})")
    return 0


def _train(args) -> int:
    import torch

    from esmerge.specialists import load

    if args.write_manifest:
        print(f"wrote {load.write_manifest(args.scale, args.seed or 0)}")
        return 0
    if args.modality is None:
        raise UsageError("--modality is required (molecule, protein or cell)")
    from esmerge.specialists.train import check_settings  # before the base loads

    check_settings(steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.checkpoint_every,
                   projector_lr_scale=args.projector_lr_scale)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or load.SHIPPED_DIR / args.scale / args.modality
    load.train_for_scale(scales.get(args.scale), args.modality, out, device=args.device, steps=args.steps,
                                batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_tokens=args.max_tokens,
                                resume=not args.no_resume, force=args.force, checkpoint_every=args.checkpoint_every,
                                bf16=args.bf16, cell_top_k=args.cell_top_k,
                                projector_lr_scale=args.projector_lr_scale)
    print(f"saved {out}")
    return 0


def _merge(args) -> int:
    from esmerge import methods
    from esmerge.run import byo, merge, user_adapters

    hparams = methods.validate(args.method, methods.parse_set(args.set))  # first, before the options' fit
    _check_merge_options(args)
    if args.dry_run:
        if args.adapter or args.scale != "paper":
            raise UsageError("--dry-run checks a paper-scale merge: use it with --scale paper (not --adapter)")
        from esmerge.run import dry_run

        return dry_run.print_plan(dry_run.merge_plan(args.method, hparams, base_path=args.base,
                                                     specialists_dir=args.specialists, probe_k=args.probe_k,
                                                     out=args.out, force=args.force))
    if args.adapter:  # bring your own adapters: any PEFT LoRA folders on one base
        if not args.base:
            raise UsageError("--adapter needs --base (a hub id, a local model folder, or smoke/cpu)")
        named = user_adapters.named_adapters([user_adapters.split_name_path(item) for item in args.adapter])
        _refuse_output("merge", args.out, args.force, [*named.values(), args.probe, args.base])  # before loading
        _check_probe_options(args, methods.needing("probe"))
        out = byo.merge_adapters(args.base, named, args.probe, args.out, args.method, hparams, force=args.force,
                                 seed=args.seed, chat=not args.no_chat, device=args.device, dtype=args.dtype,
                                 space=args.space or "factors", rank=args.rank, report=print)
    else:
        out = merge.merge_command(scales.get(args.scale or "cpu"), args.method, args.out, hparams, seed=args.seed,
                                     probe_k=args.probe_k, force=args.force, base_path=args.base,
                                     specialists_dir=args.specialists)  # validates before loading a model
    print(f"merged with {args.method} -> {out}")
    return 0


# Options of `esmerge merge` that apply to one of its two ways only: given with the other way, each is
# refused in one line rather than silently ignored.
_SCALE_ONLY = (("--scale", "scale"), ("--probe-k", "probe_k"), ("--specialists", "specialists"))
_ADAPTER_ONLY = (("--probe", "probe"), ("--no-chat", "no_chat"), ("--dtype", "dtype"), ("--device", "device"),
                 ("--space", "space"), ("--rank", "rank"))


def _check_merge_options(args) -> None:
    """Refuse, in one line, a `merge` option that does not apply to this way of merging."""
    given = [flag for flag, dest in (_ADAPTER_ONLY if not args.adapter else _SCALE_ONLY)
             if getattr(args, dest) is not None and getattr(args, dest) is not False]  # --rank 0 is given
    if given and not args.adapter:
        raise UsageError(f"{given[0]} goes with --adapter NAME=PATH (bring your own adapters), not with the "
                         "scale's specialists; drop it or add --base and --adapter")
    if given:
        raise UsageError(f"{given[0]} applies to the scale's specialists, not to --adapter NAME=PATH (bring your "
                         "own adapters); drop it")


def _check_probe_options(args, probe_methods) -> None:
    """Refuse, in one line, --probe or --no-chat with a method that reads no probes."""
    if args.method not in probe_methods:
        for flag, dest in (("--probe", "probe"), ("--no-chat", "no_chat")):
            if getattr(args, dest):
                raise UsageError(f"{flag} is read only by {', '.join(probe_methods)}; method {args.method!r} merges "
                                 f"the adapters' parameters alone: drop {flag}")


def _refuse_output(kind: str, out, force: bool, inputs) -> None:
    """Refuse ``out`` (one line) unless it is free or, with ``--force``, an earlier output of ``kind``
    that is none of the local ``inputs`` (``esmerge.outputs.check_replaceable``)."""
    from esmerge import outputs

    outputs.recover(out)
    local = [p for p in inputs if p and str(p) not in scales.NAMES and Path(p).exists()]
    outputs.check_replaceable(out, outputs.KINDS[kind], force, local)


def _methods(args) -> int:
    import textwrap

    from esmerge import methods
    from esmerge.methods.listing import NEEDS_LEGEND, methods_listing

    words = list(args.name)
    if words[:1] == ["describe"]:
        if len(words) != 2:
            raise UsageError("write `esmerge methods describe NAME`, e.g. `esmerge methods describe es`")
        print(methods.describe_method(words[1]))
        return 0
    if len(words) > 1:
        raise UsageError(f"esmerge methods takes one method name, got {' '.join(words)!r}; "
                         "or `esmerge methods describe NAME` for one method in full")
    print("\n".join(methods_listing(words[0] if words else None)))
    print("\n".join(textwrap.wrap(NEEDS_LEGEND, 100)))
    return 0


def _evaluate(args) -> int:
    import pandas as pd

    if args.dry_run:
        if args.scale != "paper":
            raise UsageError("--dry-run checks a paper-scale evaluation: add --scale paper")
        from esmerge.run import dry_run

        return dry_run.print_plan(dry_run.evaluate_plan(args.model, args.benchmarks, n_eval=args.n_eval,
                                                        n_shots=args.n_shots, scoring=args.scoring,
                                                        max_new_tokens=args.max_new_tokens, seed=args.seed))

    from esmerge.run.evaluate_named import evaluate_by_name

    rows = evaluate_by_name(scales.get(args.scale), args.model, args.benchmarks, seed=args.seed, out_dir=args.out,
                            n_eval=args.n_eval, n_shots=args.n_shots, scoring=args.scoring,
                            max_new_tokens=args.max_new_tokens)
    with pd.option_context("display.width", 160, "display.max_rows", 500):
        print(rows[["method", "benchmark", "n", "accuracy", "acc_lo", "acc_hi", "macro_f1"]].round(1)
              .to_string(index=False))
        print(rows.groupby("method", sort=False)[["accuracy", "macro_f1"]].mean().round(1).to_string())
    return 0


def _convert(args) -> int:
    from esmerge.specialists import convert

    sources = (getattr(args, "src", None), getattr(args, "finetuned", None), args.base)
    _refuse_output("converted-specialist", args.out, args.force, sources)  # before reading any checkpoint
    if args.source_kind == "mol-llama":
        written = convert.convert_mol_llama(args.src, args.out, base=args.base, force=args.force,
                                            base_sha256=args.base_sha256)
        print(f"wrote {written}")
        return 0
    if args.source_kind == "prot2text":
        result = convert.convert_prot2text(args.src, args.out, args.base, force=args.force, device=args.device,
                                           error_budget=args.error_budget, max_rank=args.max_rank)
    else:
        result = convert.lora_extract(args.finetuned, args.base, args.out, rank=args.rank, modality=args.modality,
                                      force=args.force, device=args.device, error_budget=args.error_budget,
                                      max_rank=args.max_rank)
    print(convert.summary(result.report))
    print(f"wrote {args.out}")
    return 0


def _regenerate(args) -> int:
    from esmerge.regen import regenerate

    return regenerate.regenerate(args)  # checks its options first


# --------------------------------------------------------------------------- parser
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
    p.set_defaults(run=_data)

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
    p.set_defaults(run=_train)

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
    p.set_defaults(run=_merge)

    p = sub.add_parser("methods", parents=[common], help="list merge methods and their hyper-parameters")
    p.add_argument("name", nargs="*", metavar="[describe] NAME",
                   help="one method (default: all); `describe NAME`: one method in full, with its presets")
    p.set_defaults(run=_methods)

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
    p.set_defaults(run=_evaluate)

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
    p.set_defaults(run=_convert)

    p = sub.add_parser("regenerate", parents=[common], help="run every notebook (papermill) and build the book")
    scale_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed injected into every notebook (default: 0)")
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
    p.set_defaults(run=_regenerate)
    return top


def _stdout_failed(args, err: OSError, code: int) -> int:
    """The exit code when stdout could not be written. A closed pipe (``| head``) is the reader's choice:
    the command's own code, silently. Otherwise one warning line; the code stays the command's when its
    product is on disk (merge, train, convert, evaluate, regenerate, data fetch) and is 1 when the
    listing itself was the product (``methods``, ``data verify``)."""
    if isinstance(err, BrokenPipeError):
        return code
    listing = args.command == "methods" or getattr(args, "action", None) == "verify"
    what = "its listing was lost" if listing else "the command's outputs on disk are complete"
    print(f"esmerge {args.command}: warning: could not write to stdout ({err.strerror or err}); {what}",
          file=sys.stderr)
    return 1 if listing and code == 0 else code


def main(argv: list[str] | None = None) -> int:
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as stop:  # argparse printed the usage error (or --help)
        return int(stop.code or 0)
    guard = GuardedStdout(sys.stdout)
    sys.stdout = guard
    try:
        code = _run(args)
        guard.flush()
        return _stdout_failed(args, guard.error, code) if guard.error is not None else code
    finally:
        sys.stdout = guard.stream


def _run(args) -> int:
    """The command, its refusals as one line (``EsmergeError``) and anything else as a reported defect."""
    try:
        from esmerge.errors import check_seed

        check_seed(getattr(args, "seed", None))  # every command's --seed: numpy and torch take [0, 2**32)
        return int(args.run(args) or 0)
    except EsmergeError as err:
        if args.debug:
            raise
        print(f"esmerge {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"esmerge {args.command}: interrupted; finished outputs were kept, rerun the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as err:  # a defect, not a refusal: one line, the traceback on request
        if args.debug:
            raise
        print(f"esmerge {args.command}: unexpected {type(err).__name__}: {err} (rerun with --debug for the "
              "traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
