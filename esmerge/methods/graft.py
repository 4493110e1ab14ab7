r"""Graft (Dai et al., "Graft: Integrating the Domain Knowledge via Efficient Parameter Synergy for MLLMs").

Dual-gate fusion of a *base* and a *graft* LoRA matrix (Graft Eqs. 1-8, Algorithm 1),
applied to every LoRA A (``[r, d_in]``) and B (``[d_out, r]``) matrix with rows as output
channels. The activation-based compatibility score (Eqs. 9-14), a diagnostic, is in
``esmerge.methods.graft_compatibility``.

Two places where the paper contradicts itself, and what we implement:

* Global gate: Eq. 4 reads :math:`\frac{a}{c}\arctan(c\,\Delta H) + \frac12`, Algorithm 1
  :math:`\frac{a}{\pi}\arctan(c\,\Delta H) + \frac12`. With the paper's constants a=0.4,
  c=500, Eq. 4's gate lies in :math:`0.5 \pm 0.0013` -- the global gate would be inert,
  contradicting the ablation (Table 5) where removing it changes results. Algorithm 1's
  form spans (0.3, 0.7) and is in (0, 1) for any a <= 1, as Eq. 4 claims. We use Algorithm 1.
* Graft weight: Eq. 6 has :math:`1 - e^{+(1-w_g)(1-w_l)}` (always negative), Algorithm 1
  :math:`1 - e^{-(1-w_g)(1-w_l)}`, the mirror image of Eq. 5. We use Algorithm 1.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

from esmerge.methods import HParam, MergeResult, register
from esmerge.methods.static import task_names
from esmerge.specialists.adapters import Adapter, with_state

GRAFT_A, GRAFT_C, GRAFT_BINS = 0.4, 500.0, 10  # Graft Sec. 4.1


def channel_difference(base: torch.Tensor, graft: torch.Tensor) -> torch.Tensor:
    r"""Absolute difference of two matrices per output channel (row), Graft Eq. 1.

    :math:`d_i = \sum_j |W_b[i,j] - W_g[i,j]|`.

    Parameters
    ----------
    base, graft : Tensor, shape ``[M, N]``
        The two matrices; rows are output channels.

    Returns
    -------
    Tensor, shape ``[M]``
        d.

    Examples
    --------
    >>> channel_difference(torch.tensor([[1., 2.], [0., 0.]]), torch.tensor([[0., 0.], [0., 1.]]))
    tensor([3., 1.])
    """
    return (base - graft).abs().sum(dim=1)


def standardize(d: torch.Tensor) -> torch.Tensor:
    r"""Our untrained channel gate network :math:`\phi` of Graft Eq. 2: the z-score of ``d``.

    The std is the sample one (unbiased). All zeros when every channel differs equally (or there
    is one channel).

    Parameters
    ----------
    d : Tensor, shape ``[M]``
        Channel differences (``channel_difference``).

    Returns
    -------
    Tensor, shape ``[M]``
        The z-scores.

    Examples
    --------
    [1, 3] has mean 2 and sample std sqrt(2):

    >>> standardize(torch.tensor([1., 3.]))
    tensor([-0.7071,  0.7071])
    >>> standardize(torch.tensor([2., 2.]))
    tensor([0., 0.])
    """
    std = d.std() if d.numel() > 1 else torch.zeros(())
    return torch.where(std > 0, (d - d.mean()) / std.clamp(min=torch.finfo(d.dtype).tiny), torch.zeros_like(d))


def local_gate(d: torch.Tensor, phi: Callable[[torch.Tensor], torch.Tensor] = standardize) -> torch.Tensor:
    r"""Per-channel local gate :math:`w_{local} = \sigma(\phi(d)) \in (0,1)^M` (Graft Eq. 2).

    Parameters
    ----------
    d : Tensor, shape ``[M]``
        Channel differences (``channel_difference``).
    phi : callable
        The channel gate network, ``[M] -> [M]`` (default: ``standardize``).

    Returns
    -------
    Tensor, shape ``[M]``
        The gate, in (0, 1).

    Examples
    --------
    sigmoid(-0.7071) = 0.3302; equal differences give the neutral gate 0.5:

    >>> local_gate(torch.tensor([1., 3.]))
    tensor([0.3302, 0.6698])
    >>> local_gate(torch.tensor([2., 2.]))
    tensor([0.5000, 0.5000])
    """
    return torch.sigmoid(phi(d))


def weight_entropy(weight: torch.Tensor, bins: int = GRAFT_BINS) -> torch.Tensor:
    r"""Entropy of a matrix's value histogram, :math:`H = -\sum_k p_k \log p_k` (Graft Eq. 3).

    ``bins`` uniform bins span the matrix's own [min, max]; a constant matrix has H = 0.

    Parameters
    ----------
    weight : Tensor
        Any shape; its values are binned.
    bins : int
        Number of bins (Graft: 10).

    Returns
    -------
    Tensor, shape ``[]``
        H, in nats.

    Examples
    --------
    >>> round(float(weight_entropy(torch.tensor([0.0, 1.0]), bins=2)), 4)  # two equal bins: log 2
    0.6931
    >>> float(weight_entropy(torch.ones(2, 2)))
    0.0
    """
    flat = weight.detach().float().reshape(-1)
    lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return torch.zeros(())
    p = torch.histc(flat, bins=bins, min=lo, max=hi) / flat.numel()
    p = p[p > 0]
    return -(p * p.log()).sum()


def global_gate(h_base: torch.Tensor | float, h_graft: torch.Tensor | float, a: float = GRAFT_A,
                c: float = GRAFT_C) -> torch.Tensor:
    r"""Global gate from the entropy gap of two matrices (Graft Algorithm 1, line 7; see the module doc).

    :math:`w_{global} = \frac{a}{\pi}\arctan(c\,[H(W_b) - H(W_g)]) + \frac12`, in
    :math:`(\frac12 - \frac a2, \frac12 + \frac a2)`.

    Parameters
    ----------
    h_base, h_graft : Tensor or float
        Entropies :math:`H(W_b)` and :math:`H(W_g)` (``weight_entropy``).
    a : float
        Range of the gate (Graft: 0.4).
    c : float
        Slope (Graft: 500).

    Returns
    -------
    Tensor, shape ``[]``
        The gate.

    Examples
    --------
    Equal entropies give 0.5; a gap of 1 nat gives nearly 0.5 + a/2 = 0.7:

    >>> float(global_gate(0.5, 0.5))
    0.5
    >>> round(float(global_gate(1.0, 0.0)), 4)
    0.6997
    """
    return a / math.pi * torch.atan(c * (torch.as_tensor(h_base) - torch.as_tensor(h_graft))) + 0.5


def dual_gate_weights(w_local: torch.Tensor, w_global: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-channel fusion weights of the base and the graft matrix (Graft Eqs. 5-7, Algorithm 1 lines 8-10).

    :math:`\tilde w_b = g(1 - e^{-g\,w_l})`, :math:`\tilde w_g = (1-g)(1 - e^{-(1-g)(1-w_l)})`,
    :math:`[w_b, w_g] = \mathrm{Softmax}([\tilde w_b, \tilde w_g])`, with g the global gate.

    Parameters
    ----------
    w_local : Tensor, shape ``[M]``
        Local gate (``local_gate``).
    w_global : Tensor, shape ``[]``
        Global gate (``global_gate``).

    Returns
    -------
    w_b, w_g : Tensor, shape ``[M]``
        Weights of the base and the graft; ``w_b + w_g = 1``.

    Examples
    --------
    Neutral gates (0.5 and 0.5) give equal weights; a global gate of 0.7 favours the base:

    >>> dual_gate_weights(torch.tensor([0.5]), torch.tensor(0.5))
    (tensor([0.5000]), tensor([0.5000]))
    >>> dual_gate_weights(torch.tensor([0.5]), torch.tensor(0.7))
    (tensor([0.5411]), tensor([0.4589]))
    """
    g = w_global
    tilde_b = g * (1 - torch.exp(-g * w_local))
    tilde_g = (1 - g) * (1 - torch.exp(-(1 - g) * (1 - w_local)))
    weights = torch.softmax(torch.stack([tilde_b, tilde_g]), dim=0)
    return weights[0], weights[1]


