"""The three modality specialists: frozen base LLM + modality projector + LoRA (paper §3, §5.1).

ES-Merging merges MLLMs that share one base LLM and one LoRA configuration. The paper's
specialists (Mol-LLaMA, Prot2Text-V2, Cell-o1 on LLaMA-3.1-8B) cannot be run here, so at
``cpu`` scale we train our own three on SmolLM2-135M-Instruct, each in minutes on a CPU, on the
caption task of ``esmerge.specialists.captions`` with the trainer of ``esmerge.specialists.train``. Only the LoRA
(``base_llm.lora_config``, identical for all three so that they merge element-wise, Eq. 1) and the
projector are trained.

A specialist on disk is a standard PEFT adapter directory plus ``projector.safetensors`` and
``card.json`` (data, exclusions, steps, loss curve, seed, base weights hash, timings). Its tensors
are checked finite, it is written whole into a temporary sibling, ``card.json`` last (recording
``"esmerge_output": "specialist"``), and published by ``esmerge.outputs.publish`` while the
trainer holds ``cache.key_lock`` on it; ``force`` replaces only an earlier trained specialist
(never a merge, a converted specialist or a folder of other files). Which three each scale
merges (the shipped ``cpu`` sets checked against their sha256) is ``esmerge.specialists.per_scale``.
"""
from __future__ import annotations

import copy
import json
import os
import platform
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save as tensors_to_bytes

from esmerge import outputs
from esmerge.cache import key_lock
from esmerge.errors import InputError, UsageError
from esmerge.paths import REPO_ROOT
from esmerge.scales import ScaleConfig
from esmerge.specialists import adapters as adapter_io
from esmerge.specialists import encoders
from esmerge.specialists.adapters import Adapter, load_adapter, read_tensors, save_adapter
from esmerge.specialists.base_llm import PAPER_MODEL_ID, BaseModel, load_base, lora_config
from esmerge.specialists.captions import (
    INSTRUCTION,
    N_TOKENS,
    Example,
    SpecialistError,
    check_modality,
    load_examples,
)
from esmerge.specialists.raw_encoder import RawEncoder
from esmerge.specialists.train import DESCRIPTION, clear_checkpoint, mean, train_lora

SHIPPED_DIR = REPO_ROOT / "data_manifest" / "specialists"
PAPER_BASE_ENV = "ESMERGE_PAPER_BASE"
CHECKPOINT = "checkpoint"  # the resumable state of a run in progress, inside its output folder


@dataclass
class Specialist:
    modality: str  # "molecule" | "protein" | "cell"
    adapter: Adapter
    projector: encoders.Projector | RawEncoder | None  # None for cell; a RawEncoder at paper scale
    card: dict  # data, steps, loss curve, seed, base weights hash, timings, exclusions
    path: Path | None = None  # the folder it was read from (a merged model names paper-scale encoders by it)


# --------------------------------------------------------------------------- the directory
class CardError(SpecialistError, InputError):
    """A ``card.json`` that is not UTF-8 JSON holding an object."""


def is_finished(out_dir) -> bool:
    """True when ``out_dir`` holds a card and adapter weights (after repairing a killed replacement)."""
    outputs.recover(out_dir)
    return (Path(out_dir) / "card.json").exists() and (Path(out_dir) / "adapter_model.safetensors").exists()


