"""ES-Merging core: Eqs. 1-4 on hand-computed cases, SWD against POT, gradients against finite differences."""
import math

import ot
import pytest
import torch

from esmerge.signals.combine import combine, merge_lora, uniform_element_coefficients, uniform_layer_coefficients
from esmerge.signals.elementwise import element_coefficients, token_distance, zscore_within_layers
from esmerge.signals.gradients import sample_distance_gradients
from esmerge.signals.layerwise import layer_changes, layer_coefficients, layer_scores
from esmerge.signals.sliced import sliced_projections, sliced_wasserstein, swd_table

R3 = math.sqrt(3.0)


def sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- Eq. 2
SWD_2x3x4 = torch.tensor([
    [[0., 2., 2., 4.], [1., 2., 3., 4.], [0., 0., 0., 4.]],   # specialist 0
    [[2., 2., 2., 2.], [0., 2., 2., 4.], [5., 5., 5., 5.]],   # specialist 1
], dtype=torch.float64)
# By hand: d = diff with SWD^0 = 0; z-score over layers (population std); sum over modalities.
#   spec 0: d = [0,2,0,2] -> z [-1,1,-1,1]; d = [1,1,1,1] -> constant -> 0; d = [0,0,0,4] -> [-1/r3]*3 + [r3]
#   spec 1: d = [2,0,0,0] -> [r3, -1/r3, -1/r3, -1/r3]; [0,2,0,2] -> [-1,1,-1,1]; [5,0,0,0] -> [r3, -1/r3 x3]
S0 = [-1 - 1 / R3, 1 - 1 / R3, -1 - 1 / R3, 1 + R3]
S1 = [2 * R3 - 1, 1 - 2 / R3, -1 - 2 / R3, 1 - 2 / R3]


def test_layer_changes_use_zero_before_first_layer():
    assert layer_changes(SWD_2x3x4)[0, 0].tolist() == [0.0, 2.0, 0.0, 2.0]
    assert layer_changes(SWD_2x3x4)[1, 2].tolist() == [5.0, 0.0, 0.0, 0.0]


def test_layer_scores_hand_computed():
    scores = layer_scores(SWD_2x3x4)
    assert torch.allclose(scores[0], torch.tensor(S0, dtype=torch.float64))
    assert torch.allclose(scores[1], torch.tensor(S1, dtype=torch.float64))


@pytest.mark.parametrize("tau", [0.5, 1.0, 0.1])
def test_layer_coefficients_hand_computed(tau):
    alpha = layer_coefficients(SWD_2x3x4, tau=tau)
    expected0 = [sigmoid((a - b) / tau) for a, b in zip(S0, S1)]
    assert alpha.shape == (2, 4)
    assert torch.allclose(alpha[0], torch.tensor(expected0, dtype=torch.float64))
    assert torch.allclose(alpha.sum(0), torch.ones(4, dtype=torch.float64))


def test_layer_coefficients_ties_and_constant_swd_give_equal_weights_without_nan():
    tied = torch.tensor([[[1., 3., 4.]], [[1., 3., 4.]], [[1., 3., 4.]]])
    alpha = layer_coefficients(tied)
    assert torch.allclose(alpha, torch.full((3, 3), 1 / 3))
    flat = torch.tensor([[[2., 4., 6.]], [[0., 0., 0.]]])  # both have constant d^l -> zero variance
    alpha = layer_coefficients(flat)
    assert not torch.isnan(alpha).any()
    assert torch.allclose(alpha, torch.full((2, 3), 0.5))


