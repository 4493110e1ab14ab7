"""`esmerge merge --scale paper` end to end on stand-ins of the published checkpoints.

A tiny LLaMA saved in the Hugging Face layout (with a LLaMA-3-style tokenizer) stands in for
LLaMA-3.1-8B-Instruct; the Mol-LLaMA and Prot2Text-V2 stand-ins go through their converters and
a full fine-tune through ``lora_extract`` (the cell specialist). Protein blocks are ESM-2 tokens,
one per residue plus two, so the probe's protein blocks differ in length between samples.
"""
from __future__ import annotations

import json
import shutil

import pytest
import standins
import torch

from esmerge import scales
from esmerge.methods import es_signals
from esmerge.run.merge import PAPER_BASE_ENV, merge_command
from esmerge.signals import probe, probe_states
from esmerge.specialists import encoders
from esmerge.specialists.adapters import load_merged
from esmerge.specialists.base_llm import load_paper
from esmerge.specialists.encoders import Prot2TextEncoder, esm_token_ids
from esmerge.specialists.load import SpecialistError
from esmerge.specialists.per_scale import PAPER_SPECIALISTS_ENV, load_specialists
from esmerge.specialists.raw_encoder import EncoderUnavailableError

SEQUENCES = ["MKTAYIAKQR", "GAVLIPFWMKTW", "MSTNPK", "MAHHHHHHGSMKKLLPTA"]  # 10, 12, 6, 18 residues
SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN"]
CELLS = ["CD3E, CD2, IL7R, LTB, CCR7, MAL, LEF1, TCF7"] * 4


@pytest.fixture(scope="module")
def paper(tmp_path_factory, private_cache):
    """(base folder, specialists root), built once; hash memos in a private cache."""
    torch.set_num_threads(1)
    yield standins.paper_tree(tmp_path_factory.mktemp("paper"))


@pytest.fixture()
def probe_inputs(monkeypatch):
    monkeypatch.setattr(probe, "probe_entities", lambda k, seed, exclude_cells=None: {
        "molecule": SMILES[:k], "protein": SEQUENCES[:k], "cell": CELLS[:k]})
    monkeypatch.setitem(encoders.ENCODER_BUILDERS, "mol-llama", standins.mol_llama_standin_builder)


def test_esm_tokens_follow_the_esm2_alphabet():
    assert esm_token_ids("LAG") == [0, 4, 5, 6, 2]
    assert len(esm_token_ids("A" * 2000)) == encoders.ESM_MAX_RESIDUES + 2


def test_load_paper_reads_the_local_base_in_llama3_chat_format(paper):
    base = load_paper(str(paper[0]), dtype=torch.float32, device="cpu")
    assert base.tokenizer.pad_token == "<|eot_id|>" and base.weights_sha256
    assert base.model.config.vocab_size == len(standins.llama3_tokenizer())


def test_paper_specialists_build_their_encoders(paper, probe_inputs):
    base = load_paper(str(paper[0]), dtype=torch.float32, device="cpu")
    specs = load_specialists(scales.get("paper"), base, root=paper[1])
    assert list(specs) == ["molecule", "protein", "cell"]
    protein = specs["protein"].projector
    assert isinstance(protein, Prot2TextEncoder) and protein.n_tokens is None
    blocks = protein.blocks(SEQUENCES)
    assert [b.shape[0] for b in blocks] == [len(s) + 2 for s in SEQUENCES]
    assert torch.allclose(blocks[0].norm(dim=-1), torch.ones(len(SEQUENCES[0]) + 2), atol=1e-5)  # L2-normalised
    # Batched with padding = each sequence alone: the ESM attention mask hides the padding.
    assert torch.allclose(protein.blocks(SEQUENCES[1:2])[0], blocks[1], atol=1e-5)
    # The ESM stand-in's own forward, by hand: encoder -> fc1 -> GELU -> fc2 -> GELU -> L2 norm.
    ids = torch.tensor([esm_token_ids(SEQUENCES[2])])
    states = protein.esm_encoder(input_ids=ids)[0]
    hand = torch.nn.functional.gelu(protein.adapter["fc2"](torch.nn.functional.gelu(protein.adapter["fc1"](states))))
    assert torch.allclose(blocks[2], torch.nn.functional.normalize(hand, dim=-1)[0], atol=1e-5)
    assert specs["molecule"].projector.blocks(SMILES).shape == (4, 8, base.hidden_size)
    assert specs["cell"].projector is None


