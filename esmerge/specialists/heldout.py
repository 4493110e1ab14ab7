"""How specialists behave on held-out captions: the loss table of notebook 02 and greedy answers.

Every model sees modality m's inputs through the same encoder f_m, specialist m's projector
(cells need none), as the probe does (paper §4.1), so models differ only by their LoRA.
"""
from __future__ import annotations

import torch

from esmerge.progress import track
from esmerge.scales import TrainRecipe
from esmerge.specialists.base_llm import BaseModel, end_of_turn_id
from esmerge.specialists.captions import (
    N_TOKENS,
    Example,
    SpecialistError,
    answer_nll,
    collate_examples,
    input_embeddings,
    prompt_pieces,
)
from esmerge.specialists.load import Specialist, attach_specialist


@torch.no_grad()
def specialist_loss(model, base: BaseModel, specialist_or_none, examples: list[Example],
                    batch_size: int = 8, *, max_tokens: int) -> float:
    """Mean caption loss (nats per answer token) of ``model`` on ``examples``.

    ``model`` is what is evaluated (``base.model`` or ``attach_specialist(base, spec)``);
    ``specialist_or_none`` supplies the projector that encodes molecule / protein inputs
    (the modality's encoder f_m; every model sees the same modality tokens, as in the probe).
    Cells need no projector. Token-weighted over all answer tokens of all examples; sequences are
    cut at ``max_tokens`` (as trained: the scale's ``TrainRecipe.max_tokens_for(modality)``).
    """
    if not examples:
        raise SpecialistError("no examples to evaluate")
    projector = specialist_or_none.projector if isinstance(specialist_or_none, Specialist) else specialist_or_none
    modality = examples[0].modality
    if any(ex.modality != modality for ex in examples):
        raise SpecialistError("specialist_loss needs examples of one modality")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate_examples(base.tokenizer, examples[start:start + batch_size], max_tokens)
        nll, n = answer_nll(model, projector, batch, modality)
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / count


def cross_loss_table(base: BaseModel, specs: dict[str, Specialist], examples: dict[str, list[Example]],
                     recipe: TrainRecipe, progress: bool = True) -> torch.Tensor:
    """Held-out caption loss of the base and of each specialist on every modality.

    Every model sees modality m's inputs through the same encoder f_m, specialist m's projector
    (cells need none), as in the probe (paper §4.1); rows therefore differ only by their LoRA.

    Args:
        specs: modality -> specialist (``load_specialists``), in row order after the base.
        examples: modality -> held-out examples of that modality (column order).
        recipe: the scale's training recipe (``ScaleConfig.train``); sequences are cut at its
            ``max_tokens_for(modality)``.

    Returns:
        ``[1 + len(specs), len(examples)]`` float64 tensor of nats per answer token; row 0 is the base.
    """
    rows = [("base", base.model)] + [(m, attach_specialist(base, s)) for m, s in specs.items()]
    table = torch.zeros(len(rows), len(examples), dtype=torch.float64)
    cells = [(i, j) for i in range(len(rows)) for j in range(len(examples))]
    for i, j in track(cells, desc="held-out loss", disable=not progress):
        modality = list(examples)[j]
        encoder = specs[modality] if modality in specs else None
        table[i, j] = specialist_loss(rows[i][1], base, encoder, examples[modality],
                                      max_tokens=recipe.max_tokens_for(modality))
    return table


@torch.no_grad()
def generate_answer(model, base: BaseModel, projector, example: Example, max_new_tokens: int = 48) -> str:
    """Greedy answer of ``model`` to ``example``'s prompt (modality tokens spliced in as for training)."""
    tok = base.tokenizer
    before, after = prompt_pieces(tok, example)
    slot = N_TOKENS if example.raw is not None else 0
    ids = torch.tensor([before + [tok.pad_token_id or 0] * slot + after])
    batch = {"input_ids": ids,
             "slot_mask": torch.tensor([[False] * len(before) + [True] * slot + [False] * len(after)]),
             "raw": [example.raw] if example.raw is not None else None}
    embeds = input_embeddings(model, projector, batch, example.modality)
    end = end_of_turn_id(tok)
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids, device=embeds.device),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=end, pad_token_id=end)
    return tok.decode(out[0], skip_special_tokens=True).strip()
