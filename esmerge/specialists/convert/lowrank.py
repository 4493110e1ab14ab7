"""Rank-r LoRA factors of a weight difference (truncated SVD), and how much of it they keep.

A LoRA adapter adds ``(alpha / r) * B @ A`` to a weight ``W`` (PEFT's scaling, paper Eq. 1's
``Delta W = B A`` with the scale folded in). Given a fine-tuned weight ``W'`` and its base ``W``,
the best rank-r approximation of ``Delta = W' - W`` in the Frobenius norm is the truncated SVD
``U_r S_r V_r^T`` (Eckart-Young). Splitting ``S_r`` evenly between the factors and dividing by
the LoRA scale gives factors of equal norm that PEFT turns back into exactly that approximation.
"""
from __future__ import annotations

import torch


def lowrank_factors(delta: torch.Tensor, rank: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """LoRA factors ``(A [r, d_in], B [d_out, r], relative_error)`` with ``(alpha/r) B A ~= delta``.

    ``delta`` is ``[d_out, d_in]`` (a ``torch.nn.Linear`` weight layout). The relative error is
    ``||delta - (alpha/r) B A||_F / ||delta||_F`` measured on the returned factors (0 for a zero
    delta, whose factors are zero). Computed in float32 on ``delta``'s device, returned on the CPU.
    A matrix of rank below ``rank`` gets zero columns for the missing singular values.

    >>> g = torch.Generator().manual_seed(0)
    >>> delta = torch.randn(6, 2, generator=g) @ torch.randn(2, 5, generator=g)  # rank 2
    >>> A, B, err = lowrank_factors(delta, rank=2, alpha=8)
    >>> A.shape, B.shape, err < 1e-6, torch.allclose(8 / 2 * B @ A, delta, atol=1e-5)
    (torch.Size([2, 5]), torch.Size([6, 2]), True, True)
    >>> _, _, err1 = lowrank_factors(delta, rank=1, alpha=8)
    >>> s = torch.linalg.svdvals(delta)
    >>> round(err1, 5) == round((s[1] / s.norm()).item(), 5)  # Eckart-Young: the dropped singular value
    True
    """
    if delta.ndim != 2 or rank < 1:
        raise ValueError(f"need a 2-D delta and rank >= 1, got shape {tuple(delta.shape)} and rank {rank}")
    work = delta.to(torch.float32)
    d_out, d_in = work.shape
    norm = torch.linalg.matrix_norm(work).item()
    if norm == 0.0:
        return torch.zeros(rank, d_in), torch.zeros(d_out, rank), 0.0
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    keep = min(rank, s.numel())
    root = (s[:keep] * (rank / alpha)).sqrt()
    a = torch.zeros(rank, d_in, device=work.device)
    b = torch.zeros(d_out, rank, device=work.device)
    a[:keep] = root[:, None] * vh[:keep]
    b[:, :keep] = u[:, :keep] * root[None, :]
    residual = work - (alpha / rank) * (b @ a)
    error = torch.linalg.matrix_norm(residual).item() / norm
    return a.cpu(), b.cpu(), error


def error_by_rank(singular_values: torch.Tensor) -> torch.Tensor:
    """Relative error ``||delta - delta_r||_F / ||delta||_F`` of the best rank-r approximation, for r = 0..n.

    ``singular_values`` is ``[n]`` (any order); the result is ``[n + 1]`` float64, entry r being
    ``sqrt(sum_{i > r} s_i^2) / sqrt(sum_i s_i^2)`` (Eckart-Young), so entry 0 is 1 and entry n is 0.
    A zero matrix has error 0 at every rank.

    >>> s = torch.linalg.svdvals(torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0])))
    >>> [round(e, 4) for e in error_by_rank(s).tolist()]
    [1.0, 0.6831, 0.4082, 0.1826, 0.0]
    >>> abs(error_by_rank(s)[2].item() - (5 / 30) ** 0.5) < 1e-12
    True
    """
    energy = torch.sort(singular_values.detach().to("cpu", torch.float64).flatten() ** 2, descending=True).values
    # tail[r] = sum of the squared singular values a rank-r approximation drops
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    total = tail[0].item()
    return (tail / total).clamp(min=0.0).sqrt() if total > 0 else torch.zeros_like(tail)


def smallest_rank_within(curves: dict[str, torch.Tensor], budget: float, max_rank: int | None = None) -> int | None:
    """The smallest rank r >= 1 at which every matrix's relative error is at most ``budget``.

    ``curves`` maps a matrix name to its ``error_by_rank`` curve ``[n_k + 1]`` (a curve shorter than
    r + 1 reaches 0 at its full rank, so it is within any budget beyond that). Ranks above
    ``max_rank`` are not considered; ``None`` when no considered rank fits.

    >>> diag = error_by_rank(torch.tensor([4.0, 3.0, 2.0, 1.0]))
    >>> smallest_rank_within({"m": diag}, 0.41), smallest_rank_within({"m": diag}, 0.40)
    (2, 3)
    >>> smallest_rank_within({"m": diag, "flat": error_by_rank(torch.ones(4))}, 0.41)  # the worst matrix decides
    4
    >>> smallest_rank_within({"m": diag}, 0.1, max_rank=3) is None
    True
    """
    if not curves:
        return None
    full = max(len(c) - 1 for c in curves.values())
    top = full if max_rank is None else min(max_rank, full)
    for rank in range(1, top + 1):
        if all((c[rank].item() if rank < len(c) else 0.0) <= budget for c in curves.values()):
            return rank
    return None
