"""Every bad input of the reliability audit, driven through ``esmerge.cli.main`` on tiny stand-ins.

A refusal must be one designed line (never the ``unexpected ...`` catch-all kept for defects)
naming the file or the value; a hyper-parameter that alone overflows is refused before anything
loads; and inputs that are fine (adapters naming one base two ways, a base without a tokenizer for a
parameter-space merge, a full stdout) must work. Assertion messages start with SILENT (wrong or no
refusal) or UNDESIGNED (a refusal that is not one designed line), the categories the audit counts.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_byo import random_adapter
from test_data import needs_data

from esmerge.cli import main

SMOKE = ["--base", "smoke"]


# --------------------------------------------------------------------------- the stand-ins
def _random_adapter(model, folder: Path, seed: int, base_name: str | None = None, card: dict | None = None) -> Path:
    """``test_byo.random_adapter`` naming ``base_name`` as its base, with ``card`` beside it."""
    random_adapter(model, folder, seed)
    config_file = folder / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "base_model_name_or_path": base_name}))
    if card is not None:
        (folder / "card.json").write_text(json.dumps(card))
    return folder


def _edit_config(folder: Path, **changes) -> Path:
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(config | changes))
    return folder


def _fake_cpu_model():
    """What the fake GGUF 'de-quantises' to: a 2-block LLaMA with tied embeddings and the byte tokenizer."""
    from transformers import LlamaForCausalLM

    from esmerge.specialists.base_llm import byte_tokenizer, smoke_config

    tok = byte_tokenizer()
    torch.manual_seed(5)
    return LlamaForCausalLM(smoke_config(len(tok), num_layers=2, hidden_size=32)).eval(), tok


def _fake_gguf_to_folder(gguf: Path, folder: Path) -> None:
    from safetensors.torch import save_file

    model, tok = _fake_cpu_model()
    model.config.save_pretrained(folder)
    tok.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              folder / "model.safetensors")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Adapters on the smoke base (good and broken ones), a tiny HF base folder with and without its
    tokenizer with adapters naming it two ways, a probe file, and a fake ``cpu`` GGUF."""
    from standins import save_base, save_paper_base

    from esmerge.specialists.base_llm import load_smoke

    root = tmp_path_factory.mktemp("world")
    torch.set_num_threads(1)
    smoke = load_smoke(seed=0).model
    w = {"root": root}
    w["mol"], w["prot"] = _random_adapter(smoke, root / "mol", 1), _random_adapter(smoke, root / "prot", 2)
    w["rank_pattern"] = _edit_config(shutil.copytree(w["prot"], root / "rank_pattern"), rank_pattern={"q_proj": 4})
    w["regex"] = _edit_config(shutil.copytree(w["prot"], root / "regex"), target_modules=".*(q_proj|v_proj)")
    w["card"] = shutil.copytree(w["prot"], root / "card")
    (w["card"] / "card.json").write_bytes(b'{"base_name": "caf\xe9"}')  # Latin-1, not UTF-8
    tiny = save_paper_base(root / "tiny-llm")
    w["tiny"], w["notok"] = root / "tiny-llm", root / "notok" / "tiny-llm"
    save_base(w["notok"], seed=0, vocab_size=tiny.config.vocab_size)  # the same weights, no tokenizer files
    w["org"] = _random_adapter(tiny, root / "org", 3, "org/tiny-llm")
    w["local"] = _random_adapter(tiny, root / "local", 4, "/models/tiny-llm")
    w["probe"] = root / "probe.jsonl"
    w["probe"].write_text('{"text": "Name [[mol]]CCO[[/mol]] and [[prot]]MKTAYIAKQR[[/prot]]."}\n'
                          '{"text": "Does [[mol]]c1ccccc1O[[/mol]] bind [[prot]]GAVL[[/prot]]?"}\n')
    w["latin1"] = root / "latin1.jsonl"
    w["latin1"].write_bytes(b'{"text": "[[mol]]CCO[[/mol]] [[prot]]MKT[[/prot]]"}\n'
                            b'{"text": "caf\xe9 [[mol]]C[[/mol]]"}\n')
    w["gguf"] = root / "fake.gguf"
    w["gguf"].write_bytes(b"GGUF fake weights")
    gguf_sha = hashlib.sha256(w["gguf"].read_bytes()).hexdigest()
    cpu_model, _ = _fake_cpu_model()
    card = {"base_weights_sha256": gguf_sha}  # as the shipped cpu specialists record their base
    w["cpu_mol"] = _random_adapter(cpu_model, root / "cpu_mol", 6, card=card)
    w["cpu_prot"] = _random_adapter(cpu_model, root / "cpu_prot", 7, card=card)
    return w


