"""The paper's scoring (evaluate.generation): greedy replies read by their `Final answer:`, invalid rate."""
from __future__ import annotations

import pytest
import torch

from esmerge import scales
from esmerge.evaluate import answer_tokens, collate, splice_embeddings
from esmerge.evaluate.generation import INVALID, generate_replies, generation_inputs, parse_answer, score_replies
from esmerge.evaluate.prompts import MARK, Prompt
from esmerge.specialists.base_llm import end_of_turn_id, load_smoke
from esmerge.specialists.encoders import make_projector
from esmerge.specialists.raw_encoder import RawEncoder

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
    prompts = prompts_for(base.tokenizer, [("Is it a substrate", "CCO", 1),
                                           ("Substrate of CYP2C9, or not", "c1ccccc1", 0)])
    embeds, mask = generation_inputs(base.model, prompts, base.tokenizer, projectors)
    scored = collate(prompts, base.tokenizer, 8)
    shared_answer = answer_tokens(base.tokenizer, LABELS)[0]  # byte tokens of "Final answer: " (both labels)
    assert base.tokenizer.decode(shared_answer) == "Final answer: "
    # everything else as the log-likelihood scoring builds it, molecule tokens spliced in
    tokens = {"molecule": projectors["molecule"](scored.features["molecule"])}
    full = splice_embeddings(base.model.get_input_embeddings()(scored.input_ids), scored.slots, tokens)
    for b in range(2):
        ours, theirs = embeds[b][mask[b].bool()], full[b][scored.attention_mask[b].bool()]
        assert scored.input_ids[b, -len(shared_answer):].tolist() == shared_answer
        assert torch.equal(ours, theirs[:-len(shared_answer)])
    assert mask[0].tolist()[:1] == [0] and mask.shape[1] == mask[1].sum()  # left padding, longest row full
    ids = collate(prompts[1:], base.tokenizer, 8).input_ids[0, :-len(shared_answer)]
    assert base.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


class LengthPlusTwo(RawEncoder):
    """A raw encoder with Prot2Text's block lengths: token j of item k is the constant k + j/100."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.register_buffer("anchor", torch.zeros(1))

    def block_length(self, item):
        return len(item) + 2

    def blocks(self, raw):
        return [(k + torch.arange(len(s) + 2) / 100)[:, None].expand(-1, self.width) for k, s in enumerate(raw)]


def test_variable_length_blocks_get_their_own_slots(smoke):
    base, _ = smoke
    prompts = prompts_for(base.tokenizer, [("Is it", "MKT", 1), ("Is it", "MKTAYIAKQR", 0)])
    prompts = [Prompt(p.text, [("protein", p.entities[0][1])], p.labels, p.y) for p in prompts]
    embeds, mask = generation_inputs(base.model, prompts, base.tokenizer, {"protein": LengthPlusTwo(base.hidden_size)})
    assert (mask[1] == 1).all() and int(mask[0].sum()) == mask.shape[1] - 7  # 3 + 2 vs 10 + 2 tokens
    embedding = base.model.get_input_embeddings()
    for k, length in enumerate((5, 12)):
        before, after = prompts[k].text.split(MARK.format(0))
        before = base.tokenizer(before, add_special_tokens=False)["input_ids"]
        at = mask.shape[1] - int(mask[k].sum()) + len(before)  # left padding, then the text before the block
        block = k + torch.arange(length)[:, None] / 100
        assert torch.equal(embeds[k, at:at + length], block.expand(-1, base.hidden_size))
        after = base.tokenizer(after, add_special_tokens=False)["input_ids"]
        assert torch.equal(embeds[k, at + length:], embedding(torch.tensor(after)))  # the text resumes right after
        assert torch.equal(embeds[k, at - len(before):at], embedding(torch.tensor(before)))


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
