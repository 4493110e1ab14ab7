r"""Element scores from the gradient of a distance over a *batch* of probes (the official code's choice).

The paper (§4.3) takes the absolute value per probe sample k and modality i:

.. math::

    s^{l,n}_j = \sum_i \sum_k \Big|\frac{\partial r^{l,(k)}_{i\to j}}{\partial\theta^{l,n}_j}\Big|.

The official code instead takes it once per batch :math:`b` of probes (README: 2 probes): its
distance is the MSE over all the batch's tokens of that modality,

.. math::

    s^{l,n}_j = \sum_i \sum_b \Big|\frac{\partial r^{l,(b)}_{i\to j}}{\partial\theta^{l,n}_j}\Big|,
    \qquad r^{l,(b)}_{\mathrm{MSE}} = \frac{\sum_{k\in b}\lVert D^{l,(k)}\rVert_F^2}{d\,\sum_{k\in b} T_k},
    \qquad r^{l,(b)}_{F} = \Big(\sum_{k\in b}\lVert D^{l,(k)}\rVert_F^2\Big)^{1/2},

with :math:`D^{l,(k)}` probe k's token-state difference (:math:`T_k` tokens of width d). Both
gradients are weighted sums of the per-probe Frobenius gradients :math:`g_k = \partial\lVert
D^{(k)}\rVert_F/\partial\theta`: with :math:`u_b = \sum_{k\in b}\lVert D^{(k)}\rVert_F\,g_k`,
:math:`\partial r_{\mathrm{MSE}} = 2u_b/(d\sum T_k)` and :math:`\partial r_F = u_b/r_F`. So the
per-probe gradients of ``gradients`` give them, signed, before the absolute value; a
batch may span several forward passes (``BatchMeanScores.feed``), and the probes of varying length
(run one by one) are grouped the same way. With one probe per batch this is the paper's score.
"""
from __future__ import annotations

import torch

from esmerge.progress import track
from esmerge.signals.elementwise import DISTANCES
from esmerge.signals.gradients import BATCH_SIZE, batch_distance_gradients
from esmerge.signals.hooks import lora_parameters
from esmerge.specialists.adapters import layer_of


def batch_score_terms(u: torch.Tensor, r2: torch.Tensor, tokens: torch.Tensor, width: int) -> dict[str, torch.Tensor]:
    r"""Batch-mean element scores of one LoRA tensor from its per-batch signed sums (§4.3, official code).

    With the notation of this module's docstring, the Frobenius score is
    :math:`\sum_b |u_b| / r_F^{(b)}` and the MSE score :math:`\sum_b 2|u_b| / (d \sum_{k\in b} T_k)`.

    Parameters
    ----------
    u : Tensor, shape ``[G, *shape]``
        :math:`u_b = \sum_{k\in b}\lVert D^{(k)}\rVert_F\,g_k` of G finished batches.
    r2 : Tensor, shape ``[G]``
        :math:`\sum_{k\in b}\lVert D^{(k)}\rVert_F^2` of each batch.
    tokens : Tensor, shape ``[G]``
        :math:`\sum_{k\in b} T_k`, the tokens of each batch.
    width : int
        d, the width of the states.

    Returns
    -------
    dict of str to Tensor, shape ``[*shape]``
        Distance -> :math:`\sum_b|\partial r^{(b)}/\partial\theta|`.

    Examples
    --------
    Frobenius: |3| / sqrt(9) + |-4| / sqrt(4) = 1 + 2 = 3. MSE: 2·3 / (1·2) + 2·4 / (1·2) = 3 + 4 = 7.

    >>> t = batch_score_terms(torch.tensor([[3.0], [-4.0]]), torch.tensor([9.0, 4.0]), torch.tensor([2.0, 2.0]), 1)
    >>> t["frobenius"].tolist(), t["mse"].tolist()
    ([3.0], [7.0])
    """
    shape = (-1,) + (1,) * (u.dim() - 1)
    magnitude = u.abs()
    return {"frobenius": (magnitude / r2.sqrt().view(shape)).sum(0),
            "mse": (2.0 * magnitude / (width * tokens).view(shape)).sum(0)}


