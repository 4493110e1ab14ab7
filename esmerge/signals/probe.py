r"""Probe inputs and the layer-wise states they elicit (paper §4.1, Fig. 4).

A probe sample k concatenates a short text prefix per modality with that modality's token block:

.. math::

    \mathbf H^{0,(k)}_{\text{probe}} = [\mathbf H_{\text{text},m_1};\, \mathbf H^{(k)}_{m_1};\,
                                         \mathbf H_{\text{text},m_2};\, \mathbf H^{(k)}_{m_2};\,\dots]

The same embeddings are fed to the base LLM (LoRA disabled) and to every specialist, and the
states of each modality's block are read at the output of every transformer block
(``esmerge.signals.probe_states``).

A modality's blocks may differ in length between samples (Prot2Text-V2 emits one token per
residue, plus two): each block then occupies the region of the longest one, the unused slots are
masked out of attention (``Probes.attention_mask``), positions run over real tokens only, and
block statistics skip the masked slots (``Probes.block_mask``). With equal lengths everything
is as before: no mask at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from esmerge.data import sources
from esmerge.errors import InputError
from esmerge.specialists.encoders import MODALITIES, cell_text, encode

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
    """The probe prompt of paper Fig. 4, with one placeholder per modality block (§4.1).

    One user turn in the tokenizer's chat format: a line per modality, its name as a text prefix
    (``PROBE_PREFIXES``) followed by ``<|modality|>`` where its token block goes.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The LLM's tokenizer; it must have a chat template.
    modalities : sequence of str
        The modalities, in probe order.

    Returns
    -------
    str
        The rendered prompt.

    Examples
    --------
    >>> from esmerge.specialists.base_llm import byte_tokenizer
    >>> probe_template(byte_tokenizer(), ["molecule", "cell"])
    '<|im_start|>user\\nMolecule: <|molecule|>\\nCell: <|cell|><|im_end|>\\n'
    """
    content = "\n".join(PROBE_PREFIXES[m] + PLACEHOLDER.format(modality=m) for m in modalities)
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False)


def build_probes(tokenizer, embedding: torch.nn.Embedding, blocks: dict[str, torch.Tensor],
                 raw: dict[str, list] | None = None) -> Probes:
    r"""Assemble the probe inputs :math:`\mathbf H^{0,(k)}_{\text{probe}}` from each modality's token blocks (§4.1).

    The text pieces of the Fig. 4 template are embedded and placed around the token blocks, so
    every sample k reads ``[text; block of m_1; text; block of m_2; ...]``.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The LLM's tokenizer (renders the Fig. 4 template and its text pieces).
    embedding : torch.nn.Embedding
        The LLM's input embedding (embeds the text pieces).
    blocks : dict of str to Tensor, shape ``[K, T_m, d]``
        Modality -> token embeddings from that modality's encoder (``encode_blocks``), or a list
        of K ``[T_mk, d]`` blocks of varying length; the dict order is the order in the probe.
    raw : dict of str to list, optional
        Raw inputs, kept for display.

    Returns
    -------
    Probes
        ``embeds [K, T, d]`` and each block's positions ``[T_m]`` (and masks, see the module
        docstring, when lengths vary).

    Examples
    --------
    Blocks of 2 and 3 tokens share a region of 3 slots; sample 0 has one padding slot:

    >>> from esmerge.specialists.base_llm import byte_tokenizer
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
    """Zero-pad K token blocks of varying length to one length, with the mask of real tokens.

    Parameters
    ----------
    blocks : list of Tensor, shape ``[T_k, d]``
        K blocks of one modality.

    Returns
    -------
    padded : Tensor, shape ``[K, max T_k, d]``
        The blocks, zero after each one's end.
    mask : Tensor, shape ``[K, max T_k]``
        Bool, True on real tokens.

    Examples
    --------
    >>> padded, mask = pad_blocks([torch.ones(1, 2), torch.ones(2, 2)])
    >>> padded.shape, mask.tolist()
    (torch.Size([2, 2, 2]), [[True, False], [True, True]])
    >>> padded[0].tolist()
    [[1.0, 1.0], [0.0, 0.0]]
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
    r"""Token blocks :math:`\mathbf H^{(k)}_{m_i} = f_{m_i}(\mathbf x^{(k)}_{m_i})` of each modality (§4.1).

    Molecules and proteins go through their specialist's projector; cells are gene text, put
    through the LLM's own embedding table. Runs without gradients.

    Parameters
    ----------
    base : BaseModel
        Its ``model.get_input_embeddings()`` and ``tokenizer`` are used.
    projectors : dict of str to torch.nn.Module
        Modality -> projector (or raw encoder) of that specialist; cells need none.
    raw : dict of str to list
        Modality -> K raw inputs (``probe_entities``).
    n_tokens : dict of str to int
        Modality -> tokens per block (default 8).

    Returns
    -------
    dict of str to Tensor, shape ``[K, T_m, d]``
        Modality -> token blocks (a list of ``[T_k, d]`` blocks for a raw encoder whose blocks
        vary in length).

    Examples
    --------
    Cells need only the tokenizer and the embedding; each text keeps its first 2 tokens:

    >>> import types
    >>> from esmerge.specialists.base_llm import byte_tokenizer
    >>> tok = byte_tokenizer(); emb = torch.nn.Embedding(len(tok), 3)
    >>> base = types.SimpleNamespace(tokenizer=tok, model=types.SimpleNamespace(get_input_embeddings=lambda: emb))
    >>> blocks = encode_blocks(base, {}, {"cell": ["CD3E, CD2", "IL7R, LTB"]}, {"cell": 2})
    >>> blocks["cell"].shape
    torch.Size([2, 2, 3])
    >>> torch.equal(blocks["cell"][0], emb(torch.tensor(tok("CD")["input_ids"])))
    True
    """
    embedding = base.model.get_input_embeddings()
    blocks = {}
    with torch.no_grad():
        for modality, items in raw.items():
            blocks[modality] = encode(modality, items, projector=projectors.get(modality),
                                      tokenizer=base.tokenizer, embedding=embedding,
                                      n_tokens=n_tokens.get(modality, 8))
    return blocks


def probe_entities(k: int = 110, seed: int = 0, top_k_genes: int = 20,
                   exclude_cells: set | None = None) -> dict[str, list]:
    r"""Sample K raw probe inputs per modality from held-out test sets (§4.1, paper A.3).

    These are the :math:`\{\mathbf x^{(k)}_{m_i}\}_{k=1}^K` of §4.1. molecule: ChEBI-20 test
    SMILES; protein: Swiss-Prot/FAPM test sequences; cell: CCLE cell lines as top-``top_k_genes``
    gene text. Cells named in ``exclude_cells`` (e.g. the cell specialist's training lines) are
    never used.

    Parameters
    ----------
    k : int
        K, samples per modality (paper: 110).
    seed : int
        Seed of the sampling (pandas ``random_state``).
    top_k_genes : int
        Genes per cell text.
    exclude_cells : set of str, optional
        CCLE names never sampled.

    Returns
    -------
    dict of str to list of str
        ``{"molecule": K SMILES, "protein": K sequences, "cell": K gene texts}``.

    Raises
    ------
    InputError
        If fewer than K cell lines are left.

    Notes
    -----
    No doctest: this reads the downloaded test sets. Their loaders are tested in
    ``tests/test_data.py``; ``tests/test_es_pipeline.py`` replaces this function with fixed
    entities to run the whole pipeline.
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
