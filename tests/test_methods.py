"""Merging baselines and Graft: hand-computed cases, invariants, and end-to-end smoke runs."""
from __future__ import annotations

import math

import pytest
import torch

from esmerge import evaluate, methods, scales
from esmerge.methods import primitives as P
from esmerge.methods.adamerging import coefficient_groups, layerwise_sum
from esmerge.methods.emr import emr_benchmark_adapter, emr_task_adapter, emr_unified
from esmerge.methods.graft import (
    dual_gate_weights,
    global_gate,
    graft_matrix,
    weight_entropy,
)
from esmerge.methods.graft_compatibility import compatibility_score
from esmerge.methods.lsmerge import VAEConfig, chunk_vectors, train_vae
from esmerge.methods.objectives import lora_state_swapped, mean_entropy
from esmerge.methods.pcb_balance import keep_top_fraction, pcb_log_balance
from esmerge.run.baseline_inputs import answer_nll_loss, label_entropy_objective
from esmerge.signals.hooks import module_outputs
from esmerge.specialists.adapters import (
    Adapter,
    AdapterMismatchError,
    adapter_from_model,
    load_adapter,
    save_adapter,
    with_state,
)

OURS = ("avg", "ties", "emr", "pcb", "consensus", "adamerging", "ls-merge", "graft", "avg-ft")
MODALITIES = ("molecule", "protein", "cell")


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def smoke():
    """A smoke LLaMA with LoRA, three adapters with randomised A and B, and tokenised prompts."""
    from peft import get_peft_model

    from esmerge.specialists.base_llm import load_base, lora_config

    base = load_base(scales.get("smoke"), seed=0)
    model = get_peft_model(base.model, lora_config())
    model.requires_grad_(False)
    adapters = []
    for i, name in enumerate(MODALITIES):
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
        adapters.append(adapter_from_model(model, name))
    tok = base.tokenizer
    prompts = ["Does aspirin bind COX1? Answer:", "Is CCO toxic? Answer:", "Protein MKV binds? Answer:",
               "Cell line A549 sensitive? Answer:"]
    enc = tok(prompts, return_tensors="pt", padding=True)
    batches = [{"input_ids": enc.input_ids[i : i + 2], "attention_mask": enc.attention_mask[i : i + 2]} for i in (0, 2)]
    # The evaluation's own prompts and batches, as the production objectives see them.
    asked = [evaluate.Prompt(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                     add_generation_prompt=True), [], ("No", "Yes"), y)
             for q, y in zip(prompts, (1, 0, 1, 0))]
    prompt_batches = [evaluate.collate(asked[i : i + 2], tok) for i in (0, 2)]
    return {"base": base, "model": model, "adapters": adapters, "batches": batches, "prompt_batches": prompt_batches}


def _toy_adapters(tensors: list[dict[str, torch.Tensor]]) -> list[Adapter]:
    config = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "toy"}
    return [Adapter(t, dict(config), name) for t, name in zip(tensors, MODALITIES)]


KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
KEY_A1 = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"


def _random_toy(seed: int, n: int = 3) -> list[Adapter]:
    gen = torch.Generator().manual_seed(seed)
    return _toy_adapters([
        {KEY_A: torch.randn(2, 5, generator=gen), KEY_B: torch.randn(4, 2, generator=gen) * 0.1,
         KEY_A1: torch.randn(2, 5, generator=gen)}
        for _ in range(n)
    ])


# --------------------------------------------------------------------------- primitives: worked examples
def test_flatten_unflatten_roundtrip():
    adapters = _random_toy(0)
    tau, keys, shapes = P.flatten(adapters)
    assert tau.shape == (3, 10 + 8 + 10)
    for t, adapter in enumerate(adapters):
        back = P.unflatten(tau[t], keys, shapes)
        for k in adapter.state:
            torch.testing.assert_close(back[k], adapter.state[k])


def test_ties_worked_example():
    # keep 50%: per row, entries with the 2 largest magnitudes survive.
    tau = torch.tensor([[0.5, -1.0, 0.1, 2.0],
                        [-0.2, 0.3, 0.4, -1.0],
                        [0.6, -0.2, -0.9, -3.0]])
    trimmed = P.magnitude_trim(tau, keep=0.5)
    torch.testing.assert_close(trimmed, torch.tensor([[0.0, -1.0, 0.0, 2.0],
                                                      [0.0, 0.0, 0.4, -1.0],
                                                      [0.0, 0.0, -0.9, -3.0]]))
    sign = P.elect_sign(trimmed)  # sums: 0 (-> +1), -1.0, -0.5, -2.0
    torch.testing.assert_close(sign, torch.tensor([1.0, -1.0, -1.0, -1.0]))
    # column 0: nothing left -> 0; column 2: 0.4 disagrees; column 3: -1 and -3 agree -> -2, 2.0 excluded.
    torch.testing.assert_close(P.disjoint_mean(trimmed, sign), torch.tensor([0.0, -1.0, -0.9, -2.0]))


