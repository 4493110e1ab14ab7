"""Batching and two-label scoring: prompts -> ``PromptBatch`` -> ``label_logits`` ``[B, 2]``.

``label_logits`` is the log-likelihood of ``"Final answer: <label>"`` for both labels,
differentiable (AdaMerging minimises the entropy of its softmax). It is the same decision as the
paper's free generation plus parsing (``evaluate.generation``, ``EvalConfig.scoring="generate"``)
for a model that answers in the requested format, and costs one forward pass. Each entity takes as
many placeholder slots as its encoder emits for it (``entity_length``): 8 through a cpu-scale
``Projector``, one per residue + 2 through Prot2Text-V2's ESM-2 (a ``RawEncoder``).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import nn

from esmerge.evaluate.prompts import ANSWER_PREFIX, MARK_RE, Prompt
from esmerge.specialists.encoders import FEATURISERS
from esmerge.specialists.raw_encoder import RawEncoder


@dataclass
class PromptBatch:
    """Prompts ready for ``label_logits``.

    input_ids, attention_mask : ``[B, L]``, left-padded (placeholder positions hold ``pad_id``)
    slots : modality -> ``(row [K], start [K])``; entity k occupies ``start[k] : start[k]+lengths[m][k]``
    features : modality -> ``[K, F]`` featurised entities, in slot order (not for ``RawEncoder`` modalities)
    continuations, continuation_mask : ``[B, 2, C]``, the answer tokens after the shared prefix
    y : ``[B]`` gold labels (-1 when unknown)
    n_tokens : the block length of every entity, or None when each entity has its own (``lengths``)
    shared_len : the first ``shared_len`` tokens are the same in every row (see ``collate``)
    values : modality -> the raw entities in slot order (what a ``RawEncoder`` encodes)
    lengths : modality -> ``[K]`` placeholder slots reserved for each entity's block
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slots: dict[str, tuple[torch.Tensor, torch.Tensor]]
    features: dict[str, torch.Tensor]
    continuations: torch.Tensor
    continuation_mask: torch.Tensor
    y: torch.Tensor
    n_tokens: int | None
    shared_len: int = 0
    values: dict[str, list] = field(default_factory=dict)
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)


def entity_length(projector: nn.Module | None, value, n_tokens: int | None) -> int:
    """Placeholder slots an entity takes: a ``RawEncoder``'s own ``block_length(value)`` (Prot2Text-V2's
    ESM-2: residues + 2), else ``n_tokens``, or, when ``n_tokens`` is None, the projector's ``n_tokens``.

    >>> entity_length(None, "MKT", 8)
    8
    """
    if isinstance(projector, RawEncoder):
        return projector.block_length(value)
    if n_tokens is not None:
        return n_tokens
    if getattr(projector, "n_tokens", None) is None:
        raise ValueError("n_tokens=None asks each entity's projector for its block length, but this entity has none")
    return projector.n_tokens


def common_n_tokens(projectors: dict[str, nn.Module]) -> int | None:
    """The one block length all ``projectors`` emit (8 without projectors), or None when they differ or
    one emits blocks whose length depends on the input (then ``collate`` asks each projector).

    >>> common_n_tokens({}), common_n_tokens({"protein": RawEncoder()})
    (8, None)
    """
    counts = {getattr(p, "n_tokens", 8) for p in projectors.values()}
    if not counts:
        return 8
    return counts.pop() if len(counts) == 1 and None not in counts else None


class FeatureCache:
    """``FEATURISERS[modality]`` rows memoised per entity: every model under test sees the same
    shots, so one cache shared over a sweep fingerprints each molecule once. At most ``limit``
    entities are kept (all are forgotten beyond that)."""

    def __init__(self, limit: int = 50_000):
        self.limit = limit
        self._rows: dict[tuple[str, str], torch.Tensor] = {}

    def __call__(self, modality: str, values: list[str]) -> torch.Tensor:
        """Features of ``values`` in order, ``[K, F]``."""
        todo = sorted({v for v in values if (modality, v) not in self._rows})
        if todo:
            if len(self._rows) > self.limit:
                self._rows.clear()
            for v, row in zip(todo, FEATURISERS[modality][0](todo)):
                self._rows[(modality, v)] = row
        return torch.stack([self._rows[(modality, v)] for v in values])


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_tokens(tokenizer, labels: tuple[str, str]) -> tuple[list[int], list[list[int]]]:
    """Split ``"Final answer: <label>"`` into the token prefix both labels share and the two rests."""
    full = [_tokens(tokenizer, f"{ANSWER_PREFIX} {label}") for label in labels]
    shared = 0
    while shared < min(map(len, full)) and full[0][shared] == full[1][shared]:
        shared += 1
    rests = [ids[shared:] for ids in full]
    if not all(rests):
        raise ValueError(f"labels {labels} tokenise so that one is a prefix of the other; cannot score them")
    return full[0][:shared], rests