def test_mol_llama_encoder_missing_is_one_clear_line(paper):
    base = load_paper(str(paper[0]), dtype=torch.float32, device="cpu")
    molecule = load_specialists(scales.get("paper"), base, root=paper[1])["molecule"].projector
    with pytest.raises(EncoderUnavailableError, match="Mol-LLaMA's own encoder") as err:
        molecule.blocks(SMILES)
    assert "\n" not in str(err.value)


def test_missing_paper_specialist_names_the_converter(paper, tmp_path):
    base = load_paper(str(paper[0]), dtype=torch.float32, device="cpu")
    shutil.copytree(paper[1] / "molecule", tmp_path / "molecule")  # the protein one is missing
    with pytest.raises(SpecialistError, match=r"protein holds no converted protein specialist; make it with "
                                              r"`esmerge convert prot2text"):
        load_specialists(scales.get("paper"), base, root=tmp_path)


def test_variable_length_element_scores_equal_each_sample_alone(paper, probe_inputs, tmp_path):
    """es.element_scores on padded, masked probes = the sum over samples run alone, unpadded."""
    from esmerge.signals.element_scores import element_scores_by_distance
    from esmerge.specialists.adapters import attach

    base = load_paper(str(paper[0]), dtype=torch.float32, device="cpu")  # fp32: bf16 rounding differs by layout
    protein = load_specialists(scales.get("paper"), base, root=paper[1])["protein"]
    blocks = {"protein": protein.projector.blocks(SEQUENCES[:3])}
    probes = probe.build_probes(base.tokenizer, base.model.get_input_embeddings(), blocks)
    assert probes.block_mask["protein"].sum(1).tolist() == [12, 14, 8]
    peft_model = attach(base.model, {"protein": protein.adapter})
    try:
        with peft_model.disable_adapter():
            states = probe_states.hidden_states(peft_model, probes)
        scores = es_signals.element_scores(peft_model, probes, states["tokens"])
        expected = None
        for k in range(3):
            alone = probe.build_probes(base.tokenizer, base.model.get_input_embeddings(),
                                       {"protein": blocks["protein"][k][None]})
            with peft_model.disable_adapter():
                own = probe_states.hidden_states(peft_model, alone)["tokens"]
            one = element_scores_by_distance(peft_model, alone.embeds, alone.positions, own, progress=False)
            expected = one if expected is None else {d: {key: expected[d][key] + v for key, v in s.items()}
                                                     for d, s in one.items()}
    finally:
        peft_model.unload()
    for dist in expected:
        for key, value in expected[dist].items():
            assert torch.allclose(scores[dist][key], value, rtol=1e-4, atol=1e-7), (dist, key)


def test_merge_command_paper_scale_end_to_end(paper, probe_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv(PAPER_BASE_ENV, str(paper[0]))
    monkeypatch.setenv(PAPER_SPECIALISTS_ENV, str(paper[1]))
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))
    out = merge_command(scales.get("paper"), "es", tmp_path / "es", {"n_projections": 16}, probe_k=4)
    merged = load_merged(out)
    meta = json.loads((out / "esmerge.json").read_text())
    assert meta["scale"] == "paper" and meta["info"]["probe_k"] == 4
    assert set(meta["encoders"]) == {"molecule", "protein"}  # named by folder, not copied
    assert set(merged.projectors) == set()
    alpha = torch.tensor(meta["info"]["alpha"])
    assert alpha.shape == (3, 2) and torch.allclose(alpha.sum(0), torch.ones(2), atol=1e-5)
    keys = set(load_specialists(scales.get("paper"), load_paper(str(paper[0]), device="cpu"),
                                root=paper[1])["protein"].adapter.state)
    assert set(merged.adapter.state) == keys
    assert all(torch.isfinite(v).all() for v in merged.adapter.state.values())
    # The same merge again is cached (probes with masks, states, SWD, scores): identical tensors.
    again = load_merged(merge_command(scales.get("paper"), "es", tmp_path / "es2", {"n_projections": 16}, probe_k=4))
    assert all(torch.equal(again.adapter.state[k], v) for k, v in merged.adapter.state.items())