def test_ties_method_on_worked_example():
    adapters = _toy_adapters([{KEY_A: torch.tensor([[v]])} for v in (1.0, 2.0, -4.0)])
    merged = methods.get("ties").fn(adapters, keep=1.0, scaling_factor=1.0).adapter.state[KEY_A]
    torch.testing.assert_close(merged, torch.tensor([[-4.0]]))  # mass 3 < 4: elect -, only -4 agrees
    merged2 = methods.get("ties").fn(adapters, keep=1.0, scaling_factor=0.5).adapter.state[KEY_A]
    torch.testing.assert_close(merged2, torch.tensor([[-2.0]]))


def test_tall_mask_and_consensus_worked_example():
    tau = torch.tensor([[1.0, 0.1, 0.0, 0.5],
                        [1.0, 2.0, 0.0, -0.5],
                        [1.0, 0.0, 0.3, 0.0]])
    # tau_MTL = [3, 2.1, 0.3, 0]; |tau_MTL - tau_t|: row0 [2, 2, .3, .5], row1 [2, .1, .3, .5], row2 [2, 2.1, 0, 0]
    masks = P.tall_masks(tau, 0.5)
    expected = torch.tensor([[1, 0, 0, 1],   # 1>=1, .1<1, 0<.15, .5>=.25
                             [1, 1, 0, 1],   # 2>=.05, 0<.15, .5>=.25
                             [1, 0, 1, 1]],  # .3>=0, 0>=0
                            dtype=torch.bool)
    assert torch.equal(masks, expected)
    assert torch.equal(P.consensus_mask(masks, 2), torch.tensor([True, False, False, True]))
    per_task = P.tall_masks(tau, torch.tensor([0.5, 0.5, 100.0]))
    assert torch.equal(per_task[2], torch.tensor([False, False, True, True]))


def test_emr_reconstructs_sign_pattern_and_rescales():
    adapters = _random_toy(1)
    result = methods.run("emr", adapters)
    tau, keys, _ = P.flatten(adapters)
    unified = emr_unified(tau)
    for t, name in enumerate(MODALITIES):
        rec = torch.cat([emr_task_adapter(result, name).state[k].reshape(-1) for k in keys])
        nonzero = rec != 0
        # wherever the reconstruction is non-zero it has the task's own sign ...
        assert torch.equal(torch.sign(rec[nonzero]), torch.sign(tau[t][nonzero]))
        # ... and it is non-zero exactly where the task agrees with the elected sign
        assert torch.equal(nonzero, tau[t] * unified > 0)
        # the rescaler restores the task vector's L1 mass (EMR Eq. 6)
        torch.testing.assert_close(rec.abs().sum(), tau[t].abs().sum())
    both = emr_benchmark_adapter(result, ["molecule", "protein"])
    expected = (emr_task_adapter(result, "molecule").state[KEY_A]
                + emr_task_adapter(result, "protein").state[KEY_A]) / 2
    torch.testing.assert_close(both.state[KEY_A], expected)
    with pytest.raises(KeyError, match="no EMR mask"):
        emr_task_adapter(result, "rna")


def test_emr_unified_worked_example():
    tau = torch.tensor([[1.0, -2.0, 0.5], [-3.0, 1.0, 0.2], [0.5, -4.0, -0.1]])
    # sums -1.5, -5, 0.6 -> signs -, -, +; max agreeing magnitudes 3, 4, 0.5
    torch.testing.assert_close(emr_unified(tau), torch.tensor([-3.0, -4.0, 0.5]))


def test_pcb_balance_worked_example():
    tau = torch.tensor([[1.0, 2.0], [2.0, 2.0]])
    log_beta = pcb_log_balance(tau)
    # row 0: Norm(tau0^2) = [0, 1]; intra = softmax([0, 2]); Norm(tau0*tau0)=[0,1], Norm(tau0*tau1)=[0,1]
    intra0 = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    inter0 = 2 * torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(log_beta[0].exp(), intra0 * inter0)
    # row 1: constant tau1^2 -> Norm = 0 -> uniform; tau1*tau0 = [2, 4] -> [0, 1]
    intra1 = torch.tensor([0.5, 0.5])
    inter1 = torch.tensor([0.5, 0.5]) + torch.softmax(torch.tensor([0.0, 1.0]), 0)
    torch.testing.assert_close(log_beta[1].exp(), intra1 * inter1)


