"""Inner learning-rate schedules: the factor of the peak lr at a node's own step, in closed form.

``t`` counts the node's optimizer steps already taken (0 for its first step) and ``total`` is the
run's length in inner steps. Equal to torch's schedulers stepped once per optimizer step:

- ``constant``: 1;
- ``cosine``: ``(1 + cos(pi t / total)) / 2`` (``CosineAnnealingLR(T_max=total)``);
- ``warmup``: ``min(1, (t + 1) / W)`` (``LinearLR(start_factor=1/W, total_iters=W-1)``);
- ``warmup-cosine``: the warm-up, then cosine over the remaining ``total - W`` steps.

A real rank applies it with its step counter, a simulated node with its own step count (nodes
that were down or idle are behind), so each node follows the schedule of its own steps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["lr_factor", "lr_factors"]


def lr_factor(schedule: str, t: int, total: int, warmup: int = 0) -> float:
    """The factor of the peak lr for step ``t`` (0-based) of ``total``."""
    if schedule == "constant":
        return 1.0
    if schedule.startswith("warmup") and t < warmup:
        return (t + 1) / warmup
    if schedule == "warmup":
        return 1.0
    if schedule == "warmup-cosine":
        t, total = t - warmup, total - warmup
    elif schedule != "cosine":
        raise ValueError(f"schedule={schedule!r} is invalid: expected constant, cosine, warmup "
                         "or warmup-cosine")
    return (1.0 + math.cos(math.pi * min(t, total) / max(total, 1))) / 2.0


def lr_factors(schedule: str, t: Tensor, total: int, warmup: int = 0) -> Tensor:
    """:func:`lr_factor` of every entry of the step counts ``t`` [L] (float64)."""
    return torch.tensor([lr_factor(schedule, int(s), total, warmup) for s in t.tolist()],
                        dtype=torch.float64)
