"""LS-Merge (Soro et al. 2026): merging in the latent space of a VAE trained on parameter chunks.

Paper App. A.3: parameters are split into chunks of 16,384, a VAE is trained on the chunks
of all specialists (batch 512, lr 3e-4 with 500 warm-up steps and cosine decay, KL weight
1e-4 adapted toward a target KL of 50, 1,000 epochs); each specialist's chunks are encoded,
the posterior means are averaged uniformly and decoded back to parameters.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from esmerge.errors import LR_MAX
from esmerge.methods import HParam, MergeResult, register
from esmerge.methods import primitives as P
from esmerge.methods.objectives import count_flops
from esmerge.progress import track
from esmerge.specialists.adapters import Adapter, with_state


@dataclass
class VAEConfig:
    """LS-Merge VAE and training settings. Defaults: the paper's where it states them."""

    chunk: int = 16384  # paper
    hidden: int = 256  # ours (the paper's VAE is a transformer of unstated size)
    latent: int = 64  # ours
    epochs: int = 1000  # paper
    batch: int = 512  # paper
    lr: float = 3e-4  # paper
    warmup: int = 500  # paper (steps); capped at a tenth of all steps for short runs
    kl_weight: float = 1e-4  # paper, initial value
    target_kl: float = 50.0  # paper, nats per chunk
    kl_adapt: float = 1.01  # ours: multiplicative step of the KL-weight controller
    seed: int = 0


def chunk_vectors(tau: torch.Tensor, chunk: int) -> torch.Tensor:
    """Split each flattened adapter into chunks of equal size, zero-padding the last one.

    LS-Merge's VAE works on these chunks (paper App. A.3: 16,384 parameters each).

    Parameters
    ----------
    tau : Tensor, shape ``[T, P]``
        T flattened adapters (``primitives.flatten``).
    chunk : int
        Entries per chunk.

    Returns
    -------
    Tensor, shape ``[T, ceil(P / chunk), chunk]``
        The chunks.

    Examples
    --------
    >>> chunk_vectors(torch.tensor([[1., 2., 3.]]), 2)
    tensor([[[1., 2.],
             [3., 0.]]])
    """
    n_chunks = math.ceil(tau.shape[1] / chunk)
    padded = torch.zeros(tau.shape[0], n_chunks * chunk, dtype=tau.dtype)
    padded[:, : tau.shape[1]] = tau
    return padded.reshape(tau.shape[0], n_chunks, chunk)


def key_scales(adapters: list[Adapter], keys: list[str]) -> torch.Tensor:
    """Standard deviation of each LoRA key over all adapters, repeated for each of its entries.

    A and B matrices differ in scale by orders of magnitude; dividing each key by its own
    scale lets one VAE model both (our choice; the paper does not say how it normalises).

    Parameters
    ----------
    adapters : list of Adapter
        The T adapters.
    keys : list of str
        Key order of the flat layout (``primitives.flatten``).

    Returns
    -------
    Tensor, shape ``[P]``
        The scale of each flat entry: its key's sample std (1 where that is 0).

    Examples
    --------
    Key v holds 1, -1, 1, -1 over the two adapters: std sqrt(4/3) = 1.1547. Key w is all zero:

    >>> from esmerge.specialists.adapters import Adapter
    >>> a = Adapter({"v": torch.tensor([1., -1.]), "w": torch.zeros(1)}, {})
    >>> key_scales([a, a], ["v", "w"])
    tensor([1.1547, 1.1547, 1.0000])
    """
    parts = []
    for key in keys:
        values = torch.stack([a.state[key].float() for a in adapters])
        std = values.std()
        parts.append(torch.full((values[0].numel(),), float(std) if std > 0 else 1.0))
    return torch.cat(parts)


