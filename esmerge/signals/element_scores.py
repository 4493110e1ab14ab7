r"""Element scores :math:`s^{l,n}_j` of one specialist (paper §4.3), from either gradient layout.

``element_scores_by_distance`` takes the absolute value per probe (the paper, via
``esmerge.signals.gradients``) or of a batch mean (the official code, via
``esmerge.signals.gradient_batches``); ``esmerge.signals.elementwise`` turns scores into Eq. 3's
coefficients.
"""
from __future__ import annotations

import torch

from esmerge.progress import track
from esmerge.signals.elementwise import DISTANCES
from esmerge.signals.gradient_batches import batch_mean_scores
from esmerge.signals.gradients import BATCH_SIZE, batch_distance_gradients
from esmerge.signals.hooks import lora_parameters
from esmerge.specialists.adapters import layer_of


def element_scores(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distance: str = "frobenius",
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    grad_batch: int = 1,
    last_norm: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    r"""Element-wise importance scores of one specialist's LoRA elements (§4.3, the scores of Eq. 3).

    :math:`s^{l,n}_j = \sum_i\sum_k |\partial r^{l,(k)}_{i\to j}/\partial\theta^{l,n}_j|`: the absolute
    gradient of each probe's token distance, summed over probes k and modalities i.

    Parameters
    ----------
    model : torch.nn.Module
        Base LLM with specialist j's LoRA attached and active (gradients are enabled on its LoRA
        parameters here; all other parameters are untouched).
    probe_embeds : Tensor, shape ``[K, T, d]``
        Probe input embeddings.
    positions : dict of str to Tensor, shape ``[T_m]``
        Modality -> token positions of its block.
    base_tokens : dict of str to Tensor, shape ``[L, K, T_m, d]``
        Modality -> base token-level states.
    distance : {"frobenius", "mse"}
        ``"frobenius"`` (paper) or ``"mse"`` (official code).
    progress : bool
        Show a progress bar.
    batch_size : int
        Probe samples per batched pass (memory only; the scores do not depend on it).
    grad_batch : int
        Probes per absolute value: 1 (paper) takes it per probe; g > 1 takes it of the distance of
        each run of g consecutive probes' tokens together (official code: the MSE of a batch of
        2), see ``esmerge.signals.gradient_batches``.
    last_norm : torch.nn.Module, optional
        Read the last layer after this norm (see ``batch_distance_gradients``).

    Returns
    -------
    dict of str to Tensor, shape ``[*shape of key]``
        LoRA key -> scores (float32, >= 0).

    Examples
    --------
    A tiny LLaMA with a random LoRA, 2 probes and one modality block at tokens 1-2:

    >>> from peft import LoraConfig, get_peft_model
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> llama = tiny_llama()
    >>> model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    >>> embeds, pos, base = torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}, {"m": torch.zeros(2, 2, 2, 4)}
    >>> scores = element_scores(model, embeds, pos, base, progress=False)
    >>> key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    >>> scores[key].shape, scores[key].dtype, bool((scores[key] >= 0).all())  # A is [r, d]
    (torch.Size([1, 4]), torch.float32, True)
    """
    return element_scores_by_distance(model, probe_embeds, positions, base_tokens, (distance,), progress,
                                      batch_size, grad_batch, last_norm)[distance]


def element_scores_by_distance(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    distances: tuple[str, ...] = DISTANCES,
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    grad_batch: int = 1,
    last_norm: torch.nn.Module | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    r"""Element scores (§4.3) for several distances from one pass over the probes.

    With :math:`D` the token-state difference of ``T_m`` tokens of width ``d``,
    :math:`r_F = \lVert D\rVert_F` and :math:`r_{MSE} = r_F^2/(T_m d)`, so
    :math:`\partial r_{MSE}/\partial\theta = \frac{2 r_F}{T_m d}\,\partial r_F/\partial\theta`: one
    Frobenius gradient per (sample, modality) gives both scores.

    Parameters
    ----------
    model, probe_embeds, positions, base_tokens, progress, batch_size, grad_batch, last_norm
        As in ``element_scores``: ``probe_embeds [K, T, d]``, ``positions`` modality -> ``[T_m]``,
        ``base_tokens`` modality -> ``[L, K, T_m, d]``.
    distances : tuple of str
        Any of ``DISTANCES`` (``"frobenius"``, ``"mse"``).

    Returns
    -------
    dict of str to dict of str to Tensor, shape ``[*shape of key]``
        Distance -> (LoRA key -> scores, float32).

    Raises
    ------
    ValueError
        For an unknown distance or a ``batch_size`` below 1.

    Examples
    --------
    For one probe and one block of T_m = 2 tokens of width d = 4, the MSE score is the Frobenius
    score times 2 r_F / (T_m d), with r_F the probe's distance at that layer:

    >>> from peft import LoraConfig, get_peft_model
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> llama = tiny_llama()
    >>> model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    >>> embeds, pos, base = torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}, {"m": torch.zeros(2, 2, 2, 4)}
    >>> one = {"m": base["m"][:, :1]}  # the first probe's base states, [L, 1, T_m, d]
    >>> scores = element_scores_by_distance(model, embeds[:1], pos, one, progress=False)
    >>> _, dist = batch_distance_gradients(model, embeds[:1], pos, one)
    >>> key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    >>> r = dist["m"][0, 0]  # probe 0, layer 1
    >>> torch.allclose(scores["mse"][key], 2 * r / (2 * 4) * scores["frobenius"][key])
    True
    """
    unknown = set(distances) - set(DISTANCES)
    if unknown:
        raise ValueError(f"unknown distance(s) {sorted(unknown)}; choose from {DISTANCES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if grad_batch != 1:
        return batch_mean_scores(model, probe_embeds, positions, base_tokens, grad_batch, distances, progress,
                                 batch_size, last_norm)
    params = lora_parameters(model)
    layer = {key: layer_of(key) for key in params}
    scores = {dist: {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()} for dist in distances}
    width = probe_embeds.shape[-1]

    def accumulate(modality, key, grads, frob):
        magnitude = grads.abs().float()
        if "frobenius" in scores:
            scores["frobenius"][key] += magnitude.sum(dim=0)
        if "mse" in scores:
            factor = 2.0 * frob[:, layer[key]] / (len(positions[modality]) * width)  # [B]
            scores["mse"][key] += (magnitude * factor.float().view(-1, *[1] * (magnitude.dim() - 1))).sum(dim=0)

    n = probe_embeds.shape[0]
    for start in track(range(0, n, batch_size), desc="element scores", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        batch_distance_gradients(model, probe_embeds[chunk], positions,
                                 {m: base_tokens[m][:, chunk] for m in positions},
                                 "frobenius", on_gradient=accumulate, last_norm=last_norm)
    return scores
