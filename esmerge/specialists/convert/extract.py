"""A LoRA extracted from a fine-tuned LLaMA and its base: truncated SVD of each weight difference.

``lora_extract`` is the generic route (any LLaMA fine-tune, full or LoRA-merged, against the base
it came from); ``prot2text.convert_prot2text`` uses the same engine on Prot2Text-V2's decoder.
For every layer and each of the seven target projections, ``Delta = W_finetuned - W_base`` is
replaced by its best rank-r approximation (``lowrank.lowrank_factors``), scaled so that the shared
``alpha = 32`` reproduces it. The card reports the relative reconstruction error
``||Delta - Delta_r||_F / ||Delta||_F`` per matrix and per layer, and every other tensor the
fine-tune changed (norms, embeddings), which a LoRA on the projections cannot carry.

The factors of each finished layer are stored in the output's temporary sibling, so an interrupted
extraction (an 8B model is 224 SVDs) resumes at the first unfinished layer.

With an error budget (``error_budget``), the rank is not fixed: a first pass takes the singular
values of every delta (``select_rank``, also stored layer by layer), and the smallest rank whose
worst per-matrix error is within the budget is extracted. Only r = 8 merges with the other
specialists; the card says which rank was chosen and why.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esmerge import progress
from esmerge.errors import UsageError
from esmerge.specialists.base_llm import LORA_ALPHA, LORA_RANK, LORA_TARGET_MODULES
from esmerge.specialists.convert import checkpoints as ck
from esmerge.specialists.convert import lowrank, output

CONVERTER_VERSION = 1
FACTORS = "factors"
SPECTRA = "spectra"
# Relative size ||Delta|| / ||W_base|| above which a "fine-tune" is taken for a different model:
# fine-tuning moves a projection by a few percent at most; two unrelated models differ by ~140%.
MAX_RELATIVE_DELTA = 0.5


@dataclass
class Extraction:
    """What an extraction produced: the PEFT LoRA tensors and the error report for the card."""

    lora: dict[str, torch.Tensor]
    report: dict = field(default_factory=dict)


def _layer_file(stage: output.Stage, layer: int) -> Path:
    return stage.dir / FACTORS / f"layer_{layer:03d}.safetensors"


def _save_layer(path: Path, tensors: dict[str, torch.Tensor], stats: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"stats": json.dumps(stats)})
    tmp.replace(path)


def _load_layer(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, json.loads(fh.metadata()["stats"])


def _delta(finetuned: ck.TensorSource, ft_prefix: str, base: ck.TensorSource, layer: int, module: str,
           device: str) -> tuple[torch.Tensor, float]:
    """``W_ft - W_base`` of one target matrix in float32 on ``device``, and ``||Delta|| / ||W_base||``."""
    reference = ck.checked(base, ck.target_key(layer, module))
    tuned = ck.checked(finetuned, ck.target_key(layer, module, ft_prefix), tuple(reference.shape))
    delta = tuned.to(device, torch.float32) - reference.to(device, torch.float32)
    norm = torch.linalg.matrix_norm(reference.float()).item()
    return delta, torch.linalg.matrix_norm(delta).item() / max(norm, 1e-30)


def _check_fine_tune(finetuned: ck.TensorSource, base: ck.TensorSource, layer: int, relative: dict,
                     max_relative_delta: float) -> None:
    median = sorted(relative.values())[len(relative) // 2]
    if median > max_relative_delta:
        raise ck.CheckpointError(
            f"{finetuned.path}: layer {layer} differs from the base {base.path} by {median:.0%} of its norm "
            f"(median over the projections); it is not a fine-tune of that base: pass the right one")


def check_budget(error_budget: float | None, max_rank: int | None) -> None:
    """Refuse an error budget outside [0, 1) or a ``max_rank`` below 1 (one line, naming the value)."""
    if error_budget is not None and not (isinstance(error_budget, (int, float)) and 0 <= error_budget < 1):
        raise UsageError(f"--error-budget must be a relative error in [0, 1) (e.g. 0.05), got {error_budget!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise UsageError(f"--max-rank must be an integer >= 1, got {max_rank!r}")


def select_rank(finetuned: ck.TensorSource, ft_prefix: str, base: ck.TensorSource, n_layers: int,
                stage: output.Stage, error_budget: float, max_rank: int | None = None, device: str | None = None,
                max_relative_delta: float = MAX_RELATIVE_DELTA, show_progress: bool = True) -> tuple[int, dict]:
    """The smallest rank whose worst per-matrix relative error is within ``error_budget``, and the report.

    Takes the singular values of every target delta (stored per layer in ``stage``, so this pass
    resumes too) and applies ``lowrank.smallest_rank_within``. Refuses in one line when no rank up
    to ``max_rank`` fits, naming the worst matrix there.
    """
    check_budget(error_budget, max_rank)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    curves = {}
    bar = progress.track(total=n_layers, desc="singular values", unit="layer", disable=not show_progress)
    for layer in range(n_layers):
        file = stage.dir / SPECTRA / f"layer_{layer:03d}.safetensors"
        if file.exists():
            tensors, _ = _load_layer(file)
        else:
            tensors, relative = {}, {}
            for module in LORA_TARGET_MODULES:
                delta, relative[module] = _delta(finetuned, ft_prefix, base, layer, module, device)
                tensors[module] = lowrank.error_by_rank(torch.linalg.svdvals(delta))
            _check_fine_tune(finetuned, base, layer, relative, max_relative_delta)
            _save_layer(file, tensors, {})
        curves.update({f"layers.{layer}.{m}": c for m, c in tensors.items()})
        bar.update()
    bar.close()
    rank = lowrank.smallest_rank_within(curves, error_budget, max_rank)
    if rank is None:
        full = max(len(c) for c in curves.values()) - 1
        at = min(max_rank or full, full)
        name, worst = max(((k, c[at].item() if at < len(c) else 0.0) for k, c in curves.items()), key=lambda kv: kv[1])
        raise ck.CheckpointError(f"{finetuned.path}: no rank up to {max_rank} keeps every matrix within the error "
                                 f"budget {error_budget:g} ({name} loses {worst:.4f} at rank {at}); "
                                 "raise --max-rank or the budget")
    needed = {k: lowrank.smallest_rank_within({k: c}, error_budget) for k, c in curves.items()}
    report = {"error_budget": error_budget, "max_rank": max_rank, "chosen_rank": rank,
              "predicted_max_error": max(c[rank].item() if rank < len(c) else 0.0 for c in curves.values()),
              "rank_needed_per_matrix": needed, "mergeable": rank == LORA_RANK,
              "rule": "smallest r with max over matrices of ||Delta - Delta_r||_F / ||Delta||_F <= error_budget"}
    return rank, report


def extract_layers(finetuned: ck.TensorSource, ft_prefix: str, base: ck.TensorSource, n_layers: int,
                   stage: output.Stage, rank: int = LORA_RANK, alpha: float = LORA_ALPHA, device: str | None = None,
                   max_relative_delta: float = MAX_RELATIVE_DELTA, show_progress: bool = True) -> Extraction:
    """SVD-extract the LoRA of every target matrix, layer by layer, reusing layers already in ``stage``.

    Refuses a wrong shape, dtype, NaN, or a layer whose median ``||Delta|| / ||W||`` exceeds
    ``max_relative_delta`` (the fine-tune was not made from this base).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lora, errors, rel_deltas, layer_errors, resumed = {}, {}, {}, [], 0
    bar = progress.track(total=n_layers, desc=f"extract LoRA r={rank}", unit="layer", disable=not show_progress)
    for layer in range(n_layers):
        file = _layer_file(stage, layer)
        if file.exists():
            tensors, stats = _load_layer(file)
            resumed += 1
        else:
            tensors, stats = {}, {"error": {}, "relative_delta": {}, "residual_sq": 0.0, "delta_sq": 0.0}
            for module in LORA_TARGET_MODULES:
                delta, relative = _delta(finetuned, ft_prefix, base, layer, module, device)
                a, b, err = lowrank.lowrank_factors(delta, rank, alpha)
                delta_norm = torch.linalg.matrix_norm(delta).item()
                peft = f"base_model.model.model.layers.{layer}.{ck.TARGET_PARENT[module]}.{module}"
                tensors[f"{peft}.lora_A.weight"], tensors[f"{peft}.lora_B.weight"] = a, b
                stats["error"][module] = err
                stats["relative_delta"][module] = relative
                stats["residual_sq"] += (err * delta_norm) ** 2
                stats["delta_sq"] += delta_norm ** 2
            _check_fine_tune(finetuned, base, layer, stats["relative_delta"], max_relative_delta)
            _save_layer(file, tensors, stats)
        lora.update(tensors)
        for module in LORA_TARGET_MODULES:
            errors[f"layers.{layer}.{module}"] = stats["error"][module]
            rel_deltas[f"layers.{layer}.{module}"] = stats["relative_delta"][module]
        layer_errors.append(math.sqrt(stats["residual_sq"] / stats["delta_sq"]) if stats["delta_sq"] > 0 else 0.0)
        bar.update()
    bar.close()
    report = {"rank": rank, "alpha": alpha, "per_matrix_relative_error": errors,
              "per_layer_relative_error": layer_errors,
              "max_relative_error": max(errors.values()) if errors else 0.0,
              "mean_relative_error": sum(errors.values()) / len(errors) if errors else 0.0,
              "relative_delta": rel_deltas, "resumed_layers": resumed, "device": device,
              "error_definition": "||W_ft - W_base - (alpha/r) B A||_F / ||W_ft - W_base||_F"}
    return Extraction(lora, report)


