"""The three modality specialists: frozen base LLM + modality projector + LoRA (paper §3, §5.1).

ES-Merging merges MLLMs that share one base LLM and one LoRA configuration. The paper's
specialists (Mol-LLaMA, Prot2Text-V2, Cell-o1 on LLaMA-3.1-8B) cannot be run here, so at
``cpu`` scale we train our own three on SmolLM2-135M-Instruct, each in minutes on a CPU:

* molecule: 8 projector tokens from ``encoders.molecule_features`` (SMILES), trained to write
  the ChEBI-20 description of the molecule.
* protein: 8 projector tokens from ``encoders.protein_features`` (sequence), trained to write
  the Swiss-Prot GO-term description of the protein (FAPM).
* cell: no projector; like Cell-o1 a cell is text, its top-k genes comma-separated, trained to
  name the cell type (PBMC68k) or the cell line's primary site and histology (CCLE).

A training example is a chat-templated user turn with the modality's token block spliced in as
``inputs_embeds`` (``H^0 = [H_text; H_m; ...]``, paper §3), followed by the answer; the loss is
the mean next-token cross-entropy over the answer tokens only. Only the LoRA (``models.lora_config``,
identical for all three so that they merge element-wise, Eq. 1) and the projector are trained.

A specialist on disk is a standard PEFT adapter directory plus ``projector.safetensors`` and
``card.json`` (data, exclusions, steps, loss curve, seed, base weights hash, timings).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from esmerge import encoders
from esmerge import adapters as adapter_io
from esmerge.adapters import Adapter, adapter_from_model, load_adapter, save_adapter
from esmerge.cache import atomic_torch_save, atomic_write_json, cache_dir, content_key, file_sha256
from esmerge.models import BaseModel, lora_config

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DIR = REPO_ROOT / "data_manifest" / "specialists"
SHIPPED_MANIFEST = REPO_ROOT / "data_manifest" / "specialists.yaml"
MODALITIES = encoders.MODALITIES
N_TOKENS = 8  # Mol-LLaMA feeds 8 molecule tokens; we use the same block size for proteins.
# Top-k genes per cell: k=50 in the paper (Cell-o1); 20 keeps a cell prompt under ~128 tokens
# with SmolLM2's tokenizer (gene symbols take ~4.5 tokens each), 5 at smoke scale (byte tokens).
CELL_TOP_K = {"smoke": 5, "cpu": 12, "paper": 50}
# Fixed seed of the cell hold-out split: it must not move with the training seed, so that the
# probe and evaluation can rely on one set of held-out cells.
HOLDOUT_SEED = 20240601
HOLDOUT_FRACTION = 0.2
SHIPPED_FILES = ("adapter_config.json", "adapter_model.safetensors", "projector.safetensors", "card.json")
# Training recipe of the tiny specialists ``load_specialists("smoke", ...)`` trains on the fly.
SMOKE_RECIPE = {"steps": 30, "batch_size": 4, "lr": 5e-3, "seed": 0, "max_tokens": 128}
CODE_VERSION = 1  # bump when a change to this module changes what training produces

MODALITY_LABEL = {"molecule": "Molecule", "protein": "Protein"}
INSTRUCTION = {
    "molecule": "Describe this molecule.",
    "protein": "Describe the function of this protein.",
    "cell_type": "Top expressed genes of a cell: {genes}. Which cell type is it?",
    "cell_line": "Top expressed genes of a cancer cell line: {genes}. Its primary site and histology?",
}
SLOT = "<|modality_tokens|>"
# Longest sequence per modality at cpu scale: a cell prompt of 12 genes runs to ~135 tokens.
MAX_TOKENS = {"molecule": 128, "protein": 128, "cell": 160}


class SpecialistError(RuntimeError):
    """A specialist cannot be trained, loaded or verified; the message says why and what to do."""


@dataclass(frozen=True)
class Example:
    """One caption example: a prompt (with an optional modality slot) and its answer.

    ``raw`` is the SMILES / amino-acid sequence the projector encodes into the slot's
    ``N_TOKENS`` embeddings; ``None`` for cells, whose genes are already in ``instruction``.
    """

    modality: str
    instruction: str
    answer: str
    raw: str | None = None
    uid: str = ""


@dataclass
class Specialist:
    modality: str  # "molecule" | "protein" | "cell"
    adapter: Adapter
    projector: encoders.Projector | None  # None for cell
    card: dict  # data, steps, loss curve, seed, base weights hash, timings, exclusions


# --------------------------------------------------------------------------- examples
def molecule_example(smiles: str, description: str, uid: str = "") -> Example:
    return Example("molecule", INSTRUCTION["molecule"], description.strip(), smiles, uid)


def protein_example(sequence: str, description: str, uid: str = "") -> Example:
    return Example("protein", INSTRUCTION["protein"], description.strip(), sequence, uid)


def cell_type_example(genes: list[str], cell_type: str, top_k: int, uid: str = "") -> Example:
    text = encoders.cell_text(list(genes), top_k)
    return Example("cell", INSTRUCTION["cell_type"].format(genes=text), f"{cell_type}.", None, uid)


def cell_line_example(genes: list[str], site: str, histology: str, top_k: int, uid: str = "") -> Example:
    text = encoders.cell_text(list(genes), top_k)
    # CCLE writes annotations as snake_case identifiers ("haematopoietic_and_lymphoid_tissue").
    site, histology = (str(x).replace("_", " ") for x in (site, histology))
    answer = f"Primary site: {site}. Histology: {histology}."
    return Example("cell", INSTRUCTION["cell_line"].format(genes=text), answer, None, uid)


# Hand-made examples (no file needed) for the ``smoke`` scale and for tests. Descriptions are
# short because the smoke base model reads bytes.
SMOKE_DATA = {
    "molecule": [
        ("CCO", "A primary alcohol: ethanol."),
        ("CC(=O)O", "A simple monocarboxylic acid."),
        ("c1ccccc1", "An aromatic hydrocarbon ring."),
        ("CC(=O)Oc1ccccc1C(=O)O", "An aspirin: a benzoic acid ester."),
        ("OCC1OC(O)C(O)C(O)C1O", "A hexose sugar, glucose."),
        ("Cn1cnc2c1c(=O)n(C)c(=O)n2C", "A purine alkaloid: caffeine."),
        ("NCC(=O)O", "The simplest amino acid."),
        ("CCCCCCCCCCCCCCCC(=O)O", "A long-chain fatty acid."),
    ],
    "protein": [
        ("FVNQHLCGSHLVEALYLVCGERGFFYTPKT", "hormone activity; glucose homeostasis"),
        ("MQIFVKTLTGKTITLEVEPSDTIENVKAKIQDKEGIPPDQQRLIFAGKQLEDG", "protein tag; proteasome"),
        ("MVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHF", "oxygen carrier activity"),
        ("GIGAVLKVLTTGLPALISWIKRKRQQ", "antimicrobial; membrane disruption"),
        ("MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQ", "DNA binding"),
        ("MALWMRLLPLLALLALWGPDPAAAFVNQHLCGSHLVEALYLVCGERG", "insulin receptor binding"),
        ("MSKGEELFTGVVPILVELDGDVNGHKFSVSGEGEGDATYGKLTLKFICTTGKLPVPWPTLVTTF", "fluorescence"),
        ("MEEPQSDPSVEPPLSQETFSDLWKLLPENNVLSPLPSQAMDDLMLSPDDIEQWFTEDPGP", "apoptosis; p53 binding"),
    ],
    "cell": [
        (["CD3D", "CD3E", "IL7R", "LTB", "CCR7", "MAL", "LEF1", "TCF7"], "CD4+ T cell"),
        (["CD14", "LYZ", "S100A8", "S100A9", "FCN1", "CST3", "VCAN", "CD68"], "CD14+ Monocyte"),
        (["MS4A1", "CD79A", "CD79B", "CD19", "BANK1", "IGHM", "HLA-DRA", "CD74"], "B cell"),
        (["NKG7", "GNLY", "GZMB", "PRF1", "KLRD1", "FGFBP2", "CTSW", "CST7"], "NK cell"),
        (["PPBP", "PF4", "GP9", "ITGA2B", "TUBB1", "SPARC", "CLU", "GNG11"], "Megakaryocyte"),
        (["FCGR3A", "MS4A7", "LST1", "AIF1", "IFITM2", "RHOC", "CDKN1C", "HES4"], "CD16+ Monocyte"),
        (["CD8A", "CD8B", "GZMK", "CCL5", "CD3D", "NKG7", "CST7", "GZMH"], "CD8+ T cell"),
        (["FCER1A", "CST3", "CLEC10A", "CD1C", "HLA-DQA1", "HLA-DPB1", "ENHO", "PLD4"], "Dendritic cell"),
    ],
}


def smoke_examples(modality: str) -> list[Example]:
    """The hand-made examples of ``SMOKE_DATA`` as ``Example`` objects."""
    rows = SMOKE_DATA[_check_modality(modality)]
    if modality == "molecule":
        return [molecule_example(s, d, f"smoke-mol-{i}") for i, (s, d) in enumerate(rows)]
    if modality == "protein":
        return [protein_example(s, d, f"smoke-prot-{i}") for i, (s, d) in enumerate(rows)]
    return [cell_type_example(g, t, CELL_TOP_K["smoke"], f"smoke-cell-{i}") for i, (g, t) in enumerate(rows)]


def _check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    return modality


def _split_mask(n: int, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED) -> list[bool]:
    """``True`` for the rows held out: a fixed seeded ``fraction`` of ``n`` rows."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[: round(n * fraction)])
    return [i in held for i in range(n)]


