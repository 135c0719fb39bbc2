"""Pure tensor math of the averaging algorithms (no torch.distributed here).

Every function broadcasts over leading axes: a real rank holds its parameters as one flat row
``[1, P]``, the simulator holds ``[N, P]`` (one row per virtual node), and received models come as
``[L, K, P]`` (K peers per local row) with a boolean ``[L, K]`` mask of what arrived.

Papers: DiLoCo (arXiv 2311.08105), NoLoCo (arXiv 2506.10911), D-PSGD (arXiv 1705.09056), variance
correction (Tian et al. 2024, arXiv 2404.04616).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Segment",
    "consensus_distance",
    "masked_mean",
    "mix",
    "noloco_update_",
    "segment_variance",
    "variance_correct_",
]


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


def masked_mean(x: Tensor, received: Tensor, mask: Tensor) -> Tensor:
    """Mean of each row of ``x`` [L, P] with its arrived peers ``received`` [L, K, P].

    Members are summed in a fixed order (self first, then peers in table order), so every
    member of a group that sees the same models computes the same bits.
    """
    m = mask.to(x.dtype).unsqueeze(-1)  # [L, K, 1]
    total = x + (received * m).sum(dim=-2)
    count = 1.0 + mask.sum(dim=-1, keepdim=True).to(x.dtype)
    return total / count


def mix(x: Tensor, received: Tensor, self_weight: Tensor, weights: Tensor, mask: Tensor,
        *, out: Tensor | None = None) -> Tensor:
    """Gossip mixing ``x_i = W_ii x_i + sum_k W_ik x_k`` (D-PSGD, Lian et al. 2017).

    The weight of a peer whose model did not arrive goes to self, so rows stay stochastic.
    Shapes: x [L, P], received [L, K, P], self_weight [L], weights/mask [L, K]. ``out`` (not
    ``x``) receives the result without model-sized temporaries.
    """
    w = torch.where(mask, weights, torch.zeros_like(weights)).to(x.dtype)
    lost = (weights.to(x.dtype) - w).sum(dim=-1)
    ws = (self_weight.to(x.dtype) + lost).unsqueeze(-1)
    out = torch.mul(x, ws, out=out)
    for k in range(received.shape[-2]):
        out.addcmul_(received[..., k, :], w[..., k : k + 1])
    return out


def segment_variance(x: Tensor, seg: Segment) -> Tensor:
    """Population variance over the elements of one tensor, for every leading index."""
    return x[..., seg.offset : seg.end].var(dim=-1, unbiased=False)


def variance_correct_(
    merged: Tensor,
    received: Tensor,
    mask: Tensor,
    segments: Sequence[Segment],
    *,
    eps: float = 1e-8,
    ratio: float = 1.0,
) -> Tensor:
    """Rescale each in-scope tensor of ``merged`` to the mean variance of the received models.

    Tian et al. 2024: target ``v* = mean_k Var(theta_k)`` over the received models (self not
    included); ``s = sqrt((v* + eps) / (Var(A) + eps))``, optionally ``s = 1 + ratio (s - 1)``;
    ``A = mean(A) + s (A - mean(A))``. Rows with nothing received are left unchanged.
    Shapes: merged [L, P] (changed in place), received [L, K, P], mask [L, K].
    """
    m = mask.to(merged.dtype)
    n_recv = m.sum(dim=-1)  # [L]
    has = n_recv > 0
    for seg in segments:
        if not seg.in_scope or seg.numel < 2:
            continue
        a = merged[..., seg.offset : seg.end]
        v_recv = received[..., seg.offset : seg.end].var(dim=-1, unbiased=False)  # [L, K]
        target = (v_recv * m).sum(dim=-1) / n_recv.clamp(min=1)
        mu = a.mean(dim=-1, keepdim=True)
        v = a.var(dim=-1, unbiased=False)
        s = torch.sqrt((target + eps) / (v + eps))
        s = (1.0 + ratio * (s - 1.0)).unsqueeze(-1)
        # rows with nothing received (or nothing to rescale) keep their exact bits
        change = (has & (s.squeeze(-1) != 1.0)).unsqueeze(-1)
        a.copy_(torch.where(change, mu + s * (a - mu), a))
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


def consensus_distance(x: Tensor) -> float:
    """Mean squared distance of the rows of ``x`` [N, P] to their mean: (1/N) sum ||x_i - x̄||²."""
    xf = x.double()
    return float(((xf - xf.mean(dim=0, keepdim=True)) ** 2).sum(dim=-1).mean())
