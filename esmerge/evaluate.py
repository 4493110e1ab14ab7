"""Evaluation on the paper's 13 interaction benchmarks (§5.1-5.4, App. A.4-A.5, Tables 9-10).

The pipeline, one function per step:

1. ``retrieve_examples`` -- the 5 in-context examples of App. A.4, from a context pool.
2. ``build_prompt`` -- the system + user messages of Tables 9-10, rendered with the tokenizer's
   chat template. Molecules and proteins are 8-token modality blocks when the evaluated model
   has that modality's projector, text otherwise ("unsupported modalities are represented as
   textual inputs", §5.1); cells are always text (``encoders.cell_text``).
3. ``collate`` -> ``PromptBatch`` -- left-padded token ids, placeholder positions, entity
   features and the two answer continuations.
4. ``label_logits`` -- the log-likelihood of ``"Final answer: <label>"`` for both labels,
   ``[B, 2]``, differentiable (AdaMerging minimises the entropy of its softmax). Free
   generation plus parsing, as in the paper, is replaced by this two-way scoring: it is the
   same decision for a model that answers in the requested format and costs one forward pass.
5. ``evaluate`` -- accuracy and macro-F1 (App. A.5) with seeded bootstrap CIs, per-example
   predictions, cached on disk so an interrupted sweep resumes.
6. ``results_table`` / ``claims`` -- our numbers beside ``paper_results.csv`` and a register of
   the paper's claims checked against ours with paired-bootstrap CIs.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from esmerge.adapters import Adapter
from esmerge.cache import atomic_write_json, tensor_digest
from esmerge.encoders import FEATURISERS, cell_text

REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT_VERSION = 1  # bump when prompts or scoring change, so cached results are recomputed

# --------------------------------------------------------------------------- benchmarks
# Task kind of each benchmark; the kind selects the prompt of Table 9 or 10 and the retrieval rule.
BENCHMARK_KIND = {
    "BindingDB": "mol-prot", "BIOSNAP": "mol-prot", "Human": "mol-prot",
    "DrugComb": "drugcomb", "GDSC2": "gdsc",
    "CYP1A2": "cyp-inh", "CYP2C19": "cyp-inh", "CYP2C9": "cyp-inh", "CYP2D6": "cyp-inh", "CYP3A4": "cyp-inh",
    "CYP2C9-substrate": "cyp-sub", "CYP2D6-substrate": "cyp-sub", "CYP3A4-substrate": "cyp-sub",
}
BENCHMARK_NAMES = tuple(BENCHMARK_KIND)
# Task groups as the paper averages them (Tables 1-3).
GROUPS = {
    "Mol-Prot": ("BindingDB", "BIOSNAP", "Human"),
    "Mol-Cell": ("DrugComb", "GDSC2"),
    "CYP Inh.": ("CYP1A2", "CYP2C19", "CYP2C9", "CYP2D6", "CYP3A4"),
    "CYP Sub.": ("CYP2C9-substrate", "CYP2D6-substrate", "CYP3A4-substrate"),
}
# Our benchmark name -> the dataset name in paper_results.csv.
PAPER_DATASET = {
    **{b: b for b in ("BindingDB", "BIOSNAP", "Human", "DrugComb", "GDSC2")},
    **{b: f"{b} Inh." for b in GROUPS["CYP Inh."]},
    **{b: f"{b.split('-')[0]} Sub." for b in GROUPS["CYP Sub."]},
}
TABLE_GROUPS = {"Table 1": ("Mol-Prot", "Mol-Cell"), "Table 2": ("CYP Inh.", "CYP Sub."),
                "Table 8": tuple(GROUPS)}
MERGING_BASELINES = ("avg", "ties", "emr", "adamerging", "pcb", "consensus", "ls-merge")
SPECIALISTS = ("specialist-molecule", "specialist-protein", "specialist-cell")


@dataclass(frozen=True)
class TaskPrompt:
    """One prompt template of Tables 9-10. ``labels[y]`` is the answer string for class ``y``."""

    system: str
    instruction: str
    labels: tuple[str, str]
    fields: tuple[str, ...]  # entity fields of one example, in order


_DRUG_SYSTEM = ("You are an expert specialized in drug discovery and molecular biology. "
                "You will be given a protein and a molecule. Your task is to determine whether a given molecule ")
TASKS = {
    "mol-prot": TaskPrompt(
        _DRUG_SYSTEM + "interacts with a specific protein.",
        "Determine whether the given molecule interacts with the protein by following the examples.",
        ("Does not interact", "Interacts"), ("protein", "molecule")),
    "cyp-inh": TaskPrompt(
        _DRUG_SYSTEM + "inhibits a specific protein.",
        "Determine whether the given molecule inhibits the protein by following the examples.",
        ("Does not inhibit", "Inhibit"), ("protein", "molecule")),
    "cyp-sub": TaskPrompt(
        _DRUG_SYSTEM + "is a substrate of a specific protein.",
        "Determine whether the given molecule is a substrate of the protein by following the examples.",
        ("Not a substrate", "Substrate"), ("protein", "molecule")),
    "gdsc": TaskPrompt(
        "You are an expert specialized in cancer pharmacogenomics and drug response prediction. "
        "You will be given an anticancer molecule and a cancer cell represented as a list of gene names "
        "ordered by expression, where the most highly expressed genes appear first in descending order. "
        "Your task is to predict whether the molecule will biologically suppress the cancer cell. "
        "If the molecule is expected to suppress/inhibit cancer cell growth or viability, label it "
        "Sensitive, otherwise label it Resistant.",
        "Determine whether the given cell is sensitive or resistant to the given molecule based on the "
        "ranked gene-expression list.",
        ("Resistant", "Sensitive"), ("cell", "molecule")),
    "drugcomb": TaskPrompt(
        "You are an expert specialized in cancer pharmacogenomics and anticancer drug-combination response "
        "prediction. You will be given two anticancer molecules and a cancer cell represented as a ranked "
        "list of gene names (highest expression first). Your task is to predict the binary interaction "
        "outcome in terms of anticancer effect in that cell line.\nLabels:\n"
        "Synergistic - the combination produces a stronger anticancer effect than expected,\n"
        "Antagonistic - the combination produces a weaker anticancer effect than expected.",
        "Predict whether the drug pair is Synergistic or Antagonistic in the given cell line.",
        ("Antagonistic", "Synergistic"), ("cell", "molecule", "molecule2")),
}
_FIELD_TITLE = {"protein": "Protein", "molecule": "Molecule", "molecule2": "Molecule2", "cell": "Cell"}
ANSWER_PREFIX = "Final answer:"


def benchmark_kind(benchmark: str) -> str:
    if benchmark not in BENCHMARK_KIND:
        raise ValueError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARK_NAMES)}")
    return BENCHMARK_KIND[benchmark]


def label_strings(benchmark: str) -> tuple[str, str]:
    """``(label for y=0, label for y=1)`` of a benchmark, as in Tables 9-10."""
    return TASKS[benchmark_kind(benchmark)].labels


# --------------------------------------------------------------------------- retrieval (App. A.4)
def _fingerprint(smiles: str):
    from rdkit import Chem, DataStructs, RDLogger
    from rdkit.Chem import rdFingerprintGenerator

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles) if isinstance(smiles, str) and smiles else None
    if mol is None:  # an unparsable or missing molecule is similar to nothing
        return DataStructs.ExplicitBitVect(2048)
    return rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048).GetFingerprint(mol)


def tanimoto(query: str, pool: list[str]) -> np.ndarray:
    """Tanimoto similarity of Morgan fingerprints (radius 2, 2048 bits), ``[len(pool)]``."""
    from rdkit import DataStructs

    return np.asarray(DataStructs.BulkTanimotoSimilarity(_fingerprint(query), [_fingerprint(s) for s in pool]))


def _text(value) -> str:
    return value if isinstance(value, str) else ""


def _key(value) -> str:
    """An entity as a comparable string; None and NaN (a missing entity) are both ``""``."""
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _gene_set(genes, top: int = 50) -> frozenset:
    return frozenset(list(genes)[:top]) if genes is not None and len(genes) else frozenset()


class ContextIndex:
    """A context pool with the similarity features App. A.4 ranks by, computed once.

    ``pool`` has the columns of ``data.load_benchmark``. Fingerprints, protein features
    (unit-normalised ``encoders.protein_features``, our stand-in for ESM2 embeddings) and
    top-50 gene sets are computed per distinct entity.
    """

    def __init__(self, pool: pd.DataFrame, kind: str):
        from rdkit import DataStructs

        self.pool, self.kind = pool.reset_index(drop=True), kind
        self._bulk = DataStructs.BulkTanimotoSimilarity
        fps: dict[str, object] = {}
        self.mol_fps = [fps.setdefault(s, _fingerprint(s)) for s in self.pool["molecule"].map(_text)]
        self._fps = fps
        if kind == "drugcomb":
            self.mol2_fps = [fps.setdefault(s, _fingerprint(s)) for s in self.pool["molecule2"].map(_text)]
        if kind == "mol-prot":
            from esmerge.encoders import protein_features

            self.proteins = self.pool["protein"].map(_text).tolist()
            distinct = sorted(set(self.proteins))
            feats = protein_features(distinct).double()
            feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
            self._prot_row = {p: i for i, p in enumerate(distinct)}
            self._prot_feats = feats
        if kind in ("gdsc", "drugcomb"):
            self.gene_sets = [_gene_set(g) for g in self.pool["cell_genes"]]

    def _tan(self, smiles: str, fps: list) -> np.ndarray:
        query = self._fps.get(smiles) or _fingerprint(smiles)
        return np.asarray(self._bulk(query, fps))

    def scores(self, query: pd.Series) -> list[np.ndarray]:
        """Sort keys, most important first; larger is better. Each ``[len(pool)]``."""
        tan = self._tan(_text(query["molecule"]), self.mol_fps)
        if self.kind == "drugcomb":
            # Drug order within a pair is arbitrary: take the better of the two alignments.
            q1, q2 = _text(query["molecule"]), _text(query["molecule2"])
            aligned = (tan + self._tan(q2, self.mol2_fps)) / 2
            crossed = (self._tan(q1, self.mol2_fps) + self._tan(q2, self.mol_fps)) / 2
            tan = np.maximum(aligned, crossed)
        if self.kind == "mol-prot":
            protein = _text(query["protein"])
            exact = np.asarray([p == protein for p in self.proteins], dtype=float)
            from esmerge.encoders import protein_features

            q = protein_features([protein]).double()[0] if protein else None
            if q is None:
                cos = np.zeros(len(self.pool))
            else:
                q = q / q.norm().clamp_min(1e-12)
                per_protein = (self._prot_feats @ q).numpy()
                cos = np.asarray([per_protein[self._prot_row[p]] for p in self.proteins])
            return [exact, cos, tan]
        if self.kind in ("gdsc", "drugcomb"):
            q = _gene_set(query["cell_genes"])
            exact = np.asarray([g == q and bool(q) for g in self.gene_sets], dtype=float)
            jac = np.asarray([len(g & q) / len(g | q) if (g or q) else 0.0 for g in self.gene_sets])
            return [exact, jac, tan]
        return [tan]  # CYP: all samples share the enzyme, molecules alone decide

    def _same_entities(self, query: pd.Series) -> np.ndarray:
        """Pool rows showing exactly the query's entities (duplicates across the split would leak the label)."""
        same = np.ones(len(self.pool), dtype=bool)
        for col in ("molecule", "molecule2", "protein", "cell_id"):
            if col in self.pool:
                same &= np.asarray([_key(v) for v in self.pool[col]]) == _key(query.get(col))
        return same