def changed_other_tensors(finetuned: ck.TensorSource, ft_prefix: str, base: ck.TensorSource,
                          tie_word_embeddings: bool = False) -> dict[str, float]:
    """Relative change ``||T' - T|| / ||T||`` of every non-target decoder tensor that changed.

    A LoRA on the projections cannot carry these; a shape that differs is refused outright.
    """
    targets = {ck.target_key(0, m).split("layers.0.")[1] for m in LORA_TARGET_MODULES}
    changed = {}
    for name in base.keys():
        if name.startswith("model.layers.") and name.split(".", 3)[3] in targets:
            continue
        key = ft_prefix + name
        if key not in finetuned:
            if name == "lm_head.weight" and tie_word_embeddings:
                continue
            raise ck.CheckpointError(f"{finetuned.path}: {key} is missing; the base {base.path} has {name}")
        reference = base.get(name)
        tensor = ck.checked(finetuned, key, tuple(reference.shape))
        if not ck.equal_to_base(tensor, reference):
            norm = reference.float().norm().item()
            changed[name] = (tensor.float() - reference.float()).norm().item() / max(norm, 1e-30)
    return changed


def lora_extract(finetuned: str | Path, base: str | Path, out: str | Path, rank: int = LORA_RANK, *,
                 modality: str | None = None, force: bool = False, device: str | None = None,
                 max_relative_delta: float = MAX_RELATIVE_DELTA, error_budget: float | None = None,
                 max_rank: int | None = None) -> Extraction:
    """Extract a rank-``rank`` LoRA (alpha 32) from a fine-tuned LLaMA directory and its base into ``out``.

    ``finetuned`` and ``base`` are Hugging Face LLaMA directories (or hub ids); the fine-tune's
    decoder may sit under a prefix (e.g. ``llama_decoder.``). Writes a PEFT adapter directory with
    ``card.json`` (the error report under ``extraction``) and returns the ``Extraction``.
    With ``error_budget`` (a relative Frobenius error, e.g. 0.05), ``rank`` is ignored and the
    smallest rank (up to ``max_rank``) whose worst per-matrix error is within it is used
    (``select_rank``; the choice is under ``extraction.rank_selection``).
    Only ``rank = 8`` merges with the other specialists (the shared LoRA config).
    """
    began = time.perf_counter()
    check_budget(error_budget, max_rank)
    ft_path, base_path = ck.resolve(finetuned, "fine-tuned model"), ck.resolve(base, "base model")
    ft, base_source = ck.TensorSource(ft_path), ck.TensorSource(base_path)
    base_config = ck.llama_config(ck.read_config(base_path), base_path)
    ck.check_same_architecture(ck.llama_config(ck.read_config(ft_path), ft_path), base_config, ft_path, base_path)
    prefix = ck.llama_prefix(ft)
    changed = changed_other_tensors(ft, prefix, base_source, base_config["tie_word_embeddings"])
    recipe = {"converter": "lora-extract", "version": CONVERTER_VERSION, "source": ck.fingerprint(ft),
              "base": ck.fingerprint(base_source), "alpha": LORA_ALPHA,
              **({"error_budget": error_budget, "max_rank": max_rank} if error_budget is not None else {"rank": rank})}
    with output.staged(out, recipe, force) as stage:
        result = extract_with_budget(ft, prefix, base_source, base_config["num_hidden_layers"], stage, rank,
                                     error_budget, max_rank, device, max_relative_delta)
        rank = result.report["rank"]
        result.report["changed_other_tensors"] = changed
        output.write_parts(stage, result.lora, str(base), rank=rank)
        card = {"modality": modality, "scale": "paper",
                "converter": {"name": "lora-extract", "version": CONVERTER_VERSION},
                "source": ck.describe(ft), "base_name": str(base), "base_path": str(base_path),
                "base_weights_sha256": ck.base_weights_sha256(base_source, base_config["tie_word_embeddings"]),
                "lora": {"r": rank, "lora_alpha": LORA_ALPHA, "target_modules": sorted(LORA_TARGET_MODULES)},
                "projector": None, "extraction": result.report, "n_tokens": 0,
                "steps": None, "batch_size": None, "lr": None, "seed": None,
                "timings": {"wall_s": round(time.perf_counter() - began, 2)}}
        output.finish(stage, card, scratch=(FACTORS, SPECTRA))
    return result


