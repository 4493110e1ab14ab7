"""The paper's own scoring: greedy generation, then the label after ``Final answer:`` (App. A.4-A.5).

The paper lets each model answer freely (its Table 9-10 prompts ask for ``Final answer: <label>``)
and reads the label from the reply. A reply with no ``Final answer:`` naming one of the two
labels is *invalid*: it counts as wrong for accuracy and macro-F1 (prediction ``-1``, which
``stats`` scores as a miss for the gold class and a hit for neither) and the invalid-answer rate
is reported beside them. ``esmerge.evaluate.scoring.label_logits`` is the cheaper alternative
(the likelier of the two answers; never invalid). ``scales.EvalDefaults.scoring`` picks one
per scale: ``"loglik"`` at ``smoke``/``cpu``, ``"generate"`` (this module) at ``paper``.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from esmerge.evaluate.prompts import ANSWER_PREFIX, MARK_RE, Prompt
from esmerge.evaluate.scoring import FeatureCache, entity_length
from esmerge.evaluate.stats import accuracy, macro_f1
from esmerge.specialists.base_llm import end_of_turn_id
from esmerge.specialists.raw_encoder import RawEncoder

INVALID = -1
SCORINGS = ("loglik", "generate")
MAX_NEW_TOKENS = 256  # the paper's replies reason for a few sentences before the final answer
_FINAL_ANSWER = re.compile(re.escape(ANSWER_PREFIX) + r"\s*(.*)", re.IGNORECASE)
_DECORATION = "*_`'\"‘’“” .:;!"


def _normalise(text: str) -> str:
    return " ".join(text.strip().strip(_DECORATION).lower().split())


def parse_answer(reply: str, labels: tuple[str, str]) -> int:
    """Class index of the label named after the reply's last ``Final answer:``, or ``INVALID`` (-1).

    Markdown emphasis, quotes and a closing full stop are ignored, as is case; the answer must
    be one of the two labels (a label followed by more words counts when the words follow a
    word boundary, e.g. ``Interacts, because ...``; the longest matching label wins; an answer that
    goes on to name a label again is ambiguous, hence invalid).

    >>> labels = ("Does not interact", "Interacts")
    >>> parse_answer("... so it binds. Final answer: Interacts.", labels)
    1
    >>> parse_answer("Final answer: **does not interact**", labels)
    0
    >>> parse_answer("Final answer: Interacts\\nFinal answer: Does not interact", labels)
    0
    >>> parse_answer("It probably interacts.", labels), parse_answer("Final answer: maybe", labels)
    (-1, -1)
    """
    found = _FINAL_ANSWER.findall(reply)
    if not found:
        return INVALID
    answer = _normalise(found[-1].splitlines()[0] if found[-1] else "")
    names = [_normalise(label) for label in labels]
    best, best_len = INVALID, -1
    for index, name in enumerate(names):
        if answer == name or (answer.startswith(name) and not answer[len(name)].isalnum()):
            if len(name) > best_len:
                best, best_len = index, len(name)
    rest = answer[best_len:] if best != INVALID else ""
    if any(re.search(rf"\b{re.escape(name)}\b", rest) for name in names):
        return INVALID  # names both labels ("Substrate or not a substrate"): no answer
    return best


def score_replies(replies: list[str], labels: tuple[str, str], y) -> dict:
    """Predictions, accuracy, macro-F1 (percent) and the invalid-answer rate of free replies.

    >>> r = score_replies(["Final answer: Yes", "Final answer: No", "no idea"], ("No", "Yes"), [1, 1, 0])
    >>> r["pred"], round(r["accuracy"], 1), round(r["invalid_rate"], 1)
    ([1, 0, -1], 33.3, 33.3)
    """
    pred = np.asarray([parse_answer(text, labels) for text in replies], dtype=int)
    y = np.asarray(y, dtype=int)
    return {"pred": pred.tolist(), "accuracy": float(accuracy(y, pred)), "macro_f1": float(macro_f1(y, pred)),
            "invalid_rate": 100.0 * float((pred == INVALID).mean()) if len(pred) else 0.0,
            "n_invalid": int((pred == INVALID).sum())}


def generation_inputs(model: nn.Module, prompts: list[Prompt], tokenizer, projectors: dict, n_tokens: int | None = 8,
                      features: FeatureCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_embeds [B, L, d], attention_mask [B, L])`` of prompts that end at the assistant turn.

    The prompt is the one log-likelihood scoring reads (``scoring.prompt_token_ids``) without the
    ``Final answer:`` tokens it appends: a free reply starts before them. Rows are left-padded.
    Each entity gets as many placeholder slots as its encoder emits for it (``scoring.entity_length``):
    ``n_tokens`` through a ``Projector`` (its own when None), ``RawEncoder.block_length`` at paper
    scale (a protein: length + 2), and its
    block is written there (featurised through ``features`` for a ``Projector``, raw otherwise).
    """
    if len({p.labels for p in prompts}) != 1:
        raise ValueError("a generation batch needs one label pair (one benchmark), "
                         f"got {sorted({p.labels for p in prompts})}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, slots = [], []  # slots: (row, modality, value, start, length)
    for b, prompt in enumerate(prompts):
        ids, entities = [], iter(prompt.entities)
        for i, piece in enumerate(MARK_RE.split(prompt.text)):
            if i % 2 == 0:
                ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
            else:
                modality, value = next(entities)
                length = entity_length(projectors.get(modality), value, n_tokens)
                slots.append((b, modality, value, len(ids), length))
                ids += [pad] * length
        rows.append(ids)
    width = max(map(len, rows))
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        ids[b, width - len(row):], mask[b, width - len(row):] = torch.tensor(row, dtype=torch.long), 1
    embeds = embedding(ids.to(device)).clone()
    featurise = features or FeatureCache()
    for modality in dict.fromkeys(m for _, m, *_ in slots):
        mine = [slot for slot in slots if slot[1] == modality]
        projector, values = projectors[modality], [slot[2] for slot in mine]
        if isinstance(projector, RawEncoder):
            blocks = projector.blocks(values)
        else:
            param = next(projector.parameters())
            blocks = projector(featurise(modality, values).to(param.device, param.dtype))
        for (b, _, _, start, length), block in zip(mine, blocks):
            if block.shape[0] != length:
                raise ValueError(f"{modality} encoder emitted {block.shape[0]} tokens where {length} were reserved")
            at = width - len(rows[b]) + start
            embeds[b, at:at + length] = block.to(embeds.device, embeds.dtype)
    return embeds, mask.to(device)


@torch.no_grad()
def generate_replies(model: nn.Module, prompts: list[Prompt], tokenizer, projectors: dict | None = None,
                     n_tokens: int | None = 8, max_new_tokens: int = MAX_NEW_TOKENS, end_token_id: int | None = None,
                     features: FeatureCache | None = None) -> list[str]:
    """Greedy replies (``do_sample=False``) to one batch of prompts, decoded without special tokens.

    Generation stops at ``end_token_id`` (default: the tokenizer's end-of-turn token,
    ``base_llm.end_of_turn_id``) or after ``max_new_tokens``.
    """
    embeds, mask = generation_inputs(model, prompts, tokenizer, projectors or {}, n_tokens, features)
    end = end_token_id if end_token_id is not None else end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=end, pad_token_id=pad)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
