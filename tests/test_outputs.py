"""esmerge.outputs: the one publishing protocol (reliability issue, D1 and D2).

``--force`` replaces only an earlier output of the same kind that is not an input of the run;
every other path is refused in one line and left as it was. A replacement killed at any step
leaves the old or the new output, and the next run or load repairs what it left. Nothing with
NaN/Inf is written as finished. Each test names the defect; all fail on the code before it.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from esmerge import outputs
from esmerge.errors import InputError, OutputExistsError
from esmerge.run.merge import MergeContext, run_merge
from esmerge.specialists.adapters import (
    Adapter,
    AdapterFileError,
    is_merged,
    load_adapter,
    load_merged,
    save_adapter,
    save_merged,
)

KEYS = ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
CONFIG = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "toy-base"}
BASE = SimpleNamespace(name="toy-base", weights_sha256="a" * 64)


def toy_adapter(seed: int = 0, name: str = "a") -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    return Adapter({KEYS[0]: torch.randn(2, 5, generator=gen), KEYS[1]: torch.randn(4, 2, generator=gen)},
                   dict(CONFIG), name)


def toy_context(paths: dict[str, Path] | None = None, base=BASE) -> MergeContext:
    """Two toy specialists; ``paths``: the folders they were read from (the merge's inputs)."""
    specs = {m: SimpleNamespace(modality=m, adapter=toy_adapter(i, m), projector=None, card={},
                                path=(paths or {}).get(m)) for i, m in enumerate(("molecule", "protein"))}
    return MergeContext(base, specs, "smoke", probe_k=1)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


# --------------------------------------------------------------------------- D1: what --force may replace
def test_force_refuses_a_folder_holding_the_inputs_and_keeps_everything(tmp_path):
    """Regression (D1): `merge --out X --force`, X holding the input adapters, the probe file and
    other merges, deleted all of them."""
    x = tmp_path / "X"
    paths = {m: save_adapter(toy_adapter(i), x / m) for i, m in enumerate(("molecule", "protein"))}
    (x / "probes.jsonl").write_text('{"text": "[[m]]a[[/m]]"}\n')
    run_merge("avg", x / "earlier", toy_context(paths))
    before = tree(x)
    with pytest.raises(OutputExistsError) as err:
        run_merge("ties", x, toy_context(paths), force=True)
    assert one_line(err).startswith(f"{x} holds {paths['molecule']}, an input of this run")
    with pytest.raises(OutputExistsError, match="is an input of this run"):
        run_merge("ties", paths["protein"], toy_context(paths), force=True)
    assert tree(x) == before and sorted(p.name for p in tmp_path.iterdir()) == ["X"]


def test_force_refuses_an_input_even_when_it_is_a_merge(tmp_path):
    """A merge fed back as an adapter is an input: replacing it would destroy what is being read."""
    first = run_merge("avg", tmp_path / "first", toy_context())
    before = tree(first)
    with pytest.raises(OutputExistsError, match="first is an input of this run"):
        run_merge("ties", first, toy_context({"molecule": first}), force=True)
    assert tree(first) == before


def test_force_refuses_the_base_model_folder(tmp_path):
    """Regression (D1): `--out` naming the `--base` folder deleted the base model."""
    base_dir = tmp_path / "llama"
    base_dir.mkdir()
    (base_dir / "config.json").write_text("{}")
    (base_dir / "model.safetensors").write_bytes(b"weights")
    context = toy_context(base=SimpleNamespace(name=str(base_dir), weights_sha256=None))
    with pytest.raises(OutputExistsError, match="llama is an input of this run"):
        run_merge("avg", base_dir, context, force=True)
    assert tree(base_dir) == {"config.json": b"{}", "model.safetensors": b"weights"}


@pytest.mark.parametrize("what", ["file", "fifo", "symlink", "notes", "empty"])
def test_force_refuses_anything_that_is_not_an_earlier_merge(tmp_path, what):
    """Regression (D1): a regular file was replaced by a directory, a device node moved to a hidden
    `.replaced-*` file, a folder of the user's files deleted."""
    out = tmp_path / "out"
    if what == "file":
        out.write_text("mine")
    elif what == "fifo":
        os.mkfifo(out)
    elif what == "symlink":
        target = run_merge("avg", tmp_path / "target", toy_context())
        out.symlink_to(target)
    else:
        out.mkdir()
        if what == "notes":
            (out / "notes.txt").write_text("mine")
    listing = sorted(p.name for p in tmp_path.iterdir())
    for attempt in (lambda: run_merge("avg", out, toy_context(), force=True),
                    lambda: save_merged(out, toy_adapter(), {"method": "avg"}, force=True)):
        with pytest.raises(OutputExistsError) as err:
            attempt()
        assert one_line(err).startswith(str(out)) and ("remove it yourself" in str(err.value))
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # nothing moved aside, nothing added
    assert os.path.lexists(out) and (what != "file" or out.read_text() == "mine")
    if what == "notes":
        assert (out / "notes.txt").read_text() == "mine"


def test_force_replaces_only_the_same_kind_of_output(tmp_path):
    """A specialist or a converted specialist is not replaced by a merge, nor the other way round."""
    spec = save_adapter(toy_adapter(), tmp_path / "spec")
    (spec / "card.json").write_text(json.dumps({"modality": "molecule", "steps": 3}))  # a card as shipped: no kind
    conv = save_adapter(toy_adapter(), tmp_path / "conv")
    (conv / "card.json").write_text(json.dumps({"modality": "protein", "converter": {"name": "prot2text"}}))
    merge = run_merge("avg", tmp_path / "merge", toy_context())
    assert outputs.kind_of(spec) is outputs.SPECIALIST and outputs.kind_of(conv) is outputs.CONVERTED
    assert outputs.kind_of(merge) is outputs.MERGE
    legacy = json.loads((merge / "esmerge.json").read_text())
    assert legacy.pop("esmerge_output") == "merge"
    (merge / "esmerge.json").write_text(json.dumps(legacy))  # a merge written before kinds were recorded
    assert outputs.kind_of(merge) is outputs.MERGE
    with pytest.raises(OutputExistsError, match="holds a finished specialist, not a finished merge"):
        run_merge("avg", spec, toy_context(), force=True)
    with pytest.raises(OutputExistsError, match="holds a converted specialist, not a finished merge"):
        run_merge("avg", conv, toy_context(), force=True)
    for kind in (outputs.SPECIALIST, outputs.CONVERTED):
        with pytest.raises(OutputExistsError, match="holds a finished merge"):
            outputs.check_replaceable(merge, kind, True)
    assert outputs.check_replaceable(merge, outputs.MERGE, True) is True
    shipped = Path(__file__).resolve().parent.parent / "data_manifest" / "specialists" / "cpu" / "molecule"
    assert outputs.kind_of(shipped) is outputs.SPECIALIST


def test_specialist_and_converter_writers_follow_the_same_rule(tmp_path):
    """save_specialist(force=True) and a forced conversion replace only their own kind (D1)."""
    from esmerge.specialists.convert import output
    from esmerge.specialists.load import Specialist, save_specialist

    merge = run_merge("avg", tmp_path / "merge", toy_context())
    spec = Specialist("cell", toy_adapter(), None, {"modality": "cell"})
    with pytest.raises(OutputExistsError, match="holds a finished merge, not a finished specialist"):
        save_specialist(spec, merge, force=True)
    trained = save_specialist(spec, tmp_path / "cell")
    assert outputs.kind_of(trained) is outputs.SPECIALIST
    save_specialist(spec, trained, force=True)  # its own kind: replaced
    with pytest.raises(OutputExistsError, match="holds a finished specialist, not a converted specialist"):
        with output.staged(trained, {"converter": "test"}, force=True):
            pass
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(OutputExistsError, match="ckpt is an input of this run"):
        with output.staged(source, {"source": {"path": str(source)}}, force=True):
            pass
    assert is_merged(merge) and (source / "model.safetensors").read_bytes() == b"weights"


def test_merge_cli_refuses_before_loading_the_base(tmp_path, capsys, monkeypatch):
    """Regression (D1): `esmerge merge --adapter ... --out X --force` with X holding the adapters."""
    from esmerge.cli import main
    from esmerge.run import byo

    monkeypatch.setattr(byo, "load_base_for", lambda *a, **k: pytest.fail("loaded the base"))
    x = tmp_path / "X"
    for i, m in enumerate(("molecule", "protein")):
        save_adapter(toy_adapter(i), x / m)
    (x / "probes.jsonl").write_text('{"text": "[[molecule]]C[[/molecule]] [[protein]]M[[/protein]]"}\n')
    before = tree(x)
    rc = main(["merge", "--base", "smoke", "--adapter", f"molecule={x / 'molecule'}", "--adapter",
               f"protein={x / 'protein'}", "--probe", str(x / "probes.jsonl"), "--method", "avg",
               "--out", str(x), "--force"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "an input of this run" in err[0], err
    assert tree(x) == before


# --------------------------------------------------------------------------- D1: a kill at any step of the swap
def _replace_and_die(out: str, kill_at: int, when: str, exchange: bool) -> None:
    """In a forked child: replace the merge at ``out``, dying (``os._exit``) before or after the
    ``kill_at``-th exchange, rename or removal."""
    import shutil

    count = [0]

    def dying(real):
        def call(*args, **kwargs):
            count[0] += 1
            if count[0] == kill_at and when == "before":
                os._exit(77)
            result = real(*args, **kwargs)
            if count[0] == kill_at:
                os._exit(77)
            return result
        return call

    outputs.exchange = dying(outputs.exchange if exchange else (lambda src, dst: False))
    os.rename = dying(os.rename)
    shutil.rmtree = dying(shutil.rmtree)
    state = {KEYS[0]: torch.full((2, 5), 2.0), KEYS[1]: torch.full((4, 2), 2.0)}
    save_merged(out, Adapter(state, dict(CONFIG), "new"), {"method": "new"}, force=True)
    os._exit(0)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_replacement_killed_at_any_step_leaves_the_old_or_the_new_merge(tmp_path, exchange):
    """Fault injection (D1): the writer dies (os._exit) before and after each rename, exchange and
    removal of the swap in turn. Regression: a kill inside the swap left the old merge only as a
    hidden `.replaced-*` folder, never restored."""
    old_state = {KEYS[0]: torch.ones(2, 5), KEYS[1]: torch.ones(4, 2)}
    kill_at, seen, finished, gone = 0, set(), False, 0
    while not finished:
        kill_at += 1
        for when in ("before", "after"):
            out = tmp_path / f"m-{kill_at}-{when}"
            save_merged(out, Adapter(dict(old_state), dict(CONFIG), "old"), {"method": "old"})
            child = multiprocessing.get_context("fork").Process(target=_replace_and_die,
                                                                  args=(str(out), kill_at, when, exchange))
            child.start()
            child.join(60)
            assert child.exitcode in (0, 77), child.exitcode
            if child.exitcode == 0:
                finished = True
                break
            gone += not os.path.lexists(out)  # killed between the two renames: only `.replaced-*` holds it
            merged = load_merged(out)  # a load repairs what the kill left
            seen.add(merged.meta["method"])
            assert merged.meta["method"] in ("old", "new"), (kill_at, when)
            value = 1.0 if merged.meta["method"] == "old" else 2.0
            assert all(bool((t == value).all()) for t in merged.adapter.state.values()), (kill_at, when)
            save_merged(out, toy_adapter(), {"method": "next"}, force=True)  # the next run works and tidies up
            assert load_merged(out).meta["method"] == "next"
            assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.")] == [], (kill_at, when)
    assert kill_at > 2 and seen == {"old", "new"} and (gone > 0) == (not exchange)


def test_a_missing_output_is_restored_from_its_replaced_copy_by_any_writer(tmp_path):
    """The state a kill between the two renames leaves: the output missing, the old one aside."""
    out = save_merged(tmp_path / "m", toy_adapter(), {"method": "old"})
    out.rename(tmp_path / ".m.replaced-0badc0de")
    assert is_merged(out) and load_merged(out).meta["method"] == "old"
    (tmp_path / "m").rename(tmp_path / ".m.replaced-0badc0de")
    with pytest.raises(OutputExistsError, match="already exists"):  # restored, then refused without --force
        save_merged(out, toy_adapter(1), {"method": "new"})
    assert load_merged(out).meta["method"] == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["m"]


# --------------------------------------------------------------------------- D2: nothing non-finite is finished
def test_a_merge_with_nan_is_refused_and_nothing_is_written(tmp_path):
    """Regression (D2): `merge --method ties --set scaling_factor=1e308` wrote 32,768 NaN entries and the
    marker, exit 0."""
    bad = toy_adapter()
    bad.state[KEYS[1]][0, 0] = float("inf")
    bad.state[KEYS[1]][1, 1] = float("nan")
    with pytest.raises(InputError) as err:
        save_merged(tmp_path / "m", bad, {"method": "ties", "hparams": {"scaling_factor": 1e308}})
    assert one_line(err).startswith(f"merge into {tmp_path / 'm'}: {KEYS[1]} has 2 NaN/Inf of 8 entries")
    assert "scaling_factor=1e+308" in str(err.value) and "esmerge methods ties" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_method_that_overflows_is_refused_by_run_merge(tmp_path, monkeypatch):
    from esmerge import methods

    real = methods.run_checked

    def overflowing(name, adapters, *args, **kwargs):
        result = real(name, adapters, *args, **kwargs)
        result.adapter.state = {k: v * 1e308 * 1e308 for k, v in result.adapter.state.items()}
        return result

    monkeypatch.setattr(methods, "run_checked", overflowing)
    with pytest.raises(InputError, match="NaN/Inf .*so nothing was written"):
        run_merge("avg", tmp_path / "m", toy_context())
    assert not (tmp_path / "m").exists()


def test_a_specialist_with_nan_is_refused(tmp_path):
    from esmerge.specialists.load import Specialist, save_specialist

    adapter = toy_adapter()
    adapter.state[KEYS[0]][0, 0] = float("nan")
    with pytest.raises(InputError, match=r"specialist .*has 1 NaN/Inf of 10 entries.*lower --lr"):
        save_specialist(Specialist("cell", adapter, None, {"modality": "cell", "lr": 1.0}), tmp_path / "cell")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


def test_a_converted_specialist_with_nan_is_refused(tmp_path):
    from esmerge.specialists.convert import output

    with pytest.raises(InputError, match=r"converting into .*out: LoRA: .* has 1 NaN/Inf"):
        with output.staged(tmp_path / "out", {"converter": "test"}) as stage:
            output.write_parts(stage, {KEYS[0]: torch.tensor([[float("nan"), 0.0]])}, "toy-base")
            output.finish(stage, {"modality": "protein"})
    assert not (tmp_path / "out").exists()


def test_a_diverged_checkpoint_is_not_written(tmp_path):
    from esmerge.specialists import train

    with pytest.raises(InputError, match=r"checkpoint .* at step 3: lora.x has 1 NaN/Inf.*lower --lr"):
        train.save_checkpoint(tmp_path / "ck", {"lora.x": torch.tensor([1.0, float("inf")])},
                              {"step": 3, "recipe": {"lr": 10.0}, "losses": [], "elapsed_s": 0.0})
    assert not (tmp_path / "ck").exists()


def test_an_integer_lora_tensor_is_refused_on_load(tmp_path):
    """Regression (D2): int32 LoRA tensors in an input adapter were silently converted to float."""
    adapter = toy_adapter()
    adapter.state[KEYS[1]] = torch.arange(8, dtype=torch.int32).reshape(4, 2)
    folder = save_adapter(adapter, tmp_path / "a")
    with pytest.raises(AdapterFileError) as err:
        load_adapter(folder)
    assert one_line(err) == (f"{folder / 'adapter_model.safetensors'}: {KEYS[1]} holds int32 values, not "
                             "floating-point LoRA weights; re-export the adapter")
