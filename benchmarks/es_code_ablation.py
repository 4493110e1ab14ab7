"""ES-Merging: the paper's settings against the official code's, one difference at a time.

Two modes.

``--tiny`` (seconds): the effect of each difference on the coefficients, on the tiny random
LLaMA of ``tests/test_es_official_reference.py`` (3 blocks, hidden 32, fp64, three random LoRA
specialists, 5 random probes). For each difference it prints max and mean |delta| of alpha
(Eq. 2) or beta (Eq. 3) between ``variant="code"`` and the code with that one setting put back
to the paper's (or, where the code and the paper agree, what the setting would change). These
are the numbers of the book's "Paper vs official code" page; random weights say how large a
difference *can* be, not how large it is on trained specialists.

``--scale cpu`` (about an hour on 2 cores when nothing is cached; minutes from the ES signal and
retention NLL caches): merges ES-Merging with the paper's settings, the code's, and the paper's
with each of the three differences in beta alone (own-modality scores, the last layer after the
final norm, |gradient| of a batch-of-2 MSE), and writes each merged model's retained fraction
per modality (``esmerge.evaluate.retention``, as ``09_retention``) with its PAIRED 95 % CI of the
difference from ES-paper to ``benchmarks/results/es_code_ablation_<scale>.csv`` (tidy) and
``.txt``; ``esmerge.report.es_ablation.ablation_table`` reads the CSV for the book.

    python benchmarks/es_code_ablation.py --tiny
    python benchmarks/es_code_ablation.py --scale cpu            # n = 200, seed 0
"""
from __future__ import annotations

import argparse
import importlib.util
import tempfile
from pathlib import Path

import pandas as pd
import torch

from esmerge.methods import es, es_settings, es_signals
from esmerge.signals import layerwise
from esmerge.signals.combine import combine, merge_lora

ROOT = Path(__file__).resolve().parents[1]
# The three differences in beta, each as the paper's settings plus that one official choice.
BETA_ALONE = {"es-own": {"score_modalities": "own"}, "es-postnorm": {"final_norm": True},
              "es-batch2": {"grad_batch": 2}}


