"""Evaluation with variable-length token blocks: log-likelihood batches
whose entities each reserve their own block length, the paper's generation scoring in ``evaluate``,
and the AdaMerging / Avg+FT prompt batches, on a smoke base with a Prot2Text-V2-style protein
encoder (a tiny ESM-2 ``EsmModel`` + GELU adapter: one token per residue plus two)."""
from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.errors import UsageError
from esmerge.evaluate import sweep
from esmerge.evaluate.generation import INVALID, score_replies
from esmerge.evaluate.scoring import common_n_tokens, entity_tokens
from esmerge.methods.objectives import mean_entropy
from esmerge.run.baseline_inputs import answer_nll_loss, label_entropy_objective, prompt_batches, trainable_copy
from esmerge.specialists.adapters import adapter_from_model
from esmerge.specialists.base_llm import load_smoke, lora_config
from esmerge.specialists.encoders import Prot2TextEncoder, esm_token_ids, make_projector

CPU = scales.get("cpu")  # the settings these tests were written at

SMILES = ["CCO", "CCN", "c1ccccc1O", "CC(=O)O", "CCCCO", "CCOC(=O)C", "c1ccncc1", "CC(C)O"]
PROTEINS = ["MKTAYIAKQR", "GAV", "MSTNPKPQRSTVWYAC", "MKTAYIAKQRW", "GGSSLLAAVV", "MAHHHHHHG", "PK", "MKV"]
LABELS = ("Does not interact", "Interacts")


@pytest.fixture(scope="module")
def stand_in():
    """(smoke base, {"protein": ESM-2-style RawEncoder, "molecule": fixed 8-token Projector})."""
    torch.set_num_threads(1)
    base = load_smoke(seed=0)
    torch.manual_seed(5)
    esm = {"vocab_size": 33, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "pad_token_id": 1, "mask_token_id": 32, "max_position_embeddings": 64,
           "position_embedding_type": "rotary"}
    protein = Prot2TextEncoder(esm, input_dim=16, intermediate_dim=32, output_dim=base.hidden_size).eval()
    protein.requires_grad_(False)
    molecule = make_projector("molecule", base.model.get_input_embeddings(), seed=1)
    return base, {"protein": protein, "molecule": molecule}


def pools(n_eval: int = 4):
    df = pd.DataFrame({"molecule": SMILES, "molecule2": [None] * 8, "protein": PROTEINS, "cell_id": [None] * 8,
                       "cell_genes": [None] * 8, "y": [0, 1, 1, 0, 1, 0, 1, 0], "label": ["x"] * 8})
    return df.iloc[:n_eval], df.iloc[n_eval:]


def prompts_of(base, projectors, n: int = 3, shots: int = 1):
    eval_df, context_df = pools()
    options = ev.PromptOptions(frozenset(projectors))
    return [ev.build_prompt("Human", eval_df.iloc[i], context_df.iloc[i: i + shots], base.tokenizer, options)
            for i in range(n)]


# --------------------------------------------------------------------------- (a) log-likelihood
def test_each_entity_reserves_its_own_block_length(stand_in):
    base, projectors = stand_in
    prompts = prompts_of(base, projectors)
    batch = ev.collate(prompts, base.tokenizer, None, projectors=projectors)
    proteins = [v for p in prompts for m, v in p.entities if m == "protein"]  # slot order: prompt by prompt
    assert batch.values["protein"] == proteins and batch.n_tokens is None
    assert batch.lengths["protein"].tolist() == [len(s) + 2 for s in proteins]
    assert batch.lengths["molecule"].tolist() == [8] * 6 and "protein" not in batch.features  # raw, not featurised
    # Every block lands on its own placeholders and nowhere else: splice blocks of constant k + 1
    # into zeros and count what moved, row by row.
    tokens = {"protein": [torch.full((len(s) + 2, base.hidden_size), k + 1.0) for k, s in enumerate(proteins)],
              "molecule": torch.zeros(6, 8, base.hidden_size)}
    spliced = ev.splice_embeddings(torch.zeros(*batch.input_ids.shape, base.hidden_size), batch.slots, tokens,
                                   batch.lengths)
    rows, starts = batch.slots["protein"]
    for k, (r, s) in enumerate(zip(rows.tolist(), starts.tolist())):
        length = len(proteins[k]) + 2
        assert (spliced[r, s: s + length] == k + 1).all()
        assert (batch.input_ids[r, s: s + length] == base.tokenizer.pad_token_id).all()
        assert batch.attention_mask[r, s: s + length].all()
    assert int((spliced != 0).any(-1).sum()) == sum(len(s) + 2 for s in proteins)
    # the text right after a protein block is its prompt's next field
    r, s = rows[0].item(), starts[0].item() + len(proteins[0]) + 2
    assert base.tokenizer.decode(batch.input_ids[r, s: s + 11]) == " Molecule: "


