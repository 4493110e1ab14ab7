"""Evaluation: prompts, retrieval, placeholder splicing, two-label scoring, metrics, cache, claims."""
from __future__ import annotations

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from test_data import needs_reference  # skips when ../shared/reference is not here

from esmerge import evaluate as ev
from esmerge import report, scales
from esmerge.evaluate import sweep
from esmerge.specialists.adapters import adapter_from_model
from esmerge.specialists.base_llm import load_base, lora_config
from esmerge.specialists.encoders import make_projector

CPU = scales.get("cpu")  # the settings these tests were written at

SMILES = ["CCO", "CCN", "c1ccccc1O", "CC(=O)Oc1ccccc1C(=O)O", "CCCCO", "CCOC(=O)C", "c1ccncc1", "CC(C)O",
          "c1ccccc1", "CCCCCC"]
PROT_A, PROT_B, PROT_C = "MKTAYIAKQRQISFVK", "GGSSLLAAVVGGSSLL", "MKTAYIAKQRQISFVA"


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return load_base(scales.get("smoke"))


@pytest.fixture(scope="module")
def projectors(base):
    emb = base.model.get_input_embeddings()
    return {"molecule": make_projector("molecule", emb, seed=1), "protein": make_projector("protein", emb, seed=2)}


def frame(molecules, proteins=None, y=None, genes=None, molecule2=None, cell_ids=None):
    n = len(molecules)
    return pd.DataFrame({
        "molecule": molecules, "molecule2": molecule2 or [None] * n, "protein": proteins or [None] * n,
        "cell_id": cell_ids or [None] * n, "cell_genes": genes or [None] * n,
        "y": y if y is not None else [i % 2 for i in range(n)], "label": ["x"] * n})


def mol_prot_frame():
    prots = [PROT_A, PROT_B, PROT_C, PROT_A, PROT_B, PROT_A, PROT_C, PROT_B, PROT_A, PROT_C]
    return frame(SMILES, prots, [0, 1, 1, 0, 1, 0, 1, 0, 1, 1])


# --------------------------------------------------------------------------- prompts
def test_prompt_has_the_shots_then_the_query_with_the_paper_labels(base):
    df = mol_prot_frame()
    opts = ev.PromptOptions(protein_chars=10)
    prompt = ev.build_prompt("BindingDB", df.iloc[0], df.iloc[1:6], base.tokenizer, opts)
    examples = re.findall(r"Example (\d+): Protein: (\S+) Molecule: (\S+) "
                          r"Final answer: (Interacts|Does not interact)\n", prompt.text)
    assert [int(e[0]) for e in examples] == [1, 2, 3, 4, 5]
    assert [e[2] for e in examples] == SMILES[1:6]
    assert [e[3] for e in examples] == ["Interacts" if y else "Does not interact" for y in df["y"][1:6]]
    assert examples[0][1] == PROT_B[:10] + "..."  # text proteins are truncated to protein_chars
    # the query follows the examples, without an answer; the answer is left to the assistant turn
    assert f"\n\nProtein: {PROT_A[:10]}... Molecule: CCO\n\n" in prompt.text
    assert prompt.text.count("Final answer: ") == 5 + 2  # five examples + the two options of the instruction
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.labels == ("Does not interact", "Interacts") and prompt.y == 0 and prompt.entities == []


def test_prompt_with_token_modalities_marks_one_block_per_entity(base):
    df = mol_prot_frame()
    prompt = ev.build_prompt("BIOSNAP", df.iloc[0], df.iloc[1:4], base.tokenizer,
                             ev.PromptOptions(frozenset({"molecule"})))
    assert [m for m, _ in prompt.entities] == ["molecule"] * 4
    assert [v for _, v in prompt.entities] == SMILES[1:4] + SMILES[:1]
    assert PROT_A in prompt.text and "CCO" not in prompt.text.split("Examples:")[1]


