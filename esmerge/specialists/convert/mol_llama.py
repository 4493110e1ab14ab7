"""Mol-LLaMA (``DongkiKim/Mol-Llama-3.1-8B-Instruct``) to the project's molecule specialist.

Mol-LLaMA is a ``MolLLaMA`` module: ``encoder`` (MoleculeSTM 2D + Uni-Mol 3D graph encoders, a
blending module, a Q-Former with 8 query tokens), ``llm_proj`` (Q-Former width -> LLM width) and
``llm``, a PEFT-wrapped LLaMA-3.1-8B-Instruct with a LoRA (r = 8, alpha = 32, q/k/v/o/gate/up/down)
whose vocabulary was resized for ``[PAD]`` and ``<mol>``. Its weights come as a Hugging Face
directory (``config.json`` with ``llm_config`` + safetensors, possibly sharded with an index) or
as the training run's Lightning ``.ckpt`` (trainable tensors only, under ``state_dict`` with a
``mol_llama.`` prefix). LoRA keys look like
``llm.base_model.model.model.layers.N.self_attn.q_proj.lora_A.default.weight``.

The LoRA is already in the shared format, so conversion renames it to PEFT's saved keys
(``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``) after checking every shape
against the base, and keeps the rest as the modality part: ``encoder.graph_encoder.*`` (frozen
pretrained encoders, when present) in ``encoder.safetensors``; the blending module, Q-Former and
``llm_proj`` in ``projector.safetensors``, with the embedding rows the resized vocabulary added.
Any base-model tensor the checkpoint carries must equal the given base's. Integer buffers of the
encoder (BERT's ``position_ids``, BatchNorm's ``num_batches_tracked``) are carried with their dtype.

The Lightning ``.ckpt`` pickles a ``MolLLaMAConfig`` under ``hyper_parameters["model"]``; its
config classes are admitted by name as inert placeholders (``checkpoints.InertConfig``), so the
file reads without running upstream code and its config names the base when no ``config.json``
does. A checkpoint without base tensors (the hub's trainable-only layout, the Lightning file) can
only name its base (``llm_config.llm_model``): a base given instead is compared with the named
one by weights hash when that one is on this machine, and with ``base_sha256`` when given.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import torch

from esmerge.specialists.base_llm import LORA_ALPHA, LORA_RANK, LORA_TARGET_MODULES
from esmerge.specialists.convert import checkpoints as ck
from esmerge.specialists.convert import output
from esmerge.specialists.mol_llama import weights as graph_files

CONVERTER_VERSION = 2
# The classes upstream's utils/configuration_mol_llama.py defines; a Lightning .ckpt pickles them.
CONFIG_CLASSES = tuple(f"utils.configuration_mol_llama.{name}" for name in (
    "MolLLaMAConfig", "LLMConfig", "LoraConfig", "QformerConfig", "BlendingModuleConfig", "GraphEncoderConfig",
    "UniMolConfig", "MoleculeSTMConfig"))
_LORA = re.compile(r"^llm\.base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_([AB])"
                   r"(?:\.default)?\.weight$")
_LLM = "llm.base_model.model."
_VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def _strip(key: str) -> str:
    return key[len("mol_llama."):] if key.startswith("mol_llama.") else key


def _lora_config_check(config: dict, where: Path) -> None:
    lora = (config.get("llm_config") or {}).get("lora_config") or {}
    for name, want in (("r", LORA_RANK), ("lora_alpha", LORA_ALPHA)):
        if name in lora and lora[name] != want:
            raise ck.CheckpointError(f"{where}/config.json: llm_config.lora_config.{name} is {lora[name]}, "
                                     f"but ES-Merging needs the shared LoRA ({name} = {want})")


def _source_config(source: ck.TensorSource, src_path: Path) -> dict:
    """``config.json``, or else the ``MolLLaMAConfig`` a Lightning file pickled; refuses another model type."""
    config = ck.read_config(src_path) or (source.extra.get("hyper_parameters") or {}).get("model") or {}
    if not isinstance(config, dict):
        raise ck.CheckpointError(f"{src_path}: hyper_parameters['model'] is {type(config).__name__}, not a config")
    kind = config.get("model_type") or config.get("__class__", "").rsplit(".", 1)[-1]
    if kind and kind not in ("mol_llama", "MolLLaMAConfig"):
        raise ck.CheckpointError(f"{src_path}: the config's model type is {kind!r}, not 'mol_llama'; "
                                 "is this a Mol-LLaMA checkpoint?")
    return config


def _check_named_base(named: str | None, base: str, base_path: Path, weights_sha256: str, base_sha256: str | None,
                      tie: bool, src_path: Path) -> dict:
    """Compare the given base with the one the checkpoint names (by weights hash, where it is on this
    machine) and with ``base_sha256``; the record for the card, or a one-line refusal."""
    record = {"named_by_checkpoint": named, "given": str(base), "weights_sha256": weights_sha256}
    if base_sha256 is not None:
        if base_sha256.lower() != weights_sha256:
            raise ck.CheckpointError(f"{base_path}: weights sha256 {weights_sha256[:12]}... is not the expected "
                                     f"{base_sha256[:12]}... (--base-sha256); pass the base you meant")
        record["expected_sha256"] = "matched"
    if named and str(named) != str(base):
        folder = ck.cached_folder(str(named))
        if folder is None:
            record["named_weights_sha256"] = "not on this machine; not compared"
        elif folder.resolve() != base_path.resolve():
            named_sha = ck.base_weights_sha256(ck.TensorSource(folder), tie)
            record["named_weights_sha256"] = named_sha
            if named_sha != weights_sha256:
                raise ck.CheckpointError(f"{src_path}: trained on {named}, but the base {base_path} has other weights "
                                         f"(sha256 {weights_sha256[:12]}... vs {named_sha[:12]}...); "
                                         f"pass --base {named} or leave --base out")
    return record


def convert_mol_llama(src: str | Path, out: str | Path, base: str | Path | None = None, *,
                      force: bool = False, base_sha256: str | None = None) -> Path:
    """Convert a Mol-LLaMA checkpoint into a molecule specialist directory at ``out``.

    Args:
        src: the Hugging Face directory (or hub id) or the Lightning ``.ckpt`` file.
        out: the specialist directory to write (refused if finished, unless ``force``).
        base: the LLaMA base (directory or hub id); default the ``llm_config.llm_model`` of
            the checkpoint's config (``config.json`` or the Lightning file's hyper-parameters).
        base_sha256: the expected weights hash of the base (``base_llm.checkpoint_sha256``), if known.
    Returns ``out``. Raises ``CheckpointError`` (one line) for a checkpoint that does not fit.
    """
    began = time.perf_counter()
    src_path = ck.resolve(src, "Mol-LLaMA checkpoint")
    source = ck.TensorSource(src_path, inert=CONFIG_CLASSES)
    config = _source_config(source, src_path)
    _lora_config_check(config, src_path)
    named = (config.get("llm_config") or {}).get("llm_model")
    base = base or named
    if not base:
        raise ck.CheckpointError(f"{src_path}: no config names the base LLM; pass the base (--base PATH)")
    base_path = ck.resolve(base, "base model")
    base_source = ck.TensorSource(base_path)
    base_config = ck.llama_config(ck.read_config(base_path), base_path)
    n_layers = base_config["num_hidden_layers"]

    lora_keys, base_keys, projector, encoder = {}, {}, {}, {}
    for key in source.keys():
        name = _strip(key)
        match = _LORA.match(name)
        if match:
            lora_keys[(int(match.group(1)), match.group(3), match.group(4))] = key
        elif name.startswith(_LLM) and name.endswith("rotary_emb.inv_freq"):
            continue  # older transformers saved this buffer; the base recomputes it
        elif name.startswith(_LLM):
            base_keys[name[len(_LLM):].replace(".base_layer.", ".")] = key
        elif name.startswith("encoder.graph_encoder."):
            encoder[name] = key
        elif name.startswith(("encoder.", "llm_proj.")):
            projector[name] = key
        elif "position_ids" not in name:  # buffers some versions save; nothing to convert
            raise ck.CheckpointError(f"{source.file_of(key)}: unexpected tensor {key}; is this a Mol-LLaMA checkpoint?")

    wanted = {(layer, module, ab) for layer in range(n_layers) for module in LORA_TARGET_MODULES for ab in "AB"}
    extra, missing = sorted(set(lora_keys) - wanted), sorted(wanted - set(lora_keys))
    if extra:
        layer, module, ab = extra[0]
        raise ck.CheckpointError(f"{src_path}: LoRA on layer {layer} {module} ({lora_keys[extra[0]]}) does not fit "
                                 f"the base ({n_layers} layers, targets {', '.join(LORA_TARGET_MODULES)})")
    if missing:
        layer, module, ab = missing[0]
        raise ck.CheckpointError(f"{src_path}: no LoRA {ab} for layer {layer} {module}; the shared LoRA targets "
                                 f"{', '.join(LORA_TARGET_MODULES)} in every layer")

    lora = {}
    for (layer, module, ab), key in sorted(lora_keys.items()):
        d_out, d_in = base_source.shape(ck.target_key(layer, module))
        rank = source.shape(key)[0 if ab == "A" else -1]
        if rank != LORA_RANK:
            raise ck.CheckpointError(f"{source.file_of(key)}: {key} has rank {rank}; ES-Merging needs the shared "
                                     f"r = {LORA_RANK}")
        shape = (LORA_RANK, d_in) if ab == "A" else (d_out, LORA_RANK)
        peft_key = f"base_model.model.model.layers.{layer}.{ck.TARGET_PARENT[module]}.{module}.lora_{ab}.weight"
        lora[peft_key] = ck.checked(source, key, shape).float()

    added_rows = _check_base_tensors(source, base_keys, base_source, base_path)
    hidden = base_config["hidden_size"]
    proj = {name: ck.checked(source, key, integers=True) for name, key in sorted(projector.items())}
    if "llm_proj.weight" not in proj:
        raise ck.CheckpointError(f"{src_path}: llm_proj.weight is missing; the molecule tokens cannot reach the LLM")
    if proj["llm_proj.weight"].shape[0] != hidden:
        raise ck.CheckpointError(f"{source.file_of(projector['llm_proj.weight'])}: llm_proj.weight maps to "
                                 f"{proj['llm_proj.weight'].shape[0]} dims, but the base's hidden size is {hidden}")
    proj.update({f"vocab.{k}.added_rows": v for k, v in added_rows.items()})
    enc = {name: ck.checked(source, key, integers=True) for name, key in sorted(encoder.items())}

    tie = base_config["tie_word_embeddings"]
    weights_sha256 = ck.base_weights_sha256(base_source, tie)
    base_check = _check_named_base(named, base, base_path, weights_sha256, base_sha256, tie, src_path)
    base_name = str(base)
    qformer = config.get("qformer_config") or {}
    card = {
        "modality": "molecule", "scale": "paper", "converter": {"name": "mol-llama", "version": CONVERTER_VERSION},
        "source": ck.describe(source) | {"model": "DongkiKim/Mol-Llama-3.1-8B-Instruct"},
        "base_name": base_name, "base_path": str(base_path),
        "base_weights_sha256": weights_sha256,
        "base_identity": _identity(base_keys, base_check),
        "base_check": base_check | {"source_model_type": config.get("model_type") or config.get("__class__"),
                                    "source_architectures": config.get("architectures")},
        "integer_buffers": sorted(k for k, v in (proj | enc).items() if not v.is_floating_point()),
        "lora": {"r": LORA_RANK, "lora_alpha": LORA_ALPHA, "target_modules": sorted(LORA_TARGET_MODULES)},
        "projector": None,  # not the cpu-scale MLP: the modality part is described under "encoder"
        "encoder": {"kind": "mol-llama", "n_tokens": int(qformer.get("num_query_tokens", 8)), "token": "<mol>",
                    "projector_tensors": sorted(proj), "encoder_tensors": len(enc),
                    "graph_encoder": "in encoder.safetensors" if enc else
                    "absent (frozen MoleculeSTM and Uni-Mol; load them from their own releases)",
                    # where the encoder then gets them, and their sha256 when they are already in the hub cache
                    "graph_encoder_files": None if enc else graph_files.with_cached_sha256(
                        graph_files.upstream_files(config if isinstance(config, dict) else {})),
                    "config": {k: config.get(k) for k in ("qformer_config", "blending_module_config",
                                                          "graph_encoder_config") if k in config}},
        "vocab": {"base": base_config["vocab_size"],
                  "added_rows": int(next(iter(added_rows.values())).shape[0]) if added_rows else 0},
        "n_tokens": int(qformer.get("num_query_tokens", 8)),
        "steps": None, "batch_size": None, "lr": None, "seed": None,
        "timings": {"wall_s": round(time.perf_counter() - began, 2)},
    }
    recipe = {"converter": "mol-llama", "version": CONVERTER_VERSION, "source": ck.fingerprint(source),
              "base": ck.fingerprint(base_source)}
    with output.staged(out, recipe, force) as stage:
        output.write_parts(stage, lora, base_name, proj, enc)
        return output.finish(stage, card)


def _identity(base_keys: dict, check: dict) -> str:
    if base_keys:
        return "weights compared"
    if check.get("expected_sha256") == "matched":
        return "weights hash equals the expected one (--base-sha256)"
    if len(check.get("named_weights_sha256", "")) == 64:
        return "weights hash equals the named base's"
    return "shapes and config only (no base tensors in the checkpoint)"


def _check_base_tensors(source: ck.TensorSource, base_keys: dict, base_source: ck.TensorSource,
                        base_path: Path) -> dict[str, torch.Tensor]:
    """Refuse base tensors that differ from the base; return the rows a resized vocabulary added."""
    added = {}
    for name, key in sorted(base_keys.items()):
        if name not in base_source:
            raise ck.CheckpointError(f"{source.file_of(key)}: {key} has no counterpart {name} in the base {base_path}")
        tensor, reference = ck.checked(source, key), base_source.get(name)
        if name in _VOCAB_KEYS and tensor.shape[0] > reference.shape[0] and tensor.shape[1:] == reference.shape[1:]:
            added[name] = tensor[reference.shape[0]:].clone()
            tensor = tensor[: reference.shape[0]]
        if tensor.shape != reference.shape:
            raise ck.CheckpointError(f"{source.file_of(key)}: {key} has shape {tuple(tensor.shape)}, the base's {name} "
                                     f"{tuple(reference.shape)}; convert against the base it was trained on")
        if not ck.equal_to_base(tensor, reference):
            diff = (tensor.float() - reference.float()).abs().max().item()
            raise ck.CheckpointError(f"{source.file_of(key)}: {key} differs from the base {base_path} (max |diff| "
                                     f"{diff:.3g}); this checkpoint was trained on another base: pass it (--base)")
    return added