def read_card(folder) -> dict:
    """``folder/card.json`` as a dict; a one-line ``CardError`` naming the file when it is not readable JSON."""
    file = Path(folder) / "card.json"
    try:
        card = json.loads(file.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise CardError(f"{file}: not UTF-8 text (byte {err.start}); restore or retrain this specialist") from None
    except json.JSONDecodeError as err:
        raise CardError(f"{file}: malformed JSON ({err.msg}, line {err.lineno}); "
                        "restore or retrain this specialist") from None
    except OSError as err:
        raise CardError(f"{file}: cannot be read ({err.strerror}); restore or retrain this specialist") from None
    if not isinstance(card, dict):
        raise CardError(f"{file}: holds no card object; restore or retrain this specialist")
    return card


def _projector_spec(projector) -> dict | None:
    if projector is None:
        return None
    return {"in_features": projector.net[0].in_features, "width": projector.net[0].out_features,
            "hidden_size": projector.hidden_size, "n_tokens": projector.n_tokens,
            "embed_scale": float(projector.embed_scale)}


def _only_checkpoint(out: Path) -> bool:
    """A folder holding nothing but a run's checkpoint: the trainer's own unfinished state."""
    return {p.name for p in out.iterdir()} <= {CHECKPOINT}


def _check_replaceable(out: Path, force: bool) -> None:
    """Refuse an output that is finished (without ``force``), or anything but a specialist or a run's checkpoint."""
    outputs.recover(out)
    outputs.check_replaceable(out, outputs.SPECIALIST, force, in_progress=_only_checkpoint)


def _publish(spec: Specialist, out: Path, force: bool) -> Path:
    """Write ``spec`` into a temporary sibling of ``out`` (``card.json`` last) and publish it (``outputs``)."""
    _check_replaceable(out, force)
    projector = ({k: v.detach().contiguous().cpu() for k, v in spec.projector.state_dict().items()}
                 if spec.projector is not None else None)
    cause = f"training diverged (lr {spec.card.get('lr')}); lower --lr or check the training data"
    outputs.check_finite(spec.adapter.state, f"specialist {out}", cause)
    outputs.check_finite(projector or {}, f"specialist {out}: projector", cause)
    with outputs.staging(out) as staging:
        save_adapter(spec.adapter, staging)
        if projector is not None:
            adapter_io.write_file(staging / "projector.safetensors", tensors_to_bytes(projector))
        card = dict(spec.card, projector=_projector_spec(spec.projector), **{outputs.KIND_KEY: outputs.SPECIALIST.name})
        text = json.dumps(card, indent=1, sort_keys=True, default=str) + "\n"
        adapter_io.write_file(staging / "card.json", text.encode())  # the completion marker, last
        # ``out`` may hold this run's checkpoint (replaced without force) or, with force, the old one
        return outputs.publish(staging, out, outputs.SPECIALIST, force, in_progress=_only_checkpoint)


def save_specialist(spec: Specialist, out_dir, force: bool = False) -> Path:
    """Write ``out_dir``: PEFT adapter files + ``projector.safetensors`` (not for cells) + ``card.json``.

    Written whole in a temporary sibling and renamed into place, so a directory with a card is
    complete; an existing finished specialist is replaced only with ``force``.
    """
    out = Path(out_dir)
    with key_lock(out):
        return _publish(spec, out, force)


def load_specialist(path, base: BaseModel) -> Specialist:
    """Read a specialist directory written by ``save_specialist`` for ``base``.

    Raises ``SpecialistError`` if it is incomplete or was trained on different base weights.
    """
    path = Path(path)
    if not is_finished(path):  # repairs a killed replacement first
        raise SpecialistError(f"{path} is not a finished specialist (no card.json); train it with `esmerge train`")
    card = read_card(path)
    if not isinstance(card.get("modality"), str):
        raise CardError(f"{path / 'card.json'}: names no modality; restore or retrain this specialist")
    if base.weights_sha256 and card.get("base_weights_sha256") not in (None, base.weights_sha256):
        raise SpecialistError(f"{path} was trained on base weights {card['base_weights_sha256'][:12]}..., "
                              f"but the given base ({base.name}) has {base.weights_sha256[:12]}...")
    adapter = load_adapter(path, name=f"{card['modality']}-specialist")
    projector = None
    if card.get("encoder"):  # a converted paper-scale specialist: its own modality encoder
        tensors = {f: read_tensors(path / f) if (path / f).exists() else {}
                   for f in ("projector.safetensors", "encoder.safetensors")}
        projector = encoders.build_encoder(card["encoder"], tensors["projector.safetensors"],
                                           tensors["encoder.safetensors"], path)
        projector.to(base.model.get_input_embeddings().weight.device)
    elif card.get("projector"):
        p = card["projector"]
        projector = encoders.Projector(p["in_features"], p["hidden_size"], p["n_tokens"], p["width"], p["embed_scale"])
        projector.load_state_dict(read_tensors(path / "projector.safetensors"))
        projector.eval()
    return Specialist(card["modality"], adapter, projector, card, path)


def attach_specialist(base: BaseModel, spec_or_adapter, adapter_name: str = "default"):
    """A ``PeftModel``: a *copy* of the base LLM with the specialist's (or adapter's) LoRA, in eval mode.

    The base is deep-copied because PEFT injects LoRA layers into the module it wraps; this
    leaves ``base.model`` usable as the plain base. Feed it ``inputs_embeds`` from
    ``captions.input_embeddings`` (or the probe's) like any causal LM.
    """
    adapter = spec_or_adapter.adapter if isinstance(spec_or_adapter, Specialist) else spec_or_adapter
    if not isinstance(adapter, Adapter):
        raise SpecialistError("attach_specialist needs a Specialist or an Adapter, "
                              f"got {type(spec_or_adapter).__name__}")
    shared = lora_config()
    for field_name in ("r", "lora_alpha"):
        if adapter.config.get(field_name) != getattr(shared, field_name):
            raise SpecialistError(f"adapter has {field_name}={adapter.config.get(field_name)!r}, the shared LoRA "
                                  f"config has {getattr(shared, field_name)!r} (models.lora_config)")
    model = adapter_io.attach(copy.deepcopy(base.model), {adapter_name: adapter})
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- training into a directory
def train_specialist(base: BaseModel, modality: str, steps: int, batch_size: int, lr: float, seed: int,
                     out_dir, max_tokens: int = 128, resume: bool = True, *, force: bool = False,
                     examples: list[Example] | None = None, data_info: dict | None = None,
                     checkpoint_every: int = 25, bf16: bool = False, cell_top_k: int | None = None,
                     stop_after: int | None = None, projector_lr_scale: float = 1.0,
                     progress: bool = True, config: ScaleConfig | None = None) -> Specialist | None:
    """Train one specialist (``train.train_lora``) and save it to ``out_dir``, at any scale.

    ``out_dir/checkpoint`` holds the resumable state while it runs (``resume``: continue from
    it, same recipe required). ``force`` replaces a finished specialist (otherwise
    ``OutputExistsError``). A second trainer into the same ``out_dir`` waits for the first and
    then refuses (or, with ``force``, retrains). ``examples, data_info`` default to
    ``load_examples(modality, "train", config, cell_top_k)`` (``config``: the base's scale, needed
    only then); ``stop_after`` stops as if
    interrupted (returns ``None``). Other arguments: ``train.train_lora``.
    """
    check_modality(modality)
    out = Path(out_dir)
    with key_lock(out):
        return _train_into(base, modality, out, dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                                     max_tokens=max_tokens, resume=resume, bf16=bf16,
                                                     checkpoint_every=checkpoint_every, stop_after=stop_after,
                                                     projector_lr_scale=projector_lr_scale, progress=progress),
                           force, examples, data_info, cell_top_k, config)