def test_layer_coefficients_reject_bad_input():
    with pytest.raises(ValueError, match="n_specialists, n_modalities, n_layers"):
        layer_coefficients(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="tau"):
        layer_coefficients(SWD_2x3x4, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        layer_coefficients(SWD_2x3x4, tau=float("nan"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_layer_coefficients_refuse_non_finite_swd(bad):
    """Regression: z-scores of a NaN SWD row became 0 and the coefficients silently uniform."""
    from esmerge.errors import InputError

    swd = SWD_2x3x4.clone()
    swd[1, 0, 2] = bad
    with pytest.raises(InputError, match="SWD table has 1 NaN/Inf"):
        layer_coefficients(swd)


def test_zero_projections_are_refused_not_nan():
    """Regression: n_projections=0 gave SWD = NaN and uniform 1/3 coefficients, exit 0."""
    from esmerge.errors import UsageError

    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match="n_projections must be an integer >= 1, got 0"):
        swd_table({"m": x[None]}, [{"m": x[None] + 1}], n_projections=0)


def test_combine_and_merge_lora_refuse_non_finite_coefficients():
    from esmerge.errors import InputError

    key = "layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(InputError, match="alpha"):
        combine(torch.tensor([[float("nan")], [0.5]]), {key: torch.full((2, 2), 0.5)})
    with pytest.raises(InputError, match=f"beta of {key}"):
        combine(torch.full((2, 1), 0.5), {key: torch.tensor([[float("inf"), 0.5], [0.5, 0.5]])})
    with pytest.raises(InputError, match="coefficients of w"):
        merge_lora([{"w": torch.ones(2)}, {"w": torch.ones(2)}], {"w": torch.tensor([float("nan"), 1.0])})


# --------------------------------------------------------------------------- SWD
def test_swd_matches_pot_and_is_order_invariant():
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randn(30, 6, generator=g, dtype=torch.float64),
            torch.randn(30, 6, generator=g, dtype=torch.float64) + 0.5)
    proj = sliced_projections(6, 64, seed=3)
    ours = sliced_wasserstein(x, y, proj)
    pot = ot.sliced_wasserstein_distance(x.numpy(), y.numpy(), n_projections=64, seed=3)
    assert ours == pytest.approx(float(pot), rel=1e-10)
    perm = torch.randperm(30, generator=g)
    assert sliced_wasserstein(x[perm], y, proj) == pytest.approx(ours, rel=1e-12)
    assert sliced_wasserstein(x, x, proj) == 0.0


def test_swd_one_dimensional_equals_wasserstein_of_sorted_samples():
    # In 1-D every projection is +-1, so SWD_2 is the W_2 of the sorted samples.
    x, y = torch.tensor([[0.], [1.], [2.]]), torch.tensor([[1.], [2.], [6.]])
    expected = math.sqrt((1 + 1 + 16) / 3)
    assert sliced_wasserstein(x, y, sliced_projections(1, 5)) == pytest.approx(expected)


def test_swd_table_shape_and_seed_determinism():
    g = torch.Generator().manual_seed(0)
    base = {m: torch.randn(3, 10, 4, generator=g) for m in ("molecule", "protein")}
    specs = [{m: v + 0.1 * (j + 1) for m, v in base.items()} for j in range(3)]
    t1 = swd_table(base, specs, n_projections=16, seed=5)
    t2 = swd_table(base, specs, n_projections=16, seed=5)
    assert t1.shape == (3, 2, 3)
    assert torch.equal(t1, t2)
    # A pure shift by c*1 moves every projected sample by c*<w,1>: larger shift, larger SWD.
    assert (t1[2] > t1[0]).all()
    with pytest.raises(ValueError, match="molecule"):
        swd_table(base, [{"molecule": torch.zeros(3, 9, 4), "protein": base["protein"]}])


# --------------------------------------------------------------------------- Eq. 3
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
KEY_A1 = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def test_element_coefficients_hand_computed():
    spec0 = {KEY_A: torch.tensor([1., 3.]), KEY_B: torch.tensor([2., 2.])}   # layer 0: [1,3,2,2] -> z [-r2, r2, 0, 0]
    spec1 = {KEY_A: torch.tensor([5., 5.]), KEY_B: torch.tensor([5., 5.])}   # constant layer -> z = 0
    beta = element_coefficients([spec0, spec1], tau=0.5)
    r2 = math.sqrt(2.0)
    assert torch.allclose(beta[KEY_A][0], torch.tensor([sigmoid(-r2 / 0.5), sigmoid(r2 / 0.5)], dtype=torch.float64))
    assert torch.allclose(beta[KEY_B][0], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.allclose(beta[KEY_A].sum(0), torch.ones(2, dtype=torch.float64))


def test_zscore_within_layer_vs_per_tensor():
    scores = {KEY_A: torch.tensor([1., 3.]), KEY_B: torch.tensor([10., 30.]), KEY_A1: torch.tensor([4., 4.])}
    per_layer = zscore_within_layers(scores)
    per_tensor = zscore_within_layers(scores, per_tensor=True)
    assert torch.allclose(per_tensor[KEY_A], torch.tensor([-1., 1.], dtype=torch.float64))
    assert torch.allclose(per_tensor[KEY_B], torch.tensor([-1., 1.], dtype=torch.float64))
    flat = torch.tensor([1., 3., 10., 30.], dtype=torch.float64)
    assert torch.allclose(per_layer[KEY_B],
                          (torch.tensor([10., 30.], dtype=torch.float64) - flat.mean()) / flat.std(unbiased=False))
    assert torch.equal(per_layer[KEY_A1], torch.zeros(2, dtype=torch.float64))


# --------------------------------------------------------------------------- Eq. 4 and Eq. 1
def test_combine_hand_computed_and_normalised():
    alpha = torch.tensor([[0.8, 0.5], [0.2, 0.5]], dtype=torch.float64)  # 2 specialists, 2 layers
    beta = {KEY_A: torch.tensor([[0.5, 0.9], [0.5, 0.1]], dtype=torch.float64),
            KEY_A1: torch.tensor([[0.25], [0.75]], dtype=torch.float64)}
    lam = combine(alpha, beta)
    # layer 0: (0.8*0.5, 0.2*0.5) -> (0.8, 0.2); (0.8*0.9, 0.2*0.1) = (0.72, 0.02) -> (0.72/0.74, 0.02/0.74)
    assert torch.allclose(lam[KEY_A], torch.tensor([[0.8, 0.72 / 0.74], [0.2, 0.02 / 0.74]], dtype=torch.float64))
    # layer 1: alpha uniform -> lambda = beta
    assert torch.allclose(lam[KEY_A1], beta[KEY_A1])


def test_combine_with_uniform_factor_reduces_to_the_other():
    g = torch.Generator().manual_seed(0)
    alpha = torch.softmax(torch.randn(3, 2, generator=g, dtype=torch.float64), 0)
    template = {KEY_A: torch.zeros(2, 5), KEY_A1: torch.zeros(4, 2)}
    lam = combine(alpha, uniform_element_coefficients(template, 3))
    assert torch.allclose(lam[KEY_A], alpha[:, 0].view(3, 1, 1).expand(3, 2, 5))
    beta = {k: torch.softmax(torch.randn(3, *v.shape, generator=g, dtype=torch.float64), 0)
            for k, v in template.items()}
    lam = combine(uniform_layer_coefficients(3, 2), beta)
    assert all(torch.allclose(lam[k], beta[k]) for k in beta)


def test_merge_lora_one_hot_reproduces_adapter_and_weights_sum():
    g = torch.Generator().manual_seed(0)
    states = [{KEY_A: torch.randn(2, 3, generator=g), KEY_B: torch.randn(4, 2, generator=g)} for _ in range(3)]
    for j in range(3):
        one_hot = {k: torch.zeros(3, *v.shape, dtype=torch.float64).index_fill_(0, torch.tensor([j]), 1.0)
                   for k, v in states[0].items()}
        merged = merge_lora(states, one_hot)
        assert all(torch.equal(merged[k], states[j][k]) for k in merged)
    mean = merge_lora(states, {k: torch.full((3,), 1 / 3) for k in states[0]})
    assert torch.allclose(mean[KEY_A], sum(s[KEY_A] for s in states) / 3)
    with pytest.raises(ValueError, match="3 adapters"):
        merge_lora(states, {k: torch.full((2,), 0.5) for k in states[0]})


# --------------------------------------------------------------------------- element scores
def _rms_norm_in_input_dtype(self, x):
    # HF's LlamaRMSNorm computes in float32 even for float64 input; finite differences need float64.
    return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


@pytest.fixture(scope="module")
def tiny_peft():
    from peft import get_peft_model
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    patch = pytest.MonkeyPatch()
    patch.setattr(LlamaRMSNorm, "forward", _rms_norm_in_input_dtype)

    from esmerge.specialists.base_llm import load_smoke, lora_config

    torch.manual_seed(0)
    base = load_smoke(seed=0, num_layers=3, hidden_size=32)
    model = base.model.double()
    peft_model = get_peft_model(model, lora_config()).double()  # LoRA layers are created in fp32
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    yield peft_model
    patch.undo()


def _layer_distance(peft_model, embeds, pos, base_layer, layer):
    """r^layer by a plain full forward (no detaching), for finite differences."""
    out = peft_model(inputs_embeds=embeds.unsqueeze(0), output_hidden_states=True, use_cache=False)
    # hidden_states[l] is the output of block l (1-based) except the last, which has the final norm;
    # the test only uses inner layers.
    return token_distance(out.hidden_states[layer + 1][0, pos], base_layer)


def test_element_gradients_match_finite_differences(tiny_peft):
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(10, 32, generator=g, dtype=torch.float64)
    positions = {"molecule": torch.tensor([2, 3, 4]), "cell": torch.tensor([6, 7])}
    with torch.no_grad(), tiny_peft.disable_adapter():
        hs = tiny_peft(inputs_embeds=embeds.unsqueeze(0), output_hidden_states=True).hidden_states
    # Base states of layers 0..1 from the base (block outputs); layer 2 is not checked by FD.
    base_tokens = {m: torch.stack([hs[l + 1][0, p] for l in range(3)]) for m, p in positions.items()}
    grads, dists = sample_distance_gradients(tiny_peft, embeds, positions, base_tokens)
    params = dict(tiny_peft.named_parameters())
    h = 1e-6
    for layer in (0, 1):
        for module, part in (("q_proj", "A"), ("down_proj", "B"), ("v_proj", "B")):
            name = (f"base_model.model.model.layers.{layer}.{'mlp' if module == 'down_proj' else 'self_attn'}."
                    f"{module}.lora_{part}.default.weight")
            key = name.replace(".default", "")
            p = params[name]
            for idx in [(0, 0), (1, 2)]:
                for modality, pos in positions.items():
                    with torch.no_grad():
                        old = p[idx].item()
                        p[idx] = old + h
                        up = _layer_distance(tiny_peft, embeds, pos, base_tokens[modality][layer], layer)
                        p[idx] = old - h
                        down = _layer_distance(tiny_peft, embeds, pos, base_tokens[modality][layer], layer)
                        p[idx] = old
                    fd = (up - down).item() / (2 * h)
                    assert grads[modality][key][idx].item() == pytest.approx(fd, rel=1e-4,
                                                                             abs=1e-8), (key, idx, modality)
    # The recorded distances are the true (non-isolated) r^l.
    r0 = _layer_distance(tiny_peft, embeds, positions["molecule"], base_tokens["molecule"][0], 0)
    assert dists["molecule"][0].item() == pytest.approx(r0.item(), rel=1e-10)


def test_gradients_are_layer_isolated(tiny_peft):
    """r^0 must not flow into layer-1 parameters and vice versa: grads of layer l come from r^l only."""
    g = torch.Generator().manual_seed(3)
    embeds = torch.randn(8, 32, generator=g, dtype=torch.float64)
    positions = {"protein": torch.tensor([1, 2, 3])}
    base_tokens = {"protein": torch.zeros(3, 3, 32, dtype=torch.float64)}
    grads, _ = sample_distance_gradients(tiny_peft, embeds, positions, base_tokens)
    # Changing the base target of layer 1 only must leave layer-0 gradients unchanged.
    shifted = {"protein": base_tokens["protein"].clone()}
    shifted["protein"][1] += 1.0
    grads2, _ = sample_distance_gradients(tiny_peft, embeds, positions, shifted)
    for key, value in grads["protein"].items():
        same = torch.allclose(value, grads2["protein"][key])
        assert same == (".layers.1." not in key), key


def test_one_pass_mse_scores_equal_direct_mse_gradients(tiny_peft):
    """element_scores_by_distance derives MSE scores from Frobenius gradients; check against direct MSE gradients."""
    from esmerge.signals.element_scores import element_scores_by_distance

    g = torch.Generator().manual_seed(4)
    embeds = torch.randn(2, 9, 32, generator=g, dtype=torch.float64)
    positions = {"molecule": torch.tensor([1, 2]), "cell": torch.tensor([5, 6, 7])}
    base_tokens = {m: 0.5 * torch.randn(3, 2, len(p), 32, generator=g, dtype=torch.float64)
                   for m, p in positions.items()}
    both = element_scores_by_distance(tiny_peft, embeds, positions, base_tokens, progress=False)
    direct = {k: torch.zeros_like(v) for k, v in both["mse"].items()}
    for k in range(2):
        grads, _ = sample_distance_gradients(tiny_peft, embeds[k], positions,
                                             {m: base_tokens[m][:, k] for m in positions}, "mse")
        for per_key in grads.values():
            for key, value in per_key.items():
                direct[key] += value.abs().float()
    for key in direct:
        assert torch.allclose(both["mse"][key], direct[key], rtol=1e-5, atol=1e-9), key
    assert not torch.allclose(both["mse"][next(iter(direct))], both["frobenius"][next(iter(direct))])
