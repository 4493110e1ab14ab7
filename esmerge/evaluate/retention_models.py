"""The models retention is measured on and their per-example answer NLLs (the model side of
``esmerge.evaluate.retention``).

``retention_models`` names the models (the base, each specialist, every merged model a merging run
wrote); ``score_models`` computes each one's summed answer NLL per held-out example of every
specialist's task, one JSON cache entry per (model, modality) under ``cache_dir()/retention``, so
an interrupted run resumes. ``esmerge.evaluate.retention`` turns these NLLs into retained fractions.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from esmerge.cache import atomic_write_json, cache_dir, content_key, key_lock, keyed_on_device, tensor_digest
from esmerge.evaluate.models import PeftCopies
from esmerge.methods.emr import emr_task_adapter
from esmerge.paths import MERGE_ROOT_EXTRAS
from esmerge.progress import track
from esmerge.scales import TrainRecipe
from esmerge.specialists.adapters import Adapter, is_merged, load_merged
from esmerge.specialists.base_llm import state_dict_sha256
from esmerge.specialists.captions import Example, answer_nll_per_example, collate_examples

CODE_VERSION = 1  # bump when a change alters what an NLL cache entry holds


@dataclass
class RetentionModel:
    """A model scored for retention: the base plus the LoRA adapter it uses on each modality (None: none).

    A merged model uses one adapter everywhere; EMR uses its task-specific modulation for the
    specialist's task (EMR Eq. 7, ``emr_task_adapter``).
    """

    name: str
    adapter_for: Callable[[str], Adapter | None]


def retention_models(specialists: dict, merge_root: Path | None = None, avg_ft_benchmarks: list[str] | None = None,
                     extra: dict[str, Adapter] | None = None) -> tuple[dict[str, RetentionModel], list[str]]:
    """The base, each specialist, every merged model under ``merge_root`` and ``extra`` (name -> adapter).

    ``merge_root`` holds one folder per method as ``06_merging`` writes them (read with
    ``adapters.load_merged``); a folder of per-benchmark adapters (Avg. Merging + FT) contributes
    ``<method>/<benchmark>`` for each of ``avg_ft_benchmarks`` it has (each is a different model,
    fine-tuned on one benchmark). Returns ``(models, notes)``: one note per folder not used.
    """
    models = {"base": RetentionModel("base", lambda m: None)}
    for m, s in specialists.items():
        models[f"specialist-{m}"] = RetentionModel(f"specialist-{m}", lambda _, a=s.adapter: a)
    notes = []
    subs = sorted(p for p in Path(merge_root).iterdir()
                  if p.is_dir() and p.name not in MERGE_ROOT_EXTRAS) if merge_root else []
    for sub in subs:
        if is_merged(sub):
            adapter = load_merged(sub, name=sub.name).adapter
            if sub.name == "emr":
                models["emr"] = RetentionModel("emr", lambda m, a=adapter: emr_task_adapter(a, m))
            else:
                models[sub.name] = RetentionModel(sub.name, lambda _, a=adapter: a)
            continue
        inside = sorted(p.name for p in sub.iterdir() if p.is_dir() and is_merged(p))
        if not inside:
            notes.append(f"skipping {sub}: not a merged model")
            continue
        wanted = [b for b in (avg_ft_benchmarks or []) if b in inside]
        for b in wanted:
            adapter = load_merged(sub / b, name=f"{sub.name}/{b}").adapter
            models[f"{sub.name}/{b}"] = RetentionModel(f"{sub.name}/{b}", lambda _, a=adapter: a)
        notes.append(f"{sub.name}: {len(inside)} per-benchmark adapters; scored {', '.join(wanted) or 'none'} "
                     f"(avg_ft_benchmarks)")
    for name, adapter in (extra or {}).items():
        models[name] = RetentionModel(name, lambda _, a=adapter: a)
    return models, notes


@torch.no_grad()
def example_nlls(model, tokenizer, projector, examples: list[Example], max_tokens: int,
                 batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Per-example summed answer NLL ``[n]`` and answer-token counts ``[n]`` of ``model`` on ``examples``.

    Batches group examples of similar length (less padding, the same NLLs up to float rounding);
    the outputs are in the order of ``examples``.
    """
    was_training = model.training
    model.eval()
    lengths = [len(ex.instruction) + len(ex.answer) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    nll, tokens = np.zeros(len(examples)), np.zeros(len(examples), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = collate_examples(tokenizer, [examples[i] for i in rows], max_tokens)
        s, t = answer_nll_per_example(model, projector, batch, examples[0].modality)
        nll[rows], tokens[rows] = s.numpy(), t.numpy()
    model.train(was_training)
    return nll, tokens


def examples_digest(examples: list[Example]) -> str:
    """Content hash of the examples (uid, prompt, answer, raw input), order included."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(repr((ex.modality, ex.uid, ex.instruction, ex.answer, ex.raw)).encode())
    return h.hexdigest()[:16]


def score_models(models: dict[str, RetentionModel], base, specialists: dict, examples: dict[str, list[Example]],
                 recipe: TrainRecipe, batch_size: int = 8, cache: Path | None = None, progress: bool = True):
    """Per-example NLLs of every model on every modality's examples, cached on disk.

    Modality m's inputs go through specialist m's projector for every model (cells need none),
    as in ``heldout.cross_loss_table``, so models differ only by their LoRA. Each (model,
    modality) entry is one JSON file under ``cache`` (default ``cache_dir()/retention``) keyed by
    the base weights and dtype, the adapter, the projector, the examples and the settings; an
    interrupted run resumes at the next entry.

    Sequences are cut at ``recipe.max_tokens_for(modality)`` (the scale's ``ScaleConfig.train``).
    Returns ``(nlls, tokens)``: ``nlls[modality][model]`` ``[n]`` arrays, ``tokens[modality]`` ``[n]``.
    """
    cache = Path(cache or cache_dir() / "retention")
    base_id = keyed_on_device(base.weights_sha256 or state_dict_sha256(base.model), base.model)
    dtype = str(next(base.model.parameters()).dtype)
    copies = PeftCopies()
    nlls, tokens = {m: {} for m in examples}, {}
    cells = [(k, m) for m in examples for k in models]
    for name, m in track(cells, desc="retention NLLs", unit="model x modality", disable=not progress):
        projector = getattr(specialists[m], "projector", None) if m in specialists else None
        adapter = models[name].adapter_for(m)
        max_tokens = recipe.max_tokens_for(m)
        key = content_key(base_id, dtype, tensor_digest(adapter.state) if adapter is not None else "no-adapter",
                          tensor_digest(projector.state_dict()) if projector is not None else "no-projector",
                          examples_digest(examples[m]), max_tokens, batch_size, CODE_VERSION)
        path = cache / f"{m}-{key}.json"
        with key_lock(path):
            if not path.exists():
                model = base.model if adapter is None else copies.load(base, adapter)
                s, t = example_nlls(model, base.tokenizer, projector, examples[m], max_tokens, batch_size)
                atomic_write_json(path, {"model": name, "modality": m, "nll": s.tolist(), "tokens": t.tolist(),
                                         "uids": [ex.uid for ex in examples[m]]})
        entry = json.loads(path.read_text())
        nlls[m][name] = np.asarray(entry["nll"], dtype=float)
        t = np.asarray(entry["tokens"], dtype=int)
        if m in tokens and not np.array_equal(tokens[m], t):
            raise ValueError(f"{name} on {m}: answer-token counts differ from the other models' ({path})")
        tokens[m] = t
    return nlls, tokens