def test_pcb_drop_zero_equal_tasks_is_average_and_drop_removes_low_scores():
    adapters = _random_toy(2)
    same = [with_state(adapters[0], adapters[0].state, n) for n in MODALITIES]
    merged = methods.run("pcb", same, drop=0.0)
    for k, v in adapters[0].state.items():
        torch.testing.assert_close(merged.adapter.state[k], v)
    # tasks that are permutation-free copies up to sign flip of a whole task still give equal beta on
    # shared magnitudes; with drop=0 the weights are a convex combination: result within [min, max]
    tau, _, _ = P.flatten(adapters)
    out, _, _ = P.flatten([methods.run("pcb", adapters, drop=0.0).adapter])
    assert torch.all(out[0] <= tau.max(0).values + 1e-6) and torch.all(out[0] >= tau.min(0).values - 1e-6)
    keep = keep_top_fraction(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), drop=0.5)
    assert torch.equal(keep, torch.tensor([[True, False, True, False]]))


def test_identical_adapters_merge_to_themselves():
    adapters = _random_toy(3)
    same = [with_state(adapters[0], adapters[0].state, n) for n in MODALITIES]
    cases = {"avg": {}, "ties": {"keep": 1.0, "scaling_factor": 1.0}, "pcb": {"drop": 0.0}, "consensus": {},
             "graft": {}}
    for name, hp in cases.items():
        merged = methods.run(name, same, **hp).adapter
        for k, v in adapters[0].state.items():
            torch.testing.assert_close(merged.state[k], v, msg=f"{name} changed {k}")
    emr = methods.run("emr", same)
    for name in MODALITIES:
        for k, v in adapters[0].state.items():
            torch.testing.assert_close(emr_task_adapter(emr, name).state[k], v)


# --------------------------------------------------------------------------- Graft
def test_graft_gates():
    # Algorithm 1's global gate: 1/2 at equal entropy, within (1/2 - a/2, 1/2 + a/2)
    assert float(global_gate(1.0, 1.0)) == pytest.approx(0.5)
    assert float(global_gate(2.0, 1.0, a=0.4, c=500)) == pytest.approx(0.5 + 0.4 / math.pi * math.atan(500), abs=1e-6)
    assert 0.69 < float(global_gate(5.0, 0.0)) < 0.7
    w_b, w_g = dual_gate_weights(torch.tensor([0.0, 0.5, 1.0]), torch.tensor(0.5))
    torch.testing.assert_close(w_b + w_g, torch.ones(3))
    # hand value at w_l = 1, g = 1/2: tilde_b = .5(1 - e^-.5), tilde_g = 0
    tb = 0.5 * (1 - math.exp(-0.5))
    assert float(w_b[2]) == pytest.approx(math.exp(tb) / (math.exp(tb) + 1))
    assert float(weight_entropy(torch.tensor([0.0, 0.0, 1.0, 1.0]), bins=2)) == pytest.approx(math.log(2))
    assert float(weight_entropy(torch.zeros(3, 3))) == 0.0


def test_graft_identical_inputs_return_input_and_order_matters():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    fused, _ = graft_matrix(w, w.clone())
    torch.testing.assert_close(fused, w)
    adapters = _random_toy(4)
    forward = methods.run("graft", adapters)
    backward = methods.run("graft", adapters, order=["cell", "protein", "molecule"])
    assert not torch.allclose(forward.adapter.state[KEY_A], backward.adapter.state[KEY_A])
    assert forward.info["hparams"]["order"] == list(MODALITIES)
    with pytest.raises(ValueError, match="permutation"):
        methods.run("graft", adapters, order=["cell", "protein"])


def test_graft_fused_rows_are_convex_combinations():
    gen = torch.Generator().manual_seed(1)
    b, g = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    fused, _ = graft_matrix(b, g)
    # per row, fused = w b + (1-w) g with a single w in (0,1): recover w from column 0, check all columns
    w = (fused[:, 0] - g[:, 0]) / (b[:, 0] - g[:, 0])
    assert torch.all((w > 0) & (w < 1))
    torch.testing.assert_close(fused, w[:, None] * b + (1 - w[:, None]) * g)


def test_compatibility_score_worked_example():
    acts = {"m1": [torch.tensor([1.0, -1.0, 0.0, 0.0])], "m2": [torch.tensor([2.0, 2.0, 2.0, 2.0])]}
    out = compatibility_score(acts)
    # m1: mu .5, s .5, v .5 ; m2: mu 2, s 0, v 0
    assert out["rho"]["m1"] == pytest.approx(0.5 * 0.5 * math.sqrt(0.5))
    assert out["rho"]["m2"] == pytest.approx(0.0)
    # normalised: m1 -> mu' 0, s' 1, v' 1 -> 0; m2 -> mu' 1, s' 0, v' 0 -> 0
    assert out["compatibility"] == pytest.approx(0.0)


