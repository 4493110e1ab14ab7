"""Tiny stand-ins of the paper's published checkpoints, built in code in their real on-disk layouts.

Nothing here downloads anything: each builder makes a random tiny LLaMA (2 layers, hidden 32,
vocabulary 100) or derives a checkpoint from one, and writes it the way the upstream project does:

* ``save_base``: a Hugging Face ``LlamaForCausalLM`` directory (``config.json`` + ``model.safetensors``),
  standing in for LLaMA-3.1-8B-Instruct.
* ``mol_llama_checkpoint``: a ``MolLLaMA`` state dict (``llm.base_model.model...lora_A.default.weight``,
  a vocabulary resized by two rows for ``[PAD]`` and ``<mol>``, ``encoder.*`` and ``llm_proj.*``),
  either as a Hugging Face directory with safetensors shards and an index, or as the training
  run's Lightning ``.ckpt`` (trainable tensors only, under ``state_dict``, prefixed ``mol_llama.``).
* ``prot2text_checkpoint``: an ``Esm2LlamaInstructForCausalLM`` directory: a decoder with a LoRA
  merged into its projections (``llama_decoder.*``), a tiny ESM encoder (``esm_encoder.*``) and the
  2-layer adapter (``adapter.fc1/fc2``), with the nested ``config.json``.
* ``full_finetune_checkpoint``: a LLaMA directory whose every tensor moved (full-rank deltas).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from esmerge.specialists.base_llm import LORA_ALPHA, LORA_TARGET_MODULES

VOCAB = 100
ADDED_TOKENS = 2  # Mol-LLaMA adds [PAD] and <mol>


def tiny_config(vocab_size: int = VOCAB, hidden_size: int = 32, num_layers: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=128, tie_word_embeddings=False)


def save_base(out: Path, seed: int = 0, **config) -> torch.nn.Module:
    """A random tiny LLaMA saved as a Hugging Face directory; returns the model (float32, eval)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config)).eval()
    model.save_pretrained(out, safe_serialization=True)
    return model


def _save_shards(out: Path, state: dict[str, torch.Tensor], config: dict, shards: int) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].detach().clone().contiguous() for k in keys[i::shards]}
        save_file(part, out / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in state.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _lora_model(base_model, rank: int, seed: int, resize_to: int | None):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base_model)
    if resize_to:
        torch.manual_seed(seed)
        model.resize_token_embeddings(resize_to, mean_resizing=False)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                            target_modules=list(LORA_TARGET_MODULES)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if "lora_" in name:  # both factors non-zero, so the LoRA changes the logits
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return peft.eval()


def _encoder_standins(seed: int, hidden: int, with_graph_encoder: bool) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed + 1000)
    shapes = {
        "encoder.query_tokens": (1, 8, 16),
        "encoder.Qformer.bert.encoder.layer.0.attention.self.query.weight": (16, 16),
        "encoder.Qformer.bert.encoder.layer.0.crossattention.self.key.weight": (16, 24),
        "encoder.blending_module.layers.0.self_attn.in_proj_weight": (72, 24),
        "llm_proj.weight": (hidden, 16),
        "llm_proj.bias": (hidden,),
    }
    if with_graph_encoder:
        shapes["encoder.graph_encoder.unimol.embed_tokens.weight"] = (31, 24)
        shapes["encoder.graph_encoder.moleculestm.x_embedding1.weight"] = (120, 24)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def mol_llama_checkpoint(out: Path, base_model, base_name: str, *, layout: str = "hf", rank: int = 8,
                         seed: int = 1, shards: int = 2):
    """A MolLLaMA checkpoint at ``out`` (a directory for ``layout="hf"``, a ``.ckpt`` file for
    ``"lightning"``); returns the source LLM (PEFT model, resized vocabulary) for reference logits."""
    peft = _lora_model(base_model, rank, seed, base_model.config.vocab_size + ADDED_TOKENS)
    llm = {f"llm.{k}": v for k, v in peft.state_dict().items()}
    encoder = _encoder_standins(seed, base_model.config.hidden_size, with_graph_encoder=layout == "hf")
    if layout == "hf":
        config = {"model_type": "mol_llama", "architectures": ["MolLLaMA"],
                  "llm_config": {"llm_model": base_name, "lora_config": {"r": rank, "lora_alpha": LORA_ALPHA,
                                                                          "lora_dropout": 0.1}},
                  "qformer_config": {"bert_name": "allenai/scibert_scivocab_uncased", "num_query_tokens": 8,
                                     "cross_attention_freq": 2, "embed_dim": 256},
                  "blending_module_config": {"num_layers": 4, "num_heads": 8},
                  "graph_encoder_config": {"encoder_types": ["unimol", "moleculestm"]}}
        _save_shards(out, llm | encoder, config, shards)
    elif layout == "lightning":
        trainable = {k: v for k, v in llm.items() if "lora_" in k} | encoder
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 9, "global_step": 1234, "pytorch-lightning_version": "2.4.0",
                    "state_dict": {f"mol_llama.{k}": v.detach().clone() for k, v in trainable.items()}}, out)
    else:
        raise ValueError(layout)
    return peft