def benchmark_entities() -> dict:
    """Molecules (canonical SMILES), protein sequences and CCLE lines that any benchmark uses.

    Read with ``esmerge.data.load_benchmark`` for every benchmark in ``esmerge.data.BENCHMARKS``
    and cached (keyed by the data manifest), since RDKit canonicalisation takes a while.
    """
    from esmerge import benchmarks, data

    key = content_key(file_sha256(data.MANIFEST), sorted(benchmarks.BENCHMARKS), CODE_VERSION)
    path = cache_dir() / "specialists" / f"benchmark-entities-{key}.json"
    if path.exists():
        found = json.loads(path.read_text())
    else:
        molecules, proteins, cells = set(), set(), set()
        for name in benchmarks.BENCHMARKS:
            df = benchmarks.load_benchmark(name)
            for column in ("molecule", "molecule2"):
                molecules |= {s for s in df[column].dropna()}
            proteins |= set(df["protein"].dropna())
            cells |= set(df["cell_id"].dropna())
        found = {"molecule": sorted({c for c in map(_canonical, molecules) if c}), "protein": sorted(proteins),
                 "cell": sorted(cells), "checked": sorted(benchmarks.BENCHMARKS)}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found))
    return {k: (set(v) if k != "checked" else v) for k, v in found.items()}


