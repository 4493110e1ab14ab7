"""Converters from the paper's published checkpoints to this project's specialist format.

* ``convert_mol_llama(src, out)``: Mol-LLaMA's LoRA is already r = 8 / alpha = 32 on the seven
  projections; it is renamed and checked against the base (``mol_llama``).
* ``convert_prot2text(src, out, base)``: Prot2Text-V2 merged its LoRA into the decoder; a rank-8
  LoRA is extracted by truncated SVD of the weight differences (``prot2text``, ``extract``).
* ``lora_extract(finetuned, base, out, rank=8)``: the same extraction for any LLaMA fine-tune;
  ``error_budget=`` picks the smallest rank whose worst per-matrix error is within it (``lowrank``).

Every converter checks shapes, dtypes and base identity, refuses a mismatch with one line
(``CheckpointError``), writes its output atomically and resumes an interrupted run (``output``).
Checkpoints are read lazily and never unpickled beyond tensors, plain containers and a named
admit-list of upstream config classes read as inert placeholders (``checkpoints``).
"""
from esmerge.specialists.convert.checkpoints import CheckpointError, TensorSource, state_digest
from esmerge.specialists.convert.extract import Extraction, lora_extract, summary
from esmerge.specialists.convert.mol_llama import convert_mol_llama
from esmerge.specialists.convert.prot2text import convert_prot2text

__all__ = ["CheckpointError", "Extraction", "TensorSource", "convert_mol_llama", "convert_prot2text",
           "lora_extract", "state_digest", "summary"]
