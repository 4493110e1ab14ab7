"""ES-Merging: each paper-vs-official-code difference alone, measured on the coefficients at a real scale.

For every difference between the paper's settings and the official code's (the book's "Paper vs
official code"), this computes ES-Merging's layer coefficients alpha (Eq. 2) or element
coefficients beta (Eq. 3) with the paper's settings and with the paper's settings plus that ONE
official choice, on the scale's base and shipped seed-0 specialists (merge seed 0), and reports
mean and max |delta| over all specialists and blocks (alpha) or LoRA elements (beta). For alpha
it also counts the blocks whose top specialist (argmax over specialists) changes; for beta, the
fraction of LoRA elements whose top specialist changes.

Signals come from ``esmerge.methods.es_signals.signals`` and are cached under
``cache_dir()/es/<scale>`` keyed by their inputs, so a rerun reads them back. The slow pieces are
the element scores of a new setting (minutes per specialist on a CPU); the probe layout of the
official code (``probe_layout="code"``: 3 x 110 probes) needs the paper-setting element scores of
330 probes, the slowest of all (an hour on a shared CPU), so by default beta's change under the layout is
measured against the code's other settings instead (``--layout-beta``).

    python benchmarks/es_code_diffs.py --scale cpu
    # -> benchmarks/results/es_code_diffs_cpu.{json,txt}

``esmerge.report.es_ablation.differences_table`` reads the JSON back for the book.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import time
from datetime import date
from pathlib import Path

import torch

from esmerge import scales
from esmerge.cache import cached, content_key, tensor_digest
from esmerge.methods import es_settings, es_signals
from esmerge.signals import elementwise, layerwise, sliced
from esmerge.signals.combine import combine, merge_lora

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OFFICIAL = "WonbinLee067/es-merging@3ca7549b"
LAYER_FILE = "Coefficient_Setting/compute_layer_coef.py"
ELEMENT_FILE = "Coefficient_Setting/compute_element_coef.py"
MERGE_FILE = "src/es_merging.py"
SEED_SPREAD = (1, 2, 3, 4)  # projection seeds compared with seed 0 (same probes)


# --------------------------------------------------------------------------- measures
REFERENCE_TEST = Path(__file__).resolve().parents[1] / "tests" / "test_es_official_reference.py"


def alpha_delta(a: torch.Tensor, b: torch.Tensor) -> dict:
    """|delta alpha| over ``[S, L]`` and the number of blocks whose top specialist changes.

    >>> a = torch.tensor([[0.6, 0.2], [0.4, 0.8]], dtype=torch.float64)
    >>> b = torch.tensor([[0.4, 0.2], [0.6, 0.8]], dtype=torch.float64)
    >>> r = alpha_delta(a, b); round(r["mean_abs"], 9), round(r["max_abs"], 9), r["top_changed"], r["n_units"]
    (0.1, 0.2, 1, 2)
    """
    d = (a.double() - b.double()).abs()
    return {"mean_abs": float(d.mean()), "max_abs": float(d.max()),
            "top_changed": int((a.argmax(0) != b.argmax(0)).sum()), "n_units": int(a.shape[1])}


def beta_delta(a: dict, b: dict) -> dict:
    """|delta beta| over every specialist and LoRA element, and the fraction of elements whose
    top specialist changes (``top_changed``: a fraction here, of ``n_units`` elements).

    >>> k = "layers.0.q_proj.lora_A.weight"
    >>> a = {k: torch.tensor([[0.9, 0.5], [0.1, 0.5]])}; b = {k: torch.tensor([[0.8, 0.4], [0.2, 0.6]])}
    >>> r = beta_delta(a, b); round(r["mean_abs"], 6), round(r["max_abs"], 6), r["top_changed"], r["n_units"]
    (0.1, 0.1, 0.5, 2)
    """
    total = changed = 0
    s = biggest = 0.0
    for key in a:
        d = (a[key].double() - b[key].double()).abs()
        s += float(d.sum())
        biggest = max(biggest, float(d.max()))
        total += a[key][0].numel()
        changed += int((a[key].argmax(0) != b[key].argmax(0)).sum())
    n_values = total * next(iter(a.values())).shape[0]
    return {"mean_abs": s / n_values, "max_abs": biggest, "top_changed": changed / total, "n_units": total}


# --------------------------------------------------------------------------- the official layer step, re-derived
def official_style_alpha(base_pooled: dict, spec_pooled: list[dict], n_projections: int, seed: int,
                         tau: float = 0.5) -> torch.Tensor:
    """alpha as the official layer step computes it: the reference the official-code test keeps
    (``tests/test_es_official_reference.py``, written from reading the official code, not copied), with
    the README's ``--alpha`` 1.0. It standardises jointly with a zero-variance column scaled by 1, draws
    fresh unit directions (norm + 1e-12) from one seeded NumPy stream, takes sqrt(mean + 1e-12) and
    z-scores with std floored at 1e-12 before a softmax whose denominator has + 1e-12: only these
    constants and the zero-variance rule differ from ``swd_table(standardize=True, projections="fresh")``
    + ``layer_coefficients``."""
    spec = importlib.util.spec_from_file_location("official_reference", REFERENCE_TEST)
    reference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reference)
    return reference.official_layer_coefficients(base_pooled, spec_pooled, n_projections, seed, tau, alpha=1.0)


def zero_variance_columns(base_pooled: dict, spec_pooled: list[dict], eps: float = 1e-6) -> int:
    """State columns (per modality, specialist, layer) whose joint std is below ``eps``: the only
    place where our clamp (1e-6) and sklearn's rule (scale 1) can differ."""
    count = 0
    for m, base in base_pooled.items():
        for spec in spec_pooled:
            both = torch.cat([base.double(), spec[m].double()], dim=1)  # [L, 2K, d]
            count += int((both.std(1, unbiased=False) < eps).sum())
    return count


