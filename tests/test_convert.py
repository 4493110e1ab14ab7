"""Converters of the published checkpoints, on tiny stand-ins in their real layouts (seconds)."""
from __future__ import annotations

import json
import math

import pytest
import standins
import torch
from safetensors.torch import load_file, save_file

from esmerge.errors import InputError, OutputExistsError
from esmerge.specialists import convert
from esmerge.specialists.adapters import attach, load_adapter
from esmerge.specialists.base_llm import BaseModel, checkpoint_sha256, state_dict_sha256
from esmerge.specialists.convert import extract, lowrank
from esmerge.specialists.load import SpecialistError, is_finished, load_specialist
from esmerge.specialists.raw_encoder import UnavailableEncoder

BASE_NAME = "meta-llama/Llama-3.1-8B-Instruct"


# Every test's weight-hash memos and conversions go to a temporary cache, never the user's.
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def base(tmp_path_factory, private_cache):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("base") / "llama"
    return folder, standins.save_base(folder, seed=0)


@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """Same architecture, different weights: the wrong base."""
    folder = tmp_path_factory.mktemp("other") / "llama"
    return folder, standins.save_base(folder, seed=7)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, standins.VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))


def logits_with(adapter_dir, base_model, ids):
    """Logits of ``base_model`` + the converted adapter (on a copy; the base stays untouched)."""
    import copy

    peft = attach(copy.deepcopy(base_model), {"converted": load_adapter(adapter_dir)})
    with torch.no_grad():
        return peft(input_ids=ids).logits


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def relative_delta_error(adapter_dir, finetuned, base_model):
    """Measured ||W' - W - (alpha/r) B A|| / ||W' - W|| per target matrix, from the written files."""
    adapter = load_adapter(adapter_dir)
    scale = adapter.config["lora_alpha"] / adapter.config["r"]
    ft, bs = finetuned.state_dict(), base_model.state_dict()
    out = {}
    for key, a in adapter.state.items():
        if ".lora_A." not in key:
            continue
        b = adapter.state[key.replace("lora_A", "lora_B")]
        name = key.replace("base_model.model.", "").replace(".lora_A", "")
        delta = ft[name] - bs[name]
        layer, module = name.split(".")[2], name.split(".")[4]
        out[f"layers.{layer}.{module}"] = ((delta - scale * b @ a).norm() / delta.norm()).item()
    return out


# --------------------------------------------------------------------------- the pure parts
def test_state_digest_is_the_models_state_dict_hash(base):
    folder, model = base
    source = convert.TensorSource(folder)
    assert convert.state_digest(source) == state_dict_sha256(model)


def test_lowrank_factors_keep_the_top_singular_values():
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(20, 12, generator=g)
    a, b, err = lowrank.lowrank_factors(delta, rank=8, alpha=32)
    s = torch.linalg.svdvals(delta)
    assert a.shape == (8, 12) and b.shape == (20, 8)
    assert err == pytest.approx((s[8:].norm() / s.norm()).item(), rel=1e-4)  # Eckart-Young
    assert torch.allclose(torch.linalg.svdvals(4 * b @ a)[:8], s[:8], atol=1e-4)
    assert a.norm().item() == pytest.approx(b.norm().item(), rel=1e-4)  # singular values split evenly
    zero_a, zero_b, zero_err = lowrank.lowrank_factors(torch.zeros(5, 4), 8, 32)
    assert zero_err == 0.0 and not zero_a.any() and not zero_b.any()


