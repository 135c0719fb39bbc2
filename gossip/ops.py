"""Pure tensor math of the averaging algorithms (no torch.distributed here).

Every function broadcasts over leading axes: a real rank holds its parameters as one flat row
``[1, P]``, the simulator holds ``[N, P]`` (one row per virtual node), and received models come as
``[L, K, P]`` (K peers per local row), or slot by slot as ``[L, P]``, with a boolean ``[L, K]``
mask of what arrived.

Papers: DiLoCo (arXiv 2311.08105), NoLoCo (arXiv 2506.10911), D-PSGD (arXiv 1705.09056), variance
correction (Tian et al. 2024, arXiv 2404.04616).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Segment",
    "mix",
    "noloco_update_",
    "row_var_mean",
    "segment_variances",
    "variance_correct_",
    "vc_segments",
]


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without waiting for the device: on CUDA a pinned copy sent
    with ``non_blocking`` (a plain host-to-device copy first waits for every kernel queued on
    the stream); elsewhere ``t.to(device)``. Not math: the simulator's bookkeeping (masks,
    steps, indices) reaches the GPU through it."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class Segment:
    """One parameter tensor inside a flat buffer: ``buffer[..., offset:offset + numel]``."""

    name: str
    offset: int
    numel: int
    shape: tuple[int, ...]
    in_scope: bool = False  # rescaled by variance correction

    @property
    def end(self) -> int:
        return self.offset + self.numel


def mix(x: Tensor, received: Tensor | Callable[[int], Tensor], self_weight: Tensor,
        weights: Tensor, mask: Tensor, *, out: Tensor | None = None) -> Tensor:
    """Gossip mixing ``x_i = W_ii x_i + sum_k W_ik x_k`` (D-PSGD, Lian et al. 2017).

    The weight of a peer whose model did not arrive goes to self, so rows stay stochastic.
    Shapes: x [L, P], self_weight [L], weights/mask [L, K]; ``received`` is [L, K, P] or a
    function giving slot k as [L, P] (read once per slot, in order). ``out`` receives the
    result without model-sized temporaries; it may be ``x`` itself when no slot reads ``x``.
    """
    w = torch.where(mask, weights, torch.zeros_like(weights)).to(x.dtype)
    lost = (weights.to(x.dtype) - w).sum(dim=-1)
    ws = (self_weight.to(x.dtype) + lost).unsqueeze(-1)
    out = torch.mul(x, ws, out=out)
    for k in range(weights.shape[-1]):
        slot = received[..., k, :] if isinstance(received, Tensor) else received(k)
        out.addcmul_(slot, w[..., k : k + 1])
    return out


def vc_segments(segments: Sequence[Segment]) -> list[Segment]:
    """The segments variance correction rescales: in scope, at least two elements."""
    return [seg for seg in segments if seg.in_scope and seg.numel >= 2]


def row_var_mean(x: Tensor, *, block: int = 1 << 18) -> tuple[Tensor, Tensor]:
    """Population variance and mean of each row of ``x`` [M, n], two-pass (mean, then the mean
    squared deviation), in blocks of rows of about ``block`` elements: the deviations of a
    block stay in cache, which makes it several times faster than ``torch.var`` on a CPU (on a
    GPU, one block: each would be a few kernel launches)."""
    rows = max(1, block // max(1, x.shape[1]) if x.device.type == "cpu" else x.shape[0])
    var = x.new_empty(x.shape[0])
    mean = x.new_empty(x.shape[0])
    for r0 in range(0, x.shape[0], rows):
        part = x[r0 : r0 + rows]
        mu = part.mean(dim=-1, keepdim=True)
        mean[r0 : r0 + rows] = mu[:, 0]
        torch.mean((part - mu).square_(), dim=-1, out=var[r0 : r0 + rows])
    return var, mean


def segment_variances(x: Tensor, segments: Sequence[Segment]) -> Tensor:
    """Population variance of each segment of each row: x [M, P] -> [M, len(segments)]."""
    if not segments:
        return x.new_zeros(x.shape[0], 0)
    return torch.stack([row_var_mean(x[:, seg.offset : seg.end])[0] for seg in segments],
                       dim=-1)


def variance_correct_(
    merged: Tensor,
    received_var: Tensor,
    mask: Tensor,
    segments: Sequence[Segment],
    *,
    eps: float = 1e-8,
    ratio: float = 1.0,
) -> Tensor:
    """Rescale each in-scope tensor of ``merged`` to the mean variance of the received models.

    Tian et al. 2024: target ``v* = mean_k Var(theta_k)`` over the received models (self not
    included); ``s = sqrt((v* + eps) / (Var(A) + eps))``, optionally ``s = 1 + ratio (s - 1)``;
    ``A = mean(A) + s (A - mean(A))``. Rows with nothing received are left unchanged, and so is
    a tensor of ``A`` that is constant when ``eps`` is 0 (``Var(A) = 0``: nothing to rescale,
    and ``s`` would be 0/0 or x/0).
    Shapes: merged [L, P] (changed in place); ``received_var`` [L, K, S] the received models'
    :func:`segment_variances` over ``vc_segments(segments)`` (S of them); mask [L, K].
    """
    m = mask.to(merged.dtype)
    n_recv = m.sum(dim=-1)  # [L]
    has = n_recv > 0
    for j, seg in enumerate(vc_segments(segments)):
        a = merged[..., seg.offset : seg.end]
        target = (received_var[..., j] * m).sum(dim=-1) / n_recv.clamp(min=1)
        v, mu = row_var_mean(a)
        mu = mu.unsqueeze(-1)
        den = v + eps
        s = torch.where(den > 0, torch.sqrt((target + eps) / den), torch.ones_like(den))
        s = (1.0 + ratio * (s - 1.0)).unsqueeze(-1)
        # A = mu + s (A - mu), in place; rows with nothing received (or nothing to rescale)
        # keep their exact bits
        change = has & (s.squeeze(-1) != 1.0)
        if bool(change.all()):
            a.sub_(mu).mul_(s).add_(mu)
        elif bool(change.any()):
            rows = change.nonzero().flatten()
            a[rows] = a[rows].sub_(mu[rows]).mul_(s[rows]).add_(mu[rows])
    return merged


def noloco_update_(
    delta: Tensor,
    phi: Tensor,
    theta_mean: Tensor,
    phi_mean: Tensor | None,
    *,
    alpha: float,
    beta: float,
    gamma: float,
) -> None:
    """NoLoCo outer step (Kolehmainen et al. 2025, reference code's sign), in place.

    ``delta = alpha delta + beta mean_G(theta - phi) - gamma (phi - mean_G(phi))``;
    ``phi = phi + delta``. With ``gamma == beta`` the two terms fold into
    ``beta (mean_G(theta) - phi)`` and ``phi_mean`` is not needed (pass None).

    ``theta_mean`` and ``phi_mean`` are scratch: they are overwritten (no model-sized
    temporaries, which on CPU cost about as much as the exchange itself).
    """
    if phi_mean is None:
        if gamma != beta:
            raise ValueError(f"phi_mean is required when gamma ({gamma}) != beta ({beta})")
        delta.mul_(alpha).add_(theta_mean.sub_(phi), alpha=beta)
    else:
        # mean_G(theta - phi) = mean_G(theta) - mean_G(phi); phi - mean_G(phi) = -(phi_mean - phi)
        delta.mul_(alpha).add_(theta_mean.sub_(phi_mean), alpha=beta)
        delta.add_(phi_mean.sub_(phi), alpha=gamma)
    phi.add_(delta)
