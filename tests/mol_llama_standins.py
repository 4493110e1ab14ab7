"""A tiny Mol-LLaMA in upstream's state-dict layout, with random weights, built in code (no downloads).

The key names are written out here from upstream's modules (``MolLLaMAEncoder`` after
``postprocess_encoder``, ``MoleculeSTM``/``GNN``/``GINConv``, ``SimpleUniMolModel`` +
``TransformerEncoderWithPair`` + Uni-Core's layers, ``BlendingModule``, the BLIP-2 ``BertModel``
query path, ``llm_proj``), not taken from esmerge's implementation, so a key that implementation
misnames is caught. Sizes are tiny; the heads the shapes do not show are in ``CONFIG``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

ATOM_SIZES = (119, 4, 12, 12, 10, 6, 6, 2, 2)  # OGB's atom categories as MoleculeSTM uses them
BOND_SIZES = (5, 6, 2)
UNIMOL_VOCAB = 31  # mol.dict.txt's 30 symbols + [MASK]
SIZES = {"q_dim": 16, "q_heads": 2, "q_layers": 2, "q_hidden": 24, "cross_freq": 2, "queries": 8,
         "blend_dim": 24, "blend_heads": 2, "blend_layers": 2,
         "stm_dim": 12, "stm_layers": 2, "uni_dim": 24, "uni_heads": 4, "uni_layers": 2, "uni_ffn": 32,
         "kernels": 16}
CONFIG = {"qformer_config": {"bert_name": "allenai/scibert_scivocab_uncased", "num_query_tokens": 8,
                             "cross_attention_freq": SIZES["cross_freq"], "embed_dim": 256,
                             "num_attention_heads": SIZES["q_heads"]},
          "blending_module_config": {"num_layers": SIZES["blend_layers"], "num_heads": SIZES["blend_heads"]},
          "graph_encoder_config": {"encoder_types": ["unimol", "moleculestm"]}}


def _linear(out: dict, key: str, n_out: int, n_in: int, gen) -> None:
    out[f"{key}.weight"] = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
    out[f"{key}.bias"] = torch.randn(n_out, generator=gen) * 0.1


def _norm(out: dict, key: str, dim: int, gen) -> None:
    out[f"{key}.weight"] = 1 + 0.2 * torch.randn(dim, generator=gen)
    out[f"{key}.bias"] = 0.2 * torch.randn(dim, generator=gen)


def _batch_norm(out: dict, key: str, dim: int, gen) -> None:
    _norm(out, key, dim, gen)
    out[f"{key}.running_mean"] = 0.3 * torch.randn(dim, generator=gen)
    out[f"{key}.running_var"] = 0.5 + torch.rand(dim, generator=gen)
    out[f"{key}.num_batches_tracked"] = torch.tensor(1000)


def trained_part(llm_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """What Mol-LLaMA trains (and its hub release saves): query tokens, ln_graph, blending, Q-Former, llm_proj."""
    s, gen, out = SIZES, torch.Generator().manual_seed(seed), {}
    q, b = s["q_dim"], s["blend_dim"]
    out["encoder.query_tokens"] = torch.randn(1, s["queries"], q, generator=gen)
    for name, dim in (("unimol", s["uni_dim"]), ("moleculestm", s["stm_dim"])):
        _norm(out, f"encoder.ln_graph.{name}", dim, gen)
        _linear(out, f"encoder.blending_module.mlp.{name}.0", b, dim, gen)
    for layer in range(s["blend_layers"]):
        for block in ("self_attn_block_2D", "self_attn_block_3D", "cross_attn_block_2Dto3D", "cross_attn_block_3Dto2D"):
            key = f"encoder.blending_module.cross_attn_blocks.{layer}.{block}"
            out[f"{key}.attn.in_proj_weight"] = torch.randn(3 * b, b, generator=gen) / b ** 0.5
            out[f"{key}.attn.in_proj_bias"] = 0.1 * torch.randn(3 * b, generator=gen)
            _linear(out, f"{key}.attn.out_proj", b, b, gen)
            _linear(out, f"{key}.mlp.0", 4 * b, b, gen)
            _linear(out, f"{key}.mlp.2", b, 4 * b, gen)
            for ln in ("ln_q", "ln_k", "ln_v", "ln"):
                _norm(out, f"{key}.{ln}", b, gen)
    out["encoder.Qformer.bert.embeddings.position_ids"] = torch.arange(512)[None]
    _norm(out, "encoder.Qformer.bert.embeddings.LayerNorm", q, gen)
    for layer in range(s["q_layers"]):
        key = f"encoder.Qformer.bert.encoder.layer.{layer}"
        parts = ["attention"] + (["crossattention"] if layer % s["cross_freq"] == 0 else [])
        for part in parts:
            context = q if part == "attention" else b
            _linear(out, f"{key}.{part}.self.query", q, q, gen)
            _linear(out, f"{key}.{part}.self.key", q, context, gen)
            _linear(out, f"{key}.{part}.self.value", q, context, gen)
            _linear(out, f"{key}.{part}.output.dense", q, q, gen)
            _norm(out, f"{key}.{part}.output.LayerNorm", q, gen)
        _linear(out, f"{key}.intermediate_query.dense", s["q_hidden"], q, gen)
        _linear(out, f"{key}.output_query.dense", q, s["q_hidden"], gen)
        _norm(out, f"{key}.output_query.LayerNorm", q, gen)
    _linear(out, "llm_proj", llm_dim, q, gen)
    return out


def moleculestm_part(seed: int = 1) -> dict[str, torch.Tensor]:
    """MoleculeSTM's state dict as its ``molecule_model.pth`` holds it (no prefix)."""
    s, gen, out = SIZES, torch.Generator().manual_seed(seed), {}
    d, node = s["stm_dim"], "molecule_node_model"
    for i, size in enumerate(ATOM_SIZES):
        out[f"{node}.atom_encoder.atom_embedding_list.{i}.weight"] = torch.randn(size, d, generator=gen) * 0.5
    for layer in range(s["stm_layers"]):
        key = f"{node}.gnns.{layer}"
        _linear(out, f"{key}.mlp.0", 2 * d, d, gen)
        _batch_norm(out, f"{key}.mlp.1", 2 * d, gen)
        _linear(out, f"{key}.mlp.3", d, 2 * d, gen)
        out[f"{key}.eps"] = 0.1 * torch.randn(1, generator=gen)
        for i, size in enumerate(BOND_SIZES):
            out[f"{key}.bond_encoder.bond_embedding_list.{i}.weight"] = torch.randn(size, d, generator=gen) * 0.5
        _batch_norm(out, f"{node}.batch_norms.{layer}", d, gen)
    _linear(out, "graph_pred_linear", 1, d, gen)
    return out