class ChunkVAE(nn.Module):
    """MLP VAE over parameter chunks, conditioned on the chunk's position in the adapter.

    The position embedding lets one small network model chunks of different layers/modules.
    """

    def __init__(self, chunk: int, hidden: int, latent: int, n_positions: int):
        super().__init__()
        self.position = nn.Embedding(n_positions, hidden)
        self.encoder_in = nn.Linear(chunk, hidden)
        self.encoder_out = nn.Linear(hidden, 2 * latent)
        self.decoder_in = nn.Linear(latent, hidden)
        self.decoder_out = nn.Linear(hidden, chunk)

    def encode(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, chunk), pos: (B,) -> posterior mean and log-variance, each (B, latent)."""
        h = torch.nn.functional.gelu(self.encoder_in(x) + self.position(pos))
        mu, logvar = self.encoder_out(h).chunk(2, dim=-1)
        return mu, logvar.clamp(-20, 10)

    def decode(self, z: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """z: (B, latent), pos: (B,) -> (B, chunk)."""
        return self.decoder_out(torch.nn.functional.gelu(self.decoder_in(z) + self.position(pos)))

    def forward(self, x, pos):
        mu, logvar = self.encode(x, pos)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        return self.decode(z, pos), mu, logvar


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    r"""KL divergence of a diagonal Gaussian posterior from the standard normal, averaged over the batch.

    :math:`\mathrm{KL}(q(z|x)\,\|\,\mathcal N(0,I)) = -\frac12\sum(1 + \log\sigma^2 - \mu^2 - \sigma^2)` per
    sample, summed over latents.

    Parameters
    ----------
    mu, logvar : Tensor, shape ``[B, latent]``
        Posterior mean and log-variance.

    Returns
    -------
    Tensor, shape ``[]``
        The mean KL, in nats.

    Examples
    --------
    The standard normal itself has KL 0; moving the mean to (1, 1) costs (1 + 1) / 2 = 1:

    >>> kl_divergence(torch.zeros(1, 2), torch.zeros(1, 2)), kl_divergence(torch.ones(1, 2), torch.zeros(1, 2))
    (tensor(0.), tensor(1.))
    """
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=-1)).mean()


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Learning rate at a step: linear warm-up, then cosine decay to 0 (LS-Merge, paper App. A.3).

    Parameters
    ----------
    step : int
        The step, from 0.
    total : int
        All steps.
    base : float
        Peak learning rate.
    warmup : int
        Warm-up steps.

    Returns
    -------
    float
        The learning rate.

    Examples
    --------
    Warm-up reaches the peak at step 9; the cosine is half-way at step 60 of 110:

    >>> lr_at(0, 110, 1.0, 10), lr_at(9, 110, 1.0, 10), lr_at(60, 110, 1.0, 10), lr_at(110, 110, 1.0, 10)
    (0.1, 1.0, 0.5, 0.0)
    """
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def reconstruction_error(vae: ChunkVAE, chunks: torch.Tensor, positions: torch.Tensor) -> float:
    """Mean squared error of the chunks decoded from their posterior means.

    Parameters
    ----------
    vae : ChunkVAE
        The VAE.
    chunks : Tensor, shape ``[N, chunk]``
        Parameter chunks.
    positions : Tensor, shape ``[N]``
        Position index of each chunk.

    Returns
    -------
    float
        The MSE over all entries.

    Examples
    --------
    A decoder that outputs 0 leaves the mean square of the chunk, (1 + 9) / 2 = 5:

    >>> vae = ChunkVAE(chunk=2, hidden=3, latent=1, n_positions=1)
    >>> _ = torch.nn.init.zeros_(vae.decoder_out.weight), torch.nn.init.zeros_(vae.decoder_out.bias)
    >>> reconstruction_error(vae, torch.tensor([[1., 3.]]), torch.tensor([0]))
    5.0
    """
    with torch.no_grad():
        mu, _ = vae.encode(chunks, positions)
        return float((vae.decode(mu, positions) - chunks).pow(2).mean())