def test_cell_and_cyp_prompts(base):
    genes = [["G%d" % i for i in range(k, k + 20)] for k in range(4)]
    df = frame(SMILES[:4], y=[1, 0, 1, 0], genes=genes, molecule2=SMILES[4:8], cell_ids=list("abcd"))
    p = ev.build_prompt("DrugComb", df.iloc[0], df.iloc[1:3], base.tokenizer, ev.PromptOptions(top_k_genes=3))
    assert "Example 1: Cell: G1, G2, G3 Molecule: CCN Molecule2: CCOC(=O)C Final answer: Antagonistic" in p.text
    assert "Cell: G0, G1, G2 Molecule: CCO Molecule2: CCCCO\n" in p.text
    cyp = ev.build_prompt("CYP2D6-substrate", df.iloc[0], df.iloc[1:3], base.tokenizer)
    assert "Final answer: Not a substrate" in cyp.text and "Protein:" not in cyp.text


def test_prompt_labels_and_groups_come_from_the_one_benchmark_table(base):
    from esmerge.data import benchmarks

    df = frame(SMILES[:2], [PROT_A, PROT_B], [0, 1], genes=[["G1", "G2"], ["G3"]], molecule2=SMILES[2:4],
               cell_ids=["a", "b"])
    for name in ev.BENCHMARK_NAMES:
        spec = benchmarks.spec(name)
        prompt = ev.build_prompt(name, df.iloc[0], df.iloc[1:2], base.tokenizer)
        assert prompt.labels == spec.labels and spec.prompt.system in prompt.text
        assert name in ev.GROUPS[spec.group] and report.PAPER_DATASET[name] == spec.paper_dataset
    assert ev.default_config(scales.get("smoke")) == ev.EvalConfig(
        n_eval=3, n_context=12, n_shots=1, top_k_genes=3, protein_chars=12, smiles_chars=24, batch_size=3,
        n_resamples=100, decision="cross-fit", n_folds=3, n_calibration=32, scoring="loglik")
    assert ev.default_config(CPU) == ev.EvalConfig.for_scale(CPU) and ev.default_config(CPU).n_eval == 32
    assert ev.default_config(CPU).decision == "cross-fit"  # the cpu base answers by its prompt, thresholds cross-fitted
    with pytest.raises(TypeError, match="n_eval"):  # no scale's settings are hard-wired as defaults
        ev.EvalConfig()
    assert ev.default_benchmarks(scales.get("smoke")) == ("BindingDB", "GDSC2", "CYP2C9", "CYP2C9-substrate")
    assert ev.default_benchmarks(CPU) == ev.BENCHMARK_NAMES


# --------------------------------------------------------------------------- retrieval
def test_mol_prot_retrieval_prefers_exact_protein_then_tanimoto():
    pool = frame(["CCO", "CCCO", "c1ccccc1", "CCCCCCO", "CCCO"], [PROT_B, PROT_A, PROT_A, PROT_A, PROT_C], y=[0] * 5)
    query = frame(["CCCCO"], [PROT_A]).iloc[0]
    sims = ev.tanimoto("CCCCO", pool["molecule"].tolist())
    picked = ev.retrieve_examples(ev.ContextIndex(pool, "mol-prot"), query, k=5)
    exact = [3, 1, 2]  # PROT_A rows, by decreasing Tanimoto to the query
    assert sims[3] > sims[1] > sims[2]
    assert picked[:3] == exact
    # then the most similar protein (PROT_C differs from PROT_A in one residue) before PROT_B
    assert picked[3:] == [4, 0]


def test_retrieval_skips_the_query_instance_and_is_deterministic():
    pool = frame(["CCCCO", "CCCO", "CCO"], [PROT_A] * 3, y=[1, 0, 0])
    query = frame(["CCCCO"], [PROT_A]).iloc[0]
    index = ev.ContextIndex(pool, "mol-prot")
    assert ev.retrieve_examples(index, query, 3) == [1, 2]
    assert ev.retrieve_examples(index, query, 3) == ev.retrieve_examples(ev.ContextIndex(pool, "mol-prot"), query, 3)


