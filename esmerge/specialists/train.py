"""The trainer of one specialist: AdamW on its LoRA and projector, with resumable checkpoints.

The learning rate warms up linearly over 5% of the steps, then decays by a cosine to a tenth
(``lr_at``); step s sees the examples ``batch_indices(s, ...)``, epochs of seeded permutations,
so a resumed run sees the same batches as an uninterrupted one without a data-loader state.

A checkpoint folder holds ``tensors-<step>.safetensors`` (LoRA, projector, optimizer moments) and
``state.json`` (recipe, step, losses, elapsed time, and the name and sha256 of its tensors file).
The tensors are written first under a new name and ``state.json`` is replaced last, so a stop at
any write leaves the old checkpoint or the new one, never a mix; nothing is unpickled.
"""
from __future__ import annotations

import copy
import json
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as tensors_from_bytes
from safetensors.torch import save as tensors_to_bytes

from esmerge import outputs
from esmerge.cache import content_key, file_sha256
from esmerge.progress import track
from esmerge.specialists import adapters as adapter_io
from esmerge.specialists import encoders
from esmerge.specialists.adapters import Adapter, adapter_from_model
from esmerge.specialists.base_llm import BaseModel, lora_config
from esmerge.specialists.captions import N_TOKENS, Example, SpecialistError, answer_nll, collate_examples

STATE_FILE = "state.json"
LEGACY_STATE = "state.pt"  # the pickled checkpoints of earlier versions: refused, never loaded
DESCRIPTION = {"lr_schedule": "5% linear warm-up, cosine to 0.1*lr",
               "optimizer": "AdamW (weight_decay 0, grad-norm clip 1.0)"}


def check_settings(*, steps=None, batch_size=None, lr=None, projector_lr_scale=None, checkpoint_every=None,
                   seed=None) -> None:
    """Refuse a training setting that cannot train, in one line naming it (``None``: not given, the recipe's).

    Checked before the base loads (``esmerge train``) and again by ``train_lora``. ``lr`` is finite,
    > 0 and <= ``LR_MAX`` (why: ``esmerge.methods.hparams``): ``lr <= 0`` alone let NaN and Inf
    through, and ``lr = 1e30`` trains a NaN specialist. The projector's rate ``lr * projector_lr_scale``
    obeys the same bound; a scale of 0 freezes the projector.

    >>> check_settings(lr=float("nan"))
    Traceback (most recent call last):
    ...
    esmerge.errors.UsageError: --lr must be a finite number in (0, 10], got nan
    """
    from esmerge.errors import LR_MAX, UsageError, check_seed

    for flag, value in (("--steps", steps), ("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UsageError(f"{flag} must be an integer >= 1, got {value!r}")
    if lr is not None and not (math.isfinite(lr) and 0 < lr <= LR_MAX):
        raise UsageError(f"--lr must be a finite number in (0, {LR_MAX:g}], got {lr!r}")
    if projector_lr_scale is not None:
        top = LR_MAX / lr if lr else LR_MAX
        if not (math.isfinite(projector_lr_scale) and 0 <= projector_lr_scale * (lr or 1) <= LR_MAX):
            raise UsageError(f"--projector-lr-scale must be a finite number in [0, {top:g}] (the projector's lr, "
                             f"lr x scale, at most {LR_MAX:g}), got {projector_lr_scale!r}")
    check_seed(seed)


@dataclass
class Trained:
    """What a finished run produced: the LoRA, the projector (``None`` for cells) and its record."""

    adapter: Adapter
    projector: encoders.Projector | None
    recipe: dict
    losses: list[float]
    wall_s: float
    resumed_from: int | None


def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of ``lr``.

    >>> [round(lr_at(s, 100, 1.0), 3) for s in (0, 4, 100)]
    [0.2, 1.0, 0.1]
    """
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of ``step``: epochs of seeded permutations of ``range(n)``.

    >>> sorted(batch_indices(0, 2, 4, 0) + batch_indices(1, 2, 4, 0))
    [0, 1, 2, 3]
    """
    out = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = order[offset: offset + batch_size - len(out)]
        out.extend(take)
        position += len(take)
    return out


# --------------------------------------------------------------------------- checkpoints
def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a unique temporary sibling (through ``adapters.write_file``, the writer tests
    inject faults into) and rename it onto ``path``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        adapter_io.write_file(tmp, data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], state: dict) -> None:
    """Write one checkpoint: ``tensors`` under a new name, then ``state.json`` (the marker) naming it.

    Tensors with NaN/Inf are refused (``InputError``): a diverged run stops at its last good checkpoint.
    """
    lr = (state.get("recipe") or {}).get("lr")
    outputs.check_finite(tensors, f"checkpoint {folder} at step {state['step']}",
                         f"training diverged (lr {lr}); lower --lr, then resume or pass --no-resume")
    folder.mkdir(parents=True, exist_ok=True)
    name = f"tensors-{state['step']:06d}.safetensors"
    _replace_file(folder / name, tensors_to_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))
    record = dict(state, tensors=name, tensors_sha256=file_sha256(folder / name))
    _replace_file(folder / STATE_FILE, json.dumps(record, sort_keys=True).encode())
    for stale in folder.glob("tensors-*.safetensors"):  # the previous checkpoint's, now unreferenced
        if stale.name != name:
            stale.unlink(missing_ok=True)