# --------------------------------------------------------------------------- LS-Merge
def test_ls_merge_vae_reconstruction_improves():
    tau = torch.randn(3, 300, generator=torch.Generator().manual_seed(0))
    chunks = chunk_vectors(tau, 64)
    assert chunks.shape == (3, 5, 64) and torch.all(chunks[:, -1, 300 - 256:] == 0)
    flat = chunks.reshape(-1, 64)
    positions = torch.arange(5).repeat(3)
    _, log = train_vae(flat, positions, VAEConfig(chunk=64, hidden=32, latent=8, epochs=80, batch=15, lr=1e-2),
                       progress=False)
    # A trained-outcome bound, not a trajectory: 80 epochs fit these 15 chunks to 1.5-5.5% of the
    # untrained error for every data seed 0-2 x VAE seed 0-3 (paths far apart, unlike two CPUs'
    # rounding of one path), so half leaves a 9x margin; a VAE that does not learn stays near 100%.
    assert log["recon_after"] < 0.5 * log["recon_before"]


# --------------------------------------------------------------------------- AdaMerging, Avg+FT
def test_adamerging_combine_is_layerwise_weighted_sum():
    adapters = _random_toy(5)
    keys = sorted(adapters[0].state)
    groups, labels = coefficient_groups(keys, "layer")
    assert labels == ["layer0", "layer1"]
    coeff = torch.tensor([[0.1, 1.0], [0.2, 0.0], [0.3, 0.5]])
    stacked = {k: torch.stack([a.state[k] for a in adapters]) for k in keys}
    out = layerwise_sum(stacked, coeff, dict(zip(keys, groups)))
    s = [a.state for a in adapters]
    torch.testing.assert_close(out[KEY_B], 0.1 * s[0][KEY_B] + 0.2 * s[1][KEY_B] + 0.3 * s[2][KEY_B])
    torch.testing.assert_close(out[KEY_A1], 1.0 * s[0][KEY_A1] + 0.5 * s[2][KEY_A1])


# Why the optimiser tests check one small step, not a trajectory: several Adam steps at a large rate
# on this tiny model are chaotic, and the path depends on the CPU's float kernels (MKL and ATen pick
# different code per CPU): the old "entropy lower by 1e-3 after 10 steps at lr 0.1" failed on an AMD
# EPYC, and here under MKL_ENABLE_INSTRUCTIONS=SSE4_2. One step of rate eta along -sign(grad) (Adam's
# first step) on ONE fixed batch lowers a smooth objective by eta * ||grad||_1 to first order on any
# CPU; the tests ask for half of that (Armijo's condition). Measured: the decrease is 0.9-1.1x the
# prediction under ATEN_CPU_CAPABILITY default/avx2/avx512 x MKL SSE4_2/AVX2/AVX512, while those
# settings move the objective by < 1e-6 relative, far below the bound (~1% of the objective).
def _first_order_bound(eta: float, grads) -> float:
    return 0.5 * eta * float(sum(g.abs().sum() for g in grads))


def test_adamerging_descends_the_entropy_on_smoke_model(smoke):
    # One batch, so every call of the objective sees the same prompts (it cycles through its batches).
    objective = label_entropy_objective(smoke["model"], smoke["prompt_batches"][:1], {})
    keys = sorted(smoke["adapters"][0].state)
    groups, labels = coefficient_groups(keys, "layer")
    stacked = {k: torch.stack([a.state[k].float() for a in smoke["adapters"]]) for k in keys}
    start = torch.full((3, len(labels)), 0.3, requires_grad=True)  # the method's default init
    value = objective(layerwise_sum(stacked, start, dict(zip(keys, groups))))
    (grad,) = torch.autograd.grad(value, [start])
    f0 = float(value.detach())
    # Components this small could flip sign between CPUs (here the smallest is 3.6e-3, the largest 0.17).
    clear = grad.abs() > 1e-3 * grad.abs().max()
    assert clear.sum() >= 6

    eta = 1e-3  # small enough that the curvature term (eta^2 scale) is far below eta * ||grad||_1
    small = methods.run("adamerging", smoke["adapters"], {"entropy_objective": objective},
                        steps=1, lr=eta, progress=False, count_cost=False)
    ent = small.info["entropy"]
    assert ent["first_step"] == pytest.approx(f0, rel=1e-5)  # the same point, the same batch
    moved = torch.tensor([list(small.info["coefficients"][n].values()) for n in small.info["coefficients"]]) - 0.3
    # Adam's first step is eta * g / (|g| + 1e-8): -eta * sign(g) to 1e-6 relative for these |g|.
    torch.testing.assert_close(moved[clear], -eta * grad.sign()[clear], rtol=1e-3, atol=1e-6)
    assert ent["final"] < f0 - _first_order_bound(eta, [grad])

    # A step of rate 1 leaves [0, 1] from 0.3 in every coordinate; the clip puts each on 0 or 1 by its sign.
    big = methods.run("adamerging", smoke["adapters"], {"entropy_objective": objective},
                      steps=1, lr=1.0, progress=False, count_cost=False)
    coeffs = torch.tensor([list(big.info["coefficients"][n].values()) for n in big.info["coefficients"]])
    assert coeffs.shape == (3, 4)
    assert bool(((coeffs >= 0) & (coeffs <= 1)).all()), coeffs
    assert torch.equal(coeffs[clear], (grad[clear] < 0).float())


