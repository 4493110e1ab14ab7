r"""Combining coefficients and merging LoRA adapters (paper Eqs. 1 and 4), and the ``esmerge merge`` entry point.

.. math::

    \lambda^{l,n}_j = \frac{\alpha^l_j\,\beta^{l,n}_j}{\sum_m \alpha^l_m\,\beta^{l,n}_m}
    \quad\text{(Eq. 4)}, \qquad
    \theta^{l,n}_{\text{uni}} = \sum_j \lambda^{l,n}_j\,\theta^{l,n}_j \quad\text{(Eq. 1)}.

As in the paper and its code, Eq. 1 is applied to the LoRA A and B matrices element-wise (not
to the products BA).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esmerge.adapters import Adapter, LoraState, layer_of, save_adapter
from esmerge.cache import tensor_digest


def combine(alpha: torch.Tensor, beta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    r"""Final coefficients :math:`\lambda = \alpha\beta / \sum_m \alpha_m\beta_m` (paper Eq. 4).

    Args:
        alpha: ``[S, L]`` layer-wise coefficients (``layer_coefficients``).
        beta: LoRA key -> ``[S, *tensor_shape]`` element-wise coefficients (``element_coefficients``).

    Returns:
        LoRA key -> ``[S, *tensor_shape]``, summing to 1 over dim 0.

    >>> alpha = torch.tensor([[0.5], [0.5]])
    >>> beta = {"layers.0.self_attn.q_proj.lora_A.weight": torch.tensor([[0.2, 0.9], [0.8, 0.1]])}
    >>> combine(alpha, beta)["layers.0.self_attn.q_proj.lora_A.weight"]
    tensor([[0.2000, 0.9000],
            [0.8000, 0.1000]])
    """
    out = {}
    for key, b in beta.items():
        layer = layer_of(key)
        if b.shape[0] != alpha.shape[0]:
            raise ValueError(f"{key}: beta has {b.shape[0]} specialists, alpha {alpha.shape[0]}")
        if layer >= alpha.shape[1]:
            raise ValueError(f"{key}: layer {layer} but alpha has {alpha.shape[1]} layers")
        a = alpha[:, layer].to(b.dtype).view(-1, *([1] * (b.ndim - 1)))
        product = a * b
        total = product.sum(0, keepdim=True)
        # Where every product underflows to 0 no specialist is preferred: weigh them equally.
        out[key] = torch.where(total > 0, product / total.clamp_min(1e-300), torch.full_like(product, 1.0 / b.shape[0]))
    return out


def uniform_layer_coefficients(n_specialists: int, n_layers: int) -> torch.Tensor:
    """``[S, L]`` of ``1/S``: the neutral alpha (used by element-only ES-Merging)."""
    return torch.full((n_specialists, n_layers), 1.0 / n_specialists, dtype=torch.float64)


def uniform_element_coefficients(template: LoraState, n_specialists: int) -> dict[str, torch.Tensor]:
    """Key -> ``[S, *shape]`` of ``1/S``: the neutral beta (used by layer-only ES-Merging)."""
    return {k: torch.full((n_specialists, *v.shape), 1.0 / n_specialists, dtype=torch.float64)
            for k, v in template.items()}


def merge_lora(states: list[LoraState], coefficients: dict[str, torch.Tensor]) -> LoraState:
    r"""Weighted element-wise sum of LoRA tensors (paper Eq. 1).

    Args:
        states: one LoRA state dict per specialist (same keys and shapes).
        coefficients: key -> ``[S, *shape]`` (or ``[S]``, broadcast over the tensor).

    Returns:
        The merged state dict (dtype of the inputs).

    >>> a = {"w": torch.tensor([1.0, 2.0])}; b = {"w": torch.tensor([3.0, 6.0])}
    >>> merge_lora([a, b], {"w": torch.tensor([[1.0, 0.5], [0.0, 0.5]])})["w"]
    tensor([1., 4.])
    """
    if not states:
        raise ValueError("no adapters to merge")
    merged = {}
    for key, ref in states[0].items():
        if key not in coefficients:
            raise KeyError(f"no coefficients for LoRA tensor {key}")
        coef = coefficients[key]
        if coef.shape[0] != len(states):
            raise ValueError(f"{key}: {coef.shape[0]} coefficients for {len(states)} adapters")
        coef = coef.view(coef.shape[0], *([1] * ref.ndim)) if coef.ndim == 1 else coef
        stacked = torch.stack([s[key].double() for s in states])
        merged[key] = (coef.double() * stacked).sum(0).to(ref.dtype)
    return merged


def adapter_digest(adapter: Adapter) -> str:
    return tensor_digest(adapter.state)


@dataclass
class MergeContext:
    """What data-aware merging methods need besides the adapters.

    Attributes:
        base: the base LLM (``esmerge.models.BaseModel``).
        specialists: modality -> ``Specialist`` (adapter, projector, card), modality order.
        scale, seed: run settings.
        probe_k: probe samples per modality (paper: 110).
        cache: directory for cached intermediates (probes, states, SWD, scores).
        extras: method-specific inputs (e.g. an entropy objective for AdaMerging).
    """

    base: object
    specialists: dict
    scale: str = "cpu"
    seed: int = 0
    probe_k: int = 110
    cache: Path | None = None
    extras: dict = field(default_factory=dict)

    def __getattr__(self, name):
        # Lets methods read optional inputs as attributes (context.objective, ...).
        extras = self.__dict__.get("extras", {})
        if name in extras:
            return extras[name]
        raise AttributeError(name)


# --------------------------------------------------------------------------- CLI
SCALE_DEFAULTS = {"smoke": {"probe_k": 8}, "cpu": {"probe_k": 110}, "paper": {"probe_k": 110}}


def build_context(scale: str, seed: int = 0, probe_k: int | None = None, **extras) -> MergeContext:
    """Load the base and the three specialists of a scale into a ``MergeContext``."""
    from esmerge import specialists
    from esmerge.cache import cache_dir
    from esmerge.models import load_base

    base = load_base(scale, seed=seed)
    specs = specialists.load_specialists(scale, base)
    k = probe_k or SCALE_DEFAULTS[scale]["probe_k"]
    return MergeContext(base, specs, scale, seed, k, cache_dir() / "es" / scale, dict(extras))


def run_merge(method: str, out: str | Path, context: MergeContext, **hparams) -> Path:
    """Merge the context's specialists with ``method`` and write a PEFT adapter directory to ``out``.

    The directory also holds each specialist's projector (the merged MLLM keeps every
    modality's encoder) and ``esmerge.json`` with the method, hyper-parameters and cost.
    """
    from safetensors.torch import save_file

    from esmerge import methods

    adapters = [spec.adapter for spec in context.specialists.values()]
    start = time.perf_counter()
    result = methods.run(method, adapters, context, **hparams)
    seconds = time.perf_counter() - start
    meta = {
        "method": method,
        "pretty_name": methods.get(method).pretty_name,
        "hparams": hparams,
        "scale": context.scale,
        "seed": context.seed,
        "specialists": {m: adapter_digest(s.adapter) for m, s in context.specialists.items()},
        "wall_seconds": seconds,
        "info": result.info,
    }
    out = save_adapter(result.adapter, out, metadata=meta)
    for modality, spec in context.specialists.items():
        if getattr(spec, "projector", None) is not None:
            (out / "projectors").mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in spec.projector.state_dict().items()},
                      out / "projectors" / f"{modality}.safetensors")
    return out


def cli(argv: list[str]) -> int:
    from esmerge import methods

    parser = argparse.ArgumentParser(prog="esmerge merge", description="Merge the three specialists.")
    parser.add_argument("--scale", default="cpu", choices=("smoke", "cpu", "paper"))
    parser.add_argument("--method", default="es", help=f"one of: {', '.join(methods.names())}")
    parser.add_argument("--out", required=True, help="output adapter directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe-k", type=int, default=None, help="probe samples per modality")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyper-parameter (JSON value), e.g. --set tau=0.1")
    args = parser.parse_args(argv)
    try:
        methods.get(args.method)
    except KeyError as err:
        parser.error(str(err.args[0]))
    hparams = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            hparams[key] = json.loads(value)
        except json.JSONDecodeError:
            hparams[key] = value
    context = build_context(args.scale, args.seed, args.probe_k)
    out = run_merge(args.method, args.out, context, **hparams)
    meta = json.loads((out / "esmerge.json").read_text())
    print(f"merged with {args.method} in {meta['wall_seconds']:.1f} s -> {out}")
    return 0