def unimol_part(seed: int = 2) -> dict[str, torch.Tensor]:
    """Uni-Mol's ``SimpleUniMolModel`` state dict (no prefix), as its checkpoint's ``"model"`` holds it."""
    s, gen, out = SIZES, torch.Generator().manual_seed(seed), {}
    d, k, v = s["uni_dim"], s["kernels"], UNIMOL_VOCAB
    out["embed_tokens.weight"] = torch.randn(v, d, generator=gen)
    _norm(out, "encoder.emb_layer_norm", d, gen)
    _norm(out, "encoder.final_layer_norm", d, gen)
    for layer in range(s["uni_layers"]):
        key = f"encoder.layers.{layer}"
        _linear(out, f"{key}.self_attn.in_proj", 3 * d, d, gen)
        _linear(out, f"{key}.self_attn.out_proj", d, d, gen)
        _norm(out, f"{key}.self_attn_layer_norm", d, gen)
        _linear(out, f"{key}.fc1", s["uni_ffn"], d, gen)
        _linear(out, f"{key}.fc2", d, s["uni_ffn"], gen)
        _norm(out, f"{key}.final_layer_norm", d, gen)
    _linear(out, "gbf_proj.linear1", k, k, gen)
    _linear(out, "gbf_proj.linear2", s["uni_heads"], k, gen)
    out["gbf.means.weight"] = 3 * torch.rand(1, k, generator=gen)
    out["gbf.stds.weight"] = 0.5 + 2 * torch.rand(1, k, generator=gen)
    out["gbf.mul.weight"] = 1 + 0.1 * torch.randn(v * v, 1, generator=gen)
    out["gbf.bias.weight"] = 0.1 * torch.randn(v * v, 1, generator=gen)
    return out


