"""Modality encoders f_m: raw molecule / protein / cell inputs -> token embeddings [K, T_m, d].

Paper §3: an MLLM maps a raw modality input to a block of token embeddings in the LLM's
embedding space. At ``cpu`` scale no pretrained molecular or protein encoder can be installed
offline, so the encoders here are fixed, documented featurisers followed by a trainable MLP
projector (the projector is part of each specialist and is trained with its LoRA):

* molecule: Morgan fingerprint (radius 2, 2048 bits) + 6 RDKit descriptors -> 8 tokens
  (Mol-LLaMA also feeds 8 molecule tokens).
* protein: amino-acid (20) and dipeptide (400) composition + 5 physico-chemical values
  -> 8 tokens. At ``paper`` scale an ESM2 embedding takes the featuriser's place; the projector
  interface (features [K, F] -> tokens [K, T, d]) is the same.
* cell: like Cell-o1, a cell is text: its top-k expressed genes, comma-separated, embedded by
  the LLM's own embedding table and cut to a fixed number of tokens.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from esmerge.errors import InputError

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


def encode(modality: str, raw: list, projector: Projector | None = None, tokenizer=None,
           embedding: nn.Embedding | None = None, n_tokens: int = 8) -> torch.Tensor:
    """Token embeddings ``[K, n_tokens, d]`` of K raw inputs of one modality.

    molecule: ``raw`` is SMILES strings; protein: amino-acid sequences (both need ``projector``).
    cell: ``raw`` is cell texts (``cell_text``); needs ``tokenizer`` and ``embedding``; each text
    is tokenised and cut to its first ``n_tokens`` tokens (an error if a text is shorter).
    """
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