def _canonical(smiles: str) -> str | None:
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def load_examples(modality: str, split: str, scale: str = "cpu", cell_top_k: int | None = None) -> tuple[list[Example], dict]:
    """Caption examples of ``modality`` for ``split`` ("train" or "heldout"), and what was left out.

    cpu / paper scale: molecule train = ChEBI-20 ``validation``, held-out = ChEBI-20 ``test``;
    protein train = FAPM ``val``, held-out = FAPM ``test`` (the probe draws from the test sets,
    paper A.3); cell: a fixed seeded ``HOLDOUT_FRACTION`` of PBMC68k cells and of CCLE lines is
    held out. Entities that benchmarks use (``benchmark_entities``) are never training targets.
    Molecules RDKit cannot parse and proteins without a standard residue are dropped.

    Returns ``(examples, info)``; ``info`` holds the sources, counts and excluded ids.
    smoke scale: the hand-made ``SMOKE_DATA`` (the same examples for both splits).
    """
    _check_modality(modality)
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if scale == "smoke":
        examples = smoke_examples(modality)
        return examples, {"sources": ["esmerge.specialists.SMOKE_DATA"], "n": len(examples), "excluded": {}}
    from esmerge import sources

    bench = benchmark_entities() if split == "train" else {"molecule": set(), "protein": set(), "cell": set(), "checked": []}
    info = {"benchmarks_checked": bench["checked"], "excluded": {}}
    if modality == "molecule":
        table = sources.load_chebi20("validation" if split == "train" else "test")
        canon = [_canonical(s) for s in table["smiles"]]
        bad = [str(c) for c, k in zip(table["cid"], canon) if k is None]
        bench_hit = [str(c) for c, k in zip(table["cid"], canon) if k is not None and k in bench["molecule"]]
        skip = set(bad) | set(bench_hit)
        examples = [molecule_example(s, d, str(c)) for c, s, d in zip(table["cid"], table["smiles"], table["description"])
                    if str(c) not in skip]
        info.update(sources=[f"ChEBI-20 {'validation' if split == 'train' else 'test'} (esmerge.data.load_chebi20)"],
                    excluded={"unparsable_cids": bad, "benchmark_molecule_cids": bench_hit})
    elif modality == "protein":
        table = sources.load_swissprot_go("val" if split == "train" else "test")
        std = set(encoders.AMINO_ACIDS)
        bad = [a for a, s in zip(table["accession"], table["sequence"]) if not set(s.upper()) & std]
        bench_hit = [a for a, s in zip(table["accession"], table["sequence"]) if s in bench["protein"]]
        skip = set(bad) | set(bench_hit)
        examples = [protein_example(s, d, a) for a, s, d in zip(table["accession"], table["sequence"], table["description"])
                    if a not in skip]
        info.update(sources=[f"FAPM Swiss-Prot GO {'val' if split == 'train' else 'test'} (esmerge.data.load_swissprot_go)"],
                    excluded={"no_standard_residue": bad, "benchmark_protein_accessions": bench_hit})
    else:
        top_k = cell_top_k or CELL_TOP_K.get(scale, CELL_TOP_K["cpu"])
        pbmc, ccle = sources.load_pbmc68k(), sources.load_ccle_cells()
        pbmc_held = _split_mask(len(pbmc))
        ccle_held = _split_mask(len(ccle))
        want_held = split == "heldout"
        examples, bench_hit = [], []
        for held, (_, row) in zip(pbmc_held, pbmc.iterrows()):
            if held == want_held:
                examples.append(cell_type_example(row["genes"], row["cell_type"], top_k, f"pbmc:{row['cell_id']}"))
        for held, (_, row) in zip(ccle_held, ccle.iterrows()):
            if split == "train" and row["ccle_name"] in bench["cell"]:
                bench_hit.append(row["ccle_name"])
                continue
            if held == want_held:
                examples.append(cell_line_example(row["genes"], row["site"], row["histology"], top_k,
                                                  f"ccle:{row['ccle_name']}"))
        info.update(
            sources=["PBMC68k reduced (esmerge.data.load_pbmc68k)", "CCLE lines (esmerge.data.load_ccle_cells)"],
            training_cells=[e.uid.split(":", 1)[1] for e in examples if e.uid.startswith("ccle:")] if split == "train" else [],
            cell_top_k=top_k,
            holdout={"seed": HOLDOUT_SEED, "fraction": HOLDOUT_FRACTION},
            excluded={
                "heldout_pbmc_cells": [str(c) for c, h in zip(pbmc["cell_id"], pbmc_held) if h],
                "heldout_ccle_lines": [str(c) for c, h in zip(ccle["ccle_name"], ccle_held) if h],
                "benchmark_ccle_lines": bench_hit,
            } if split == "train" else {},
        )
    info["n"] = len(examples)
    return examples, info