def _train_into(base, modality, out: Path, settings: dict, force: bool, examples, data_info, cell_top_k,
                config: ScaleConfig | None = None):
    _check_replaceable(out, force)
    if examples is None:
        if config is None:
            raise UsageError("train_specialist: give the training examples or the scale config to load them from")
        examples, data_info = load_examples(modality, "train", config, cell_top_k)
    if force and is_finished(out):
        clear_checkpoint(out / CHECKPOINT)
    trained = train_lora(base, modality, examples, out / CHECKPOINT, **settings)
    if trained is None:
        return None
    adapter, projector, losses, wall, steps = (trained.adapter, trained.projector, trained.losses, trained.wall_s,
                                               settings["steps"])
    info = data_info or {}
    card = {
        "modality": modality, "scale": base.scale, "base_name": base.name, "base_weights_sha256": base.weights_sha256,
        "seed": settings["seed"], "steps": steps, "batch_size": settings["batch_size"], "lr": settings["lr"],
        **DESCRIPTION,
        "max_tokens": settings["max_tokens"], "n_tokens": N_TOKENS if projector else 0,
        "bf16_autocast": settings["bf16"],
        "lora": {"r": adapter.config.get("r"), "lora_alpha": adapter.config.get("lora_alpha"),
                 "target_modules": sorted(adapter.config.get("target_modules") or [])},
        **({"projector_lr_scale": settings["projector_lr_scale"]} if projector else {}),
        "projector": _projector_spec(projector),
        "prompt": {k: v for k, v in INSTRUCTION.items() if k.startswith(modality[:4])},
        "data": {k: v for k, v in info.items() if k not in ("excluded", "training_cells")} | {"n_train": len(examples)},
        "exclusions": info.get("excluded", {}),
        # CCLE names the cell specialist trained on: the probe and benchmarks must not use them.
        "training_cells": info.get("training_cells", []),
        "loss_curve": losses, "loss_first10": mean(losses[:10]), "loss_last10": mean(losses[-10:]),
        "resumed_from_step": trained.resumed_from,
        "timings": {"wall_s": round(wall, 2), "s_per_step": round(wall / steps, 3), "threads": torch.get_num_threads(),
                    "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": platform.machine(), "torch": torch.__version__,
                    "device": str(base.model.get_input_embeddings().weight.device)},
    }
    spec = Specialist(modality, adapter, projector, card)
    _publish(spec, out, force)  # we hold the lock; ``out`` holds our checkpoint or (force) the old one
    return spec