def train_vae(chunks: torch.Tensor, positions: torch.Tensor, config: VAEConfig,
              progress: bool = True) -> tuple[ChunkVAE, dict]:
    """Train a :class:`ChunkVAE` on parameter chunks (LS-Merge, paper App. A.3).

    AdamW with warm-up and cosine decay (``lr_at``); the KL weight follows a controller toward
    ``config.target_kl``. Seeded by ``config.seed``.

    Parameters
    ----------
    chunks : Tensor, shape ``[N, chunk]``
        Parameter chunks of all adapters.
    positions : Tensor, shape ``[N]``
        Position index of each chunk within its adapter.
    config : VAEConfig
        Sizes and training settings.
    progress : bool
        Show a progress bar.

    Returns
    -------
    vae : ChunkVAE
        The trained VAE.
    log : dict
        ``recon_before``, ``recon_after`` (``reconstruction_error``) and per-epoch ``loss``,
        ``kl`` and ``kl_weight``.

    Examples
    --------
    >>> chunks, positions = torch.tensor([[1., 2.], [3., 4.], [1., 2.], [3., 4.]]), torch.tensor([0, 1, 0, 1])
    >>> config = VAEConfig(chunk=2, hidden=8, latent=2, epochs=50, batch=4, lr=1e-2, warmup=1)
    >>> vae, log = train_vae(chunks, positions, config, progress=False)
    >>> len(log["loss"]), log["recon_after"] < log["recon_before"]  # one entry per epoch; it learnt
    (50, True)
    """
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    vae = ChunkVAE(chunks.shape[1], config.hidden, config.latent, int(positions.max()) + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(chunks) / config.batch)
    total = config.epochs * steps_per_epoch
    warmup = min(config.warmup, max(1, total // 10))
    beta, step = config.kl_weight, 0
    log = {"recon_before": reconstruction_error(vae, chunks, positions), "loss": [], "kl": [], "kl_weight": []}
    for _ in track(range(config.epochs), desc="ls-merge VAE", unit="epoch", disable=not progress):
        order = torch.randperm(len(chunks), generator=gen)
        for start in range(0, len(chunks), config.batch):
            idx = order[start : start + config.batch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, config.lr, warmup)
            recon, mu, logvar = vae(chunks[idx], positions[idx])
            recon_loss = (recon - chunks[idx]).pow(2).sum(dim=-1).mean()
            kl = kl_divergence(mu, logvar)
            loss = recon_loss + beta * kl
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            # Controller toward the target KL: raise the weight when KL overshoots, lower it otherwise.
            beta = min(1.0, max(1e-8, beta * (config.kl_adapt if float(kl.detach()) > config.target_kl
                                              else 1 / config.kl_adapt)))
            step += 1
        log["loss"].append(float(loss.detach()))
        log["kl"].append(float(kl.detach()))
        log["kl_weight"].append(beta)
    log["recon_after"] = reconstruction_error(vae, chunks, positions)
    return vae, log


_VAE_FIELDS = (
    HParam("chunk", int, low=1, doc="parameters per chunk"),
    HParam("hidden", int, low=1, doc="VAE hidden width"),
    HParam("latent", int, low=1, doc="VAE latent size"),
    HParam("epochs", int, low=0, doc="VAE training epochs"),
    HParam("batch", int, low=1, doc="chunks per batch"),
    HParam("lr", float, low=0.0, high=LR_MAX, low_open=True, doc="peak learning rate"),
    HParam("warmup", int, low=0, doc="warm-up steps"),
    HParam("kl_weight", float, low=0.0, doc="initial KL weight"),
    HParam("target_kl", float, low=0.0, doc="target KL per chunk (nats)"),
    HParam("kl_adapt", float, low=1.0, doc="multiplicative step of the KL-weight controller"),
    HParam("seed", int, doc="seed of the VAE and its batches"),
)


@register("ls-merge", "LS-Merge", "Soro et al. 2026 (LS-Merge); settings of ES-Merging App. A.3", hparams=(
    *_VAE_FIELDS, HParam("count_cost", bool, doc="count FLOPs (FlopCounterMode)"),
    HParam("progress", bool, doc="show a progress bar")), defaults=VAEConfig())
def ls_merge(adapters: list[Adapter], context=None, count_cost: bool = True, progress: bool = True,
             **config_overrides) -> MergeResult:
    r"""LS-Merge: :math:`\hat\theta = \mathrm{Dec}(\frac1K \sum_t \mu_{\phi}(\theta_t))` chunk by chunk.

    A baseline of the paper (App. A.2-A.3): the specialists' chunks are encoded, their posterior
    means are averaged uniformly and decoded back to parameters.

    Parameters
    ----------
    adapters : list of Adapter
        The K specialists.
    context : ignored
        LS-Merge needs no context.
    count_cost : bool
        Count FLOPs (FlopCounterMode).
    progress : bool
        Show a progress bar.
    **config_overrides
        Fields of :class:`VAEConfig` (e.g. ``epochs=200``).

    Returns
    -------
    MergeResult
        The merged adapter; ``info`` holds the VAE settings, the number of chunks, the VAE's
        reconstruction errors and KL, and the cost.

    Notes
    -----
    Choices where the paper is silent or we deviate: an MLP VAE (one hidden layer,
    ``hidden=256``, ``latent=64``) conditioned on a learned chunk-position embedding,
    instead of LS-Merge's transformer VAE; each LoRA tensor is divided by its standard
    deviation over the specialists before chunking and multiplied back after decoding;
    the last chunk is zero-padded; the KL weight follows a multiplicative controller
    (x1.01 per step when KL > target, /1.01 otherwise); warm-up is capped at a tenth of
    all steps. At ``cpu`` scale (3 adapters of 2.44M entries = 450 chunks) the default
    1,000 epochs took 7 minutes on one shared CPU thread (1.9e13 FLOPs).

    Examples
    --------
    Two adapters of 3 entries in chunks of 2: 2 chunks each, 4 in all. The merged values depend
    on the trained VAE:

    >>> from esmerge.specialists.adapters import Adapter
    >>> key = "layers.0.self_attn.q_proj.lora_A.weight"
    >>> a = Adapter({key: torch.tensor([[1., 2., 3.]])}, {}, "molecule")
    >>> b = Adapter({key: torch.tensor([[3., 2., 1.]])}, {}, "protein")
    >>> result = ls_merge([a, b], count_cost=False, progress=False, chunk=2, hidden=8, latent=2, epochs=5, batch=4,
    ...                   warmup=1)
    >>> result.info["n_chunks"], result.adapter.state[key].shape
    (4, torch.Size([1, 3]))
    """
    config = VAEConfig(**config_overrides)
    start = time.perf_counter()
    tau, keys, shapes = P.flatten(adapters)
    scale = key_scales(adapters, keys)
    chunks = chunk_vectors(tau / scale, config.chunk)  # (T, C, chunk)
    n_tasks, n_chunks, _ = chunks.shape
    positions = torch.arange(n_chunks).repeat(n_tasks)
    flat_chunks = chunks.reshape(-1, config.chunk)
    (vae, log), flops = count_flops(lambda: train_vae(flat_chunks, positions, config, progress), enabled=count_cost)
    with torch.no_grad():
        mu, _ = vae.encode(flat_chunks, positions)
        merged_latent = mu.reshape(n_tasks, n_chunks, -1).mean(dim=0)
        decoded = vae.decode(merged_latent, torch.arange(n_chunks)).reshape(-1)[: tau.shape[1]]
    merged = decoded * scale
    info = {
        "hparams": asdict(config),
        "n_chunks": int(n_chunks) * int(n_tasks),
        "vae": {"recon_mse_before": log["recon_before"], "recon_mse_after": log["recon_after"],
                "final_kl": log["kl"][-1] if log["kl"] else None,
                "final_kl_weight": log["kl_weight"][-1] if log["kl_weight"] else None,
                "loss_history": log["loss"]},
        "cost": {"wall_seconds": time.perf_counter() - start, "flops": flops},
    }
    return MergeResult(with_state(adapters[0], P.unflatten(merged, keys, shapes), "ls-merge"), info)