def test_paper_scoring_generates_with_protein_blocks_of_their_own_length(paper):
    """The paper-scale default scoring (evaluate.generation) on the stand-in base: ESM-2 blocks of
    length + 2 in a LLaMA-3 chat prompt, greedy replies ending at <|eot_id|>."""
    from esmerge.evaluate.generation import generate_replies, generation_inputs
    from esmerge.evaluate.prompts import MARK, Prompt

    base = load_paper(str(paper[0]), dtype=torch.float32, device="cpu")
    protein = load_specialists(scales.get("paper"), base, root=paper[1])["protein"].projector
    prompts = []
    for seq in SEQUENCES[:2]:
        text = base.tokenizer.apply_chat_template([{"role": "user", "content": f"Protein: {MARK.format(0)} binds?"}],
                                                  tokenize=False, add_generation_prompt=True)
        prompts.append(Prompt(text, [("protein", seq)], ("Does not interact", "Interacts"), 1))
    embeds, mask = generation_inputs(base.model, prompts, base.tokenizer, {"protein": protein})
    assert mask.sum(1).tolist()[1] - mask.sum(1).tolist()[0] == len(SEQUENCES[1]) - len(SEQUENCES[0])
    replies = generate_replies(base.model, prompts, base.tokenizer, {"protein": protein}, max_new_tokens=3)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)


def test_paper_cell_substitute_trains_on_the_paper_base(paper, tmp_path, monkeypatch):
    """`esmerge train --scale paper --modality cell` (train_for_scale) uses $ESMERGE_PAPER_BASE, the
    base merge_command loads, so load_specialists(scales.get("paper")) accepts the folder it writes."""
    from esmerge.specialists.captions import load_examples
    from esmerge.specialists.load import load_specialist, train_for_scale

    monkeypatch.setenv(PAPER_BASE_ENV, str(paper[0]))
    examples, info = load_examples("cell", "train", scales.get("smoke"))
    train_for_scale(scales.get("paper"), "cell", tmp_path / "cell", device="cpu", steps=2, batch_size=2,
                    examples=examples, data_info=info, progress=False)
    base = load_paper(str(paper[0]), device="cpu")
    spec = load_specialist(tmp_path / "cell", base)
    assert spec.card["base_weights_sha256"] == base.weights_sha256 and spec.card["scale"] == "paper"
    assert spec.projector is None and spec.adapter.config["r"] == 8


def test_prot2text_encoder_keeps_rotary_frequencies_in_float32():
    """A bf16 protein encoder keeps ESM's rotary inv_freq in float32, as the upstream bf16 model does: its blocks
    equal that model's exactly, and differ once the frequencies are rounded to bf16 (as a plain .to() would)."""
    from esmerge.specialists.encoders import Prot2TextEncoder, _prot2text_encoder

    torch.manual_seed(0)
    esm = dict(vocab_size=33, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               position_embedding_type="rotary", pad_token_id=1, mask_token_id=32, token_dropout=False)
    entry = {"esm_config": esm, "adapter_config": {"input_dim": 32, "intermediate_dim": 16, "output_dim": 8}}
    source = Prot2TextEncoder(esm, 32, 16, 8).eval()
    encoder = {f"esm_encoder.{k}": v.to(torch.bfloat16) if v.is_floating_point() and not k.endswith("inv_freq")
               else v for k, v in source.esm_encoder.state_dict().items()}
    projector = {f"adapter.{k}": v.to(torch.bfloat16) for k, v in source.adapter.state_dict().items()}

    def with_rotary(module, dtype):
        for name, _ in list(module.named_buffers()):
            if name.endswith("inv_freq"):
                owner = module.get_submodule(name.rsplit(".", 1)[0])
                owner.inv_freq = encoder[name].to(dtype)
        return module

    upstream = with_rotary(Prot2TextEncoder(esm, 32, 16, 8).to(torch.bfloat16), torch.float32).eval()
    upstream.load_state_dict({**encoder, **projector}, strict=False)
    built = _prot2text_encoder(entry, projector, encoder, "stand-in").eval()
    assert {b.dtype for n, b in built.named_buffers() if n.endswith("inv_freq")} == {torch.float32}
    assert next(built.parameters()).dtype == torch.bfloat16
    rounded = with_rotary(_prot2text_encoder(entry, projector, encoder, "stand-in").eval(), torch.bfloat16)
    protein = ["MKVLAGHWYE" * 60]  # 600 residues
    with torch.no_grad():
        want = upstream.blocks(protein)[0]
        assert torch.equal(built.blocks(protein)[0], want)
        assert not torch.equal(rounded.blocks(protein)[0], want)