def retrieve_examples(index: ContextIndex, query: pd.Series, k: int = 5) -> list[int]:
    """Positions in ``index.pool`` of the ``k`` in-context examples for ``query`` (App. A.4).

    * mol-prot: pool rows with exactly the query's protein first, ranked by Tanimoto similarity
      of Morgan fingerprints to the query molecule; remaining slots from the most similar proteins
      (cosine of protein features in place of the paper's ESM2 embeddings), Tanimoto breaking ties
      within a protein.
    * mol-cell: rows whose cell has exactly the query's top-50 gene set first, then by Jaccard
      similarity of top-50 gene sets, Tanimoto breaking ties (DrugComb: mean over the two drugs,
      the better of the two pairings).
    * CYP: Tanimoto only.

    Rows with exactly the query's entities are never chosen. Ties left after all keys are broken
    by pool position, so retrieval is deterministic. The paper's Table 9 shows examples in the
    order retrieved (most similar first); so do we.
    """
    keys = index.scores(query)
    allowed = ~index._same_entities(query)
    order = np.lexsort([np.arange(len(index.pool))] + [-key for key in reversed(keys)])
    return [int(i) for i in order if allowed[i]][:k]


# --------------------------------------------------------------------------- prompts (Tables 9-10)
_MARK = "\x00ENTITY{}\x00"
_MARK_RE = re.compile("\x00ENTITY(\\d+)\x00")


@dataclass
class Prompt:
    """A rendered prompt: chat text with entity markers, the token entities, and both answers.

    ``text`` is the chat-template output; each ``_MARK.format(i)`` in it stands for
    ``entities[i] = (modality, raw)``, a block of projector tokens.
    """

    text: str
    entities: list[tuple[str, str]]
    labels: tuple[str, str]
    y: int = -1