def graft_matrix(base: torch.Tensor, graft: torch.Tensor, a: float = GRAFT_A, c: float = GRAFT_C,
                 bins: int = GRAFT_BINS, phi: Callable = standardize) -> tuple[torch.Tensor, dict]:
    r"""Fuse two matrices with Graft's dual gate: :math:`W_f = w_b \odot W_b + w_g \odot W_g` (Graft Eq. 8).

    The weights are per output channel (row), from ``local_gate``, ``global_gate`` and
    ``dual_gate_weights``.

    Parameters
    ----------
    base, graft : Tensor, shape ``[M, N]``
        The two matrices (same shape).
    a, c, bins : float, float, int
        Global-gate range and slope, and entropy bins.
    phi : callable
        Channel gate network (default: ``standardize``).

    Returns
    -------
    fused : Tensor, shape ``[M, N]``
        :math:`W_f`.
    gates : dict
        ``{"w_global": float, "w_base_mean": float}``.

    Examples
    --------
    A matrix fused with itself is itself, with neutral gates:

    >>> w = torch.tensor([[1., 2.], [3., 4.]])
    >>> graft_matrix(w, w)
    (tensor([[1., 2.],
            [3., 4.]]), {'w_global': 0.5, 'w_base_mean': 0.5})
    """
    if base.shape != graft.shape:
        raise ValueError(f"graft needs equal shapes, got {tuple(base.shape)} vs {tuple(graft.shape)}")
    w_local = local_gate(channel_difference(base, graft), phi)
    w_global = global_gate(weight_entropy(base, bins), weight_entropy(graft, bins), a, c)
    w_b, w_g = dual_gate_weights(w_local, w_global)
    fused = w_b.unsqueeze(1) * base + w_g.unsqueeze(1) * graft
    return fused, {"w_global": float(w_global), "w_base_mean": float(w_b.mean())}