def test_lora_state_swapped_matches_loaded_weights(smoke):
    from peft import set_peft_model_state_dict

    model, adapter = smoke["model"], smoke["adapters"][1]
    batch = smoke["batches"][0]
    with torch.no_grad(), lora_state_swapped(model, adapter.state):
        swapped = model(**batch).logits
    saved = {k: v.clone() for k, v in smoke["adapters"][2].state.items()}
    set_peft_model_state_dict(model, adapter.state)
    with torch.no_grad():
        direct = model(**batch).logits
    set_peft_model_state_dict(model, saved)
    torch.testing.assert_close(swapped, direct)
    assert float(mean_entropy(torch.tensor([[0.0, 0.0]]))) == pytest.approx(math.log(2))


def test_avg_ft_descends_the_training_loss(smoke):
    # One step on one batch: a first-order property that holds on any CPU (see above), where the old
    # "last loss < first loss" over 8 steps compared two different batches along a CPU-dependent path.
    loss_fn, batch = answer_nll_loss(smoke["model"], {}), smoke["prompt_batches"][0]
    keys = sorted(smoke["adapters"][0].state)
    average = {k: torch.stack([a.state[k].float() for a in smoke["adapters"]]).mean(dim=0).requires_grad_(True)
               for k in keys}
    value = loss_fn(average, batch)
    grads = torch.autograd.grad(value, [average[k] for k in keys])
    l0 = float(value.detach())
    eta = 1e-5  # 32k parameters: the curvature term grows with their number, so a smaller rate than AdaMerging's
    context = {"train_loss": loss_fn, "train_batches": [batch], "benchmark": "toy"}
    result = methods.run("avg-ft", smoke["adapters"], context, epochs=1, lr=eta, progress=False)
    assert result.info["loss"]["history"] == [pytest.approx(l0, rel=1e-5)]
    with torch.no_grad():
        after = float(loss_fn(result.adapter.state, batch))
    assert after < l0 - _first_order_bound(eta, grads)
    # Every parameter with a clear gradient moved against it.
    for key, g in zip(keys, grads):
        step = result.adapter.state[key] - average[key].detach()
        clear = g.abs() > 1e-5
        assert bool((step[clear] * g[clear] < 0).all()), key
    assert result.info["cost"]["flops"] > 0 and result.info["benchmark"] == "toy"


# --------------------------------------------------------------------------- end to end + bad input
def _context(smoke):
    return {
        "entropy_objective": label_entropy_objective(smoke["model"], smoke["prompt_batches"], {}),
        "train_loss": answer_nll_loss(smoke["model"], {}),
        "train_batches": smoke["prompt_batches"][:1],
    }


FAST = {"adamerging": {"steps": 2}, "avg-ft": {"epochs": 1},
        "ls-merge": {"epochs": 2, "chunk": 1024, "hidden": 16, "latent": 4}}