class BatchMeanScores:
    """Accumulates batch-mean element scores of one adapter over probes fed in order.

    ``group`` consecutive probes form a batch (the last one may be shorter); ``n_samples``
    probes in all. ``feed`` runs one forward and backward of some probes; ``scores`` is then
    distance -> LoRA key -> ``[*shape]`` (float32), as ``element_scores_by_distance`` returns.
    """

    def __init__(self, model: torch.nn.Module, n_samples: int, group: int, width: int,
                 distances: tuple[str, ...] = DISTANCES, last_norm: torch.nn.Module | None = None):
        if group < 1:
            raise ValueError(f"group must be >= 1, got {group}")
        unknown = set(distances) - set(DISTANCES)
        if unknown:
            raise ValueError(f"unknown distance(s) {sorted(unknown)}; choose from {DISTANCES}")
        params = lora_parameters(model)
        self.model, self.n, self.group, self.width, self.last_norm = model, n_samples, group, width, last_norm
        self.layer = {key: layer_of(key) for key in params}
        self.totals = {d: {k: torch.zeros(p.shape, dtype=torch.float64) for k, p in params.items()} for d in distances}
        self.pending: dict[tuple[str, str], torch.Tensor] = {}  # (modality, key) -> u of the open batch
        self.open_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # modality -> (r2 [L], tokens [])
        self.seen = 0

    def feed(self, embeds: torch.Tensor, positions: dict[str, torch.Tensor], base_tokens: dict[str, torch.Tensor]):
        """Probes ``seen .. seen + B - 1``: ``embeds [B, T, d]``, ``positions`` modality -> ``[T_m]``,
        ``base_tokens`` modality -> ``[L, B, T_m, d]`` (as ``batch_distance_gradients`` takes them)."""
        n_rows = embeds.shape[0]
        if self.seen + n_rows > self.n:
            raise ValueError(f"fed {self.seen + n_rows} probes, but {self.n} were announced")
        batch = (self.seen + torch.arange(n_rows)) // self.group
        local = batch - batch[0]
        n_local = int(local[-1]) + 1
        continues = self.seen % self.group != 0  # local batch 0 began in an earlier call
        end = self.seen + n_rows
        closes = end % self.group == 0 or end == self.n  # the last local batch is complete
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def batch_stats(modality, frob):
            if modality not in stats:
                r2 = torch.zeros(n_local, frob.shape[1], dtype=torch.float64).index_add_(
                    0, local, frob.detach().double().cpu().pow(2))
                tokens = torch.bincount(local, minlength=n_local).double() * len(positions[modality])
                if continues:
                    before_r2, before_tokens = self.open_stats[modality]
                    r2[0] += before_r2
                    tokens[0] += before_tokens
                stats[modality] = (r2, tokens)
            return stats[modality]

        def on_gradient(modality, key, grads, frob):
            r2, tokens = batch_stats(modality, frob)
            layer = self.layer[key]
            rows = (-1,) + (1,) * (grads.dim() - 1)
            weighted = grads.detach().double().cpu() * frob[:, layer].detach().double().cpu().view(rows)
            u = torch.zeros(n_local, *grads.shape[1:], dtype=torch.float64).index_add_(0, local, weighted)
            if continues:
                u[0] += self.pending.pop((modality, key))
            done = n_local if closes else n_local - 1
            if not closes:
                self.pending[(modality, key)] = u[-1]
            if done:
                terms = batch_score_terms(u[:done], r2[:done, layer], tokens[:done], self.width)
                for dist, total in self.totals.items():
                    total[key] += terms[dist]

        batch_distance_gradients(self.model, embeds, positions, base_tokens, "frobenius", on_gradient=on_gradient,
                                 last_norm=self.last_norm)
        if closes:
            self.open_stats = {}
        else:
            self.open_stats = {m: (r2[-1].clone(), tokens[-1].clone()) for m, (r2, tokens) in stats.items()}
        self.seen = end

    @property
    def scores(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.seen != self.n:
            raise RuntimeError(f"{self.seen} of {self.n} probes fed; the last batch is still open")
        return {d: {k: v.float() for k, v in total.items()} for d, total in self.totals.items()}


def batch_mean_scores(
    model: torch.nn.Module,
    probe_embeds: torch.Tensor,
    positions: dict[str, torch.Tensor],
    base_tokens: dict[str, torch.Tensor],
    group: int = 2,
    distances: tuple[str, ...] = DISTANCES,
    progress: bool = True,
    batch_size: int = BATCH_SIZE,
    last_norm: torch.nn.Module | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    r"""Element scores (§4.3) with the absolute value taken per batch of ``group`` probes (official code).

    :math:`s^{l,n}_j = \sum_i \sum_b |\partial r^{l,(b)}_{i\to j}/\partial\theta^{l,n}_j|`, with b runs of
    ``group`` consecutive probes (see this module's docstring). ``group=1`` is the paper's score.

    Parameters
    ----------
    model, probe_embeds, positions, base_tokens, distances, progress, last_norm
        As in ``esmerge.signals.element_scores.element_scores_by_distance``: ``probe_embeds
        [K, T, d]``, ``positions`` modality -> ``[T_m]``, ``base_tokens`` modality ->
        ``[L, K, T_m, d]``.
    group : int
        Probes per batch (official code: 2).
    batch_size : int
        Probes per forward pass (memory only).

    Returns
    -------
    dict of str to dict of str to Tensor, shape ``[*shape of key]``
        Distance -> (LoRA key -> scores, float32).

    Examples
    --------
    With one probe per batch the scores are the paper's per-probe ones:

    >>> from peft import LoraConfig, get_peft_model
    >>> from esmerge.specialists.base_llm import tiny_llama
    >>> llama = tiny_llama()
    >>> model = get_peft_model(llama, LoraConfig(r=1, target_modules=["q_proj"], init_lora_weights=False))
    >>> embeds, pos, base = torch.randn(2, 3, 4), {"m": torch.tensor([1, 2])}, {"m": torch.zeros(2, 2, 2, 4)}
    >>> from esmerge.signals.element_scores import element_scores_by_distance
    >>> paper = element_scores_by_distance(model, embeds, pos, base, progress=False)
    >>> ours = batch_mean_scores(model, embeds, pos, base, group=1, progress=False)
    >>> all(torch.allclose(ours[d][k], paper[d][k]) for d in paper for k in paper[d])
    True
    """
    n = probe_embeds.shape[0]
    acc = BatchMeanScores(model, n, group, probe_embeds.shape[-1], distances, last_norm)
    for start in track(range(0, n, batch_size), desc="element scores", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        acc.feed(probe_embeds[chunk], positions, {m: base_tokens[m][:, chunk] for m in positions})
    return acc.scores
