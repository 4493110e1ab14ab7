r"""Probe inputs and the layer-wise states they elicit (paper §4.1, Fig. 4).

A probe sample k concatenates a short text prefix per modality with that modality's token block:

.. math::

    \mathbf H^{0,(k)}_{\text{probe}} = [\mathbf H_{\text{text},m_1};\, \mathbf H^{(k)}_{m_1};\,
                                         \mathbf H_{\text{text},m_2};\, \mathbf H^{(k)}_{m_2};\,\dots]

The same embeddings are fed to the base LLM (LoRA disabled) and to every specialist, and the
states of each modality's block are read at the output of every transformer block.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esmerge.elementwise import block_outputs
from esmerge.encoders import MODALITIES, cell_text, encode
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
    """

    embeds: torch.Tensor
    positions: dict[str, torch.Tensor]
    raw: dict[str, list] = field(default_factory=dict)
    template: str = ""

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
            (``encode_blocks``); the dict order is the order in the probe.
        raw: optional raw inputs, kept for display.

    Returns:
        ``Probes`` with ``embeds [K, T, d]`` and each block's positions.
    """
    modalities = list(blocks)
    sizes = {blocks[m].shape[0] for m in modalities}
    if len(sizes) != 1:
        raise ValueError(f"every modality needs the same number K of probe samples, got "
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
    return Probes(torch.cat(parts, dim=1), positions, dict(raw or {}), template)


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
    from esmerge import sources

    molecules = sources.load_chebi20("test").sample(k, random_state=seed)["smiles"].tolist()
    proteins = sources.load_swissprot_go("test").sample(k, random_state=seed)["sequence"].tolist()
    cells = sources.load_ccle_cells()
    if exclude_cells:
        cells = cells[~cells["ccle_name"].isin(exclude_cells)]
    if len(cells) < k:
        raise ValueError(f"only {len(cells)} held-out cell lines for {k} probe samples")
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
        with block_outputs(model) as outputs:
            model(inputs_embeds=probes.embeds[start:start + batch_size], use_cache=False)
        for m, pos in probes.positions.items():
            tokens[m].append(torch.stack([o[:, pos].float().cpu() for o in outputs]))
    tokens = {m: torch.cat(chunks, dim=1) for m, chunks in tokens.items()}
    return {"tokens": tokens, "pooled": {m: t.mean(dim=2) for m, t in tokens.items()}}


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
