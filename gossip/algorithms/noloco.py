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
(alone: its own model). When phi travels too, theta and phi are averaged over the same members:
those whose theta AND phi arrived (a member heard from only once is left out of both means, so a
lost theta can never push a node away from a partner whose phi came).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from gossip.algorithms._common import (
    SyncStats,
    check_compress,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_seed,
    compressor_rows,
    compressors_state,
    frozen_rows,
    load_compressors_state,
    make_compressors,
    timed_sync,
)
from gossip.comm.base import Communicator
from gossip.comm.compressed import exchange_compressed
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
    compress: what a node sends its group (:func:`gossip.compress.parse_codec`); a node averages
        its own exact weights with the others' decoded ones.
    error_feedback: carry what compression did not send into the next outer step.
    """

    sync_every: int = 50
    alpha: float = 0.5
    beta: float = 0.7
    gamma: float = 0.7
    group_size: int = 2
    seed: int = 0
    compress: str = "none"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        check_compress(self.compress, self.error_feedback)
        check_positive("sync_every", self.sync_every, integer=True)
        check_fraction("alpha", self.alpha)
        check_positive("beta", self.beta)
        check_nonnegative("gamma", self.gamma)
        check_positive("group_size", self.group_size, integer=True)
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2, got {self.group_size}")
        check_seed("seed", self.seed)


def group_table(n: int, group_size: int, step: int, seed: int,
                alive: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Who averages with whom at ``step``: ``others`` [N, W] and ``pos`` [N].

    Row i of ``others`` lists the rest of i's group in sorted order, padded with -1; ``pos[i]``
    is i's place in its sorted group. With everyone alive the groups are the reference code's
    (:func:`gossip.topology.random_matching`). Dead nodes (``alive`` False) are left out: the
    same seeded permutation runs over the live nodes, dealt round-robin into
    ``max(1, live // group_size)`` groups (a few groups get one extra member), and dead rows are
    all -1.
    """
    if alive is None or bool(alive.all()):
        groups = random_matching(n, group_size, step, seed)
    else:
        ids = alive.nonzero().flatten().tolist()
        perm = np.random.default_rng(step + 1 + seed * 1_000_003).permutation(len(ids))
        n_groups = max(1, len(ids) // group_size)
        dealt: list[list[int]] = [[] for _ in range(n_groups)]
        for k, j in enumerate(perm.tolist()):
            dealt[k % n_groups].append(ids[j])
        groups = [sorted(g) for g in dealt if g]
    width = max(group_size, max((len(g) for g in groups), default=1)) - 1
    others = torch.full((n, width), -1, dtype=torch.long)
    pos = torch.zeros(n, dtype=torch.long)
    for group in groups:
        for place, i in enumerate(group):
            rest = group[:place] + group[place + 1 :]
            others[i, : len(rest)] = torch.tensor(rest, dtype=torch.long)
            pos[i] = place
    return others, pos


class NoLoCo:
    """Pairwise (group-wise) outer steps with modified heavy-ball momentum."""

    name: ClassVar[str] = "noloco"
    same_init: ClassVar[bool] = True
    #: every node keeps its own model: a node that is down keeps its state
    global_model: ClassVar[bool] = False
    needs_topology: ClassVar[bool] = False

    def __init__(self, config: NoLoCoConfig, params: FlatParams, comm: Communicator) -> None:
        n, g = comm.world_size, config.group_size
        if n % g:
            raise ValueError(f"group_size={g} must divide the number of nodes N={n}")
        self.config = config
        self.params = params
        self.comm = comm
        self.phi = [b.detach().to(torch.float32).clone() for b in params.buffers()]
        self.delta = [torch.zeros_like(p) for p in self.phi]
        # the group means land in persistent buffers: a fresh model-sized tensor per sync costs a
        # page fault per 4 KiB, as long as the exchange itself on CPU
        self._theta_mean = [torch.empty_like(p) for p in self.phi]
        self._phi_mean = ([] if config.gamma == config.beta
                          else [torch.empty_like(p) for p in self.phi])
        # with phi travelling: theta's received models, kept while phi's exchange (which may
        # reuse the communicator's receive buffer) decides who arrived twice
        self._theta_recv: list[Tensor | None] = [None] * len(self.phi)
        # one compressor for theta's exchange, one for phi's (each its own residual)
        self._comp = make_compressors(config.compress, config.error_feedback, self.phi,
                                      seed=config.seed, copies=2)

    def _exchange(self, x: Tensor, others: Tensor, i: int, what: int,
                  active: Tensor | None) -> tuple[Tensor, Tensor]:
        """Exchange buffer ``i``'s ``x`` (what = 0: theta, 1: phi) with the group, compressed
        when the config says so: (received [L, W, P], arrived [L, W])."""
        if self._comp is None:
            return self.comm.exchange(x, others)
        _, got = exchange_compressed(self.comm, x, others, self._comp[i][what], active)
        return got.dense(), got.arrived

    def _group_mean(self, x: Tensor, received: Tensor, arrived: Tensor, me: Tensor,
                    out: Tensor) -> Tensor:
        """``out`` [L, P] fp32 = mean over the arrived members of each local row's group.

        ``received`` [L, W, P] / ``arrived`` [L, W]: the rest of each row's group in sorted
        order (an exchange with ``others``); ``me`` [L]: each row's place in its sorted group.
        Members are added one by one in sorted order (self included), so every member of a
        group computes the same bits, on a real rank and in the simulator.
        """
        g = received.shape[1] + 1
        count = torch.ones(x.shape[0], 1, dtype=torch.float32, device=x.device)
        count += arrived.sum(dim=1, keepdim=True)
        if x.shape[0] == 1 and bool(arrived.all()):
            # one row, every message in (a real rank): add in place, no model-sized temporaries
            p = int(me[0])
            rest = [received[0, k] for k in range(g - 1)]
            members = [*rest[:p], x[0], *rest[p:]]
            if x.dtype == torch.float32:
                torch.add(members[0], members[1], out=out[0])
            else:  # add in fp32 (torch.add of two bf16 tensors would round to bf16)
                out[0].copy_(members[0]).add_(members[1])
            for m in members[2:]:
                out[0].add_(m)
            return out.div_(count)
        rows = torch.arange(x.shape[0], device=x.device)
        total: Tensor | None = None
        for k in range(g):
            is_me = me == k
            slot = (k - (me < k).long()).clamp(max=g - 2)  # where member k sits in received
            ok = (is_me | arrived[rows, slot]).unsqueeze(-1)
            member = torch.where(is_me.unsqueeze(-1), x, received[rows, slot]).to(torch.float32)
            term = torch.where(ok, member, 0.0)
            total = term if total is None else total + term
        assert total is not None
        return torch.div(total, count, out=out)

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based); ``active`` [L] False = skip this step."""
        if step % self.config.sync_every:
            return None
        cfg = self.config
        others, pos = group_table(self.comm.world_size, cfg.group_size, step, cfg.seed,
                                  self.comm.alive_nodes(step))
        me = pos[self.comm.nodes]
        tied = cfg.gamma == cfg.beta
        with timed_sync(self.comm, SyncStats(step)) as stats:
            for i, (theta, phi, delta) in enumerate(
                    zip(self.params.buffers(), self.phi, self.delta, strict=True)):
                me = me.to(theta.device)
                recv, arrived = self._exchange(theta, others, i, 0, active)
                if not tied:  # phi travels too: both means over the members whose both came
                    theta_recv = self._kept(i, recv)
                    theta_arrived = arrived.clone()
                    recv, arrived = self._exchange(phi, others, i, 1, active)
                    arrived = arrived & theta_arrived
                    self._group_mean(theta, theta_recv, arrived, me, self._theta_mean[i])
                for cols in _column_blocks(theta):
                    if tied:
                        theta_mean = self._group_mean(theta[:, cols], recv[..., cols], arrived,
                                                      me, self._theta_mean[i][:, cols])
                        phi_mean = None
                    else:
                        theta_mean = self._theta_mean[i][:, cols]
                        phi_mean = self._group_mean(phi[:, cols], recv[..., cols], arrived, me,
                                                    self._phi_mean[i][:, cols])
                    block = [theta[:, cols], phi[:, cols], delta[:, cols]]
                    with frozen_rows(block, active):
                        noloco_update_(block[2], block[1], theta_mean, phi_mean,
                                       alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)
                        block[0].copy_(block[1])
        return stats

    def _kept(self, i: int, recv: Tensor) -> Tensor:
        """A copy of ``recv`` in buffer ``i``'s persistent slot (allocated on first use)."""
        kept = self._theta_recv[i]
        if kept is None or kept.shape != recv.shape or kept.device != recv.device:
            kept = self._theta_recv[i] = torch.empty_like(recv)
        return kept.copy_(recv)

    def sampled(self, round_index: int) -> Tensor | None:
        """Every node takes part in every round."""
        return None

    def state_rows(self) -> list[Tensor]:
        """Per-node state tensors [L, ...]: phi, the outer momentum delta and the
        error-feedback residuals, if any."""
        return [*self.phi, *self.delta, *compressor_rows(self._comp)]

    def state_dict(self) -> dict[str, Any]:
        return {"phi": [p.clone() for p in self.phi], "delta": [d.clone() for d in self.delta],
                **compressors_state(self._comp)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for dst, src in zip(self.phi + self.delta, state["phi"] + state["delta"], strict=True):
            dst.copy_(src)
        load_compressors_state(self._comp, state)


#: Elements per column block of a real rank's outer update: the group mean and the update of a
#: block run while it is in cache (measured on a 64 MB model, CPU: about 1.5x faster than whole-
#: buffer passes). A multiple of every SIMD width, so the blocks round like whole buffers.
BLOCK = 1 << 18


def _column_blocks(x: Tensor) -> list[slice]:
    """Column slices of ``x`` [L, P]: blocks of :data:`BLOCK` on a real rank's CPU (L = 1); the
    whole width in the simulator, where each op already streams all L rows, and on a GPU, where
    more kernel launches would cost more than the cache saves."""
    width = x.shape[1]
    if x.shape[0] != 1 or x.device.type != "cpu":
        return [slice(0, width)]
    return [slice(c, min(width, c + BLOCK)) for c in range(0, width, BLOCK)]