def test_cyp_retrieval_is_tanimoto_only():
    pool = frame(SMILES, [PROT_A] * 10)
    index = ev.ContextIndex(pool, "cyp-inh")
    query = frame(["CCCCCO"], [PROT_A]).iloc[0]
    sims = ev.tanimoto("CCCCCO", SMILES)
    expected = sorted(range(10), key=lambda i: (-sims[i], i))[:4]
    assert ev.retrieve_examples(index, query, 4) == expected


def test_cell_retrieval_exact_gene_set_then_jaccard_then_tanimoto():
    g = lambda *ids: [f"G{i}" for i in ids]  # noqa: E731
    pool = frame(["CCO", "CCCCO", "CCO", "CCCCO"],
                 genes=[g(1, 2, 3, 9), g(1, 2, 3, 4), g(1, 2, 3, 4), g(7, 8)], cell_ids=list("wxyz"))
    query = frame(["CCCCO"], genes=[g(1, 2, 3, 4)], cell_ids=["q"]).iloc[0]
    # rows 1, 2 share the exact gene set (1 first: identical molecule); then row 0 (Jaccard 3/5); row 3 last
    assert ev.retrieve_examples(ev.ContextIndex(pool, "gdsc"), query, 4) == [1, 2, 0, 3]


# --------------------------------------------------------------------------- splicing and scoring
def _prompts(base, token_modalities, n=3, shots=2):
    df = mol_prot_frame()
    opts = ev.PromptOptions(frozenset(token_modalities), protein_chars=8)
    return [ev.build_prompt("Human", df.iloc[i], df.iloc[i + 1: i + 1 + shots + i], base.tokenizer, opts)
            for i in range(n)]


def test_projector_outputs_land_exactly_on_the_placeholders(base, projectors):
    prompts = _prompts(base, {"molecule", "protein"})
    batch = ev.collate(prompts, base.tokenizer)
    captured = {}

    def grab(module, args, kwargs):
        if kwargs.get("inputs_embeds") is not None:  # prompt passes (the answer pass feeds ids)
            captured.setdefault("parts", []).append(kwargs["inputs_embeds"].detach().clone())

    handle = base.model.model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            ev.label_logits(base.model, batch, projectors)
    finally:
        handle.remove()
    parts = captured["parts"]  # [shared prefix (one row)], then every row's own tokens
    assert batch.shared_len > 0 and len(parts) == 2 and parts[0].shape[:2] == (1, batch.shared_len)
    embeds = torch.cat([parts[0].expand(len(prompts), -1, -1), parts[1]], dim=1)
    plain = base.model.get_input_embeddings()(batch.input_ids)
    touched = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    for modality, (rows, starts) in batch.slots.items():
        with torch.no_grad():
            blocks = projectors[modality](batch.features[modality])
        for k, (r, s) in enumerate(zip(rows.tolist(), starts.tolist())):
            torch.testing.assert_close(embeds[r, s: s + 8], blocks[k])
            assert (batch.input_ids[r, s: s + 8] == base.tokenizer.pad_token_id).all()
            touched[r, s: s + 8] = True
    n_entities = sum(len(p.entities) for p in prompts)
    assert touched.sum() == 8 * n_entities
    torch.testing.assert_close(embeds[~touched], plain[~touched])
    # each block is preceded by its field title: "Protein: " / "Molecule: "
    rows, starts = batch.slots["molecule"]
    before = base.tokenizer.decode(batch.input_ids[rows[0], starts[0] - 10: starts[0]])
    assert before.endswith("Molecule: ")


