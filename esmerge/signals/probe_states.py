"""The states a probe elicits: every block's output on each modality's tokens, for the base and each specialist.

``hidden_states`` reads one model's states on the probes (``esmerge.signals.probe``, which builds
them) with forward hooks, ``collect_states`` those of the base and of every adapter of one PEFT
model: the model work of §4.1. The states come back as float32 CPU copies, wherever the model runs,
so what is computed from them (the SWD tables, the base tokens the element scores compare with)
does not depend on the device.
"""
from __future__ import annotations

import torch

from esmerge.progress import track
from esmerge.signals.hooks import block_outputs
from esmerge.signals.probe import Probes


@torch.no_grad()
def hidden_states(model: torch.nn.Module, probes: Probes, batch_size: int = 16, progress: bool = False) -> dict:
    r"""Per-layer states of each modality block for one model (§4.1), and their means (§4.2).

    Reads the output of every transformer block (before the final norm) with forward hooks:
    :math:`\mathbf H^{l,(k)}_{m_i\to\theta}` for l = 1..L. Padding slots of blocks of varying length
    are masked out of attention and out of the means.

    Parameters
    ----------
    model : torch.nn.Module
        A LLaMA-style causal LM (PEFT-wrapped or not) that takes ``inputs_embeds``.
    probes : Probes
        K probes, ``embeds [K, T, d]``.
    batch_size : int
        Probes per forward pass (memory only).
    progress : bool
        Show a progress bar.

    Returns
    -------
    dict
        ``{"tokens": {m: [L, K, T_m, d]}, "pooled": {m: [L, K, d]}}`` (float32, CPU); pooled is
        the mean over the block's (real) tokens, :math:`\hat{\mathbf h}^{l,(k)}`.

    Examples
    --------
    The states are the model's own; the first block's output is Hugging Face's
    ``hidden_states[1]``:

    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> model = tiny_llama()
    >>> probes = Probes(torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])})  # 2 probes, block at tokens 1-2
    >>> states = hidden_states(model, probes)
    >>> states["tokens"]["m"].shape, states["pooled"]["m"].shape
    (torch.Size([2, 2, 2, 4]), torch.Size([2, 2, 4]))
    >>> first = model(inputs_embeds=probes.embeds, output_hidden_states=True).hidden_states[1]
    >>> torch.allclose(states["tokens"]["m"][0], first[:, 1:])
    True
    >>> torch.allclose(states["pooled"]["m"], states["tokens"]["m"].mean(dim=2))
    True
    """
    tokens = {m: [] for m in probes.modalities}
    n = len(probes)
    for start in track(range(0, n, batch_size), desc="hidden states", unit="batch", disable=not progress):
        rows = slice(start, start + batch_size)
        extra = {}
        if probes.attention_mask is not None:  # blocks of varying length: skip their padding slots
            mask = probes.attention_mask[rows].to(probes.embeds.device)
            extra = {"attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0)}
        with block_outputs(model) as outputs:
            model(inputs_embeds=probes.embeds[rows], use_cache=False, **extra)
        for m, pos in probes.positions.items():
            tokens[m].append(torch.stack([o[:, pos].float().cpu() for o in outputs]))
    tokens = {m: torch.cat(chunks, dim=1) for m, chunks in tokens.items()}
    return {"tokens": tokens, "pooled": {m: _block_mean(t, probes.block_mask.get(m)) for m, t in tokens.items()}}


def _block_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over a block's tokens ``[L, K, T_m, d] -> [L, K, d]``; over the real ones if ``mask [K, T_m]`` is given."""
    if mask is None:
        return tokens.mean(dim=2)
    weights = mask.to(tokens.dtype)[None, :, :, None]
    return (tokens * weights).sum(dim=2) / weights.sum(dim=2)


def collect_states(peft_model, adapter_names: list[str], probes: Probes, batch_size: int = 16) -> dict:
    r"""States of the base (all LoRA disabled) and of each named adapter on the same probes (§4.1).

    These are :math:`\mathbf H^{l,(k)}_{m_i\to\mathrm{base}}` and :math:`\mathbf H^{l,(k)}_{m_i\to\theta_j}`
    of the paper. The model is put in eval mode, and the last named adapter is left active.

    Parameters
    ----------
    peft_model : peft.PeftModel
        The base LLM holding every adapter (``esmerge.specialists.adapters.attach``).
    adapter_names : list of str
        The adapters to read, in order.
    probes : Probes
        K probes.
    batch_size : int
        Probes per forward pass (memory only).

    Returns
    -------
    dict of str to dict
        ``{"base": states, name: states, ...}``, each ``states`` as ``hidden_states`` returns it.

    Examples
    --------
    A fresh LoRA has B = 0, so its specialist equals the base:

    >>> from peft import LoraConfig, get_peft_model
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> model = tiny_llama()
    >>> peft_model = get_peft_model(model, LoraConfig(r=1, target_modules=["q_proj"]))
    >>> states = collect_states(peft_model, ["default"], Probes(torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}))
    >>> sorted(states), torch.equal(states["base"]["pooled"]["m"], states["default"]["pooled"]["m"])
    (['base', 'default'], True)
    """
    peft_model.eval()
    with peft_model.disable_adapter():
        result = {"base": hidden_states(peft_model, probes, batch_size)}
    for name in track(adapter_names, desc="specialist states", unit="adapter"):
        peft_model.set_adapter(name)
        result[name] = hidden_states(peft_model, probes, batch_size)
    return result
