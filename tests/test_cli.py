"""The command line: every refusal is one line naming the value or file (exit 1, usage 2), before any model
loads where it can be; --debug shows the traceback; bring-your-own adapters through `esmerge merge`."""
from __future__ import annotations

import json

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
    (["evaluate", "--scale", "smoke", "--model", "nothing-here"], 2, ["nothing-here", "esmerge.json"]),
    (["evaluate", "--scale", "smoke", "--model", "base", "--n-eval", "0"], 2, ["n_eval=0"]),
    (["evaluate", "--scale", "smoke", "--model", "base", "--benchmarks", "Nope"], 2, ["Nope"]),
    (["evaluate", "--scale", "cpu", "--model", "base", "--scoring", "generate"], 2, ["generate", "argmax"]),
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


def test_bring_your_own_adapters_through_the_cli(trained, tmp_path, capsys):
    _, root, probes = trained
    out = tmp_path / "es"
    argv = ["merge", "--base", "smoke", "--adapter", f"molecule={root / 'molecule'}",
            "--adapter", f"protein={root / 'protein'}", "--probe", str(probes), "--method", "es", "--out", str(out)]
    rc, err = main(argv), capsys.readouterr().err
    assert rc == 0, err
    merged = load_merged(out)
    assert merged.meta["method"] == "es" and set(merged.adapter.state)
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
                 f"protein={nan}", "--probe", str(probes), "--method", "avg", "--out", str(tmp_path / "x")]) == 1
    line = _one_line(capsys)
    assert "'protein'" in line and "NaN" in line and str(nan) in line, line


def test_methods_describe_lists_every_es_setting_with_its_paper_and_code_values(capsys):
    from esmerge.cli import main
    from esmerge.methods import es

    assert main(["methods", "describe", "es"]) == 0
    out = capsys.readouterr().out
    for name in es.PAPER_SETTINGS:
        line = next(i for i, text in enumerate(out.splitlines()) if text.startswith(f"  {name} ("))
        presets = out.splitlines()[line + 1]
        assert f"paper: {es.PAPER_SETTINGS[name]!r}" in presets and f"code: {es.CODE_SETTINGS[name]!r}" in presets
    assert max(len(text) for text in out.splitlines()) <= 100
    assert main(["methods", "describe"]) == 2