# --------------------------------------------------------------------------- the measurements
def measure(scale: str, seed: int = 0, layout_beta: str = "code", log=print) -> dict:
    from esmerge.run.merge import build_context

    context = build_context(scales.get(scale), seed)
    adapters = [s.adapter for s in context.specialists.values()]
    names = list(context.specialists)
    rows: list[dict] = []

    def settings(variant="paper", **over):
        return es_settings.resolve_settings(variant, **over)

    def sig(need_scores=True, **over):
        t = time.perf_counter()
        out = es_signals.signals(adapters, context, seed=seed, need_scores=need_scores, **settings(**over))
        log(f"  signals {over or 'paper'} scores={need_scores}: {time.perf_counter() - t:.0f} s")
        return out

    def alpha_of(swd, s):
        own = [list(sig_modalities).index(n) for n in names] if s["other_weight"] != 1.0 else None
        return layerwise.layer_coefficients(swd, s["tau_layer"], own, s["other_weight"])

    def beta_of(scores, s):
        return elementwise.element_coefficients(scores, s["tau_element"], s["per_tensor"])

    def add(point, difference, option, paper, code, on, delta, source, note=""):
        rows.append({"point": str(point), "difference": difference, "option": option, "paper": paper,
                     "code": code, "on": on, **delta, "source": source, "note": note})
        log(f"  {point:>4} {on:<6} {option:<44} mean {delta['mean_abs']:.3g}  max {delta['max_abs']:.3g}  "
            f"top {delta['top_changed']:.4g}")

    paper = settings()
    base_sig = sig()
    sig_modalities = base_sig["modalities"]
    swd_p = base_sig["swd"]
    alpha_p = alpha_of(swd_p, paper)
    paper_scores = base_sig["scores"]
    beta_p = beta_of(paper_scores, paper)
    pooled_base = base_sig["states"]["base"]["pooled"]
    pooled_specs = [base_sig["states"][n]["pooled"] for n in names]
    k = len(base_sig["probes"])
    del base_sig
    # SWD tables computed here (not by ``signals``) are cached beside the signals, keyed by the states
    states_digest = tensor_digest({f"{who}/{m}": t for who, pooled in [("base", pooled_base)]
                                   + [(n, p) for n, p in zip(names, pooled_specs)] for m, t in pooled.items()})

    # 1-3: the three differences in the element scores
    for point, option, over, difference in [
            (1, "score_modalities='own'", {"score_modalities": "own"},
             "tokens that score a specialist's elements: its own modality only"),
            (2, "final_norm=True", {"final_norm": True}, "last layer read after the final norm"),
            (3, "grad_batch=2", {"grad_batch": 2}, "|gradient| of a batch-mean MSE, batch of 2")]:
        key, value = next(iter(over.items()))
        s = sig(**over)
        add(point, difference, option, PAPER_TEXT[key], repr(value), "beta",
            beta_delta(beta_of(s["scores"], paper), beta_p),
            f"{ELEMENT_FILE}")
        del s
    # 3b: the code's element settings, together and each alone (same scores, distance mse read back)
    mse_scores = sig(distance="mse")["scores"]
    code_el = settings(tau_element=0.1, per_tensor=True, distance="mse")
    add("3b", "element softmax tau 0.1, per-tensor z-scores, distance mse (together)",
        "tau_element=0.1, per_tensor=True, distance='mse'", "0.5, False, 'frobenius'", "0.1, True, 'mse'", "beta",
        beta_delta(beta_of(mse_scores, code_el), beta_p), ELEMENT_FILE)
    add("3b", "element softmax temperature", "tau_element=0.1", "0.5", "0.1", "beta",
        beta_delta(beta_of(paper_scores, settings(tau_element=0.1)), beta_p), ELEMENT_FILE)
    add("3b", "z-score element scores per LoRA tensor", "per_tensor=True", "False", "True", "beta",
        beta_delta(beta_of(paper_scores, settings(per_tensor=True)), beta_p), ELEMENT_FILE)
    add("3b", "token distance r: mean squared error", "distance='mse'", "'frobenius'", "'mse'", "beta",
        beta_delta(beta_of(mse_scores, paper), beta_p), ELEMENT_FILE)
    del mse_scores

    # 4: projections, and the seed-to-seed spread of alpha (projection seed only, same probes)
    def alpha_direct(proj_seed, **over):
        s = settings(**over)
        parts = {key: s[key] for key in ("n_projections", "p", "standardize", "equal_size", "projections")}
        path = context.cache / f"diffs-swd-{content_key('es_code_diffs', states_digest, proj_seed, parts)}.pt"
        table = cached(path, lambda: sliced.swd_table(
            pooled_base, pooled_specs, n_projections=s["n_projections"], p=s["p"], seed=proj_seed,
            standardize=s["standardize"], equal_size=(k if s["equal_size"] == "min" else s["equal_size"]),
            projections=s["projections"]))
        return alpha_of(table, s)

    fresh = alpha_of(sig(need_scores=False, projections="fresh")["swd"], settings(projections="fresh"))
    add(4, "SWD directions drawn fresh for every (modality, specialist, layer)", "projections='fresh'",
        "'shared' (the paper is silent)", "'fresh'", "alpha", alpha_delta(fresh, alpha_p), LAYER_FILE,
        "seed 0, same probes")
    for kind, ref in (("shared", alpha_p), ("fresh", fresh)):
        deltas = [alpha_delta(alpha_direct(s, projections=kind), ref) for s in SEED_SPREAD]
        spread = {"mean_abs": max(d["mean_abs"] for d in deltas), "max_abs": max(d["max_abs"] for d in deltas),
                  "top_changed": max(d["top_changed"] for d in deltas), "n_units": deltas[0]["n_units"]}
        add(4, f"seed-to-seed spread, {kind} projections (for scale)", f"projections='{kind}', seeds 1-4 vs 0",
            "", "", "alpha", spread, LAYER_FILE,
            "projection seed only (probes of seed 0); worst of the 4 seeds for each measure")

    # 5: probe layout (create_330_samples): 3 x 110 probes
    layout = sig(need_scores=layout_beta == "paper", probe_layout="code")
    add(5, "probes: M x probe_k = 330 (create_330_samples) instead of 110", "probe_layout='code'", "'paper'",
        "'code'", "alpha", alpha_delta(alpha_of(layout["swd"], paper), alpha_p), ELEMENT_FILE)
    if layout_beta == "paper":
        add(5, "probes: M x probe_k = 330 (create_330_samples) instead of 110", "probe_layout='code'", "'paper'",
            "'code'", "beta", beta_delta(beta_of(layout["scores"], paper), beta_p), ELEMENT_FILE)
    del layout
    code_s = settings("code")
    code_sig = es_signals.signals(adapters, context, seed=seed, **code_s)
    code_swd, code_scores = code_sig["swd"], code_sig["scores"]
    del code_sig
    if layout_beta == "code":
        # The paper-setting element scores of 330 probes are too slow for a shared CPU; against the
        # code's other settings (own modality, batch of 2: half the work per probe) the layout alone
        # is variant='code' with probe_layout='paper' vs 'code'.
        on_code = code_scores
        code_scores_settings = {key: code_s[key] for key in es_settings.SCORE_SETTINGS}
        on_paper = sig(**code_scores_settings, probe_layout="paper")["scores"]
        add(5, "probes: M x probe_k = 330 (create_330_samples) instead of 110", "probe_layout='code'", "'paper'",
            "'code'", "beta", beta_delta(beta_of(on_code, code_s), beta_of(on_paper, code_s)), ELEMENT_FILE,
            "measured against the CODE's other settings (variant='code', probe_layout 'paper' vs 'code'), not "
            "the paper's: the paper-setting scores of 330 probes were too slow for the shared CPU")
        del on_paper
    # 6: the smaller points
    add("6a", "weight of the other modalities in the layer score (--alpha)", "other_weight=1.0",
        "1.0", "1.0 (README, script default)", "alpha",
        alpha_delta(alpha_of(swd_p, settings(other_weight=1.0)), alpha_p),
        LAYER_FILE, "the README's value equals the paper's: identical alpha")
    add("6a", "weight of the other modalities in the layer score (--alpha)", "other_weight=0.5", "1.0", "0.5",
        "alpha", alpha_delta(alpha_of(swd_p, settings(other_weight=0.5)), alpha_p), LAYER_FILE,
        "a value the README does not use, for scale")
    std = alpha_of(sig(need_scores=False, standardize=True)["swd"], paper)
    add("6s", "joint z-scoring of base and specialist states before SWD", "standardize=True", "False", "True",
        "alpha", alpha_delta(std, alpha_p), LAYER_FILE)
    # 6b/6c: small constants and zero-variance columns, ours vs the official-style computation at seed 42
    ours42 = alpha_direct(42, standardize=True, projections="fresh")
    theirs42 = official_style_alpha(pooled_base, pooled_specs, paper["n_projections"], 42, paper["tau_layer"])
    zero = zero_variance_columns(pooled_base, pooled_specs)
    add("6bc", "1e-12 terms (direction norm, SWD root, z-score std, softmax) and zero-variance columns",
        "none (not an option)", "no constants; std clamped at 1e-6", "1e-12 terms; sklearn scale 1", "alpha",
        alpha_delta(ours42, theirs42), LAYER_FILE,
        f"standardize=True, projections='fresh', seed 42, both sides; {zero} state columns with joint std < 1e-6")
    # 6d: beta stored as float32, then cast (the paper's models: bf16)
    lam = combine(alpha_p, beta_p)
    beta32 = {key: v.float().double() for key, v in beta_p.items()}
    add("6d", "beta stored as float32 before Eq. 4", "none (not an option)", "float64", "float32", "beta",
        beta_delta(beta32, beta_p), MERGE_FILE)
    lam32 = combine(alpha_p, {key: v.float() for key, v in beta_p.items()})
    states = [a.state for a in adapters]
    merged, merged32 = merge_lora(states, lam), merge_lora(states, lam32)
    d = torch.cat([(merged[key].double() - merged32[key].double()).abs().flatten() for key in merged])
    rel = float(d.max() / max(float(torch.cat([v.double().abs().flatten() for v in merged.values()]).max()), 1e-30))
    add("6d", "beta stored as float32: merged LoRA weights", "none (not an option)", "float64", "float32", "weights",
        {"mean_abs": float(d.mean()), "max_abs": float(d.max()), "top_changed": 0, "n_units": int(d.numel())},
        MERGE_FILE, f"max |delta| relative to the largest merged weight: {rel:.2g}")
    bf16 = {key: v.to(torch.bfloat16).double() for key, v in beta_p.items()}
    add("6d", "beta cast to bf16 (the paper models' dtype)", "none (not an option)", "float64", "bf16", "beta",
        beta_delta(bf16, beta_p), MERGE_FILE)

    # 7: equal-size subsampling: 'min' = K of K probes, a permutation (SWD sorts, so exactly 0)
    add(7, "subsample both sets to min(N, M) before SWD", "equal_size='min'", "None", "'min'", "alpha",
        alpha_delta(alpha_direct(seed, equal_size="min"), alpha_p), LAYER_FILE,
        f"base and specialist both have K = {k} probes: nothing is subsampled")

    # everything: variant='code' vs 'paper'
    add("all", "every difference (variant='code')", "variant='code'", "'paper'", "'code'", "alpha",
        alpha_delta(alpha_of(code_swd, code_s), alpha_p), f"{LAYER_FILE}, {ELEMENT_FILE}")
    add("all", "every difference (variant='code')", "variant='code'", "'paper'", "'code'", "beta",
        beta_delta(beta_of(code_scores, code_s), beta_p), f"{LAYER_FILE}, {ELEMENT_FILE}")
    return {"rows": rows, "probes": k, "n_blocks": int(alpha_p.shape[1]), "specialists": names,
            "modalities": list(sig_modalities)}