# --------------------------------------------------------------------------- batching
def _end_of_turn_id(tokenizer) -> int:
    token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise SpecialistError("the tokenizer has no <|im_end|> token; specialists need a ChatML tokenizer")
    return token_id


def _prompt_pieces(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt before and after the modality slot."""
    content = example.instruction
    if example.raw is not None:
        content = f"{content}\n{MODALITY_LABEL[example.modality]}: {SLOT}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    before, _, after = text.partition(SLOT)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return ids(before), ids(after)


def collate(tokenizer, examples: list[Example], max_tokens: int = 128, n_tokens: int = N_TOKENS) -> dict:
    """Right-padded token ids with the slot positions marked, and labels on the answer only.

    Returns a dict of ``input_ids``, ``attention_mask``, ``labels`` (``-100`` off the answer) and
    ``slot_mask`` (``True`` where the modality tokens go), each ``[B, L]`` with ``L <= max_tokens``,
    and ``raw``: the B raw inputs (or ``None``). Answers longer than the room left are cut; a
    prompt that leaves fewer than 4 answer tokens is an error.
    """
    end = _end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    rows = []
    for ex in examples:
        before, after = _prompt_pieces(tokenizer, ex)
        slot = n_tokens if ex.raw is not None else 0
        prompt_len = len(before) + slot + len(after)
        room = max_tokens - prompt_len
        if room < 4:
            raise SpecialistError(
                f"{ex.modality} example {ex.uid or ex.answer[:30]!r}: prompt has {prompt_len} tokens, "
                f"leaving {room} of max_tokens={max_tokens} for the answer; raise max_tokens or shorten it")
        answer = tokenizer(ex.answer, add_special_tokens=False)["input_ids"][: room - 1] + [end]
        ids = before + [pad] * slot + after + answer
        is_slot = [False] * len(before) + [True] * slot + [False] * (len(after) + len(answer))
        labels = [-100] * prompt_len + answer
        rows.append((ids, is_slot, labels))
    length = max(len(r[0]) for r in rows)
    batch = {k: [] for k in ("input_ids", "attention_mask", "labels", "slot_mask")}
    for ids, is_slot, labels in rows:
        fill = length - len(ids)
        batch["input_ids"].append(ids + [pad] * fill)
        batch["attention_mask"].append([1] * len(ids) + [0] * fill)
        batch["labels"].append(labels + [-100] * fill)
        batch["slot_mask"].append(is_slot + [False] * fill)
    out = {k: torch.tensor(v) for k, v in batch.items()}
    out["slot_mask"] = out["slot_mask"].bool()
    out["raw"] = [ex.raw for ex in examples if ex.raw is not None] or None
    return out


def input_embeddings(model, projector: encoders.Projector | None, batch: dict, modality: str | None = None) -> torch.Tensor:
    """``H^0`` ``[B, L, d]``: token embeddings with the slot positions replaced by projector tokens.

    The base's embedding table is frozen, so gradients reach only the projector tokens.
    """
    embeds = model.get_input_embeddings()(batch["input_ids"])
    if batch["raw"] is None:
        return embeds
    if projector is None:
        raise SpecialistError(f"these {modality or 'modality'} examples need a projector for their slot tokens")
    modality = modality or ("molecule" if projector.net[0].in_features == encoders.MOLECULE_FEATURES else "protein")
    featurise = encoders.FEATURISERS[modality][0]
    param = next(projector.parameters())
    tokens = projector(featurise(batch["raw"]).to(param.device, param.dtype))  # [K, T, d]
    mask = batch["slot_mask"].unsqueeze(-1)
    if int(batch["slot_mask"].sum()) != tokens.shape[0] * tokens.shape[1]:
        raise SpecialistError(f"{int(batch['slot_mask'].sum())} slot positions for {tuple(tokens.shape[:2])} projector tokens")
    # masked_scatter fills the slots in row-major order: example by example, token by token.
    return embeds.masked_scatter(mask, tokens.to(embeds.dtype).reshape(-1, tokens.shape[-1]))


def answer_nll(model, projector, batch: dict, modality: str | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over answer tokens, and their count."""
    embeds = input_embeddings(model, projector, batch, modality)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    scored = labels != -100
    # The vocabulary projection is a fifth of SmolLM2's compute; apply it only where a loss is taken.
    logits = causal_lm.lm_head(hidden[:, :-1][scored])
    nll = F.cross_entropy(logits.float(), labels[scored], reduction="sum")
    return nll, int(scored.sum())


# --------------------------------------------------------------------------- models
def attach(base: BaseModel, spec_or_adapter, adapter_name: str = "default"):
    """A ``PeftModel``: a *copy* of the base LLM with the specialist's (or adapter's) LoRA, in eval mode.

    The base is deep-copied because PEFT injects LoRA layers into the module it wraps; this
    leaves ``base.model`` usable as the plain base. Feed it ``inputs_embeds`` from
    ``input_embeddings`` (or the probe's) like any causal LM.
    """
    adapter = spec_or_adapter.adapter if isinstance(spec_or_adapter, Specialist) else spec_or_adapter
    if not isinstance(adapter, Adapter):
        raise TypeError(f"attach needs a Specialist or an Adapter, got {type(spec_or_adapter).__name__}")
    shared = lora_config()
    for field_name in ("r", "lora_alpha"):
        if adapter.config.get(field_name) != getattr(shared, field_name):
            raise SpecialistError(f"adapter has {field_name}={adapter.config.get(field_name)!r}, the shared LoRA "
                                  f"config has {getattr(shared, field_name)!r} (models.lora_config)")
    model = adapter_io.attach(copy.deepcopy(base.model), {adapter_name: adapter})
    model.requires_grad_(False)
    return model.eval()


@torch.no_grad()
def specialist_loss(model, base: BaseModel, specialist_or_none, examples: list[Example],
                    batch_size: int = 8, max_tokens: int | None = None) -> float:
    """Mean caption loss (nats per answer token) of ``model`` on ``examples``.

    ``model`` is what is evaluated (``base.model`` or ``attach(base, spec)``);
    ``specialist_or_none`` supplies the projector that encodes molecule / protein inputs
    (the modality's encoder f_m; every model sees the same modality tokens, as in the probe).
    Cells need no projector. Token-weighted over all answer tokens of all examples; sequences are
    cut at ``max_tokens`` (default ``MAX_TOKENS`` of the modality).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    projector = specialist_or_none.projector if isinstance(specialist_or_none, Specialist) else specialist_or_none
    modality = examples[0].modality
    if any(ex.modality != modality for ex in examples):
        raise ValueError("specialist_loss needs examples of one modality")
    max_tokens = max_tokens or MAX_TOKENS[modality]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(base.tokenizer, examples[start:start + batch_size], max_tokens)
        nll, n = answer_nll(model, projector, batch, modality)
        total, count = total + float(nll), count + n
    model.train(was_training)
    return total / count


def heldout_examples(modality: str, scale: str, n: int, seed: int = 0) -> list[Example]:
    """A seeded sample of ``n`` held-out examples (all of them if fewer); see ``load_examples``."""
    examples, _ = load_examples(modality, "heldout", scale)
    if n >= len(examples):
        return examples
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]


def cross_loss_table(base: BaseModel, specs: dict[str, Specialist], examples: dict[str, list[Example]],
                     progress: bool = True) -> torch.Tensor:
    """Held-out caption loss of the base and of each specialist on every modality.

    Every model sees modality m's inputs through the same encoder f_m, specialist m's projector
    (cells need none), as in the probe (paper §4.1); rows therefore differ only by their LoRA.

    Args:
        specs: modality -> specialist (``load_specialists``), in row order after the base.
        examples: modality -> held-out examples of that modality (column order).

    Returns:
        ``[1 + len(specs), len(examples)]`` float64 tensor of nats per answer token; row 0 is the base.
    """
    rows = [("base", base.model)] + [(m, attach(base, s)) for m, s in specs.items()]
    table = torch.zeros(len(rows), len(examples), dtype=torch.float64)
    cells = [(i, j) for i in range(len(rows)) for j in range(len(examples))]
    for i, j in tqdm(cells, desc="held-out loss", disable=not progress):
        modality = list(examples)[j]
        encoder = specs[modality] if modality in specs else None
        table[i, j] = specialist_loss(rows[i][1], base, encoder, examples[modality])
    return table


@torch.no_grad()
def generate_answer(model, base: BaseModel, projector, example: Example, max_new_tokens: int = 48) -> str:
    """Greedy answer of ``model`` to ``example``'s prompt (modality tokens spliced in as for training)."""
    tok = base.tokenizer
    before, after = _prompt_pieces(tok, example)
    slot = N_TOKENS if example.raw is not None else 0
    ids = torch.tensor([before + [tok.pad_token_id or 0] * slot + after])
    batch = {"input_ids": ids, "slot_mask": torch.tensor([[False] * len(before) + [True] * slot + [False] * len(after)]),
             "raw": [example.raw] if example.raw is not None else None}
    embeds = input_embeddings(model, projector, batch, example.modality)
    end = _end_of_turn_id(tok)
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=end, pad_token_id=end)
    return tok.decode(out[0], skip_special_tokens=True).strip()


