r"""One layout for LoRA adapters of different rank, alpha or target modules, before any merge.

A PEFT LoRA adapter changes a module's weight by :math:`\Delta W = s\,B A` with ``A`` of shape
``[r, d_in]``, ``B`` of shape ``[d_out, r]`` and the scale :math:`s = \alpha / r` (or
:math:`\alpha / \sqrt r` with ``use_rslora``), where ``r`` and :math:`\alpha` may be given per
module by ``rank_pattern`` and ``alpha_pattern`` (matched as PEFT matches them: the first pattern
key that matches the end of the module's path). Merging methods work element-wise on ``A`` and
``B``, so every adapter must hold the same tensors, of the same shapes, with the same scale.
:func:`normalise` gives them that layout without changing any adapter's :math:`\Delta W`:

* **scales** that differ (another rank, alpha, pattern or rsLoRA) are folded into the factors,
  ``B <- s B``, and the config records ``r = lora_alpha = R``, so the scale is 1 for every module;
* **ranks** that differ are zero-padded to the largest rank ``R`` (extra rows of ``A``, columns
  of ``B``: :math:`B A` is unchanged, since the padded entries meet only zeros);
* **target modules** that differ become their union; a module an adapter does not adapt is a zero
  delta there (``A`` and ``B`` of zeros, of the shapes the others give it).

Adapters that already agree are returned as they are (the paper's specialists share one config,
and their merges stay bit-identical). What no layout can fix, a module whose width differs between
adapters, another base, NaN/Inf, is refused by ``adapters.check_compatible`` before this runs.
"""
from __future__ import annotations

import math
import re

import torch

from esmerge.specialists.adapters import Adapter, AdapterMismatchError

PREFIX = "base_model.model."  # PEFT's prefix of every saved LoRA key
_FACTOR = re.compile(r"^(?P<head>.+)\.lora_(?P<which>[AB])\.weight$")
# Config fields that restrict which modules a target name selects: kept when every adapter agrees,
# else the output names each adapted module by its full path instead.
_RESTRICTIONS = ("layers_to_transform", "layers_pattern", "exclude_modules")


def _peft_default(field: str):
    from peft import LoraConfig

    return LoraConfig.__dataclass_fields__[field].default


def module_path(head: str) -> str:
    """A LoRA key's module: its head without PEFT's prefix (``base_model.model.model.layers.0.mlp.up_proj`` ->
    ``model.layers.0.mlp.up_proj``), the name PEFT matches ``rank_pattern``, ``alpha_pattern`` and
    ``target_modules`` against."""
    return head.removeprefix(PREFIX)


def factors(adapter: Adapter) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{head: (A, B)}`` of an adapter, ``head`` being a key without ``.lora_A.weight``; a key that is not
    a LoRA factor, or a module with only one factor, is a ``ValueError`` (``user_adapters.check_lora_config`` refuses
    such adapters first, naming the file)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in adapter.state.items():
        match = _FACTOR.match(key)
        if match is None:
            raise ValueError(f"{adapter.name or 'adapter'}: {key} is not a LoRA factor (*.lora_A/B.weight)")
        parts.setdefault(match.group("head"), {})[match.group("which")] = value
    broken = next((head for head, ab in parts.items() if set(ab) != {"A", "B"}), None)
    if broken is not None:
        raise ValueError(f"{adapter.name or 'adapter'}: {broken} has only lora_{next(iter(parts[broken]))}")
    return {head: (ab["A"], ab["B"]) for head, ab in parts.items()}


