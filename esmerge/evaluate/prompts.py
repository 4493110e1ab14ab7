"""The prompts of Tables 9-10: system message, retrieved examples, the query and both answers.

Molecules and proteins are token blocks (8 tokens from a projector; one per residue + 2 from
Prot2Text-V2's ESM-2 encoder) when the evaluated model has that modality's encoder, text
otherwise ("unsupported modalities are represented as textual inputs", §5.1); cells are always
text (``encoders.cell_text``). The wording of each task is in ``esmerge.data.benchmarks.TASKS``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import pandas as pd

from esmerge import scales
from esmerge.data.benchmarks import spec
from esmerge.evaluate.retrieval import as_text
from esmerge.specialists.encoders import cell_text

_FIELD_TITLE = {"protein": "Protein", "molecule": "Molecule", "molecule2": "Molecule2", "cell": "Cell"}
ANSWER_PREFIX = "Final answer:"
_DEFAULTS = scales.EvalDefaults()  # how entities are shown unless an evaluation says otherwise
MARK = "\x00ENTITY{}\x00"
MARK_RE = re.compile("\x00ENTITY(\\d+)\x00")


@dataclass
class Prompt:
    """A rendered prompt: chat text with entity markers, the token entities, and both answers.

    ``text`` is the chat-template output; each ``MARK.format(i)`` in it stands for
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
    top_k_genes: int = _DEFAULTS.top_k_genes
    protein_chars: int = _DEFAULTS.protein_chars  # a protein shown as text is cut to its first residues
    smiles_chars: int | None = _DEFAULTS.smiles_chars  # None: full SMILES

    def key(self) -> dict:
        return {"top_k_genes": self.top_k_genes, "protein_chars": self.protein_chars,
                "smiles_chars": self.smiles_chars, "tokens": sorted(self.token_modalities)}


def _entity_text(field_name: str, value, options: PromptOptions) -> str:
    if field_name == "cell":
        return cell_text(list(value), options.top_k_genes)
    if field_name == "protein":
        seq = as_text(value)
        return seq if len(seq) <= options.protein_chars else seq[: options.protein_chars] + "..."
    smi = as_text(value)
    return smi if options.smiles_chars is None else smi[: options.smiles_chars]


def _render_fields(row: pd.Series, fields: tuple[str, ...], options: PromptOptions,
                   entities: list[tuple[str, str]]) -> str:
    parts = []
    for name in fields:
        column = "cell_genes" if name == "cell" else name
        value = row.get(column)
        if name == "protein" and not as_text(value):
            continue  # a benchmark without a protein column (a CYP set without the enzyme sequence)
        modality = "molecule" if name.startswith("molecule") else name
        if modality in options.token_modalities:
            entities.append((modality, as_text(value)))
            shown = MARK.format(len(entities) - 1)
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
    task = spec(benchmark).prompt
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