def _reference_module():
    spec = importlib.util.spec_from_file_location("es_reference", ROOT / "tests" / "test_es_official_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _delta(a, b) -> tuple[float, float]:
    if isinstance(a, dict):
        d = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    else:
        d = (a.double() - b.double()).abs().flatten()
    return float(d.max()), float(d.mean())


def tiny_effects(n_projections: int = 1024) -> pd.DataFrame:
    ref = _reference_module()
    rows = []

    def add(point, option, what, a, b):
        biggest, mean = _delta(a, b)
        rows.append({"point": point, "option": option, "on": what, "max |delta|": biggest, "mean |delta|": mean})

    with ref.fp64_rms_norm(), tempfile.TemporaryDirectory() as tmp:
        context, adapters, _ = ref.tiny_setting(Path(tmp) / "cache")

        def coefficients(context=context, seed=0, **settings):
            resolved = es_settings.resolve_settings(**{"n_projections": n_projections, **settings})
            sig = es_signals.signals(adapters, context, seed=seed, **resolved)
            return es.coefficients_from_signals(sig, adapters[0].state, resolved)

        code_alpha, code_beta, code_lam = coefficients(variant="code")
        for point, setting, paper_value in [(1, "score_modalities", "all"), (2, "final_norm", False),
                                            (3, "grad_batch", 1), ("tau", "tau_element", 0.5),
                                            ("z", "per_tensor", False), ("r", "distance", "frobenius")]:
            add(point, f"{setting}={CODE[setting]!r} vs {paper_value!r}", "beta",
                code_beta, coefficients(variant="code", **{setting: paper_value})[1])
        paper_alpha, paper_beta, _ = coefficients(variant="paper")
        add("all", "variant=code vs paper", "beta", code_beta, paper_beta)
        add("std", "standardize=True vs False", "alpha", code_alpha, coefficients(variant="code", standardize=False)[0])
        add("all", "variant=code vs paper", "alpha", code_alpha, paper_alpha)
        # 4: projections, seed to seed, shared vs fresh
        for kind in ("shared", "fresh"):
            alphas = [coefficients(variant="code", seed=s, projections=kind)[0] for s in range(5)]
            spread = torch.stack(alphas)
            add(4, f"projections={kind!r}, seeds 0-4 (max over seeds of |alpha_s - alpha_0|)", "alpha",
                spread[1:], spread[0].expand_as(spread[1:]))
        add(4, "projections='fresh' vs 'shared' (seed 0)", "alpha", code_alpha,
            coefficients(variant="code", projections="shared")[0])
        # 5: three times as many probes (K = 15 vs 5), the first 5 the same
        more = ref.Probes(torch.cat([context.extras["probes"].embeds,
                                     torch.randn(10, ref.T, ref.WIDTH, generator=torch.Generator().manual_seed(9),
                                                 dtype=torch.float64)]), dict(ref.POSITIONS))
        bigger = type(context)(context.base, context.specialists, "smoke", 0, probe_k=15, cache=context.cache,
                               extras={"probes": more})
        alpha3, beta3, _ = coefficients(context=bigger, variant="code")
        add(5, "3 x the probes (probe_layout='code')", "alpha", code_alpha, alpha3)
        add(5, "3 x the probes (probe_layout='code')", "beta", code_beta, beta3)
        # 6: smaller points
        add(6, "other_weight=0.5 vs 1 (the README's 1 equals the paper)", "alpha", code_alpha,
            coefficients(variant="code", other_weight=0.5)[0])
        states = es_signals.signals(adapters, context, seed=42, need_scores=False,
                            **es_settings.resolve_settings("code", n_projections=n_projections))
        official = ref.official_layer_coefficients(states["states"]["base"]["pooled"],
                                                   [states["states"][n]["pooled"] for n in ref.NAMES],
                                                   n_projections, 42)
        ours = layerwise.layer_coefficients(states["swd"], 0.5)
        add(6, "1e-12 in SWD root and softmax, sklearn zero-variance scale (reference vs code, seed 42)", "alpha",
            ours, official)
        lam32 = combine(code_alpha, {k: v.float() for k, v in code_beta.items()})
        add(6, "beta stored as float32 before Eq. 4", "lambda", code_lam, lam32)
        merged = merge_lora([a.state for a in adapters], code_lam)
        add(6, "beta stored as float32: merged LoRA weights", "weights", merged,
            merge_lora([a.state for a in adapters], {k: v.to(torch.float32) for k, v in lam32.items()}))
        # 7: equal-size subsampling ('min' = all K: a no-op)
        add(7, "equal_size='min' vs null", "alpha", code_alpha, coefficients(variant="code", equal_size=None)[0])
    return pd.DataFrame(rows)


CODE = es_settings.CODE_SETTINGS


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


VARIANTS = ("es-paper", "es-code", *BETA_ALONE)
COLUMNS = ["variant", "modality", "retained", "lo", "hi", "diff_vs_paper", "diff_lo", "diff_hi", "n"]


def paired_table(res, reference: str = "es-paper", variants=VARIANTS, level: float = 0.95) -> pd.DataFrame:
    """Tidy table of each variant's retained fraction and its paired difference from ``reference``.

    ``res`` is ``retention.resampled_retention``'s output: one bootstrap of examples per modality,
    shared by every model, so ``draws[v] - draws[reference]`` is a paired difference and its
    percentile interval a paired CI (the mean over modalities is taken per draw, so paired too).
    The reference's own difference is 0 with CI [0, 0].

    >>> import numpy as np
    >>> from esmerge.evaluate.retention import Resampled
    >>> d = {"a": {"m": np.array([0.5, 0.6, 0.7]), "mean": np.array([0.5, 0.6, 0.7])},
    ...      "b": {"m": np.array([0.4, 0.6, 0.6]), "mean": np.array([0.4, 0.6, 0.6])}}
    >>> res = Resampled({"a": {"m": 0.6, "mean": 0.6}, "b": {"m": 0.55, "mean": 0.55}}, d, {}, {}, {"m": 3})
    >>> t = paired_table(res, "a", ("a", "b"), level=0.5)
    >>> t.loc[t.variant == "b", "diff_vs_paper"].round(3).tolist()
    [-0.05, -0.05]
    >>> t.loc[(t.variant == "b") & (t.modality == "m"), ["diff_lo", "diff_hi"]].values.round(3).tolist()
    [[-0.1, -0.05]]
    """
    from esmerge.evaluate.retention import percentile_ci

    rows = []
    for v in variants:
        for m, value in res.point[v].items():
            lo, hi = percentile_ci(res.draws[v][m], level)
            diff = res.draws[v][m] - res.draws[reference][m]
            dlo, dhi = (0.0, 0.0) if v == reference else percentile_ci(diff, level)
            rows.append({"variant": v, "modality": m, "retained": value, "lo": lo, "hi": hi,
                         "diff_vs_paper": value - res.point[reference][m], "diff_lo": dlo, "diff_hi": dhi,
                         "n": res.n.get(m, sum(res.n.values()))})
    return pd.DataFrame(rows, columns=COLUMNS)


def cpu_retention(scale: str, n: int | None, seed: int, out: Path):
    """Merge every variant (signals read from the ES cache), score them (NLLs cached by adapter digest)
    and return ``(resampled, retention_table)``."""
    from esmerge import scales
    from esmerge.evaluate import retention
    from esmerge.run.merge import build_context, merge_once
    from esmerge.specialists.captions import heldout_examples

    context = build_context(scales.get(scale), seed)
    n = n or scales.get(scale).n_retention
    examples = {m: heldout_examples(m, scales.get(scale), n, seed) for m in context.specialists}
    variants = {"es-paper": {}, "es-code": {"variant": "code"}, **BETA_ALONE}
    merged = {name: merge_once("es", out / name, context, **hp)[0] for name, hp in variants.items()}
    models, _ = retention.retention_models(context.specialists, None, None, merged)
    nlls, tokens = retention.score_models(models, context.base, context.specialists, examples,
                                          scales.get(scale).train)
    res = retention.resampled_retention(nlls, tokens, seed=seed)
    return res, retention.retention_table(res)


CPU_HEADER = [
    "benchmarks/es_code_ablation.py --scale {scale} (merge seed {seed}, the shipped seed-0 {scale} specialists, "
    "n = {n} held-out examples per modality); specialist seeds 1-2 are out of scope (one training seed only)",
    "code of commit {commit} (plus uncommitted files of this session); {cpu}, 2 cores shared with other work, "
    "1 torch thread; {date}, {minutes:.0f} min (merges from the ES signal cache, NLLs from the retention cache "
    "where present)",
    "retained: (NLL_base - NLL_model) / (NLL_base - NLL_specialist) per modality, mean = mean of the three; "
    "lo/hi: 95% percentile bootstrap (1000 resamples of examples)",
    "diff_vs_paper: retained(variant) - retained(es-paper); diff_lo/diff_hi: PAIRED 95% CI (one bootstrap of "
    "examples shared by all models, so the difference is resampled per draw)",
    "es-paper: the paper's settings; es-code: variant=code; es-own / es-postnorm / es-batch2: the paper's settings "
    "with one official-code difference in beta (score_modalities='own' / final_norm=True / grad_batch=2)",
]


def write_cpu_results(res, table: pd.DataFrame, stem: Path, header: list[str]) -> pd.DataFrame:
    """``<stem>.csv`` (the tidy paired table) and ``<stem>.txt`` (header, paired table, full table)."""
    tidy = paired_table(res)
    tidy.to_csv(f"{stem}.csv", index=False, float_format="%.6f")
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        text = ("".join(f"# {line}\n" for line in header) + "\n# paired table (also in the .csv)\n"
                + tidy.to_string(index=False, float_format=lambda v: f"{v:.4f}")
                + "\n\n# every model, unpaired CIs (retention_table)\n" + table.to_string(index=False) + "\n")
    Path(f"{stem}.txt").write_text(text)
    return tidy


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="coefficient effects on the tiny random LLaMA")
    parser.add_argument("--scale", default=None, help="retention of the ES variants at this scale (e.g. cpu)")
    parser.add_argument("--n", type=int, default=None, help="held-out examples per modality (default: the scale's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="merged models go here (default: runs/<scale>/es_code_ablation)")
    parser.add_argument("--results", type=Path, default=None,
                        help="results stem (default: benchmarks/results/es_code_ablation_<scale>: .csv and .txt)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.tiny == bool(args.scale):
        parser.error("give --tiny or --scale")
    with pd.option_context("display.width", 200, "display.max_colwidth", 100):
        if args.tiny:
            table = tiny_effects()
            print(table.to_string(index=False, float_format=lambda v: f"{v:.2g}"))
        else:
            import platform
            import subprocess
            import time
            from datetime import date

            from esmerge import scales
            from esmerge.paths import run_dir

            start = time.perf_counter()
            res, table = cpu_retention(args.scale, args.n, args.seed,
                                       args.out or run_dir(args.scale, "es_code_ablation"))
            try:
                commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, check=True).stdout.strip()
            except (OSError, subprocess.CalledProcessError):
                commit = "unknown"
            header = [line.format(scale=args.scale, seed=args.seed, n=args.n or scales.get(args.scale).n_retention,
                                  commit=commit, cpu=_cpu_name() or platform.machine(), date=date.today().isoformat(),
                                  minutes=(time.perf_counter() - start) / 60) for line in CPU_HEADER]
            stem = args.results or ROOT / "benchmarks" / "results" / f"es_code_ablation_{args.scale}"
            table = write_cpu_results(res, table, stem, header)
            print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return table


if __name__ == "__main__":
    main()
