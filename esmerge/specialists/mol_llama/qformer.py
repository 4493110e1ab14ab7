"""Mol-LLaMA's blending module and the query path of its Q-Former, in plain torch.

Blending (``models/blending_module/blending_module.py``): each encoder's node states go through its
own ``Linear`` to the blending width and are zeroed at padding; then each of L blocks runs, with
pre-LN residual attention units (``x = q + MHA(ln_q(q), ln_k(k), ln_v(v)); x = x + MLP(ln(x))``,
GELU MLP of width 4D, padded keys masked, outputs re-zeroed at padding): 2D self, 3D self, 2D
attending to 3D, then 3D attending to the new 2D. The result is the 2D tokens followed by the 3D ones.

Q-Former (BLIP-2's BERT with cross-attention, ``models/qformer/modeling_bert.py``, SciBERT-sized at
paper scale), as Mol-LLaMA runs it for the LLM: only the learned query tokens pass through (no
text), so each layer is post-LN BERT self-attention over the queries, cross-attention to the blended
graph tokens on layers ``i % cross_attention_freq == 0`` (padded graph tokens masked), and the
query feed-forward (``intermediate_query`` GELU, ``output_query``). Mol-LLaMA drops the text-only
parts (word/position embeddings, ``intermediate``/``output``, the LM head) before training its LLM.

Submodule names keep upstream's keys (``blending_module.cross_attn_blocks.0.self_attn_block_2D.attn.in_proj_weight``,
``Qformer.bert.encoder.layer.0.crossattention.self.key.weight``, ...).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                         key_mask: torch.Tensor | None) -> torch.Tensor:
    """Scaled dot-product attention of projected ``q [B, Tq, D]`` over ``k, v [B, Tk, D]``; ``key_mask``
    ``[B, Tk]`` True where a key may be attended. Returns ``[B, Tq, D]`` (heads concatenated)."""
    b, tq, d = q.shape
    split = [x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2) for x in (q, k, v)]
    logits = split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads)
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return (logits.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, tq, d)


class PackedAttention(nn.Module):
    """``torch.nn.MultiheadAttention``'s parameters (``in_proj_weight [3D, D]``, ``out_proj``), batch first."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q, k, v, key_mask):
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        out = multi_head_attention(F.linear(q, wq, bq), F.linear(k, wk, bk), F.linear(v, wv, bv), self.heads, key_mask)
        return self.out_proj(out)


class ResidualAttentionUnit(nn.Module):
    """``ResidualAttentionBlock`` upstream: pre-LN attention of ``q`` over ``(k, v)`` plus a GELU MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.attn = PackedAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.ln_q, self.ln_k, self.ln_v, self.ln = (nn.LayerNorm(dim) for _ in range(4))

    def forward(self, q, k, v, key_mask):
        x = q + self.attn(self.ln_q(q), self.ln_k(k), self.ln_v(v), key_mask)
        return x + self.mlp(self.ln(x))


class BlendingBlock(nn.Module):
    """``CrossAttentionBlock`` upstream: 2D self, 3D self, 2D<-3D, 3D<-2D, each re-zeroed at padding."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.self_attn_block_2D = ResidualAttentionUnit(dim, heads)
        self.self_attn_block_3D = ResidualAttentionUnit(dim, heads)
        self.cross_attn_block_2Dto3D = ResidualAttentionUnit(dim, heads)
        self.cross_attn_block_3Dto2D = ResidualAttentionUnit(dim, heads)

    def forward(self, x2, x3, m2, m3):
        keep2, keep3 = m2[..., None].to(x2.dtype), m3[..., None].to(x3.dtype)
        x2 = self.self_attn_block_2D(x2, x2, x2, m2) * keep2
        x3 = self.self_attn_block_3D(x3, x3, x3, m3) * keep3
        # upstream's names read "3D to 2D" for the 2D tokens attending to the 3D ones, and vice versa
        x2 = self.cross_attn_block_3Dto2D(x2, x3, x3, m3) * keep2
        x3 = self.cross_attn_block_2Dto3D(x3, x2, x2, m2) * keep3
        return x2, x3