def test_batched_scores_equal_one_by_one(base, projectors):
    for tokens in ({"molecule", "protein"}, set()):
        prompts = _prompts(base, tokens)
        batch = ev.collate(prompts, base.tokenizer)
        # the system prompt and instruction are shared, and run once for the batch
        assert batch.shared_len >= len(base.tokenizer("<|im_start|>system\nYou are an expert")["input_ids"])
        assert (batch.input_ids[:, :batch.shared_len] == batch.input_ids[0, :batch.shared_len]).all()
        with torch.no_grad():
            batched = ev.label_logits(base.model, batch, projectors)
            single = torch.cat([ev.label_logits(base.model, ev.collate([p], base.tokenizer), projectors)
                                for p in prompts])
        assert batched.shape == (3, 2)
        torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-5)


def test_scores_are_the_answer_log_likelihood(base):
    """Against a plain full-sequence forward pass of prompt + "Final answer: <label>"."""
    prompt = _prompts(base, set(), n=1)[0]
    with torch.no_grad():
        score = ev.label_logits(base.model, ev.collate([prompt], base.tokenizer))[0]
        for j, label in enumerate(prompt.labels):
            prefix = base.tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
            answer = base.tokenizer(f"Final answer: {label}", add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prefix + answer])
            logp = torch.log_softmax(base.model(ids).logits[0, :-1], -1)
            targets = ids[0, 1:]
            per_token = logp.gather(1, targets[:, None])[:, 0]
            shared = len(ev.answer_tokens(base.tokenizer, prompt.labels)[0])
            expected = per_token[len(prefix) - 1 + shared:].sum()
            torch.testing.assert_close(score[j], expected, atol=1e-3, rtol=1e-5)


