"""The paper's scoring (evaluate.generation): greedy replies read by their `Final answer:`, invalid rate."""
from __future__ import annotations

import pytest
import torch

from esmerge import scales
from esmerge.encoders import make_projector
from esmerge.evaluate import answer_tokens, collate, splice_embeddings
from esmerge.evaluate.generation import INVALID, generate_replies, generation_inputs, parse_answer, score_replies
from esmerge.evaluate.prompts import MARK, Prompt
from esmerge.models import end_of_turn_id, load_smoke

LABELS = ("Not a substrate", "Substrate")


@pytest.fixture(scope="module")
def smoke():
    torch.set_num_threads(1)
    base = load_smoke(seed=0)
    projector = make_projector("molecule", base.model.get_input_embeddings(), seed=0)
    return base, {"molecule": projector}


def prompts_for(tokenizer, items):
    out = []
    for text, smiles, y in items:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": f"{text} {MARK.format(0)} ?"}],
                                             tokenize=False, add_generation_prompt=True)
        out.append(Prompt(chat, [("molecule", smiles)], LABELS, y))
    return out


@pytest.mark.parametrize("reply, expected", [
    ("The molecule is small. Final answer: Substrate.", 1),
    ("Final answer: **Not a substrate**", 0),
    ("final answer:   substrate", 1),
    ("Final answer: 'Not a substrate'.", 0),
    ("Final answer: Substrate\nFinal answer: Not a substrate", 0),  # the last one counts
    ("Final answer: Substrate, since it is oxidised", 1),
    ("Final answer: Substrates", INVALID),  # not a label
    ("Final answer: substrate or not a substrate", INVALID),
    ("It is a substrate.", INVALID),  # no Final answer:
    ("", INVALID),
])
def test_final_answer_regex(reply, expected):
    assert parse_answer(reply, LABELS) == expected


def test_invalid_replies_count_as_wrong_and_are_reported():
    replies = ["Final answer: Substrate", "Final answer: Not a substrate", "I cannot tell", "Final answer: Substrate"]
    result = score_replies(replies, LABELS, [1, 1, 0, 0])
    assert result["pred"] == [1, 0, INVALID, 1]
    assert result["accuracy"] == 25.0 and result["invalid_rate"] == 25.0 and result["n_invalid"] == 1
    # macro-F1 by hand: class 1 TP=1 FP=1 FN=1 -> 0.5; class 0 TP=0 FP=1 FN=2 -> 0
    assert result["macro_f1"] == pytest.approx(25.0)


def test_generation_prompt_stops_before_the_answer_prefix(smoke):
    base, projectors = smoke
    prompts = prompts_for(base.tokenizer, [("Is it a substrate", "CCO", 1), ("Substrate of CYP2C9, or not", "c1ccccc1", 0)])
    embeds, mask = generation_inputs(base.model, prompts, base.tokenizer, projectors)
    scored = collate(prompts, base.tokenizer, 8)
    cut = scored.input_ids.shape[1] - embeds.shape[1]
    shared_answer = answer_tokens(base.tokenizer, LABELS)[0]  # byte tokens of "Final answer: " (both labels)
    assert base.tokenizer.decode(shared_answer) == "Final answer: "
    assert cut == len(shared_answer) and scored.input_ids[0, -cut:].tolist() == shared_answer
    # everything else as the log-likelihood scoring builds it, molecule tokens spliced in
    tokens = {"molecule": projectors["molecule"](scored.features["molecule"])}
    full = splice_embeddings(base.model.get_input_embeddings()(scored.input_ids), scored.slots, tokens)
    assert torch.equal(embeds, full[:, :-cut]) and torch.equal(mask, scored.attention_mask[:, :-cut])
    # a row's last real token is the assistant header, not "Final answer:"
    text = base.tokenizer.decode(scored.input_ids[1, :-cut])
    assert text.endswith("<|im_start|>assistant\n")


def test_generate_replies_decodes_greedy_output(smoke, monkeypatch):
    base, projectors = smoke
    prompts = prompts_for(base.tokenizer, [("Is it a substrate", "CCO", 1), ("Substrate of CYP2C9, or not", "CCN", 0)])
    tok = base.tokenizer
    canned = ["Small and polar. Final answer: Substrate.", "Hmm."]
    seen = {}

    def fake_generate(**kwargs):
        seen.update(kwargs)
        ids = [tok(t, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tok)] for t in canned]
        width = max(map(len, ids))
        return torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in ids])

    monkeypatch.setattr(base.model, "generate", fake_generate)
    replies = generate_replies(base.model, prompts, tok, projectors, max_new_tokens=7)
    assert replies == canned
    assert seen["do_sample"] is False and seen["max_new_tokens"] == 7 and seen["eos_token_id"] == end_of_turn_id(tok)
    assert seen["inputs_embeds"].shape[:2] == seen["attention_mask"].shape
    result = score_replies(replies, LABELS, [p.y for p in prompts])
    assert result["pred"] == [1, INVALID] and result["invalid_rate"] == 50.0


def test_real_greedy_generation_runs_on_the_smoke_base(smoke):
    base, projectors = smoke
    prompts = prompts_for(base.tokenizer, [("Is it a substrate", "CCO", 1)])
    replies = generate_replies(base.model, prompts, base.tokenizer, projectors, max_new_tokens=4)
    assert len(replies) == 1 and isinstance(replies[0], str)
    assert replies == generate_replies(base.model, prompts, base.tokenizer, projectors, max_new_tokens=4)  # greedy


def test_scales_pick_the_paper_scoring_at_paper_scale():
    assert [scales.get(s).evaluation.scoring for s in scales.NAMES] == ["loglik", "loglik", "generate"]


def test_one_benchmark_per_generation_batch(smoke):
    base, projectors = smoke
    prompts = prompts_for(base.tokenizer, [("Is it a substrate", "CCO", 1)])
    prompts.append(Prompt(prompts[0].text, prompts[0].entities, ("No", "Yes"), 0))
    with pytest.raises(ValueError, match="one label pair"):
        generation_inputs(base.model, prompts, base.tokenizer, projectors)
