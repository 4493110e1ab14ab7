"""One registry of merging methods, looked up by name everywhere (CLI, notebooks, tests).

Every method has the same signature::

    fn(adapters: list[Adapter], context: MergeContext | None = None, **hparams) -> MergeResult

``adapters`` are the specialists' LoRA adapters in a fixed modality order (molecule, protein,
cell). Parameter-space methods ignore ``context``; methods that need a model or data
(ES-Merging, AdaMerging, Avg+FT, Graft's compatibility score) read it from ``context``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from esmerge.adapters import Adapter


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


def register(name: str, pretty_name: str, reference: str, needs_context: bool = False):
    """Decorator adding a merge function to the registry under ``name``."""

    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        METHODS[name] = MergeMethod(name, pretty_name, reference, fn, needs_context)
        return fn

    return wrap


def _load_all() -> None:
    for module in _METHOD_MODULES:
        importlib.import_module(module)


def get(name: str) -> MergeMethod:
    _load_all()
    if name not in METHODS:
        raise KeyError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def names() -> list[str]:
    _load_all()
    return sorted(METHODS)


def run(name: str, adapters: list[Adapter], context: Any = None, **hparams) -> MergeResult:
    """Merge ``adapters`` with the method registered as ``name``."""
    from esmerge.adapters import check_compatible

    method = get(name)
    check_compatible(adapters)
    if method.needs_context and context is None:
        raise ValueError(f"merge method {name!r} needs a MergeContext (model, probes or data)")
    return method.fn(adapters, context, **hparams)
