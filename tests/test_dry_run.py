"""`esmerge merge|evaluate --scale paper --dry-run` on the tiny paper stand-ins (``standins``).

The dry run must build its plan without a weight in memory (the base on the ``meta`` device, the
loaders replaced by ones that fail), and turn each fault into one named problem.
"""
from __future__ import annotations

import json
import shutil

import pytest
import standins
import torch

from esmerge.run import dry_run
from esmerge.run.dry_run_plan import (
    activation_bytes,
    forward_flops,
    gpu_hours,
    gradient_flops,
    kv_cache_bytes,
    memory_bytes,
)
from esmerge.specialists import encoders

STANDIN_PARAMS = 35296  # vocabulary 261, hidden 32, MLP 64, 2 layers, 4 heads, 2 KV heads, untied head (by hand)


def _missing_data() -> str:
    from esmerge.data import files
    from esmerge.data.benchmarks import spec

    try:
        for path in spec("CYP2C9-substrate").files:
            files.data_path(path)
    except files.DataError as err:
        return str(err)
    return ""


@pytest.fixture(scope="module")
def paper(tmp_path_factory, private_cache):
    """(base folder with 128 positions, the same base with 8192 positions, specialists root)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("paper")
    standins.paper_tree(root)
    shutil.copytree(root / "llama", root / "llama8k")  # same weights (hash), longer context
    config = json.loads((root / "llama8k" / "config.json").read_text())
    (root / "llama8k" / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 8192}))
    yield root / "llama", root / "llama8k", root / "specialists"


@pytest.fixture()
def no_loading(monkeypatch):
    """Every function that reads weights into memory fails if called."""
    import transformers

    from esmerge.specialists import adapters, base_llm, load, per_scale

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run loaded weights")

    monkeypatch.setattr(base_llm, "load_paper", refuse)
    monkeypatch.setattr(base_llm, "load_base", refuse)
    monkeypatch.setattr(load, "load_specialist", refuse)
    monkeypatch.setattr(per_scale, "load_specialist", refuse)
    monkeypatch.setattr(adapters, "read_tensors", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _all_meta(plan) -> bool:
    return all(t.is_meta for t in [*plan.meta_model.parameters(), *plan.meta_model.buffers()])


def test_merge_plan_checks_everything_without_a_weight(paper, no_loading):
    plan = dry_run.merge_plan("avg", base_path=str(paper[1]), specialists_dir=paper[2])
    assert plan.problems == [] and _all_meta(plan)
    assert plan.params == STANDIN_PARAMS and plan.max_positions == 8192
    text = "\n".join(plan.lines())
    for what in ("base weights sha256", "tokenizer: chat template writes", "protein encoder: Prot2Text-V2",
                 "cell specialist", "LoRA r=8 shapes", "no blocking problem found"):
        assert what in text, what
    # Mol-LLaMA's encoder is not needed by a parameter-space merge: a note, not a problem.
    assert any("Mol-LLaMA's encoder cannot be built" in note for note in plan.notes)


def test_es_plan_blocks_on_the_mol_llama_encoder_in_one_line(paper, no_loading, monkeypatch):
    plan = dry_run.merge_plan("es", base_path=str(paper[1]), specialists_dir=paper[2], probe_k=10)
    # the stand-in's encoder tensors are not in Mol-LLaMA's layout: the real encoder cannot be built from them
    assert len(plan.problems) == 1 and "Mol-LLaMA's encoder cannot be built" in plan.problems[0]
    assert "esmerge convert mol-llama" in plan.problems[0]
    assert "\n" not in plan.problems[0] and _all_meta(plan)
    assert dry_run.print_plan(plan) == 1
    # The estimates, by hand: 4 models forward over 10 probes; 3 specialists x (1 forward + 3 backward).
    length = plan.prompt_tokens["probe"]
    assert length > encoders.ESM_MAX_RESIDUES + 2 + 8 + 24
    states, scores = plan.steps[1], plan.steps[2]
    assert states.flops == 2 * STANDIN_PARAMS * 4 * 10 * length
    assert scores.flops == 3 * 2 * STANDIN_PARAMS * 10 * length * (1 + 2 * 3)
    # With a registered Mol-LLaMA encoder the plan has no problem; on the 128-position base, the probe is too long.
    monkeypatch.setitem(encoders.ENCODER_BUILDERS, "mol-llama", standins.mol_llama_standin_builder)
    assert dry_run.merge_plan("es", base_path=str(paper[1]), specialists_dir=paper[2]).problems == []
    short = dry_run.merge_plan("es", base_path=str(paper[0]), specialists_dir=paper[2])
    assert short.problems == [f"probe: {length} tokens exceed the base's 128 positions"]


@pytest.mark.skipif(bool(_missing_data()), reason=_missing_data())
def test_evaluate_plan_tokenises_prompts_and_checks_positions(paper, no_loading, capsys):
    models = ["base", "specialist-protein", "specialist-cell"]
    plan = dry_run.evaluate_plan(models, ["CYP2C9-substrate"], n_eval=8, base_path=str(paper[1]),
                                 specialists_dir=paper[2])
    assert plan.problems == [] and _all_meta(plan)
    longest = plan.prompt_tokens["CYP2C9-substrate"]
    base, protein, cell = plan.steps
    assert protein.tokens > base.tokens == cell.tokens  # the protein as ESM-2 tokens (one per residue + 2)
    assert base.flops == forward_flops(STANDIN_PARAMS, base.tokens)
    assert dry_run.print_plan(plan) == 0 and "CYP2C9-substrate" in capsys.readouterr().out
    short = dry_run.evaluate_plan(models, ["CYP2C9-substrate"], n_eval=8, base_path=str(paper[0]),
                                  specialists_dir=paper[2])
    assert short.problems == [f"CYP2C9-substrate: prompts of up to {longest} tokens (+256 generated) exceed the "
                              "base's 128 positions"]
    # specialist-molecule reads molecules through Mol-LLaMA's encoder, which the stand-in's tensors cannot build.
    mol = dry_run.evaluate_plan(["specialist-molecule"], ["CYP2C9-substrate"], n_eval=8, base_path=str(paper[1]),
                                specialists_dir=paper[2])
    assert len(mol.problems) == 1 and "Mol-LLaMA's encoder cannot be built" in mol.problems[0]


def test_a_missing_specialist_file_is_one_named_problem(paper, no_loading, tmp_path):
    shutil.copytree(paper[2], tmp_path / "specs", ignore=shutil.ignore_patterns("src"))
    (tmp_path / "specs" / "protein" / "adapter_model.safetensors").unlink()
    plan = dry_run.merge_plan("avg", base_path=str(paper[1]), specialists_dir=tmp_path / "specs")
    assert len(plan.problems) == 1
    assert plan.problems[0].startswith("protein specialist:") and "lacks adapter_model.safetensors" in plan.problems[0]
    assert "esmerge convert prot2text" in plan.problems[0]
    shutil.rmtree(tmp_path / "specs" / "cell")
    assert [p.split(":")[0] for p in dry_run.merge_plan("avg", base_path=str(paper[1]),
                                                        specialists_dir=tmp_path / "specs").problems] == \
        ["protein specialist", "cell specialist"]


def test_a_lora_of_the_wrong_shape_is_one_named_problem(paper, no_loading, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(paper[2], tmp_path / "specs", ignore=shutil.ignore_patterns("src"))
    file = tmp_path / "specs" / "cell" / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
    assert tensors[key].shape == (16, 8)
    tensors[key] = torch.zeros(32, 8)  # k_proj's output is 2 KV heads x 8 = 16 wide, not 32
    save_file(tensors, file)
    plan = dry_run.merge_plan("avg", base_path=str(paper[1]), specialists_dir=tmp_path / "specs")
    assert plan.problems == [f"cell specialist: 1 LoRA tensor(s) do not fit the base, e.g. {key}: [32, 8], the "
                             "base's model.layers.1.self_attn.k_proj needs [16, 8]"]


def test_a_missing_special_token_is_one_named_problem(paper, no_loading, tmp_path):
    shutil.copytree(paper[1], tmp_path / "llama")
    from esmerge.specialists.base_llm import byte_tokenizer

    # LLaMA-3's chat template, but a tokenizer without <|start_header_id|>
    tok = byte_tokenizer(specials=("<unk>", "<|begin_of_text|>", "<|end_header_id|>", "<|eot_id|>"),
                         eos="<|eot_id|>", chat_template=standins.LLAMA3_TEMPLATE)
    tok.save_pretrained(tmp_path / "llama")
    plan = dry_run.merge_plan("avg", base_path=str(tmp_path / "llama"), specialists_dir=paper[2])
    assert len(plan.problems) == 1 and "lacks the special token <|start_header_id|>" in plan.problems[0]


def test_missing_base_is_one_problem_and_builds_nothing(tmp_path, no_loading, paper):
    plan = dry_run.merge_plan("avg", base_path=str(tmp_path / "nowhere"), specialists_dir=paper[2])
    assert plan.meta_model is None and plan.steps == []
    assert plan.problems[0].startswith(f"base {str(tmp_path / 'nowhere')!r}: not a local folder")


def test_estimates_match_hand_computed_values_on_a_tiny_config():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # embeddings 10x8, per layer q 8x8, k and v 4x8, o 8x8, gate/up/down 16x8, 2 norms of 8; final norm; head 10x8
    params = 80 + 2 * (64 + 32 + 32 + 64 + 3 * 128 + 16) + 8 + 80
    assert params == 1352 == sum(p.numel() for p in model.parameters())
    assert forward_flops(params, 100) == 270_400
    assert gradient_flops(params, 100) == 811_200 == 3 * forward_flops(params, 100)
    assert gradient_flops(params, 100, backward_passes=3) == 7 * 270_400
    assert kv_cache_bytes(2, 1, 4, 100) == 2 * 2 * 1 * 4 * 100 * 2 == 3_200
    assert activation_bytes(2, 8, 100) == 34 * 2 * 8 * 100 == 54_400
    assert memory_bytes(params, 2, 3_200, overhead=0.1) == pytest.approx((2_704 + 3_200) * 1.1)
    assert gpu_hours(270_400 * 1e9, utilization=0.4, peak_flops=989e12) == pytest.approx(270.4e12 / 395.6e12 / 3600)


def test_cli_dry_run_prints_the_plan_and_exits_1_on_a_blocking_problem(paper, no_loading, tmp_path, monkeypatch,
                                                                         capsys):
    """`esmerge merge --scale paper --dry-run`: the plan on stdout, exit 1 for the missing molecule encoder
    (ES reads molecules), exit 0 for a method that needs no encoder; the flag is refused off the paper scale."""
    from esmerge.cli import main

    base, _, specialists = paper
    monkeypatch.setenv("ESMERGE_PAPER_BASE", str(base))
    monkeypatch.setenv("ESMERGE_PAPER_SPECIALISTS", str(specialists))
    assert main(["merge", "--scale", "paper", "--method", "es", "--out", str(tmp_path / "es"), "--dry-run"]) == 1
    out = capsys.readouterr().out
    assert out.startswith("dry run:") and "PROBLEM: molecule specialist" in out
    assert main(["merge", "--scale", "paper", "--method", "avg", "--out", str(tmp_path / "avg"), "--dry-run"]) == 0
    assert not (tmp_path / "es").exists() and not (tmp_path / "avg").exists()
    assert main(["merge", "--scale", "smoke", "--method", "avg", "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    assert "--dry-run checks a paper-scale merge" in capsys.readouterr().err


def test_data_driven_baseline_estimates_match_a_hand_computation():
    """AdaMerging: steps x batch x (forward + backward) = 6 x params x tokens; Avg+FT: rows x epochs x the same,
    one run per benchmark; both from the paper scale's declared budgets (500 steps of 2 prompts; 2000 rows,
    10 epochs, batches of 16)."""
    from esmerge import scales
    from esmerge.run.dry_run_plan import adamerging_cost, finetune_cost, trained_rows

    budgets = scales.get("paper").merge_budgets
    ada = adamerging_cost(1_000, budgets.adamerging_steps, budgets.adamerging_batch, tokens=3_000.0, longest=4_000,
                          layers=2, hidden=8, encoder_params=10, encoder_tokens=500.0)
    assert ada.flops == 500 * 2 * (6 * 1_000 * 3_000 + 2 * 10 * 500) == 18_010_000_000
    assert ada.memory == pytest.approx((2 * 1_000 + 34 * 2 * 8 * 2 * 4_000) * 1.1)  # bf16 weights + activations
    assert trained_rows(2000, 10, 16) == 20_000 and trained_rows(512, 10, 16) == 5_120
    assert trained_rows(20, 2, 16, max_steps=3) == 20 + 16  # 2 batches per epoch (16 + 4): a full epoch + 1 batch
    ft = finetune_cost(1_000, {"A": (budgets.ft_examples, 100.0), "B": (512, 200.0)}, budgets.ft_epochs,
                       budgets.ft_batch, longest=300, layers=2, hidden=8)
    assert ft.tokens == 20_000 * 100 + 5_120 * 200 == 3_024_000 and ft.flops == 6 * 1_000 * 3_024_000


@pytest.mark.skipif(bool(_missing_data()), reason=_missing_data())
def test_data_driven_baselines_are_costed_from_measured_prompts(paper, no_loading):
    """On the stand-in: the prompts the merged model reads (molecules and proteins as blocks), measured as the
    evaluation dry run measures them, times the declared budgets; CYP2C9-substrate (666 rows, 64 of them to
    evaluate) trains on the 602 rows outside its evaluation pool, fewer than the declared 2000, and says so."""
    from esmerge import scales
    from esmerge.evaluate.sweep import EvalConfig
    from esmerge.run.dry_run import data_method_steps
    from esmerge.scales import MergeBudgets
    from esmerge.specialists.base_llm import load_tokenizer

    plan = dry_run.merge_plan("avg", base_path=str(paper[1]), specialists_dir=paper[2])
    tokenizer, budgets = load_tokenizer(str(paper[1])), MergeBudgets(benchmarks=("CYP2C9-substrate",))
    merged = frozenset({"molecule", "protein"})
    rows = dry_run.prompt_lengths("CYP2C9-substrate", tokenizer, EvalConfig.for_scale(scales.get("paper")),
                                  [merged])[merged]
    mean = sum(n for n, _ in rows) / len(rows)
    (ada,) = data_method_steps("adamerging", {}, plan, plan.meta_model, tokenizer, 0, 0, budgets)
    assert ada.flops == pytest.approx(500 * 6 * STANDIN_PARAMS * 2 * mean)
    (capped,) = data_method_steps("adamerging", {"steps": 7}, plan, plan.meta_model, tokenizer, 0, 0, budgets)
    assert capped.flops == pytest.approx(ada.flops * 7 / 500)  # --set steps=7 overrides the budget
    (ft,) = data_method_steps("avg-ft", {}, plan, plan.meta_model, tokenizer, 0, 0, budgets)
    assert ft.tokens == int(602 * 10 * mean) and ft.flops == pytest.approx(6 * STANDIN_PARAMS * 602 * 10 * mean)
    assert any(note.startswith("avg-ft: 1 benchmark(s) train on fewer than the declared 2000 rows")
               and "CYP2C9-substrate 602" in note for note in plan.notes)


@pytest.mark.skipif(bool(_missing_data()), reason=_missing_data())
def test_training_rows_never_hold_an_evaluation_row():
    """Avg+FT's rows: the in-context pool when it is large enough, else every row outside the evaluation pool."""
    from esmerge import scales
    from esmerge.evaluate.sweep import EvalConfig
    from esmerge.run.baseline_inputs import benchmark_pools, training_rows

    config = EvalConfig.for_scale(scales.get("paper"))
    eval_df, context_df = benchmark_pools("CYP2C9-substrate", config)
    rows = training_rows("CYP2C9-substrate", config)
    assert len(rows) == 666 - len(eval_df) > len(context_df)
    assert not set(rows.index) & set(eval_df.index) and set(context_df.index) <= set(rows.index)


