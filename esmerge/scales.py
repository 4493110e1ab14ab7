"""Every number that differs between the ``smoke``, ``cpu`` and ``paper`` scales, in one place.

One frozen ``ScaleConfig`` per scale (as nanoGPT keeps its configuration in one dataclass); the
rest of the package receives the ``ScaleConfig`` resolved once from a name (``get(scale)``: at the command
line, or in a notebook right after its parameters cell) and hard-codes no scale's numbers.

>>> get("smoke").probe_k, get("cpu").probe_k
(8, 110)
>>> get("gpu")
Traceback (most recent call last):
...
esmerge.errors.UsageError: unknown scale 'gpu': choose smoke, cpu or paper
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from esmerge.errors import UsageError

NAMES = ("smoke", "cpu", "paper")


@dataclass(frozen=True)
class EvalDefaults:
    """Default evaluation settings of a scale (``evaluate.EvalConfig`` takes its defaults from here)."""

    n_eval: int = 64
    n_context: int = 512  # fits the smallest benchmark (CYP2D6 substrate, 663 rows) beside n_eval
    n_shots: int = 3
    top_k_genes: int = 8
    protein_chars: int = 40
    smiles_chars: int | None = None
    batch_size: int = 8
    n_resamples: int = 1000
    benchmarks: tuple[str, ...] | None = None  # None: all 13
    # "loglik": the likelier answer (evaluate.scoring); "generate": the paper's greedy reply read by
    # its `Final answer:` (evaluate.generation), with the invalid-answer rate
    scoring: str = "loglik"
    # how scores become answers (evaluate.calibration): "argmax", "contextual" or "context-threshold"
    decision: str = "argmax"
    n_calibration: int = 32  # context rows a fitted decision is fitted on (never evaluation rows)
    n_folds: int = 5  # folds of the "cross-fit" decision (each fold's threshold fitted on the others)
    # "at least as good" claims: the largest deficit (accuracy points) still called non-inferior,
    # declared before the run; None: such a claim is "inconclusive (no margin declared)"
    noninferiority_margin: float | None = None


@dataclass(frozen=True)
class TrainRecipe:
    """How a scale's specialists are trained when they are not shipped."""

    steps: int = 150
    batch_size: int = 4
    lr: float = 1e-3
    seed: int = 0
    max_tokens: int = 128
    # A cell prompt is longer: 12 genes in SmolLM2's tokenizer run to ~135 tokens, 50 genes in
    # LLaMA-3's to ~250 (a few tokens per gene symbol).
    cell_max_tokens: int = 160
    bf16: bool = False  # bf16 autocast of the training forward (weights and optimizer stay fp32)
    # The projector's learning rate is lr * projector_lr_scale (the LoRA's is lr).
    projector_lr_scale: float = 1.0
    # (modality, ((field, value), ...)): where one modality's specialist keeps another recipe.
    by_modality: tuple = ()

    def max_tokens_for(self, modality: str) -> int:
        """Longest training (and held-out loss) sequence for ``modality``."""
        return self.cell_max_tokens if modality == "cell" else self.max_tokens

    def for_modality(self, modality: str) -> "TrainRecipe":
        """This recipe with ``modality``'s own settings from ``by_modality`` applied.

        >>> r = TrainRecipe(steps=200, by_modality=(("protein", (("steps", 100), ("bf16", True))),))
        >>> [(x.steps, x.bf16) for x in (r.for_modality("protein"), r.for_modality("cell"))]
        [(100, True), (200, False)]
        """
        return replace(self, **dict(dict(self.by_modality).get(modality, ())), by_modality=())

    def settings_for(self, modality: str) -> dict:
        """The ``train_specialist`` keywords that train ``modality``'s specialist by this recipe."""
        r = self.for_modality(modality)
        return {"steps": r.steps, "batch_size": r.batch_size, "lr": r.lr, "seed": r.seed,
                "max_tokens": r.max_tokens_for(modality), "bf16": r.bf16, "projector_lr_scale": r.projector_lr_scale}


@dataclass(frozen=True)
class MergeBudgets:
    """How much data and compute the data-driven baselines get at a scale (chapter 6), beside the paper's.

    The paper's own budgets are the defaults (App. A.2; AdaMerging's paper: 500 steps); a scale that
    cannot afford them says so here, and the book states both wherever the baseline appears.
    """

    adamerging_steps: int = 500
    adamerging_prompts_per_benchmark: int = 2
    adamerging_batch: int = 2
    ft_examples: int = 2000
    ft_epochs: int = 10
    ft_batch: int = 16
    lsmerge_epochs: int = 1000
    benchmarks: tuple[str, ...] | None = None  # None: all 13
    compat_benchmarks: tuple[str, ...] = ("BindingDB", "CYP3A4", "GDSC2", "DrugComb")
    es_variants: tuple[str, ...] = ("es", "es-layer", "es-element")  # the ES rows of Tables 1-3 and 8
    # Budget curves, run beside the budgets above at the first specialist seed only: AdaMerging steps,
    # and Avg+FT training rows per benchmark (one epoch) on ``curve_benchmarks``; () runs none.
    adamerging_curve: tuple[int, ...] = ()
    ft_curve_examples: tuple[int, ...] = ()
    curve_benchmarks: tuple[str, ...] = ("BindingDB", "GDSC2")


