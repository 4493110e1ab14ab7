"""Mol-LLaMA's own molecule encoder against an independent, upstream-style forward (tiny random stand-ins).

The reference below shares no code with ``esmerge.specialists.mol_llama``: the GIN and Uni-Mol are
literal loop transcriptions of upstream's math, one molecule at a time without padding; the blending
module uses ``torch.nn.MultiheadAttention`` (what upstream's ``ResidualAttentionBlock`` holds); the
Q-Former is transformers' ``Blip2QFormerModel`` (BLIP-2's query path) loaded with renamed keys.
"""
from __future__ import annotations

import math
import sys

import mol_llama_standins as ms
import pytest
import standins
import torch

from esmerge.specialists import convert
from esmerge.specialists.base_llm import BaseModel, checkpoint_sha256
from esmerge.specialists.load import attach_specialist, load_specialist
from esmerge.specialists.mol_llama import featurize
from esmerge.specialists.mol_llama.encoder import MolLlamaEncoder, build
from esmerge.specialists.raw_encoder import EncoderUnavailableError, UnavailableEncoder

pytest.importorskip("rdkit")
SMILES = ["CCO", "c1ccccc1O", "C[C@H](N)C(=O)O", "[Na+].[Cl-]", "CC(=O)Nc1ccc(O)cc1"]
LLM_DIM = 32
TOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread(private_cache):
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def state():
    return ms.full_state(LLM_DIM)


@pytest.fixture(scope="module")
def encoder(state):
    return build(state, ms.CONFIG, None, "standin")


