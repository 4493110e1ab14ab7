"""Converters on stand-ins of the upstream layouts a user met: full Mol-LLaMA state dicts (integer
buffers), Lightning files with a pickled config, the hub's trainable-only layout, a bf16 Prot2Text-V2
release (rotary frequencies), and the rank an error budget picks (seconds)."""
from __future__ import annotations

# ruff: noqa: F811  (the fixtures imported from test_convert are redefined as test parameters, as pytest wants)
import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import types

import pytest
import standins
import torch
from safetensors.torch import load_file, save_file

# the stand-in bases of test_convert (module-scoped: this module builds its own)
from test_convert import base, ids, other_base  # noqa: F401

from esmerge.errors import UsageError
from esmerge.specialists import convert
from esmerge.specialists.adapters import attach, load_adapter
from esmerge.specialists.base_llm import BaseModel, checkpoint_sha256
from esmerge.specialists.convert import lowrank
from esmerge.specialists.convert.checkpoints import export_command
from esmerge.specialists.load import is_finished, load_specialist

# Every test's weight-hash memos and conversions go to a temporary cache, never the user's.
pytestmark = pytest.mark.usefixtures("private_cache")

QFORMER_POSITION_IDS = "encoder.Qformer.bert.embeddings.position_ids"
BATCH_NORM = "encoder.graph_encoder.moleculestm.molecule_node_model.batch_norms.0"
GIN_NORM = "encoder.graph_encoder.moleculestm.molecule_node_model.gnns.0.mlp.1"


def max_logit_gap(adapter_dir, base_model, reference, ids) -> float:
    import copy

    peft = attach(copy.deepcopy(base_model), {"converted": load_adapter(adapter_dir)})
    with torch.no_grad():
        got, want = peft(input_ids=ids).logits, reference(input_ids=ids).logits[..., : standins.VOCAB]
    return (got - want).abs().max().item()


def rewrite_hf(folder, edit) -> None:
    """Apply ``edit(state) -> state`` to a sharded Hugging Face directory, keeping its index right."""
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shards = sorted(set(index["weight_map"].values()))
    state = {k: v for name in shards for k, v in load_file(folder / name).items()}
    state = edit(state)
    for name in shards:
        (folder / name).unlink()
    save_file({k: v.contiguous() for k, v in state.items()}, folder / shards[0], metadata={"format": "pt"})
    index["weight_map"] = dict.fromkeys(state, shards[0])
    index_file.write_text(json.dumps(index))


# --------------------------------------------------------------------------- 1. integer buffers
def test_full_state_dict_carries_integer_buffers_with_their_dtype(base, ids, tmp_path):
    folder, model = base
    src = tmp_path / "mol-llama"
    reference = standins.mol_llama_checkpoint(src, model, str(folder))
    buffers = {QFORMER_POSITION_IDS: torch.arange(512).expand(1, -1).clone(),
               f"{BATCH_NORM}.num_batches_tracked": torch.tensor(41_235),
               f"{GIN_NORM}.num_batches_tracked": torch.tensor(41_235),
               f"{BATCH_NORM}.running_mean": torch.randn(24), f"{BATCH_NORM}.running_var": torch.rand(24) + 0.5}
    # transformers < 4.31 saved LLaMA's rotary buffer too: the base recomputes it, nothing to carry.
    inv_freq = "llm.base_model.model.model.layers.0.self_attn.rotary_emb.inv_freq"
    rewrite_hf(src, lambda state: state | buffers | {inv_freq: torch.rand(4)})
    out = convert.convert_mol_llama(src, tmp_path / "molecule", base=folder)
    projector, encoder = load_file(out / "projector.safetensors"), load_file(out / "encoder.safetensors")
    assert projector[QFORMER_POSITION_IDS].dtype == torch.int64
    assert torch.equal(projector[QFORMER_POSITION_IDS], buffers[QFORMER_POSITION_IDS])
    for key in (f"{BATCH_NORM}.num_batches_tracked", f"{GIN_NORM}.num_batches_tracked"):
        assert encoder[key].dtype == torch.int64 and encoder[key].item() == 41_235
    assert encoder[f"{BATCH_NORM}.running_mean"].dtype == torch.float32
    card = json.loads((out / "card.json").read_text())
    assert card["integer_buffers"] == sorted([QFORMER_POSITION_IDS, f"{BATCH_NORM}.num_batches_tracked",
                                              f"{GIN_NORM}.num_batches_tracked"])
    assert max_logit_gap(out, model, reference, ids) < 1e-4
    spec = load_specialist(out, BaseModel("paper", model, None, "llama", checkpoint_sha256(folder)))
    assert spec.projector.n_tokens == 8  # the specialist still loads with the carried buffers


