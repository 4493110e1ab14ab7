"""Running a scale on another device (``--device cuda``): the device travels from the command line
into every notebook, every model load and every key, and nothing computed on one device is read
as the other's.

No GPU is needed: PyTorch's ``meta`` device stands in for "not the CPU" wherever only the device
matters (keys, records, where a tensor is put), and a request for CUDA where torch has none must be
refused in one line.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_merge_outputs import BASE, toy_context
from test_regenerate import make_layout, quiet, run_cli

from esmerge import scales
from esmerge.cache import keyed_on_device
from esmerge.errors import UsageError
from esmerge.evaluate.models import ModelUnderTest
from esmerge.methods.objectives import lora_state_swapped
from esmerge.regen import regenerate as rg
from esmerge.run.merge import merge_once
from esmerge.specialists.base_llm import load_base

NOTEBOOK = """\
# %% tags=["parameters"]
# esmerge-needs:
scale = "cpu"
seed = 0
device = None

# %%
from pathlib import Path
out = Path("runs") / scale / "01_where"
out.mkdir(parents=True, exist_ok=True)
(out / "device.txt").write_text(str(device))
"""


def test_the_device_reaches_every_notebook_and_keys_its_run(tmp_path):
    layout = make_layout(tmp_path)
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_where.py").write_text(NOTEBOOK)
    written = tmp_path / "runs" / "smoke" / "01_where" / "device.txt"

    assert rg.run_notebooks("smoke", layout, log=quiet).executed == ["01_where"]
    assert written.read_text() == "None"  # no device given: the notebook's own default
    cpu_state = json.loads(layout.state_file("smoke").read_text())["notebooks"]["01_where"]
    assert cpu_state["parameters"] == {"scale": "smoke", "seed": 0}  # the CPU's keys are those of before

    # The same notebook on "cuda": injected, and its own input key, so it runs rather than being skipped...
    assert rg.run_notebooks("smoke", layout, log=quiet, device="cuda").executed == ["01_where"]
    assert written.read_text() == "cuda"
    cuda_state = json.loads(layout.state_file("smoke").read_text())["notebooks"]["01_where"]
    assert cuda_state["parameters"]["device"] == "cuda" and cuda_state["key"] != cpu_state["key"]
    # ...and the CPU's run after it runs again too: neither is taken for the other.
    assert rg.run_notebooks("smoke", layout, log=quiet).executed == ["01_where"]
    assert rg.run_notebooks("smoke", layout, log=quiet).executed == []


def test_a_device_that_names_nothing_is_refused_before_any_notebook_runs(tmp_path, capsys):
    layout = make_layout(tmp_path)
    with pytest.raises(UsageError, match="unknown device 'gpu'"):
        rg.run_notebooks("smoke", layout, log=quiet, device="gpu")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        scales.get("cpu", device="tpu")
    # --device with a step that runs no notebook means nothing: one line, exit 2
    assert run_cli(["--scale", "smoke", "--ship", "--device", "cuda"], layout) == 2
    assert "drop --device" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_where_torch_has_none_is_one_line():
    with pytest.raises(UsageError, match=r"device 'cuda': torch sees no GPU here") as err:
        load_base(scales.get("smoke", device="cuda"))
    assert "\n" not in str(err.value)


def test_the_scale_device_is_where_the_base_is_loaded(monkeypatch):
    moved = []
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: moved.append(k) or self)
    load_base(scales.get("smoke", device="cpu"))
    assert moved == [{"device": "cpu", "dtype": None}]
    moved.clear()
    load_base(scales.get("smoke"))  # no device: left where it was built, as before
    assert moved == []


def test_results_off_the_cpu_have_keys_of_their_own():
    on_cpu = SimpleNamespace(model=torch.nn.Linear(2, 2), weights_sha256="a" * 64, name="toy")
    elsewhere = SimpleNamespace(model=torch.nn.Linear(2, 2, device="meta"), weights_sha256="a" * 64, name="toy")
    assert keyed_on_device("a" * 64, on_cpu.model) == "a" * 64  # the CPU's keys are unchanged
    assert keyed_on_device("a" * 64, elsewhere.model) == "a" * 64 + "@meta"
    # the evaluation cache: the same weights and adapter, one id per device
    ids = {ModelUnderTest("base", base).model_id("BindingDB") for base in (on_cpu, elsewhere)}
    assert len(ids) == 2


def test_a_merge_records_its_device_and_is_not_reused_on_another(tmp_path):
    out = tmp_path / "avg"
    merge_once("avg", out, toy_context())  # a base without a model: the CPU, recorded as before (no field)
    assert "device" not in json.loads((out / "esmerge.json").read_text())
    first = (out / "esmerge.json").stat().st_mtime_ns

    off_cpu = SimpleNamespace(**vars(BASE), model=torch.nn.Linear(1, 1, device="meta"))
    merge_once("avg", out, toy_context(base=off_cpu))
    meta = json.loads((out / "esmerge.json").read_text())
    assert meta["device"] == "meta" and (out / "esmerge.json").stat().st_mtime_ns != first  # merged again

    again = (out / "esmerge.json").stat().st_mtime_ns
    merge_once("avg", out, toy_context(base=off_cpu))  # same device, same settings: reused
    assert (out / "esmerge.json").stat().st_mtime_ns == again


def test_a_lora_state_is_swapped_in_on_the_models_device():
    from collections import OrderedDict

    from peft import LoraConfig, get_peft_model

    net = torch.nn.Sequential(OrderedDict(q_proj=torch.nn.Linear(2, 2)))
    net = get_peft_model(net, LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"])).to("meta")
    a = torch.ones(1, 2, requires_grad=True)  # AdaMerging's and Avg+FT's states live on the CPU
    state = {"base_model.model.q_proj.lora_A.weight": a, "base_model.model.q_proj.lora_B.weight": torch.ones(2, 1)}
    with lora_state_swapped(net, state):
        inside = net.base_model.model.q_proj.lora_A["default"].weight
        assert inside.device.type == "meta" and inside.grad_fn is not None  # moved, and still differentiable
        assert net(torch.ones(1, 2, device="meta")).device.type == "meta"
    assert net.base_model.model.q_proj.lora_A["default"].weight.device.type == "meta"  # the model's own is back


def test_decision_agreement_of_two_runs_and_its_threshold(tmp_path, capsys):
    from esmerge.evaluate import agreement

    ids = [str(i) for i in range(100)]
    cpu = {"avg": {"HIV": {"example_ids": ids, "pred": [i % 2 for i in range(100)]}},
           "es": {"HIV": {"example_ids": ids, "pred": [1] * 100}}}
    gpu = json.loads(json.dumps(cpu))
    gpu["es"]["HIV"]["pred"][7] = 0  # one near-tie flipped: 199 of 200 agree
    a, b = tmp_path / "cpu.json", tmp_path / "gpu.json"
    a.write_text(json.dumps(cpu))
    b.write_text(json.dumps(gpu))
    assert agreement.main([str(a), str(b)]) == 0
    assert "199 of 200 decisions agree (99.50%)" in capsys.readouterr().out
    assert agreement.main([str(a), str(b), "--at-least", "0.999"]) == 1
    gpu["es"]["HIV"]["example_ids"] = ids[::-1]  # other prompts: not comparable at all
    with pytest.raises(ValueError, match="es on HIV: the two runs scored different examples"):
        agreement.decision_agreement(cpu, gpu)
    assert agreement.main([str(a), str(tmp_path / "missing.json")]) == 2