def test_label_logits_has_gradients_wrt_lora(base, projectors):
    from peft import get_peft_model

    model = get_peft_model(copy.deepcopy(base.model), lora_config())
    torch.manual_seed(3)
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for p in lora.values():
            p.normal_(0, 0.05)
    batch = ev.collate(_prompts(base, {"molecule"}, n=2), base.tokenizer)
    logits = ev.label_logits(model, batch, projectors)
    entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    grads = torch.autograd.grad(entropy, list(lora.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # directional finite difference on one LoRA B matrix
    name = next(n for n in lora if "lora_B" in n and "layers.1.self_attn.v_proj" in n)
    g = dict(zip(lora, grads))[name]
    direction = torch.randn_like(g)
    eps = 1e-2

    def value(shift):
        with torch.no_grad():
            lora[name].add_(shift * direction)
            out = ev.label_logits(model, batch, projectors)
            lora[name].sub_(shift * direction)
        return -(out.softmax(-1) * out.log_softmax(-1)).sum(-1).mean()

    fd = (value(eps) - value(-eps)) / (2 * eps)
    assert fd.item() == pytest.approx((g * direction).sum().item(), rel=5e-2, abs=1e-5)


def test_model_under_test_loads_the_adapter_without_touching_the_base(base, projectors):
    from peft import get_peft_model

    peft_model = get_peft_model(copy.deepcopy(base.model), lora_config())
    zero = adapter_from_model(peft_model, "zero")  # LoRA B = 0: the base model exactly
    nonzero = copy.deepcopy(zero)
    torch.manual_seed(4)
    for k in nonzero.state:
        nonzero.state[k] = torch.randn_like(nonzero.state[k]) * 0.2
    batch = ev.collate(_prompts(base, {"molecule"}, n=2), base.tokenizer)
    plain = ev.ModelUnderTest.merged(base, zero, projectors, "zero")
    moved = ev.ModelUnderTest.merged(base, nonzero, projectors, "moved")
    with torch.no_grad():
        reference = ev.label_logits(base.model, batch, projectors)
        with plain.model_for("Human") as m:
            torch.testing.assert_close(ev.label_logits(m, batch, projectors), reference, atol=1e-4, rtol=1e-5)
        with moved.model_for("Human") as m:
            assert not torch.allclose(ev.label_logits(m, batch, projectors), reference, atol=1e-3)
        torch.testing.assert_close(ev.label_logits(base.model, batch, projectors), reference)
    assert plain.model_id("Human") != moved.model_id("Human")
    emr = ev.ModelUnderTest.emr(base, lambda b: zero if b == "Human" else nonzero, projectors)
    assert emr.model_id("Human") != emr.model_id("BIOSNAP")


# --------------------------------------------------------------------------- metrics
def test_accuracy_and_macro_f1_hand_computed():
    y = [1, 1, 1, 0, 0, 1]
    pred = [1, 0, 1, 0, 1, 1]
    # class 1: TP=3 FP=1 FN=1 -> F1 = 6/8; class 0: TP=1 FP=1 FN=1 -> F1 = 2/4
    assert ev.accuracy(y, pred) == pytest.approx(100 * 4 / 6)
    assert ev.macro_f1(y, pred) == pytest.approx(100 * (0.75 + 0.5) / 2)
    # class 0 never predicted: its F1 is 0; class 1: TP=4 FP=2 FN=0 -> 8/10
    y2, pred2 = [1, 1, 0, 1, 0, 1], [1] * 6
    assert ev.macro_f1(y2, pred2) == pytest.approx(100 * 0.8 / 2)
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(5):
        a, b = rng.integers(0, 2, 30), rng.integers(0, 2, 30)
        assert ev.macro_f1(a, b) == pytest.approx(100 * f1_score(a, b, average="macro", labels=[0, 1], zero_division=0))


def test_auroc_hand_computed():
    # positives {3, 1}, negatives {2, 0, 1}: pairs won 3>2, 3>0, 3>1, 1>0, tie 1=1 -> (4 + 0.5) / 6
    assert ev.auroc([1, 1, 0, 0, 0], [3, 1, 2, 0, 1]) == pytest.approx(100 * 4.5 / 6)
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(5)
    y, m = rng.integers(0, 2, 40), rng.normal(size=40).round(1)
    assert ev.auroc(y, m) == pytest.approx(100 * roc_auc_score(y, m))
    assert np.isnan(ev.auroc([1, 1], [0.2, 0.1]))


def test_bootstrap_ci_contains_point_and_is_seed_stable():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    pred = np.where(rng.random(80) < 0.7, y, 1 - y)
    for metric in ("accuracy", "macro_f1"):
        lo, hi = ev.bootstrap_ci(y, pred, metric, 500, seed=7)
        point = ev.METRICS[metric](y, pred)
        assert lo <= point <= hi and hi - lo > 5
        assert ev.bootstrap_ci(y, pred, metric, 500, seed=7) == (lo, hi)
        assert ev.bootstrap_ci(y, pred, metric, 500, seed=8) != (lo, hi)
    assert ev.bootstrap_ci(y, y, "accuracy", 200) == (100.0, 100.0)


def _fake_run(y, pred, bench="Human", ids=None):
    y, pred = np.asarray(y), np.asarray(pred)
    return {"method": "m", "benchmark": bench, "n": len(y), "seed": 0,
            "accuracy": float(ev.accuracy(y, pred)), "accuracy_ci": ev.bootstrap_ci(y, pred, "accuracy", 200),
            "macro_f1": float(ev.macro_f1(y, pred)), "macro_f1_ci": ev.bootstrap_ci(y, pred, "macro_f1", 200),
            "example_ids": ids or [str(i) for i in range(len(y))], "y": y.tolist(), "pred": pred.tolist()}


def test_paired_bootstrap_difference():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    good = {"Human": _fake_run(y, y), "BIOSNAP": _fake_run(y, y)}
    bad = {"Human": _fake_run(y, 1 - y), "BIOSNAP": _fake_run(y, y)}
    point, lo, hi = ev.paired_bootstrap(good, bad)
    assert point == pytest.approx(50.0) and lo == hi == pytest.approx(50.0)
    half = {"Human": _fake_run(y, np.where(np.arange(60) % 2 == 0, y, 1 - y)), "BIOSNAP": _fake_run(y, y)}
    mean, lo, hi = ev.paired_bootstrap(half, None)
    assert mean == pytest.approx(75.0) and lo < mean < hi
    shifted = {b: {**r, "example_ids": ["x"] * 60} for b, r in bad.items()}
    with pytest.raises(ValueError, match="different examples"):
        ev.paired_bootstrap(good, shifted)


# --------------------------------------------------------------------------- evaluate, cache, tables
def _pools():
    df = mol_prot_frame()
    return df.iloc[:4], df.iloc[4:]


def test_evaluate_caches_and_resumes(base, projectors, tmp_path, monkeypatch):
    mut = ev.ModelUnderTest.merged(base, None, projectors, "merged")
    config = ev.EvalConfig.for_scale(CPU, n_eval=4, n_context=6, n_shots=2, batch_size=3, n_resamples=100)
    first = ev.evaluate(mut, "Human", config, pools=_pools(), out_dir=tmp_path, progress=False)
    assert first["n"] == 4 and len(first["pred"]) == 4 and first["y"] == [0, 1, 1, 0]
    assert first["accuracy"] == pytest.approx(ev.accuracy(first["y"], first["pred"]))
    assert first["accuracy_ci"][0] <= first["accuracy"] <= first["accuracy_ci"][1]
    assert list(tmp_path.glob("merged/Human-*.json"))

    def boom(*args, **kwargs):
        raise AssertionError("a cached evaluation must not run the model")

    monkeypatch.setattr(sweep, "label_logits", boom)
    again = ev.evaluate(mut, "Human", config, pools=_pools(), out_dir=tmp_path, progress=False)
    assert again == first
    # a different setting is a different cache entry and does run
    with pytest.raises(AssertionError, match="must not run"):
        ev.evaluate(mut, "Human", ev.EvalConfig.for_scale(CPU, n_eval=4, n_context=6, n_shots=1), pools=_pools(),
                    out_dir=tmp_path, progress=False)


@needs_reference
def test_results_table_and_claims_against_the_paper():
    rng = np.random.default_rng(3)
    results = {}
    ys = {b: rng.integers(0, 2, 40) for b in ev.BENCHMARK_NAMES}
    for method, flip in (("es", 0.0), ("avg", 0.5), ("ties", 0.5), ("base", 0.5)):
        results[method] = {}
        for b, y in ys.items():
            wrong = rng.random(40) < flip
            results[method][b] = _fake_run(y, np.where(wrong, 1 - y, y), b)
    table = report.results_table(results, "Table 1", n_resamples=200)
    es = table[(table.method == "es") & (table.metric == "accuracy")].set_index("dataset")
    assert es.loc["Avg. Mol-Prot", "ours"] == pytest.approx(
        np.mean([results["es"][b]["accuracy"] for b in ev.GROUPS["Mol-Prot"]]))
    assert es.loc["BindingDB", "paper"] == pytest.approx(66.0)
    assert es.loc["Avg. Mol-Prot", "paper"] == pytest.approx(65.7)
    t3 = report.results_table(results, "Table 3", n_resamples=100)
    assert set(t3["dataset"]) == {"Avg. Mol-Prot", "Avg. Mol-Cell", "Avg. CYP Inh.", "Avg. CYP Sub."}
    register = report.claims(results, n_resamples=200).set_index("claim")
    row = register.loc["ES-Merging beats every merging baseline on Mol-Prot (avg. accuracy)"]
    assert row["verdict"] == "supported (partial)" and row["n_compared"] == 2
    assert row["paper"] == pytest.approx(65.7 - 64.2)
    assert register.loc["ES-Merging beats the base LLM on all 13 benchmarks (avg.)", "verdict"] == "supported"
    assert register.loc["Layer x element >= each alone on Mol-Prot", "verdict"] == "not measured"
    # a ">=" claim whose models answer identically everywhere is not evidence for it
    same = {**results, "es-layer": results["es"], "es-element": results["es"]}
    row = report.claims(same, n_resamples=100).set_index("claim").loc["Layer x element >= each alone on Mol-Prot"]
    assert (row["ours"], row["lo"], row["hi"]) == (0.0, 0.0, 0.0)
    assert row["verdict"] == "inconclusive (identical answers)" and "identical answers" in row["detail"]
    reversed_results = {"es": results["base"], "base": results["es"]}
    rev = report.claims(reversed_results, n_resamples=200).set_index("claim")
    assert rev.loc["ES-Merging beats the base LLM on all 13 benchmarks (avg.)", "verdict"] == "not supported"


def test_missing_reference_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ESMERGE_REFERENCE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="paper_results.csv"):
        report.paper_results()


@needs_reference
def test_partial_groups_are_labelled_and_have_no_paper_value():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 30)
    results = {"es": {"BindingDB": _fake_run(y, y, "BindingDB"), "BIOSNAP": _fake_run(y, 1 - y, "BIOSNAP")}}
    table = report.results_table(results, "Table 1", n_resamples=100)
    avg = table[(table.metric == "accuracy") & table.dataset.str.startswith("Avg.")]
    assert avg["dataset"].tolist() == ["Avg. Mol-Prot (2/3 datasets)"]
    assert avg["ours"].iloc[0] == pytest.approx(50.0) and avg["paper"].isna().all()
    register = report.claims({**results, "base": results["es"]}, n_resamples=100).set_index("claim")
    row = register.loc["ES-Merging beats the base LLM on all 13 benchmarks (avg.)"]
    assert row["datasets"] == "2/13" and row["verdict"] == "inconclusive (identical answers) (partial)"


