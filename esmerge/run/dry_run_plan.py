"""What a paper-scale dry run reports: the plan (``Plan``) and the pure cost estimates behind it.

Every estimate is a formula on numbers the dry run reads without loading a weight (parameter
counts of a model built on the ``meta`` device, its config, token counts of tokenised prompts):

* FLOPs: ``2 x params x tokens`` for a forward pass (``forward_flops``); a pass with gradients costs
  one forward and one or more backward passes of twice its cost each (``gradient_flops``: ``6 x params
  x tokens`` with one backward). Attention's own FLOPs (quadratic in the length) are not counted.
* memory: ``params x bytes`` of every model held at once, plus a stated allowance for the KV cache
  (``kv_cache_bytes``) and activations (``activation_bytes``).
* hours: FLOPs at an assumed fraction of an accelerator's peak (``gpu_hours``; default 40 % of an
  H100's dense bf16 peak, 989 TFLOP/s).

``esmerge.run.dry_run`` builds the plan; ``Plan.lines()`` is what ``--dry-run`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass, field

H100_BF16_DENSE_PEAK = 989e12  # FLOP/s: NVIDIA H100 SXM, dense bf16 tensor cores (no sparsity)
DEFAULT_UTILIZATION = 0.4  # model-FLOPs utilisation assumed for the hours
OVERHEAD = 0.10  # allocator fragmentation, CUDA context, temporaries: a fraction of what is counted
GIB = 2**30


def forward_flops(params: float, tokens: float) -> float:
    """FLOPs of a forward pass over ``tokens`` tokens: one multiply and one add per parameter and token.

    >>> forward_flops(1_000, 10)
    20000
    >>> f"{forward_flops(8.03e9, 1_000):.3g}"  # LLaMA-3.1-8B over 1000 tokens
    '1.61e+13'
    """
    return 2 * params * tokens


def gradient_flops(params: float, tokens: float, backward_passes: int = 1) -> float:
    """FLOPs of a forward pass with ``backward_passes`` backward passes, each twice a forward.

    One backward gives the usual ``6 x params x tokens`` of training; ES-Merging's element scores take
    one backward per probe modality from one forward (``esmerge.signals.gradients``).

    >>> gradient_flops(1_000, 10)
    60000
    >>> gradient_flops(1_000, 10, backward_passes=3)
    140000
    """
    return forward_flops(params, tokens) * (1 + 2 * backward_passes)


def gpu_hours(flops: float, utilization: float = DEFAULT_UTILIZATION,
              peak_flops: float = H100_BF16_DENSE_PEAK) -> float:
    """Hours ``flops`` take at ``utilization`` x ``peak_flops`` FLOP/s.

    >>> round(gpu_hours(H100_BF16_DENSE_PEAK * 0.4 * 3600), 6)
    1.0
    >>> round(gpu_hours(1e18, utilization=0.5, peak_flops=1e15), 4)  # 2000 s
    0.5556
    """
    if not 0 < utilization <= 1 or peak_flops <= 0:
        raise ValueError(f"utilization must be in (0, 1] and peak_flops > 0, got {utilization}, {peak_flops}")
    return flops / (utilization * peak_flops) / 3600


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, bytes_per_value: int = 2) -> int:
    """Bytes of the keys and values of ``tokens`` tokens (all sequences of a batch together).

    >>> kv_cache_bytes(32, 8, 128, 1)  # LLaMA-3.1-8B in bf16: 128 KiB per token
    131072
    """
    return 2 * layers * kv_heads * head_dim * tokens * bytes_per_value


def activation_bytes(layers: int, hidden: int, tokens: int, bytes_per_value: int = 2) -> int:
    """Activations a backward pass keeps: ``34 x tokens x hidden`` bytes per layer in 16-bit.

    Korthikanti et al. (2022, "Reducing activation recomputation in large transformer models"),
    without the attention-score term (fused attention does not store the scores) or recomputation.

    >>> activation_bytes(2, 32, 10)
    21760
    """
    return 17 * bytes_per_value * layers * hidden * tokens


def memory_bytes(params: float, bytes_per_param: float = 2, extra_bytes: float = 0,
                 overhead: float = OVERHEAD) -> float:
    """Peak memory: weights (``params x bytes_per_param``) plus ``extra_bytes`` (KV cache,
    activations), times ``1 + overhead``.

    >>> memory_bytes(1_000, 2, 500, overhead=0.1)
    2750.0
    """
    return (params * bytes_per_param + extra_bytes) * (1 + overhead)


def trained_rows(rows: int, epochs: int, batch: int, max_steps: int | None = None) -> int:
    """Training rows one fine-tuning run passes through: ``epochs`` passes over ``rows`` rows in batches of
    ``batch`` (the last one partial), stopped after ``max_steps`` optimiser steps (``methods.finetune``).

    >>> trained_rows(2000, 10, 16)
    20000
    >>> trained_rows(100, 3, 16, max_steps=8)  # 7 batches per epoch (6 of 16, 1 of 4): 7 + 1 steps
    116
    """
    per_epoch = -(-rows // batch)  # ceil: the last batch is partial
    steps = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    full_epochs, rest = divmod(steps, per_epoch)
    return full_epochs * rows + rest * batch  # rest < per_epoch: only full batches before the partial one


def adamerging_cost(params: float, steps: int, batch: int, tokens: float, longest: int, layers: int, hidden: int,
                    held_bytes: float = 0, encoder_params: float = 0, encoder_tokens: float = 0) -> Step:
    """AdaMerging's search (``methods.adamerging``): ``steps`` Adam steps, each one forward and one backward
    of the base over a batch of ``batch`` unlabeled prompts of ``tokens`` tokens on average (the entropy's
    gradient reaches the coefficients through every layer), plus the frozen encoders' forward over the
    batch's ``encoder_tokens`` per prompt. Peak memory: the bf16 base, ``held_bytes`` (encoders), and the
    activations of one batch at the ``longest`` prompt.

    >>> step = adamerging_cost(1_000, steps=500, batch=2, tokens=100, longest=150, layers=2, hidden=8)
    >>> step.tokens, step.flops == 500 * 6 * 1_000 * 2 * 100
    (100000, True)
    """
    flops = steps * (gradient_flops(params, batch * tokens) + forward_flops(encoder_params, batch * encoder_tokens))
    memory = memory_bytes(params, 2, held_bytes + activation_bytes(layers, hidden, batch * longest))
    return Step(f"adamerging: {steps} steps x {batch} prompts", int(steps * batch * tokens), flops, memory,
                f"1 forward + 1 backward per step over ~{tokens:.0f} tokens a prompt; "
                f"activations of {batch} x {longest}")


def finetune_cost(params: float, rows: dict[str, tuple[int, float]], epochs: int, batch: int, longest: int,
                  layers: int, hidden: int, held_bytes: float = 0, max_steps: int | None = None,
                  encoder_params: float = 0, encoder_tokens: dict[str, float] | None = None) -> Step:
    """Avg+FT's fine-tuning (``methods.finetune``), one run per benchmark: ``rows`` maps a benchmark to
    ``(training rows, mean tokens per prompt)``; each run passes ``trained_rows(rows, epochs, batch,
    max_steps)`` rows through one forward and one backward of the base (plus the frozen encoders' forward,
    ``encoder_tokens`` per prompt). Peak memory: the bf16 base, ``held_bytes``, activations of one batch at
    the ``longest`` prompt.

    >>> step = finetune_cost(1_000, {"A": (2000, 50.0), "B": (512, 80.0)}, epochs=10, batch=16, longest=90,
    ...                      layers=2, hidden=8)
    >>> step.tokens == 20000 * 50 + 5120 * 80, step.flops == 6 * 1_000 * step.tokens
    (True, True)
    """
    encoder_tokens = encoder_tokens or {}
    seen = {b: trained_rows(n, epochs, batch, max_steps) for b, (n, _) in rows.items()}
    tokens = sum(seen[b] * t for b, (_, t) in rows.items())
    encoded = sum(seen[b] * encoder_tokens.get(b, 0.0) for b in rows)
    flops = gradient_flops(params, tokens) + forward_flops(encoder_params, encoded)
    memory = memory_bytes(params, 2, held_bytes + activation_bytes(layers, hidden, batch * longest))
    cap = f", at most {max_steps} steps" if max_steps else ""
    return Step(f"avg-ft: {len(rows)} benchmark(s) x {epochs} epochs", int(tokens), flops, memory,
                f"{sum(seen.values())} training rows in batches of {batch}{cap}; 1 forward + 1 backward each; "
                f"activations of {batch} x {longest}")


def human(n: float, unit: str = "") -> str:
    """A number with an SI prefix (``unit`` "B": binary GiB/MiB).

    >>> human(1.61e13, "FLOP"), human(3 * GIB, "B"), human(1234)
    ('16.1 TFLOP', '3.0 GiB', '1.23 k')
    """
    if unit == "B":
        for size, name in ((2**40, "TiB"), (GIB, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
            if n >= size:
                return f"{n / size:.1f} {name}"
        return f"{n:.0f} B"
    for size, name in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g} {name}{unit}"
    return f"{n:.3g} {unit}".rstrip()


@dataclass
class Step:
    """One costed piece of the run: ``tokens`` processed, its FLOPs and the peak memory it needs."""

    what: str
    tokens: int
    flops: float
    memory: float
    how: str = ""  # the formula, in words


@dataclass
class Plan:
    """What a ``--dry-run`` found and what the real run would cost.

    ``problems`` block the run (the CLI exits 1 when there are any); ``notes`` do not. ``checked``
    and ``not_checked`` say what the dry run verified and what it left to the real run.
    ``meta_model`` is the base built on the ``meta`` device (no weight memory).
    """

    command: str  # "merge" | "evaluate"
    base: str
    models: list[str] = field(default_factory=list)
    benchmarks: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)
    not_checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # benchmark (or "probe") -> max tokens
    max_positions: int | None = None
    params: int = 0  # the base's parameters
    steps: list[Step] = field(default_factory=list)
    utilization: float = DEFAULT_UTILIZATION
    peak_flops: float = H100_BF16_DENSE_PEAK
    device_memory: float = 80 * GIB  # one H100; a larger peak estimate is a note, not a problem
    assumptions: list[str] = field(default_factory=list)
    meta_model: object = field(default=None, repr=False)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.steps)

    @property
    def hours(self) -> float:
        return gpu_hours(self.flops, self.utilization, self.peak_flops)

    @property
    def peak_memory(self) -> float:
        return max((s.memory for s in self.steps), default=0.0)

    def lines(self) -> list[str]:
        """The plan as printed by ``esmerge merge|evaluate --scale paper --dry-run``."""
        out = [f"dry run: esmerge {self.command} --scale paper (nothing loaded; the base was built on the meta device)",
               f"base: {self.base} ({human(self.params)} parameters"
               + (f", {self.max_positions} positions)" if self.max_positions else ")")]
        out += [f"models: {', '.join(self.models)}"] if self.models else []
        out += [f"benchmarks: {', '.join(self.benchmarks)}"] if self.benchmarks else []
        out += [f"  checked: {line}" for line in self.checked]
        out += [f"  not checked: {line}" for line in self.not_checked]
        if self.prompt_tokens:
            limit = f" of {self.max_positions} positions" if self.max_positions else ""
            out.append(f"longest prompt (tokens{limit}): "
                       + ", ".join(f"{k} {v}" for k, v in self.prompt_tokens.items()))
        if self.steps:
            out.append("estimated cost:")
            width = max(len(s.what) for s in self.steps)
            for s in self.steps:
                out.append(f"  {s.what:<{width}}  {human(s.tokens):>9} tokens  {human(s.flops, 'FLOP'):>12}  "
                           f"peak {human(s.memory, 'B'):>9}  {s.how}")
            out.append(f"  total {human(self.flops, 'FLOP')}, peak memory {human(self.peak_memory, 'B')}, "
                       f"about {self.hours:.2f} h at {self.utilization:.0%} of {human(self.peak_flops, 'FLOP/s')}")
            if self.peak_memory > self.device_memory:
                out.append(f"  the peak estimate exceeds one device's {human(self.device_memory, 'B')}: "
                           "shard the base or run fewer sequences per pass")
        out += [f"assumption: {line}" for line in self.assumptions]
        out += [f"note: {line}" for line in self.notes]
        out += [f"PROBLEM: {line}" for line in self.problems]
        out.append(f"{len(self.problems)} blocking problem(s)" if self.problems
                   else "no blocking problem found: the real run may start")
        return out
