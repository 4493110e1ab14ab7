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

from esmerge.evaluate.prompts import ANSWER_PREFIX, Prompt
from esmerge.evaluate.scoring import FeatureCache, answer_tokens, collate, splice_embeddings
from esmerge.evaluate.stats import accuracy, macro_f1
from esmerge.models import end_of_turn_id

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


def generation_inputs(model: nn.Module, prompts: list[Prompt], tokenizer, projectors: dict, n_tokens: int = 8,
                      features: FeatureCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs_embeds [B, L, d], attention_mask [B, L])`` of prompts that end at the assistant turn.

    ``collate`` appends the ``Final answer:`` tokens both labels share (log-likelihood scoring
    continues from there); a free reply starts before them, so they are cut off again. Rows are
    left-padded, so the cut is the same last columns in every row; modality tokens are spliced in
    as the evaluation does.
    """
    labels = {p.labels for p in prompts}
    if len(labels) != 1:
        raise ValueError(f"a generation batch needs one label pair (one benchmark), got {sorted(labels)}")
    batch = collate(prompts, tokenizer, n_tokens, features)
    cut = len(answer_tokens(tokenizer, labels.pop())[0])
    ids, mask = batch.input_ids, batch.attention_mask
    if cut:
        ids, mask = ids[:, :-cut], mask[:, :-cut]
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    embeds = embedding(ids.to(device))
    tokens = {}
    for modality in batch.slots:
        param = next(projectors[modality].parameters())
        tokens[modality] = projectors[modality](batch.features[modality].to(param.device, param.dtype))
    return splice_embeddings(embeds, batch.slots, tokens), mask.to(device)


@torch.no_grad()
def generate_replies(model: nn.Module, prompts: list[Prompt], tokenizer, projectors: dict | None = None,
                     n_tokens: int = 8, max_new_tokens: int = MAX_NEW_TOKENS, end_token_id: int | None = None,
                     features: FeatureCache | None = None) -> list[str]:
    """Greedy replies (``do_sample=False``) to one batch of prompts, decoded without special tokens.

    Generation stops at ``end_token_id`` (default: the tokenizer's end-of-turn token,
    ``models.end_of_turn_id``) or after ``max_new_tokens``.
    """
    embeds, mask = generation_inputs(model, prompts, tokenizer, projectors or {}, n_tokens, features)
    end = end_token_id if end_token_id is not None else end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=end, pad_token_id=pad)
    return tokenizer.batch_decode(out, skip_special_tokens=True)