@dataclass(frozen=True)
class ScaleConfig:
    name: str
    probe_k: int  # probe samples per modality (paper §4.1: 110)
    cell_top_k: int  # genes per cell in specialist prompts
    train: TrainRecipe
    evaluation: EvalDefaults = field(default_factory=EvalDefaults)
    # held-out examples per modality on which 09_retention scores every model (n >= 200, so per-modality
    # CIs resolve a few hundredths)
    n_retention: int = 200
    merge_budgets: MergeBudgets = field(default_factory=MergeBudgets)
    # training seeds of the specialists every method is merged from and every merge is measured at
    # (fixed before any result was seen); accuracy (chapter 7) uses the first only
    specialist_seeds: tuple[int, ...] = (0,)
    # the base and specialists are random (smoke): what they write is bytes, not worth showing
    random_models: bool = False
    # where the models run: None is the scale's own (the CPU; paper: accelerate's device_map "auto");
    # "cuda" runs this same scale on a GPU, every other setting unchanged (``get(name, device=...)``)
    device: str | None = None


SCALES = {
    "smoke": ScaleConfig(
        "smoke", probe_k=8, cell_top_k=5,
        train=TrainRecipe(steps=30, batch_size=4, lr=5e-3, seed=0, max_tokens=128, cell_max_tokens=128),
        # One benchmark per group keeps the results chapter under a minute.
        evaluation=EvalDefaults(n_eval=3, n_context=12, n_shots=1, top_k_genes=3, protein_chars=12,
                                smiles_chars=24, batch_size=3, n_resamples=100,
                                benchmarks=("BindingDB", "GDSC2", "CYP2C9", "CYP2C9-substrate"),
                                decision="cross-fit", n_folds=3, noninferiority_margin=5.0),
        n_retention=8,  # all of SMOKE_DATA
        # keeps the merging chapter well under a minute
        merge_budgets=MergeBudgets(adamerging_steps=2, ft_examples=4, ft_epochs=1, ft_batch=4, lsmerge_epochs=5,
                                   benchmarks=("GDSC2",), compat_benchmarks=("GDSC2",),
                                   adamerging_curve=(1, 3), ft_curve_examples=(2, 8), curve_benchmarks=("GDSC2",)),
        specialist_seeds=(0, 1), random_models=True),
    # cpu: SmolLM2's tokenizer spends ~4.5 tokens per gene symbol, hence 12 genes per cell.
    # cpu: the 135M base leans towards one label whatever its shots say; a margin threshold makes it
    # answer by its prompt. Cross-fitted on the evaluation rows (each fold's threshold fitted on the
    # other folds, never on the row's own label), so threshold noise is inside every CI and no
    # calibration prompts are scored; chosen on protocol rows disjoint from the evaluation rows
    # (benchmarks/results/bench_shots_cpu_protocol.txt). The non-inferiority margin (accuracy points)
    # was declared before the run that uses it.
    # cpu: the shipped specialists' recipe (their cards). Molecule and cell: 200 steps in fp32, the
    # projector at a tenth of the LoRA's lr, so that its tokens do not turn into massive activations;
    # protein keeps 100 steps under bf16 autocast (retrained by the new recipe it failed the Fig. 2
    # test). All three then pass it (benchmarks/results/specialist_fig2.json, book/paper_vs_code.md).
    "cpu": ScaleConfig("cpu", probe_k=110, cell_top_k=12,
                       train=TrainRecipe(steps=200, bf16=False, projector_lr_scale=0.1,
                                         by_modality=(("protein", (("steps", 100), ("bf16", True),
                                                                   ("projector_lr_scale", 1.0))),)),
                       evaluation=EvalDefaults(decision="cross-fit", n_eval=32, n_calibration=16,
                                               noninferiority_margin=5.0),
                       # one AdaMerging step on 2 prompts takes ~30 s and one fine-tuning step on 4 prompts
                       # ~12 s on one thread: far below the paper's budgets (chapter 6 says so)
                       merge_budgets=MergeBudgets(adamerging_steps=10, ft_examples=8, ft_epochs=1, ft_batch=4,
                                                  es_variants=("es",), adamerging_curve=(3, 30),
                                                  ft_curve_examples=(4, 16)),
                       # seeds 1 and 2: the shipped recipes unchanged, trained before any of their results
                       specialist_seeds=(0, 1, 2)),
    "paper": ScaleConfig("paper", probe_k=110, cell_top_k=50, train=TrainRecipe(cell_max_tokens=384),
                         evaluation=EvalDefaults(scoring="generate")),  # paper A.4: top-50 genes
}


def get(scale: str, device: str | None = None) -> ScaleConfig:
    """The ``ScaleConfig`` of ``scale``, run on ``device`` when one is given; a ``UsageError`` otherwise.

    >>> get("cpu", device="cuda").device, get("cpu").device is None, get("cpu", "cuda").n_retention
    ('cuda', True, 200)
    """
    try:
        config = SCALES[scale]
    except (KeyError, TypeError):
        raise UsageError(f"unknown scale {scale!r}: choose {', '.join(NAMES[:-1])} or {NAMES[-1]}") from None
    return config if device is None else replace(config, device=check_device(device))


def check_device(device: str) -> str:
    """``device`` if it names where a scale can run: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.

    Whether a GPU is there is checked where the model is loaded, not here.

    >>> check_device("cuda:1")
    'cuda:1'
    >>> check_device("gpu")
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: unknown device 'gpu': choose cpu, cuda, cuda:N (a GPU's index) or auto
    """
    if isinstance(device, str) and re.fullmatch(r"cpu|auto|cuda(:\d+)?", device):
        return device
    raise UsageError(f"unknown device {device!r}: choose cpu, cuda, cuda:N (a GPU's index) or auto")