def graft_pair(base: dict[str, torch.Tensor], graft: dict[str, torch.Tensor], **kwargs) -> tuple[dict, dict]:
    """Graft every LoRA matrix of one adapter onto another's (Graft Eq. 8 per matrix).

    Parameters
    ----------
    base, graft : dict of str to Tensor, shape ``[M, N]``
        LoRA key -> matrix, same keys (tensors are used in float32).
    **kwargs
        ``a``, ``c``, ``bins``, ``phi`` of ``graft_matrix``.

    Returns
    -------
    state : dict of str to Tensor, shape ``[M, N]``
        LoRA key -> fused matrix.
    gates : dict of str to dict
        LoRA key -> the gates of ``graft_matrix``.

    Examples
    --------
    Rows [1, 3] and [0, 0] swap between the two; the gates are neutral, so each row is the mean:

    >>> fused, gates = graft_pair({"k": torch.tensor([[1., 3.], [0., 0.]])}, {"k": torch.tensor([[0., 0.], [1., 3.]])})
    >>> fused["k"]
    tensor([[0.5000, 1.5000],
            [0.5000, 1.5000]])
    """
    fused, gates = {}, {}
    for key in sorted(base):
        fused[key], gates[key] = graft_matrix(base[key].float(), graft[key].float(), **kwargs)
    return fused, gates


@register("graft", "Graft",
          "Dai et al. 2025, Graft: Integrating the Domain Knowledge via Efficient Parameter Synergy for MLLMs",
          hparams=(HParam("order", list, nullable=True,
                          doc="grafting order of the tasks; null: the adapters' order"),
                   HParam("a", float, low=0.0, high=1.0, low_open=True, doc="global-gate range"),
                   HParam("c", float, low=0.0, low_open=True, doc="global-gate slope"),
                   HParam("bins", int, low=1, doc="histogram bins of the weight entropy")))
def graft(adapters: list[Adapter], context=None, order: list[str] | None = None, a: float = GRAFT_A,
          c: float = GRAFT_C, bins: int = GRAFT_BINS) -> MergeResult:
    r"""Graft's dual-gate LoRA fusion (Eqs. 1-8, Algorithm 1) extended to K experts by sequential grafting.

    :math:`W^{(1)} = W_{o_1}`, :math:`W^{(k)} = \mathrm{Fuse}(W^{(k-1)}, W_{o_k})`: the running
    fusion is the base, the next expert in ``order`` is grafted on.

    Parameters
    ----------
    adapters : list of Adapter
        The K experts.
    context : ignored
        Graft needs no context.
    order : list of task names, optional
        Grafting order (default: the adapters' order, molecule -> protein -> cell). Later
        experts get larger weight (about 1/2 for the last, 1/4 for the one before, ...), so
        the order matters; notebook 06 reports its effect.
    a, c, bins :
        Global-gate range and slope and histogram bins (paper: 0.4, 500, 10).

    Returns
    -------
    MergeResult
        The fused adapter; ``info`` holds the hyper-parameters and the mean gates of each step.

    Notes
    -----
    Choices where the paper is silent: the "learnable" channel gate network :math:`\phi`
    has no stated training objective or data, so we use a fixed, untrained affine map, the
    z-score of :math:`d` within the matrix (average disagreement -> gate 0.5); entropy bins
    span each matrix's own value range; rows are output channels for both A and B;
    K > 2 experts by sequential grafting (the paper fuses 3-4 experts without saying how).

    Examples
    --------
    >>> from esmerge.specialists.adapters import Adapter
    >>> a = Adapter({"k": torch.tensor([[1., 3.], [0., 0.]])}, {}, "molecule")
    >>> b = Adapter({"k": torch.tensor([[0., 0.], [1., 3.]])}, {}, "protein")
    >>> result = graft([a, b])
    >>> result.adapter.state["k"]
    tensor([[0.5000, 1.5000],
            [0.5000, 1.5000]])
    >>> result.info["steps"]
    [{'grafted': 'protein', 'mean_w_global': 0.5, 'mean_w_base': 0.5}]
    """
    start = time.perf_counter()
    names = task_names(adapters)
    order = list(order) if order is not None else names
    if sorted(order) != sorted(names):
        raise ValueError(f"graft order {order} must be a permutation of the tasks {names}")
    by_name = dict(zip(names, adapters))
    state = {k: v.float() for k, v in by_name[order[0]].state.items()}
    steps = []
    for name in order[1:]:
        state, gates = graft_pair(state, by_name[name].state, a=a, c=c, bins=bins)
        steps.append({
            "grafted": name,
            "mean_w_global": sum(g["w_global"] for g in gates.values()) / len(gates),
            "mean_w_base": sum(g["w_base_mean"] for g in gates.values()) / len(gates),
        })
    info = {
        "hparams": {"order": order, "a": a, "c": c, "bins": bins, "phi": "z-score (untrained)"},
        "steps": steps,
        "cost": {"wall_seconds": time.perf_counter() - start, "flops": None},
    }
    return MergeResult(with_state(adapters[0], state, "graft"), info)
