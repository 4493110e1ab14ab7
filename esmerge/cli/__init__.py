"""The ``esmerge`` command line: ``main`` parses the arguments, runs the command's handler and reports.

``arguments`` declares every subcommand (``esmerge --help`` lists them) and ``commands`` holds what each
one does. A refusal is one line on stderr, ``esmerge <command>: <what and what to do>``, exit code 1 (2
for a usage error); ``--debug`` shows the traceback instead. ``unexpected ...`` is reserved for defects.
Stdout is a report: when it cannot be written (``> /dev/full``, a closed pipe) the command still
finishes, then one warning line says so (none for a closed pipe); the exit code stays the command's,
except for ``methods`` and ``data verify``, whose listing is their product (exit 1).
"""
from __future__ import annotations

import sys

from esmerge.cli.arguments import parser
from esmerge.errors import EsmergeError, GuardedStdout

__all__ = ["main", "parser"]


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

