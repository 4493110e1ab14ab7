r"""Probe inputs and the layer-wise states they elicit (paper §4.1, Fig. 4).

A probe sample k concatenates a short text prefix per modality with that modality's token block:

.. math::

    \mathbf H^{0,(k)}_{\text{probe}} = [\mathbf H_{\text{text},m_1};\, \mathbf H^{(k)}_{m_1};\,
                                         \mathbf H_{\text{text},m_2};\, \mathbf H^{(k)}_{m_2};\,\dots]

The same embeddings are fed to the base LLM (LoRA disabled) and to every specialist, and the
states of each modality's block are read at the output of every transformer block.

A modality's blocks may differ in length between samples (Prot2Text-V2 emits one token per
residue, plus two): each block then occupies the region of the longest one, the unused slots are
masked out of attention (``Probes.attention_mask``), positions run over real tokens only, and
block statistics skip the masked slots (``Probes.block_mask``). With equal lengths everything
is as before: no mask at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esmerge import sources
from esmerge.element_gradients import block_outputs
from esmerge.encoders import MODALITIES, cell_text, encode
from esmerge.errors import InputError
from esmerge.progress import track

# Fig. 4: a user turn listing each modality by name, followed by its token block.
PROBE_PREFIXES = {"molecule": "Molecule: ", "protein": "Protein: ", "cell": "Cell: "}
PLACEHOLDER = "<|{modality}|>"


@dataclass
class Probes:
    """K probe samples of one shared layout.

    Attributes:
        embeds: ``[K, T, d]`` input embeddings.
        positions: modality -> ``[T_m]`` token positions of its block (same for every sample).
        raw: modality -> the K raw inputs (SMILES, sequences, cell texts).
        template: the prompt with ``<|modality|>`` where each block goes (for display).
        attention_mask: ``[K, T]`` (1 = real token), or ``None`` when every block has one length.
        block_mask: modality -> ``[K, T_m]`` (True = a real token of that sample's block), only
            for modalities whose blocks differ in length.
    """

    embeds: torch.Tensor
    positions: dict[str, torch.Tensor]
    raw: dict[str, list] = field(default_factory=dict)
    template: str = ""
    attention_mask: torch.Tensor | None = None
    block_mask: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return list(self.positions)

    def __len__(self) -> int:
        return self.embeds.shape[0]


def probe_template(tokenizer, modalities=MODALITIES) -> str:
    """The probe prompt (chat-formatted user turn) with one placeholder per modality block."""
    content = "\n".join(PROBE_PREFIXES[m] + PLACEHOLDER.format(modality=m) for m in modalities)
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)


def build_probes(tokenizer, embedding: torch.nn.Embedding, blocks: dict[str, torch.Tensor],
                 raw: dict[str, list] | None = None) -> Probes:
    """Assemble probe inputs from each modality's token blocks.

    Args:
        tokenizer: the LLM's tokenizer (renders the Fig. 4 template and its text pieces).
        embedding: the LLM's input embedding (embeds the text pieces).
        blocks: modality -> ``[K, T_m, d]`` token embeddings from that modality's encoder
            (``encode_blocks``), or a list of K ``[T_mk, d]`` blocks of varying length; the dict
            order is the order in the probe.
        raw: optional raw inputs, kept for display.

    Returns:
        ``Probes`` with ``embeds [K, T, d]`` and each block's positions (and masks, see the
        module docstring, when lengths vary).

    >>> from esmerge.models import byte_tokenizer
    >>> tok = byte_tokenizer(); emb = torch.nn.Embedding(len(tok), 4)
    >>> p = build_probes(tok, emb, {"protein": [torch.ones(2, 4), torch.ones(3, 4)]})
    >>> len(p.positions["protein"]), p.block_mask["protein"].tolist()
    (3, [[True, True, False], [True, True, True]])
    >>> int(p.attention_mask.sum()) == 2 * p.embeds.shape[1] - 1  # one padding slot, in sample 0
    True
    """
    modalities = list(blocks)
    blocks, block_mask = dict(blocks), {}
    for m in modalities:
        if isinstance(blocks[m], (list, tuple)):
            blocks[m], mask = pad_blocks(blocks[m])
            if not bool(mask.all()):
                block_mask[m] = mask
    sizes = {blocks[m].shape[0] for m in modalities}
    if len(sizes) != 1:
        raise InputError(f"every modality needs the same number K of probe samples, got "
                         f"{ {m: blocks[m].shape[0] for m in modalities} }")
    (k,) = sizes
    template = probe_template(tokenizer, modalities)
    pieces, rest = [], template
    for m in modalities:
        before, rest = rest.split(PLACEHOLDER.format(modality=m), 1)
        pieces.append(("text", before))
        pieces.append(("block", m))
    pieces.append(("text", rest))

    parts, positions, cursor = [], {}, 0
    device = embedding.weight.device
    for kind, value in pieces:
        if kind == "text":
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            if not ids:
                continue
            emb = embedding(torch.tensor(ids, device=device)).detach()
            parts.append(emb.unsqueeze(0).expand(k, -1, -1))
        else:
            block = blocks[value].detach().to(device, embedding.weight.dtype)
            positions[value] = torch.arange(cursor, cursor + block.shape[1])
            parts.append(block)
        cursor += parts[-1].shape[1]
    embeds = torch.cat(parts, dim=1)
    if not block_mask:
        return Probes(embeds, positions, dict(raw or {}), template)
    attention = torch.ones(embeds.shape[:2], dtype=torch.long)
    for m, mask in block_mask.items():
        attention[:, positions[m]] = mask.long()
    return Probes(embeds, positions, dict(raw or {}), template, attention, block_mask)


def pad_blocks(blocks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """K blocks ``[T_k, d]`` -> zero-padded ``[K, max T_k, d]`` and the mask ``[K, max T_k]`` of real tokens.

    >>> padded, mask = pad_blocks([torch.ones(1, 2), torch.ones(2, 2)])
    >>> padded.shape, mask.tolist()
    (torch.Size([2, 2, 2]), [[True, False], [True, True]])
    """
    if not blocks:
        raise InputError("no probe blocks given")
    width = max(b.shape[0] for b in blocks)
    padded = blocks[0].new_zeros(len(blocks), width, blocks[0].shape[-1])
    mask = torch.zeros(len(blocks), width, dtype=torch.bool)
    for k, block in enumerate(blocks):
        padded[k, : block.shape[0]] = block
        mask[k, : block.shape[0]] = True
    return padded, mask


def encode_blocks(base, projectors: dict, raw: dict[str, list], n_tokens: dict[str, int]) -> dict[str, torch.Tensor]:
    """Token blocks ``[K, T_m, d]`` of each modality: molecules and proteins through their
    specialist's projector, cells as gene text through the LLM's embedding table."""
    embedding = base.model.get_input_embeddings()
    blocks = {}
    with torch.no_grad():
        for modality, items in raw.items():
            blocks[modality] = encode(modality, items, projector=projectors.get(modality),
                                      tokenizer=base.tokenizer, embedding=embedding,
                                      n_tokens=n_tokens.get(modality, 8))
    return blocks


def probe_entities(k: int = 110, seed: int = 0, top_k_genes: int = 20, exclude_cells: set | None = None) -> dict[str, list]:
    """K raw probe inputs per modality, sampled (seeded) from held-out test sets (paper A.3).

    molecule: ChEBI-20 test SMILES; protein: Swiss-Prot/FAPM test sequences; cell: CCLE cell
    lines as top-``top_k_genes`` gene text. Cells named in ``exclude_cells`` (e.g. the cell
    specialist's training lines) are never used.
    """
    molecules = sources.load_chebi20("test").sample(k, random_state=seed)["smiles"].tolist()
    proteins = sources.load_swissprot_go("test").sample(k, random_state=seed)["sequence"].tolist()
    cells = sources.load_ccle_cells()
    if exclude_cells:
        cells = cells[~cells["ccle_name"].isin(exclude_cells)]
    if len(cells) < k:
        raise InputError(f"only {len(cells)} held-out cell lines for {k} probe samples")
    cells = cells.sample(k, random_state=seed)
    return {
        "molecule": molecules,
        "protein": proteins,
        "cell": [cell_text(genes, top_k_genes) for genes in cells["genes"]],
    }


@torch.no_grad()
def hidden_states(model: torch.nn.Module, probes: Probes, batch_size: int = 16, progress: bool = False) -> dict:
    """Per-layer states of each modality block for one model.

    Reads the output of every transformer block (before the final norm) with forward hooks.

    Returns:
        ``{"tokens": {m: [L, K, T_m, d]}, "pooled": {m: [L, K, d]}}`` (float32, CPU); pooled is
        the mean over the block's tokens (paper §4.2).
    """
    tokens = {m: [] for m in probes.modalities}
    n = len(probes)
    for start in track(range(0, n, batch_size), desc="hidden states", unit="batch", disable=not progress):
        rows = slice(start, start + batch_size)
        extra = {}
        if probes.attention_mask is not None:  # blocks of varying length: skip their padding slots
            mask = probes.attention_mask[rows]
            extra = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        with block_outputs(model) as outputs:
            model(inputs_embeds=probes.embeds[rows], use_cache=False, **extra)
        for m, pos in probes.positions.items():
            tokens[m].append(torch.stack([o[:, pos].float().cpu() for o in outputs]))
    tokens = {m: torch.cat(chunks, dim=1) for m, chunks in tokens.items()}
    return {"tokens": tokens, "pooled": {m: _block_mean(t, probes.block_mask.get(m)) for m, t in tokens.items()}}


def _block_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over a block's tokens ``[L, K, T_m, d] -> [L, K, d]``, over the real ones when ``mask [K, T_m]`` is given."""
    if mask is None:
        return tokens.mean(dim=2)
    weights = mask.to(tokens.dtype)[None, :, :, None]
    return (tokens * weights).sum(dim=2) / weights.sum(dim=2)


def collect_states(peft_model, adapter_names: list[str], probes: Probes, batch_size: int = 16) -> dict:
    """States of the base (all LoRA disabled) and of each named adapter, on the same probes.

    Returns ``{"base": states, name: states, ...}`` with ``states`` as from ``hidden_states``.
    """
    peft_model.eval()
    with peft_model.disable_adapter():
        result = {"base": hidden_states(peft_model, probes, batch_size)}
    for name in track(adapter_names, desc="specialist states", unit="adapter"):
        peft_model.set_adapter(name)
        result[name] = hidden_states(peft_model, probes, batch_size)
    return result