# --------------------------------------------------------------------------- the reference, by hand
def sub(state, prefix):
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def layer_norm(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def lin(x, p, key):
    return x @ p[f"{key}.weight"].T + p[f"{key}.bias"]


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ref_moleculestm(p, graph):
    """GINConv/GNN/MoleculeSTM upstream for one graph: ``[1 + N, D]`` (mean-pooled token first)."""
    atoms, edge_index, edges = graph["atoms"], graph["edge_index"], graph["edges"]
    n = atoms.shape[0]
    h = torch.stack([sum(p[f"molecule_node_model.atom_encoder.atom_embedding_list.{i}.weight"][atoms[v, i]]
                         for i in range(9)) for v in range(n)])
    layers = ms.SIZES["stm_layers"]
    for l in range(layers):
        g = f"molecule_node_model.gnns.{l}"
        agg = torch.zeros_like(h)
        for e in range(edge_index.shape[1]):
            src, dst = int(edge_index[0, e]), int(edge_index[1, e])
            bond = sum(p[f"{g}.bond_encoder.bond_embedding_list.{j}.weight"][edges[e, j]] for j in range(3))
            agg[dst] = agg[dst] + torch.relu(h[src] + bond)
        z = (1 + p[f"{g}.eps"]) * h + agg
        z = lin(z, p, f"{g}.mlp.0")
        z = (z - p[f"{g}.mlp.1.running_mean"]) / torch.sqrt(p[f"{g}.mlp.1.running_var"] + 1e-5) \
            * p[f"{g}.mlp.1.weight"] + p[f"{g}.mlp.1.bias"]
        z = lin(torch.relu(z), p, f"{g}.mlp.3")
        bn = f"molecule_node_model.batch_norms.{l}"
        z = (z - p[f"{bn}.running_mean"]) / torch.sqrt(p[f"{bn}.running_var"] + 1e-5) * p[f"{bn}.weight"] \
            + p[f"{bn}.bias"]
        h = z if l == layers - 1 else torch.relu(z)
    return torch.cat([h.mean(0, keepdim=True), h])


def ref_unimol(p, tokens, distance, edge_type):
    """SimpleUniMolModel + TransformerEncoderWithPair + Uni-Core layers upstream, one molecule: ``[T, D]``."""
    t, heads = tokens.shape[0], ms.SIZES["uni_heads"]
    mean, std = p["gbf.means.weight"][0], p["gbf.stds.weight"][0].abs() + 1e-5
    bias = torch.zeros(heads, t, t)
    for i in range(t):
        for j in range(t):
            et = int(edge_type[i, j])
            x = p["gbf.mul.weight"][et, 0] * distance[i, j] + p["gbf.bias.weight"][et, 0]
            g = torch.exp(-0.5 * ((x - mean) / std) ** 2) / ((2 * 3.14159) ** 0.5 * std)
            bias[:, i, j] = lin(gelu(lin(g, p, "gbf_proj.linear1")), p, "gbf_proj.linear2")
    x = p["embed_tokens.weight"][tokens]
    x = layer_norm(x, p["encoder.emb_layer_norm.weight"], p["encoder.emb_layer_norm.bias"])
    d = x.shape[1]
    hd = d // heads
    for l in range(ms.SIZES["uni_layers"]):
        k_ = f"encoder.layers.{l}"
        y = layer_norm(x, p[f"{k_}.self_attn_layer_norm.weight"], p[f"{k_}.self_attn_layer_norm.bias"])
        qkv = lin(y, p, f"{k_}.self_attn.in_proj")
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
        outs, new_bias = [], torch.zeros_like(bias)
        for h in range(heads):
            s = slice(h * hd, (h + 1) * hd)
            logits = (q[:, s] * hd ** -0.5) @ k[:, s].T + bias[h]
            new_bias[h] = logits  # the pair representation the next layer adds
            outs.append(torch.softmax(logits, -1) @ v[:, s])
        bias = new_bias
        x = x + lin(torch.cat(outs, -1), p, f"{k_}.self_attn.out_proj")
        y = layer_norm(x, p[f"{k_}.final_layer_norm.weight"], p[f"{k_}.final_layer_norm.bias"])
        x = x + lin(gelu(lin(y, p, f"{k_}.fc1")), p, f"{k_}.fc2")
    return layer_norm(x, p["encoder.final_layer_norm.weight"], p["encoder.final_layer_norm.bias"])


def ref_attention_block(p, key, q, k, v):
    """ResidualAttentionBlock upstream, with torch.nn.MultiheadAttention as it holds one."""
    dim = q.shape[-1]
    mha = torch.nn.MultiheadAttention(dim, ms.SIZES["blend_heads"], batch_first=True)
    mha.load_state_dict(sub(p, f"{key}.attn."))
    mha.eval()
    ln = {n: (p[f"{key}.{n}.weight"], p[f"{key}.{n}.bias"]) for n in ("ln_q", "ln_k", "ln_v", "ln")}
    x = q + mha(layer_norm(q, *ln["ln_q"])[None], layer_norm(k, *ln["ln_k"])[None], layer_norm(v, *ln["ln_v"])[None],
                need_weights=False)[0][0]
    return x + lin(gelu(lin(layer_norm(x, *ln["ln"]), p, f"{key}.mlp.0")), p, f"{key}.mlp.2")


def ref_qformer(p, nodes):
    from transformers import Blip2QFormerConfig, Blip2QFormerModel

    s = ms.SIZES
    config = Blip2QFormerConfig(hidden_size=s["q_dim"], num_hidden_layers=s["q_layers"],
                                num_attention_heads=s["q_heads"], intermediate_size=s["q_hidden"],
                                cross_attention_frequency=s["cross_freq"], encoder_hidden_size=s["blend_dim"],
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = Blip2QFormerModel(config).eval()
    renamed = {k.replace("embeddings.LayerNorm", "layernorm").replace(".self.", ".attention."): v
               for k, v in sub(p, "encoder.Qformer.bert.").items() if "position_ids" not in k}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all(".intermediate." in k or ".output." in k for k in missing), missing
    with torch.no_grad():
        return model(query_embeds=p["encoder.query_tokens"], encoder_hidden_states=nodes[None]).last_hidden_state[0]


def reference_tokens(p, smiles: str) -> torch.Tensor:
    """``MolLLaMAEncoder.graph_forward`` + ``llm_proj`` for one molecule: ``[8, d_llm]``."""
    graph = featurize.smiles_graph(smiles)
    uni = featurize.unimol_inputs(*featurize.conformer(smiles), featurize.UNIMOL_SYMBOLS)
    x2 = ref_moleculestm(sub(p, "encoder.graph_encoder.moleculestm."), graph)
    x3 = ref_unimol(sub(p, "encoder.graph_encoder.unimol."), uni["tokens"], uni["distance"], uni["edge_type"])
    x2 = lin(layer_norm(x2, p["encoder.ln_graph.moleculestm.weight"], p["encoder.ln_graph.moleculestm.bias"]), p,
             "encoder.blending_module.mlp.moleculestm.0")
    x3 = lin(layer_norm(x3, p["encoder.ln_graph.unimol.weight"], p["encoder.ln_graph.unimol.bias"]), p,
             "encoder.blending_module.mlp.unimol.0")
    for l in range(ms.SIZES["blend_layers"]):
        blk = f"encoder.blending_module.cross_attn_blocks.{l}"
        x2 = ref_attention_block(p, f"{blk}.self_attn_block_2D", x2, x2, x2)
        x3 = ref_attention_block(p, f"{blk}.self_attn_block_3D", x3, x3, x3)
        x2 = ref_attention_block(p, f"{blk}.cross_attn_block_3Dto2D", x2, x3, x3)
        x3 = ref_attention_block(p, f"{blk}.cross_attn_block_2Dto3D", x3, x2, x2)
    queries = ref_qformer(p, torch.cat([x2, x3]))
    return lin(queries, p, "llm_proj")


@pytest.fixture(scope="module")
def reference(state):
    with torch.no_grad():
        return torch.stack([reference_tokens(state, s) for s in SMILES])


# --------------------------------------------------------------------------- featurisation
def test_feature_vocabularies_are_moleculestm_and_unimol_ones():
    assert featurize.ATOM_FEATURE_SIZES == ms.ATOM_SIZES and featurize.BOND_FEATURE_SIZES == ms.BOND_SIZES
    assert len(featurize.UNIMOL_SYMBOLS) == ms.UNIMOL_VOCAB and featurize.UNIMOL_SYMBOLS[:5] == (
        "[PAD]", "[CLS]", "[SEP]", "[UNK]", "C")


def test_atom_and_bond_features_by_hand():
    # ethanol: CH3 (Z=6 -> 5, degree 4, charge 0 -> 5, 3 H, SP3 -> 2), CH2, OH (Z=8 -> 7, degree 2, 1 H)
    g = featurize.smiles_graph("CCO")
    assert g["atoms"].tolist() == [[5, 0, 4, 5, 3, 0, 2, 0, 0], [5, 0, 4, 5, 2, 0, 2, 0, 0],
                                   [7, 0, 2, 5, 1, 0, 2, 0, 0]]
    assert g["edge_index"].tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    assert g["edges"].tolist() == [[0, 0, 0]] * 4  # single, no stereo, not conjugated
    # benzene: aromatic SP2 ring carbons with one H; aromatic conjugated bonds
    g = featurize.smiles_graph("c1ccccc1")
    assert g["atoms"].tolist() == [[5, 0, 3, 5, 1, 0, 1, 1, 1]] * 6 and g["edges"].tolist() == [[3, 0, 1]] * 12
    # ammonium: charge +1 -> index 6, 4 H; alanine's stereocentre (@ -> CHI_TETRAHEDRAL_CCW, index 2)
    assert featurize.smiles_graph("[NH4+]")["atoms"].tolist() == [[6, 0, 4, 6, 4, 0, 2, 0, 0]]
    assert featurize.smiles_graph("C[C@H](N)C(=O)O")["atoms"][1, 1].item() == 2
    # a double bond between E-substituted carbons: type DOUBLE (1), stereo STEREOE (2)
    g = featurize.smiles_graph("C/C=C/C")
    assert g["edges"][2].tolist()[:2] == [1, 2]
    assert featurize.smiles_graph("[Na+].[Cl-]")["edge_index"].shape == (2, 0)


def test_unimol_inputs_and_seeded_conformer():
    symbols, coords = featurize.conformer("CCO")
    assert featurize.conformer("CCO")[1] is coords  # memoised: embedded once per molecule
    featurize.conformer.cache_clear()
    again = featurize.conformer("CCO")[1]
    assert symbols == ("C", "C", "O") and coords.shape == (3, 3) and (coords == again).all()  # bit-identical
    assert again is not coords and not coords.flags.writeable
    uni = featurize.unimol_inputs(symbols, coords, featurize.UNIMOL_SYMBOLS)
    assert uni["tokens"].tolist() == [1, 4, 4, 6, 2]  # [CLS] C C O [SEP]
    assert uni["edge_type"][1, 3].item() == 4 * 31 + 6
    centred = coords - coords.mean(0)
    assert abs(uni["distance"][0, 3].item() - float((centred[2] ** 2).sum() ** 0.5)) < 1e-5  # [CLS] sits at the centre
    assert abs(uni["distance"][1, 2].item() - float(((coords[0] - coords[1]) ** 2).sum() ** 0.5)) < 1e-5
    assert 1.4 < uni["distance"][1, 2].item() < 1.6  # a C-C bond after MMFF
    # hydrogens given explicitly are dropped; an element outside the dictionary is [UNK]
    uni = featurize.unimol_inputs(["C", "H", "Xe"], [[0, 0, 0], [1, 0, 0], [2, 0, 0]], featurize.UNIMOL_SYMBOLS)
    assert uni["tokens"].tolist() == [1, 4, 3, 2]


def test_rdkit_missing_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "rdkit", None)
    with pytest.raises(EncoderUnavailableError, match=r"pip install rdkit") as err:
        featurize.smiles_graph("CCO")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- the encoder against the reference
def test_tokens_equal_the_upstream_forward(encoder, reference):
    assert isinstance(encoder, MolLlamaEncoder) and encoder.n_tokens == 8
    tokens = encoder.blocks(SMILES)  # one padded batch: padding must change nothing
    assert tokens.shape == (len(SMILES), 8, LLM_DIM) and tokens.dtype == torch.float32
    diff = (tokens - reference).abs().max().item()
    print(f"max |encoder - reference| = {diff:.2e}")
    assert diff < TOL
    alone = encoder.blocks(SMILES[1:2])[0]
    assert (alone - reference[1]).abs().max().item() < TOL


@pytest.mark.parametrize("key", [
    "encoder.graph_encoder.moleculestm.molecule_node_model.gnns.1.mlp.1.running_var",
    "encoder.graph_encoder.unimol.gbf.mul.weight",
    "encoder.graph_encoder.unimol.encoder.layers.0.self_attn.in_proj.weight",
    "encoder.blending_module.cross_attn_blocks.1.cross_attn_block_2Dto3D.mlp.2.weight",
    "encoder.Qformer.bert.encoder.layer.0.crossattention.self.key.weight",
    "encoder.Qformer.bert.encoder.layer.1.output_query.dense.weight",
    "llm_proj.bias",
])
def test_a_perturbed_tensor_breaks_the_equality(state, reference, key):
    changed = dict(state)
    changed[key] = state[key] * 1.5 + 0.05
    tokens = build(changed, ms.CONFIG, None, "standin").blocks(SMILES[:3])
    assert (tokens - reference[:3]).abs().max().item() > 100 * TOL


def test_wrong_head_count_breaks_the_equality(state, reference):
    config = {**ms.CONFIG, "qformer_config": {**ms.CONFIG["qformer_config"], "num_attention_heads": 1}}
    assert (build(state, config, None, "x").blocks(SMILES[:2]) - reference[:2]).abs().max() > 100 * TOL


# --------------------------------------------------------------------------- as a converted specialist
@pytest.fixture(scope="module")
def converted(tmp_path_factory, private_cache):
    root = tmp_path_factory.mktemp("mol")
    base_model = standins.save_base(root / "llama", seed=0)
    source = ms.mol_llama_full_checkpoint(root / "src", base_model, str(root / "llama"))
    convert.convert_mol_llama(root / "src", root / "spec", base=root / "llama")
    base = BaseModel("paper", base_model, None, "tiny", checkpoint_sha256(root / "llama"))
    return root, base, source


def test_specialist_logits_with_spliced_tokens_equal_the_reference(converted, reference):
    from esmerge.evaluate.scoring import splice_embeddings

    root, base, source = converted
    spec = load_specialist(root / "spec", base)
    assert isinstance(spec.projector, MolLlamaEncoder) and spec.projector.graph_weights == "encoder.safetensors"
    mol_id = standins.VOCAB + 1  # <mol>, the second row Mol-LLaMA added
    ids = torch.randint(0, standins.VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    ids[0, 2:10], ids[1, 5:13] = mol_id, mol_id
    # upstream: inputs_embeds[mol_token_flag] = llm_proj(Q-Former(...)).flatten(0, 1)
    with torch.no_grad():
        embeds = source.get_input_embeddings()(ids)
        embeds[ids == mol_id] = reference[:2].flatten(0, 1)
        want = source(inputs_embeds=embeds).logits
        model = attach_specialist(base, spec)
        ours = splice_embeddings(model.get_input_embeddings()(ids.clamp_max(standins.VOCAB - 1)),
                                 {"molecule": (torch.tensor([0, 1]), torch.tensor([2, 5]))},
                                 {"molecule": spec.projector.blocks(SMILES[:2])})
        got = model(inputs_embeds=ours).logits
    # the source's vocabulary has Mol-LLaMA's two added rows; the specialist runs on the base's
    diff = (got - want[..., : standins.VOCAB]).abs().max().item()
    print(f"max |specialist logits - reference| = {diff:.2e}")
    assert diff < 1e-4


def _trainable_only(root, base_model):
    """A hub-layout Mol-LLaMA without the frozen graph encoders, converted."""
    full = ms.full_state(base_model.config.hidden_size)
    peft = standins._lora_model(base_model, 8, 1, base_model.config.vocab_size + standins.ADDED_TOKENS)
    llm = {f"llm.{k}": v for k, v in peft.state_dict().items()}
    trained = {k: v for k, v in full.items() if not k.startswith("encoder.graph_encoder.")}
    config = {"model_type": "mol_llama", "llm_config": {"llm_model": str(root / "llama")}, **ms.CONFIG}
    standins._save_shards(root / "src-hub", llm | trained, config, 1)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline huggingface_hub whose cache is ``tmp_path / "hub"``."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def test_graph_encoders_resolve_from_the_hub_cache(converted, reference, hub, tmp_path):
    root, base, _ = converted
    files = ms.fake_hub_cache(hub)
    _trainable_only(root, base.model)
    convert.convert_mol_llama(root / "src-hub", tmp_path / "spec", base=root / "llama")
    card = ms.card_config_json(tmp_path / "spec")
    recorded = card["encoder"]["graph_encoder_files"]
    assert recorded["unimol_weights"]["filename"] == "mol_pre_no_h_220816.pt"
    assert all(len(f["sha256"]) == 64 for f in recorded.values())  # they were in the cache when converting
    spec = load_specialist(tmp_path / "spec", base)
    assert isinstance(spec.projector, MolLlamaEncoder)
    assert spec.projector.graph_weights["unimol_weights"]["sha256"] == recorded["unimol_weights"]["sha256"]
    assert (spec.projector.blocks(SMILES[:2]) - reference[:2]).abs().max().item() < TOL
    # a cached file that is not the one the card recorded is refused, in one line
    ckpt = torch.load(files["mol_pre_no_h_220816.pt"], weights_only=True)
    ckpt["model"]["gbf.mul.weight"] = ckpt["model"]["gbf.mul.weight"] + 1
    torch.save(ckpt, files["mol_pre_no_h_220816.pt"])
    spec = load_specialist(tmp_path / "spec", base)
    assert isinstance(spec.projector, UnavailableEncoder)
    with pytest.raises(EncoderUnavailableError, match=r"sha256 .* is not the .* the card records") as err:
        spec.projector.blocks(SMILES[:1])
    assert "\n" not in str(err.value)


def test_missing_graph_encoders_refuse_in_one_line_with_a_working_hint(converted, hub, tmp_path):
    root, base, _ = converted
    _trainable_only(root, base.model)
    convert.convert_mol_llama(root / "src-hub", tmp_path / "spec", base=root / "llama")
    spec = load_specialist(tmp_path / "spec", base)  # loads (its LoRA merges), refuses to encode
    assert isinstance(spec.projector, UnavailableEncoder) and spec.projector.n_tokens == 8
    with pytest.raises(EncoderUnavailableError, match=r"Mol-LLaMA's own encoder needs its frozen graph") as err:
        spec.projector.blocks(SMILES[:1])
    message = str(err.value)
    assert "\n" not in message and "huggingface-cli download dptech/Uni-Mol-Models mol_pre_no_h_220816.pt" in message
    assert "--method avg" in message


def test_trained_tensors_missing_refuse_before_any_download(converted, monkeypatch):
    from esmerge.specialists.mol_llama import weights

    monkeypatch.setattr(weights, "download", lambda *a: pytest.fail("must not download"))
    from esmerge.specialists.encoders import build_encoder

    partial = {k: v for k, v in ms.trained_part(LLM_DIM).items() if not k.startswith("encoder.Qformer.")}
    built = build_encoder({"kind": "mol-llama", "n_tokens": 8}, partial, {}, "folder")
    with pytest.raises(EncoderUnavailableError, match=r"folder/projector.safetensors: Mol-LLaMA's own encoder cannot "
                                                      r"be built: no tensor encoder.Qformer.bert.embeddings"):
        built.blocks(["CCO"])