def test_a_block_of_another_length_is_refused(stand_in):
    base, projectors = stand_in
    batch = ev.collate(prompts_of(base, projectors, n=1), base.tokenizer, None, projectors=projectors)
    tokens = entity_tokens(batch, projectors)
    tokens["protein"] = [b[:-1] for b in tokens["protein"]]
    embeds = torch.zeros(*batch.input_ids.shape, base.hidden_size)
    with pytest.raises(ValueError, match=r"protein encoder emitted \d+ tokens where \d+ were reserved"):
        ev.splice_embeddings(embeds, batch.slots, tokens, batch.lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_variable_blocks_score_as_each_prompt_alone(stand_in, dtype):
    """Padding must not leak: the batch's log-likelihoods equal each prompt scored alone (batch size 1)."""
    base, projectors = stand_in
    model = copy.deepcopy(base.model).to(dtype)
    own = {m: copy.deepcopy(p).to(dtype) for m, p in projectors.items()}
    prompts = prompts_of(base, own, n=4)
    batch = ev.collate(prompts, base.tokenizer, None, projectors=own)
    assert len(set(batch.lengths["protein"].tolist())) >= 5  # protein blocks of many lengths ...
    assert len(set(batch.attention_mask.sum(1).tolist())) == 3  # ... in rows of three lengths, so padded
    assert batch.shared_len > 0  # the common system prompt runs once (the prefix-cache path)
    with torch.no_grad():
        batched = ev.label_logits(model, batch, own)
        alone = torch.cat([ev.label_logits(model, ev.collate([p], base.tokenizer, None, projectors=own), own)
                           for p in prompts])
        # the protein tokens matter: another sequence in the first query changes its score
        other = copy.deepcopy(prompts[0])
        other.entities[-2] = ("protein", "W" * len(other.entities[-2][1]))
        moved = ev.label_logits(model, ev.collate([other], base.tokenizer, None, projectors=own), own)
    assert batched.dtype == torch.float32 and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    assert (moved[0] - alone[0]).abs().max() > 1e-3


def test_length_bucketed_scoring_returns_scores_in_prompt_order(stand_in, tmp_path):
    """``evaluate`` scores prompts in batches of similar length; each row's scores are still its own."""
    base, projectors = stand_in
    mut = ev.ModelUnderTest.merged(base, None, projectors, "merged")
    config = ev.EvalConfig.for_scale(CPU, n_eval=4, n_context=4, n_shots=1, batch_size=2, n_resamples=50,
                                     decision="argmax")
    prompts = sweep._prompts("Human", "mol-prot", *pools(), config, config.prompt_options(projectors),
                             base.tokenizer, ev.EvalSession())
    lengths = [len(ev.prompt_token_ids(p, base.tokenizer, None, 0, projectors)[0]) for p in prompts]
    assert ev.length_batches(lengths, 2) != [[0, 1], [2, 3]]  # the batches do not follow the prompts' order
    paired = ev.evaluate(mut, "Human", config, pools=pools(), out_dir=tmp_path / "pairs", progress=False)
    single = ev.evaluate(mut, "Human", replace(config, batch_size=1), pools=pools(), out_dir=tmp_path / "one",
                         progress=False)
    np.testing.assert_allclose(paired["scores"], single["scores"], atol=2e-4)  # scores are kept to 4 decimals
    assert len({tuple(row) for row in single["scores"]}) == 4


# --------------------------------------------------------------------------- (b) fixed-size path
def test_fixed_projectors_collate_exactly_as_a_hand_built_batch(stand_in):
    base, projectors = stand_in
    tok = base.tokenizer
    fixed = {"molecule": projectors["molecule"]}  # 8 tokens each; proteins are text
    prompts = prompts_of(base, fixed, n=2)
    pad = tok.pad_token_id
    shared_answer = ev.answer_tokens(tok, LABELS)[0]
    rows, starts = [], []
    for p in prompts:  # text, 8 pad slots per molecule, text, ..., then "Final answer:"
        before, middle, after = p.text.split("\x00")[0], p.text.split("\x00")[2], p.text.split("\x00")[4]
        ids = tok(before, add_special_tokens=False)["input_ids"]
        starts.append([len(ids)])
        ids += [pad] * 8 + tok(middle, add_special_tokens=False)["input_ids"]
        starts[-1].append(len(ids))
        ids += [pad] * 8 + tok(after, add_special_tokens=False)["input_ids"] + shared_answer
        rows.append(ids)
    for batch in (ev.collate(prompts, tok), ev.collate(prompts, tok, None, projectors=fixed),
                  ev.collate(prompts, tok, 8, None, projectors)):
        shared = batch.shared_len
        assert shared >= 16 and rows[0][:shared] == rows[1][:shared]
        width = shared + max(len(r) - shared for r in rows)
        assert batch.input_ids.shape == (2, width) and batch.n_tokens == 8
        for b, ids in enumerate(rows):
            pad_run = width - len(ids)
            expected = ids[:shared] + [pad] * pad_run + ids[shared:]
            assert batch.input_ids[b].tolist() == expected
            assert batch.attention_mask[b].tolist() == [1] * shared + [0] * pad_run + [1] * (len(ids) - shared)
        offsets = [width - len(ids) for ids in rows]
        assert batch.slots["molecule"][0].tolist() == [0, 0, 1, 1]
        assert batch.slots["molecule"][1].tolist() == [o + s for o, st in zip(offsets, starts) for s in st]
        assert batch.lengths["molecule"].tolist() == [8] * 4
        assert torch.equal(batch.features["molecule"],
                           ev.FeatureCache()("molecule", [v for p in prompts for _, v in p.entities]))
        rests = ev.answer_tokens(tok, LABELS)[1]
        for j, rest in enumerate(rests):
            assert batch.continuations[0, j, :len(rest)].tolist() == rest
            assert (batch.continuation_mask[0, j].tolist()
                    == [1] * len(rest) + [0] * (batch.continuations.shape[2] - len(rest)))
    with torch.no_grad():  # same batch, same scores, whichever way the lengths were asked for
        assert torch.equal(ev.label_logits(base.model, ev.collate(prompts, tok), fixed),
                           ev.label_logits(base.model, ev.collate(prompts, tok, None, projectors=fixed), fixed))


def test_common_n_tokens():
    assert common_n_tokens({}) == 8
    emb = torch.nn.Embedding(10, 4)
    assert common_n_tokens({"molecule": make_projector("molecule", emb, n_tokens=4)}) == 4
    assert common_n_tokens({"molecule": make_projector("molecule", emb, n_tokens=4),
                            "protein": make_projector("protein", emb, n_tokens=8)}) is None


def test_loglik_settings_keep_their_keys_and_printed_form():
    config = ev.EvalConfig.for_scale(CPU)
    assert "scoring" not in config.key() and "max_new_tokens" not in config.key()
    assert "scoring" not in repr(config) and repr(config).startswith("EvalConfig(n_eval=32, n_context=512,")
    generating = ev.EvalConfig.for_scale(CPU, decision="argmax", scoring="generate", max_new_tokens=5)
    assert generating.key()["scoring"] == "generate" and generating.key()["max_new_tokens"] == 5
    assert "scoring='generate'" in repr(generating)
    assert ev.EvalConfig.for_scale(scales.get("paper")).scoring == "generate"
    with pytest.raises(UsageError, match="scoring='generate' has none"):
        replace(ev.EvalConfig.for_scale(CPU), scoring="generate")  # the cpu decision fits a threshold on scores
    with pytest.raises(UsageError, match="choose one of loglik, generate"):
        ev.EvalConfig.for_scale(CPU, scoring="sample")


# --------------------------------------------------------------------------- (c) evaluate by generation
def test_evaluate_by_generation_reads_answers_and_reports_invalid_rate(stand_in, tmp_path, monkeypatch):
    base, projectors = stand_in
    mut = ev.ModelUnderTest.merged(base, None, projectors, "merged")
    config = ev.EvalConfig.for_scale(CPU, n_eval=4, n_context=4, n_shots=1, batch_size=3, n_resamples=50,
                                     decision="argmax", scoring="generate", max_new_tokens=3)
    real = ev.evaluate(mut, "Human", config, pools=pools(), out_dir=tmp_path / "real", progress=False)
    assert real["scoring"] == "generate" and len(real["replies"]) == 4
    assert real["pred"] == score_replies(real["replies"], LABELS, real["y"])["pred"]  # parsed from its own replies
    assert real["invalid_rate"] == pytest.approx(100 * sum(p == INVALID for p in real["pred"]) / 4)
    loglik = ev.EvalConfig.for_scale(CPU, n_eval=4, n_context=4, n_shots=1, batch_size=3, n_resamples=50,
                                     decision="argmax")
    loglik_keys = set(ev.evaluate(mut, "Human", loglik,
                                  pools=pools(), out_dir=tmp_path / "loglik", progress=False))
    assert loglik_keys < set(real) and real["scores"] is None and real["auroc"] != real["auroc"]  # NaN

    # Each prompt's length: its log-likelihood layout (protein blocks of residues + 2) minus "Final answer:".
    tok = base.tokenizer
    prompts = sweep._prompts("Human", "mol-prot", *pools(), config, config.prompt_options(projectors), tok,
                             ev.EvalSession())
    answer = len(ev.answer_tokens(tok, LABELS)[0])
    lengths = [len(ev.prompt_token_ids(p, tok, None, 0, projectors)[0]) - answer for p in prompts]
    # Prompts are generated in batches of similar length; the replies come back in the prompts' order.
    order = [i for rows in ev.length_batches(lengths, 3) for i in rows]
    assert sorted(order) == [0, 1, 2, 3] and len(set(lengths)) > 1

    # Canned replies (the model's generate patched), one per prompt: what is parsed, scored and seen.
    replies = ["Final answer: Does not interact", "Final answer: Interacts.", "no idea", "Final answer: Interacts"]
    canned = iter([replies[i] for i in order])
    seen = []

    def fake_generate(inputs_embeds, attention_mask, **kwargs):
        seen.append((attention_mask.sum(1).tolist(), kwargs["max_new_tokens"]))
        ids = [tok(next(canned), add_special_tokens=False)["input_ids"] for _ in range(len(inputs_embeds))]
        width = max(map(len, ids))
        return torch.tensor([row + [tok.pad_token_id] * (width - len(row)) for row in ids])

    monkeypatch.setattr(base.model, "generate", fake_generate)
    monkeypatch.setattr(sweep, "label_logits", lambda *a, **k: pytest.fail("generation scoring ran label_logits"))
    result = ev.evaluate(mut, "Human", config, pools=pools(), out_dir=tmp_path / "canned", progress=False)
    assert result["y"] == [0, 1, 1, 0] and result["pred"] == [0, 1, INVALID, 1]
    assert result["replies"] == replies
    assert result["accuracy"] == 50.0 and result["invalid_rate"] == 25.0 and result["n_invalid"] == 1
    # by hand: class 0 TP=1 FP=0 FN=1 -> F1 2/3; class 1 TP=1 FP=1 FN=1 (the invalid reply) -> 1/2
    assert result["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert [n for batch, _ in seen for n in batch] == [lengths[i] for i in order] and {m for _, m in seen} == {3}
    assert ev.summary({"merged": {"Human": result}})["predicted_positive"].iloc[0] == 0.5


# --------------------------------------------------------------------------- (d) AdaMerging / Avg+FT batches
def test_training_batches_carry_variable_blocks(stand_in):
    from peft import get_peft_model

    base, projectors = stand_in
    prompts = prompts_of(base, projectors, n=4)
    batches = prompt_batches(prompts, base.tokenizer, projectors, batch_size=3, seed=0)
    assert sorted(len(b.y) for b in batches) == [1, 3]
    seen = sorted(v for b in batches for v in b.values["protein"])
    assert seen == sorted(v for p in prompts for m, v in p.entities if m == "protein")
    for b in batches:
        assert b.lengths["protein"].tolist() == [len(esm_token_ids(v)) for v in b.values["protein"]]
    peft_model = get_peft_model(copy.deepcopy(base.model), lora_config())
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)
    adapter = adapter_from_model(peft_model, "moved")
    model = trainable_copy(base, adapter)
    state = {k: v.clone().requires_grad_(True) for k, v in adapter.state.items()}
    entropy = label_entropy_objective(model, batches, projectors)(state)
    nll = answer_nll_loss(model, projectors)(state, batches[0])
    (entropy + nll).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in state.values())
    assert sum(float(v.grad.abs().sum()) for v in state.values()) > 0
    with torch.no_grad():  # the objectives' values are the evaluation's scores of the same batches
        scores = ev.label_logits(peft_model, batches[0], projectors)
    assert float(entropy) == pytest.approx(float(mean_entropy(scores)), rel=1e-5)
    gold = scores.gather(1, batches[0].y[:, None])
    assert float(nll) == pytest.approx(float(-gold.mean()), rel=1e-5)
