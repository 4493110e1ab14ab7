"""The tables of notebooks 05 and 06, on hand-made inputs."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from esmerge import methods
from esmerge.report import es_coefficients, merged_adapters
from esmerge.specialists.adapters import Adapter

KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
CONFIG = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "base_model_name_or_path": "toy"}


def toy(names=("molecule", "protein", "cell"), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: Adapter({KEY_A: torch.randn(2, 3, generator=gen), KEY_B: torch.randn(4, 2, generator=gen)},
                       dict(CONFIG), n) for n in names}


def test_coefficient_summary_by_hand():
    alpha = torch.tensor([[0.2, 0.6], [0.8, 0.4]])
    lam = {KEY_A: torch.tensor([[0.1, 0.9, 0.5], [0.9, 0.1, 0.5]])}  # ties at 0.5: argmax picks the first
    beta = {KEY_A: torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])}
    table = es_coefficients.coefficient_summary(alpha, beta, lam, ["a", "b"])
    assert table["mean alpha"].tolist() == pytest.approx([0.4, 0.6])
    assert table["mean lambda"].tolist() == pytest.approx([0.5, 0.5])
    assert table["share of elements where it has the largest lambda"].tolist() == pytest.approx([2 / 3, 1 / 3])


def test_merged_adapter_is_eq1_and_code_shift_is_zero_for_identical_settings():
    adapters = list(toy().values())
    lam = {k: torch.tensor([1.0, 0.0, 0.0]).view(3, *([1] * v.ndim)).expand(3, *v.shape).clone()
           for k, v in adapters[0].state.items()}
    merged = es_coefficients.merged_adapter(adapters, lam)
    torch.testing.assert_close(merged.state[KEY_B], adapters[0].state[KEY_B])
    row = es_coefficients.coefficient_shift("same", lam, lam)
    assert row["mean |delta lambda|"] == 0 and row["elements whose top specialist changes"] == 0


def test_code_vs_paper_element_rows_use_the_code_settings():
    from esmerge.signals import elementwise
    from esmerge.signals.combine import combine

    gen = torch.Generator().manual_seed(1)
    scores = [{KEY_A: torch.rand(2, 3, generator=gen)} for _ in range(3)]
    alpha = torch.full((3, 1), 1 / 3, dtype=torch.float64)
    lam = combine(alpha, elementwise.element_coefficients(scores, 0.5))
    table = es_coefficients.code_vs_paper_element(scores, alpha, lam, 0.5)
    assert table["setting"].tolist() == ["element tau 0.1 (code)", "per-tensor z-score (code)"]
    sharper = combine(alpha, elementwise.element_coefficients(scores, 0.1))
    expected = torch.cat([(sharper[k] - lam[k]).abs().flatten() for k in lam]).mean()
    assert table.loc[0, "mean |delta lambda|"] == pytest.approx(float(expected))
    # one layer, so the per-layer and per-tensor z-scores agree: no change
    assert table.loc[1, "max |delta lambda|"] == pytest.approx(0.0)
    with_mse = es_coefficients.code_vs_paper_element(scores, alpha, lam, 0.5, mse_scores=scores)
    assert with_mse.loc[2, "max |delta lambda|"] == pytest.approx(0.0)


def test_merged_distances_and_nearest_specialist():
    merged = {"pooled": {"molecule": torch.zeros(2, 3, 4), "cell": torch.ones(2, 3, 4)}}
    states = {"molecule": {"pooled": {"molecule": torch.zeros(2, 3, 4), "cell": torch.zeros(2, 3, 4)}},
              "cell": {"pooled": {"molecule": torch.ones(2, 3, 4), "cell": torch.ones(2, 3, 4)}}}
    table = es_coefficients.merged_distances(merged, states, ["molecule", "cell"], layer=1)
    assert table.loc["molecule", "molecule"] == 0 and table.loc["molecule", "cell"] == pytest.approx(2.0)
    assert table.loc["cell", "molecule"] == pytest.approx(2.0)
    assert es_coefficients.nearest_specialists(table) == {"cell": ("cell", True), "molecule": ("molecule", True)}
    swapped = table.rename(index={"cell": "molecule", "molecule": "cell"})
    assert es_coefficients.nearest_specialists(swapped)["cell"] == ("molecule", False)


def test_finetune_and_cost_tables_sum_avg_ft_over_benchmarks():
    metas = {b: {"info": {"loss": {"first": 2.0, "last": l}, "cost": {"wall_seconds": 1.004, "flops": 5}}}
             for b, l in (("GDSC2", 1.0), ("BindingDB", 1.5))}
    ft = merged_adapters.finetune_table(metas)
    assert ft["benchmark"].tolist() == ["GDSC2", "BindingDB"] and ft["last loss"].tolist() == [1.0, 1.5]
    meta = {"avg": {"info": {"hparams": {}, "cost": {"wall_seconds": 0.006, "flops": None}}}}
    cost = merged_adapters.cost_table(meta, ft, {"epochs": 1})
    assert cost["method"].tolist() == ["avg", "avg-ft"]
    assert cost.loc[1, "wall_s"] == pytest.approx(2.01) and cost.loc[1, "FLOPs"] == 10
    assert cost.loc[1, "hyper-parameters"] == '{"epochs": 1}' and cost.loc[0, "wall_s"] == 0.01


def test_comparison_tables_and_graft_orders():
    adapters = toy()
    norms, cosines, lora_cosines = merged_adapters.comparison_tables({"self": adapters["cell"]}, adapters)
    assert list(norms.columns) == ["self"] and len(norms) == 1
    assert cosines.loc["self", "cell"] == pytest.approx(1.0) and lora_cosines.loc["self", "cell"] == pytest.approx(1.0)
    orders = merged_adapters.graft_order_table(adapters)
    assert len(orders) == 6 and orders.index[0] == "molecule → protein → cell"
    direct = methods.run("graft", list(adapters.values()), order=["cell", "protein", "molecule"]).adapter
    assert orders.loc["cell → protein → molecule", "molecule"] == pytest.approx(
        merged_adapters.delta_cosine_to(direct, adapters)["molecule"])
    assert isinstance(merged_adapters.emr_table({"rescalers": {"a": 1.0}, "mask_density": {"a": 0.5}}), pd.DataFrame)
