"""The errors a user can cause, each with a one-line message that names the file or value and what to do.

``esmerge.cli`` prints ``esmerge <command>: <message>`` for any ``EsmergeError`` and exits 1
(2 for a ``UsageError``); ``--debug`` shows the traceback instead. Modules raise these (or a
subclass) for bad input, never a bare ``ValueError`` that would reach the user as a traceback.
"""
from __future__ import annotations

import io
import os


class EsmergeError(Exception):
    """Base of every refusal the CLI reports in one line (exit code 1)."""

    exit_code = 1


class UsageError(EsmergeError, ValueError):
    """A bad option or parameter value (exit code 2, like argparse)."""

    exit_code = 2


class InputError(EsmergeError, ValueError):
    """A file or data value that cannot be used as given (NaN, wrong shape, wrong base, ...)."""


class OutputExistsError(EsmergeError, FileExistsError):
    """An output directory that is already complete; pass ``--force`` to replace it."""


class ModelUnavailableError(EsmergeError):
    """A base model cannot be loaded here; the message says how to get it."""


# Bounds every command checks the same way (the methods' hyper-parameters, training, evaluation).
# numpy.random.seed and torch.Generator.manual_seed both take [0, 2**32) (numpy refuses anything else).
SEED_RANGE = (0, 2**32 - 1)
# Learning rates above this are refused everywhere (train --lr, the methods' lr): Adam moves every
# weight by about lr per step whatever the gradient's scale, so lr = 10 already moves LoRA entries
# (|w| ~ 0.01-1) by orders of magnitude more than they hold; published recipes use 1e-5 to 1e-2.
LR_MAX = 10.0


def check_seed(seed, what: str = "--seed"):
    """``seed`` if it is an integer in ``SEED_RANGE`` (or ``None``: the default), else a one-line ``UsageError``.

    >>> check_seed(7), check_seed(None)
    (7, None)
    >>> check_seed(2**32)
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: --seed must be an integer in [0, 4294967295] (a numpy/torch seed), got 4294967296
    """
    ok = seed is None or (isinstance(seed, int) and not isinstance(seed, bool)
                          and SEED_RANGE[0] <= seed <= SEED_RANGE[1])
    if not ok:
        raise UsageError(f"{what} must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}] (a numpy/torch seed), "
                         f"got {seed!r}")
    return seed


class GuardedStdout:
    """``sys.stdout`` while a command runs: a report line that cannot be written (a closed pipe, a full
    disk) is dropped and remembered instead of interrupting the work; the CLI says so after it."""

    def __init__(self, stream):
        self.stream, self.error = stream, None

    def _fail(self, err: OSError) -> None:
        self.error = err
        try:  # what stays buffered would fail again at exit: send it, and the rest, to /dev/null
            target = self.stream.fileno()
            devnull = os.open(os.devnull, os.O_WRONLY)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            return  # not a file (a test's capture): nothing is flushed at exit
        os.dup2(devnull, target)
        os.close(devnull)

    def write(self, text: str) -> int:
        if self.error is None:
            try:
                return self.stream.write(text)
            except OSError as err:
                self._fail(err)
        return len(text)

    def flush(self) -> None:
        if self.error is None:
            try:
                self.stream.flush()
            except OSError as err:
                self._fail(err)

    def __getattr__(self, name):
        return getattr(self.stream, name)
