"""What each ``esmerge`` command does: one handler per subcommand, each calling one library function.

``esmerge.cli.arguments`` declares the commands and names their handlers (``handle_<command>``); a
handler gets the parsed ``argparse.Namespace``, prints its report on stdout, returns the exit code and
refuses bad input by raising an ``EsmergeError`` (``esmerge.cli.main`` prints it in one line). Checks that
need no model run first, so a refusal never waits for a load.
"""
from __future__ import annotations

import sys
from pathlib import Path

from esmerge import scales
from esmerge.errors import UsageError


def handle_data(args) -> int:
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


def handle_train(args) -> int:
    import torch

    from esmerge.specialists import load, per_scale

    if args.write_manifest:
        print(f"wrote {per_scale.write_manifest(args.scale, args.seed or 0)}")
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
                         bf16=args.bf16, cell_top_k=args.cell_top_k, projector_lr_scale=args.projector_lr_scale)
    print(f"saved {out}")
    return 0


def handle_merge(args) -> int:
    from esmerge import methods
    from esmerge.run import byo, merge, user_adapters

    # The one check of the method and its --set values, first (before the options' fit); the library
    # calls below take the checked values as they are (methods.validate passes them through).
    hparams = methods.validate(args.method, methods.parse_set(args.set))
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
                                  specialists_dir=args.specialists)
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


def handle_methods(args) -> int:
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


def handle_evaluate(args) -> int:
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


def handle_convert(args) -> int:
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


def handle_regenerate(args) -> int:
    from esmerge.regen import regenerate

    return regenerate.regenerate(args)  # checks its options first