def extract_with_budget(finetuned: ck.TensorSource, ft_prefix: str, base: ck.TensorSource, n_layers: int,
                        stage: output.Stage, rank: int, error_budget: float | None, max_rank: int | None,
                        device: str | None, max_relative_delta: float = MAX_RELATIVE_DELTA) -> Extraction:
    """``extract_layers`` at ``rank``, or, with ``error_budget``, at the rank ``select_rank`` picks
    (its report under ``rank_selection``, with the measured errors checked against the budget)."""
    selection = None
    if error_budget is not None:
        rank, selection = select_rank(finetuned, ft_prefix, base, n_layers, stage, error_budget, max_rank, device,
                                      max_relative_delta)
    result = extract_layers(finetuned, ft_prefix, base, n_layers, stage, rank, device=device,
                            max_relative_delta=max_relative_delta)
    if selection is not None:
        # The prediction is exact in exact arithmetic; the measured error adds float32 rounding.
        selection["measured_max_error"] = result.report["max_relative_error"]
        selection["measured_within_budget"] = result.report["max_relative_error"] <= error_budget + 1e-5
        result.report["rank_selection"] = selection
    return result


def summary(report: dict) -> str:
    """The error report as lines for a terminal: one per layer, then the worst matrix.

    >>> print(summary({"rank": 8, "per_layer_relative_error": [0.0, 0.25],
    ...                "per_matrix_relative_error": {"layers.1.q_proj": 0.5}, "max_relative_error": 0.5}))
    layer 0: relative reconstruction error 0.0000
    layer 1: relative reconstruction error 0.2500
    worst matrix at rank 8: layers.1.q_proj 0.5000
    """
    lines = [f"layer {i}: relative reconstruction error {e:.4f}"
             for i, e in enumerate(report["per_layer_relative_error"])]
    worst = max(report["per_matrix_relative_error"].items(), key=lambda kv: kv[1], default=("-", 0.0))
    lines.append(f"worst matrix at rank {report['rank']}: {worst[0]} {worst[1]:.4f}")
    if "mean_relative_error" in report:
        lines.append(f"mean over matrices: {report['mean_relative_error']:.4f}")
    if report.get("rank_selection"):
        sel = report["rank_selection"]
        lines.append(f"rank {sel['chosen_rank']} is the smallest with every matrix within the error budget "
                     f"{sel['error_budget']:g}" + ("" if sel["mergeable"] else
                                                   f" (only r = {LORA_RANK} merges with the other specialists)"))
    return "\n".join(lines)
