"""Product-space merging (``esmerge merge --space product``) against its definition and against PEFT.

Three PEFT LoRA adapters of different rank, alpha and target modules on a tiny Llama (built here):

* ``avg`` in product space is the true mean of the adapters' ``scale * B @ A`` per module (a module an
  adapter does not adapt counts as zero) and equals PEFT's ``add_weighted_adapter(combination_type="cat")``
  with weights 1/3, to 1e-5, once the rank suffices (the sum of the input ranks); at the default rank (the
  largest input rank) the recorded reconstruction error is the truncation's true relative error.
* ``ties`` in product space equals PEFT's ``ties_svd`` (weights 1, same density and rank) when it keeps
  PEFT's count of entries, ``int(P * keep)`` (``rounding="peft"``); esmerge's own rounding keeps
  ``P - int(P * (1 - keep))``, one more entry here, so the two differ.
"""
from __future__ import annotations

import json

import pytest
import torch
from test_adapter_layouts import load_folder, loads_in_peft, peft_adapter, save_base

from esmerge.methods import product_space
from esmerge.run import byo
from esmerge.specialists.adapters import load_adapter, load_merged
from esmerge.specialists.lora_layout import delta_weights, normalise

ADAPTERS = {  # name -> LoRA config: three ranks, three scales, three target sets
    "alpha": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "beta": {"r": 8, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "gamma": {"r": 6, "lora_alpha": 6, "target_modules": ["q_proj", "v_proj", "up_proj"], "use_rslora": True},
}
RESULTS = {}  # max abs differences measured, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module")
def three(tmp_path_factory, private_cache):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("peers")
    base = save_base(root / "base")
    folders = {name: peft_adapter(base, root / name, seed, **config)
               for seed, (name, config) in enumerate(ADAPTERS.items(), 1)}
    yield base, folders
    if RESULTS:
        print("\npeer max abs differences:", json.dumps(RESULTS, indent=1))


def true_deltas(folders) -> list[dict[str, torch.Tensor]]:
    return [delta_weights(load_adapter(folder, name=name)) for name, folder in folders.items()]


def peft_merged(base, folders, combination_type: str, weights, **kwargs) -> dict[str, torch.Tensor]:
    """PEFT's ``add_weighted_adapter`` of the three adapters: each module's delta W of the new adapter."""
    from peft import PeftModel

    names = list(folders)
    model = PeftModel.from_pretrained(load_folder(base), str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(folders[name]), adapter_name=name)
    model.add_weighted_adapter(names, list(weights), "merged", combination_type=combination_type, **kwargs)
    return {module_name: module.get_delta_weight("merged").double()
            for module_name, module in model.named_modules()
            if hasattr(module, "get_delta_weight") and "merged" in getattr(module, "lora_A", {})}


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_product_avg_is_the_true_mean_and_peft_cat(three, tmp_path):
    base, folders = three
    full = sum(c["r"] for c in ADAPTERS.values())
    out = byo.merge_adapters(str(base), folders, None, tmp_path / "avg", "avg", space="product", rank=full)
    merged = delta_weights(load_adapter(out))
    deltas = true_deltas(folders)
    mean = {h: sum(d.get(h, torch.zeros_like(merged[h])) for d in deltas) / len(deltas) for h in merged}
    cat = peft_merged(base, folders, "cat", [1 / 3] * 3)
    RESULTS["avg product vs true mean"] = max_diff(merged, mean)
    RESULTS["avg product vs PEFT cat"] = max_diff(merged, cat)
    assert RESULTS["avg product vs true mean"] <= 1e-5 and RESULTS["avg product vs PEFT cat"] <= 1e-5
    meta = load_merged(out).meta
    assert meta["info"]["rank"] == full and meta["info"]["max_reconstruction_error"] <= 1e-6
    loads_in_peft(base, out)


def test_the_recorded_reconstruction_error_is_the_truncations(three, tmp_path):
    base, folders = three
    out = byo.merge_adapters(str(base), folders, None, tmp_path / "avg8", "avg", space="product")
    meta = load_merged(out).meta
    assert meta["info"]["rank"] == max(c["r"] for c in ADAPTERS.values()) == load_adapter(out).config["r"]
    merged = delta_weights(load_adapter(out))
    deltas = true_deltas(folders)
    worst = 0.0
    for head, got in merged.items():
        mean = sum(d.get(head, torch.zeros_like(got)) for d in deltas) / len(deltas)
        truth = float((mean - got).norm() / mean.norm())
        recorded = meta["info"]["reconstruction_error"][head.removeprefix("base_model.model.")]
        assert abs(truth - recorded) <= 1e-6, head
        worst = max(worst, truth)
    assert 0 < worst == pytest.approx(meta["info"]["max_reconstruction_error"], abs=1e-6)
    loads_in_peft(base, out)


def test_product_ties_equals_peft_ties_svd_with_peft_rounding(three):
    base, folders = three
    adapters, _ = normalise([load_adapter(folder, name=name) for name, folder in folders.items()])
    k = 8
    theirs = peft_merged(base, folders, "ties_svd", [1.0] * 3, density=0.2, svd_rank=k)
    ours = {}
    for rounding in ("peft", "esmerge"):
        merged, info = product_space.merge(adapters, "ties", {"keep": 0.2}, rank=k, rounding=rounding, device="cpu")
        ours[rounding] = delta_weights(merged)
        assert info["rounding"] == rounding and info["rank"] == k
    RESULTS["ties product (PEFT rounding) vs PEFT ties_svd"] = max_diff(ours["peft"], theirs)
    RESULTS["ties product (esmerge rounding) vs PEFT ties_svd"] = max_diff(ours["esmerge"], theirs)
    assert RESULTS["ties product (PEFT rounding) vs PEFT ties_svd"] <= 1e-5
    # q_proj is 32 x 32 = 1024 entries: esmerge keeps 1024 - int(819.2) = 205, PEFT int(204.8) = 204
    assert product_space.kept_count(1024, 0.2) == 205 and product_space.kept_count(1024, 0.2, "peft") == 204
    assert RESULTS["ties product (esmerge rounding) vs PEFT ties_svd"] > 1e-5


def test_product_ties_untruncated_is_the_definition(three):
    """Rank = full width: the merged delta is TIES of the true deltas, entry by entry."""
    _, folders = three
    adapters, _ = normalise([load_adapter(folder, name=name) for name, folder in folders.items()])
    merged, info = product_space.merge(adapters, "ties", {"keep": 0.5}, rank=32, device="cpu")
    deltas = true_deltas(folders)
    got = delta_weights(merged)
    for head, value in got.items():
        stack = torch.stack([d.get(head, torch.zeros_like(value)) for d in deltas])
        flat = stack.reshape(3, -1)
        keep = product_space.kept_count(flat.shape[1], 0.5)
        trimmed = torch.zeros_like(flat)
        for t in range(3):
            top = flat[t].abs().argsort(descending=True)[:keep]
            trimmed[t, top] = flat[t, top]
        sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).double()
        agree = trimmed * sign > 0
        want = ((trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)).reshape(value.shape)
        assert float((value - want).abs().max()) <= 1e-5, head
    assert info["max_reconstruction_error"] <= 1e-5
