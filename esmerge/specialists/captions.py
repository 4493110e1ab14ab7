"""The caption task every specialist learns: examples, their prompts, and batches of them.

A training example is a chat-templated user turn with the modality's token block spliced in as
``inputs_embeds`` (``H^0 = [H_text; H_m; ...]``, paper §3), followed by the answer; the loss is
the mean next-token cross-entropy over the answer tokens only (``answer_nll``).

* molecule: SMILES -> the ChEBI-20 description of the molecule;
* protein: sequence -> the Swiss-Prot GO-term description (FAPM);
* cell: no token block; like Cell-o1 a cell is text, its top-k genes comma-separated, and the
  answer names the cell type (PBMC68k) or the cell line's primary site and histology (CCLE).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from esmerge.cache import cache_dir, content_key, file_sha256
from esmerge.data import benchmarks, files, sources
from esmerge.errors import EsmergeError
from esmerge.scales import ScaleConfig
from esmerge.specialists import encoders
from esmerge.specialists.base_llm import end_of_turn_id
from esmerge.specialists.encoders import MODALITIES

N_TOKENS = 8  # Mol-LLaMA feeds 8 molecule tokens; we use the same block size for proteins.
# Fixed seed of the cell hold-out split: it must not move with the training seed, so that the
# probe and evaluation can rely on one set of held-out cells.
HOLDOUT_SEED = 20240601
HOLDOUT_FRACTION = 0.2
CODE_VERSION = 1  # bump when a change to the examples or the trainer changes what training produces

MODALITY_LABEL = {"molecule": "Molecule", "protein": "Protein"}
INSTRUCTION = {
    "molecule": "Describe this molecule.",
    "protein": "Describe the function of this protein.",
    "cell_type": "Top expressed genes of a cell: {genes}. Which cell type is it?",
    "cell_line": "Top expressed genes of a cancer cell line: {genes}. Its primary site and histology?",
}
SLOT = "<|modality_tokens|>"
# Longest sequence per modality (evaluation default): a cpu-scale cell prompt of 12 genes runs to ~135 tokens.
MAX_TOKENS = {"molecule": 128, "protein": 128, "cell": 160}


class SpecialistError(EsmergeError):
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


# --------------------------------------------------------------------------- examples
def molecule_example(smiles: str, description: str, uid: str = "") -> Example:
    return Example("molecule", INSTRUCTION["molecule"], description.strip(), smiles, uid)


def protein_example(sequence: str, description: str, uid: str = "") -> Example:
    return Example("protein", INSTRUCTION["protein"], description.strip(), sequence, uid)


def cell_type_example(genes: list[str], cell_type: str, top_k: int, uid: str = "") -> Example:
    text = encoders.cell_text(list(genes), top_k)
    return Example("cell", INSTRUCTION["cell_type"].format(genes=text), f"{cell_type}.", None, uid)


def cell_line_example(genes: list[str], site: str, histology: str, top_k: int, uid: str = "") -> Example:
    """
    >>> cell_line_example(["A", "B", "C"], "large_intestine", "carcinoma", 2).answer
    'Primary site: large intestine. Histology: carcinoma.'
    """
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


def smoke_examples(modality: str, cell_top_k: int) -> list[Example]:
    """The hand-made examples of ``SMOKE_DATA`` as ``Example`` objects, each cell written as its
    top ``cell_top_k`` genes (the smoke scale's ``ScaleConfig.cell_top_k``).

    >>> smoke_examples("cell", 5)[0].instruction
    'Top expressed genes of a cell: CD3D, CD3E, IL7R, LTB, CCR7. Which cell type is it?'
    """
    rows = SMOKE_DATA[check_modality(modality)]
    if modality == "molecule":
        return [molecule_example(s, d, f"smoke-mol-{i}") for i, (s, d) in enumerate(rows)]
    if modality == "protein":
        return [protein_example(s, d, f"smoke-prot-{i}") for i, (s, d) in enumerate(rows)]
    return [cell_type_example(g, t, cell_top_k, f"smoke-cell-{i}") for i, (g, t) in enumerate(rows)]


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise SpecialistError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    return modality


def _split_mask(n: int, fraction: float = HOLDOUT_FRACTION, seed: int = HOLDOUT_SEED) -> list[bool]:
    """``True`` for the rows held out: a fixed seeded ``fraction`` of ``n`` rows.

    >>> sum(_split_mask(10))
    2
    """
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[: round(n * fraction)])
    return [i in held for i in range(n)]


def benchmark_entities() -> dict:
    """Molecules (canonical SMILES), protein sequences and CCLE lines that any benchmark uses.

    Read with ``esmerge.data.benchmarks.load_benchmark`` for every benchmark and cached (keyed by the
    data manifest), since RDKit canonicalisation takes a while.
    """
    names = sorted(benchmarks.BENCHMARKS)
    key = content_key(file_sha256(files.MANIFEST), names, CODE_VERSION)
    path = cache_dir() / "specialists" / f"benchmark-entities-{key}.json"
    if path.exists():
        found = json.loads(path.read_text())
    else:
        molecules, proteins, cells = set(), set(), set()
        for name in names:
            df = benchmarks.load_benchmark(name)
            for column in ("molecule", "molecule2"):
                molecules |= {s for s in df[column].dropna()}
            proteins |= set(df["protein"].dropna())
            cells |= set(df["cell_id"].dropna())
        found = {"molecule": sorted({c for c in map(_canonical, molecules) if c}), "protein": sorted(proteins),
                 "cell": sorted(cells), "checked": names}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found))
    return {k: (set(v) if k != "checked" else v) for k, v in found.items()}


def _canonical(smiles: str) -> str | None:
    from rdkit import Chem, RDLogger  # heavy optional import, only where SMILES are canonicalised

    RDLogger.DisableLog("rdApp.*")
    mol = Chem.MolFromSmiles(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)


def load_examples(modality: str, split: str, config: ScaleConfig, cell_top_k: int | None = None
                  ) -> tuple[list[Example], dict]:
    """Caption examples of ``modality`` for ``split`` ("train" or "heldout"), and what was left out.

    cpu / paper scale: molecule train = ChEBI-20 ``validation``, held-out = ChEBI-20 ``test``;
    protein train = FAPM ``val``, held-out = FAPM ``test`` (the probe draws from the test sets,
    paper A.3); cell: a fixed seeded ``HOLDOUT_FRACTION`` of PBMC68k cells and of CCLE lines is
    held out, each cell written as its top ``config.cell_top_k`` genes (``cell_top_k`` if given). Entities that
    benchmarks use (``benchmark_entities``) are never training targets. Molecules RDKit cannot
    parse and proteins without a standard residue are dropped.

    Returns ``(examples, info)``; ``info`` holds the sources, counts and excluded ids.
    smoke scale: the hand-made ``SMOKE_DATA`` (the same examples for both splits).
    """
    check_modality(modality)
    if split not in ("train", "heldout"):
        raise SpecialistError(f"split must be 'train' or 'heldout', got {split!r}")
    if config.name == "smoke":
        examples = smoke_examples(modality, config.cell_top_k)
        return examples, {"sources": ["esmerge.specialists.load.SMOKE_DATA"], "n": len(examples), "excluded": {}}
    bench = (benchmark_entities() if split == "train"
             else {"molecule": set(), "protein": set(), "cell": set(), "checked": []})
    info = {"benchmarks_checked": bench["checked"], "excluded": {}}
    if modality == "molecule":
        table = sources.load_chebi20("validation" if split == "train" else "test")
        canon = [_canonical(s) for s in table["smiles"]]
        bad = [str(c) for c, k in zip(table["cid"], canon) if k is None]
        bench_hit = [str(c) for c, k in zip(table["cid"], canon) if k is not None and k in bench["molecule"]]
        skip = set(bad) | set(bench_hit)
        examples = [molecule_example(s, d, str(c))
                    for c, s, d in zip(table["cid"], table["smiles"], table["description"])
                    if str(c) not in skip]
        info.update(sources=[f"ChEBI-20 {'validation' if split == 'train' else 'test'} "
                             "(esmerge.data.sources.load_chebi20)"],
                    excluded={"unparsable_cids": bad, "benchmark_molecule_cids": bench_hit})
    elif modality == "protein":
        table = sources.load_swissprot_go("val" if split == "train" else "test")
        std = set(encoders.AMINO_ACIDS)
        bad = [a for a, s in zip(table["accession"], table["sequence"]) if not set(s.upper()) & std]
        bench_hit = [a for a, s in zip(table["accession"], table["sequence"]) if s in bench["protein"]]
        skip = set(bad) | set(bench_hit)
        examples = [protein_example(s, d, a)
                    for a, s, d in zip(table["accession"], table["sequence"], table["description"])
                    if a not in skip]
        info.update(sources=[f"FAPM Swiss-Prot GO {'val' if split == 'train' else 'test'} "
                             "(esmerge.data.sources.load_swissprot_go)"],
                    excluded={"no_standard_residue": bad, "benchmark_protein_accessions": bench_hit})
    else:
        top_k = cell_top_k or config.cell_top_k
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
            sources=["PBMC68k reduced (esmerge.data.sources.load_pbmc68k)",
                     "CCLE lines (esmerge.data.sources.load_ccle_cells)"],
            training_cells=([e.uid.split(":", 1)[1] for e in examples if e.uid.startswith("ccle:")]
                            if split == "train" else []),
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


def heldout_examples(modality: str, config: ScaleConfig, n: int, seed: int = 0) -> list[Example]:
    """A seeded sample of ``n`` held-out examples of the scale ``config`` (all of them if fewer); see
    ``load_examples``."""
    examples, _ = load_examples(modality, "heldout", config)
    if n >= len(examples):
        return examples
    return [examples[i] for i in sorted(random.Random(seed).sample(range(len(examples)), n))]


# --------------------------------------------------------------------------- batches
def prompt_pieces(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt before and after the modality slot."""
    content = example.instruction
    if example.raw is not None:
        content = f"{content}\n{MODALITY_LABEL[example.modality]}: {SLOT}"
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    before, _, after = text.partition(SLOT)
    ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
    return ids(before), ids(after)


def collate_examples(tokenizer, examples: list[Example], max_tokens: int = 128, n_tokens: int = N_TOKENS) -> dict:
    """Right-padded token ids with the slot positions marked, and labels on the answer only.

    Returns a dict of ``input_ids``, ``attention_mask``, ``labels`` (``-100`` off the answer) and
    ``slot_mask`` (``True`` where the modality tokens go), each ``[B, L]`` with ``L <= max_tokens``,
    and ``raw``: the B raw inputs (or ``None``). Each answer ends with the chat template's
    end-of-turn token (``base_llm.end_of_turn_id``). Answers longer than the room left are cut; a
    prompt that leaves fewer than 4 answer tokens is an error.
    """
    end = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end
    rows = []
    for ex in examples:
        before, after = prompt_pieces(tokenizer, ex)
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


def input_embeddings(model, projector: encoders.Projector | None, batch: dict,
                     modality: str | None = None) -> torch.Tensor:
    """``H^0`` ``[B, L, d]``: token embeddings with the slot positions replaced by projector tokens.

    The base's embedding table is frozen, so gradients reach only the projector tokens. Batch
    tensors are moved to the embedding's device.
    """
    embedding = model.get_input_embeddings()
    embeds = embedding(batch["input_ids"].to(embedding.weight.device))
    if batch["raw"] is None:
        return embeds
    if projector is None:
        raise SpecialistError(f"these {modality or 'modality'} examples need a projector for their slot tokens")
    modality = modality or ("molecule" if projector.net[0].in_features == encoders.MOLECULE_FEATURES else "protein")
    featurise = encoders.FEATURISERS[modality][0]
    param = next(projector.parameters())
    tokens = projector(featurise(batch["raw"]).to(param.device, param.dtype))  # [K, T, d]
    slot_mask = batch["slot_mask"].to(embeds.device)
    if int(slot_mask.sum()) != tokens.shape[0] * tokens.shape[1]:
        raise SpecialistError(f"{int(slot_mask.sum())} slot positions for {tuple(tokens.shape[:2])} projector tokens")
    # masked_scatter fills the slots in row-major order: example by example, token by token.
    flat = tokens.to(embeds.device, embeds.dtype).reshape(-1, tokens.shape[-1])
    return embeds.masked_scatter(slot_mask.unsqueeze(-1), flat)


def _answer_logits(model, projector, batch: dict, modality: str | None):
    """Logits ``[T, V]`` at the answer positions of ``batch``, their labels ``[T]`` and the mask ``[B, L-1]``."""
    embeds = input_embeddings(model, projector, batch, modality)
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    mask = batch["attention_mask"].to(embeds.device)
    hidden = causal_lm.model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:].to(embeds.device)
    scored = labels != -100
    # The vocabulary projection is a fifth of SmolLM2's compute; apply it only where a loss is taken.
    logits = causal_lm.lm_head(hidden[:, :-1][scored])
    return logits, labels[scored], scored


def answer_nll(model, projector, batch: dict, modality: str | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood over answer tokens, and their count."""
    logits, labels, scored = _answer_logits(model, projector, batch, modality)
    nll = F.cross_entropy(logits.float(), labels, reduction="sum")
    return nll, int(scored.sum())


def answer_nll_per_example(model, projector, batch: dict, modality: str | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example summed answer NLL ``[B]`` (float64) and answer-token counts ``[B]``: ``answer_nll`` split by row."""
    logits, labels, scored = _answer_logits(model, projector, batch, modality)
    per_token = F.cross_entropy(logits.float(), labels, reduction="none").double()
    rows = scored.nonzero()[:, 0]  # boolean indexing keeps row-major order, so token t belongs to rows[t]
    nll = torch.zeros(scored.shape[0], dtype=torch.float64, device=per_token.device).index_add_(0, rows, per_token)
    return nll.cpu(), scored.sum(1).cpu()