@pytest.mark.parametrize("name", OURS)
def test_every_method_end_to_end_loads_in_peft(name, smoke, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict

    from esmerge.specialists.base_llm import load_base

    assert name in methods.names()
    result = methods.run(name, smoke["adapters"], _context(smoke), progress=False, **FAST.get(name, {})) \
        if name in FAST else methods.run(name, smoke["adapters"], _context(smoke))
    merged = result.adapter
    assert set(merged.state) == set(smoke["adapters"][0].state)
    assert all(torch.isfinite(v).all() for v in merged.state.values())
    assert result.info["cost"]["wall_seconds"] >= 0
    out = save_adapter(merged, tmp_path / name, metadata={"method": name, **result.info})
    loaded = PeftModel.from_pretrained(load_base(scales.get("smoke"), seed=0).model, str(out))
    state = get_peft_model_state_dict(loaded)
    for k, v in merged.state.items():
        torch.testing.assert_close(state[k], v)
    assert load_adapter(out).state.keys() == merged.state.keys()


def _break(adapters, how):
    bad = [Adapter(dict(a.state), dict(a.config), a.name) for a in adapters]
    if how == "rank":
        bad[1].config["r"] = 16
    elif how == "targets":
        bad[1].config["target_modules"] = ["q_proj", "v_proj"]
    elif how == "base":
        bad[2].config["base_model_name_or_path"] = "other/model"
    elif how == "shape":
        bad[1].state[KEY_A] = torch.zeros(3, 5)
    elif how == "nan":
        bad[2].state[KEY_B] = bad[2].state[KEY_B].clone()
        bad[2].state[KEY_B][0, 0] = float("nan")
    elif how == "inf":
        bad[0].state[KEY_A] = bad[0].state[KEY_A].clone()
        bad[0].state[KEY_A][1, 1] = float("inf")
    elif how == "keys":
        del bad[1].state[KEY_A1]
    return bad


@pytest.mark.parametrize("how, message", [
    ("rank", "different r"), ("targets", "different target_modules"), ("base", "different base_model_name_or_path"),
    ("shape", "has shape"), ("nan", "NaN or Inf"), ("inf", "NaN or Inf"), ("keys", "different LoRA tensors"),
])
@pytest.mark.parametrize("name", ["avg", "ties", "graft"])
def test_bad_adapters_are_refused_with_the_mismatch_named(name, how, message):
    with pytest.raises(AdapterMismatchError, match=message):
        methods.run(name, _break(_random_toy(6), how))


def test_training_methods_refuse_missing_context(smoke):
    with pytest.raises(ValueError, match="needs a MergeContext"):
        methods.run("adamerging", smoke["adapters"])
    with pytest.raises(ValueError, match="entropy_objective"):
        methods.run("adamerging", smoke["adapters"], {"train_loss": lambda s, b: 0})
    with pytest.raises(ValueError, match="train_batches"):
        methods.run("avg-ft", smoke["adapters"], {"train_loss": lambda s, b: 0})


def test_lora_state_swapped_is_differentiable_and_restores(smoke):
    model, batch = smoke["model"], smoke["batches"][1]
    state = {k: v.clone().requires_grad_(True) for k, v in smoke["adapters"][0].state.items()}
    before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    with lora_state_swapped(model, state):
        swapped = model(**batch).logits
    swapped.sum().backward()
    assert all(v.grad is not None for v in state.values())
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) and isinstance(after[n], torch.nn.Parameter) for n, p in before.items())
    with pytest.raises(KeyError, match="no LoRA parameter"):
        with lora_state_swapped(model, {KEY_A.replace("q_proj", "x_proj"): torch.zeros(1)}):
            pass


# --------------------------------------------------------------------------- contexts and report helpers
def test_benchmark_modalities_and_emr_rule():
    from esmerge.data.benchmarks import benchmark_modalities
    from esmerge.methods.emr import emr_adapter_for_benchmark

    assert benchmark_modalities("BindingDB") == ["protein", "molecule"]
    assert benchmark_modalities("DrugComb") == ["cell", "molecule"]  # molecule2 is a molecule too
    assert benchmark_modalities("CYP3A4-substrate") == ["protein", "molecule"]
    result = methods.run("emr", _random_toy(7))
    got = emr_adapter_for_benchmark(result.adapter, "GDSC2").state[KEY_B]
    expected = (emr_task_adapter(result, "cell").state[KEY_B] + emr_task_adapter(result, "molecule").state[KEY_B]) / 2
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmark_modalities("MNIST")


def test_task_names_map_specialist_names_to_modalities():
    from esmerge.methods.static import task_name, task_names

    assert task_name("molecule-specialist", 0) == "molecule" and task_name("cell", 2) == "cell"
    assert task_name("", 4) == "task4" and task_name("mine", 1) == "mine"
    assert task_names(_toy_adapters([{}, {}, {}])) == list(MODALITIES)


def test_delta_weight_norms_and_cosine_worked_example():
    from esmerge.report.merged_adapters import cosine_to, delta_weight_norms

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    (adapter,) = _toy_adapters([{KEY_A: a, KEY_B: b}])  # r=2, alpha=4: BA scaled by 2
    torch.testing.assert_close(delta_weight_norms(adapter), torch.tensor([2.0]))
    (flipped,) = _toy_adapters([{KEY_A: -a, KEY_B: b}])
    cos = cosine_to(flipped, {"same": adapter})["same"]
    assert cos == pytest.approx((-2 + 1) / 3)  # vectors (A, B) = (+-1, +-1, 1): dot -2 + 1, norms 3


