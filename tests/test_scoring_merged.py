"""Evaluation with LoRA merged into the copy's weights equals PEFT's unmerged forward, and never
touches the base: ``under_test.PeftCopies(merge=True)`` against ``merge=False``."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from esmerge import evaluate as ev
from esmerge import scales
from esmerge.specialists.adapters import adapter_from_model
from esmerge.specialists.base_llm import load_base, lora_config
from esmerge.specialists.encoders import make_projector

SMILES = ["CCO", "CCN", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CCCCO", "CCOC(=O)C"]
PROTEINS = ["MKTAYIAKQRQISFVK", "GGSSLLAAVVGGSSLL", "MKTAYIAKQRQISFVA"] * 2


@pytest.fixture(scope="module")
def base():
    return load_base(scales.get("smoke"))


@pytest.fixture(scope="module")
def setup(base):
    from peft import get_peft_model

    emb = base.model.get_input_embeddings()
    projectors = {"molecule": make_projector("molecule", emb, seed=1)}
    template = adapter_from_model(get_peft_model(copy.deepcopy(base.model), lora_config()), "t")
    adapters = []
    for seed in (4, 5):
        a = copy.deepcopy(template)
        torch.manual_seed(seed)
        a.state = {k: torch.randn_like(v) * 0.2 for k, v in a.state.items()}  # B != 0: a real shift
        a.name = f"random-{seed}"
        adapters.append(a)
    df = pd.DataFrame({"molecule": SMILES, "molecule2": [None] * 6, "protein": PROTEINS, "cell_id": [None] * 6,
                       "cell_genes": [None] * 6, "y": [0, 1, 1, 0, 1, 0], "label": ["x"] * 6})
    opts = ev.PromptOptions(frozenset(projectors), protein_chars=8)
    prompts = [ev.build_prompt("Human", df.iloc[i], df.iloc[i + 1: i + 3], base.tokenizer, opts) for i in range(3)]
    return projectors, adapters, ev.collate(prompts, base.tokenizer)


def _scores(copies, base, adapter, projectors, batch):
    mut = ev.ModelUnderTest.merged(base, adapter, projectors, adapter.name)
    with mut.model_for("Human", copies) as model, torch.no_grad():
        return ev.label_logits(model, batch, projectors)


def test_merged_weights_give_the_unmerged_scores_and_leave_the_base_alone(base, setup):
    projectors, adapters, batch = setup
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    merged, unmerged = ev.PeftCopies(merge=True), ev.PeftCopies(merge=False)
    # A, B, A again: the second A comes after an unmerge, so rounding must not have accumulated
    runs = [(_scores(merged, base, a, projectors, batch), _scores(unmerged, base, a, projectors, batch))
            for a in (adapters[0], adapters[1], adapters[0])]
    for got, want in runs:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(runs[0][0], runs[1][0], atol=1e-3)  # the two adapters really differ
    assert torch.equal(runs[0][0], runs[2][0])  # reloading an adapter gives bit-identical scores
    for k, v in base.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        plain = ev.label_logits(base.model, batch, projectors)
    assert not torch.allclose(plain, runs[0][0], atol=1e-3)


def test_merged_copy_runs_no_lora_matmul(base, setup):
    """Merged: the LoRA A/B modules are not called in a forward pass; unmerged: they are."""
    projectors, adapters, batch = setup
    for merge, expect_calls in ((True, False), (False, True)):
        copies = ev.PeftCopies(merge=merge)
        mut = ev.ModelUnderTest.merged(base, adapters[0], projectors, "a")
        calls = []
        with mut.model_for("Human", copies) as model, torch.no_grad():
            hooks = [m.register_forward_hook(lambda *_: calls.append(1))
                     for name, m in model.named_modules() if name.endswith("lora_A.default")]
            assert hooks
            ev.label_logits(model, batch, projectors)
            for h in hooks:
                h.remove()
        assert bool(calls) is expect_calls
