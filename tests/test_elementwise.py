"""Batched element scores (paper §4.3) against the per-sample loop they replace, and NaN/Inf refusals."""
import importlib.util
from pathlib import Path

import pytest
import torch

from esmerge import scales
from esmerge.errors import InputError
from esmerge.signals import elementwise, gradients, probe, probe_states
from esmerge.signals.element_scores import element_scores, element_scores_by_distance
from esmerge.signals.hooks import block_outputs, lora_parameters
from esmerge.specialists.adapters import attach


def _bench_es():
    """benchmarks/bench_es.py holds the per-sample loop that element scores used before batching."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_es.py"
    spec = importlib.util.spec_from_file_location("bench_es", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


reference_scores = _bench_es().per_sample_loop_scores

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN", "O=C=O"]
SEQUENCES = ["MKTAYIAKQR", "GAVLIPFW", "MSTNPKPQRK", "MAHHHHHHGS", "MKKLLPTAAA"]
CELLS = ["CD3E, CD2, IL7R, LTB, CCR7", "MS4A1, CD79A, CD79B", "NKG7, GNLY, GZMB, PRF1", "LYZ, S100A8", "PPBP, PF4"]


@pytest.fixture(scope="module")
def smoke_setup(tmp_path_factory):
    """The smoke base, its three trained specialists (cached in a temporary ESMERGE_CACHE) and real probes."""
    from esmerge.specialists.base_llm import load_base
    from esmerge.specialists.per_scale import load_specialists

    patch = pytest.MonkeyPatch()
    patch.setenv("ESMERGE_CACHE", str(tmp_path_factory.mktemp("cache")))
    torch.manual_seed(0)
    base = load_base(scales.get("smoke"))
    specialists = load_specialists(scales.get("smoke"), base)
    projectors = {m: s.projector for m, s in specialists.items() if s.projector is not None}
    raw = {"molecule": SMILES, "protein": SEQUENCES, "cell": CELLS}
    blocks = probe.encode_blocks(base, projectors, raw, {"molecule": 4, "protein": 4, "cell": 6})
    probes = probe.build_probes(base.tokenizer, base.model.get_input_embeddings(), blocks, raw)
    peft_model = attach(base.model, {m: s.adapter for m, s in specialists.items()})
    states = probe_states.collect_states(peft_model, list(specialists), probes)
    yield peft_model, list(specialists), probes, states["base"]["tokens"]
    peft_model.unload()
    patch.undo()


def assert_relatively_equal(new, old, rtol=1e-5):
    """Every element within ``rtol`` of its reference value (measured: about 3e-7 at smoke, fp32 rounding)."""
    for key in old:
        assert old[key].abs().max() > 0, key
        err = ((new[key] - old[key]).abs() - rtol * old[key].abs()).max()
        assert err <= 1e-12 * old[key].abs().max(), (key, float(err))


def test_batched_scores_equal_the_per_sample_loop(smoke_setup):
    peft_model, names, probes, base_tokens = smoke_setup
    assert len(probes) == 5 and probes.embeds.shape[0] == 5
    for name in names:  # several adapters attached, as in ES-Merging: each scored w.r.t. its own LoRA
        peft_model.set_adapter(name)
        old = reference_scores(peft_model, probes.embeds, probes.positions, base_tokens)
        new = element_scores_by_distance(peft_model, probes.embeds, probes.positions, base_tokens,
                                                           progress=False, batch_size=2)  # chunks 2, 2, 1
        for distance in elementwise.DISTANCES:
            assert set(new[distance]) == set(old[distance])
            # Plain values: no autograd graph kept alive by the scores (it once held every batch's graph).
            assert not any(v.requires_grad for v in new[distance].values())
            assert_relatively_equal(new[distance], old[distance])
        # The public single-distance entry point returns the same Frobenius scores.
        frob = element_scores(peft_model, probes.embeds, probes.positions, base_tokens, progress=False)
        assert_relatively_equal(frob, old["frobenius"])


def test_scores_do_not_depend_on_the_batch_size(smoke_setup):
    """No operation mixes samples, so a sample's gradient is the same alone or in a batch."""
    peft_model, names, probes, base_tokens = smoke_setup
    peft_model.set_adapter(names[1])
    one = element_scores(peft_model, probes.embeds, probes.positions, base_tokens, progress=False, batch_size=1)
    every = element_scores(peft_model, probes.embeds, probes.positions, base_tokens, progress=False, batch_size=5)
    assert_relatively_equal(every, one)


def test_per_sample_gradients_match_autograd_of_each_sample(smoke_setup):
    """Signed per-sample gradients of a batch equal each sample's own parameter gradient."""
    peft_model, names, probes, base_tokens = smoke_setup
    peft_model.set_adapter(names[0])
    grads, dists = gradients.batch_distance_gradients(peft_model, probes.embeds[:3], probes.positions,
                                                              {m: t[:, :3] for m, t in base_tokens.items()})
    params = lora_parameters(peft_model)
    key = next(k for k in params if ".layers.1." in k and "lora_A" in k)
    for k in range(3):
        with block_outputs(peft_model, detach_inputs=True) as outputs:
            peft_model(inputs_embeds=probes.embeds[k:k + 1], use_cache=False)
        pos = probes.positions["protein"]
        r = torch.stack([elementwise.token_distance(out[0, pos], base_tokens["protein"][l, k])
                         for l, out in enumerate(outputs)])
        (g,) = torch.autograd.grad(r.sum(), [params[key]])
        assert torch.allclose(grads["protein"][key][k], g, rtol=1e-4, atol=1e-7 * g.abs().max())
        assert torch.allclose(dists["protein"][k], r.detach(), rtol=1e-5)
    assert grads["protein"][key].shape == (3, *params[key].shape)


def test_batch_size_must_be_positive(smoke_setup):
    peft_model, _, probes, base_tokens = smoke_setup
    with pytest.raises(ValueError, match="batch_size"):
        element_scores(peft_model, probes.embeds, probes.positions, base_tokens, progress=False, batch_size=0)


# --------------------------------------------------------------------------- NaN / Inf refusals
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def finite_scores(seed):
    g = torch.Generator().manual_seed(seed)
    return {KEY_A: torch.rand(2, 3, generator=g), KEY_B: torch.rand(4, 2, generator=g)}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_element_coefficients_refuse_non_finite_scores_naming_the_key(bad):
    scores = [finite_scores(0), finite_scores(1)]
    scores[1][KEY_B][2, 1] = bad
    with pytest.raises(InputError) as err:
        elementwise.element_coefficients(scores)
    message = str(err.value)
    assert KEY_B in message and "specialist 1" in message and "\n" not in message
    with pytest.raises(InputError, match="q_proj.lora_B"):
        elementwise.zscore_within_layers(scores[1])
    with pytest.raises(InputError, match="q_proj.lora_B"):
        elementwise.zscore_within_layers(scores[1], per_tensor=True)


def test_finite_scores_still_give_coefficients_summing_to_one():
    beta = elementwise.element_coefficients([finite_scores(0), finite_scores(1), finite_scores(2)])
    for value in beta.values():
        assert torch.isfinite(value).all()
        assert torch.allclose(value.sum(0), torch.ones_like(value[0]))
