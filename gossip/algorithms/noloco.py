"""NoLoCo (Kolehmainen et al. 2025, arXiv 2506.10911; reference code jkolehm/noloco).

No all-reduce. Every ``sync_every`` inner steps every rank derives the same random grouping of
the N nodes from the shared step counter (a seeded permutation dealt round-robin into groups of
``group_size``), exchanges with its group only, and takes a modified heavy-ball step:

    delta = alpha delta + beta mean_G(theta - phi) - gamma (phi - mean_G(phi))
    phi   = phi + delta;  theta = phi

with the reference code's **plus** sign on beta (the paper's Eq. 2 prints a minus). When
``gamma == beta`` this is ``delta = alpha delta + beta (mean_G(theta) - phi)`` and only the fast
weights theta are exchanged (one buffer); otherwise phi travels too. ``phi`` and ``delta`` are
fp32. A node whose partner's model does not arrive averages over the group members it heard from
(alone: its own model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from gossip.algorithms._common import (
    SyncStats,
    check_fraction,
    check_positive,
    frozen_rows,
    timed_sync,
)
from gossip.comm.base import Communicator
from gossip.flat import FlatParams
from gossip.ops import noloco_update_
from gossip.topology import random_matching

__all__ = ["NoLoCo", "NoLoCoConfig", "group_table"]


@dataclass(frozen=True, kw_only=True)
class NoLoCoConfig:
    """Args:
    sync_every: inner steps between outer steps (H; the paper uses 50).
    alpha: outer momentum. beta: outer learning rate. gamma: pull toward the group's mean phi.
    group_size: n, nodes per group (2 = pairs).
    seed: offsets the shared pairing seed (0 = the reference code's ``default_rng(step + 1)``).
    """

    sync_every: int = 50
    alpha: float = 0.5
    beta: float = 0.7
    gamma: float = 0.7
    group_size: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("sync_every", self.sync_every, integer=True)
        check_fraction("alpha", self.alpha)
        check_positive("beta", self.beta)
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma!r}")
        check_positive("group_size", self.group_size, integer=True)
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")


def group_table(n: int, group_size: int, step: int, seed: int) -> tuple[Tensor, Tensor]:
    """The grouping at ``step`` as a table [N, n]: row i = i's group in sorted order, with i's own
    slot set to -1 (it receives from the others), and the position of i in its group [N]."""
    table = torch.full((n, group_size), -1, dtype=torch.long)
    pos = torch.zeros(n, dtype=torch.long)
    for group in random_matching(n, group_size, step, seed):
        for i in group:
            table[i] = torch.tensor(group)
            pos[i] = group.index(i)
    table[torch.arange(n), pos] = -1
    return table, pos


class NoLoCo:
    """Pairwise (group-wise) outer steps with modified heavy-ball momentum."""

    name: ClassVar[str] = "noloco"
    same_init: ClassVar[bool] = True

    def __init__(self, config: NoLoCoConfig, params: FlatParams, comm: Communicator) -> None:
        n, g = comm.world_size, config.group_size
        if n % g:
            raise ValueError(f"group_size={g} must divide the number of nodes N={n}")
        self.config = config
        self.params = params
        self.comm = comm
        self.phi = [b.detach().to(torch.float32).clone() for b in params.buffers()]
        self.delta = [torch.zeros_like(p) for p in self.phi]

    def _group_mean(self, x: Tensor, table: Tensor, pos: Tensor) -> Tensor:
        """mean over the arrived members of each local row's group, summed in sorted order."""
        received, arrived = self.comm.exchange(x, table)
        rows = torch.arange(x.shape[0], device=x.device)
        slot = pos[self.comm.nodes].to(x.device)
        members = received.to(torch.float32)
        members[rows, slot] = x.to(torch.float32)
        arrived = arrived.clone()
        arrived[rows, slot] = True
        m = arrived.to(torch.float32).unsqueeze(-1)
        return (members * m).sum(dim=1) / m.sum(dim=1)

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based); ``active`` [L] False = skip this step."""
        if step % self.config.sync_every:
            return None
        cfg = self.config
        table, pos = group_table(self.comm.world_size, cfg.group_size, step, cfg.seed)
        tied = cfg.gamma == cfg.beta
        with timed_sync(self.comm, SyncStats(step)) as stats:
            for theta, phi, delta in zip(self.params.buffers(), self.phi, self.delta, strict=True):
                theta_mean = self._group_mean(theta, table, pos)
                phi_mean = None if tied else self._group_mean(phi, table, pos)
                with frozen_rows([theta, phi, delta], active):
                    noloco_update_(delta, phi, theta_mean, phi_mean,
                                   alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)
                    theta.copy_(phi)
        return stats

    def state_dict(self) -> dict[str, Any]:
        return {"phi": [p.clone() for p in self.phi], "delta": [d.clone() for d in self.delta]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.phi + self.delta, state["phi"] + state["delta"], strict=True):
            dst.copy_(src)
