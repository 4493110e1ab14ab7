"""ES-Merging's settings: the paper's, the official code's, and the hyper-parameters that choose between them.

``PAPER_SETTINGS`` is the one declaration of the defaults (§4, App. A.3); ``CODE_SETTINGS`` changes
what the official code (WonbinLee067/es-merging) does differently, each difference listed in the
book's "Paper vs official code"; ``resolve_settings`` applies a variant and overrides.
"""
from __future__ import annotations

from esmerge.errors import UsageError
from esmerge.methods import HParam
from esmerge.signals import elementwise, layerwise

PAPER_SETTINGS = dict(n_projections=1024, p=2.0, tau_layer=0.5, tau_element=0.5, distance="frobenius",
                      per_tensor=False, standardize=False, equal_size=None, score_modalities="all",
                      final_norm=False, grad_batch=1, projections="shared", probe_layout="paper", other_weight=1.0)
CODE_SETTINGS = dict(PAPER_SETTINGS, tau_element=0.1, distance="mse", per_tensor=True, standardize=True,
                     equal_size="min", score_modalities="own", final_norm=True, grad_batch=2, projections="fresh",
                     probe_layout="code")
PRESETS = {"paper": PAPER_SETTINGS, "code": CODE_SETTINGS}  # what `esmerge methods describe es` shows
# The one declaration of the defaults of every hyper-parameter below: the paper's settings.
DEFAULTS = {"variant": "paper", "seed": 0, **PAPER_SETTINGS}
# Settings that change the element scores; they enter the scores' cache key only when they differ
# from the paper's, so the paper's keys (and every score cached under them) stay as they were.
SCORE_SETTINGS = ("score_modalities", "final_norm", "grad_batch")
# Declared defaults are the paper's; ``variant="code"`` changes those not given (see CODE_SETTINGS).
# Bounds: p <= 32 keeps |difference|^p finite in float64 for state differences up to ~1e4 (massive
# activations; 1e308 overflowed and the SWD table became constant: uniform alpha, silently);
# n_projections <= 65536: the paper's Table 7 stops at 1024, and 2^16 directions of a 4096-wide state
# already take 2 GiB (1e300 failed deep in NumPy); tau >= MIN_TAU: see layerwise.MIN_TAU (1e-320
# made exp overflow, then a NaN blamed on the cache); grad_batch <= 65536: any larger batch is the
# whole probe set anyway.
HPARAMS = (
    HParam("variant", str, choices=("paper", "code"),
           doc="paper settings, or the official code's (CODE_SETTINGS)"),
    HParam("n_projections", int, low=1, high=65536, doc="SWD projections; paper 1024, code 1024"),
    HParam("p", float, low=1.0, high=32.0, doc="SWD order; paper 2, code 2"),
    HParam("tau_layer", float, low=layerwise.MIN_TAU,
           doc="layer softmax temperature (Eq. 2); paper 0.5, code 0.5"),
    HParam("tau_element", float, low=layerwise.MIN_TAU,
           doc="element softmax temperature (Eq. 3); paper 0.5, code 0.1"),
    HParam("distance", str, choices=tuple(elementwise.DISTANCES),
           doc="token distance r (Eq. 3); paper frobenius, code mse"),
    HParam("per_tensor", bool,
           doc="z-score element scores per LoRA tensor, not per layer; paper false, code true"),
    HParam("standardize", bool, doc="jointly z-score states before SWD; paper false, code true"),
    HParam("equal_size", int, low=1, also=("min",), nullable=True,
           doc="subsample probes before SWD ('min': all K, a no-op here); paper null, code 'min'"),
    HParam("score_modalities", str, choices=("all", "own"),
           doc="tokens whose distance scores a specialist's elements: every modality's or its own; "
               "paper all, code own"),
    HParam("final_norm", bool,
           doc="element scores read the last layer after the final norm (HF hidden_states[-1]); "
               "paper false, code true"),
    HParam("grad_batch", int, low=1, high=65536,
           doc="probes per |gradient| in element scores (a batch's distance); paper 1, code 2"),
    HParam("projections", str, choices=("shared", "fresh"),
           doc="SWD directions: one set for every layer and pair, or fresh for each; "
               "paper unsaid (here shared), code fresh"),
    HParam("probe_layout", str, choices=("paper", "code"),
           doc="probes: paper = probe_k (110 per modality), code = M x probe_k (create_330_samples: 330)"),
    HParam("other_weight", float, low=0.0,
           doc="weight of the other modalities' z-scores in layer scores (code --alpha); paper 1, code 1"),
    HParam("seed", int, doc="seed of the probe sample and the SWD projections; official code 42"),
)


def resolve_settings(variant: str = "paper", **overrides) -> dict:
    """The ES-Merging settings: the paper's or the official code's defaults, with overrides on top.

    Parameters
    ----------
    variant : {"paper", "code"}
        ``PAPER_SETTINGS`` or ``CODE_SETTINGS``.
    **overrides
        Settings to change (``seed`` is accepted and ignored here).

    Returns
    -------
    dict
        Every setting of ``PAPER_SETTINGS``.

    Raises
    ------
    UsageError
        For an unknown variant or setting.

    Examples
    --------
    >>> resolve_settings()["tau_element"], resolve_settings("code")["tau_element"]
    (0.5, 0.1)
    >>> resolve_settings("code", tau_element=0.3)["tau_element"]
    0.3
    >>> resolve_settings(tau=1.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: es: unknown ES-Merging settings ['tau']; known: ['distance', ...]
    """
    if variant not in ("paper", "code"):
        raise UsageError(f"es: variant must be 'paper' or 'code', got {variant!r}")
    settings = dict(PAPER_SETTINGS if variant == "paper" else CODE_SETTINGS)
    unknown = set(overrides) - set(settings) - {"seed"}
    if unknown:
        raise UsageError(f"es: unknown ES-Merging settings {sorted(unknown)}; known: {sorted(settings)}")
    settings.update({k: v for k, v in overrides.items() if k != "seed"})
    return settings