@pytest.fixture
def env(world, tmp_path, monkeypatch):
    """A fresh cache and runs folder per case; progress to a file, so stderr holds only what is said."""
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ESMERGE_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("ESMERGE_PROGRESS_FILE", str(tmp_path / "progress.jsonl"))
    return world


def run(argv, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_refused(argv, capsys, words, exit_code=None) -> str:
    """The command is refused with one designed line naming every one of ``words``."""
    code, err = run(argv, capsys)
    assert code != 0, f"SILENT: exit 0 for {argv}; stderr {err}"
    assert err, f"SILENT: exit {code} with nothing on stderr"
    assert not any("unexpected" in line for line in err), f"UNDESIGNED: {err}"
    assert len(err) == 1, f"UNDESIGNED: {len(err)} lines: {err}"
    line = err[0]
    assert line.startswith(f"esmerge {argv[0]}: "), f"UNDESIGNED: {line}"
    missing = [w for w in words if str(w) not in line]
    assert not missing, f"UNDESIGNED: names neither the file nor the value ({missing}): {line}"
    if exit_code is not None:
        assert code == exit_code, (code, line)
    return line


def merge_argv(world, out, *adapters, method="avg", extra=(), base=SMOKE):
    argv = ["merge", *base, "--method", method, "--out", out]
    for name in adapters:
        argv += ["--adapter", f"{name}={world[name]}"]
    return argv + list(extra)


# --------------------------------------------------------------------------- hyper-parameters
@pytest.mark.parametrize("method, setting, shown", [
    ("ties", "scaling_factor=1e308", "1e+308"),
    ("pcb", "scaling_factor=-1e308", "-1e+308"),
    ("consensus", "scaling_factor=1e300", "1e+300"),
    ("ls-merge", "seed=-5", "-5"),
    ("ls-merge", "lr=1e30", "1e+30"),
    ("es", "seed=4294967296", "4294967296"),
    ("es", "n_projections=1e300", "1e+300"),
    ("es", "tau_layer=1e-320", "1e-320"),
])
def test_hyper_parameters_that_alone_overflow_are_refused_up_front(env, tmp_path, capsys, method, setting, shown):
    out = tmp_path / "out"
    line = assert_refused(merge_argv(env, out, "mol", "prot", method=method, extra=["--set", setting,
                                                                                  "--probe", env["probe"]]),
                          capsys, [setting.split("=")[0], shown], exit_code=2)
    assert "must be" in line
    assert not out.exists(), "SILENT: a merge was written"


@pytest.mark.parametrize("argv, words", [
    (["--lr", "inf"], ["--lr", "inf"]),
    (["--lr", "1e30"], ["--lr", "1e+30"]),
    (["--lr", "nan"], ["--lr", "nan"]),
    (["--projector-lr-scale", "nan"], ["--projector-lr-scale", "nan"]),
    (["--checkpoint-every", "0"], ["--checkpoint-every", "0"]),
    (["--seed", "-1"], ["--seed", "-1"]),
    (["--seed", "4294967296"], ["--seed", "4294967296"]),
])
def test_training_settings_are_refused_before_the_base_loads(env, tmp_path, capsys, monkeypatch, argv, words):
    from esmerge.specialists import load

    monkeypatch.setattr(load, "load_base", lambda *a, **k: pytest.fail("SILENT: the base was loaded"))
    out = tmp_path / "specialist"
    assert_refused(["train", "--scale", "smoke", "--modality", "cell", "--steps", "2", "--out", out, *argv],
                   capsys, words, exit_code=2)
    assert not out.exists(), "SILENT: a specialist folder was written"


@pytest.mark.parametrize("argv", [
    ["merge", "--method", "avg", "--out", "X", *SMOKE, "--adapter", "mol=a", "--adapter", "prot=b"],
    ["evaluate", "--scale", "smoke", "--model", "base", "--benchmarks", "CYP2C9-substrate"],
    ["regenerate", "--scale", "smoke", "--only", "00_overview", "--no-book"],
])
@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_seeds_outside_the_numpy_torch_range_are_refused_by_every_command(env, capsys, argv, seed):
    assert_refused([*argv, "--seed", seed], capsys, ["--seed", seed], exit_code=2)


@pytest.mark.parametrize("flag, value, words", [
    ("--n-eval", "100000", ["CYP2C9-substrate", "n_eval=100000", "666 rows"]),
    ("--n-shots", "100000", ["CYP2C9-substrate", "n_shots=100000", "holds 12 rows"]),
])
@needs_data
def test_pools_too_small_for_the_settings_are_refused_before_any_model(env, capsys, monkeypatch, flag, value, words):
    from esmerge.run import evaluate_named

    monkeypatch.setattr(evaluate_named, "build_context", lambda *a, **k: pytest.fail("SILENT: models were loaded"))
    assert_refused(["evaluate", "--scale", "smoke", "--model", "base", "--benchmarks", "CYP2C9-substrate", flag, value],
                   capsys, words, exit_code=2)


# --------------------------------------------------------------------------- adapters and names
def test_a_name_given_twice_is_refused(env, tmp_path, capsys):
    argv = merge_argv(env, tmp_path / "out", "mol", "prot") + ["--adapter", f"mol={env['prot']}"]
    assert_refused(argv, capsys, ["'mol'", "twice", str(env["mol"]), str(env["prot"])], exit_code=2)
    assert not (tmp_path / "out").exists(), "SILENT: a two-way merge of three adapters was written"


@pytest.mark.parametrize("name", ["mol.v2", "9mol", "lora", "a"])
def test_names_outside_the_safe_set_are_refused(env, tmp_path, capsys, name):
    argv = ["merge", *SMOKE, "--method", "es", "--probe", env["probe"], "--set", "n_projections=4", "--out",
            tmp_path / "out", "--adapter", f"{name}={env['mol']}", "--adapter", f"prot={env['prot']}"]
    assert_refused(argv, capsys, [repr(name), "adapter name"], exit_code=2)


def test_adapters_naming_one_base_two_ways_merge(env, tmp_path, capsys):
    """D7: ``org/tiny-llm`` and ``/models/tiny-llm`` name the base folder ``.../tiny-llm`` (models.same_base_name)."""
    from esmerge.specialists.adapters import load_merged

    out = tmp_path / "out"
    code, err = run(merge_argv(env, out, "org", "local", base=["--base", env["tiny"]]), capsys)
    assert code == 0 and not err, f"SILENT: refused adapters of one base: {err}"
    assert load_merged(out).meta["method"] == "avg"


def test_adapters_naming_another_base_are_still_refused(env, tmp_path, capsys):
    other = _edit_config(shutil.copytree(env["local"], tmp_path / "other"), base_model_name_or_path="org/other-llm")
    argv = ["merge", "--base", env["tiny"], "--method", "avg", "--out", tmp_path / "out",
            "--adapter", f"org={env['org']}", "--adapter", f"other={other}"]
    assert_refused(argv, capsys, ["other", "org/other-llm"], exit_code=1)


def test_a_base_without_a_tokenizer_serves_parameter_space_merges(env, tmp_path, capsys):
    code, err = run(merge_argv(env, tmp_path / "avg", "org", "local", base=["--base", env["notok"]]), capsys)
    assert code == 0 and not err, f"UNDESIGNED: a parameter-space merge needed a tokenizer: {err}"
    probe = env["root"] / "tiny-probe.jsonl"
    probe.write_text('{"text": "[[org]]ab[[/org]] [[local]]cd[[/local]]"}\n')
    assert_refused(merge_argv(env, tmp_path / "es", "org", "local", method="es", base=["--base", env["notok"]],
                              extra=["--probe", probe]), capsys, [str(env["notok"]), "tokenizer.json"], exit_code=1)


@pytest.mark.parametrize("broken, method, words", [
    ("rank_pattern", "es", ["adapter_config.json", "rank_pattern", "rank 8"]),
    ("regex", "avg", ["adapter_config.json", ".*(q_proj|v_proj)", "list of module names"]),
    ("card", "avg", ["card.json", "UTF-8"]),
])
def test_adapter_configs_peft_would_not_load_are_refused(env, tmp_path, capsys, broken, method, words):
    argv = merge_argv(env, tmp_path / "out", "mol", broken, method=method,
                      extra=["--probe", env["probe"], "--set", "n_projections=4"] if method == "es" else [])
    assert_refused(argv, capsys, [str(env[broken]), *words], exit_code=1)


def test_a_probe_file_that_is_not_utf8_is_refused(env, tmp_path, capsys):
    argv = merge_argv(env, tmp_path / "out", "mol", "prot", method="es", extra=["--probe", env["latin1"]])
    assert_refused(argv, capsys, [f"{env['latin1']}:2", "UTF-8"], exit_code=1)


# --------------------------------------------------------------------------- outputs, caches, the cpu base
def test_a_full_stdout_does_not_fail_a_finished_merge(env, tmp_path, capsys, monkeypatch):
    """/dev/full: the merge is on disk, so exit 0 and one warning line; a listing's loss is exit 1;
    a closed pipe (``| head``) is the reader's choice: the command's own code, silently."""
    from esmerge.specialists.adapters import is_merged

    fulls = [open("/dev/full", "w", buffering=1) for _ in range(2)]  # line-buffered: the report line fails
    monkeypatch.setattr(sys, "stdout", fulls[0])
    out = tmp_path / "out"
    code, err = run(merge_argv(env, out, "mol", "prot"), capsys)
    assert is_merged(out)
    assert not any("unexpected" in line for line in err), f"UNDESIGNED: {err}"
    assert code == 0 and len(err) == 1 and "could not write to stdout" in err[0], f"UNDESIGNED: {code} {err}"
    monkeypatch.setattr(sys, "stdout", fulls[1])  # the first now writes to /dev/null (so exit's flush passes)
    code, err = run(["methods", "avg"], capsys)
    assert code == 1 and len(err) == 1 and "listing was lost" in err[0], (code, err)

    class ClosedPipe:
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert run(["methods", "avg"], capsys) == (0, [])
    monkeypatch.undo()
    for full in fulls:
        full.close()


def test_an_altered_cpu_base_conversion_is_converted_again(env, tmp_path, capsys, monkeypatch):
    """D6: the cached model.safetensors is checked against the sha256 recorded at conversion on every load
    (``esmerge.specialists.smollm2``), so the base's identity, the GGUF's sha256, names the weights loaded."""
    from safetensors.torch import load_file, save_file

    from esmerge.specialists import smollm2

    monkeypatch.setattr(smollm2, "smollm2_gguf_path", lambda: env["gguf"])
    monkeypatch.setattr(smollm2, "_gguf_to_folder", _fake_gguf_to_folder)
    code, err = run(merge_argv(env, tmp_path / "first", "cpu_mol", "cpu_prot", base=["--base", "cpu"]), capsys)
    assert code == 0 and not err, err
    weights = tmp_path / "cache" / "smollm2-135m-instruct" / "model.safetensors"
    good = weights.read_bytes()
    state = load_file(weights)
    state["model.norm.weight"] = state["model.norm.weight"] * 3
    save_file(state, weights)
    code, err = run(merge_argv(env, tmp_path / "second", "cpu_mol", "cpu_prot", base=["--base", "cpu"]), capsys)
    assert not any("unexpected" in line for line in err), f"UNDESIGNED: {err}"
    assert code == 0 and len(err) == 1, f"SILENT: the altered conversion was used ({code}, {err})"
    assert "altered" in err[0] and str(weights.parent) in err[0] and "converting the GGUF again" in err[0], err
    assert weights.read_bytes() == good


def test_a_corrupt_cache_entry_is_recomputed(env, tmp_path, capsys):
    argv = merge_argv(env, tmp_path / "first", "mol", "prot", method="es",
                      extra=["--probe", env["probe"], "--set", "n_projections=4"])
    code, err = run(argv, capsys)
    assert code == 0 and not err, err
    entries = sorted((tmp_path / "cache").rglob("states-*.pt"))
    assert entries
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    argv[argv.index("--out") + 1] = str(tmp_path / "second")
    code, err = run(argv, capsys)
    assert not any("unexpected" in line for line in err), f"UNDESIGNED: {err}"
    assert code == 0 and len(err) == 1 and entries[0].name in err[0], f"UNDESIGNED: {code} {err}"


def test_a_full_cache_file_system_is_one_line(env, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    argv = merge_argv(env, tmp_path / "out", "mol", "prot", method="es",
                      extra=["--probe", env["probe"], "--set", "n_projections=4"])
    assert_refused(argv, capsys, [str(tmp_path / "cache"), "full"], exit_code=1)