def test_mechanism_claims_on_hand_made_tables():
    shift = pd.DataFrame({"molecule": [3.0, 1.0], "protein": [2.0, 1.5]}, index=["molecule", "protein"])
    # protein specialist moves molecule tokens (1.0) less than protein tokens (1.5): holds for both
    shift.loc["protein", "molecule"] = 2.0  # now it moves molecule tokens most: fails for protein
    gap = pd.DataFrame({"specialist": ["molecule", "protein"], "blocks_above": [3, 2],
                        "blocks": [4, 4], "mean_ratio": [1.2, 1.5]})
    stability = pd.DataFrame({"projections": [256, 32, 1024], "mean std of alpha over seeds": [0.04, 0.1, 0.01]})
    distances = pd.DataFrame({"molecule": [1.0, 3.0], "protein": [2.0, 2.5]}, index=["molecule", "protein"])
    table = report.mechanism_claims(shift, gap, stability, distances).set_index(["source", "claim"])["verdict"]
    by_source = table.groupby(level=0).apply(list).to_dict()
    assert by_source["Fig. 1"] == ["holds", "does not hold"]
    assert by_source["Fig. 2"] == ["holds", "does not hold"]  # 2 of 4 blocks is not "most"
    assert by_source["Table 7"] == ["holds"]  # sorted by projections: 0.1 > 0.04 > 0.01
    assert by_source["Fig. 8"] == ["holds", "holds"]
    stability.loc[2, "mean std of alpha over seeds"] = 0.05
    assert (report.mechanism_claims(shift, gap, stability, distances).set_index("source").loc["Table 7", "verdict"]
            == "does not hold")