PAPER_TEXT = {"score_modalities": "'all'", "final_norm": "False", "grad_batch": "1"}


# --------------------------------------------------------------------------- output
def header(scale: str, seed: int, minutes: float, layout_beta: str) -> list[str]:
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return [f"benchmarks/es_code_diffs.py --scale {scale} (merge seed {seed}, the shipped seed-0 {scale} specialists)",
            f"code of commit {commit} (plus this session's uncommitted files); "
            f"{platform.processor() or platform.machine()}, "
            f"{_cpu_name()}, 1 torch thread, shared with other work; {date.today().isoformat()}; {minutes:.0f} min",
            "each row: the paper's settings vs the paper's settings with that ONE official-code choice "
            "(official code: WonbinLee067/es-merging at commit 3ca7549b)",
            "alpha: mean/max |delta| over specialists x blocks, top_changed = blocks (of n_units) whose top specialist "
            "changes; beta: over specialists x LoRA elements, top_changed = fraction of elements whose top "
            "specialist changes",
            {"skip": "probe_layout='code' on beta: not measured (--layout-beta skip)",
             "code": "probe_layout='code' on beta: measured against the code's other settings (--layout-beta code), "
                     "see its note", "paper": "probe_layout='code' on beta: against the paper's settings"}[layout_beta]]


