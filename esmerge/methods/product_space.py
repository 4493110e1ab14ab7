r"""Average and TIES in product space: merge each module's :math:`\Delta W = s\,B A`, return a rank-k LoRA.

The registry's ``avg`` and ``ties`` merge the factors ``A`` and ``B`` separately (the paper's
Eq. 1/4 way: the merged update is :math:`\bar B \bar A`, not the mean of the :math:`B_t A_t`).
Here (``esmerge merge --space product``, bring-your-own adapters) each adapted module's
:math:`\Delta W_t = s_t B_t A_t` is merged instead, and the merged :math:`\Delta W` is returned as a
LoRA of rank ``k`` (default: the largest input rank) by truncated SVD,
:math:`B = U_k \sqrt{S_k}`, :math:`A = \sqrt{S_k} V_k^\top`, config ``r = lora_alpha = k`` (scale 1).
Each module's relative reconstruction error :math:`\lVert \Delta W - B A\rVert_F / \lVert \Delta W\rVert_F`
(0 when the rank suffices: ``k`` at least the sum of the input ranks for ``avg``) is recorded.

* ``avg``: :math:`\Delta W = \frac1T \sum_t s_t B_t A_t`. Its rank is at most :math:`\sum_t r_t`, so
  it is decomposed exactly from the stacked factors (two thin QRs and the SVD of a small core)
  without forming :math:`\Delta W`; equal to PEFT's ``add_weighted_adapter(combination_type="cat")``
  with weights ``1/T``, truncated.
* ``ties``: trim each :math:`\Delta W_t` to its ``keep`` fraction of largest magnitudes, elect the sign
  of :math:`\sum_t` per entry (a zero sum elects +), average the entries that agree, times
  :math:`\lambda`; per module (``scope="tensor"``; the whole-model threshold would need every
  module's dense delta at once and is refused). The kept count of ``P`` entries is rounded as
  esmerge's factor-space TIES rounds it, ``P - int(P (1 - keep))`` (``rounding="esmerge"``), or as
  PEFT's ``ties_svd`` does, ``int(P keep)`` (``rounding="peft"``); e.g. ``P = 16``, ``keep = 0.2``:
  4 vs 3 entries. Entries are ranked with ``torch.topk`` (exactly that many kept).
"""
from __future__ import annotations

import time

import torch

from esmerge.errors import UsageError
from esmerge.specialists.adapters import Adapter
from esmerge.specialists.lora_layout import factors, module_path, module_scale

METHODS = ("avg", "ties")
ROUNDINGS = ("esmerge", "peft")


def kept_count(n: int, keep: float, rounding: str = "esmerge") -> int:
    """Entries of ``n`` that TIES keeps at fraction ``keep``.

    >>> kept_count(16, 0.2), kept_count(16, 0.2, "peft"), kept_count(10, 0.2), kept_count(10, 0.2, "peft")
    (4, 3, 2, 2)
    """
    if rounding == "esmerge":
        return n - int(n * (1.0 - keep))
    if rounding == "peft":
        return int(n * keep)
    raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")


def ties_deltas(deltas: torch.Tensor, keep: float, rounding: str = "esmerge") -> torch.Tensor:
    """TIES of ``T`` task deltas ``[T, ...]`` (trim, elect, disjoint mean; module docstring), shape ``[...]``.

    >>> ties_deltas(torch.tensor([[1., -2., 0.5], [3., 1., -0.5]]), keep=1.0)
    tensor([ 2.0000, -2.0000,  0.5000])
    """
    flat = deltas.reshape(deltas.shape[0], -1)
    k = kept_count(flat.shape[1], keep, rounding)
    trimmed = torch.zeros_like(flat)
    if k > 0:
        index = flat.abs().topk(k, dim=1).indices
        trimmed.scatter_(1, index, flat.gather(1, index))
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(flat.dtype)
    agree = (trimmed * sign) > 0
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    return merged.reshape(deltas.shape[1:])


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A [k, d_in], B [d_out, k], relative error)`` of the rank-k truncation of ``U diag(S) Vh``."""
    total = float((s.double() ** 2).sum())
    kept = min(k, s.shape[0])
    lost = float((s[kept:].double() ** 2).sum())
    root = s[:kept].sqrt()
    a = torch.zeros(k, vh.shape[1], dtype=vh.dtype, device=vh.device)
    b = torch.zeros(u.shape[0], k, dtype=u.dtype, device=u.device)
    a[:kept] = root[:, None] * vh[:kept]
    b[:, :kept] = u[:, :kept] * root
    return a, b, (lost / total) ** 0.5 if total > 0 else 0.0


def low_rank_of_sum(bs: list[torch.Tensor], as_: list[torch.Tensor], k: int):
    r"""Rank-k SVD truncation of :math:`\sum_i B_i A_i`, from the factors (exact, never forms the product).

    Returns ``(A, B, relative error)``.
    """
    b = torch.cat(bs, dim=1).double()  # [d_out, R]
    a = torch.cat(as_, dim=0).double()  # [R, d_in]
    qb, rb = torch.linalg.qr(b)  # b = qb rb
    qa, ra = torch.linalg.qr(a.T)  # a = ra^T qa^T
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    return _split(qb @ u, s, vh @ qa.T, k)


def low_rank(delta: torch.Tensor, k: int):
    """Rank-k SVD truncation of a dense ``delta``: ``(A, B, relative error)``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return _split(u, s, vh, k)