# --------------------------------------------------------------------------- Mol-LLaMA
@pytest.mark.parametrize("layout", ["hf", "lightning"])
def test_mol_llama_round_trips_logits(base, ids, tmp_path, layout):
    folder, model = base
    src = tmp_path / ("mol-llama" if layout == "hf" else "checkpoints/stage2/epoch=09.ckpt")
    source_llm = standins.mol_llama_checkpoint(src, model, str(folder), layout=layout)
    out = convert.convert_mol_llama(src, tmp_path / "molecule", base=folder)
    assert is_finished(out)
    want = logits(source_llm, ids)[..., : standins.VOCAB]  # the added [PAD]/<mol> rows are extra columns
    got = logits_with(out, model, ids)
    assert (got - want).abs().max().item() < 1e-4
    assert (got - logits(model, ids)).abs().max().item() > 1e-2  # the LoRA does something
    card = json.loads((out / "card.json").read_text())
    assert card["modality"] == "molecule" and card["base_weights_sha256"] == checkpoint_sha256(folder)
    assert card["lora"] == {"r": 8, "lora_alpha": 32, "target_modules": sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])}
    projector = load_file(out / "projector.safetensors")
    assert torch.equal(projector["llm_proj.weight"], standins._encoder_standins(1, 32, False)["llm_proj.weight"])
    if layout == "hf":
        assert card["vocab"] == {"base": standins.VOCAB, "added_rows": 2}
        assert projector["vocab.model.embed_tokens.weight.added_rows"].shape == (2, 32)
        assert "encoder.graph_encoder.unimol.embed_tokens.weight" in load_file(out / "encoder.safetensors")
        assert card["base_identity"] == "weights compared"
    else:
        assert not (out / "encoder.safetensors").exists() and card["vocab"]["added_rows"] == 0
    spec = load_specialist(out, BaseModel("paper", model, None, BASE_NAME, checkpoint_sha256(folder)))
    # Mol-LLaMA's own encoder is an optional extra: without it the specialist loads (its LoRA merges)
    # and keeps the converted tensors, but refuses to encode molecules.
    assert isinstance(spec.projector, UnavailableEncoder) and spec.projector.n_tokens == 8
    assert spec.card["encoder"]["n_tokens"] == 8
    with pytest.raises(SpecialistError, match="trained on base weights"):
        load_specialist(out, BaseModel("paper", model, None, BASE_NAME, "0" * 64))


def test_mol_llama_refuses_the_wrong_base(base, other_base, tmp_path):
    folder, model = base
    standins.mol_llama_checkpoint(tmp_path / "src", model, str(folder))
    with pytest.raises(convert.CheckpointError, match=r"differs from the base .*pass it \(--base\)"):
        convert.convert_mol_llama(tmp_path / "src", tmp_path / "out", base=other_base[0])
    assert not (tmp_path / "out").exists()


def test_mol_llama_reads_a_legacy_torch_file(base, ids, tmp_path):
    folder, model = base
    src = tmp_path / "stage2.ckpt"
    source_llm = standins.mol_llama_checkpoint(src, model, str(folder), layout="lightning")
    torch.save(torch.load(src, weights_only=True), src, _use_new_zipfile_serialization=False)  # not mmap-able
    out = convert.convert_mol_llama(src, tmp_path / "molecule", base=folder)
    want = logits(source_llm, ids)[..., : standins.VOCAB]
    assert (logits_with(out, model, ids) - want).abs().max().item() < 1e-4


def test_mol_llama_refuses_wrong_shapes_and_rank(base, tmp_path):
    folder, model = base
    small = tmp_path / "small"
    standins.save_base(small, seed=0, hidden_size=16)
    src = tmp_path / "stage2.ckpt"
    standins.mol_llama_checkpoint(src, model, str(folder), layout="lightning")
    with pytest.raises(convert.CheckpointError,
                       match=r"lora_A.default.weight has shape \(8, 64\), but the base needs \(8, 32\)"):
        convert.convert_mol_llama(src, tmp_path / "out", base=small)
    rank16 = tmp_path / "rank16.ckpt"
    standins.mol_llama_checkpoint(rank16, model, str(folder), layout="lightning", rank=16)
    with pytest.raises(convert.CheckpointError, match="has rank 16; ES-Merging needs the shared r = 8"):
        convert.convert_mol_llama(rank16, tmp_path / "out", base=folder)
    hf16 = tmp_path / "hf16"
    standins.mol_llama_checkpoint(hf16, model, str(folder), rank=16)
    with pytest.raises(convert.CheckpointError, match=r"lora_config.r is 16"):
        convert.convert_mol_llama(hf16, tmp_path / "out", base=folder)


