"""Declared hyper-parameters of merging methods: name, type, default, range; checked before any model loads.

Each method lists its ``HParam`` s on its registry entry (as mergekit's method classes declare
their parameters), so ``esmerge merge --set key=value`` is converted and refused with one line
naming the value, and ``esmerge methods`` can list every parameter.

>>> tau = HParam("tau_layer", float, 0.5, low=0.0, low_open=True, doc="layer softmax temperature")
>>> tau.check("es", "0.1")
0.1
>>> tau.check("es", "abc")
Traceback (most recent call last):
...
esmerge.errors.UsageError: es: tau_layer must be a number > 0, got 'abc'
>>> parse_set(["tau_layer=0.1", "variant=code", 'order=["cell", "molecule"]'])
{'tau_layer': 0.1, 'variant': 'code', 'order': ['cell', 'molecule']}

Three rules hold for every declared parameter, so no method has to repeat them: a number is
finite and not subnormal (a temperature of 1e-320 divides to Inf), an integer fits in 64 bits
(torch sizes and counts are int64), and any parameter named ``seed`` is a numpy/torch seed
(``SEED_RANGE``, also what ``check_seed`` enforces for ``--seed``).

>>> HParam("seed", int, 0).check("ls-merge", -1)
Traceback (most recent call last):
...
esmerge.errors.UsageError: ls-merge: seed must be an integer in [0, 4294967295], got -1
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

from esmerge.errors import SEED_RANGE, UsageError

_INT64 = 2**63
_TYPE_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string", list: "a list of names"}
@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a merge method.

    ``type``: float, int, bool, str or list (of str). ``low``/``high``: inclusive bounds
    (``low_open``/``high_open`` make them strict). ``choices``: the allowed values of a str.
    ``also``: literal values accepted besides the type (e.g. ``"min"`` for an int size).
    ``nullable``: ``None`` is allowed (and means "the method's own rule", see ``doc``).
    """

    name: str
    type: type
    default: Any = None  # filled from the method's one declaration of its defaults at registration
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    also: tuple = ()
    nullable: bool = False
    doc: str = ""

    def __post_init__(self):
        if self.name == "seed" and self.type is int and self.low is None and self.high is None:
            object.__setattr__(self, "low", SEED_RANGE[0])  # frozen: set once, here
            object.__setattr__(self, "high", SEED_RANGE[1])

    def range_text(self) -> str:
        """The allowed values in words, e.g. ``"> 0"``, ``"in [0, 1)"``, ``"paper | code"``."""
        if self.choices:
            text = " | ".join(map(str, self.choices))
        elif self.low is not None and self.high is not None:
            text = (f"in {'(' if self.low_open else '['}{_num(self.low)}, "
                    f"{_num(self.high)}{')' if self.high_open else ']'}")
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {_num(self.high)}"
        else:
            text = ""
        extra = [repr(a) for a in self.also] + (["null"] if self.nullable else [])
        return " or ".join(t for t in [text, *extra] if t)

    def _refuse(self, method: str, value, why: str = "") -> UsageError:
        wanted = _TYPE_WORDS[self.type] if not self.choices else "one of"
        rng = self.range_text()
        return UsageError(f"{method}: {self.name} must be {wanted}{' ' + rng if rng else ''}, got {value!r}"
                          + (f" ({why})" if why else ""))

    def check(self, method: str, value: Any) -> Any:
        """``value`` converted to this parameter's type (command-line strings are parsed), or a ``UsageError``."""
        if value is None:
            if self.nullable:
                return None
            raise self._refuse(method, value)
        if value in self.also and not isinstance(value, bool):
            return value
        converted = self._convert(value)
        if converted is None or not self._in_range(converted):
            raise self._refuse(method, value)
        if self.type is float and 0 < abs(converted) < sys.float_info.min:
            raise self._refuse(method, value, f"subnormal: below {sys.float_info.min:.1e}, dividing by it overflows")
        if self.type is int and abs(converted) >= _INT64:
            raise self._refuse(method, value, "beyond a 64-bit integer")
        return converted

    def _convert(self, value):
        if self.type is bool:
            if isinstance(value, bool):
                return value
            return {"true": True, "false": False}.get(str(value).lower()) if isinstance(value, str) else None
        if isinstance(value, bool):
            return None  # True is not a number here
        if self.type is float:
            try:
                number = float(value)
            except (TypeError, ValueError):
                return None
            return number if math.isfinite(number) else None
        if self.type is int:
            try:
                number = float(value) if isinstance(value, str) else value
            except ValueError:
                return None
            if isinstance(number, float) and number.is_integer():
                return int(number)
            return number if isinstance(number, int) else None
        if self.type is str:
            return value if isinstance(value, str) else None
        if self.type is list:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            return list(value) if ok else None
        raise TypeError(f"unsupported hyper-parameter type {self.type}")

    def _in_range(self, value) -> bool:
        if self.choices:
            return value in self.choices
        if self.type not in (int, float):
            return True
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return False
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return False
        return True


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def check_all(method: str, declared: tuple[HParam, ...], hparams: dict) -> dict:
    """Convert every given hyper-parameter with its declaration (``HParam.check``).

    Parameters
    ----------
    method : str
        The method's name, for the messages.
    declared : tuple of HParam
        The method's declared hyper-parameters.
    hparams : dict
        Name -> value.

    Returns
    -------
    dict
        Name -> converted value (only the given ones; defaults are not filled in).

    Raises
    ------
    UsageError
        For an unknown name (the message lists the known ones) or a bad value.

    Examples
    --------
    >>> declared = (HParam("k", int, 2, low=1),)
    >>> check_all("demo", declared, {"k": "3"})
    {'k': 3}
    >>> check_all("demo", declared, {"j": 1})
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: demo: unknown hyper-parameter 'j'; known: k
    """
    by_name = {h.name: h for h in declared}
    out = {}
    for key, value in hparams.items():
        if key not in by_name:
            known = ", ".join(sorted(by_name)) or "none"
            raise UsageError(f"{method}: unknown hyper-parameter {key!r}; known: {known}")
        out[key] = by_name[key].check(method, value)
    return out


def parse_set(items: list[str]) -> dict:
    """Parse ``--set key=value`` items into a dict.

    A value is JSON if it parses (numbers, ``true``, lists), else the string itself.

    Parameters
    ----------
    items : list of str
        ``["key=value", ...]``.

    Returns
    -------
    dict
        Key -> value, not yet checked (see ``check_all``).

    Raises
    ------
    UsageError
        For an item without ``=`` or without a key.

    Examples
    --------
    >>> parse_set(["k=3", "name=abc", "flag=true"])
    {'k': 3, 'name': 'abc', 'flag': True}
    >>> parse_set(["k"])
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: --set 'k': write KEY=VALUE, e.g. --set tau_layer=0.1
    """
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set {item!r}: write KEY=VALUE, e.g. --set tau_layer=0.1")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out