# --------------------------------------------------------------------------- training
def _lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of ``lr``."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """Example indices of ``step``: epochs of seeded permutations, so a resumed run sees the
    same batches as an uninterrupted one without storing a data-loader state."""
    out = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        take = order[offset: offset + batch_size - len(out)]
        out.extend(take)
        position += len(take)
    return out


def is_finished(out_dir) -> bool:
    return (Path(out_dir) / "card.json").exists() and (Path(out_dir) / "adapter_model.safetensors").exists()


def load_checkpoint(path: Path) -> dict:
    """Read a training checkpoint with ``weights_only=True``: tensors and plain containers only.

    A file that needs anything else to unpickle (a planted ``__reduce__``, say) is refused before
    any of its code can run; nothing in a checkpoint we write needs more.
    """
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # UnpicklingError, RuntimeError (truncated zip), EOFError, ...
        raise SpecialistError(f"{path} is not a checkpoint this trainer wrote ({type(err).__name__}); "
                              "delete it or pass --no-resume to start over") from None
    if not isinstance(state, dict) or not {"recipe", "step", "lora", "optimizer"} <= set(state):
        raise SpecialistError(f"{path} is not a checkpoint this trainer wrote (missing keys); "
                              "delete it or pass --no-resume to start over")
    return state


def train_specialist(base: BaseModel, modality: str, steps: int, batch_size: int, lr: float, seed: int,
                     out_dir, max_tokens: int = 128, resume: bool = True, *, force: bool = False,
                     examples: list[Example] | None = None, data_info: dict | None = None,
                     checkpoint_every: int = 25, bf16: bool = False, cell_top_k: int | None = None,
                     stop_after: int | None = None, progress: bool = True) -> Specialist:
    """Train one specialist: LoRA (``models.lora_config``) + projector, on caption examples.

    Args:
        base: the frozen base LLM (not modified: training works on a copy).
        modality: "molecule", "protein" or "cell".
        steps, batch_size, lr, seed: AdamW steps, examples per step, peak learning rate
            (warm-up then cosine, ``_lr_at``), seed of LoRA/projector init and data order.
        out_dir: where the finished specialist is saved; ``out_dir/checkpoint`` holds the
            resumable state, written every ``checkpoint_every`` steps.
        max_tokens: longest sequence; answers are cut to fit.
        resume: continue from ``out_dir/checkpoint`` if one exists (same recipe required).
        force: overwrite a finished specialist in ``out_dir`` (otherwise ``FileExistsError``).
        examples, data_info: training examples (default: ``load_examples(modality, "train", base.scale)``).
        bf16: bf16 autocast for the forward pass (weights and optimizer stay float32).
        stop_after: stop (as if interrupted) once this many steps are done; for tests.

    Returns the ``Specialist``, also saved to ``out_dir``.
    """
    _check_modality(modality)
    out_dir = Path(out_dir)
    if is_finished(out_dir) and not force:
        raise FileExistsError(f"{out_dir} already holds a finished {modality} specialist; "
                              "pass force=True (--force) to retrain and overwrite it")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"need steps >= 1, batch_size >= 1, lr > 0 (got {steps}, {batch_size}, {lr})")
    if examples is None:
        examples, data_info = load_examples(modality, "train", base.scale, cell_top_k)
    if not examples:
        raise SpecialistError(f"no {modality} training examples")
    recipe = {"modality": modality, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
              "max_tokens": max_tokens, "n_tokens": N_TOKENS, "bf16": bf16, "base": base.weights_sha256,
              "examples": content_key([(e.uid, e.instruction, e.answer, e.raw) for e in examples])}

    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base.model), lora_config())
    projector = None
    if modality != "cell":
        projector = encoders.make_projector(modality, base.model.get_input_embeddings(), N_TOKENS, seed)
    params = [p for p in model.parameters() if p.requires_grad] + (list(projector.parameters()) if projector else [])
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    ckpt = out_dir / "checkpoint" / "state.pt"
    start, losses, elapsed, resumed_from = 0, [], 0.0, None
    if force and ckpt.exists() and is_finished(out_dir):
        ckpt.unlink()
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt)
        if state["recipe"] != recipe:
            changed = sorted(k for k in recipe if state["recipe"].get(k) != recipe[k])
            raise SpecialistError(f"{ckpt} was made with a different recipe ({', '.join(changed)}); "
                                  "delete it or pass resume=False (--no-resume) to start over")
        adapter_io.load_lora_state(model, state["lora"])
        if projector is not None:
            projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        start, losses, elapsed = state["step"], state["losses"], state["elapsed_s"]
        resumed_from = start
        print(f"[{modality}] resuming from step {start} of {steps} ({ckpt})")

    def save_checkpoint(step: int, spent: float) -> None:
        lora = {k: v.detach().clone() for k, v in adapter_from_model(model).state.items()}
        atomic_torch_save({"recipe": recipe, "step": step, "losses": losses, "elapsed_s": spent, "lora": lora,
                           "projector": projector.state_dict() if projector else None,
                           "optimizer": optimizer.state_dict()}, ckpt)

    model.train()
    began = time.perf_counter()
    bar = tqdm(range(start, steps), desc=f"train {modality}", disable=not progress, initial=start, total=steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr)
        batch = collate(base.tokenizer, [examples[i] for i in _batch_indices(step, batch_size, len(examples), seed)],
                        max_tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            nll, n = answer_nll(model, projector, batch, modality)
        loss = nll / n
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        done = step + 1
        if done % checkpoint_every == 0 or done == steps or done == stop_after:
            save_checkpoint(done, elapsed + time.perf_counter() - began)
        if stop_after is not None and done >= stop_after and done < steps:
            bar.close()
            print(f"[{modality}] stopped after step {done} (checkpoint {ckpt})")
            return None
    bar.close()
    wall = elapsed + time.perf_counter() - began
    print(f"[{modality}] {steps} steps in {wall:.1f} s ({wall / steps:.2f} s/step), "
          f"loss {_mean(losses[:10]):.3f} -> {_mean(losses[-10:]):.3f}")

    adapter = adapter_from_model(model, name=f"{modality}-specialist")
    card = {
        "modality": modality, "scale": base.scale, "base_name": base.name, "base_weights_sha256": base.weights_sha256,
        "seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "lr_schedule": "5% linear warm-up, cosine to 0.1*lr",
        "optimizer": "AdamW (weight_decay 0, grad-norm clip 1.0)", "max_tokens": max_tokens, "n_tokens": N_TOKENS if projector else 0,
        "bf16_autocast": bf16, "lora": {"r": adapter.config.get("r"), "lora_alpha": adapter.config.get("lora_alpha"),
                                        "target_modules": sorted(adapter.config.get("target_modules") or [])},
        "projector": _projector_spec(projector), "prompt": {k: v for k, v in INSTRUCTION.items() if k.startswith(modality[:4])},
        "data": {k: v for k, v in (data_info or {}).items() if k not in ("excluded", "training_cells")}
        | {"n_train": len(examples)},
        "exclusions": (data_info or {}).get("excluded", {}),
        # CCLE names the cell specialist trained on: the probe and benchmarks must not use them.
        "training_cells": (data_info or {}).get("training_cells", []),
        "loss_curve": losses, "loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]),
        "resumed_from_step": resumed_from,
        "timings": {"wall_s": round(wall, 2), "s_per_step": round(wall / steps, 3), "threads": torch.get_num_threads(),
                    "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "machine": platform.machine(), "torch": torch.__version__},
    }
    spec = Specialist(modality, adapter, projector.eval() if projector else None, card)
    save_specialist(spec, out_dir)
    if ckpt.exists():
        ckpt.unlink()
        ckpt.parent.rmdir() if not any(ckpt.parent.iterdir()) else None
    return spec


def _mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def _projector_spec(projector) -> dict | None:
    if projector is None:
        return None
    return {"in_features": projector.net[0].in_features, "width": projector.net[0].out_features,
            "hidden_size": projector.hidden_size, "n_tokens": projector.n_tokens,
            "embed_scale": float(projector.embed_scale)}


# --------------------------------------------------------------------------- saving / loading
def save_specialist(spec: Specialist, out_dir) -> Path:
    """Write ``out_dir``: PEFT adapter files + ``projector.safetensors`` (not for cells) + ``card.json``.

    ``card.json`` is written last, so a directory with a card is complete.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    save_adapter(spec.adapter, out)
    if spec.projector is not None:
        state = {k: v.detach().contiguous() for k, v in spec.projector.state_dict().items()}
        save_file(state, out / "projector.safetensors")
    card = dict(spec.card, projector=_projector_spec(spec.projector))
    atomic_write_json(out / "card.json", card, indent=1)
    return out