def test_integer_lora_tensors_are_still_refused(base, tmp_path):
    folder, model = base
    src = tmp_path / "mol-llama"
    standins.mol_llama_checkpoint(src, model, str(folder))
    key = "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    rewrite_hf(src, lambda state: state | {key: state[key].to(torch.int64)})
    with pytest.raises(convert.CheckpointError, match=rf"{key} has dtype torch.int64; expected a float tensor"):
        convert.convert_mol_llama(src, tmp_path / "out", base=folder)


# --------------------------------------------------------------------------- 2. Lightning file with a pickled config
def fake_upstream_configs(monkeypatch, calls: list):
    """Upstream's ``utils.configuration_mol_llama`` (class names and nesting), registered in
    ``sys.modules`` so that ``torch.save`` pickles the objects under the upstream names. Every
    method that unpickling could run records itself in ``calls``."""
    from transformers import PretrainedConfig

    module = types.ModuleType("utils.configuration_mol_llama")
    package = types.ModuleType("utils")
    package.configuration_mol_llama = module

    def make(name, fields, subs=()):
        def __init__(self, **kwargs):
            for sub, cls in subs:
                setattr(self, sub, getattr(module, cls)(**(kwargs.pop(sub, None) or {})))
            for key, value in fields.items():
                setattr(self, key, kwargs.pop(key, value))
            PretrainedConfig.__init__(self, **kwargs)

        def __setstate__(self, state):
            calls.append(f"{name}.__setstate__")
            self.__dict__.update(state)

        cls = type(name, (PretrainedConfig,), {
            "__init__": __init__, "__setstate__": __setstate__, "model_type": f"mol_llama_{name.lower()}",
            "__module__": module.__name__})
        setattr(module, name, cls)
        return cls

    make("LoraConfig", {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1})
    make("LLMConfig", {"llm_model": "meta-llama/Llama-3.1-8B-Instruct"}, [("lora_config", "LoraConfig")])
    make("QformerConfig", {"bert_name": "allenai/scibert_scivocab_uncased", "num_query_tokens": 8,
                           "cross_attention_freq": 2, "embed_dim": 256})
    make("BlendingModuleConfig", {"num_layers": 4, "num_heads": 8})
    make("UniMolConfig", {"repo_id": "dptech/Uni-Mol-Models", "weights_filename": "mol_pre_no_h_220816.pt"})
    make("MoleculeSTMConfig", {"repo_id": "chao1224/MoleculeSTM"})
    make("GraphEncoderConfig", {"encoder_types": ["unimol", "moleculestm"]},
         [("unimol_config", "UniMolConfig"), ("moleculestm_config", "MoleculeSTMConfig")])
    top = make("MolLLaMAConfig", {}, [("qformer_config", "QformerConfig"),
                                      ("blending_module_config", "BlendingModuleConfig"),
                                      ("graph_encoder_config", "GraphEncoderConfig"), ("llm_config", "LLMConfig")])
    top.model_type = "mol_llama"
    monkeypatch.setitem(sys.modules, "utils", package)
    monkeypatch.setitem(sys.modules, "utils.configuration_mol_llama", module)
    return module


def lightning_file(path, state_dict, model_config) -> None:
    """What upstream stage2.py's ModelCheckpoint writes: Lightning's keys, optimizer states popped,
    ``save_hyperparameters({'train': dict, 'model': MolLLaMAConfig, 'data': dict})``."""
    torch.save({
        "epoch": 9, "global_step": 1234, "pytorch-lightning_version": "2.4.0", "state_dict": state_dict,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10, "completed": 9}}}},
        "callbacks": {"ModelCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 0, 'every_n_epochs': 1, "
                      "'train_time_interval': None}": {"monitor": None, "best_model_score": None,
                                                       "kth_value": torch.tensor(float("inf")),
                                                       "dirpath": "checkpoints/stage2/", "best_k_models": {}}},
        "lr_schedulers": [], "hparams_name": "kwargs",
        "hyper_parameters": {"train": {"filename": "stage2", "precision": "bf16-mixed", "devices": [0, 1, 2, 3],
                                       "init_lr": 1e-4}, "model": model_config, "data": {"batch_size": 4}},
    }, path)


