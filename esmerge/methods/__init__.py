"""One registry of merging methods, looked up by name everywhere (CLI, notebooks, tests).

The methods, grouped by idea:

* training-free, parameter space: ``static`` (Average, TIES, EMR, PCB, Consensus, built from
  ``primitives``) and ``graft`` (Graft's dual-gate fusion);
* data- or training-driven: ``es`` (ES-Merging and its ablations, from probe embeddings),
  ``adamerging`` (test-time entropy), ``finetune`` (Avg+FT), ``lsmerge`` (a VAE over parameters);
* what the training methods optimise: ``objectives`` (differentiable model calls with a given
  LoRA state, entropy, answer NLL; the prompts they see are built in ``esmerge.run.baseline_inputs``);
* ``report``: comparing merged adapters.

Every method has the same signature::

    fn(adapters: list[Adapter], context: MergeContext | None = None, **hparams) -> MergeResult

and declares its hyper-parameters (``HParam``: name, type, default, range) on its registry
entry, so ``validate`` converts or refuses ``--set`` values before any model is loaded.
"""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from esmerge.errors import UsageError
from esmerge.methods.hparams import HParam, check_all, parse_set
from esmerge.specialists.adapters import Adapter, check_compatible

__all__ = ["HParam", "MergeMethod", "MergeResult", "UnknownMethodError", "describe", "describe_method", "get", "names",
           "needing", "run_checked",
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
    # what a user must supply beyond the adapters: "probe", "data" (a scale's prompts), "labels"
    needs: tuple[str, ...] = ()


class UnknownMethodError(UsageError, KeyError):
    """A method name that is not registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


METHODS: dict[str, MergeMethod] = {}


def register(name: str, pretty_name: str, reference: str, needs_context: bool = False,
             hparams: tuple[HParam, ...] = (), presets: dict | None = None, defaults=None, needs: tuple = ()):
    """Decorator that adds a merge function to the registry under ``name``, with its hyper-parameters.

    Each hyper-parameter's default is declared once: in the function's signature (``keep: float =
    0.2``) or, for a function that takes ``**settings``, in ``defaults`` (a dict or a dataclass
    instance). An ``HParam`` declares type, range and meaning, never the default.

    Parameters
    ----------
    name : str
        Registry name (``--method``), unique.
    pretty_name : str
        Name in tables and plots.
    reference : str
        Where the method comes from (paper, section or URL).
    needs_context : bool
        The method needs a ``MergeContext`` (model, probes or data); ``run`` refuses ``None``.
    hparams : tuple of HParam
        Declared hyper-parameters (``validate`` checks ``--set`` values against them).
    presets : dict, optional
        Named settings over the hyper-parameters (e.g. ES-Merging's ``paper`` and ``code``).
    defaults : dict or dataclass instance, optional
        Defaults of the hyper-parameters the signature does not name.
    needs : tuple of str
        What a user must supply beyond adapters: ``"probe"``, ``"data"`` (a scale's prompts),
        ``"labels"`` (task labels).

    Returns
    -------
    callable
        The decorator; it returns the function unchanged and raises ``ValueError`` if ``name``
        is already registered or a default is declared twice or not at all.

    Examples
    --------
    >>> def keep_first(adapters, context=None, k: int = 1):
    ...     return MergeResult(adapters[0])
    >>> register("demo-first", "Keep the first", "a doctest", hparams=(HParam("k", int),))(keep_first) is keep_first
    True
    >>> METHODS.pop("demo-first").hparams[0].default  # from the signature; the registry is left as it was
    1
    >>> register("avg", "Again", "a doctest")(keep_first)
    Traceback (most recent call last):
    ...
    ValueError: merge method 'avg' registered twice
    """

    def wrap(fn):
        if name in METHODS:
            raise ValueError(f"merge method {name!r} registered twice")
        declared = _with_defaults(name, fn, tuple(hparams), defaults)
        METHODS[name] = MergeMethod(name, pretty_name, reference, fn, needs_context, declared,
                                    dict(presets or {}), tuple(needs))
        return fn

    return wrap


def _with_defaults(method: str, fn: Callable, hparams: tuple[HParam, ...], defaults) -> tuple[HParam, ...]:
    """``hparams`` with each default taken from its one declaration: ``fn``'s signature or ``defaults``."""
    if dataclasses.is_dataclass(defaults):
        defaults = dataclasses.asdict(defaults)
    defaults = dict(defaults or {})
    signature = inspect.signature(fn).parameters
    out = []
    for h in hparams:
        param = signature.get(h.name)
        sources = {}
        if param is not None and param.default is not inspect.Parameter.empty:
            sources["signature"] = param.default
        if h.name in defaults:
            sources["defaults"] = defaults[h.name]
        if h.default is not None:
            sources["HParam"] = h.default
        if len(sources) > 1:
            raise ValueError(f"{method}: the default of {h.name} is declared in {' and '.join(sources)}; keep one")
        if not sources and not h.nullable:
            raise ValueError(f"{method}: {h.name} has no default; give one in the function's signature")
        out.append(dataclasses.replace(h, default=next(iter(sources.values()), None)))
    return tuple(out)


def _load_all() -> None:
    from esmerge.methods import registry  # noqa: F401  (importing it registers every method)


def get(name: str) -> MergeMethod:
    """The registered merge method called ``name``.

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"es"``.

    Returns
    -------
    MergeMethod
        Its registry entry (function, hyper-parameters, presets).

    Raises
    ------
    UnknownMethodError
        If no method has that name; the message lists the available ones.

    Examples
    --------
    >>> get("avg").pretty_name
    'Avg. Merging'
    >>> get("es").reference
    'Lee, Kim, Hwang 2026, §4 (Eq. 4)'
    >>> get("no-such-method")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    esmerge.methods.UnknownMethodError: unknown merge method 'no-such-method'; available: adamerging, avg, ...
    """
    _load_all()
    if name not in METHODS:
        raise UnknownMethodError(f"unknown merge method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def needing(what: str) -> tuple[str, ...]:
    """The methods that need ``what`` (``"probe"``, ``"data"`` or ``"labels"``) beside the adapters.

    >>> needing("probe")
    ('es', 'es-element', 'es-layer')
    """
    return tuple(name for name in names() if what in get(name).needs)


def names() -> list[str]:
    """The names of all registered merge methods, sorted.

    Returns
    -------
    list of str
        Every name ``get`` and ``run`` accept.

    Examples
    --------
    >>> names()  # doctest: +NORMALIZE_WHITESPACE
    ['adamerging', 'avg', 'avg-ft', 'consensus', 'emr', 'es', 'es-element', 'es-layer',
     'graft', 'ls-merge', 'pcb', 'ties']
    """
    _load_all()
    return sorted(METHODS)


class CheckedHParams(dict):
    """Hyper-parameters ``validate`` converted and checked for one method (a plain dict otherwise)."""

    def __init__(self, method: str, values: dict):
        super().__init__(values)
        self.method = method


def validate(name: str, hparams: dict) -> dict:
    """Convert a method's hyper-parameters to their declared types, or refuse them in one line.

    Needs no model: call it first.

    Parameters
    ----------
    name : str
        Registry name.
    hparams : dict
        Hyper-parameter -> value (strings from ``--set`` are parsed).

    Returns
    -------
    dict
        The converted values.

    Raises
    ------
    UsageError
        For an unknown method, an unknown key or a value out of range.

    Examples
    --------
    >>> validate("ties", {"keep": "0.5", "scope": "model"})
    {'keep': 0.5, 'scope': 'model'}
    >>> validate("ties", {"tau": 0.1})
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: ties: unknown hyper-parameter 'tau'; known: keep, scaling_factor, scope
    """
    if isinstance(hparams, CheckedHParams) and hparams.method == name:
        return hparams  # checked once already, on its way in (the CLI, then the merge it starts)
    return CheckedHParams(name, check_all(name, get(name).hparams, dict(hparams)))


def describe(name: str | None = None) -> list[dict]:
    """The table that ``esmerge methods`` lists: one row per (method, hyper-parameter).

    Parameters
    ----------
    name : str, optional
        One method; default: all of them.

    Returns
    -------
    list of dict
        Rows with ``method``, ``name``, ``parameter``, ``type``, ``default``, ``range`` and
        ``doc``; a method without hyper-parameters has one row with an empty ``parameter``.

    Examples
    --------
    >>> [r["parameter"] for r in describe("pcb")]
    ['drop', 'scaling_factor', 'scope']
    >>> row = describe("ties")[0]
    >>> row["parameter"], row["type"], row["default"], row["range"]
    ('keep', 'float', 0.2, 'in (0, 1]')
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
    """One method in full, for ``esmerge methods describe NAME``.

    Each hyper-parameter with its type, default, range, the value of every preset (e.g.
    ``paper`` and ``code``) and its doc.

    Parameters
    ----------
    name : str
        Registry name.
    width : int
        Column at which the docs are wrapped.

    Returns
    -------
    str
        The description, several lines.

    Examples
    --------
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
        values = [f"{preset}: {settings[h.name]!r}" for preset, settings in method.presets.items()
                  if h.name in settings]
        if values:
            lines.append(f"      presets: {', '.join(values)}")
        if h.doc:
            lines += textwrap.wrap(h.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def run(name: str, adapters: list[Adapter], context: Any = None, **hparams) -> MergeResult:
    """Merge adapters with the method registered as ``name``.

    The hyper-parameters are validated first, then the adapters are checked for an element-wise
    merge (same rank, targets, keys and shapes, finite values).

    Parameters
    ----------
    name : str
        Registry name.
    adapters : list of Adapter
        The specialists' LoRA adapters.
    context : MergeContext, optional
        Model, probes or data, for the methods that need them.
    **hparams
        The method's hyper-parameters.

    Returns
    -------
    MergeResult
        The merged adapter and what the method records.

    Examples
    --------
    Average Merging is Eq. 1 with every λ = 1/2 here: (1 + 3) / 2 = 2, (3 + 5) / 2 = 4.

    >>> import torch
    >>> from esmerge.specialists.adapters import Adapter
    >>> key = "layers.0.self_attn.q_proj.lora_A.weight"
    >>> a = Adapter({key: torch.tensor([[1., 3.]])}, {}, "molecule")
    >>> b = Adapter({key: torch.tensor([[3., 5.]])}, {}, "protein")
    >>> run("avg", [a, b]).adapter.state[key]
    tensor([[2., 4.]])
    """
    return run_checked(name, adapters, context, validate(name, hparams))


def run_checked(name: str, adapters: list[Adapter], context: Any, hparams: dict) -> MergeResult:
    """``run`` with hyper-parameters that ``validate`` already returned (a caller that validated them
    before loading any model does not check them twice)."""
    method = get(name)
    check_compatible(adapters)
    if method.needs_context and context is None:
        raise UsageError(f"merge method {name!r} needs a MergeContext (model, probes or data)")
    return method.fn(adapters, context, **hparams)
