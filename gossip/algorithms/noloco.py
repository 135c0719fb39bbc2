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

**Fragments** (``fragments = F``): the flat parameters are cut into F contiguous fragments,
fragment f synchronised at inner steps ``s = f H // F (mod H)`` with the groups drawn for step
``s`` (:mod:`gossip.algorithms._streaming`); each sync exchanges and updates that fragment only.

**Overlap** (``overlap=True``, one-step delay): a fragment's exchange started at its sync t is
waited on at its sync t + 1. With ``s_t`` the fragment's weights when segment t began (what the
node trained from; ``s_t`` is also the phi that travels when gamma != beta), sync t does

    start   exchange of theta_t (and s_t) with the group G_t      (async)
    wait    the exchange of sync t - 1                          (t >= 2; nothing at t = 1)
    delta   = alpha delta + beta mean_{G_{t-1}}(theta_{t-1} - s_{t-1})
                          - gamma (s_{t-1} - mean_{G_{t-1}}(s_{t-1}))
    phi     = phi + delta;   theta = s_{t+1} = phi

i.e. the update of sync t - 1, computed exactly as without overlap from the weights that were
exchanged (``s_{t-1}`` in the place of phi), lands one outer step late on the current phi, and
the inner model restarts from phi. Without overlap ``s_t = phi`` and this is the update above.
The in-flight exchange is state: :meth:`NoLoCo.state_dict` waits for it and saves the group
means it gave, so a resume is bit-exact. The last sync's update stays pending
(:meth:`NoLoCo.flush` applies it).
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
    check_state,
    check_step,
    compressor_rows,
    compressors_state,
    frozen_rows,
    load_compressors_state,
    load_tensors,
    make_compressors,
    timed_sync,
)
from gossip.algorithms._streaming import check_streaming, due_fragment, fragment_pieces
from gossip.comm.base import Communicator
from gossip.comm.compressed import exchange_compressed, start_exchange_compressed
from gossip.comm.pending import Pending, start_exchange
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
    overlap: start the exchange and apply its update one outer step late (module doc).
    fragments: F, the model synchronised in F staggered fragments (module doc).
    """

    sync_every: int = 50
    alpha: float = 0.5
    beta: float = 0.7
    gamma: float = 0.7
    group_size: int = 2
    seed: int = 0
    compress: str = "none"
    error_feedback: bool = False
    overlap: bool = False
    fragments: int = 1

    def __post_init__(self) -> None:
        check_compress(self.compress, self.error_feedback)
        check_positive("sync_every", self.sync_every, integer=True)
        check_streaming(self.overlap, self.fragments, self.sync_every)
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
        buffers = list(params.buffers())
        # one slow-weight tensor per piece of a fragment (F = 1: one per buffer)
        self._fragments = fragment_pieces(buffers, config.fragments)
        self.phi = [buffers[p.buffer][:, p.cols].detach().to(torch.float32).clone()
                    for pieces in self._fragments for p in pieces]
        first = [0]
        for pieces in self._fragments:
            first.append(first[-1] + len(pieces))
        #: fragment f's slow weights are phi[first[f]:first[f + 1]]
        self._first = first
        self.delta = [torch.zeros_like(p) for p in self.phi]
        # the group means land in persistent buffers: a fresh model-sized tensor per sync costs a
        # page fault per 4 KiB, as long as the exchange itself on CPU
        self._theta_mean = [torch.empty_like(p) for p in self.phi]
        self._phi_mean = ([] if config.gamma == config.beta
                          else [torch.empty_like(p) for p in self.phi])
        # with phi travelling: theta's received models, kept while phi's exchange (which may
        # reuse the communicator's receive buffer) decides who arrived twice
        self._theta_recv: list[Tensor | None] = [None] * len(self.phi)
        # overlap: s_t (the weights segment t started from), the theta_t sent, the receive
        # buffers [theta, phi] of the exchange in flight, and each fragment's pending exchange
        # (its wait() leaves the group means in _theta_mean / _phi_mean)
        overlap = config.overlap
        self._start = [p.clone() for p in self.phi] if overlap else []
        self._sent = [torch.empty_like(p) for p in self.phi] if overlap else []
        self._recv: list[list[Tensor | None]] = [[None, None] for _ in self.phi]
        self._pending: list[Pending[None] | None] = [None] * config.fragments
        # one compressor for theta's exchange, one for phi's (each its own residual)
        self._comp = make_compressors(config.compress, config.error_feedback, self.phi,
                                      seed=config.seed, copies=2)

    def _slots(self, f: int) -> list[tuple[int, Tensor, slice]]:
        """Fragment ``f``'s pieces: (index into phi, the model buffer, its columns)."""
        buffers = list(self.params.buffers())
        return [(self._first[f] + k, buffers[p.buffer], p.cols)
                for k, p in enumerate(self._fragments[f])]

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
        check_step(step)
        f = due_fragment(step, self.config.sync_every, self.config.fragments)
        if f is None:
            return None
        cfg = self.config
        others, pos = group_table(self.comm.world_size, cfg.group_size, step, cfg.seed,
                                  self.comm.alive_nodes(step))
        me = pos[self.comm.nodes]
        tied = cfg.gamma == cfg.beta
        with timed_sync(self.comm, SyncStats(step)) as stats:
            if cfg.overlap:
                self._overlapped(f, others, me, active)
                return stats
            for i, theta_all, piece in self._slots(f):
                theta, phi, delta = theta_all[:, piece], self.phi[i], self.delta[i]
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

    def _overlapped(self, f: int, others: Tensor, me: Tensor, active: Tensor | None) -> None:
        """Sync t of fragment f with overlap (module doc): apply t - 1's update, start t's."""
        cfg = self.config
        previous = self._pending[f]
        if previous is not None:
            previous.wait()  # the group means of sync t - 1
        slots = self._slots(f)
        for i, theta_all, cols in slots:
            theta, phi, delta, start = theta_all[:, cols], self.phi[i], self.delta[i], \
                self._start[i]
            self._sent[i].copy_(theta)  # theta_t, sent below
            with frozen_rows([theta, phi, delta, start], active):
                if previous is not None:
                    # delta from s_{t-1} (then start = s_{t-1} + delta, unused)
                    noloco_update_(delta, start, self._theta_mean[i],
                                   self._phi_mean[i] if self._phi_mean else None,
                                   alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)
                start.copy_(phi)  # s_t: the weights segment t started from
                if previous is not None:
                    phi.add_(delta)
                theta.copy_(phi)
        self._pending[f] = self._start_exchange(slots, others, me.to(self.phi[0].device), active)

    def _start_exchange(self, slots: list[tuple[int, Tensor, slice]], others: Tensor,
                        me: Tensor, active: Tensor | None) -> Pending[None]:
        """Start sending ``_sent`` (theta_t) and, when gamma != beta, ``_start`` (s_t) of every
        piece; the returned wait() leaves the group means in ``_theta_mean`` / ``_phi_mean``."""
        tied = self.config.gamma == self.config.beta
        if self._comp is not None:  # encoded now, exchanged in flight, decoded at wait()
            comp = self._comp
            started = []
            for i, _, _ in slots:
                sends = [self._sent[i]] if tied else [self._sent[i], self._start[i]]
                for what, x in enumerate(sends):
                    wire = (x.shape[0], others.shape[1], comp[i][what].codec.nbytes(x.shape[1]))
                    started.append(start_exchange_compressed(
                        self.comm, x, others, comp[i][what],
                        self._recv_buffer(i, what, wire, torch.uint8, x.device), active))

            def decoded() -> None:
                got = iter([w.wait() for w in started])
                for i, _, _ in slots:
                    theta = next(got)
                    if tied:
                        self._group_mean(self._sent[i], theta.dense(), theta.arrived, me,
                                         self._theta_mean[i])
                        continue
                    phi = next(got)
                    both = theta.arrived & phi.arrived
                    self._group_mean(self._sent[i], theta.dense(), both, me,
                                     self._theta_mean[i])
                    self._group_mean(self._start[i], phi.dense(), both, me, self._phi_mean[i])
            return Pending(decoded)
        works = []
        for i, _, _ in slots:
            sends = [self._sent[i]] if tied else [self._sent[i], self._start[i]]
            for what, x in enumerate(sends):
                shape = (x.shape[0], others.shape[1], x.shape[1])
                works.append(start_exchange(self.comm, x, others,
                                            self._recv_buffer(i, what, shape, x.dtype, x.device)))

        def finish() -> None:
            got = iter([w.wait() for w in works])
            for i, _, _ in slots:
                theta_recv, arrived = next(got)
                if tied:
                    self._group_mean(self._sent[i], theta_recv, arrived, me,
                                     self._theta_mean[i])
                    continue
                phi_recv, phi_arrived = next(got)
                both = arrived & phi_arrived
                self._group_mean(self._sent[i], theta_recv, both, me, self._theta_mean[i])
                self._group_mean(self._start[i], phi_recv, both, me, self._phi_mean[i])
        return Pending(finish)

    def _recv_buffer(self, i: int, what: int, shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> Tensor:
        """Piece ``i``'s persistent receive buffer for ``what`` (0: theta, 1: phi)."""
        buf = self._recv[i][what]
        if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
            buf = self._recv[i][what] = torch.empty(shape, dtype=dtype, device=device)
        return buf

    def flush(self) -> None:
        """Wait for every in-flight exchange and apply its update (theta = phi for those
        fragments): at the end of an overlapped run, the last outer step. A no-op without
        overlap."""
        cfg = self.config
        for f, pending in enumerate(self._pending):
            if pending is None:
                continue
            pending.wait()
            for i, theta_all, cols in self._slots(f):
                noloco_update_(self.delta[i], self._start[i], self._theta_mean[i],
                               self._phi_mean[i] if self._phi_mean else None,
                               alpha=cfg.alpha, beta=cfg.beta, gamma=cfg.gamma)
                self._start[i].copy_(self.phi[i])
                self.phi[i].add_(self.delta[i])
                theta_all[:, cols].copy_(self.phi[i])
            self._pending[f] = None

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
        """Per-node state tensors [L, ...]: phi, the outer momentum delta, the error-feedback
        residuals, if any, and with overlap s_t and the group means of the exchanges in flight
        (always the same tensors: a node that is down keeps all of them through a sync)."""
        flying = [*self._theta_mean, *self._phi_mean] if self.config.overlap else []
        if flying:
            self._in_flight()  # resolved
        return [*self.phi, *self.delta, *compressor_rows(self._comp), *self._start, *flying]

    def _in_flight(self) -> list[Tensor]:
        """The group means of the exchanges in flight, waited for (fragment by fragment)."""
        out: list[Tensor] = []
        for f, pending in enumerate(self._pending):
            if pending is not None:
                pending.wait()
                for i, _, _ in self._slots(f):
                    out.append(self._theta_mean[i])
                    if self._phi_mean:
                        out.append(self._phi_mean[i])
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {"algorithm": self.name, "phi": [p.clone() for p in self.phi],
                 "delta": [d.clone() for d in self.delta],
                 **compressors_state(self._comp)}
        if self.config.overlap:  # waits: every rank saves at the same step
            state["in_flight"] = [p is not None for p in self._pending]
            state["means"] = [m.clone() for m in self._in_flight()]
            state["start"] = [s.clone() for s in self._start]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = ["phi", "delta", *(["in_flight", "means", "start"] if self.config.overlap else [])]
        check_state(self.name, state, keys, self._comp, overlap=self.config.overlap)
        load_tensors(self.name, "phi", self.phi, state["phi"])
        load_tensors(self.name, "delta", self.delta, state["delta"])
        load_compressors_state(self._comp, state)
        if self.config.overlap:
            for dst, src in zip(self._start, state["start"], strict=True):
                dst.copy_(src)
            saved = iter(state["means"])
            for f, flying in enumerate(state["in_flight"]):
                self._pending[f] = None
                if flying:
                    for i, _, _ in self._slots(f):
                        self._theta_mean[i].copy_(next(saved))
                        if self._phi_mean:
                            self._phi_mean[i].copy_(next(saved))
                    self._pending[f] = Pending.done(None)


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