def test_mol_llama_encoder_check_reads_headers_and_the_hub_cache(monkeypatch, tmp_path):
    """Trained tensors present and graph encoders in the hub cache: checked; a file absent: one line with the
    command that fetches it; nothing is built or downloaded."""
    from esmerge.run import dry_run_checks
    from esmerge.run.dry_run_plan import Plan
    from esmerge.specialists.mol_llama.encoder import TRAINED_KEYS

    heads = {"projector.safetensors": {k: ((1,), "F32") for k in TRAINED_KEYS}, "encoder.safetensors": {}}
    entry = {"kind": "mol-llama", "graph_encoder_files": {
        "unimol": {"repo_id": "dptech/Uni-Mol-Models", "filename": "mol_pre_no_h_220816.pt"},
        "moleculestm": {"repo_id": "chao1224/MoleculeSTM", "filename": "molecule_model.pth"}}}
    cached = {"mol_pre_no_h_220816.pt", "molecule_model.pth"}
    monkeypatch.setattr(dry_run_checks, "_in_hub_cache", lambda repo, name: name in cached)
    plan = Plan("merge", "base")
    dry_run_checks._check_mol_llama_encoder("molecule", tmp_path, entry, heads, plan, needed=True)
    assert plan.problems == [] and any("graph encoders in the hub cache" in c for c in plan.checked)
    cached.discard("molecule_model.pth")
    plan = Plan("merge", "base")
    dry_run_checks._check_mol_llama_encoder("molecule", tmp_path, entry, heads, plan, needed=True)
    assert len(plan.problems) == 1 and "huggingface-cli download chao1224/MoleculeSTM molecule_model.pth" in \
        plan.problems[0]
    in_folder = heads | {"encoder.safetensors": {"encoder.graph_encoder.unimol.w": ((1,), "F32")}}
    plan = Plan("merge", "base")
    dry_run_checks._check_mol_llama_encoder("molecule", tmp_path, entry, in_folder, plan, needed=False)
    assert plan.problems == plan.notes == [] and "in encoder.safetensors" in plan.checked[0]
    del heads["projector.safetensors"][TRAINED_KEYS[0]]
    plan = Plan("merge", "base")
    dry_run_checks._check_mol_llama_encoder("molecule", tmp_path, entry, in_folder | {
        "projector.safetensors": heads["projector.safetensors"]}, plan, needed=False)
    assert plan.problems == [] and TRAINED_KEYS[0] in plan.notes[0] and "not needed by this run" in plan.notes[0]