def load_checkpoint(folder: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """``(state, tensors)`` of the checkpoint in ``folder``, or ``None`` if there is none.

    Only JSON and safetensors are read. A pickled ``state.pt`` (earlier versions, or planted) is
    refused without being opened, as is a ``state.json`` whose tensors file is missing or altered.
    """
    folder = Path(folder)
    refuse = "is not a checkpoint this trainer wrote ({}); delete it or pass --no-resume to start over"
    if (folder / LEGACY_STATE).exists():
        raise SpecialistError(f"{folder / LEGACY_STATE} " + refuse.format("a pickle, which is never loaded"))
    if not (folder / STATE_FILE).exists():
        return None
    try:
        state = json.loads((folder / STATE_FILE).read_text())
        tensors_file = folder / state["tensors"]
        if file_sha256(tensors_file) != state["tensors_sha256"]:
            raise ValueError("tensors file sha256 differs")
        tensors = tensors_from_bytes(tensors_file.read_bytes())
        if not {"recipe", "step", "losses", "elapsed_s"} <= set(state):
            raise KeyError("missing keys")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise SpecialistError(f"{folder / STATE_FILE} " + refuse.format(f"{type(err).__name__}: {err}")) from None
    return state, tensors


def clear_checkpoint(folder: Path) -> None:
    for file in (*Path(folder).glob("tensors-*.safetensors"), Path(folder) / STATE_FILE, Path(folder) / LEGACY_STATE):
        file.unlink(missing_ok=True)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {f"optimizer.{i}.{name}": value for i, moments in optimizer.state_dict()["state"].items()
            for name, value in moments.items()}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    # The param groups (lr, betas, ...) are the fresh optimizer's: the recipe check guarantees they
    # match, and the lr is set before every step anyway.
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


# --------------------------------------------------------------------------- the loop
def train_lora(base: BaseModel, modality: str, examples: list[Example], checkpoint_dir: Path, *, steps: int,
               batch_size: int, lr: float, seed: int, max_tokens: int = 128, resume: bool = True,
               checkpoint_every: int = 25, bf16: bool = False, stop_after: int | None = None,
               projector_lr_scale: float = 1.0, progress: bool = True) -> Trained | None:
    """Train a LoRA (``base_llm.lora_config``) and, except for cells, a projector on ``examples``.

    The base is not modified (training works on a copy, on the base's device). Every
    ``checkpoint_every`` steps, and at the end, the state goes to ``checkpoint_dir``; with
    ``resume`` a run continues from a checkpoint there (same recipe required) and reaches
    bit-identical weights. ``bf16`` autocasts the forward pass (weights and optimizer stay as
    loaded). ``stop_after`` stops as if interrupted after that many steps (returns ``None``).
    ``projector_lr_scale`` multiplies the projector's learning rate (the LoRA keeps ``lr``): a slow
    projector keeps its tokens where the base reads them as ordinary tokens (``scales.TrainRecipe``).
    """
    check_settings(steps=steps, batch_size=batch_size, lr=lr, projector_lr_scale=projector_lr_scale,
                   checkpoint_every=checkpoint_every, seed=seed)
    if not examples:
        raise SpecialistError(f"no {modality} training examples")
    embedding_device = base.model.get_input_embeddings().weight.device
    recipe = {"modality": modality, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "max_tokens": max_tokens, "n_tokens": N_TOKENS, "bf16": bf16, "base": base.weights_sha256,
              # only when set, so checkpoints written before the option existed still resume
              **({"projector_lr_scale": projector_lr_scale} if projector_lr_scale != 1.0 else {}),
              # likewise the device, off the CPU: a checkpoint resumes bit-identically only where it was made
              **({"device": embedding_device.type} if embedding_device.type != "cpu" else {}),
              "examples": content_key([(e.uid, e.instruction, e.answer, e.raw) for e in examples])}

    from peft import get_peft_model  # peft is only needed to train

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base.model), lora_config())
    embedding = base.model.get_input_embeddings()
    projector = None
    if modality != "cell":
        projector = encoders.make_projector(modality, embedding, N_TOKENS, seed).to(embedding.weight.device)
    lora_params = [p for p in model.parameters() if p.requires_grad]
    projector_params = list(projector.parameters()) if projector else []
    params = lora_params + projector_params
    groups = [{"params": lora_params, "lr_scale": 1.0}]
    if projector_params:
        groups.append({"params": projector_params, "lr_scale": projector_lr_scale})
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)

    checkpoint_dir = Path(checkpoint_dir)
    start, losses, elapsed, resumed_from = 0, [], 0.0, None
    if not resume:
        clear_checkpoint(checkpoint_dir)
    found = load_checkpoint(checkpoint_dir)
    if found is not None:
        state, tensors = found
        if state["recipe"] != recipe:
            changed = sorted(k for k in recipe if state["recipe"].get(k) != recipe[k])
            raise SpecialistError(f"{checkpoint_dir / STATE_FILE} was made with a different recipe "
                                  f"({', '.join(changed)}); "
                                  "delete it or pass resume=False (--no-resume) to start over")
        adapter_io.load_lora_state(model, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        if projector is not None:
            projector.load_state_dict({k[10:]: v for k, v in tensors.items() if k.startswith("projector.")})
        _restore_optimizer(optimizer, tensors)
        start, losses, elapsed = state["step"], state["losses"], state["elapsed_s"]
        resumed_from = start
        print(f"[{modality}] resuming from step {start} of {steps} ({checkpoint_dir})")

    def checkpoint(step: int, spent: float) -> None:
        tensors = {f"lora.{k}": v for k, v in adapter_from_model(model).state.items()}
        tensors |= {f"projector.{k}": v for k, v in (projector.state_dict() if projector else {}).items()}
        save_checkpoint(checkpoint_dir, tensors | _optimizer_tensors(optimizer),
                        {"recipe": recipe, "step": step, "losses": losses, "elapsed_s": spent})

    device = embedding.weight.device
    model.train()
    began = time.perf_counter()
    bar = track(total=steps, desc=f"train {modality}", unit="step", initial=start, disable=not progress)
    for step in range(start, steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr) * group["lr_scale"]
        batch = collate_examples(base.tokenizer,
                                 [examples[i] for i in batch_indices(step, batch_size, len(examples), seed)],
                                 max_tokens)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            nll, n = answer_nll(model, projector, batch, modality)
        loss = nll / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.update()
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == steps or done == stop_after:
            checkpoint(done, elapsed + time.perf_counter() - began)
        if stop_after is not None and done >= stop_after and done < steps:
            bar.close()
            print(f"[{modality}] stopped after step {done} (checkpoint {checkpoint_dir})")
            return None
    bar.close()
    wall = elapsed + time.perf_counter() - began
    print(f"[{modality}] {steps} steps in {wall:.1f} s ({wall / steps:.2f} s/step), "
          f"loss {mean(losses[:10]):.3f} -> {mean(losses[-10:]):.3f}")
    adapter = adapter_from_model(model, name=f"{modality}-specialist")
    return Trained(adapter, projector.eval() if projector else None, recipe, losses, wall, resumed_from)


def mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