def _cpu_name() -> str:
    """The CPU's model name, as the retention ablation's header gives it (``es_code_ablation._cpu_name``)."""
    spec = importlib.util.spec_from_file_location("es_code_ablation", Path(__file__).with_name("es_code_ablation.py"))
    ablation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ablation)
    return ablation._cpu_name() or "unknown CPU"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layout-beta", choices=("code", "paper", "skip"), default="code",
                        help="beta under probe_layout='code': against the code's other settings (default; "
                             "element scores of 110 probes with own-modality, batch-2 scores), against the "
                             "paper's (the paper-setting scores of 330 probes: about an hour on a shared CPU), "
                             "or not at all")
    parser.add_argument("--out", type=Path, default=None,
                        help="results stem (default benchmarks/results/es_code_diffs_<scale>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = measure(args.scale, args.seed, args.layout_beta)
    minutes = (time.perf_counter() - start) / 60
    lines = header(args.scale, args.seed, minutes, args.layout_beta)
    result = {"header": lines, "scale": args.scale, "seed": args.seed, "official": OFFICIAL, **result}
    stem = args.out or RESULTS / f"es_code_diffs_{args.scale}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    import pandas as pd

    table = pd.DataFrame(result["rows"])[["point", "on", "option", "mean_abs", "max_abs", "top_changed", "n_units",
                                          "note"]]
    with pd.option_context("display.width", 250, "display.max_colwidth", 120):
        text = table.to_string(index=False, float_format=lambda v: f"{v:.3g}")
    Path(f"{stem}.txt").write_text("".join(f"# {line}\n" for line in lines) + text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