def pattern_value(pattern: dict | None, module: str, default):
    """PEFT's per-module value: the first key of ``pattern`` matching the end of ``module``, else ``default``.

    >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.q_proj", 8)
    4
    >>> pattern_value({"q_proj": 4}, "model.layers.0.self_attn.v_proj", 8)
    8
    """
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def module_scale(config: dict, head: str) -> float:
    """The scale PEFT gives ``head``'s delta under ``config``: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).

    >>> module_scale({"r": 8, "lora_alpha": 32}, "base_model.model.model.layers.0.mlp.up_proj")
    4.0
    >>> module_scale({"r": 8, "lora_alpha": 32, "rank_pattern": {"up_proj": 16}}, "base_model.model.x.up_proj")
    2.0
    >>> module_scale({"r": 16, "lora_alpha": 8, "use_rslora": True}, "base_model.model.x.q_proj")
    2.0
    """
    module = module_path(head)
    r = config.get("r") or _peft_default("r")
    alpha = config.get("lora_alpha") or _peft_default("lora_alpha")
    r = pattern_value(config.get("rank_pattern"), module, r)
    alpha = pattern_value(config.get("alpha_pattern"), module, alpha)
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def delta_weights(adapter: Adapter, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    r"""``{head: s B A}``: each adapted module's :math:`\Delta W` (``[d_out, d_in]``), in ``dtype``."""
    return {head: module_scale(adapter.config, head) * (b.to(dtype) @ a.to(dtype))
            for head, (a, b) in factors(adapter).items()}


def _scaling(config: dict) -> tuple:
    """What decides every module's scale and rank under a config (equal tuples: equal scales)."""
    patterns = tuple(tuple(sorted((config.get(k) or {}).items())) for k in ("rank_pattern", "alpha_pattern"))
    return (config.get("r"), config.get("lora_alpha"), bool(config.get("use_rslora")), *patterns)


def _target_config(adapters: list[Adapter], heads: list[str]) -> dict:
    """The config fields that make PEFT adapt exactly ``heads`` (the union of every adapter's)."""
    lists = [adapter.config.get("target_modules") for adapter in adapters]
    restrictions = [tuple(repr(adapter.config.get(k)) for k in _RESTRICTIONS) for adapter in adapters]
    if len(set(restrictions)) == 1:
        if all(sorted(t or []) == sorted(lists[0] or []) for t in lists):
            return {"target_modules": lists[0]}
        return {"target_modules": sorted({name for t in lists for name in (t or [])})}
    # The adapters restrict their targets differently (layers_to_transform...): name every module.
    return {"target_modules": sorted(module_path(h) for h in heads), **{k: None for k in _RESTRICTIONS}}


def normalise(adapters: list[Adapter]) -> tuple[list[Adapter], dict]:
    """The adapters in one layout (module docstring), each with exactly its own :math:`\\Delta W` per module.

    Returns ``(adapters, record)``: ``record`` says what was done, for ``esmerge.json``:
    ``{"changed": bool, "scale_folded": bool, "rank": R or None, "zero_modules": {name: n}}``.
    Adapters that already share one layout come back as the same objects.

    >>> import torch
    >>> key = "base_model.model.layers.0.self_attn.q_proj.lora_{}.weight"
    >>> a = Adapter({key.format("A"): torch.ones(2, 3), key.format("B"): torch.ones(4, 2)},
    ...             {"r": 2, "lora_alpha": 4}, "a")
    >>> b = Adapter({key.format("A"): torch.ones(1, 3), key.format("B"): torch.ones(4, 1)},
    ...             {"r": 1, "lora_alpha": 1}, "b")
    >>> (na, nb), record = normalise([a, b])
    >>> record["rank"], na.config["r"], na.config["lora_alpha"], tuple(nb.state[key.format("A")].shape)
    (2, 2, 2, (2, 3))
    >>> bool(torch.equal(delta_weights(na)[key[:-15]], delta_weights(a)[key[:-15]]))
    True
    """
    parts = [factors(adapter) for adapter in adapters]
    heads: list[str] = []
    for layout in parts:
        heads += [head for head in layout if head not in heads]
    widths: dict[str, tuple[int, int, str]] = {}
    for adapter, layout in zip(adapters, parts):
        for head, (a, b) in layout.items():
            d_in, d_out = a.shape[1], b.shape[0]
            seen = widths.setdefault(head, (d_in, d_out, adapter.name))
            if seen[:2] != (d_in, d_out):
                raise AdapterMismatchError(f"adapter {seen[2]!r} vs {adapter.name!r}: {module_path(head)} maps "
                                           f"{seen[0]} -> {seen[1]} vs {d_in} -> {d_out}; they were trained on "
                                           "different bases")
    fold = len({_scaling(adapter.config) for adapter in adapters}) > 1
    same_modules = all(set(layout) == set(heads) for layout in parts)
    if not fold and same_modules:
        return adapters, {"changed": False, "scale_folded": False, "rank": None, "zero_modules": {}}
    rank = max(a.shape[0] for layout in parts for a, _ in layout.values()) if fold else None
    holder_rank = {}
    for layout in parts:  # without folding every adapter gives a module one rank (same config)
        for head, (a, _) in layout.items():
            holder_rank.setdefault(head, a.shape[0])
    targets = _target_config(adapters, heads)
    dtype = next(iter(parts[0].values()))[0].dtype
    out, zero = [], {}
    for adapter, layout in zip(adapters, parts):
        state = {}
        for head in heads:
            d_in, d_out, _ = widths[head]
            r = rank if fold else holder_rank[head]
            a = torch.zeros(r, d_in, dtype=dtype)
            b = torch.zeros(d_out, r, dtype=dtype)
            if head in layout:
                own_a, own_b = layout[head]
                k = own_a.shape[0]
                a[:k] = own_a
                b[:, :k] = own_b * module_scale(adapter.config, head) if fold else own_b
            state[f"{head}.lora_A.weight"] = a
            state[f"{head}.lora_B.weight"] = b
        config = dict(adapter.config, **targets)
        if fold:
            config.update(r=rank, lora_alpha=rank, rank_pattern={}, alpha_pattern={}, use_rslora=False)
        zero[adapter.name] = sum(head not in layout for head in heads)
        out.append(Adapter(state, config, adapter.name, dict(adapter.extras)))
    return out, {"changed": True, "scale_folded": fold, "rank": rank, "zero_modules": zero}