def test_lightning_file_with_a_pickled_config_converts_without_upstream_code(base, ids, tmp_path, monkeypatch):
    folder, model = base
    plain = tmp_path / "plain.ckpt"
    reference = standins.mol_llama_checkpoint(plain, model, str(folder), layout="lightning")
    state = torch.load(plain, weights_only=True)["state_dict"]
    calls = []
    module = fake_upstream_configs(monkeypatch, calls)
    config = module.MolLLaMAConfig(llm_config={"llm_model": str(folder), "lora_config": {"r": 8, "lora_alpha": 32}})
    src = tmp_path / "checkpoints" / "stage2" / "epoch=09.ckpt"
    src.parent.mkdir(parents=True)
    lightning_file(src, state, config)
    with pytest.raises(Exception, match="Unsupported global"):  # what the user met: plain weights_only refuses
        torch.load(src, weights_only=True)
    monkeypatch.delitem(sys.modules, "utils.configuration_mol_llama")  # upstream code is not importable here
    monkeypatch.delitem(sys.modules, "utils")

    out = convert.convert_mol_llama(src, tmp_path / "molecule")  # the base named by the pickled config
    assert calls == []  # no method of the upstream classes ran
    assert is_finished(out) and max_logit_gap(out, model, reference, ids) < 1e-4
    card = json.loads((out / "card.json").read_text())
    assert card["base_name"] == str(folder) and card["base_check"]["named_by_checkpoint"] == str(folder)
    # model_type is a class attribute (not pickled): the upstream class name identifies the config
    assert card["base_check"]["source_model_type"] == "utils.configuration_mol_llama.MolLLaMAConfig"

    source = convert.TensorSource(src, inert=convert.mol_llama.CONFIG_CLASSES)
    assert all(isinstance(v, torch.Tensor) for v in (source.get(k) for k in source.keys()))
    hparams = source.extra["hyper_parameters"]
    assert hparams["model"]["__class__"] == "utils.configuration_mol_llama.MolLLaMAConfig"
    assert hparams["model"]["llm_config"]["lora_config"]["r"] == 8 and hparams["train"]["devices"] == [0, 1, 2, 3]

    sixteen = module.MolLLaMAConfig(llm_config={"llm_model": str(folder), "lora_config": {"r": 16}})
    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))
    monkeypatch.setitem(sys.modules, "utils.configuration_mol_llama", module)
    lightning_file(tmp_path / "r16.ckpt", state, sixteen)
    with pytest.raises(convert.CheckpointError, match="lora_config.r is 16"):  # the pickled config is checked
        convert.convert_mol_llama(tmp_path / "r16.ckpt", tmp_path / "out16")


