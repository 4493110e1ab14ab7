"""The errors a user can cause, each with a one-line message that names the file or value and what to do.

``esmerge.cli`` prints ``esmerge <command>: <message>`` for any ``EsmergeError`` and exits 1
(2 for a ``UsageError``); ``--debug`` shows the traceback instead. Modules raise these (or a
subclass) for bad input, never a bare ``ValueError`` that would reach the user as a traceback.
"""
from __future__ import annotations


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
