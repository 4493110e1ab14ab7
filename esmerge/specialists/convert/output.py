"""Writing a converted specialist directory atomically, and resuming an interrupted conversion.

A conversion writes into a hidden temporary sibling ``.<name>.partial/`` of the output, holding
a lock on the output while it works (``cache.key_lock``: a second converter waits). The sibling
keeps ``recipe.json`` (what is being converted, against which base) and whatever finished pieces
the converter stores there (SVD factors, layer by layer). A rerun with the same recipe picks them
up; a different recipe starts the sibling afresh. Every tensor is checked finite before it is
written; when everything is written, ``card.json`` goes in last (recording ``"esmerge_output":
"converted-specialist"``) and ``esmerge.outputs.publish`` moves the sibling onto the output, so a
directory at the output path is always complete: nothing half-written can look finished.
``force`` replaces only an earlier converted specialist that is neither the source checkpoint
nor the base (nor holds them); anything else at the output path is refused in one line.

The finished directory is the project's specialist format (``load.save_specialist``):
``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT, the shared ``base_llm.lora_config``),
``projector.safetensors`` (the trained bridge from the modality encoder into the LLM), optionally
``encoder.safetensors`` (the modality encoder's own weights, when the checkpoint carries them)
and ``card.json``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esmerge import outputs
from esmerge.cache import atomic_write_json, key_lock
from esmerge.specialists.adapters import Adapter, save_adapter
from esmerge.specialists.base_llm import LORA_RANK, lora_config

RECIPE_FILE = "recipe.json"


@dataclass
class Stage:
    """The temporary sibling a conversion writes into; ``resumed`` when an earlier run's pieces are reused."""

    out: Path
    dir: Path
    resumed: bool
    force: bool = False
    inputs: list = field(default_factory=list)


def staging_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def recipe_inputs(recipe: dict) -> list[Path]:
    """The local paths a conversion reads, as its recipe records them (``source`` and ``base`` fingerprints)."""
    return [Path(v["path"]) for v in recipe.values() if isinstance(v, dict) and isinstance(v.get("path"), str)]


def refuse_existing(out: Path, force: bool, inputs=()) -> None:
    """Refuse a finished output (unless ``force``), an input, and anything that is not a converted specialist."""
    outputs.recover(out)
    outputs.check_replaceable(out, outputs.CONVERTED, force, inputs)


class _Locked:
    """Context manager: lock ``out``, refuse what must not be overwritten, open (or reopen) the sibling."""

    def __init__(self, out: Path, recipe: dict, force: bool, inputs=()):
        self.out, self.recipe, self.force = Path(out), json.loads(json.dumps(recipe, default=str)), force
        self.inputs = [*inputs, *recipe_inputs(self.recipe)]
        self._lock = key_lock(self.out)

    def __enter__(self) -> Stage:
        self._lock.__enter__()
        try:
            refuse_existing(self.out, self.force, self.inputs)
            folder = staging_dir(self.out)
            recipe_file = folder / RECIPE_FILE
            resumed = recipe_file.exists() and json.loads(recipe_file.read_text()) == self.recipe
            if folder.exists() and not resumed:
                shutil.rmtree(folder)
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(recipe_file, self.recipe)
            return Stage(self.out, folder, resumed, self.force, self.inputs)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)


def staged(out: str | Path, recipe: dict, force: bool = False, inputs=()) -> _Locked:
    """``with staged(out, recipe, force) as stage:`` write into ``stage.dir``, then ``finish(stage, card)``.

    ``inputs``: paths the conversion reads besides those in ``recipe`` (never replaced by ``force``).
    """
    return _Locked(Path(out), recipe, force, inputs)


def adapter_config(base_name: str, rank: int = LORA_RANK) -> dict:
    """The PEFT config every specialist shares (``base_llm.lora_config``), as ``adapter_config.json`` holds it."""
    config = lora_config(r=rank).to_dict()
    config["base_model_name_or_path"] = base_name
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return json.loads(json.dumps(config, default=str))


def write_parts(stage: Stage, lora: dict[str, torch.Tensor], base_name: str,
                projector: dict[str, torch.Tensor] | None = None,
                encoder: dict[str, torch.Tensor] | None = None, rank: int = LORA_RANK) -> None:
    """The adapter, projector and encoder files of the specialist (everything but the card)."""
    from safetensors.torch import save_file

    cause = "the checkpoint or the base holds extreme values, or the factorisation failed; check both"
    for what, tensors in (("LoRA", lora), ("projector", projector), ("encoder", encoder)):
        outputs.check_finite(tensors or {}, f"converting into {stage.out}: {what}", cause)
    save_adapter(Adapter({k: v.float().contiguous() for k, v in lora.items()}, adapter_config(base_name, rank)),
                 stage.dir)
    for name, tensors in (("projector.safetensors", projector), ("encoder.safetensors", encoder)):
        if tensors:
            save_file({k: v.contiguous() for k, v in tensors.items()}, stage.dir / name)


def finish(stage: Stage, card: dict, scratch: tuple[str, ...] = ()) -> Path:
    """Write ``card.json`` last, drop the recipe and ``scratch`` folders, and publish the sibling onto the output."""
    for name in scratch:
        shutil.rmtree(stage.dir / name, ignore_errors=True)
    (stage.dir / RECIPE_FILE).unlink(missing_ok=True)
    atomic_write_json(stage.dir / "card.json", dict(card, **{outputs.KIND_KEY: outputs.CONVERTED.name}), indent=1)
    return outputs.publish(stage.dir, stage.out, outputs.CONVERTED, stage.force, stage.inputs)