def load_specialist(path, base: BaseModel) -> Specialist:
    """Read a specialist directory written by ``save_specialist`` for ``base``.

    Raises ``SpecialistError`` if it is incomplete or was trained on different base weights.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "card.json").exists():
        raise SpecialistError(f"{path} is not a finished specialist (no card.json); train it with `esmerge train`")
    card = json.loads((path / "card.json").read_text())
    if base.weights_sha256 and card.get("base_weights_sha256") not in (None, base.weights_sha256):
        raise SpecialistError(f"{path} was trained on base weights {card['base_weights_sha256'][:12]}..., "
                              f"but the given base ({base.name}) has {base.weights_sha256[:12]}...")
    adapter = load_adapter(path, name=f"{card['modality']}-specialist")
    projector = None
    if card.get("projector"):
        p = card["projector"]
        projector = encoders.Projector(p["in_features"], p["hidden_size"], p["n_tokens"], p["width"], p["embed_scale"])
        projector.load_state_dict(load_file(path / "projector.safetensors"))
        projector.eval()
    return Specialist(card["modality"], adapter, projector, card)


def shipped_manifest() -> dict:
    import yaml

    if not SHIPPED_MANIFEST.exists():
        raise SpecialistError(f"{SHIPPED_MANIFEST} is missing: the shipped specialists cannot be verified")
    return yaml.safe_load(SHIPPED_MANIFEST.read_text())


def verify_shipped(scale: str = "cpu") -> dict[str, Path]:
    """Check every shipped specialist file against its sha256 in ``specialists.yaml``."""
    manifest = shipped_manifest().get(scale)
    if not manifest:
        raise SpecialistError(f"{SHIPPED_MANIFEST} lists no {scale!r} specialists")
    dirs = {}
    for modality in MODALITIES:
        entry = manifest["specialists"][modality]
        folder = REPO_ROOT / entry["path"]
        for name, expected in entry["sha256"].items():
            file = folder / name
            if not file.exists():
                raise SpecialistError(f"{file} is missing; restore it with `git checkout -- {file.relative_to(REPO_ROOT)}` "
                                      f"or retrain with `esmerge train --scale {scale} --modality {modality}`")
            actual = file_sha256(file)
            if actual != expected:
                raise SpecialistError(f"{file}: sha256 {actual[:16]}... does not match {SHIPPED_MANIFEST.name} "
                                      f"({expected[:16]}...); the file is corrupt or was retrained without "
                                      "updating the manifest (`esmerge train --write-manifest`)")
        dirs[modality] = folder
    return dirs


def write_manifest(scale: str = "cpu") -> Path:
    """(Re)write the ``scale`` section of ``specialists.yaml`` from the shipped directories."""
    import yaml

    data = yaml.safe_load(SHIPPED_MANIFEST.read_text()) if SHIPPED_MANIFEST.exists() else {}
    section = {"specialists": {}}
    for modality in MODALITIES:
        folder = SHIPPED_DIR / scale / modality
        if not is_finished(folder):
            raise SpecialistError(f"{folder} holds no finished specialist")
        card = json.loads((folder / "card.json").read_text())
        section["base_name"], section["base_weights_sha256"] = card["base_name"], card["base_weights_sha256"]
        section["specialists"][modality] = {
            "path": str(folder.relative_to(REPO_ROOT)),
            "steps": card["steps"], "batch_size": card["batch_size"], "lr": card["lr"], "seed": card["seed"],
            "sha256": {f: file_sha256(folder / f) for f in SHIPPED_FILES if (folder / f).exists()},
        }
    data[scale] = section
    SHIPPED_MANIFEST.write_text(yaml.safe_dump(data, sort_keys=False))
    return SHIPPED_MANIFEST


def load_specialists(scale: str, base: BaseModel) -> dict[str, Specialist]:
    """The three specialists of ``scale``, ordered molecule, protein, cell.

    * ``cpu``: the shipped ones in ``data_manifest/specialists/cpu/<modality>/``, after checking
      their sha256 against ``data_manifest/specialists.yaml``.
    * ``smoke``: tiny specialists on the hand-made examples, trained in seconds (``SMOKE_RECIPE``)
      and cached under ``cache_dir()`` keyed by the base weights, recipe and code version.
    * ``paper``: not available here (see the error).
    """
    if scale == "cpu":
        dirs = verify_shipped("cpu")
        return {m: load_specialist(dirs[m], base) for m in MODALITIES}
    if scale == "smoke":
        key = content_key(base.weights_sha256, SMOKE_RECIPE, CODE_VERSION)
        root = cache_dir() / "specialists" / "smoke" / key
        specs = {}
        for modality in MODALITIES:
            folder = root / modality
            if is_finished(folder):
                specs[modality] = load_specialist(folder, base)
            else:
                examples, info = load_examples(modality, "train", "smoke")
                specs[modality] = train_specialist(base, modality, out_dir=folder, examples=examples, data_info=info,
                                                   progress=False, **SMOKE_RECIPE)
        return specs
    if scale == "paper":
        raise NotImplementedError(
            "paper-scale specialists are the published Mol-LLaMA, Prot2Text-V2 and Cell-o1 (LLaMA-3.1-8B-Instruct). "
            "To use them, convert each to this format: a PEFT LoRA directory with the shared config "
            "(r=8, alpha=32, q/k/v/o/gate/up/down; models.lora_config), a projector.safetensors mapping the "
            "modality encoder's features to the LLM's embedding space, and a card.json; then list their sha256 "
            "under `paper:` in data_manifest/specialists.yaml.")
    raise ValueError(f"unknown scale {scale!r}; choose smoke, cpu or paper")


# --------------------------------------------------------------------------- CLI
def cli(argv: list[str]) -> int:
    """``esmerge train --scale cpu --modality molecule --steps N --batch-size B --lr LR --seed S --out DIR``."""
    parser = argparse.ArgumentParser(prog="esmerge train", description="Train a modality specialist (LoRA + projector).")
    parser.add_argument("--scale", default="cpu", choices=("smoke", "cpu", "paper"))
    parser.add_argument("--modality", choices=MODALITIES)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="output directory (default data_manifest/specialists/<scale>/<modality>)")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: MAX_TOKENS of the modality")
    parser.add_argument("--cell-top-k", type=int, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=25)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--force", action="store_true", help="overwrite a finished specialist")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    parser.add_argument("--write-manifest", action="store_true",
                        help="only (re)write data_manifest/specialists.yaml from the shipped directories")
    args = parser.parse_args(argv)
    if args.write_manifest:
        print(f"wrote {write_manifest(args.scale)}")
        return 0
    if args.modality is None:
        parser.error("--modality is required")
    if args.threads:
        torch.set_num_threads(args.threads)
    from esmerge.models import load_base

    base = load_base(args.scale, seed=args.seed)
    out = args.out or SHIPPED_DIR / args.scale / args.modality
    try:
        train_specialist(base, args.modality, args.steps, args.batch_size, args.lr, args.seed, out,
                         max_tokens=args.max_tokens or MAX_TOKENS[args.modality], resume=not args.no_resume, force=args.force,
                         checkpoint_every=args.checkpoint_every, bf16=args.bf16, cell_top_k=args.cell_top_k)
    except (FileExistsError, SpecialistError) as err:
        print(f"esmerge train: {err}", file=sys.stderr)
        return 1
    print(f"saved {out}")
    return 0