def train_for_scale(config: ScaleConfig, modality: str, out_dir=None, *, base: BaseModel | None = None,
                    device: str | None = None, **overrides) -> Specialist | None:
    """``esmerge train --scale S --modality M``: one specialist with scale ``S``'s recipe (``config.train``).

    Loads the base (``models.load_base(config, device=device)``; at ``paper`` scale ``paper_base()``,
    LLaMA-3.1-8B-Instruct or ``$ESMERGE_PAPER_BASE``, in bf16 on the GPU) unless one is given, and
    trains an r=8 / alpha=32 LoRA (plus projector) into ``out_dir`` (default
    ``data_manifest/specialists/<scale>/<modality>``). ``overrides``: ``steps``, ``batch_size``,
    ``lr``, ``seed``, ``max_tokens`` or any ``train_specialist`` keyword.
    """
    scale, recipe = config.name, config.train
    check_modality(modality)
    settings = recipe.settings_for(modality)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    if base is None:
        extra = {"model_id": paper_base()} if scale == "paper" else {}  # the base merge_command uses too
        base = load_base(config, seed=settings["seed"], device=device, **extra)
    out = Path(out_dir) if out_dir is not None else SHIPPED_DIR / shipped_set(scale, settings["seed"]) / modality
    return train_specialist(base, modality, out_dir=out, config=config, **settings)


# --------------------------------------------------------------------------- shipped set names, the paper base
def shipped_set(scale: str, seed: int = 0) -> str:
    """The name of a shipped set of specialists: its folder under ``data_manifest/specialists`` and
    its section of ``specialists.yaml``. Seed 0 is the scale itself; the seed replicates (trained
    with the same recipes, only the seed changed) are ``<scale>-seed<N>``.

    >>> shipped_set("cpu"), shipped_set("cpu", 2)
    ('cpu', 'cpu-seed2')
    """
    return scale if seed == 0 else f"{scale}-seed{seed}"


def paper_base(base_path: str | None = None) -> str:
    """The ``paper`` base: ``base_path``, else ``$ESMERGE_PAPER_BASE``, else LLaMA-3.1-8B-Instruct's hub id."""
    return str(base_path or os.environ.get(PAPER_BASE_ENV) or PAPER_MODEL_ID)


# --------------------------------------------------------------------------- CLI


def projectors_of(specialists: dict) -> dict:
    """Every specialist's projector (the merged MLLM keeps all encoders), skipping text-only modalities."""
    return {m: s.projector for m, s in specialists.items() if getattr(s, "projector", None) is not None}