def full_state(llm_dim: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The whole encoder + ``llm_proj`` as ``MolLLaMA.state_dict()`` keys it (without ``llm.*``)."""
    return (trained_part(llm_dim, seed) | {f"encoder.graph_encoder.moleculestm.{k}": t
                                           for k, t in moleculestm_part(seed + 1).items()}
            | {f"encoder.graph_encoder.unimol.{k}": t for k, t in unimol_part(seed + 2).items()})


def mol_llama_full_checkpoint(out: Path, base_model, base_name: str, seed: int = 1, encoder_seed: int = 0,
                              *, graph_encoders: bool = True, shards: int = 2):
    """A Hugging Face ``MolLLaMA`` directory carrying the whole encoder (graph encoders included; without
    them with ``graph_encoders=False``, see ``mol_llama_hub_checkpoint``); returns the source LLM (PEFT,
    vocabulary resized by [PAD] and <mol>) for reference logits."""
    import standins

    peft = standins._lora_model(base_model, 8, seed, base_model.config.vocab_size + standins.ADDED_TOKENS)
    llm = {f"llm.{k}": v for k, v in peft.state_dict().items()}
    config = {"model_type": "mol_llama", "architectures": ["MolLLaMA"],
              "llm_config": {"llm_model": base_name, "lora_config": {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}},
              **CONFIG}
    hidden = base_model.config.hidden_size
    encoder = full_state(hidden, encoder_seed) if graph_encoders else trained_part(hidden, encoder_seed)
    standins._save_shards(out, llm | encoder, config, shards)
    return peft


def mol_llama_hub_checkpoint(out: Path, hub_cache: Path, base_model, base_name: str, seed: int = 1,
                             encoder_seed: int = 0) -> dict[str, Path]:
    """Mol-LLaMA as its hub release lays it out: a ``MolLLaMA`` directory (sharded safetensors + index) whose
    encoder holds what upstream trains (query tokens, ``ln_graph``, blending module, Q-Former, ``llm_proj``,
    sized for ``base_model``) and not the frozen MoleculeSTM and Uni-Mol, which go to a fake Hugging Face hub
    cache at ``hub_cache`` (``fake_hub_cache``: where upstream's config names them). Point ``HF_HUB_CACHE`` at
    ``hub_cache`` (and set ``HF_HUB_OFFLINE``) to use it. Returns the cached files' paths by file name."""
    mol_llama_full_checkpoint(out, base_model, base_name, seed, encoder_seed, graph_encoders=False)
    return fake_hub_cache(hub_cache, encoder_seed)


def fake_hub_cache(root: Path, seed: int = 0) -> dict[str, Path]:
    """The three upstream graph-encoder files in huggingface_hub's cache layout under ``root`` (the graph
    encoders of ``full_state(..., seed)``); returns their paths by file name."""
    files = {("dptech/Uni-Mol-Models", "mol_pre_no_h_220816.pt"): {"model": unimol_part(seed + 2)},
             ("dptech/Uni-Mol-Models", "mol.dict.txt"): None,
             ("chao1224/MoleculeSTM", "demo/demo_checkpoints_Graph/molecule_model.pth"): moleculestm_part(seed + 1)}
    paths = {}
    for (repo, filename), content in files.items():
        folder = root / f"models--{repo.replace('/', '--')}"
        commit = "0" * 40
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(commit)
        path = folder / "snapshots" / commit / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:  # the dictionary: one symbol a line, [MASK] is appended by the reader
            symbols = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "C", "N", "O", "S", "H", "Cl", "F", "Br", "I", "Si", "P",
                       "B", "Na", "K", "Al", "Ca", "Sn", "As", "Hg", "Fe", "Zn", "Cr", "Se", "Gd", "Au", "Li"]
            path.write_text("\n".join(symbols) + "\n")
        else:
            torch.save(content, path)
        paths[filename] = path
    return paths


def card_config_json(folder: Path) -> dict:
    return json.loads((folder / "card.json").read_text())