class BlendingModule(nn.Module):
    """2D ``[B, N2, d2]`` + 3D ``[B, N3, d3]`` node states -> ``([B, N2 + N3, D], mask [B, N2 + N3])``."""

    def __init__(self, dim: int, heads: int, layers: int, dims: dict[str, int]):
        super().__init__()
        self.cross_attn_blocks = nn.ModuleList(BlendingBlock(dim, heads) for _ in range(layers))
        self.mlp = nn.ModuleDict({name: nn.Sequential(nn.Linear(width, dim)) for name, width in dims.items()})

    def forward(self, x2, m2, x3, m3):
        x2 = self.mlp["moleculestm"](x2) * m2[..., None].to(x2.dtype)
        x3 = self.mlp["unimol"](x3) * m3[..., None].to(x3.dtype)
        for block in self.cross_attn_blocks:
            x2, x3 = block(x2, x3, m2, m3)
        return torch.cat([x2, x3], dim=1), torch.cat([m2, m3], dim=1)


class BertAttentionPart(nn.Module):
    """BERT attention with its output sub-layer: ``LayerNorm(x + dense(MHA(x -> context)))`` (post-LN)."""

    def __init__(self, dim: int, heads: int, context_dim: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query = nn.Linear(dim, dim)
        self.self.key, self.self.value = nn.Linear(context_dim, dim), nn.Linear(context_dim, dim)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(dim, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x, context, key_mask=None):
        s = self.self
        attended = multi_head_attention(s.query(x), s.key(context), s.value(context), self.heads, key_mask)
        return self.output.LayerNorm(x + self.output.dense(attended))


class BertFeedForward(nn.Module):
    """``intermediate_query`` + ``output_query``: ``LayerNorm(x + W2 GELU(W1 x))``."""

    def __init__(self, dim: int, hidden: int, eps: float):
        super().__init__()
        self.intermediate_query, self.output_query = nn.Module(), nn.Module()
        self.intermediate_query.dense = nn.Linear(dim, hidden)
        self.output_query.dense, self.output_query.LayerNorm = nn.Linear(hidden, dim), nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.output_query.LayerNorm(x + self.output_query.dense(F.gelu(self.intermediate_query.dense(x))))


class QFormerLayer(BertFeedForward):
    def __init__(self, dim: int, heads: int, hidden: int, context_dim: int, cross: bool, eps: float):
        super().__init__(dim, hidden, eps)
        self.attention = BertAttentionPart(dim, heads, dim, eps)
        self.crossattention = BertAttentionPart(dim, heads, context_dim, eps) if cross else None

    def forward(self, x, context, context_mask):
        x = self.attention(x, x)
        if self.crossattention is not None:
            x = self.crossattention(x, context, context_mask)
        return super().forward(x)


class QFormer(nn.Module):
    """Query path of the Q-Former: ``query [B, Q, D]`` over ``context [B, N, C]`` -> ``[B, Q, D]``.

    Its state dict is upstream's ``Qformer.*`` less the parts Mol-LLaMA removes: ``bert.embeddings.LayerNorm``,
    ``bert.encoder.layer.{i}.{attention,crossattention,intermediate_query,output_query}.*``.
    """

    def __init__(self, dim: int, layers: int, heads: int, hidden: int, context_dim: int,
                 cross_layers: set[int], eps: float = 1e-12):
        super().__init__()
        self.bert = nn.Module()
        self.bert.embeddings = nn.Module()
        self.bert.embeddings.LayerNorm = nn.LayerNorm(dim, eps=eps)
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleList(
            QFormerLayer(dim, heads, hidden, context_dim, i in cross_layers, eps) for i in range(layers))

    def forward(self, query, context, context_mask):
        x = self.bert.embeddings.LayerNorm(query)
        for layer in self.bert.encoder.layer:
            x = layer(x, context, context_mask)
        return x