@dataclass(frozen=True)
class PromptOptions:
    """How entities are shown. ``token_modalities``: those shown as projector tokens."""

    token_modalities: frozenset = frozenset()
    top_k_genes: int = 8
    protein_chars: int = 40  # a protein shown as text is cut to its first residues
    smiles_chars: int | None = None  # None: full SMILES

    def key(self) -> dict:
        return {"top_k_genes": self.top_k_genes, "protein_chars": self.protein_chars,
                "smiles_chars": self.smiles_chars, "tokens": sorted(self.token_modalities)}


def _entity_text(field_name: str, value, options: PromptOptions) -> str:
    if field_name == "cell":
        return cell_text(list(value), options.top_k_genes)
    if field_name == "protein":
        seq = _text(value)
        return seq if len(seq) <= options.protein_chars else seq[: options.protein_chars] + "..."
    smi = _text(value)
    return smi if options.smiles_chars is None else smi[: options.smiles_chars]


def _render_fields(row: pd.Series, fields: tuple[str, ...], options: PromptOptions,
                   entities: list[tuple[str, str]]) -> str:
    parts = []
    for name in fields:
        column = "cell_genes" if name == "cell" else name
        value = row.get(column)
        if name == "protein" and not _text(value):
            continue  # a benchmark without a protein column (a CYP set without the enzyme sequence)
        modality = "molecule" if name.startswith("molecule") else name
        if modality in options.token_modalities:
            entities.append((modality, _text(value)))
            shown = _MARK.format(len(entities) - 1)
        else:
            shown = _entity_text(name, value, options)
        parts.append(f"{_FIELD_TITLE[name]}: {shown}")
    return " ".join(parts)


