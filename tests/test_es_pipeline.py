"""ES-Merging end to end at smoke scale: probe -> states -> SWD -> scores -> merged PEFT adapter, with caching."""
from dataclasses import dataclass

import pytest
import torch
from test_data import needs_data  # skips when the upstream data are not here

from esmerge import methods
from esmerge.errors import UsageError
from esmerge.run.merge import MergeContext, run_merge
from esmerge.specialists.adapters import adapter_from_model, load_adapter
from esmerge.specialists.base_llm import load_smoke, lora_config
from esmerge.specialists.encoders import make_projector


@dataclass
class StandIn:
    modality: str
    adapter: object
    projector: object
    card: dict


def random_specialists(base, seed=0):
    """Three random LoRA adapters (B non-zero) with fresh projectors: the smoke stand-ins."""
    from peft import get_peft_model

    specs = {}
    for j, modality in enumerate(("molecule", "protein", "cell")):
        torch.manual_seed(seed + j)
        peft_model = get_peft_model(base.model, lora_config())
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05 * (j + 1))
        adapter = adapter_from_model(peft_model, modality)
        peft_model.unload()
        projector = None if modality == "cell" else make_projector(modality, base.model.get_input_embeddings(), seed=j)
        specs[modality] = StandIn(modality, adapter, projector, {"base_weights_sha256": base.weights_sha256})
    return specs


@pytest.fixture()
def context(tmp_path, monkeypatch):
    from esmerge.signals import probe

    smiles = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "O=C=O", "CCCC"]
    seqs = ["MKTAYIAKQR", "GAVLIPFW", "MSTNPKPQRK", "MAHHHHHHGS", "MKKLLPTAAA", "MDEKRRAQHN"]
    cells = ["CD3E, CD2, IL7R, LTB, CCR7, MAL, LEF1, TCF7"] * 6
    monkeypatch.setattr(probe, "probe_entities", lambda k, seed, exclude_cells=None: {
        "molecule": smiles[:k], "protein": seqs[:k], "cell": cells[:k]})
    base = load_smoke(seed=0)
    return MergeContext(base, random_specialists(base), "smoke", 0, probe_k=6, cache=tmp_path / "cache")


def test_es_methods_write_loadable_adapters_and_cache(context, tmp_path):
    from peft import PeftModel

    out = run_merge("es", tmp_path / "es", context)
    merged = load_adapter(out)
    adapters = [s.adapter for s in context.specialists.values()]
    assert set(merged.state) == set(adapters[0].state)
    # Every merged element is a convex combination of the three specialists' elements.
    for key, value in merged.state.items():
        stack = torch.stack([a.state[key] for a in adapters])
        assert (value <= stack.max(0).values + 1e-6).all() and (value >= stack.min(0).values - 1e-6).all()
    cached_files = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert cached_files == ["probes"] + ["scores"] * 6 + ["states", "swd"]  # scores for both distances, one pass
    # The model is clean again after merging (LoRA layers removed), and the adapter loads in PEFT.
    assert not any("lora_" in n for n, _ in context.base.model.named_parameters())
    peft_model = PeftModel.from_pretrained(context.base.model, out)
    peft_model.unload()

    # es-layer: lambda = alpha, constant within each layer across every LoRA element.
    run_merge("es-layer", tmp_path / "layer", context)
    alpha = torch.tensor(methods.get("es-layer").fn(adapters, context).info["alpha"])
    assert torch.allclose(alpha.sum(0), torch.ones(alpha.shape[1], dtype=alpha.dtype))
    layer_merge = load_adapter(tmp_path / "layer")
    key = next(k for k in merged.state if ".layers.1." in k)
    expected = sum(alpha[j, 1] * adapters[j].state[key].double() for j in range(3)).float()
    assert torch.allclose(layer_merge.state[key], expected, atol=1e-6)


def test_identical_specialists_merge_to_themselves(context, tmp_path):
    same = context.specialists["molecule"].adapter
    context.specialists = {m: StandIn(m, same, s.projector, {}) for m, s in context.specialists.items()}
    for name in ("es", "es-layer", "es-element"):
        result = methods.run(name, [same, same, same], context)
        for key, value in result.adapter.state.items():
            assert torch.allclose(value, same.state[key], atol=1e-6), (name, key)