def _settings(method: str, hparams: dict) -> dict:
    """The method's hyper-parameters with the registry's defaults (``keep``, λ, ``scope`` for ties)."""
    from esmerge import methods

    settings = {h.name: h.default for h in methods.get(method).hparams} | dict(hparams)
    if method == "ties":
        scale = next((settings[n] for n in ("scaling_factor", "scale") if n in settings), 1.0)
        settings = {"keep": settings["keep"], "scaling_factor": scale, "scope": settings.get("scope", "tensor")}
    return settings


def check_space(method: str, hparams: dict, rank: int | None) -> None:
    """Refuse, in one line, what product space cannot do (before any adapter is read)."""
    if method not in METHODS:
        raise UsageError(f"--space product merges with {' or '.join(METHODS)}, not {method!r}; "
                         "use --space factors (the default) for the other methods")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise UsageError(f"--rank must be an integer >= 1 (the merged LoRA's rank), got {rank!r}")
    if method == "ties" and _settings(method, hparams)["scope"] != "tensor":
        raise UsageError("--space product trims each module's delta on its own (scope=tensor); "
                         "drop --set scope=model, or use --space factors")


def merge(adapters: list[Adapter], method: str, hparams: dict | None = None, rank: int | None = None,
          rounding: str = "esmerge", device: str | None = None) -> tuple[Adapter, dict]:
    """Merge adapters of one layout (``lora_layout.normalise``) in product space; ``(adapter, info)``.

    ``rank``: the output's rank ``k`` (default: the largest input rank). ``rounding``: TIES' kept count
    (module docstring). ``device``: where the products and SVDs run (default: CUDA when present).
    ``info`` records the space, rank, rounding, each module's relative reconstruction error and the
    largest of them.
    """
    hparams = dict(hparams or {})
    check_space(method, hparams, rank)
    settings = _settings(method, hparams)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    parts = [factors(adapter) for adapter in adapters]
    heads = list(dict.fromkeys(head for layout in parts for head in layout))
    k = rank or max(a.shape[0] for layout in parts for a, _ in layout.values())
    state, errors = {}, {}
    for head in heads:
        present = [(adapter, layout[head]) for adapter, layout in zip(adapters, parts) if head in layout]
        if method == "avg":  # absent adapters add a zero delta: they count in the mean
            bs = [module_scale(adapter.config, head) / len(adapters) * b.to(device) for adapter, (_, b) in present]
            a, b, err = low_rank_of_sum(bs, [a.to(device) for _, (a, _) in present], k)
        else:
            d_out, d_in = present[0][1][1].shape[0], present[0][1][0].shape[1]
            deltas = torch.zeros(len(adapters), d_out, d_in, device=device)
            for i, layout in enumerate(parts):
                if head in layout:
                    fa, fb = layout[head]
                    deltas[i] = module_scale(adapters[i].config, head) * (fb.to(device) @ fa.to(device))
            merged = settings["scaling_factor"] * ties_deltas(deltas, settings["keep"], rounding)
            a, b, err = low_rank(merged, k)
        state[f"{head}.lora_A.weight"] = a.float().cpu().contiguous()
        state[f"{head}.lora_B.weight"] = b.float().cpu().contiguous()
        errors[module_path(head)] = err
    config = dict(adapters[0].config, r=k, lora_alpha=k, rank_pattern={}, alpha_pattern={}, use_rslora=False)
    info = {"space": "product", "rank": k, "hparams": settings,
            "reconstruction_error": errors, "max_reconstruction_error": max(errors.values(), default=0.0),
            "cost": {"wall_seconds": time.perf_counter() - start}}
    if method == "ties":
        info["rounding"] = rounding
    return Adapter(state, config, f"{method}-product"), info
