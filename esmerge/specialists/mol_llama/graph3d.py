"""Uni-Mol's 3D encoder (transformer with a pair representation), in plain torch.

Follows Mol-LLaMA's ``models/unimol/unimol.py`` (``SimpleUniMolModel``) and
``transformer_encoder_with_pair.py``, with Uni-Core's ``TransformerEncoderLayer`` and
``SelfMultiheadAttention``:

* each atom pair's distance is scaled and shifted by a per-pair-type ``mul``/``bias``, expanded on K
  Gaussian kernels (learned means, |std|), and mapped by a 2-layer GELU head to one attention bias per
  head: the initial pair representation ``[B, H, T, T]``;
* the tokens are embedded, layer-normed and zeroed at padding; padded keys get bias -inf;
* each pre-LN layer's attention logits (scaled q.k plus the incoming bias) become the next layer's
  bias (the pair representation is updated by every layer), then a GELU feed-forward; a final
  LayerNorm ends the encoder. Eval mode: no dropout, as upstream freezes this encoder.

The output is every token's state (``[CLS]``, the atoms, ``[SEP]``) and a mask that is True off padding.
Submodule names keep upstream's state-dict keys (``embed_tokens.weight``, ``gbf.means.weight``,
``gbf_proj.linear1.weight``, ``encoder.layers.0.self_attn.in_proj.weight``, ...).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

GAUSSIAN_KERNELS = 128
# Uni-Mol's Gaussian normaliser uses pi rounded to 3.14159; kept so the bias matches its weights exactly.
_SQRT_2PI = (2 * 3.14159) ** 0.5


class GaussianPairKernel(nn.Module):
    """``gbf`` upstream: distances ``[B, T, T]`` and pair types -> kernel features ``[B, T, T, K]``."""

    def __init__(self, kernels: int, pair_types: int):
        super().__init__()
        self.means, self.stds = nn.Embedding(1, kernels), nn.Embedding(1, kernels)
        self.mul, self.bias = nn.Embedding(pair_types, 1), nn.Embedding(pair_types, 1)

    def forward(self, distance: torch.Tensor, pair_type: torch.Tensor) -> torch.Tensor:
        x = self.mul(pair_type).squeeze(-1) * distance + self.bias(pair_type).squeeze(-1)
        mean = self.means.weight.view(-1)
        std = self.stds.weight.view(-1).abs() + 1e-5
        return torch.exp(-0.5 * ((x[..., None] - mean) / std) ** 2) / (_SQRT_2PI * std)


class PairHead(nn.Module):
    """``gbf_proj`` upstream: ``Linear(K, K) -> GELU -> Linear(K, H)``."""

    def __init__(self, kernels: int, heads: int):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(kernels, kernels), nn.Linear(kernels, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(F.gelu(self.linear1(x)))


class PairAttention(nn.Module):
    """``self_attn`` upstream: multi-head self-attention whose logits get an additive pair bias."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[B, T, D]``, bias ``[B, H, T, T]`` -> (output ``[B, T, D]``, logits ``[B, H, T, T]``)."""
        b, t, d = x.shape
        q, k, v = (part.view(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for part in self.in_proj(x).chunk(3, dim=-1))
        logits = (q * (d // self.heads) ** -0.5) @ k.transpose(-1, -2) + bias
        out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(out), logits


class PairEncoderLayer(nn.Module):
    """Uni-Core's pre-LN ``TransformerEncoderLayer`` (attention returns its logits as the next bias)."""

    def __init__(self, dim: int, ffn_dim: int, heads: int):
        super().__init__()
        self.self_attn = PairAttention(dim, heads)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, ffn_dim), nn.Linear(ffn_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        attended, bias = self.self_attn(self.self_attn_layer_norm(x), bias)
        x = x + attended
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x)))), bias


class PairEncoder(nn.Module):
    """``TransformerEncoderWithPair`` upstream, as Mol-LLaMA builds it (pre-LN, no final pair norm)."""

    def __init__(self, layers: int, dim: int, ffn_dim: int, heads: int):
        super().__init__()
        self.emb_layer_norm, self.final_layer_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.layers = nn.ModuleList(PairEncoderLayer(dim, ffn_dim, heads) for _ in range(layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.emb_layer_norm(x) * (~padding)[..., None].to(x.dtype)
        bias = bias.masked_fill(padding[:, None, None, :], -math.inf)
        for layer in self.layers:
            x, bias = layer(x, bias)
        return self.final_layer_norm(x)


class UniMolGraph(nn.Module):
    """3D encoder: padded Uni-Mol inputs -> ``([B, T, D], mask [B, T] bool)`` (mask False at padding)."""

    def __init__(self, vocab: int, layers: int = 15, dim: int = 512, ffn_dim: int = 2048, heads: int = 64,
                 padding_idx: int = 0, kernels: int = GAUSSIAN_KERNELS):
        super().__init__()
        self.padding_idx = padding_idx
        self.embed_tokens = nn.Embedding(vocab, dim, padding_idx)
        self.encoder = PairEncoder(layers, dim, ffn_dim, heads)
        self.gbf_proj = PairHead(kernels, heads)
        self.gbf = GaussianPairKernel(kernels, vocab * vocab)
        self.num_features = dim

    def forward(self, tokens: torch.Tensor, distance: torch.Tensor, edge_type: torch.Tensor):
        """tokens ``[B, T]``, distance ``[B, T, T]`` float, edge_type ``[B, T, T]`` int."""
        padding = tokens.eq(self.padding_idx)
        kernel = self.gbf(distance.to(self.gbf.means.weight.dtype), edge_type)
        bias = self.gbf_proj(kernel).permute(0, 3, 1, 2)  # [B, H, T, T]: one bias map per head
        return self.encoder(self.embed_tokens(tokens), bias, padding), ~padding


def collate(samples: list[dict[str, torch.Tensor]], padding_idx: int) -> dict[str, torch.Tensor]:
    """Pad K ``featurize.unimol_inputs`` to the longest: ``tokens [K, T]`` (``padding_idx``), distances and
    pair types ``[K, T, T]`` (0), as upstream's ``Mol3DCollater`` (its rounding of T up to a multiple of 8
    only adds masked positions, which change nothing)."""
    width = max(int(s["tokens"].shape[0]) for s in samples)
    tokens = torch.full((len(samples), width), padding_idx, dtype=torch.long)
    distance = torch.zeros(len(samples), width, width)
    edge_type = torch.zeros(len(samples), width, width, dtype=torch.long)
    for k, s in enumerate(samples):
        n = int(s["tokens"].shape[0])
        tokens[k, :n], distance[k, :n, :n], edge_type[k, :n, :n] = s["tokens"], s["distance"], s["edge_type"]
    return {"tokens": tokens, "distance": distance, "edge_type": edge_type}