def test_merge_once_resumes_and_reruns_on_new_hparams(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from esmerge.run.merge import MergeContext, merge_once
    from esmerge.specialists.adapters import load_merged

    specs = {m: SimpleNamespace(modality=m, adapter=a, projector=None) for m, a in zip(MODALITIES, _random_toy(8))}
    context = MergeContext(base=None, specialists=specs, scale="smoke")
    calls = []
    real = methods.run_checked
    monkeypatch.setattr(methods, "run_checked", lambda *a, **k: calls.append(k) or real(*a, **k))
    first, meta = merge_once("ties", tmp_path / "ties", context, keep=0.5)
    again, _ = merge_once("ties", tmp_path / "ties", context, keep=0.5)
    assert len(calls) == 1 and meta["info"]["hparams"]["keep"] == 0.5
    torch.testing.assert_close(first.state[KEY_A], again.state[KEY_A])
    merge_once("ties", tmp_path / "ties", context, keep=0.3)
    assert len(calls) == 2
    merged_emr, _ = merge_once("emr", tmp_path / "emr", context)
    assert any(k.endswith(".rescale") for k in merged_emr.extras)
    fresh = methods.run("emr", [s.adapter for s in specs.values()])
    for key in (KEY_A, KEY_B):  # masks and rescalers survive the round trip through the directory
        torch.testing.assert_close(emr_task_adapter(load_merged(tmp_path / "emr").adapter, "protein").state[key],
                                   emr_task_adapter(fresh, "protein").state[key])


def test_evaluation_backed_objectives_match_loaded_model(smoke):
    from peft import set_peft_model_state_dict

    from esmerge.run.baseline_inputs import trainable_copy

    tok = smoke["base"].tokenizer
    prompts = [evaluate.Prompt(tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                       add_generation_prompt=True), [], ("No", "Yes"), y)
               for q, y in (("Is CCO toxic?", 1), ("Does MKV bind?", 0))]
    batch = evaluate.collate(prompts, tok)
    from esmerge.specialists.base_llm import load_base

    # a fresh base: the fixture's holds LoRA
    model = trainable_copy(load_base(scales.get("smoke"), seed=0), smoke["adapters"][0])
    state = {k: v.clone().requires_grad_(True) for k, v in smoke["adapters"][1].state.items()}
    entropy = label_entropy_objective(model, [batch], {})(state)
    nll = answer_nll_loss(model, {})(state, batch)
    (entropy + nll).backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in state.values())
    set_peft_model_state_dict(model, smoke["adapters"][1].state)
    with torch.no_grad():
        scores = evaluate.label_logits(model, batch, {})
    assert float(entropy.detach()) == pytest.approx(float(mean_entropy(scores)), rel=1e-5)
    assert float(nll.detach()) == pytest.approx(float(-(scores[0, 1] + scores[1, 0]) / 2), rel=1e-5)


def test_delta_inner_matches_explicit_products():
    from esmerge.report.merged_adapters import delta_cosine_to, delta_inner

    gen = torch.Generator().manual_seed(9)
    a1, a2 = torch.randn(2, 5, generator=gen), torch.randn(2, 5, generator=gen)
    b1, b2 = torch.randn(4, 2, generator=gen), torch.randn(4, 2, generator=gen)
    assert delta_inner(a1, b1, a2, b2) == pytest.approx(float(((b1 @ a1) * (b2 @ a2)).sum()), rel=1e-5)
    (x,), (y,) = _toy_adapters([{KEY_A: a1, KEY_B: b1}]), _toy_adapters([{KEY_A: a2, KEY_B: b2}])
    expected = torch.nn.functional.cosine_similarity((b1 @ a1).reshape(-1), (b2 @ a2).reshape(-1), dim=0)
    assert delta_cosine_to(x, {"y": y})["y"] == pytest.approx(float(expected), rel=1e-5)
    assert delta_cosine_to(x, {"x": x})["x"] == pytest.approx(1.0)


def test_scope_tensor_thresholds_each_lora_tensor_and_model_scope_can_erase_b():
    adapters = _random_toy(10)  # A entries ~1, B entries ~0.1
    tau, keys, shapes = P.flatten(adapters)
    per_tensor = methods.run("ties", adapters, keep=0.5).adapter
    for k, shape in zip(keys, shapes):
        part = torch.stack([a.state[k].reshape(-1) for a in adapters])
        trimmed = P.magnitude_trim(part, 0.5)
        torch.testing.assert_close(per_tensor.state[k].reshape(-1), P.disjoint_mean(trimmed, P.elect_sign(trimmed)))
    # over the whole adapter PCB keeps only A entries: every B is dropped and B A = 0
    whole = methods.run("pcb", adapters, drop=0.7, scope="model").adapter
    assert torch.count_nonzero(whole.state[KEY_B]) == 0
    assert torch.count_nonzero(methods.run("pcb", adapters, drop=0.7).adapter.state[KEY_B]) > 0
    with pytest.raises(ValueError, match="scope"):
        methods.run("ties", adapters, scope="layer")