class System:
    """Unpickling calls ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_the_export_command_admits_only_confirmed_classes_and_writes_the_state_dict(tmp_path):
    """The refusal's export command, run as a user would (stdin their answer): it names the classes the
    file imports, writes plain tensors only after Enter, and nothing when the user stops at the question."""
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}
    ckpt = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": argparse.Namespace(lr=1e-4)}, ckpt)
    with pytest.raises(Exception):
        torch.load(ckpt, weights_only=True)  # the class is not admitted by default: the case the command is for
    argv = shlex.split(export_command(ckpt))
    argv[0] = sys.executable

    declined = subprocess.run(argv, input="", capture_output=True, text=True)  # Ctrl-D at the question
    assert declined.returncode != 0 and "argparse.Namespace" in declined.stdout
    assert not ckpt.with_suffix(".safetensors").exists()

    confirmed = subprocess.run(argv, input="\n", capture_output=True, text=True)
    assert confirmed.returncode == 0, confirmed.stderr
    written = load_file(ckpt.with_suffix(".safetensors"))
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)


def test_planted_pickles_execute_nothing(base, tmp_path, monkeypatch):
    folder, model = base
    plain = tmp_path / "plain.ckpt"
    standins.mol_llama_checkpoint(plain, model, str(folder), layout="lightning")
    state = torch.load(plain, weights_only=True)["state_dict"]
    marker = tmp_path / "pwned"
    command = f"touch {marker}"

    src = tmp_path / "evil.ckpt"
    lightning_file(src, state, System(command))
    with pytest.raises(convert.CheckpointError) as err:
        convert.convert_mol_llama(src, tmp_path / "out", base=folder)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{src}: not a plain tensor checkpoint (UnpicklingError)")
    assert "export its state_dict upstream: python -c" in message and "['state_dict']" in message
    assert not marker.exists() and not (tmp_path / "out").exists()

    # The same call hidden behind an admitted upstream name: the name resolves to a placeholder, whose
    # construction keeps the argument and runs nothing.
    class AdmittedName:  # pickled under an admitted name, reducing to a call of that name with a command
        __module__, __qualname__ = "utils.configuration_mol_llama", "MolLLaMAConfig"

        def __init__(self, command):
            self.command = command

        def __reduce__(self):
            return (AdmittedName, (self.command,))

    module = types.ModuleType("utils.configuration_mol_llama")
    module.MolLLaMAConfig = AdmittedName
    monkeypatch.setitem(sys.modules, "utils", types.ModuleType("utils"))
    monkeypatch.setitem(sys.modules, "utils.configuration_mol_llama", module)
    disguised = tmp_path / "disguised.ckpt"
    lightning_file(disguised, state, AdmittedName(command))
    source = convert.TensorSource(disguised, inert=convert.mol_llama.CONFIG_CLASSES)
    assert source.extra["hyper_parameters"]["model"] == {
        "__class__": "utils.configuration_mol_llama.MolLLaMAConfig", "args": [command]}
    assert not marker.exists()


# --------------------------------------------------------------------------- 5. hub layout: trainable tensors only
def hub_checkpoint(out, model, named_base: str):
    """The hub's layout: config.json naming the base, LoRA + Q-Former/blending + llm_proj, no base tensors."""
    reference = standins.mol_llama_checkpoint(out, model, named_base)
    rewrite_hf(out, lambda state: {k: v for k, v in state.items()
                                   if "lora_" in k or (k.startswith(("encoder.", "llm_proj."))
                                                       and not k.startswith("encoder.graph_encoder."))}
               | {QFORMER_POSITION_IDS: torch.arange(512).expand(1, -1).clone()})
    return reference


def test_hub_layout_checks_a_given_base_against_the_named_one(base, other_base, ids, tmp_path):
    import shutil

    folder, model = base
    src = tmp_path / "hub"
    reference = hub_checkpoint(src, model, str(folder))
    with pytest.raises(convert.CheckpointError, match=r"trained on .*llama, but the base .* has other weights"):
        convert.convert_mol_llama(src, tmp_path / "out", base=other_base[0])
    copy = tmp_path / "copy-of-base"
    shutil.copytree(folder, copy)
    out = convert.convert_mol_llama(src, tmp_path / "molecule", base=copy)
    card = json.loads((out / "card.json").read_text())
    assert card["base_identity"] == "weights hash equals the named base's"
    assert card["base_check"]["named_weights_sha256"] == card["base_weights_sha256"] == checkpoint_sha256(folder)
    assert max_logit_gap(out, model, reference, ids) < 1e-4

    named = tmp_path / "named"  # a base named by hub id that is not on this machine: recorded, not compared
    hub_checkpoint(named, model, "example-org/not-downloaded-llama")
    out = convert.convert_mol_llama(named, tmp_path / "m2", base=folder, base_sha256=checkpoint_sha256(folder))
    card = json.loads((out / "card.json").read_text())
    assert card["base_check"]["named_weights_sha256"] == "not on this machine; not compared"
    assert card["base_identity"] == "weights hash equals the expected one (--base-sha256)"
    with pytest.raises(convert.CheckpointError, match=r"is not the expected 000000000000\.\.\. \(--base-sha256\)"):
        convert.convert_mol_llama(named, tmp_path / "m3", base=folder, base_sha256="0" * 64)


# --------------------------------------------------------------------------- 3. Prot2Text-V2 rotary frequencies
INV_FREQ = "esm_encoder.encoder.layer.0.attention.self.rotary_embeddings.inv_freq"


