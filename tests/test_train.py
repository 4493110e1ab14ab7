"""Trainer reliability: JSON + safetensors checkpoints, a stop at every file write, the output lock,
other chat formats, and the paper-scale training path on a stand-in base (smoke scale, seconds)."""
from __future__ import annotations

import hashlib
import json
import threading

import pytest
import torch

from esmerge import scales
from esmerge.errors import InputError, OutputExistsError
from esmerge.specialists import adapters, base_llm
from esmerge.specialists import captions as C
from esmerge.specialists import load as S
from esmerge.specialists import train as T

RECIPE = dict(steps=6, batch_size=4, lr=5e-3, seed=0, progress=False, checkpoint_every=2)
OUTPUTS = ("adapter_model.safetensors", "adapter_config.json", "projector.safetensors")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
LLAMA3_SPECIALS = ("<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


class Crash(BaseException):
    """The process stopping mid-write (not an ``Exception``, so nothing on the way catches it)."""


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return base_llm.load_base(scales.get("smoke"))


@pytest.fixture(scope="module")
def molecule_data():
    return C.load_examples("molecule", "train", scales.get("smoke"))


def _train(base, data, out, **extra):
    examples, info = data
    return S.train_specialist(base, "molecule", out_dir=out, examples=examples, data_info=info, **{**RECIPE, **extra})


def _leftovers(out):
    return sorted(p.name for p in out.parent.iterdir()
                  if p.name.startswith(f".{out.name}.") and not p.name.endswith(".lock"))


def test_checkpoint_is_json_and_safetensors_and_replaced_whole(base, molecule_data, tmp_path):
    out = tmp_path / "cut"
    assert _train(base, molecule_data, out, stop_after=4) is None
    folder = out / "checkpoint"
    assert sorted(p.name for p in folder.iterdir()) == ["state.json", "tensors-000004.safetensors"]
    state = json.loads((folder / "state.json").read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4 and state["recipe"]["lr"] == 5e-3
    assert state["tensors_sha256"] == hashlib.sha256((folder / state["tensors"]).read_bytes()).hexdigest()
    _, tensors = T.load_checkpoint(folder)
    assert any(k.startswith("lora.") for k in tensors) and any(k.startswith("optimizer.") for k in tensors)
    # An altered tensors file is refused, not half-used.
    (folder / state["tensors"]).write_bytes(b"not the file state.json names")
    with pytest.raises(C.SpecialistError, match="state.json is not a checkpoint this trainer wrote"):
        _train(base, molecule_data, out)


def test_a_stop_at_every_file_write_resumes_byte_identically(base, molecule_data, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    _train(base, molecule_data, reference)
    expected = {f: (reference / f).read_bytes() for f in OUTPUTS}
    real = adapters.write_file
    writes = []
    monkeypatch.setattr(adapters, "write_file", lambda path, data: (writes.append(path.name), real(path, data)))
    _train(base, molecule_data, tmp_path / "counted")
    # 3 checkpoints (tensors, then state.json) and the finished directory (card.json last).
    assert len(writes) == 10 and writes[-1] == "card.json"
    for n in range(1, len(writes) + 1):
        out, calls = tmp_path / f"stop-{n}", []

        def faulty(path, data, n=n, calls=calls):
            calls.append(path)
            if len(calls) == n:
                real(path, data[: len(data) // 2])  # half a file, then the process dies
                raise Crash(path)
            real(path, data)

        monkeypatch.setattr(adapters, "write_file", faulty)
        with pytest.raises(Crash):
            _train(base, molecule_data, out)
        assert not S.is_finished(out), n
        # What a hard kill leaves beside the output: a staging folder, even one with a card.
        junk = out.with_name(f".{out.name}.staging-999-dead")
        junk.mkdir()
        (junk / "card.json").write_text("{}")
        monkeypatch.setattr(adapters, "write_file", real)
        spec = _train(base, molecule_data, out)
        assert {f: (out / f).read_bytes() for f in OUTPUTS} == expected, n
        assert spec.card["loss_curve"] == json.loads((reference / "card.json").read_text())["loss_curve"]
        assert not (out / "checkpoint").exists() and _leftovers(out) == [], n


def test_two_trainers_into_one_output_do_not_both_succeed(base, molecule_data, tmp_path, monkeypatch):
    out, started, results = tmp_path / "shared", threading.Event(), {}
    real = S.train_lora

    def slow_start(*args, **kwargs):
        started.set()
        return real(*args, **kwargs)

    monkeypatch.setattr(S, "train_lora", slow_start)

    def first():
        results["first"] = _train(base, molecule_data, out)

    thread = threading.Thread(target=first)
    thread.start()
    assert started.wait(60)
    with pytest.raises(OutputExistsError, match="force"):
        _train(base, molecule_data, out)  # waits for the first, then finds it finished
    thread.join()
    assert S.is_finished(out) and results["first"] is not None


def test_an_output_folder_with_other_files_is_refused_before_training(base, molecule_data, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a specialist directory"):
        _train(base, molecule_data, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def _llama3_tokenizer():
    return base_llm.byte_tokenizer(LLAMA3_SPECIALS, eos="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)


def test_end_of_turn_comes_from_the_chat_template():
    chatml, llama3 = base_llm.byte_tokenizer(), _llama3_tokenizer()
    assert chatml.convert_ids_to_tokens(base_llm.end_of_turn_id(chatml)) == "<|im_end|>"
    assert llama3.convert_ids_to_tokens(base_llm.end_of_turn_id(llama3)) == "<|eot_id|>"
    plain = base_llm.byte_tokenizer(chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    with pytest.raises(InputError, match="not a special token"):
        base_llm.end_of_turn_id(plain)


def test_llama3_batches_end_each_answer_with_eot():
    tok = _llama3_tokenizer()
    batch = C.collate_examples(tok, [C.molecule_example("CCO", "An alcohol.")], max_tokens=128)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == tok("An alcohol.", add_special_tokens=False)["input_ids"] + [eot]
    assert int(batch["slot_mask"][0].sum()) == C.N_TOKENS


def test_load_base_casts_and_keeps_the_weights_hash():
    smoke = scales.get("smoke")
    fp32, bf16 = base_llm.load_base(smoke), base_llm.load_base(smoke, dtype=torch.bfloat16, device="cpu")
    assert bf16.model.dtype == torch.bfloat16 and fp32.model.dtype == torch.float32
    assert bf16.weights_sha256 == fp32.weights_sha256


@pytest.fixture()
def paper_standin(tmp_path):
    """A LLaMA-3-style checkpoint folder (tiny LLaMA, tokenizer without a pad token) for ``load_paper``."""
    tiny = base_llm.load_smoke(seed=3, num_layers=2, hidden_size=32)
    tok = _llama3_tokenizer()
    tok.pad_token = None
    tiny.model.resize_token_embeddings(len(tok))
    tiny.model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_load_paper_sets_a_pad_token_and_hashes_the_weights(paper_standin):
    loaded = base_llm.load_paper(str(paper_standin))
    assert (loaded.tokenizer.pad_token == "<|eot_id|>"
            and loaded.model.config.pad_token_id == loaded.tokenizer.pad_token_id)
    sha = hashlib.sha256((paper_standin / "model.safetensors").read_bytes()).hexdigest()
    assert loaded.weights_sha256 == hashlib.sha256(f"model.safetensors {sha}\n".encode()).hexdigest()


def test_paper_scale_trains_an_r8_cell_lora(paper_standin, tmp_path):
    """``esmerge train --scale paper --modality cell`` as a library call, on the stand-in base."""
    base = base_llm.load_paper(str(paper_standin))
    spec = S.train_for_scale(scales.get("paper"), "cell", tmp_path / "cell", base=base,
                             examples=C.smoke_examples("cell", scales.get("smoke").cell_top_k), steps=3, progress=False)
    card = json.loads((tmp_path / "cell" / "card.json").read_text())
    assert card["scale"] == "paper" and card["max_tokens"] == 384 and card["base_weights_sha256"] == base.weights_sha256
    assert (card["lora"]["r"], card["lora"]["lora_alpha"]) == (8, 32) and spec.projector is None
    assert S.load_specialist(tmp_path / "cell", base).adapter.state.keys() == spec.adapter.state.keys()


def test_probe_blocks_of_varying_length_match_each_sample_alone():
    """Prot2Text-style blocks (length + 2 tokens): padding slots change no real token's state."""
    from esmerge.signals import probe, probe_states

    base = base_llm.load_smoke(seed=0)
    emb = base.model.get_input_embeddings()
    torch.manual_seed(0)
    short, long_ = torch.randn(3, 64), torch.randn(5, 64)
    cell = torch.randn(2, 4, 64)
    varied = probe.build_probes(base.tokenizer, emb, {"protein": [short, long_], "cell": cell})
    assert varied.block_mask["protein"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    states = probe_states.hidden_states(base.model, varied)
    for k, block in enumerate((short, long_)):
        alone = probe.build_probes(base.tokenizer, emb, {"protein": block[None], "cell": cell[k:k + 1]})
        assert alone.attention_mask is None
        ref = probe_states.hidden_states(base.model, alone)
        n = block.shape[0]
        assert torch.allclose(states["tokens"]["protein"][:, k, :n], ref["tokens"]["protein"][:, 0], atol=1e-5)
        assert torch.allclose(states["tokens"]["cell"][:, k], ref["tokens"]["cell"][:, 0], atol=1e-5)
        assert torch.allclose(states["pooled"]["protein"][:, k], ref["pooled"]["protein"][:, 0], atol=1e-5)


def test_probe_blocks_of_one_length_are_built_as_before():
    from esmerge.signals import probe

    base = base_llm.load_smoke(seed=0)
    emb = base.model.get_input_embeddings()
    blocks = torch.randn(2, 8, 64)
    as_list = probe.build_probes(base.tokenizer, emb, {"molecule": list(blocks)})
    as_tensor = probe.build_probes(base.tokenizer, emb, {"molecule": blocks})
    assert as_list.attention_mask is None and as_list.block_mask == {}
    assert torch.equal(as_list.embeds, as_tensor.embeds)
    assert torch.equal(as_list.positions["molecule"], as_tensor.positions["molecule"])


def test_projector_lr_scale_slows_only_the_projector(base, molecule_data, tmp_path):
    """Scale 0 leaves the projector at its seeded initialisation while the LoRA trains as before;
    scale 1 is the plain recipe (the card says which), and a checkpoint of one refuses the other."""
    from esmerge.specialists import encoders

    plain = _train(base, molecule_data, tmp_path / "plain")
    frozen = _train(base, molecule_data, tmp_path / "frozen", projector_lr_scale=0.0)
    init = encoders.make_projector("molecule", base.model.get_input_embeddings(), T.N_TOKENS, RECIPE["seed"])
    for name, value in init.state_dict().items():
        assert torch.equal(frozen.projector.state_dict()[name], value), name
        if name.startswith("net."):
            assert not torch.equal(plain.projector.state_dict()[name], value), name
    assert all(v.abs().sum() > 0 for k, v in frozen.adapter.state.items() if "lora_B" in k)
    assert (plain.card["projector_lr_scale"], frozen.card["projector_lr_scale"]) == (1.0, 0.0)
    assert _train(base, molecule_data, tmp_path / "cut", projector_lr_scale=0.5, stop_after=2) is None
    with pytest.raises(S.SpecialistError, match="projector_lr_scale"):
        _train(base, molecule_data, tmp_path / "cut")


def test_training_takes_the_projector_lr_scale_from_the_recipe_unless_overridden(monkeypatch, tmp_path):
    from esmerge import scales
    from esmerge.cli import main as cli_main

    captured = {}
    monkeypatch.setattr(S, "train_specialist", lambda base, modality, out_dir, **kw: captured.update(kw))
    S.train_for_scale(scales.get("cpu"), "molecule", tmp_path, base=object())
    assert captured["projector_lr_scale"] == scales.get("cpu").train.projector_lr_scale
    S.train_for_scale(scales.get("cpu"), "molecule", tmp_path, base=object(), projector_lr_scale=0.25)
    assert captured["projector_lr_scale"] == 0.25
    seen = {}
    monkeypatch.setattr(S, "train_for_scale", lambda scale, modality, out, **kw: seen.update(kw))
    assert cli_main(["train", "--scale", "cpu", "--modality", "molecule", "--out", str(tmp_path / "m"),
                     "--projector-lr-scale", "0.25"]) == 0
    assert seen["projector_lr_scale"] == 0.25