# --------------------------------------------------------------------------- bad pools
def _no_model_work(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("bad rows must be refused before any model work")

    monkeypatch.setattr(sweep, "label_logits", boom)


@pytest.mark.parametrize("spoil, message", [
    (lambda e, c: (e.assign(y=[0, 2, 1, 0]), c), r"Human eval pool, row 1: label 2 is not 0 or 1"),
    (lambda e, c: (e.assign(y=[0, np.nan, 1, 0]), c), r"Human eval pool, row 1: label is NaN"),
    (lambda e, c: (pd.concat([e, e.iloc[:1]]), c), r"Human eval pool, row 0: appears twice"),
    (lambda e, c: (e, c.assign(y=["1"] * len(c))), r"Human context pool, row 4: label '1' is not 0 or 1"),
    (lambda e, c: (e.assign(molecule=["CCO", "C1CC", "CCN", "CCC"]), c),
     r"row 1: molecule 'C1CC' is not a valid SMILES"),
])
def test_evaluate_refuses_bad_pools_before_scoring(base, tmp_path, monkeypatch, spoil, message):
    """Before: label 2 was scored as a wrong answer, a repeated row counted twice, and a NaN label
    crashed only after every prompt had been scored."""
    from esmerge.errors import InputError

    _no_model_work(monkeypatch)
    mut = ev.ModelUnderTest.base_only(base)
    config = ev.EvalConfig.for_scale(CPU, n_eval=4, n_context=6, n_shots=2, batch_size=3, n_resamples=100)
    with pytest.raises(InputError, match=message):
        ev.evaluate(mut, "Human", config, pools=spoil(*_pools()), out_dir=tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.json"))


def test_evaluate_refuses_an_unknown_cell_line_before_scoring(base, tmp_path, monkeypatch):
    from esmerge.errors import InputError

    _no_model_work(monkeypatch)
    genes = [["G1", "G2"], None, ["G3"], ["G1"], ["G4", "G5"], ["G2", "G6"]]
    df = frame(SMILES[:6], y=[0, 1, 0, 1, 0, 1], genes=genes, cell_ids=list("abcdef"))
    config = ev.EvalConfig.for_scale(CPU, n_eval=2, n_context=4, n_shots=1, n_resamples=100)
    with pytest.raises(InputError,
                       match=r"GDSC2 eval pool, row 1: cell line 'b' has no gene list \(unknown cell line\)"):
        ev.evaluate(ev.ModelUnderTest.base_only(base), "GDSC2", config, pools=(df.iloc[:2], df.iloc[2:]),
                    out_dir=tmp_path, progress=False)
    with pytest.raises(InputError, match=r"no column cell_genes"):
        ev.evaluate(ev.ModelUnderTest.base_only(base), "GDSC2", config,
                    pools=(df.iloc[:2].drop(columns="cell_genes"), df.iloc[2:]), out_dir=tmp_path, progress=False)


def test_caches_live_on_objects_not_in_the_module(base, projectors, monkeypatch):
    """Features, shots and the PEFT copy are kept by the caller's EvalSession; nothing is module-global."""
    from esmerge.evaluate import scoring

    calls = []
    real = scoring.FEATURISERS["molecule"]
    monkeypatch.setitem(scoring.FEATURISERS, "molecule", (lambda v: calls.append(list(v)) or real[0](v), real[1]))
    prompts = _prompts(base, {"molecule"})
    features = ev.FeatureCache()
    first = ev.collate(prompts, base.tokenizer, features=features)
    second = ev.collate(prompts, base.tokenizer, features=features)
    assert len(calls) == 1 and len(calls[0]) == len(set(calls[0]))  # each distinct molecule featurised once
    torch.testing.assert_close(first.features["molecule"], second.features["molecule"])
    ev.collate(prompts, base.tokenizer, features=ev.FeatureCache())  # a fresh cache computes again
    assert len(calls) == 2
    pool = mol_prot_frame()
    retrieval = ev.RetrievalCache()
    shots = retrieval.shots("mol-prot", "Human", pool.iloc[:3], pool.iloc[3:], 2)
    assert retrieval.shots("mol-prot", "Human", pool.iloc[:3], pool.iloc[3:], 2) is shots
    index = ev.ContextIndex(pool.iloc[3:], "mol-prot")
    assert shots[1] == [ev.retrieve_examples(index, row, 2) for _, row in pool.iloc[:3].iterrows()]
    for module in ("retrieval", "scoring", "models", "sweep"):
        mod = __import__(f"esmerge.evaluate.{module}", fromlist=["x"])
        private_dicts = [k for k, v in vars(mod).items() if isinstance(v, dict) and k.startswith("_") and k[1] != "_"]
        assert private_dicts in ([], ["_FIELD_TITLE"]), module
