"""The interface of encoders that take raw inputs (a SMILES, a protein sequence) and emit token blocks.

``RawEncoder.blocks(raw)`` -> K tensors ``[T_k, d]`` (or ``[K, T, d]``) that replace a prompt's
placeholder embeddings. ``encoders`` builds the published specialists' encoders on it (Prot2Text-V2's
ESM-2, Mol-LLaMA's graph encoders and Q-Former in ``mol_llama``); ``UnavailableEncoder`` stands in
where one cannot run here.
"""
from __future__ import annotations

import torch
from torch import nn

from esmerge.errors import InputError


# Every encoder maps K raw inputs of its modality to K token blocks in the LLM's embedding
# space. The cpu/smoke ``Projector`` takes featurised inputs (``encode`` featurises first); a
# ``RawEncoder`` takes the raw inputs itself and may emit blocks of different lengths, one per
# input (``n_tokens`` None), which ``probe.build_probes`` pads and masks.
class EncoderUnavailableError(InputError):
    """A specialist's own modality encoder cannot run here; the message names what to install."""


class RawEncoder(nn.Module):
    """Base of encoders that take raw inputs: ``blocks(raw)`` -> K tensors ``[T_k, d]`` (or ``[K, T, d]``)."""

    n_tokens: int | None = None  # fixed block length, or None when it depends on the input

    def blocks(self, raw: list) -> list[torch.Tensor] | torch.Tensor:
        raise NotImplementedError

    def block_length(self, item) -> int:
        """Tokens ``blocks([item])`` emits (a prompt reserves that many placeholder slots)."""
        if self.n_tokens is None:
            raise NotImplementedError(f"{type(self).__name__} emits blocks of varying length: define block_length")
        return self.n_tokens


class UnavailableEncoder(RawEncoder):
    """Stands in for an encoder whose package is missing: keeps its tensors (so a merged model still
    carries them and digests still name them) and refuses to encode with ``message``."""

    def __init__(self, tensors: dict[str, torch.Tensor], n_tokens: int | None, message: str):
        super().__init__()
        self.n_tokens, self.message = n_tokens, message
        for i, (name, value) in enumerate(sorted(tensors.items())):
            self.register_buffer(f"t{i}", value)
        self.tensor_names = sorted(tensors)

    def blocks(self, raw: list):
        raise EncoderUnavailableError(self.message)