def test_module_outputs_feed_compatibility(smoke):
    model, batches = smoke["model"], smoke["batches"]
    with torch.no_grad():
        acts = module_outputs(model, lambda: [model(**b) for b in batches], lambda n: n.endswith("mlp.down_proj"))
    assert len(acts) == 4  # 4 layers; the first forward pass only
    assert acts[next(iter(acts))].shape == (*batches[0]["input_ids"].shape, 64)
    score = compatibility_score({k: [v] for k, v in acts.items()})
    assert 0.0 <= score["compatibility"] <= 1.0 and set(score["rho"]) == set(acts)
    with pytest.raises(ValueError, match="matched no module"):
        module_outputs(model, lambda: model(**batches[0]), lambda n: False)


def test_every_method_and_specialist_has_its_own_colour():
    from esmerge import plots
    from esmerge.methods import names

    models = ["base", *names(), *(f"specialist-{m}" for m in ("molecule", "protein", "cell"))]
    colours = {m: plots.method_color(m) for m in models}
    assert len(set(colours.values())) == len(models), colours
    assert plots.method_color("specialist cell") == plots.MODALITY_COLORS["cell"]
    assert plots.method_color("es") == plots.MODALITY_COLORS["merged"]  # as in the embedding plots


def test_emr_one_model_is_the_mean_of_the_modulated_task_vectors_not_a_routed_one():
    """EMR as one deployed adapter (no oracle routing), against a hand computation."""
    from esmerge import report
    from esmerge.methods.emr import ONE_MODEL, emr_one_model

    adapters = _toy_adapters([{KEY_A: torch.tensor([[2.0, -1.0], [0.5, 3.0]])},
                              {KEY_A: torch.tensor([[-1.0, -2.0], [1.0, -1.0]])},
                              {KEY_A: torch.tensor([[1.0, 1.0], [-2.0, 2.0]])}])
    result = methods.run("emr", adapters)
    # By hand: unified = [2, -2, -2, 3]; masks molecule [1, 1, 0, 1], protein [0, 1, 0, 0], cell [1, 0, 1, 1];
    # rescalers 6.5 / 7, 5 / 2, 6 / 7; modulated [13/7, -13/7, 0, 39/14], [0, -5, 0, 0], [12/7, 0, -12/7, 18/7].
    expected = torch.tensor([[25 / 21, -16 / 7], [-4 / 7, 25 / 14]])
    one = emr_one_model(result)
    torch.testing.assert_close(one.state[KEY_A], expected)
    assert one.name == ONE_MODEL == report.EMR_ONE_MODEL and one.extras == {}
    # routing gives each task (and each two-modality benchmark) another adapter than the one model
    for name in MODALITIES:
        assert not torch.allclose(emr_task_adapter(result, name).state[KEY_A], one.state[KEY_A])
    assert not torch.allclose(emr_benchmark_adapter(result, ["molecule", "protein"]).state[KEY_A], one.state[KEY_A])
    # on random adapters with several keys it is the mean of the routed task adapters, key by key
    toy = methods.run("emr", _random_toy(3))
    mean = emr_one_model(toy.adapter)
    for key in (KEY_A, KEY_B, KEY_A1):
        routed = torch.stack([emr_task_adapter(toy, name).state[key] for name in MODALITIES])
        torch.testing.assert_close(mean.state[key], routed.mean(0))
    torch.testing.assert_close(emr_one_model(toy, ["cell"]).state[KEY_B], emr_task_adapter(toy, "cell").state[KEY_B])
    with pytest.raises(KeyError, match="not EMR's output"):
        emr_one_model(adapters[0])


def test_emr_one_model_is_the_same_whatever_order_its_extras_were_stored_in():
    """The mean of the modulated vectors is taken in one (sorted) task order: a reloaded EMR merge whose
    extras come back in another order gives the same bits, so its digest (the evaluation cache key) holds.
    The modulated values 1e8, 1, -1e8 sum to 0 or 1 in float32 depending on the order."""
    from esmerge.methods.emr import emr_one_model
    from esmerge.specialists.adapters import Adapter

    rescale = {"a": 1e8, "b": 1.0, "c": -1e8}
    extras = {}
    for task, value in rescale.items():
        extras[f"{task}.mask.w"] = torch.tensor([True])
        extras[f"{task}.rescale"] = torch.tensor(value)
    one = Adapter({"w": torch.tensor([1.0])}, {}, "emr", extras)
    order = ["a", "c", "b"]
    shuffled = {k: extras[k] for t in order for k in (f"{t}.mask.w", f"{t}.rescale")}
    other = Adapter({"w": torch.tensor([1.0])}, {}, "emr", shuffled)
    assert torch.equal(emr_one_model(one).state["w"], emr_one_model(other).state["w"])