def build_prompt(benchmark: str, query: pd.Series, shots: pd.DataFrame, tokenizer,
                 options: PromptOptions = PromptOptions()) -> Prompt:
    """The Table 9/10 prompt for ``query`` with ``shots`` as in-context examples.

    Rendered with ``tokenizer.apply_chat_template`` (system + user, generation prompt on);
    the answer ``"Final answer: <label>"`` is scored separately by ``label_logits``.
    """
    task = TASKS[benchmark_kind(benchmark)]
    entities: list[tuple[str, str]] = []
    lines = [task.instruction, "", "Examples:"]
    for i, (_, shot) in enumerate(shots.iterrows(), start=1):
        label = task.labels[int(shot["y"])]
        lines.append(f"Example {i}: {_render_fields(shot, task.fields, options, entities)} "
                     f"{ANSWER_PREFIX} {label}")
    lines += ["", _render_fields(query, task.fields, options, entities), ""]
    neg, pos = task.labels
    lines.append(f"Your final answer must be exactly one of: '{ANSWER_PREFIX} {pos}' or '{ANSWER_PREFIX} {neg}'.")
    messages = [{"role": "system", "content": task.system}, {"role": "user", "content": "\n".join(lines)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    y = int(query["y"]) if "y" in query and pd.notna(query["y"]) else -1
    return Prompt(text, entities, task.labels, y)


# --------------------------------------------------------------------------- batching
@dataclass
class PromptBatch:
    """Prompts ready for ``label_logits``.

    input_ids, attention_mask : ``[B, L]``, left-padded (placeholder positions hold ``pad_id``)
    slots : modality -> ``(row [K], start [K])``; entity k occupies ``start[k] : start[k]+n_tokens``
    features : modality -> ``[K, F]`` featurised entities, in slot order
    continuations, continuation_mask : ``[B, 2, C]``, the answer tokens after the shared prefix
    y : ``[B]`` gold labels (-1 when unknown)
    shared_len : the first ``shared_len`` tokens are the same in every row (see ``collate``)
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    slots: dict[str, tuple[torch.Tensor, torch.Tensor]]
    features: dict[str, torch.Tensor]
    continuations: torch.Tensor
    continuation_mask: torch.Tensor
    y: torch.Tensor
    n_tokens: int
    shared_len: int = 0


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _answer_tokens(tokenizer, labels: tuple[str, str]) -> tuple[list[int], list[list[int]]]:
    """Split ``"Final answer: <label>"`` into the token prefix both labels share and the two rests."""
    full = [_tokens(tokenizer, f"{ANSWER_PREFIX} {label}") for label in labels]
    shared = 0
    while shared < min(map(len, full)) and full[0][shared] == full[1][shared]:
        shared += 1
    rests = [ids[shared:] for ids in full]
    if not all(rests):
        raise ValueError(f"labels {labels} tokenise so that one is a prefix of the other; cannot score them")
    return full[0][:shared], rests


def prompt_token_ids(prompt: Prompt, tokenizer, n_tokens: int, pad_id: int) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (answer prefix included) and the start of each entity's block."""
    ids, starts = [], []
    pieces = _MARK_RE.split(prompt.text)
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            ids += _tokens(tokenizer, piece) if piece else []
        else:
            starts.append(len(ids))
            ids += [pad_id] * n_tokens
    shared, _ = _answer_tokens(tokenizer, prompt.labels)
    return ids + shared, starts


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


def collate(prompts: list[Prompt], tokenizer, n_tokens: int = 8) -> PromptBatch:
    """Pad prompts into a ``PromptBatch``; featurise token entities for the projectors.

    Row layout: ``[shared prefix][padding][rest of the prompt]``. The shared prefix (the system
    prompt and instruction, identical across a benchmark's queries) is run once per batch by
    ``label_logits``; with no shared prefix this is plain left padding.
    """
    if not prompts:
        raise ValueError("collate needs at least one prompt")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows, starts_all = [], []
    for p in prompts:
        ids, starts = prompt_token_ids(p, tokenizer, n_tokens, pad_id)
        rows.append(ids)
        starts_all.append(starts)
    shared = _shared_prefix_length(rows, starts_all)
    length = shared + max(len(r) - shared for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    raw: dict[str, list[str]] = {}
    slot_rows: dict[str, list[int]] = {}
    slot_starts: dict[str, list[int]] = {}
    for b, (ids, starts, p) in enumerate(zip(rows, starts_all, prompts)):
        offset = length - len(ids)
        input_ids[b, :shared] = torch.tensor(ids[:shared], dtype=torch.long)
        mask[b, :shared] = 1
        input_ids[b, offset + shared:] = torch.tensor(ids[shared:])
        mask[b, offset + shared:] = 1
        for (modality, value), start in zip(p.entities, starts):
            raw.setdefault(modality, []).append(value)
            slot_rows.setdefault(modality, []).append(b)
            slot_starts.setdefault(modality, []).append(offset + start)
    conts = [_answer_tokens(tokenizer, p.labels)[1] for p in prompts]
    width = max(len(c) for pair in conts for c in pair)
    continuations = torch.full((len(prompts), 2, width), pad_id, dtype=torch.long)
    cmask = torch.zeros((len(prompts), 2, width), dtype=torch.long)
    for b, pair in enumerate(conts):
        for j, c in enumerate(pair):
            continuations[b, j, : len(c)] = torch.tensor(c)
            cmask[b, j, : len(c)] = 1
    features = {m: _featurise(m, values) for m, values in raw.items()}
    slots = {m: (torch.tensor(slot_rows[m]), torch.tensor(slot_starts[m])) for m in raw}
    y = torch.tensor([p.y for p in prompts], dtype=torch.long)
    return PromptBatch(input_ids, mask, slots, features, continuations, cmask, y, n_tokens, shared)


_FEATURE_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def _featurise(modality: str, values: list[str]) -> torch.Tensor:
    """``FEATURISERS[modality]`` over ``values`` ``[K, F]``, memoised per entity: every model under
    test sees the same shots, so each molecule is fingerprinted once per session."""
    todo = sorted({v for v in values if (modality, v) not in _FEATURE_CACHE})
    if todo:
        if len(_FEATURE_CACHE) > 50_000:
            _FEATURE_CACHE.clear()
        for v, row in zip(todo, FEATURISERS[modality][0](todo)):
            _FEATURE_CACHE[(modality, v)] = row
    return torch.stack([_FEATURE_CACHE[(modality, v)] for v in values])


def splice_embeddings(embeds: torch.Tensor, slots: dict, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """Replace placeholder positions by modality tokens (out of place, so gradients flow).

    embeds : ``[B, L, d]``; tokens[m] : ``[K_m, T, d]`` placed at ``slots[m] = (row [K_m], start [K_m])``.
    Returns ``[B, L, d]``.
    """
    for modality, (rows, starts) in slots.items():
        block = tokens[modality]
        k, t, d = block.shape
        if k != len(rows):
            raise ValueError(f"{modality}: {k} token blocks for {len(rows)} placeholder slots")
        r = rows[:, None].expand(k, t).reshape(-1).to(embeds.device)
        c = (starts[:, None] + torch.arange(t)).reshape(-1).to(embeds.device)
        embeds = embeds.index_put((r, c), block.reshape(-1, d).to(embeds.dtype))
    return embeds


def label_logits(model: nn.Module, batch: PromptBatch, projectors: dict[str, nn.Module] | None = None) -> torch.Tensor:
    """Total log-likelihood of each label's answer continuation, ``[B, 2]`` (column = class y).

    .. math:: s_{b,j} = \\sum_t \\log p_\\theta(c^{(j)}_t \\mid \\text{prompt}_b, c^{(j)}_{<t})

    The prompt (with the shared ``"Final answer:"`` tokens) is run once; its key/value cache is
    repeated for the two continuations. The prefix common to the batch runs once for all rows. Differentiable when grad is enabled. ``projectors`` must
    cover every modality the batch holds as tokens.
    """
    projectors = projectors or {}
    missing = set(batch.slots) - set(projectors)
    if missing:
        raise ValueError(f"batch has {sorted(missing)} token entities but no projector for them")
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    ids, mask = batch.input_ids.to(device), batch.attention_mask.to(device)
    embeds = embedding(ids)
    tokens = {}
    for modality in batch.slots:
        proj = projectors[modality]
        param = next(proj.parameters())
        tokens[modality] = proj(batch.features[modality].to(param.device, param.dtype))
    embeds = splice_embeddings(embeds, batch.slots, tokens)
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


# --------------------------------------------------------------------------- metrics (App. A.5)
def _confusion(y: np.ndarray, pred: np.ndarray):
    """Per-class TP, FP, FN for classes 0 and 1 along the last axis; arrays ``[..., 2]``."""
    tp = np.stack([((pred == c) & (y == c)).sum(-1) for c in (0, 1)], -1)
    fp = np.stack([((pred == c) & (y != c)).sum(-1) for c in (0, 1)], -1)
    fn = np.stack([((pred != c) & (y == c)).sum(-1) for c in (0, 1)], -1)
    return tp, fp, fn


def accuracy(y, pred) -> float | np.ndarray:
    """Accuracy in percent; works on ``[n]`` or batched ``[R, n]`` arrays."""
    y, pred = np.asarray(y), np.asarray(pred)
    return 100.0 * (y == pred).mean(-1)


def macro_f1(y, pred) -> float | np.ndarray:
    """Macro-F1 over classes {0, 1} in percent (App. A.5); ``[n]`` or batched ``[R, n]``.

    .. math:: \\mathrm{F1}_c = \\frac{2\\,TP_c}{2\\,TP_c + FP_c + FN_c}, \\qquad
              \\text{macro-F1} = \\tfrac12(\\mathrm{F1}_0 + \\mathrm{F1}_1)

    A class absent from both labels and predictions scores 0 (scikit-learn's ``zero_division=0``).
    """
    y, pred = np.asarray(y), np.asarray(pred)
    tp, fp, fn = _confusion(y, pred)
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return 100.0 * f1.mean(-1)


METRICS = {"accuracy": accuracy, "macro_f1": macro_f1}


def auroc(y, margin) -> float:
    """Area under the ROC curve (percent) of ``margin = score[:, 1] - score[:, 0]`` for class 1.

    Not a paper metric: a threshold-free check of whether a model *ranks* examples better than
    chance even when its argmax always picks one label (common for a 135M base). Ties count half
    (Mann-Whitney U). NaN when only one class is present.
    """
    y, margin = np.asarray(y), np.asarray(margin, dtype=float)
    pos, neg = margin[y == 1], margin[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(100.0 * greater / (len(pos) * len(neg)))


def bootstrap_ci(y, pred, metric: str = "accuracy", n_resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of a metric over examples; ``y``, ``pred`` ``[n]``."""
    y, pred = np.asarray(y), np.asarray(pred)
    if len(y) == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n_resamples, len(y)))
    values = METRICS[metric](y[idx], pred[idx])
    alpha = (1 - level) / 2
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1 - alpha))


def paired_bootstrap(runs_a: dict[str, dict], runs_b: dict[str, dict] | None, metric: str = "accuracy",
                     n_resamples: int = 1000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Point estimate and CI of ``mean_b metric(A) - mean_b metric(B)`` over benchmarks ``b``.

    ``runs_*[benchmark]`` are ``evaluate`` results on the same examples; examples are resampled
    jointly for A and B within each benchmark, so the CI reflects the paired design. With
    ``runs_b=None`` it is the CI of A's benchmark average itself (the paper's group "Avg.").
    """
    rng = np.random.default_rng(seed)
    fn = METRICS[metric]
    point, boot = [], []
    for bench, a in runs_a.items():
        ya, pa = np.asarray(a["y"]), np.asarray(a["pred"])
        idx = rng.integers(0, len(ya), size=(n_resamples, len(ya)))
        va, ba = fn(ya, pa), fn(ya[idx], pa[idx])
        if runs_b is not None:
            b = runs_b[bench]
            if list(a["example_ids"]) != list(b["example_ids"]):
                raise ValueError(f"{bench}: the two runs were evaluated on different examples; cannot pair them")
            yb, pb = np.asarray(b["y"]), np.asarray(b["pred"])
            va, ba = va - fn(yb, pb), ba - fn(yb[idx], pb[idx])
        point.append(va)
        boot.append(ba)
    alpha = (1 - level) / 2
    mean_boot = np.mean(boot, axis=0)
    return float(np.mean(point)), float(np.quantile(mean_boot, alpha)), float(np.quantile(mean_boot, 1 - alpha))


# --------------------------------------------------------------------------- models under test
@dataclass
class ModelUnderTest:
    """A base LLM, an optional LoRA adapter and the projectors of the modalities it reads as tokens.

    ``adapter_for_benchmark`` (EMR-Merging) returns a task-specific adapter per benchmark and takes
    precedence over ``adapter``. Use the constructors ``base_only``, ``specialist``, ``merged``, ``emr``.
    """

    name: str
    base: object  # models.BaseModel
    adapter: Adapter | None = None
    projectors: dict[str, nn.Module] = field(default_factory=dict)
    adapter_for_benchmark: Callable[[str], Adapter] | None = None

    @classmethod
    def base_only(cls, base, name: str = "base") -> "ModelUnderTest":
        return cls(name, base)

    @classmethod
    def specialist(cls, base, spec, name: str | None = None) -> "ModelUnderTest":
        """A specialist: its adapter and only its own projector (other modalities as text)."""
        projectors = {spec.modality: spec.projector} if spec.projector is not None else {}
        return cls(name or f"specialist-{spec.modality}", base, spec.adapter, projectors)

    @classmethod
    def merged(cls, base, adapter: Adapter, projectors: dict[str, nn.Module], name: str) -> "ModelUnderTest":
        """A merged model: one adapter and every specialist's projector."""
        return cls(name, base, adapter, {m: p for m, p in projectors.items() if p is not None})

    @classmethod
    def emr(cls, base, adapter_for_benchmark: Callable[[str], Adapter], projectors: dict[str, nn.Module],
            name: str = "emr") -> "ModelUnderTest":
        return cls(name, base, None, {m: p for m, p in projectors.items() if p is not None}, adapter_for_benchmark)

    def adapter_for(self, benchmark: str) -> Adapter | None:
        return self.adapter_for_benchmark(benchmark) if self.adapter_for_benchmark else self.adapter

    def model_id(self, benchmark: str) -> str:
        """Hash of base weights, the adapter used on ``benchmark`` and the projectors."""
        adapter = self.adapter_for(benchmark)
        parts = [self.base.weights_sha256 or self.base.name,
                 tensor_digest(adapter.state) if adapter is not None else "no-adapter"]
        for modality in sorted(self.projectors):
            parts.append(f"{modality}:{tensor_digest(self.projectors[modality].state_dict())}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    @contextmanager
    def model_for(self, benchmark: str):
        """The torch model to score ``benchmark`` with: ``base.model`` itself, or a PEFT copy of it
        with this run's adapter loaded (one copy per base, reused; ``base.model`` is never modified)."""
        adapter = self.adapter_for(benchmark)
        yield self.base.model if adapter is None else _load_into_wrapper(self.base, adapter)


_peft_wrappers: dict[int, tuple[nn.Module, nn.Module]] = {}


def _load_into_wrapper(base, adapter: Adapter) -> nn.Module:
    """Load ``adapter``'s tensors into the one PEFT copy kept per base model (created on first use)."""
    import copy

    from esmerge.adapters import attach, lora_config_of, load_lora_state

    key = id(base.model)
    if key not in _peft_wrappers or _peft_wrappers[key][0] is not base.model:
        # PEFT injects LoRA layers into the module it wraps, hence the copy.
        _peft_wrappers[key] = (base.model, attach(copy.deepcopy(base.model), {"default": adapter}).eval())
        return _peft_wrappers[key][1]
    wrapper = _peft_wrappers[key][1]
    have, want = wrapper.peft_config["default"], lora_config_of(adapter)
    if (have.r, have.lora_alpha, sorted(have.target_modules)) != (want.r, want.lora_alpha, sorted(want.target_modules)):
        raise ValueError(f"adapter {adapter.name!r} has r={want.r}, alpha={want.lora_alpha}, targets="
                         f"{sorted(want.target_modules)}; the evaluation copy holds r={have.r}, "
                         f"alpha={have.lora_alpha}, targets={sorted(have.target_modules)}")
    load_lora_state(wrapper, adapter.state)
    return wrapper


# --------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's numbers (and hence its cache key)."""

    n_eval: int = 64
    n_context: int = 512  # fits the smallest benchmark (CYP2D6 substrate, 663 rows) beside n_eval
    n_shots: int = 3
    seed: int = 0
    top_k_genes: int = 8
    protein_chars: int = 40
    smiles_chars: int | None = None
    batch_size: int = 8
    n_resamples: int = 1000

    def key(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "batch_size"}


# cpu: ~0.24 s (tokens) to ~0.5 s (text) per example on an idle 2-core CPU, i.e. 3-7 min per model
# for 13 x 64 examples; 95 % CI of a per-benchmark accuracy ~ +-12 points at n = 64.
CPU_DEFAULTS = EvalConfig()
SMOKE_DEFAULTS = EvalConfig(n_eval=3, n_context=12, n_shots=1, top_k_genes=3, protein_chars=12,
                            smiles_chars=24, batch_size=3, n_resamples=100)


# At smoke scale one benchmark per group keeps the results chapter under a minute.
SMOKE_BENCHMARKS = ("BindingDB", "GDSC2", "CYP2C9", "CYP2C9-substrate")


def default_benchmarks(scale: str) -> tuple[str, ...]:
    return SMOKE_BENCHMARKS if scale == "smoke" else BENCHMARK_NAMES


def default_config(scale: str) -> EvalConfig:
    return SMOKE_DEFAULTS if scale == "smoke" else CPU_DEFAULTS


def eval_dir(scale: str) -> Path:
    """Default cache of evaluation results: ``runs/{scale}/07_results/evals`` (``$ESMERGE_RUNS_DIR`` honoured)."""
    from esmerge.paths import runs_root

    return runs_root() / scale / "07_results" / "evals"


def evaluate(mut: ModelUnderTest, benchmark: str, config: EvalConfig = CPU_DEFAULTS, *,
             pools: tuple[pd.DataFrame, pd.DataFrame] | None = None, out_dir: Path | None = None,
             progress: bool = True) -> dict:
    """Evaluate ``mut`` on ``benchmark``; cached as JSON under ``out_dir``.

    ``pools = (eval_df, context_df)`` overrides ``data.split_pools(data.load_benchmark(...))``.
    Returns ``{method, benchmark, model_id, accuracy, accuracy_ci, macro_f1, macro_f1_ci, n, seed,
    config, example_ids, y, pred, scores, seconds}`` (metrics in percent, CIs at 95 %).
    """
    import time

    benchmark_kind(benchmark)
    if pools is None:
        from esmerge import benchmarks

        frame = benchmarks.load_benchmark(benchmark)
        pools = benchmarks.split_pools(frame, config.n_eval, config.n_context, config.seed)
    eval_df, context_df = pools
    if len(context_df) < config.n_shots:
        raise ValueError(f"{benchmark}: context pool has {len(context_df)} rows, fewer than n_shots={config.n_shots}")
    options = PromptOptions(frozenset(mut.projectors), config.top_k_genes, config.protein_chars, config.smiles_chars)
    key_parts = [PROMPT_VERSION, mut.model_id(benchmark), benchmark, config.key(), options.key(),
                 _frame_digest(eval_df), _frame_digest(context_df)]
    digest = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = (out_dir or eval_dir(mut.base.scale)) / mut.name / f"{benchmark}-{digest}.json"
    if path.exists():
        return json.loads(path.read_text())

    started = time.time()
    tokenizer = mut.base.tokenizer
    n_tokens = _n_tokens(mut.projectors)
    pool, shot_positions = _retrieved(benchmark, eval_df, context_df, config.n_shots)
    prompts = [build_prompt(benchmark, row, pool.iloc[positions], tokenizer, options)
               for (_, row), positions in zip(eval_df.iterrows(), shot_positions)]
    scores = []
    chunks = range(0, len(prompts), config.batch_size)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"{mut.name} / {benchmark}", leave=False)
    with mut.model_for(benchmark) as model, torch.no_grad():
        for start in chunks:
            batch = collate(prompts[start: start + config.batch_size], tokenizer, n_tokens)
            scores.append(label_logits(model, batch, mut.projectors).float().cpu())
    score = torch.cat(scores).numpy()
    y = eval_df["y"].astype(int).to_numpy()
    pred = score.argmax(1)
    result = {
        "method": mut.name, "benchmark": benchmark, "model_id": mut.model_id(benchmark),
        "n": int(len(y)), "seed": config.seed, "config": config.key(), "options": options.key(),
        "accuracy": float(accuracy(y, pred)),
        "accuracy_ci": list(bootstrap_ci(y, pred, "accuracy", config.n_resamples, config.seed)),
        "macro_f1": float(macro_f1(y, pred)),
        "macro_f1_ci": list(bootstrap_ci(y, pred, "macro_f1", config.n_resamples, config.seed)),
        "auroc": auroc(y, score[:, 1] - score[:, 0]),
        "mean_prompt_tokens": float(np.mean([len(prompt_token_ids(p, tokenizer, n_tokens, 0)[0]) for p in prompts])),
        "seconds": time.time() - started,
        "example_ids": [str(i) for i in eval_df.index], "y": y.tolist(), "pred": pred.tolist(),
        "scores": score.round(4).tolist(),
    }
    atomic_write_json(path, result)
    return result


_RETRIEVAL_CACHE: dict[tuple, tuple[pd.DataFrame, list[list[int]]]] = {}


def _retrieved(benchmark: str, eval_df: pd.DataFrame, context_df: pd.DataFrame, n_shots: int):
    """``(pool, shots per query)``; retrieval does not depend on the model, so it is memoised per
    session for the sweep over models."""
    key = (benchmark, _frame_digest(eval_df), _frame_digest(context_df), n_shots)
    if key not in _RETRIEVAL_CACHE:
        if len(_RETRIEVAL_CACHE) > 64:
            _RETRIEVAL_CACHE.clear()
        index = ContextIndex(context_df, benchmark_kind(benchmark))
        shots = [retrieve_examples(index, row, n_shots) for _, row in eval_df.iterrows()]
        _RETRIEVAL_CACHE[key] = (index.pool, shots)
    return _RETRIEVAL_CACHE[key]


def _n_tokens(projectors: dict[str, nn.Module]) -> int:
    counts = {getattr(p, "n_tokens", 8) for p in projectors.values()}
    if len(counts) > 1:
        raise ValueError(f"projectors emit different numbers of tokens: {sorted(counts)}")
    return counts.pop() if counts else 8


def _frame_digest(frame: pd.DataFrame) -> str:
    cols = [c for c in ("molecule", "molecule2", "protein", "cell_id", "y") if c in frame]
    blob = frame[cols].astype(str).to_csv().encode() + ",".join(map(str, frame.index)).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def evaluate_all(mut: ModelUnderTest, benchmarks: Iterable[str] = BENCHMARK_NAMES,
                 config: EvalConfig = CPU_DEFAULTS, out_dir: Path | None = None,
                 pools: dict[str, tuple[pd.DataFrame, pd.DataFrame]] | None = None) -> dict[str, dict]:
    """``evaluate`` on each benchmark; returns ``{benchmark: result}`` (each cached separately)."""
    return {b: evaluate(mut, b, config, pools=(pools or {}).get(b), out_dir=out_dir) for b in benchmarks}


def summary(results: dict[str, dict[str, dict]]) -> pd.DataFrame:
    """One row per (method, benchmark) from ``{method: {benchmark: result}}``."""
    rows = []
    for method, runs in results.items():
        for bench, r in runs.items():
            rows.append({"method": method, "benchmark": bench, "n": r["n"], "seed": r["seed"],
                         "accuracy": r["accuracy"], "acc_lo": r["accuracy_ci"][0], "acc_hi": r["accuracy_ci"][1],
                         "macro_f1": r["macro_f1"], "f1_lo": r["macro_f1_ci"][0], "f1_hi": r["macro_f1_ci"][1],
                         "auroc": r.get("auroc", np.nan), "predicted_positive": float(np.mean(r["pred"])),
                         "seconds": r["seconds"], "prompt_tokens": r["mean_prompt_tokens"]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- paper comparison
def reference_dir() -> Path:
    return Path(os.environ.get("ESMERGE_REFERENCE_DIR") or REPO_ROOT.parent / "shared" / "reference")


def paper_results() -> pd.DataFrame:
    """The paper's numbers (``paper_results.csv``), read in place and never copied into the repo."""
    path = reference_dir() / "paper_results.csv"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the paper's reference values live beside the repository in "
            "../shared/reference/paper_results.csv (or set ESMERGE_REFERENCE_DIR to its folder)")
    return pd.read_csv(path)


def results_table(results: dict[str, dict[str, dict]], table: str = "Table 1", n_resamples: int = 1000,
                  seed: int = 0) -> pd.DataFrame:
    """Our numbers beside the paper's for Table 1, 2 or 8 (Table 3 = Table 8's "Avg." rows).

    ``results`` is ``{method: {benchmark: evaluate(...) result}}``. Group averages are the mean of
    the per-dataset values, as the paper computes them; their CIs come from ``paired_bootstrap``.
    Returns a long table: ``method, dataset, metric, ours, lo, hi, n, paper, diff``.
    """
    if table == "Table 3":
        out = results_table(results, "Table 8", n_resamples, seed)
        return out[out["dataset"].str.startswith("Avg.")].reset_index(drop=True)
    if table not in TABLE_GROUPS:
        raise ValueError(f"unknown table {table!r}; choose Table 1, 2, 3 or 8")
    paper = paper_results()
    paper = paper[paper["table"] == table]
    metrics = ("accuracy",) if table == "Table 8" else ("accuracy", "macro_f1")
    rows = []
    for method, runs in results.items():
        for group in TABLE_GROUPS[table]:
            benches = [b for b in GROUPS[group] if b in runs]
            for metric in metrics:
                for bench in benches:
                    r = runs[bench]
                    lo, hi = r[f"{metric}_ci"]
                    rows.append({"method": method, "dataset": PAPER_DATASET[bench], "metric": metric,
                                 "ours": r[metric], "lo": lo, "hi": hi, "n": r["n"]})
                if benches:
                    # an average over part of a group is labelled so, and has no paper value beside it
                    name = f"Avg. {group}" + ("" if len(benches) == len(GROUPS[group])
                                              else f" ({len(benches)}/{len(GROUPS[group])} datasets)")
                    point, lo, hi = paired_bootstrap({b: runs[b] for b in benches}, None, metric, n_resamples, seed)
                    rows.append({"method": method, "dataset": name, "metric": metric, "ours": point,
                                 "lo": lo, "hi": hi, "n": sum(runs[b]["n"] for b in benches)})
    out = pd.DataFrame(rows, columns=["method", "dataset", "metric", "ours", "lo", "hi", "n"])
    ref = paper[["method", "dataset", "metric", "value"]].rename(columns={"value": "paper"})
    out = out.merge(ref, on=["method", "dataset", "metric"], how="left")
    out["diff"] = out["ours"] - out["paper"]
    return out


def wide_table(long: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """``results_table`` output as method x dataset cells ``"ours [lo, hi] (paper)"``."""
    part = long[long["metric"] == metric]
    cell = part.apply(lambda r: f"{r.ours:.1f} [{r.lo:.0f}, {r.hi:.0f}]"
                      + (f" ({r.paper:.1f})" if pd.notna(r.paper) else ""), axis=1)
    frame = part.assign(cell=cell).pivot(index="method", columns="dataset", values="cell")
    columns = list(dict.fromkeys(part["dataset"]))
    rows = list(dict.fromkeys(part["method"]))  # the caller's order (base, specialists, merges), not A-Z
    return frame.loc[rows, columns]


@dataclass(frozen=True)
class Claim:
    """A claim of the paper: method ``a`` beats each of ``b`` on the mean accuracy over ``benchmarks``."""

    claim: str
    source: str
    a: str
    b: tuple[str, ...]
    group: str | None  # None: all 13 benchmarks
    table: str
    at_least: bool = False  # ">=": supported unless significantly worse


def _claims_list() -> list[Claim]:
    out = []
    for group, table in (("Mol-Prot", "Table 1"), ("Mol-Cell", "Table 1"), ("CYP Inh.", "Table 2"), ("CYP Sub.", "Table 2")):
        out.append(Claim(f"ES-Merging beats every merging baseline on {group} (avg. accuracy)",
                         "§5.2-5.3", "es", MERGING_BASELINES, group, table))
    out.append(Claim("ES-Merging beats every merging baseline on all 13 benchmarks (avg.)", "§5.2-5.3",
                     "es", MERGING_BASELINES, None, "Table 1+2"))
    out.append(Claim("ES-Merging beats Avg. Merging + FT on Mol-Prot", "§5.2", "es", ("avg-ft",), "Mol-Prot", "Table 1"))
    out.append(Claim("ES-Merging is at least as good as Mol-LLaMA on CYP Sub.", "§5.3", "es",
                     ("specialist-molecule",), "CYP Sub.", "Table 2", at_least=True))
    out.append(Claim("ES-Merging beats the base LLM on all 13 benchmarks (avg.)", "Tables 1-2", "es", ("base",),
                     None, "Table 1+2"))
    out.append(Claim("ES-Merging beats every specialist on all 13 benchmarks (avg.)", "Tables 1-2", "es",
                     SPECIALISTS, None, "Table 1+2"))
    for group in GROUPS:
        out.append(Claim(f"Layer x element >= each alone on {group}", "§5.4, Table 3", "es",
                         ("es-layer", "es-element"), group, "Table 8", at_least=True))
    for group in ("Mol-Prot", "CYP Inh."):
        out.append(Claim(f"ES-Layer alone beats every merging baseline on {group}", "§5.4", "es-layer",
                         MERGING_BASELINES, group, "Table 2" if group.startswith("CYP") else "Table 1"))
    return out


CLAIMS = _claims_list()


def _paper_group_value(paper: pd.DataFrame, method: str, group: str | None, table: str) -> float:
    tables = ("Table 1", "Table 2") if table == "Table 1+2" else (table,)
    if method not in set(paper[paper["table"].isin(tables)]["method"]):
        tables = ("Table 8",)  # the ablation variants appear only there
    sub = paper[(paper["method"] == method) & paper["table"].isin(tables) & (paper["metric"] == "accuracy")]
    if group is None:
        datasets = [PAPER_DATASET[b] for b in BENCHMARK_NAMES]
    else:
        datasets = [f"Avg. {group}"]
    values = sub[sub["dataset"].isin(datasets)]["value"]
    return float(values.mean()) if len(values) == len(datasets) else float("nan")


def claims(results: dict[str, dict[str, dict]], n_resamples: int = 1000, seed: int = 0,
           level: float = 0.95) -> pd.DataFrame:
    """The claims register: each paper claim, the paper's margin, ours with a paired-bootstrap CI.

    For "A beats B" the margin is ``mean accuracy(A) - mean accuracy(B)`` over the group's
    benchmarks, minimised over the B's. Verdict: *supported* when the CI of every margin lies above
    0 (for ">=" claims: when no margin is significantly below 0 and the point margins are >= 0),
    *not supported* when some margin's CI lies below 0 (for "beats": also when the point margin is
    <= 0 and the CI excludes the claimed direction), *inconclusive* otherwise, *inconclusive
    (identical answers)* when every competitor answers exactly as ``a`` on every example (a margin of
    0 with a CI of [0, 0] tests nothing), *not measured* when a method or benchmark is missing.
    """
    paper = paper_results()
    rows = []
    for c in CLAIMS:
        benches = list(BENCHMARK_NAMES) if c.group is None else list(GROUPS[c.group])
        paper_a = _paper_group_value(paper, c.a, c.group, c.table)
        paper_b = {b: _paper_group_value(paper, b, c.group, c.table) for b in c.b}
        paper_margin = paper_a - max(paper_b.values()) if paper_b else float("nan")
        all_benches = benches
        benches = [x for x in benches if x in results.get(c.a, {})]
        have = [m for m in (c.a, *c.b) if m in results and benches and all(x in results[m] for x in benches)]
        row = {"claim": c.claim, "source": c.source, "paper": round(paper_margin, 1),
               "datasets": f"{len(benches)}/{len(all_benches)}"}
        if c.a not in have or not any(b in have for b in c.b):
            rows.append({**row, "ours": np.nan, "lo": np.nan, "hi": np.nan, "n_compared": 0,
                         "verdict": "not measured", "detail": f"missing: {sorted(set((c.a, *c.b)) - set(have))}"})
            continue
        margins = {b: paired_bootstrap({x: results[c.a][x] for x in benches}, {x: results[b][x] for x in benches},
                                       "accuracy", n_resamples, seed, level) for b in c.b if b in have}
        worst = min(margins, key=lambda b: margins[b][0])
        point, lo, hi = margins[worst]
        # Two models that give the same answer on every example (e.g. both always answer the
        # majority label) have a margin of exactly 0 with a CI of [0, 0]: that tests nothing.
        identical = [b for b in margins if all(results[c.a][x]["pred"] == results[b][x]["pred"] for x in benches)]
        if len(identical) == len(margins):
            verdict = "inconclusive (identical answers)"
        elif c.at_least:
            verdict = ("not supported" if any(m[2] < 0 for m in margins.values())
                       else "supported" if all(m[0] >= 0 for m in margins.values()) else "inconclusive")
        else:
            verdict = ("supported" if all(m[1] > 0 for m in margins.values())
                       else "not supported" if any(m[2] < 0 for m in margins.values()) else "inconclusive")
        if len(margins) < len(c.b) or len(benches) < len(all_benches):
            verdict += " (partial)"
        detail = "; ".join(f"vs {b}: {m[0]:+.1f} [{m[1]:+.1f}, {m[2]:+.1f}]" + (" (identical answers)" if b in identical else "")
                           for b, m in margins.items())
        rows.append({**row, "ours": round(point, 1), "lo": round(lo, 1), "hi": round(hi, 1),
                     "n_compared": len(margins), "verdict": verdict, "detail": detail})
    return pd.DataFrame(rows)


def mechanism_claims(last_block_shift: pd.DataFrame, own_vs_other: pd.DataFrame,
                     projection_stability: pd.DataFrame, merged_distances: pd.DataFrame) -> pd.DataFrame:
    """The paper's claims about representations (Figs. 1, 2, 8 and Table 7), checked on the tables
    the probe, layer-wise and element-wise chapters save.

    Inputs (one seed, so verdicts are descriptive, without CIs):

    * ``last_block_shift``: rows specialists, columns token modalities; mean last-block distance
      between base and specialist tokens (``03_probe``). Fig. 1: each specialist moves its own
      modality's tokens furthest.
    * ``own_vs_other``: columns ``specialist``, ``layers where own > other``, ``of layers``,
      ``mean own / other`` (``04_layerwise``). Fig. 2: own-modality SWD exceeds other-modality SWD
      at most blocks and on average.
    * ``projection_stability``: columns ``projections``, ``mean std of alpha over seeds``
      (``04_layerwise``). Table 7: more projections, steadier coefficients (strictly falling).
    * ``merged_distances``: rows token modalities, columns specialists; distance from the ES-merged
      model (``05_elementwise``). Fig. 8: on each modality the merged model is nearest the
      matching specialist.

    Returns ``claim, source, evidence, verdict`` with verdict ``holds`` or ``does not hold``.
    """
    rows = []

    def add(claim, source, evidence, holds):
        rows.append({"claim": claim, "source": source, "evidence": evidence,
                     "verdict": "holds" if holds else "does not hold"})

    for name, row in last_block_shift.iterrows():
        if name in row.index:
            furthest = row.idxmax()
            add(f"the {name} specialist moves {name} tokens furthest from the base (last block)", "Fig. 1",
                ", ".join(f"{m} {v:.3g}" for m, v in row.items()), furthest == name)
    for row in own_vs_other.itertuples(index=False):
        spec, above, total, ratio = row[0], row[1], row[2], row[3]
        add(f"{spec} specialist: SWD on {spec} tokens exceeds SWD on other tokens", "Fig. 2",
            f"{above}/{total} blocks, mean ratio {ratio:.2f}", above > total / 2 and ratio > 1)
    ordered = projection_stability.sort_values("projections")
    spread = ordered["mean std of alpha over seeds"].to_numpy()
    add("more random projections give steadier layer coefficients", "Table 7",
        ", ".join(f"{p}: {v:.3f}" for p, v in zip(ordered["projections"], spread)),
        bool(len(spread) > 1 and np.all(np.diff(spread) < 0)))
    for modality, row in merged_distances.iterrows():
        if modality in row.index:
            add(f"on {modality} tokens the ES-merged model is nearest the {modality} specialist", "Fig. 8",
                "nearest: " + row.idxmin() + "; " + ", ".join(f"{m} {v:.3g}" for m, v in row.items()),
                row.idxmin() == modality)
    return pd.DataFrame(rows, columns=["claim", "source", "evidence", "verdict"])


# --------------------------------------------------------------------------- cost (Table 4)
def cost_table(method_dirs: dict[str, Path]) -> pd.DataFrame:
    """Each merged method's recorded cost (``esmerge.json`` ``info``) beside the paper's Table 4.

    Keys of ``info`` that mention flops, wall time, seconds or steps are reported as recorded,
    with the merge's total ``wall_seconds``.
    """
    paper = paper_results()
    paper = paper[paper["table"] == "Table 4"].set_index("method")["value"]
    rows = []
    for method, folder in method_dirs.items():
        meta_file = Path(folder) / "esmerge.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
        flat = _flatten(meta.get("info", {}))
        cost = {k: v for k, v in flat.items() if re.search(r"flop|wall|second|time|step|backward|forward", k, re.I)
                and isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append({"method": method, "wall_seconds": meta.get("wall_seconds", np.nan), **cost,
                     "paper_total_flops": paper.get(method, np.nan)})
    return pd.DataFrame(rows)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out