def merged_lora_decoder(base_model, delta_rank: int | None, seed: int, scale: float = 0.05):
    """A copy of ``base_model`` with ``W += delta`` on every target projection: ``delta`` of rank
    ``delta_rank`` (``None``: full rank), of Frobenius norm ``scale * ||W||``."""
    decoder = copy.deepcopy(base_model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in decoder.named_parameters():
            module = name.split(".")[-2]
            if module not in LORA_TARGET_MODULES:
                continue
            d_out, d_in = param.shape
            k = delta_rank or min(d_out, d_in)
            delta = torch.randn(d_out, k, generator=gen) @ torch.randn(k, d_in, generator=gen)
            param.add_(delta * (scale * param.norm() / delta.norm()))
    return decoder.eval()


def prot2text_checkpoint(out: Path, base_model, *, delta_rank: int | None = 8, seed: int = 2, shards: int = 3):
    """A Prot2Text-V2 directory at ``out``; returns the merged decoder (``LlamaForCausalLM``)."""
    from transformers import EsmConfig, EsmModel

    decoder = merged_lora_decoder(base_model, delta_rank, seed)
    torch.manual_seed(seed)
    esm = EsmModel(EsmConfig(vocab_size=33, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=32, pad_token_id=1, mask_token_id=32, max_position_embeddings=64,
                             position_embedding_type="rotary"), add_pooling_layer=False)
    hidden = base_model.config.hidden_size
    adapter = {"adapter.fc1.weight": torch.randn(64, 16), "adapter.fc1.bias": torch.randn(64),
               "adapter.fc2.weight": torch.randn(hidden, 64), "adapter.fc2.bias": torch.randn(hidden),
               "adapter.ln1.weight": torch.ones(64), "adapter.ln1.bias": torch.zeros(64),
               "adapter.ln2.weight": torch.ones(hidden), "adapter.ln2.bias": torch.zeros(hidden)}
    state = ({f"esm_encoder.{k}": v for k, v in esm.state_dict().items()} | adapter
             | {f"llama_decoder.{k}": v for k, v in decoder.state_dict().items()})
    config = {"model_type": "esm2llama_instruct", "architectures": ["Esm2LlamaInstructForCausalLM"],
              "esm_config": esm.config.to_dict(), "llama_config": base_model.config.to_dict(),
              "adapter_config": {"input_dim": 16, "intermediate_dim": 64, "output_dim": hidden, "dropout_rate": 0.3},
              "placeholder_id": VOCAB - 2}
    _save_shards(out, state, config, shards)
    return decoder


def full_finetune_checkpoint(out: Path, base_model, *, seed: int = 3, scale: float = 0.05):
    """A full fine-tune at ``out``: full-rank deltas on the projections and a moved final norm."""
    model = merged_lora_decoder(base_model, None, seed, scale)
    with torch.no_grad():
        model.model.norm.weight.add_(0.01)
    model.save_pretrained(out, safe_serialization=True)
    return model


# --------------------------------------------------------------------------- a paper-scale run on stand-ins
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def llama3_tokenizer():
    """A byte-level tokenizer in LLaMA-3's chat format (``<|eot_id|>`` ends a turn), built in code."""
    from esmerge.specialists.base_llm import byte_tokenizer

    return byte_tokenizer(specials=("<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                    "<|eot_id|>"), eos="<|eot_id|>", chat_template=LLAMA3_TEMPLATE)


def save_paper_base(out: Path, seed: int = 0) -> torch.nn.Module:
    """LLaMA-3.1-8B-Instruct's stand-in as ``models.load_paper`` reads it: weights, config and tokenizer."""
    tok = llama3_tokenizer()
    model = save_base(out, seed=seed, vocab_size=len(tok))
    tok.save_pretrained(out)
    return model


def paper_specialists(root: Path, base_folder: Path, base_model) -> dict[str, Path]:
    """The three converted specialists in ``root/<modality>``: Mol-LLaMA and Prot2Text-V2 stand-ins
    through their converters, a full fine-tune through ``lora_extract`` as the cell one."""
    from esmerge.specialists import convert

    mol_llama_checkpoint(root / "src" / "mol", base_model, str(base_folder))
    convert.convert_mol_llama(root / "src" / "mol", root / "molecule", base=base_folder)
    prot2text_checkpoint(root / "src" / "p2t", base_model)
    convert.convert_prot2text(root / "src" / "p2t", root / "protein", base=base_folder, device="cpu")
    full_finetune_checkpoint(root / "src" / "cell", base_model)
    convert.lora_extract(root / "src" / "cell", base_folder, root / "cell", modality="cell", device="cpu")
    return {m: root / m for m in ("molecule", "protein", "cell")}


def paper_tree(root: Path) -> tuple[Path, Path]:
    """A paper-scale tree under ``root``: the base in ``llama/`` and its three specialists in ``specialists/``."""
    base_model = save_paper_base(root / "llama")
    paper_specialists(root / "specialists", root / "llama", base_model)
    return root / "llama", root / "specialists"


def mol_llama_standin_builder(entry: dict, projector: dict, encoder: dict, folder):
    """Mol-LLaMA's encoder is an optional extra; this stand-in keeps its interface (8 tokens per
    molecule through the checkpoint's ``query_tokens`` and ``llm_proj``) on fixed fingerprint features."""
    from esmerge.specialists.encoders import molecule_features
    from esmerge.specialists.raw_encoder import RawEncoder

    class StandinMolEncoder(RawEncoder):
        n_tokens = 8

        def __init__(self):
            super().__init__()
            query = projector["encoder.query_tokens"]  # [1, 8, 16]
            self.register_buffer("query", query[0].float())
            self.register_buffer("mix", torch.randn(2054, query.shape[-1],
                                                    generator=torch.Generator().manual_seed(0)) / 45)
            self.register_buffer("weight", projector["llm_proj.weight"].float())
            self.register_buffer("bias", projector["llm_proj.bias"].float())

        def blocks(self, raw):
            feats = molecule_features(list(raw)).to(self.mix.device) @ self.mix  # [K, 16]
            return (self.query[None] + feats[:, None]) @ self.weight.T + self.bias  # [K, 8, d]

    return StandinMolEncoder()
