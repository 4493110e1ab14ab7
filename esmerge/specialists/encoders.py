"""Modality encoders f_m: raw molecule / protein / cell inputs -> token embeddings [K, T_m, d].

Paper §3: an MLLM maps a raw modality input to a block of token embeddings in the LLM's
embedding space. At ``cpu`` scale no pretrained molecular or protein encoder can be installed
offline, so the encoders here are fixed, documented featurisers followed by a trainable MLP
projector (the projector is part of each specialist and is trained with its LoRA):

* molecule: Morgan fingerprint (radius 2, 2048 bits) + 6 RDKit descriptors -> 8 tokens
  (Mol-LLaMA also feeds 8 molecule tokens).
* protein: amino-acid (20) and dipeptide (400) composition + 5 physico-chemical values
  -> 8 tokens.
* cell: like Cell-o1, a cell is text: its top-k expressed genes, comma-separated, embedded by
  the LLM's own embedding table and cut to a fixed number of tokens.

At ``paper`` scale each converted specialist brings its own encoder, built from its card's
``encoder`` entry by ``build_encoder`` behind one interface, ``RawEncoder.blocks(raw)`` -> K
token blocks: Prot2Text-V2's ESM-2 (transformers ``EsmModel``) + adapter, one token per residue
plus two, so blocks differ in length (``n_tokens`` None); Mol-LLaMA's own encoder (``mol_llama``:
MoleculeSTM 2D + Uni-Mol 3D + blending + Q-Former, 8 tokens), resolved from the card's ``encoder.kind``
(where its weights cannot be had, ``UnavailableEncoder`` refuses to encode in one line).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from esmerge.errors import InputError
from esmerge.specialists.raw_encoder import RawEncoder, UnavailableEncoder

MODALITIES = ("molecule", "protein", "cell")
AMINO_ACIDS = "ACDEFGHIKLMNPQRSTVWY"
MORGAN_BITS = 2048
MOLECULE_FEATURES = MORGAN_BITS + 6
PROTEIN_FEATURES = 20 + 400 + 5
# Kyte-Doolittle hydropathy, used for the protein's mean hydrophobicity.
_HYDROPATHY = dict(zip(AMINO_ACIDS, [1.8, 2.5, -3.5, -3.5, 2.8, -0.4, -3.2, 4.5, -3.9, 3.8,
                                     1.9, -3.5, -1.6, -3.5, -4.5, -0.8, -0.7, 4.2, -0.9, -1.3]))


def molecule_features(smiles: list[str]) -> torch.Tensor:
    """Morgan fingerprint + descriptors. Returns ``[K, 2054]`` float32.

    Raises ``ValueError`` naming the first SMILES RDKit cannot parse (loaders drop those first).
    """
    from rdkit import Chem, RDLogger
    from rdkit.Chem import Descriptors, rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    generator = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=MORGAN_BITS)
    rows = []
    for smi in smiles:
        mol = Chem.MolFromSmiles(smi)
        if mol is None:
            raise InputError(f"invalid SMILES: {smi!r}")
        bits = generator.GetFingerprintAsNumPy(mol).astype(np.float32)
        # Descriptors are log/linearly squashed to O(1) so they do not dominate the bits.
        desc = [
            math.log1p(Descriptors.MolWt(mol)) / 7.0,
            Descriptors.MolLogP(mol) / 5.0,
            math.log1p(Descriptors.TPSA(mol)) / 6.0,
            Descriptors.NumHDonors(mol) / 5.0,
            Descriptors.NumHAcceptors(mol) / 10.0,
            Descriptors.RingCount(mol) / 5.0,
        ]
        rows.append(np.concatenate([bits, np.asarray(desc, np.float32)]))
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, MOLECULE_FEATURES)


def protein_features(sequences: list[str]) -> torch.Tensor:
    """Amino-acid + dipeptide composition and a physico-chemical profile. Returns ``[K, 425]``.

    Non-standard residues (X, U, B, Z, O) are skipped in the compositions.
    """
    index = {aa: i for i, aa in enumerate(AMINO_ACIDS)}
    rows = []
    for seq in sequences:
        seq = seq.upper()
        ids = [index[a] for a in seq if a in index]
        if not ids:
            raise InputError(f"protein sequence has no standard amino acid: {seq[:30]!r}")
        ids_arr = np.asarray(ids)
        aa = np.bincount(ids_arr, minlength=20).astype(np.float32) / len(ids)
        di = np.bincount(ids_arr[:-1] * 20 + ids_arr[1:], minlength=400).astype(np.float32)
        di /= max(len(ids) - 1, 1)
        charge = (aa[index["K"]] + aa[index["R"]] - aa[index["D"]] - aa[index["E"]])
        hydro = float(np.mean([_HYDROPATHY[AMINO_ACIDS[i]] for i in ids])) / 4.5
        aromatic = aa[index["F"]] + aa[index["W"]] + aa[index["Y"]]
        profile = np.asarray([math.log(len(ids)) / 8.0, charge, hydro, aromatic, aa[index["C"]]], np.float32)
        # Compositions are scaled so a typical entry is O(1) like the fingerprint bits.
        rows.append(np.concatenate([aa * 20.0, di * 400.0 / 20.0, profile]))
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, PROTEIN_FEATURES)


def cell_text(genes: list[str], top_k: int) -> str:
    """A cell as Cell-o1 writes it: its top-k genes by expression, comma-separated."""
    return ", ".join(genes[:top_k])


class Projector(nn.Module):
    """Two-layer MLP from features ``[K, F]`` to ``n_tokens`` embeddings ``[K, n_tokens, d]``.

    The output passes through a LayerNorm and is scaled to ``embed_scale`` (the RMS of the
    LLM's token embeddings) so projected tokens enter the LLM at the norm of real tokens.
    """

    def __init__(self, in_features: int, hidden_size: int, n_tokens: int = 8,
                 width: int = 512, embed_scale: float = 1.0):
        super().__init__()
        self.n_tokens, self.hidden_size = n_tokens, hidden_size
        self.net = nn.Sequential(
            nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, n_tokens * hidden_size)
        )
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False)
        self.register_buffer("embed_scale", torch.tensor(float(embed_scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.net(features).view(features.shape[0], self.n_tokens, self.hidden_size)
        return self.norm(out) * self.embed_scale


FEATURISERS = {"molecule": (molecule_features, MOLECULE_FEATURES), "protein": (protein_features, PROTEIN_FEATURES)}


def make_projector(modality: str, embedding: nn.Embedding, n_tokens: int = 8, seed: int = 0) -> Projector:
    """A fresh projector for ``modality`` sized to the LLM whose input embedding is given."""
    if modality not in FEATURISERS:
        raise InputError(f"{modality!r} has no projector (cells are text); choose one of {sorted(FEATURISERS)}")
    torch.manual_seed(seed)
    scale = embedding.weight.detach().float().pow(2).mean().sqrt().item()
    return Projector(FEATURISERS[modality][1], embedding.weight.shape[1], n_tokens, embed_scale=scale)


def encode(modality: str, raw: list, projector: "Projector | RawEncoder | None" = None, tokenizer=None,
           embedding: nn.Embedding | None = None, n_tokens: int = 8) -> torch.Tensor | list[torch.Tensor]:
    """Token embeddings ``[K, n_tokens, d]`` of K raw inputs of one modality.

    With a ``RawEncoder`` (paper scale) its ``blocks(raw)``: K blocks ``[T_k, d]`` that may differ in length.

    molecule: ``raw`` is SMILES strings; protein: amino-acid sequences (both need ``projector``).
    cell: ``raw`` is cell texts (``cell_text``); needs ``tokenizer`` and ``embedding``; each text
    is tokenised and cut to its first ``n_tokens`` tokens (an error if a text is shorter).
    """
    if isinstance(projector, RawEncoder):  # paper scale: the encoder takes raw inputs, blocks may vary in length
        return projector.blocks(list(raw))
    if modality in FEATURISERS:
        if projector is None:
            raise InputError(f"encoding {modality} needs its specialist's projector")
        featurise = FEATURISERS[modality][0]
        param = next(projector.parameters())
        return projector(featurise(list(raw)).to(param.device, param.dtype))
    if modality == "cell":
        if tokenizer is None or embedding is None:
            raise InputError("encoding cells needs the LLM's tokenizer and input embedding")
        ids = []
        for text in raw:
            tok = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(tok) < n_tokens:
                raise InputError(f"cell text has {len(tok)} tokens, fewer than n_tokens={n_tokens}: {text[:40]!r}")
            ids.append(tok[:n_tokens])
        ids_t = torch.tensor(ids, device=embedding.weight.device)
        return embedding(ids_t)
    raise InputError(f"unknown modality {modality!r}; choose one of {MODALITIES}")


# ESM-2's alphabet (fair-esm ``Alphabet.from_architecture("ESM-1b")``, as in facebook/esm2_* vocab.txt):
# 4 specials, 25 residue letters, 4 more specials. Built in code so no tokenizer file is needed.
ESM_VOCAB = ("<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO", ".", "-", "<null_1>", "<mask>")
# Prot2Text-V2 crops proteins to 1021 residues when it trains (its dataset's max_sequence_length), one
# under ESM-2's 1022 + BOS + EOS positions: reading longer proteins than the model saw gains nothing.
ESM_MAX_RESIDUES = 1021


def esm_token_ids(sequence: str, max_residues: int = ESM_MAX_RESIDUES) -> list[int]:
    """``<cls>`` + one id per residue (unknown letters -> ``<unk>``, cut to ``max_residues``) + ``<eos>``.

    >>> esm_token_ids("MKX?")
    [0, 20, 15, 24, 3, 2]
    """
    index = {tok: i for i, tok in enumerate(ESM_VOCAB)}
    residues = [index.get(a, index["<unk>"]) for a in sequence.upper()[:max_residues]]
    return [index["<cls>"], *residues, index["<eos>"]]


class Prot2TextEncoder(RawEncoder):
    """Prot2Text-V2's protein encoder: ESM-2 (transformers ``EsmModel``, no pooler) -> 2-layer GELU
    adapter (``fc1``, ``fc2``) -> L2-normalised tokens, one per residue plus BOS and EOS.

    ``blocks(sequences)`` returns K tensors ``[len_k + 2, d]`` (``n_tokens`` is None).
    """

    def __init__(self, esm_config: dict, input_dim: int, intermediate_dim: int, output_dim: int,
                 max_residues: int = ESM_MAX_RESIDUES):
        from transformers import EsmConfig, EsmModel

        super().__init__()
        config = EsmConfig(**{k: v for k, v in esm_config.items()
                              if k not in ("architectures", "transformers_version")})
        self.esm_encoder = EsmModel(config, add_pooling_layer=False)
        self.adapter = nn.ModuleDict({"fc1": nn.Linear(input_dim, intermediate_dim),
                                      "fc2": nn.Linear(intermediate_dim, output_dim)})
        self.max_residues = max_residues
        self.pad_id = ESM_VOCAB.index("<pad>")

    def block_length(self, item: str) -> int:
        return len(esm_token_ids(item, self.max_residues))

    def blocks(self, raw: list, batch_size: int = 8) -> list[torch.Tensor]:
        param = next(self.parameters())
        out = []
        for start in range(0, len(raw), batch_size):
            ids = [esm_token_ids(s, self.max_residues) for s in raw[start:start + batch_size]]
            width = max(map(len, ids))
            input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for k, row in enumerate(ids):
                input_ids[k, : len(row)], mask[k, : len(row)] = torch.tensor(row), 1
            states = self.esm_encoder(input_ids=input_ids.to(param.device), attention_mask=mask.to(param.device))[0]
            hidden = nn.functional.gelu(self.adapter["fc1"](states))
            tokens = nn.functional.normalize(nn.functional.gelu(self.adapter["fc2"](hidden)), p=2, dim=-1)
            out += [tokens[k, : len(row)] for k, row in enumerate(ids)]
        return out


def _mol_llama_encoder(entry: dict, projector: dict, encoder: dict, folder) -> RawEncoder:
    """Mol-LLaMA's own encoder (``mol_llama.encoder.from_card``: MoleculeSTM + Uni-Mol + blending + Q-Former).

    What truly cannot be built here (trained tensors missing, graph-encoder weights neither in the folder
    nor resolvable from the hub) becomes an ``UnavailableEncoder``: the specialist still loads and merges
    (its LoRA), and encoding a molecule refuses with the one-line reason and what to do.
    """
    from esmerge.specialists.mol_llama.encoder import from_card

    try:
        return from_card(entry, projector, encoder, folder)
    except InputError as err:
        hint = "; or merge with a method that needs no probe (e.g. --method avg)"
        return UnavailableEncoder(projector | encoder, entry.get("n_tokens", 8), str(err) + hint)


def _prot2text_encoder(entry: dict, projector: dict, encoder: dict, folder) -> RawEncoder:
    esm_config, adapter = entry.get("esm_config"), entry.get("adapter_config") or {}
    if not esm_config:
        raise InputError(f"{folder}/card.json: encoder.esm_config is missing; "
                         "reconvert with `esmerge convert prot2text`")
    module = Prot2TextEncoder(esm_config, adapter["input_dim"], adapter["intermediate_dim"], adapter["output_dim"])
    # ln1/ln2 are in the checkpoint but unused by Prot2Text-V2's forward (deprecated there).
    state = {k: v for k, v in encoder.items() if k.startswith("esm_encoder.")}
    state |= {k: v for k, v in projector.items() if k.startswith(("adapter.fc1.", "adapter.fc2."))}
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise InputError(f"{folder}: protein encoder tensors do not fit (missing {missing[:2]}, "
                         f"unexpected {unexpected[:2]}); reconvert with `esmerge convert prot2text`")
    dtype = next((v.dtype for k, v in encoder.items() if not k.endswith("inv_freq")), torch.float32)
    module = module.to(dtype)
    # Rotary frequencies stay float32 as upstream keeps them: in bf16 they round, and so do positions past 256
    # (the converter stores them float32; ESM's rotary casts its output back to the query's dtype).
    for name, _ in list(module.named_buffers()):
        if name.endswith("rotary_embeddings.inv_freq"):
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            owner.inv_freq = state[name].float() if name in state else owner.inv_freq.float()
    return module


ENCODER_BUILDERS = {"mol-llama": _mol_llama_encoder, "prot2text": _prot2text_encoder}


def register_encoder(kind: str, builder) -> None:
    """Use ``builder(entry, projector_tensors, encoder_tensors, folder) -> RawEncoder`` for cards whose
    ``encoder.kind`` is ``kind`` (the built-in kinds need no registration; this replaces or adds one)."""
    ENCODER_BUILDERS[kind] = builder


def build_encoder(entry: dict, projector: dict[str, torch.Tensor], encoder: dict[str, torch.Tensor],
                  folder) -> RawEncoder:
    """The modality encoder a converted specialist's ``card.json`` describes under ``encoder``."""
    builder = ENCODER_BUILDERS.get(entry.get("kind"))
    if builder is None:
        raise InputError(f"{folder}/card.json: unknown encoder kind {entry.get('kind')!r}; "
                         f"known: {', '.join(sorted(ENCODER_BUILDERS))}")
    return builder(entry, projector, encoder, folder).eval().requires_grad_(False)
