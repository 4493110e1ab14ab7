"""Mol-LLaMA's molecule encoder as one ``RawEncoder``: K SMILES -> ``[K, 8, d]`` LLM-space tokens.

Upstream (``models/mol_llama_encoder.py`` ``MolLLaMAEncoder.graph_forward`` and ``mol_llama.py``):
MoleculeSTM (2D) and Uni-Mol (3D) node states -> each through its ``ln_graph`` LayerNorm -> the
blending module -> the Q-Former's 8 query tokens cross-attending to the blended tokens -> ``llm_proj``.
Those 8 tokens replace the 8 ``<mol>`` placeholders of the prompt.

The module's state-dict keys are upstream's (``encoder.query_tokens``, ``encoder.ln_graph.unimol.weight``,
``encoder.graph_encoder.moleculestm.*``, ``llm_proj.weight``, ...), so a converted specialist's
``projector.safetensors`` + ``encoder.safetensors`` (or the graph encoders' own files) load as they are.
Sizes are read from the tensors; what shapes cannot tell (attention heads of the Q-Former and of the
blending module, the Q-Former's LayerNorm eps) comes from the card's ``encoder.config``, defaulting to
upstream's (SciBERT: 12 heads, eps 1e-12; blending: 8 heads). Encoding runs in float32.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from esmerge.errors import InputError
from esmerge.specialists.mol_llama import featurize
from esmerge.specialists.mol_llama.graph2d import MoleculeSTMGraph
from esmerge.specialists.mol_llama.graph3d import UniMolGraph, collate
from esmerge.specialists.mol_llama.qformer import BlendingModule, QFormer
from esmerge.specialists.raw_encoder import RawEncoder

# Tensors upstream keeps in its state dict that this forward never reads: BERT's position ids, and
# parts Mol-LLaMA only uses in stage 1 (text path of the Q-Former, contrastive heads).
IGNORED = re.compile(r"(position_ids$|^encoder\.(graph_proj|text_proj|gtm_head)\.|^encoder\.Qformer\.cls\.|"
                     r"^encoder\.Qformer\.bert\.embeddings\.(word|position)_embeddings\.|"
                     r"^encoder\.Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.)")


class MolLlamaEncoder(RawEncoder):
    """``blocks(smiles)`` -> ``[K, n_tokens, d_llm]``; ``tokens(graphs, unimol)`` runs it on featurised inputs."""

    n_tokens = 8

    def __init__(self, sizes: dict, dictionary: tuple[str, ...], seed: int = featurize.CONFORMER_SEED):
        super().__init__()
        self.sizes, self.dictionary, self.seed = sizes, tuple(dictionary), seed
        q, b, g2, g3 = sizes["qformer"], sizes["blending"], sizes["moleculestm"], sizes["unimol"]
        self.n_tokens = q["queries"]
        self.encoder = nn.Module()
        self.encoder.graph_encoder = nn.ModuleDict({
            "unimol": UniMolGraph(g3["vocab"], g3["layers"], g3["dim"], g3["ffn_dim"], g3["heads"],
                                  padding_idx=self.dictionary.index("[PAD]"), kernels=g3["kernels"]),
            "moleculestm": MoleculeSTMGraph(g2["layers"], g2["dim"], g2["tasks"])})
        self.encoder.ln_graph = nn.ModuleDict({"unimol": nn.LayerNorm(g3["dim"]),
                                               "moleculestm": nn.LayerNorm(g2["dim"])})
        self.encoder.blending_module = BlendingModule(b["dim"], b["heads"], b["layers"],
                                                      {"unimol": g3["dim"], "moleculestm": g2["dim"]})
        self.encoder.Qformer = QFormer(q["dim"], q["layers"], q["heads"], q["hidden"], b["dim"], set(q["cross"]),
                                       q["eps"])
        self.encoder.query_tokens = nn.Parameter(torch.zeros(1, q["queries"], q["dim"]))
        self.llm_proj = nn.Linear(q["dim"], sizes["llm_dim"])

    def tokens(self, graphs: list[dict[str, torch.Tensor]], unimol: dict[str, torch.Tensor]) -> torch.Tensor:
        """K 2D graphs (``featurize.smiles_graph``) and their padded Uni-Mol inputs (``graph3d.collate``)
        -> ``[K, n_tokens, d_llm]``."""
        enc = self.encoder
        device = enc.query_tokens.device
        x2, m2 = enc.graph_encoder["moleculestm"](graphs)
        x3, m3 = enc.graph_encoder["unimol"](**{k: v.to(device) for k, v in unimol.items()})
        nodes, mask = enc.blending_module(enc.ln_graph["moleculestm"](x2), m2, enc.ln_graph["unimol"](x3), m3)
        queries = enc.Qformer(enc.query_tokens.expand(len(graphs), -1, -1), nodes, mask)
        return self.llm_proj(queries)

    def featurise(self, smiles: list[str]) -> tuple[list[dict], dict[str, torch.Tensor]]:
        """SMILES -> (2D graphs, padded Uni-Mol inputs of one seeded conformer each)."""
        graphs = [featurize.smiles_graph(s) for s in smiles]
        samples = [featurize.unimol_inputs(*featurize.conformer(s, self.seed), self.dictionary, seed=self.seed)
                   for s in smiles]
        return graphs, collate(samples, self.dictionary.index("[PAD]"))

    @torch.no_grad()
    def blocks(self, raw: list, batch_size: int = 16) -> torch.Tensor:
        if not raw:
            return self.llm_proj.weight.new_zeros(0, self.n_tokens, self.llm_proj.out_features)
        out = [self.tokens(*self.featurise(list(raw[i:i + batch_size]))) for i in range(0, len(raw), batch_size)]
        return torch.cat(out)


def _count(state: dict, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return sorted(found)


def infer_sizes(state: dict[str, torch.Tensor], config: dict | None) -> dict:
    """Module sizes from upstream-keyed tensors (heads and eps from ``config``). Raises ``KeyError`` naming
    a tensor that is missing."""
    config = config or {}
    qcfg, bcfg = config.get("qformer_config") or {}, config.get("blending_module_config") or {}
    qf, bl = "encoder.Qformer.bert.encoder.layer.", "encoder.blending_module."
    stm, uni = "encoder.graph_encoder.moleculestm.molecule_node_model.", "encoder.graph_encoder.unimol."

    def get(key):
        if key not in state:
            raise KeyError(key)
        return state[key]

    query = get("encoder.query_tokens")
    layers = _count(state, re.escape(qf) + r"(\d+)\.attention\.self\.query\.weight$")
    cross = _count(state, re.escape(qf) + r"(\d+)\.crossattention\.self\.query\.weight$")
    get("encoder.Qformer.bert.embeddings.LayerNorm.weight")
    qformer = {"dim": query.shape[-1], "queries": query.shape[1], "layers": len(layers), "cross": cross,
               "hidden": get(f"{qf}0.intermediate_query.dense.weight").shape[0],
               "heads": int(qcfg.get("num_attention_heads", 12)), "eps": float(qcfg.get("layer_norm_eps", 1e-12))}
    blocks = _count(state, re.escape(bl) + r"cross_attn_blocks\.(\d+)\.self_attn_block_2D\.ln\.weight$")
    blending = {"dim": get(f"{bl}mlp.unimol.0.weight").shape[0], "heads": int(bcfg.get("num_heads", 8)),
                "layers": len(blocks)}
    atom = get(f"{stm}atom_encoder.atom_embedding_list.0.weight")
    pred = state.get("encoder.graph_encoder.moleculestm.graph_pred_linear.weight")
    moleculestm = {"dim": atom.shape[1], "layers": len(_count(state, re.escape(stm) + r"gnns\.(\d+)\.eps$")),
                   "tasks": pred.shape[0] if pred is not None else 1}
    embed = get(f"{uni}embed_tokens.weight")
    unimol = {"vocab": embed.shape[0], "dim": embed.shape[1], "heads": get(f"{uni}gbf_proj.linear2.weight").shape[0],
              "kernels": get(f"{uni}gbf.means.weight").shape[1],
              "layers": len(_count(state, re.escape(uni) + r"encoder\.layers\.(\d+)\.fc1\.weight$")),
              "ffn_dim": get(f"{uni}encoder.layers.0.fc1.weight").shape[0]}
    return {"qformer": qformer, "blending": blending, "moleculestm": moleculestm, "unimol": unimol,
            "llm_dim": get("llm_proj.weight").shape[0]}


def build(state: dict[str, torch.Tensor], config: dict | None, dictionary: tuple[str, ...] | None,
          where: str) -> MolLlamaEncoder:
    """A ``MolLlamaEncoder`` (float32, eval) holding ``state`` (upstream keys). ``dictionary`` None: Uni-Mol's
    own when the embedding has its 31 rows. Raises ``InputError`` (one line) for tensors that do not fit."""
    try:
        sizes = infer_sizes(state, config)
    except KeyError as err:
        raise InputError(f"{where}: Mol-LLaMA's own encoder cannot be built: no tensor {err.args[0]}") from None
    if dictionary is None:
        if sizes["unimol"]["vocab"] != len(featurize.UNIMOL_SYMBOLS):
            raise InputError(f"{where}: Uni-Mol's embedding has {sizes['unimol']['vocab']} rows, not the "
                             f"{len(featurize.UNIMOL_SYMBOLS)} of its mol.dict.txt; put that dictionary beside it")
        dictionary = featurize.UNIMOL_SYMBOLS
    if len(dictionary) != sizes["unimol"]["vocab"]:
        raise InputError(f"{where}: Uni-Mol's dictionary has {len(dictionary)} symbols, its embedding "
                         f"{sizes['unimol']['vocab']} rows")
    module = MolLlamaEncoder(sizes, dictionary)
    wanted = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not IGNORED.search(k)}
    missing, unexpected = module.load_state_dict(wanted, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    # Uni-Mol's own checkpoint brings its pretraining heads (lm_head, pair2coord_proj, dist_head, ...), which
    # upstream's non-strict load drops too; every tensor this forward reads must still be there (missing).
    unexpected = [k for k in unexpected if not k.startswith("encoder.graph_encoder.unimol.")]
    if missing or unexpected:
        raise InputError(f"{where}: Mol-LLaMA's own encoder tensors do not fit (missing {missing[:2]}, unexpected "
                         f"{unexpected[:2]}); reconvert with `esmerge convert mol-llama`")
    return module.float().eval().requires_grad_(False)


# The trained part every converted Mol-LLaMA holds (projector.safetensors); checked before any download.
TRAINED_KEYS = ("encoder.query_tokens", "encoder.Qformer.bert.embeddings.LayerNorm.weight",
                "encoder.blending_module.mlp.unimol.0.weight", "encoder.ln_graph.unimol.weight", "llm_proj.weight")


def from_card(entry: dict, projector: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor], folder) -> RawEncoder:
    """The encoder a converted specialist's card ``encoder`` entry describes (kind ``"mol-llama"``).

    ``projector`` holds the trained part (``vocab.*`` rows are the LLM's, not the encoder's); the frozen
    graph encoders come from ``encoder`` (``encoder.safetensors``) or, when it has none, from the files
    upstream names (``weights.upstream_files``), resolved through the hub cache and checked against the
    sha256 the card records. Raises ``InputError`` (one line) naming what is missing and what to do.
    """
    missing = [k for k in TRAINED_KEYS if k not in projector]
    if missing:
        raise InputError(f"{folder}/projector.safetensors: Mol-LLaMA's own encoder cannot be built: no tensor "
                         f"{missing[0]}; reconvert with "
                         "`esmerge convert mol-llama DongkiKim/Mol-Llama-3.1-8B-Instruct`")
    state = {k: v for k, v in projector.items() if not k.startswith("vocab.")} | dict(encoder)
    dictionary, provenance = None, "encoder.safetensors"
    if not any(k.startswith("encoder.graph_encoder.") for k in encoder):
        from esmerge.specialists.mol_llama import weights

        files = entry.get("graph_encoder_files") or weights.upstream_files(entry.get("config"))
        try:
            resolved = weights.resolve(files)
            tensors, dictionary = weights.read_graph_tensors(resolved)
        except weights.GraphWeightsError as err:
            raise InputError(f"{folder}: Mol-LLaMA's own encoder needs its frozen graph encoders (Uni-Mol, "
                             f"MoleculeSTM), absent from encoder.safetensors: {err}") from None
        state |= tensors
        provenance = {role: {"path": str(path), "sha256": digest} for role, (path, digest) in resolved.items()}
    module = build(state, entry.get("config"), dictionary, str(folder))
    module.graph_weights = provenance  # where the frozen encoders came from (files and their sha256)
    return module