def test_code_variant_and_bad_settings(context):
    adapters = [s.adapter for s in context.specialists.values()]
    result = methods.run("es", adapters, context, variant="code", n_projections=64)
    assert result.info["settings"]["distance"] == "mse" and result.info["settings"]["tau_element"] == 0.1
    with pytest.raises(UsageError, match="unknown hyper-parameter 'tau'"):
        methods.run("es", adapters, context, tau=0.3)
    with pytest.raises(ValueError, match="needs a MergeContext"):
        methods.run("es", adapters, None)


@needs_data  # the probes are sampled from ChEBI-20, Swiss-Prot and CCLE
def test_merge_cli_at_smoke_scale(tmp_path):
    """`esmerge merge --scale smoke --method es` end to end (real probe data, smoke specialists).

    Uses the user cache, so the smoke specialists are trained once per machine and shared with
    the notebooks."""
    import json

    from peft import PeftModel

    from esmerge.cli import main

    out = tmp_path / "merged"
    assert main(["merge", "--scale", "smoke", "--method", "es", "--probe-k", "4", "--out", str(out)]) == 0
    meta = json.loads((out / "esmerge.json").read_text())
    assert meta["method"] == "es" and meta["scale"] == "smoke" and meta["info"]["probe_k"] == 4
    assert sorted(p.name for p in (out / "projectors").iterdir()) == ["molecule.safetensors", "protein.safetensors"]
    PeftModel.from_pretrained(load_smoke(seed=0).model, out)
    assert main(["merge", "--scale", "smoke", "--method", "no-such-method", "--out", str(tmp_path / "x")]) == 2


def test_element_scores_follow_the_active_adapter_when_several_are_attached(context):
    """With all three adapters in one PeftModel, scores of each must equal scores with it alone."""
    from esmerge.signals import probe as probe_mod
    from esmerge.signals.element_scores import element_scores
    from esmerge.signals.probe_states import collect_states
    from esmerge.specialists.adapters import attach

    base = context.base
    specs = context.specialists
    raw = probe_mod.probe_entities(k=3, seed=0)
    blocks = probe_mod.encode_blocks(base, {m: s.projector for m, s in specs.items() if s.projector is not None},
                                     raw, {"molecule": 8, "protein": 8, "cell": 24})
    probes = probe_mod.build_probes(base.tokenizer, base.model.get_input_embeddings(), blocks, raw)
    names = list(specs)
    together = attach(base.model, {n: specs[n].adapter for n in names})
    try:
        base_tokens = collect_states(together, names, probes)["base"]["tokens"]
        joint = {}
        for n in names:
            together.set_adapter(n)
            joint[n] = element_scores(together, probes.embeds, probes.positions, base_tokens, progress=False)
    finally:
        together.unload()
    for n in names:
        alone = attach(base.model, {n: specs[n].adapter})
        try:
            single = element_scores(alone, probes.embeds, probes.positions, base_tokens, progress=False)
        finally:
            alone.unload()
        for key in single:
            assert single[key].abs().sum() > 0, (n, key)
            assert torch.allclose(joint[n][key], single[key], rtol=1e-4, atol=1e-7), (n, key)


def test_a_corrupt_element_scores_entry_is_set_aside_and_recomputed(context, capsys):
    adapters = [s.adapter for s in context.specialists.values()]
    first = methods.run("es", adapters, context, n_projections=16)
    victims = sorted(context.cache.glob("scores-*.pt"))
    for victim in victims:
        victim.write_bytes(b"")  # zero-byte entries, as a full disk or a kill mid-write could leave
    capsys.readouterr()
    again = methods.run("es", adapters, context, n_projections=16)
    assert capsys.readouterr().err.count("moved it to") == 3  # the three specialists' wanted entries
    assert len(list(context.cache.glob("scores-*.pt.corrupt-*"))) == 3
    assert all(v.stat().st_size > 0 for v in victims)  # recomputed: both distances written again
    for key, value in first.adapter.state.items():
        torch.testing.assert_close(again.adapter.state[key], value)
