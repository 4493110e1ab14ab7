"""The command line: every refusal is one line naming the value or file (exit 1, usage 2), before any model
loads where it can be; --debug shows the traceback; bring-your-own adapters through `esmerge merge`."""
from __future__ import annotations

import json
import re

import pytest
import torch
from test_byo import trained_fixture  # noqa: F401  (the fixture `trained`: the two adapters trained for the byo tests)
from test_data import needs_data

from esmerge.cli import main
from esmerge.specialists.adapters import load_merged


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


BYO = ["--base", "smoke", "--adapter", "first=nowhere/a", "--adapter", "second=nowhere/b"]


@pytest.mark.parametrize("argv, exit_code, words", [
    (["merge", "--scale", "smoke", "--method", "es", "--set", "tau=0.1", "--out", "X"], 2,
     ["unknown hyper-parameter 'tau'", "tau_layer"]),
    (["merge", "--scale", "smoke", "--method", "es", "--set", "tau_layer=abc", "--out", "X"], 2,
     ["tau_layer", "'abc'"]),
    (["merge", "--scale", "smoke", "--method", "es", "--set", "n_projections=0", "--out", "X"], 2, ["n_projections"]),
    (["merge", "--scale", "smoke", "--method", "es", "--probe-k", "0", "--out", "X"], 2, ["probe_k"]),
    (["merge", "--scale", "smoke", "--method", "nope", "--out", "X"], 2, ["nope"]),
    (["merge", "--scale", "smoke", "--set", "novalue", "--out", "X"], 2, ["KEY=VALUE"]),
    (["merge", "--adapter", "a=b", "--out", "X"], 2, ["--base"]),
    (["merge", "--scale", "smoke", "--method", "adamerging", "--out", "X"], 2,
     ["adamerging", "esmerge regenerate --scale smoke --only 06_merging"]),
    (["merge", "--scale", "smoke", "--method", "avg-ft", "--out", "X"], 2, ["avg-ft", "06_merging"]),
    # options that do not apply are refused, not ignored
    (["merge", *BYO, "--method", "avg", "--probe", "p.jsonl", "--out", "X"], 2, ["--probe", "'avg'", "drop --probe"]),
    (["merge", *BYO, "--method", "ties", "--no-chat", "--out", "X"], 2, ["--no-chat", "'ties'"]),
    (["merge", *BYO, "--method", "avg", "--specialists", "d", "--out", "X"], 2, ["--specialists", "--adapter"]),
    (["merge", *BYO, "--scale", "smoke", "--method", "avg", "--out", "X"], 2, ["--scale", "--adapter"]),
    (["merge", *BYO, "--probe-k", "4", "--out", "X"], 2, ["--probe-k", "--adapter"]),
    (["merge", "--scale", "smoke", "--method", "avg", "--space", "product", "--out", "X"], 2, ["--space", "--adapter"]),
    (["merge", "--scale", "smoke", "--dtype", "bfloat16", "--out", "X"], 2, ["--dtype", "--adapter"]),
    (["merge", "--scale", "smoke", "--probe", "p.jsonl", "--out", "X"], 2, ["--probe", "--adapter"]),
    (["merge", *BYO, "--method", "es", "--space", "product", "--out", "X"], 2, ["--space product", "'es'"]),
    (["merge", *BYO, "--method", "avg", "--rank", "4", "--out", "X"], 2, ["--rank", "--space product"]),
    (["merge", *BYO, "--method", "ties", "--space", "product", "--set", "scope=model", "--out", "X"], 2,
     ["scope=model"]),
    (["merge", *BYO, "--method", "ties", "--set", "kep=0.5", "--probe", "p.jsonl", "--out", "X"], 2,
     ["unknown hyper-parameter 'kep'"]),  # a bad value is named first
    (["evaluate", "--scale", "smoke", "--model", "nothing-here"], 2, ["nothing-here", "esmerge.json"]),
    (["evaluate", "--scale", "smoke", "--model", "base", "--n-eval", "0"], 2, ["n_eval=0"]),
    (["evaluate", "--scale", "smoke", "--model", "base", "--benchmarks", "Nope"], 2, ["Nope"]),
    (["regenerate", "--scale", "smoke", "--jobs", "0"], 2, ["--jobs"]),
    (["train", "--scale", "smoke"], 2, ["--modality"]),
])
def test_refusals_are_one_line_before_any_model_loads(argv, exit_code, words, capsys, monkeypatch, tmp_path):
    from transformers.models.llama import modeling_llama

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built before the refusal")

    monkeypatch.setattr(modeling_llama.LlamaForCausalLM, "__init__", no_model)
    monkeypatch.chdir(tmp_path)
    assert main(argv) == exit_code
    line = _one_line(capsys)
    assert line.startswith(f"esmerge {argv[0]}: ")
    for word in words:
        assert word in line, (word, line)


def test_existing_output_is_refused_without_force_before_loading(tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "esmerge.json").write_text("{}")
    assert main(["merge", "--scale", "smoke", "--method", "avg", "--out", str(out)]) == 1
    line = _one_line(capsys)
    assert str(out) in line and "--force" in line


def test_debug_shows_the_traceback(capsys):
    from esmerge.errors import UsageError

    with pytest.raises(UsageError):
        main(["merge", "--scale", "smoke", "--set", "tau=1", "--out", "X", "--debug"])


def test_data_dir_that_is_not_a_folder_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ESMERGE_DATA_DIR", str(tmp_path / "nonexistent"))
    assert main(["data", "verify"]) == 1
    assert "is not a folder" in _one_line(capsys)


