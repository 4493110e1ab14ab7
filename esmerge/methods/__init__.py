"""One registry of merging methods, looked up by name everywhere (CLI, notebooks, tests).

The methods, grouped by idea:

* training-free, parameter space: ``static`` (Average, TIES, EMR, PCB, Consensus, built from
  ``primitives``) and ``graft`` (Graft's dual-gate fusion);
* data- or training-driven: ``es`` (ES-Merging and its ablations, from probe embeddings),
  ``adamerging`` (test-time entropy), ``finetune`` (Avg+FT), ``lsmerge`` (a VAE over parameters);
* what the training methods optimise: ``objectives`` (differentiable model calls with a given
  LoRA state, entropy, answer NLL) and ``contexts`` (which prompts they see);
* ``report``: comparing merged adapters.

Every method has the same signature::

    fn(adapters: list[Adapter], context: MergeContext | None = None, **hparams) -> MergeResult

and declares its hyper-parameters (``HParam``: name, type, default, range) on its registry
entry, so ``validate`` converts or refuses ``--set`` values before any model is loaded.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from esmerge.adapters import Adapter, check_compatible
from esmerge.errors import UsageError
from esmerge.methods.hparams import HParam, check_all, parse_set

__all__ = ["HParam", "MergeMethod", "MergeResult", "UnknownMethodError", "describe", "describe_method", "get", "names",
           "parse_set",
           "register", "run", "validate"]


@dataclass
class MergeResult:
    """A merged adapter plus what the method wants recorded (hyper-parameters, cost, diagnostics)."""

    adapter: Adapter
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    pretty_name: str
    reference: str
    fn: Callable[..., MergeResult]
    needs_context: bool = False
    hparams: tuple[HParam, ...] = ()
    # named settings over the declared hyper-parameters (ES-Merging: the paper's and the official code's)
    presets: dict = field(default_factory=dict)


class UnknownMethodError(UsageError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


METHODS: dict[str, MergeMethod] = {}
# Modules that register methods on import; listed here so the registry is complete on first use.
_METHOD_MODULES = (
    "esmerge.methods.es",
    "esmerge.methods.static",
    "esmerge.methods.graft",
    "esmerge.methods.adamerging",
    "esmerge.methods.finetune",
    "esmerge.methods.lsmerge",
)


def register(name: str, pretty_name: str, reference: str, needs_context: bool = False,
             hparams: tuple[HParam, ...] = (), presets: dict | None = None):
    """Decorator adding a merge function to the registry under ``name`` with its declared ``hparams``."""

    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(name, pretty_name, reference, fn, needs_context, tuple(hparams), dict(presets or {}))
        return fn

    return wrap


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def get(name: str) -> MergeMethod:
    """The registered method ``name``; an ``UnknownMethodError`` listing the available ones.

    >>> get("avg").pretty_name
    'Avg. Merging'
    """
    _load_all()
    if name not in METHODS:
        raise UnknownMethodError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def names() -> list[str]:
    _load_all()
    return sorted(METHODS)


def validate(name: str, hparams: dict) -> dict:
    """``hparams`` converted to their declared types; a one-line ``UsageError`` for an unknown
    method, an unknown key or a value out of range. Needs no model: call it first.

    >>> validate("ties", {"keep": "0.5", "scope": "model"})
    {'keep': 0.5, 'scope': 'model'}
    >>> validate("ties", {"tau": 0.1})
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: ties: unknown hyper-parameter 'tau'; known: keep, scale, scope
    """
    return check_all(name, get(name).hparams, dict(hparams))


def describe(name: str | None = None) -> list[dict]:
    """One row per (method, hyper-parameter): what ``esmerge methods`` lists.

    >>> [r["parameter"] for r in describe("pcb")]
    ['drop', 'scale', 'scope']
    """
    rows = []
    for method in ([get(name)] if name else [get(n) for n in names()]):
        if not method.hparams:
            rows.append({"method": method.name, "name": method.pretty_name, "parameter": "", "type": "",
                         "default": "", "range": "", "doc": "no hyper-parameters"})
        for h in method.hparams:
            rows.append({"method": method.name, "name": method.pretty_name, "parameter": h.name,
                         "type": h.type.__name__, "default": h.default, "range": h.range_text(), "doc": h.doc})
    return rows




def describe_method(name: str, width: int = 100) -> str:
    """One method in full, for ``esmerge methods describe NAME``: each hyper-parameter with its
    type, default, range, the value of every preset (e.g. ``paper`` and ``code``) and its doc,
    wrapped to ``width`` columns.

    >>> print(describe_method("ties"))  # doctest: +ELLIPSIS
    ties: TIES-Merging (...)
      keep (float) default 0.2, range in (0, 1]
    ...
    """
    import textwrap

    method = get(name)
    lines = [f"{method.name}: {method.pretty_name} ({method.reference})"]
    if not method.hparams:
        lines.append("  no hyper-parameters")
    for h in method.hparams:
        head = f"  {h.name} ({h.type.__name__}) default {h.default!r}" if h.type is str else \
            f"  {h.name} ({h.type.__name__}) default {h.default}"
        if h.range_text():
            head += f", range {h.range_text()}"
        lines.append(head)
        values = [f"{preset}: {settings[h.name]!r}" for preset, settings in method.presets.items() if h.name in settings]
        if values:
            lines.append(f"      presets: {', '.join(values)}")
        if h.doc:
            lines += textwrap.wrap(h.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def run(name: str, adapters: list[Adapter], context: Any = None, **hparams) -> MergeResult:
    """Merge ``adapters`` with the method registered as ``name`` (hyper-parameters validated first)."""
    method = get(name)
    hparams = validate(name, hparams)
    check_compatible(adapters)
    if method.needs_context and context is None:
        raise UsageError(f"merge method {name!r} needs a MergeContext (model, probes or data)")
    return method.fn(adapters, context, **hparams)