def test_mol_llama_refuses_nan_and_planted_pickles(base, tmp_path, capsys):
    folder, model = base
    src = tmp_path / "src"
    standins.mol_llama_checkpoint(src, model, str(folder), shards=1)
    shard = src / "model-00001-of-00001.safetensors"
    state = load_file(shard)
    key = "llm.base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"
    state[key][0, 0] = float("nan")
    save_file(state, shard)
    with pytest.raises(convert.CheckpointError, match=rf"{key} contains NaN or Inf"):
        convert.convert_mol_llama(src, tmp_path / "out", base=folder)

    class Planted:
        def __reduce__(self):
            return (print, ("ran planted code",))

    planted = tmp_path / "planted.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "hook": Planted()}, planted)
    with pytest.raises(convert.CheckpointError,
                       match=r"planted.ckpt: not a plain tensor checkpoint .*weights_only=True"):
        convert.convert_mol_llama(planted, tmp_path / "out", base=folder)
    assert "ran planted code" not in capsys.readouterr().out
    assert issubclass(convert.CheckpointError, InputError)


# --------------------------------------------------------------------------- Prot2Text-V2 and lora-extract
def test_prot2text_rank8_delta_is_recovered_exactly(base, ids, tmp_path):
    folder, model = base
    decoder = standins.prot2text_checkpoint(tmp_path / "p2t", model, delta_rank=8)
    result = convert.convert_prot2text(tmp_path / "p2t", tmp_path / "protein", base=folder)
    out = tmp_path / "protein"
    assert result.report["max_relative_error"] < 1e-5
    assert (logits_with(out, model, ids) - logits(decoder, ids)).abs().max().item() < 1e-4
    card = json.loads((out / "card.json").read_text())
    assert card["modality"] == "protein" and card["n_tokens"] is None
    assert card["encoder"]["placeholder_id"] == standins.VOCAB - 2
    assert len(card["extraction"]["per_layer_relative_error"]) == 2
    assert set(load_file(out / "projector.safetensors")) >= {"adapter.fc1.weight", "adapter.fc2.weight"}
    assert any(k.startswith("esm_encoder.") for k in load_file(out / "encoder.safetensors"))
    assert not (out / "factors").exists() and not (out / "recipe.json").exists()