@needs_data
def test_evaluate_scores_by_generation_on_request(tmp_path, capsys):
    """--scoring generate: greedy replies read by their `Final answer:`; the table still prints."""
    argv = ["evaluate", "--scale", "smoke", "--model", "base", "--scoring", "generate", "--max-new-tokens", "3",
            "--benchmarks", "GDSC2", "--n-eval", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "GDSC2" in capsys.readouterr().out
    (result,) = list(tmp_path.rglob("GDSC2-*.json"))
    record = json.loads(result.read_text())
    # a 3-token reply of a random smoke model holds no valid `Final answer:`: every answer is invalid
    assert record["scoring"] == "generate" and record["n"] == 2 and record["invalid_rate"] == 100.0


def test_methods_lists_declared_hyper_parameters(capsys):
    assert main(["methods", "es"]) == 0
    out = capsys.readouterr().out
    assert "tau_layer" in out and "n_projections" in out
    assert "layer softmax temperature" in out  # one method: each parameter's doc, wrapped


def test_methods_fits_100_columns_and_says_what_each_method_needs(capsys):
    from esmerge import methods

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= 100
    rows = [re.split(r"\s{2,}", line) for line in lines[1:] if line[:1].strip()]
    needs = {row[0]: row[1] for row in rows if row[0] in methods.names()}
    assert set(needs) == set(methods.names())
    assert {m: needs[m] for m in ("es", "es-layer", "es-element", "adamerging", "avg-ft", "avg", "ties")} == {
        "es": "probe", "es-layer": "probe", "es-element": "probe", "adamerging": "data", "avg-ft": "data, labels",
        "avg": "-", "ties": "-"}
    assert all(needs[m] == "-" for m in methods.names() if not methods.get(m).needs_context)  # from the registry
    assert any(line.startswith("needs: - = the adapters alone; probe = probe texts") for line in lines)


def test_merge_help_groups_its_options_and_gives_examples(capsys):
    assert main(["merge", "--help"]) == 0
    out = capsys.readouterr().out
    for words in ("Merge LoRA adapters with a registered method", "bring your own adapters",
                  "this project's specialists (a scale)", "method and output", "examples:",
                  "--space product", "--dtype {float32,bfloat16,auto}"):
        assert words in out, words
    assert out.count("  esmerge merge ") == 3


def test_bring_your_own_adapters_through_the_cli(trained, tmp_path, capsys):
    _, root, probes = trained
    out = tmp_path / "es"
    argv = ["merge", "--base", "smoke", "--adapter", f"molecule={root / 'molecule'}",
            "--adapter", f"protein={root / 'protein'}", "--probe", str(probes), "--method", "es", "--out", str(out)]
    rc, captured = main(argv), capsys.readouterr()
    assert rc == 0, captured.err
    assert f"probe file {probes}: 3 probes; span molecule: 3 probes, 3 words; span protein: 3 probes, 3 words" \
        in captured.out  # counted before the base loads
    merged = load_merged(out)
    assert merged.meta["method"] == "es" and set(merged.adapter.state)
    tokens = len("MKTAYIAKQR" "GAVL" "MSTNPKPQRKTW")  # byte tokens of the three protein spans
    assert merged.meta["probe_spans"]["protein"] == {"probes": 3, "words": 3, "tokens": tokens}
    assert main(argv) == 1  # the finished output is not replaced without --force
    assert "--force" in _one_line(capsys)
    nan = tmp_path / "nan"
    nan.mkdir()
    for f in (root / "protein").iterdir():
        (nan / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    state = load_file(nan / "adapter_model.safetensors")
    key = next(iter(state))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, nan / "adapter_model.safetensors")
    assert main(["merge", "--base", "smoke", "--adapter", f"molecule={root / 'molecule'}", "--adapter",
                 f"protein={nan}", "--method", "avg", "--out", str(tmp_path / "x")]) == 1
    line = _one_line(capsys)
    assert "'protein'" in line and "NaN" in line and str(nan) in line, line


def test_methods_describe_lists_every_es_setting_with_its_paper_and_code_values(capsys):
    from esmerge.cli import main
    from esmerge.methods import es_settings

    assert main(["methods", "describe", "es"]) == 0
    out = capsys.readouterr().out
    for name in es_settings.PAPER_SETTINGS:
        line = next(i for i, text in enumerate(out.splitlines()) if text.startswith(f"  {name} ("))
        presets = out.splitlines()[line + 1]
        assert f"paper: {es_settings.PAPER_SETTINGS[name]!r}" in presets
        assert f"code: {es_settings.CODE_SETTINGS[name]!r}" in presets
    assert max(len(text) for text in out.splitlines()) <= 100
    assert main(["methods", "describe"]) == 2


def test_mixed_rank_adapters_merge_in_product_space_through_the_cli(trained, tmp_path, capsys):
    from peft import PeftModel
    from test_byo import random_adapter

    from esmerge.specialists.base_llm import load_smoke

    _, root, _ = trained
    r4 = random_adapter(load_smoke(seed=0).model, tmp_path / "r4", seed=4, r=4, alpha=8)
    out = tmp_path / "ties-product"
    argv = ["merge", "--base", "smoke", "--adapter", f"molecule={root / 'molecule'}", "--adapter", f"small={r4}",
            "--method", "ties", "--space", "product", "--rank", "6", "--dtype", "float32", "--out", str(out)]
    rc, captured = main(argv), capsys.readouterr()
    assert rc == 0, captured.err
    meta = load_merged(out).meta
    assert meta["space"] == "product" and meta["info"]["rank"] == 6 and meta["dtype"] == "float32"
    assert meta["normalised"]["rank"] == 8 and 0 <= meta["info"]["max_reconstruction_error"] <= 1
    assert set(meta["info"]["reconstruction_error"]) == {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
                                                         for k in load_merged(out).adapter.state}
    model = PeftModel.from_pretrained(load_smoke(seed=0).model, str(out))
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()
