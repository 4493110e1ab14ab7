"""Prot2Text-V2 (``xiao-fei/Prot2Text-V2-11B-Instruct-hf``) to the project's protein specialist.

Prot2Text-V2 is an ``Esm2LlamaInstructForCausalLM``: ``esm_encoder`` (ESM2-3B,
``facebook/esm2_t36_3B_UR50D``, no pooling layer), ``adapter`` (a 2-layer GELU MLP, ``fc1``/``fc2``,
from ESM's width to LLaMA's, then L2-normalised) and ``llama_decoder`` (LLaMA-3.1-8B-Instruct).
Its ``config.json`` nests ``esm_config``, ``adapter_config`` and ``llama_config`` and names the
``placeholder_id`` whose positions the adapter's outputs replace: one per residue, plus ESM's
BOS and EOS. The published weights are safetensors shards with an index.

Its LoRA was merged into the decoder weights before release, so there is no LoRA to copy:
``extract.extract_layers`` recovers a rank-8 one from ``decoder - base`` per target matrix. Every
other decoder tensor must equal the base's exactly (the merge touched only the projections);
a difference means the wrong base. ``adapter.*`` goes to ``projector.safetensors`` and
``esm_encoder.*`` to ``encoder.safetensors``, both at their stored precision, except ESM's rotary
frequencies (``...rotary_embeddings.inv_freq``): upstream computes them in float32, and ESM turns
positions into the buffer's dtype, so in bf16 every position above 256 is rounded. A copy stored
at lower precision is checked against the exact value and written back in float32.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from esmerge.specialists.base_llm import LORA_ALPHA, LORA_RANK, LORA_TARGET_MODULES
from esmerge.specialists.convert import checkpoints as ck
from esmerge.specialists.convert import output
from esmerge.specialists.convert.extract import (
    FACTORS,
    MAX_RELATIVE_DELTA,
    SPECTRA,
    Extraction,
    changed_other_tensors,
    check_budget,
    extract_with_budget,
)

CONVERTER_VERSION = 1
DECODER_PREFIX = "llama_decoder."


def rotary_in_float32(encoder: dict[str, torch.Tensor], esm_config: dict, where: Path) -> dict[str, str]:
    """ESM's rotary ``inv_freq`` buffers of ``encoder`` in float32, in place; returns what was done per key.

    The exact value is ``1 / 10000 ** (arange(0, d, 2) / d)`` with ``d`` the attention head width.
    A float32 copy is kept as stored; a lower-precision copy must equal the exact value rounded to
    its dtype (else the checkpoint is not ESM-2) and is replaced by the exact float32 value.
    """
    done = {}
    heads, hidden = esm_config.get("num_attention_heads"), esm_config.get("hidden_size")
    for key in sorted(k for k in encoder if k.endswith("rotary_embeddings.inv_freq")):
        stored = encoder[key]
        if stored.dtype == torch.float32:
            done[key] = "stored float32"
            continue
        if not heads or not hidden:
            raise ck.CheckpointError(f"{where}/config.json: esm_config lacks hidden_size or num_attention_heads, "
                                     f"needed to restore {key} to float32")
        dim = hidden // heads
        exact = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        if stored.shape != exact.shape or not torch.equal(exact.to(stored.dtype), stored):
            raise ck.CheckpointError(f"{where}: {key} is not ESM-2's rotary frequencies for head width {dim} "
                                     "(even after rounding); is this a Prot2Text-V2 checkpoint?")
        encoder[key] = exact
        done[key] = f"recomputed in float32 (stored {str(stored.dtype).replace('torch.', '')})"
    return done


def convert_prot2text(src: str | Path, out: str | Path, base: str | Path, *, force: bool = False,
                      device: str | None = None, max_relative_delta: float = MAX_RELATIVE_DELTA,
                      error_budget: float | None = None, max_rank: int | None = None) -> Extraction:
    """Convert a Prot2Text-V2 directory into a protein specialist at ``out``; returns the ``Extraction``.

    ``base`` is LLaMA-3.1-8B-Instruct (directory or hub id) that the decoder was fine-tuned from.
    The SVD runs on ``device`` (default CUDA when present); an interrupted run resumes per layer.
    ``error_budget`` / ``max_rank``: pick the rank as ``extract.lora_extract`` does (default: r = 8,
    the only rank that merges with the other specialists).
    """
    began = time.perf_counter()
    check_budget(error_budget, max_rank)
    src_path, base_path = ck.resolve(src, "Prot2Text-V2 checkpoint"), ck.resolve(base, "base model")
    source, base_source = ck.TensorSource(src_path), ck.TensorSource(base_path)
    config = ck.read_config(src_path)
    if "llama_config" not in config:
        raise ck.CheckpointError(f"{src_path}/config.json has no llama_config; is this a Prot2Text-V2 "
                                 "(Esm2LlamaInstructForCausalLM) directory?")
    base_config = ck.llama_config(ck.read_config(base_path), base_path)
    ck.check_same_architecture(ck.llama_config(config, src_path), base_config, src_path, base_path)
    if ck.target_key(0, "q_proj", DECODER_PREFIX) not in source:
        raise ck.CheckpointError(f"{src_path}: no {ck.target_key(0, 'q_proj', DECODER_PREFIX)}; "
                                 "is this a Prot2Text-V2 directory?")
    changed = changed_other_tensors(source, DECODER_PREFIX, base_source, base_config["tie_word_embeddings"])
    if changed:
        name, rel = next(iter(sorted(changed.items())))
        raise ck.CheckpointError(f"{src_path}: {DECODER_PREFIX}{name} differs from the base {base_path} "
                                 f"(relative {rel:.3g}); only the LoRA projections may differ: pass the right base")
    projector = {k: ck.checked(source, k) for k in source.keys() if k.startswith("adapter.")}
    encoder = {k: ck.checked(source, k) for k in source.keys() if k.startswith("esm_encoder.")}
    fc2 = projector.get("adapter.fc2.weight")
    if fc2 is None:
        raise ck.CheckpointError(f"{src_path}: adapter.fc2.weight is missing; the protein tokens cannot reach the LLM")
    if fc2.shape[0] != base_config["hidden_size"]:
        raise ck.CheckpointError(f"{source.file_of('adapter.fc2.weight')}: adapter.fc2.weight maps to {fc2.shape[0]} "
                                 f"dims, but the base's hidden size is {base_config['hidden_size']}")
    esm = config.get("esm_config") or {}
    rotary = rotary_in_float32(encoder, esm, src_path)
    recipe = {"converter": "prot2text", "version": CONVERTER_VERSION, "source": ck.fingerprint(source),
              "base": ck.fingerprint(base_source), "alpha": LORA_ALPHA,
              **({"error_budget": error_budget, "max_rank": max_rank} if error_budget is not None
                 else {"rank": LORA_RANK})}
    with output.staged(out, recipe, force) as stage:
        result = extract_with_budget(source, DECODER_PREFIX, base_source, base_config["num_hidden_layers"], stage,
                                     LORA_RANK, error_budget, max_rank, device, max_relative_delta)
        rank = result.report["rank"]
        output.write_parts(stage, result.lora, str(base), projector, encoder, rank=rank)
        card = {
            "modality": "protein", "scale": "paper", "converter": {"name": "prot2text", "version": CONVERTER_VERSION},
            "source": ck.describe(source) | {"model": "xiao-fei/Prot2Text-V2-11B-Instruct-hf"},
            "base_name": str(base), "base_path": str(base_path),
            "base_weights_sha256": ck.base_weights_sha256(base_source, base_config["tie_word_embeddings"]),
            "base_identity": "every non-projection decoder tensor equals the base",
            "lora": {"r": rank, "lora_alpha": LORA_ALPHA, "target_modules": sorted(LORA_TARGET_MODULES)},
            "projector": None,  # not the cpu-scale MLP: the modality part is described under "encoder"
            "encoder": {"kind": "prot2text", "esm": esm.get("_name_or_path") or "facebook/esm2_t36_3B_UR50D",
                        "esm_hidden_size": esm.get("hidden_size"), "esm_layers": esm.get("num_hidden_layers"),
                        "esm_config": esm,  # encoders.Prot2TextEncoder rebuilds the EsmModel from it
                        "adapter_config": config.get("adapter_config"), "placeholder_id": config.get("placeholder_id"),
                        "tokens_per_input": "sequence length + 2 (ESM2 BOS and EOS)",
                        "encoder_tensors": len(encoder), "projector_tensors": sorted(projector),
                        "rotary_inv_freq": {"dtype": "float32", "buffers": len(rotary), "recomputed": sum(
                            v.startswith("recomputed") for v in rotary.values())}},
            "n_tokens": None,  # variable: one per residue + 2
            "extraction": result.report,
            "steps": None, "batch_size": None, "lr": None, "seed": None,
            "timings": {"wall_s": round(time.perf_counter() - began, 2)},
        }
        output.finish(stage, card, scratch=(FACTORS, SPECTRA))
    return result