def test_full_rank_extraction_reports_the_error_it_makes(base, ids, tmp_path):
    folder, model = base
    finetuned = standins.full_finetune_checkpoint(tmp_path / "ft", model)
    result = convert.lora_extract(tmp_path / "ft", folder, tmp_path / "out", rank=8)
    measured = relative_delta_error(tmp_path / "out", finetuned, model)
    reported = result.report["per_matrix_relative_error"]
    assert set(measured) == set(reported) and len(reported) == 14
    for name, err in measured.items():
        assert reported[name] == pytest.approx(err, abs=1e-5)
        assert 0.2 < err < 1.0  # a full-rank delta loses a real share at rank 8
    layer0 = [measured[f"layers.0.{m}"]
              for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")]
    assert result.report["per_layer_relative_error"][0] <= max(layer0) + 1e-6
    assert set(result.report["changed_other_tensors"]) == {"model.norm.weight"}
    # The extracted adapter moves the base towards the fine-tune, not all the way.
    gap_base = (logits(model, ids) - logits(finetuned, ids)).norm()
    gap_lora = (logits_with(tmp_path / "out", model, ids) - logits(finetuned, ids)).norm()
    assert gap_lora < gap_base
    assert "worst matrix at rank 8" in convert.summary(result.report)


def test_extraction_refuses_the_wrong_base_and_nan(base, other_base, tmp_path):
    folder, model = base
    standins.prot2text_checkpoint(tmp_path / "p2t", model)
    with pytest.raises(convert.CheckpointError, match=r"llama_decoder\..* differs from the base .*pass the right base"):
        convert.convert_prot2text(tmp_path / "p2t", tmp_path / "out", base=other_base[0])
    standins.full_finetune_checkpoint(tmp_path / "ft", model)
    with pytest.raises(convert.CheckpointError, match=r"layer 0 differs from the base .* not a fine-tune of that base"):
        convert.lora_extract(tmp_path / "ft", other_base[0], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    weights = tmp_path / "ft" / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.self_attn.v_proj.weight"][3, 3] = float("inf")
    save_file(state, weights)
    with pytest.raises(convert.CheckpointError, match=r"model.layers.1.self_attn.v_proj.weight contains NaN or Inf"):
        convert.lora_extract(tmp_path / "ft", folder, tmp_path / "out")


# --------------------------------------------------------------------------- atomic, resumable
def test_interrupted_extraction_leaves_nothing_finished_and_resumes(base, tmp_path, monkeypatch):
    folder, model = base
    standins.prot2text_checkpoint(tmp_path / "p2t", model, delta_rank=None)
    reference = convert.convert_prot2text(tmp_path / "p2t", tmp_path / "reference", base=folder)
    real, calls = lowrank.lowrank_factors, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:  # layer 0 (7 matrices) done, layer 1 half-way
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lowrank, "lowrank_factors", interrupted)
    out = tmp_path / "protein"
    with pytest.raises(KeyboardInterrupt):
        convert.convert_prot2text(tmp_path / "p2t", out, base=folder)
    partial = tmp_path / ".protein.partial"
    assert not out.exists() and partial.exists()
    assert not is_finished(partial) and not (partial / "card.json").exists()
    assert sorted(p.name for p in (partial / extract.FACTORS).iterdir()) == ["layer_000.safetensors"]

    calls.clear()
    monkeypatch.setattr(lowrank, "lowrank_factors", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    result = convert.convert_prot2text(tmp_path / "p2t", out, base=folder)
    assert len(calls) == 7 and result.report["resumed_layers"] == 1  # only layer 1 was recomputed
    assert is_finished(out) and not partial.exists()
    assert result.report["per_matrix_relative_error"] == reference.report["per_matrix_relative_error"]
    want, got = (load_file(tmp_path / "reference" / "adapter_model.safetensors"),
                 load_file(out / "adapter_model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_changed_source_discards_the_partial_work(base, ids, tmp_path, monkeypatch):
    folder, model = base
    standins.prot2text_checkpoint(tmp_path / "p2t", model, delta_rank=8, seed=2)
    real, calls = lowrank.lowrank_factors, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # layer 0 finished and stored
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lowrank, "lowrank_factors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.convert_prot2text(tmp_path / "p2t", tmp_path / "out", base=folder)
    assert (tmp_path / ".out.partial" / extract.FACTORS / "layer_000.safetensors").exists()
    monkeypatch.setattr(lowrank, "lowrank_factors", real)
    decoder = standins.prot2text_checkpoint(tmp_path / "p2t", model, delta_rank=8, seed=5)  # same files, new weights
    result = convert.convert_prot2text(tmp_path / "p2t", tmp_path / "out", base=folder)
    assert result.report["resumed_layers"] == 0 and result.report["max_relative_error"] < 1e-5
    assert (logits_with(tmp_path / "out", model, ids) - logits(decoder, ids)).abs().max().item() < 1e-4


def test_existing_outputs_are_refused_unless_forced(base, tmp_path):
    folder, model = base
    src = tmp_path / "src.ckpt"
    standins.mol_llama_checkpoint(src, model, str(folder), layout="lightning")
    out = tmp_path / "molecule"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"half a file")  # e.g. an interrupted copy
    with pytest.raises(OutputExistsError, match="exists but is not a finished specialist"):
        convert.convert_mol_llama(src, out, base=folder)
    with pytest.raises(OutputExistsError, match="exists but is not a finished specialist"):  # not esmerge's: kept
        convert.convert_mol_llama(src, out, base=folder, force=True)
    assert (out / "adapter_model.safetensors").read_bytes() == b"half a file"
    (out / "adapter_model.safetensors").unlink()
    out.rmdir()
    convert.convert_mol_llama(src, out, base=folder)
    assert is_finished(out) and math.isfinite(load_file(out / "adapter_model.safetensors")[
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].sum().item())
    with pytest.raises(OutputExistsError, match="already holds a converted specialist"):
        convert.convert_mol_llama(src, out, base=folder)
    convert.convert_mol_llama(src, out, base=folder, force=True)
    assert is_finished(out) and not (tmp_path / ".molecule.replaced").exists()


def test_a_second_converter_waits_for_the_first(base, tmp_path):
    import threading

    from esmerge.cache import key_lock

    folder, model = base
    src = tmp_path / "src.ckpt"
    standins.mol_llama_checkpoint(src, model, str(folder), layout="lightning")
    out, errors = tmp_path / "molecule", []

    def second():
        try:
            convert.convert_mol_llama(src, out, base=folder)
        except Exception as err:  # reported below
            errors.append(err)

    with key_lock(out):  # as a first converter holds it while it writes
        worker = threading.Thread(target=second)
        worker.start()
        worker.join(timeout=1.0)
        assert worker.is_alive() and not out.exists()  # waiting, nothing written
    worker.join(timeout=60)
    assert not errors and is_finished(out)