def _prompt_layout(prompt: Prompt, tokenizer, n_tokens: int | None, pad_id: int,
                   projectors: dict | None) -> tuple[list[int], list[int], list[int]]:
    ids, starts, lengths = [], [], []
    entities = iter(prompt.entities)
    for i, piece in enumerate(MARK_RE.split(prompt.text)):
        if i % 2 == 0:
            ids += _tokens(tokenizer, piece) if piece else []
        else:
            modality, value = next(entities)
            length = entity_length((projectors or {}).get(modality), value, n_tokens)
            starts.append(len(ids))
            lengths.append(length)
            ids += [pad_id] * length
    shared, _ = answer_tokens(tokenizer, prompt.labels)
    return ids + shared, starts, lengths


def prompt_token_ids(prompt: Prompt, tokenizer, n_tokens: int | None, pad_id: int,
                     projectors: dict | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (answer prefix included) and the start of each entity's block.

    Each entity's block takes ``entity_length(projectors[modality], value, n_tokens)`` slots:
    ``n_tokens`` for every entity without projectors, a ``RawEncoder``'s own length with them.
    """
    ids, starts, _ = _prompt_layout(prompt, tokenizer, n_tokens, pad_id, projectors)
    return ids, starts


def length_batches(lengths: list[int], batch_size: int, seed: int | None = None) -> list[list[int]]:
    """Row indices grouped into batches of at most ``batch_size`` rows of similar length.

    Rows are sorted by length (ties keep their order) and cut in that order, so each batch pads only
    up to its own longest row. With ``seed``, the order of the batches is shuffled by
    ``random.Random(seed)``, for training loops that should not see short prompts first.

    lengths : ``[n]`` tokens per row. Returns batches of indices into ``lengths``, covering each once.

    >>> length_batches([5, 1, 4, 2, 3], 2)
    [[1, 3], [4, 2], [0]]
    >>> sorted(map(sorted, length_batches([5, 1, 4, 2, 3], 2, seed=0)))
    [[0], [1, 3], [2, 4]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches = [order[s: s + batch_size] for s in range(0, len(order), batch_size)]
    if seed is not None:
        random.Random(seed).shuffle(batches)
    return batches


def padded_fraction(lengths: list[int], batches: list[list[int]]) -> float:
    """Share of the tokens in ``batches`` that are padding: each batch is as long as its longest row.

    >>> round(padded_fraction([3, 1, 2, 2], [[0, 1], [2, 3]]), 3)
    0.2
    """
    total = sum(len(b) * max(lengths[i] for i in b) for b in batches if b)
    return 1 - sum(lengths[i] for b in batches for i in b) / total if total else 0.0


MIN_SHARED_PREFIX = 16  # shorter common prefixes are not worth a separate forward pass


def _shared_prefix_length(rows: list[list[int]], starts: list[list[int]]) -> int:
    """Tokens at the start that every row has in common, before any placeholder and leaving each
    row at least one token of its own; 0 for a single row or a short common part."""
    if len(rows) < 2:
        return 0
    limit = min(min(map(len, rows)) - 1, *(s for row in starts for s in row[:1]), 10**9)
    n = 0
    while n < limit and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(prompts: list[Prompt], tokenizer, n_tokens: int | None = 8, features: FeatureCache | None = None,
            projectors: dict[str, nn.Module] | None = None) -> PromptBatch:
    """Pad prompts into a ``PromptBatch``; featurise token entities for the projectors (through
    ``features``, a fresh ``FeatureCache`` when None).

    Every entity's block is ``n_tokens`` long; with ``projectors``, a ``RawEncoder``'s entities get
    its own ``block_length`` (and are kept raw, not featurised), and ``n_tokens=None`` asks every
    projector (``entity_length``). Fixed-size projectors give the same batch as without them.

    Row layout: ``[shared prefix][padding][rest of the prompt]``. The shared prefix (the system
    prompt and instruction, identical across a benchmark's queries) is run once per batch by
    ``label_logits``; with no shared prefix this is plain left padding.
    """
    if not prompts:
        raise ValueError("collate needs at least one prompt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, starts_all, lengths_all = [], [], []
    for p in prompts:
        ids, starts, lengths = _prompt_layout(p, tokenizer, n_tokens, pad_id, projectors)
        rows.append(ids)
        starts_all.append(starts)
        lengths_all.append(lengths)
    shared = _shared_prefix_length(rows, starts_all)
    length = shared + max(len(r) - shared for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    raw: dict[str, list[str]] = {}
    slot_rows: dict[str, list[int]] = {}
    slot_starts: dict[str, list[int]] = {}
    slot_lengths: dict[str, list[int]] = {}
    for b, (ids, starts, lengths, p) in enumerate(zip(rows, starts_all, lengths_all, prompts)):
        offset = length - len(ids)
        input_ids[b, :shared] = torch.tensor(ids[:shared], dtype=torch.long)
        mask[b, :shared] = 1
        input_ids[b, offset + shared:] = torch.tensor(ids[shared:])
        mask[b, offset + shared:] = 1
        for (modality, value), start, size in zip(p.entities, starts, lengths):
            raw.setdefault(modality, []).append(value)
            slot_rows.setdefault(modality, []).append(b)
            slot_starts.setdefault(modality, []).append(offset + start)
            slot_lengths.setdefault(modality, []).append(size)
    conts = [answer_tokens(tokenizer, p.labels)[1] for p in prompts]
    width = max(len(c) for pair in conts for c in pair)
    continuations = torch.full((len(prompts), 2, width), pad_id, dtype=torch.long)
    cmask = torch.zeros((len(prompts), 2, width), dtype=torch.long)
    for b, pair in enumerate(conts):
        for j, c in enumerate(pair):
            continuations[b, j, : len(c)] = torch.tensor(c)
            cmask[b, j, : len(c)] = 1
    featurise = features or FeatureCache()
    encodes_raw = {m for m, p in (projectors or {}).items() if isinstance(p, RawEncoder)}
    features = {m: featurise(m, values) for m, values in raw.items() if m not in encodes_raw}
    slots = {m: (torch.tensor(slot_rows[m]), torch.tensor(slot_starts[m])) for m in raw}
    y = torch.tensor([p.y for p in prompts], dtype=torch.long)
    lengths = {m: torch.tensor(slot_lengths[m]) for m in raw}
    sizes = {size for row in lengths_all for size in row}
    if not sizes:  # no token entities: the length any would have had
        sizes = {n_tokens if n_tokens is not None else common_n_tokens(projectors or {})}
    block = sizes.pop() if len(sizes) == 1 else None  # None: blocks differ
    return PromptBatch(input_ids, mask, slots, features, continuations, cmask, y, block, shared, raw, lengths)


def entity_tokens(batch: PromptBatch, projectors: dict[str, nn.Module]) -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Each modality's token blocks, in slot order: a projector's ``[K, T, d]`` from the batch's
    features, or a ``RawEncoder``'s ``blocks`` of the raw entities (K blocks ``[T_k, d]``)."""
    missing = set(batch.slots) - set(projectors)
    if missing:
        raise ValueError(f"batch has {sorted(missing)} token entities but no projector for them")
    tokens = {}
    for modality in batch.slots:
        proj = projectors[modality]
        if isinstance(proj, RawEncoder):
            tokens[modality] = proj.blocks(batch.values[modality])
        else:
            param = next(proj.parameters())
            tokens[modality] = proj(batch.features[modality].to(param.device, param.dtype))
    return tokens


def splice_embeddings(embeds: torch.Tensor, slots: dict, tokens: dict[str, torch.Tensor | list[torch.Tensor]],
                      lengths: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Replace placeholder positions by modality tokens (out of place, so gradients flow).

    embeds : ``[B, L, d]``; tokens[m] : ``[K_m, T, d]``, or K_m blocks ``[T_k, d]`` of their own
    lengths, placed at ``slots[m] = (row [K_m], start [K_m])``. ``lengths[m]`` ``[K_m]``, when
    given, are the slots reserved per block: a block of another length is refused.
    Returns ``[B, L, d]``.
    """
    for modality, (rows, starts) in slots.items():
        block = tokens[modality]
        if len(block) != len(rows):
            raise ValueError(f"{modality}: {len(block)} token blocks for {len(rows)} placeholder slots")
        sizes = torch.tensor([b.shape[0] for b in block]) if not isinstance(block, torch.Tensor) else None
        reserved = (lengths or {}).get(modality)
        emitted = sizes if sizes is not None else torch.full((len(rows),), block.shape[1])
        if reserved is not None and not torch.equal(emitted, reserved.cpu()):
            k = int((emitted != reserved.cpu()).nonzero()[0])
            raise ValueError(f"{modality} encoder emitted {int(emitted[k])} tokens where {int(reserved[k])} "
                             "were reserved")
        if sizes is None:  # one length for all: [K, T, d]
            k, t, d = block.shape
            r = rows[:, None].expand(k, t).reshape(-1).to(embeds.device)
            c = (starts[:, None] + torch.arange(t)).reshape(-1).to(embeds.device)
            embeds = embeds.index_put((r, c), block.reshape(-1, d).to(embeds.dtype))
            continue
        # Blocks of their own lengths: position j of block k goes to (rows[k], starts[k] + j).
        first = torch.cumsum(sizes, 0) - sizes
        within = torch.arange(int(sizes.sum())) - first.repeat_interleave(sizes)
        r = rows.repeat_interleave(sizes).to(embeds.device)
        c = (starts.repeat_interleave(sizes) + within).to(embeds.device)
        flat = torch.cat([b.to(embeds.device) for b in block]) if len(block) else embeds.new_zeros(0, embeds.shape[-1])
        embeds = embeds.index_put((r, c), flat.to(embeds.dtype))
    return embeds


def label_logits(model: nn.Module, batch: PromptBatch, projectors: dict[str, nn.Module] | None = None) -> torch.Tensor:
    """Total log-likelihood of each label's answer continuation, ``[B, 2]`` (column = class y).

    .. math:: s_{b,j} = \\sum_t \\log p_\\theta(c^{(j)}_t \\mid \\text{prompt}_b, c^{(j)}_{<t})

    The prompt (with the shared ``"Final answer:"`` tokens) is run once; its key/value cache is
    repeated for the two continuations. The prefix common to the batch runs once for all rows.
    Differentiable when grad is enabled. ``projectors`` must cover every modality the batch holds
    as tokens (``entity_tokens``); blocks may differ in length (``PromptBatch.lengths``).
    """
    tokens = entity_tokens(batch, projectors or {})
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    embeds = embedding(ids)
    embeds = splice_embeddings(embeds, batch.slots, tokens, batch.lengths)
    # Padding sits between the shared prefix and each row's own tokens; positions count real
    # tokens only, so a padded prompt sees the same positions as an unpadded one.
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    shared = batch.shared_len
    cache = None
    if shared:
        prefix = model(inputs_embeds=embeds[:1, :shared], position_ids=positions[:1, :shared], use_cache=True,
                       logits_to_keep=1)
        cache = prefix.past_key_values
        cache.batch_repeat_interleave(embeds.shape[0])
    out = model(inputs_embeds=embeds[:, shared:], attention_mask=mask, position_ids=positions[:, shared:],
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    first_logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [B, V]
    b, _, width = batch.continuations.shape
    cont = batch.continuations.to(device).reshape(2 * b, width)
    cmask = batch.continuation_mask.to(device).reshape(2 * b, width)
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)
    full_mask = torch.cat([mask.repeat_interleave(2, dim=0), cmask], dim=1)
    cont_pos = positions[:, -1:].repeat_interleave(2, dim=0) + 1 + torch.arange(width, device=device)
    out2 = model(input_ids=cont, attention_mask=full_mask, position_ids=cont_pos, past_key_values=cache)
    logp = torch.log_softmax(out2.logits[:, :-1].float(), dim=-1)  # predicts cont[:, 1:]
    first = first_logp.repeat_interleave(2, dim=0).gather(1, cont[:, :1]).squeeze(1)
    rest = logp.gather(2, cont[:, 1:, None]).squeeze(2) * cmask[:, 1:]
    return (first + rest.sum(1)).view(b, 2)