def test_bf16_release_keeps_rotary_frequencies_in_float32(base, tmp_path):
    folder, model = base
    src = tmp_path / "p2t"
    standins.prot2text_checkpoint(src, model)
    exact = load_file(next(src.glob("*.safetensors")).parent / _shard_of(src, INV_FREQ))[INV_FREQ]
    rewrite_hf(src, lambda state: {k: v.to(torch.bfloat16) for k, v in state.items()})  # the release is bf16
    out = tmp_path / "protein"
    convert.convert_prot2text(src, out, base=folder)
    encoder = load_file(out / "encoder.safetensors")
    assert encoder[INV_FREQ].dtype == torch.float32 and torch.equal(encoder[INV_FREQ], exact)
    assert encoder["esm_encoder.embeddings.word_embeddings.weight"].dtype == torch.bfloat16  # the rest as stored
    card = json.loads((out / "card.json").read_text())
    assert card["encoder"]["rotary_inv_freq"] == {"dtype": "float32", "buffers": 1, "recomputed": 1}
    # Why it matters: ESM casts positions to the buffer's dtype; in bf16 they round above 256.
    positions = torch.arange(300)
    assert torch.equal(positions.type_as(encoder[INV_FREQ]), positions.float())
    assert not torch.equal(positions.type_as(encoder[INV_FREQ].bfloat16()).float(), positions.float())

    rewrite_hf(src, lambda state: state | {INV_FREQ: state[INV_FREQ] * 2})
    with pytest.raises(convert.CheckpointError, match="is not ESM-2's rotary frequencies for head width 8"):
        convert.convert_prot2text(src, tmp_path / "bad", base=folder)


def _shard_of(folder, key):
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


# --------------------------------------------------------------------------- 4. rank under an error budget
def test_rank_selection_on_known_singular_values():
    s = torch.linalg.svdvals(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    curve = lowrank.error_by_rank(s)
    assert curve[2].item() == pytest.approx(math.sqrt(5) / math.sqrt(30), abs=1e-12)
    assert curve[0].item() == 1.0 and curve[4].item() == 0.0
    budget = math.sqrt(5 / 30) + 1e-9
    assert lowrank.smallest_rank_within({"m": curve}, budget) == 2
    assert lowrank.smallest_rank_within({"m": curve}, budget - 2e-9) == 3
    _, _, measured = lowrank.lowrank_factors(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])), 2, 32)
    assert measured == pytest.approx(curve[2].item(), rel=1e-6)


def test_lora_extract_picks_the_smallest_rank_within_the_budget(base, tmp_path):
    folder, model = base
    finetuned = standins.full_finetune_checkpoint(tmp_path / "ft", model)
    ft, bs = finetuned.state_dict(), model.state_dict()
    curves = {}
    for name, weight in bs.items():
        if name.endswith("proj.weight"):
            layer, module = name.split(".")[2], name.split(".")[4]
            curves[f"layers.{layer}.{module}"] = lowrank.error_by_rank(torch.linalg.svdvals(ft[name] - weight))
    budget = 0.5
    worst = [max(c[r].item() if r < len(c) else 0.0 for c in curves.values()) for r in range(1, 33)]
    want = 1 + next(i for i, e in enumerate(worst) if e <= budget)
    assert want > 1 and worst[want - 2] > budget  # a rank below would break the budget

    result = convert.lora_extract(tmp_path / "ft", folder, tmp_path / "out", error_budget=budget)
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    selection = card["extraction"]["rank_selection"]
    assert selection["chosen_rank"] == want == card["lora"]["r"] == result.report["rank"]
    assert load_adapter(tmp_path / "out").config["r"] == want
    errors = card["extraction"]["per_matrix_relative_error"]
    assert len(errors) == 14 and max(errors.values()) <= budget + 1e-5 and selection["measured_within_budget"]
    assert card["extraction"]["max_relative_error"] == pytest.approx(max(errors.values()))
    assert card["extraction"]["mean_relative_error"] == pytest.approx(sum(errors.values()) / 14)
    assert selection["predicted_max_error"] == pytest.approx(worst[want - 1], abs=1e-6)
    assert selection["mergeable"] is (want == 8) and not (tmp_path / "out" / "spectra").exists()
    assert f"rank {want} is the smallest" in convert.summary(result.report)

    with pytest.raises(convert.CheckpointError, match=r"no rank up to 2 keeps every matrix within the error budget"):
        convert.lora_extract(tmp_path / "ft", folder, tmp_path / "out2", error_budget=budget, max_rank=2)
    for bad in (1.5, -0.1):
        with pytest.raises(UsageError, match="--error-budget must be a relative error in"):
            convert.lora_extract(tmp_path / "ft", folder, tmp_path / "out3", error_budget=bad)
