"""Communicator over node-stacked tensors: the simulator's transport.

All N virtual nodes live in one tensor ``x`` [N, P] (or a shard of them [L, P] when the nodes are
spread over several processes joined by a torch.distributed group). An exchange is an index
gather along the node axis (across shards, an ``all_to_all`` that moves only the rows each shard
reads), an all-reduce a weighted mean over it. Faults are explicit inputs:
``alive`` (crashed nodes neither send nor receive nor take part in means) and a per-message drop
probability drawn from a seeded generator. Each call is logged as a :class:`CommEvent` so that a
network model can turn it into simulated seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from gossip.comm.base import GatheredReceived, Traffic, check_peers, weight_total_ok
from gossip.comm.compressed import stacked_all_reduce_mean_
from gossip.compress import Compressor
from gossip.ops import to_device
from gossip.scratch import Scratch

__all__ = ["CommEvent", "StackedCommunicator"]


@dataclass(frozen=True)
class CommEvent:
    """One communication call: what it was, the bytes of one message, who sent to whom."""

    op: str  # "all_reduce" | "all_gather" | "exchange"
    nbytes: int  # bytes of one node's message
    peers: Tensor | None  # [N, K] global table for exchanges
    delivered: Tensor | None  # [N, K] bool: which messages reached their receiver
    participants: Tensor | None  # [N] bool for all-reduces
    #: started by an overlapped outer step: it runs behind the next round's compute
    overlapped: bool = False


class StackedCommunicator:
    """N virtual nodes in one process, or a shard of them in each of R processes.

    Args:
        world_size: N, the number of virtual nodes in the whole run.
        nodes: the global ids of the local rows (default: all N).
        group: a process group joining the shards (None: everything is local).
        seed: seeds the message-drop draws.
    """

    def __init__(
        self,
        world_size: int,
        nodes: Tensor | None = None,
        *,
        group: dist.ProcessGroup | None = None,
        seed: int = 0,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self._world_size = world_size
        self._nodes = torch.arange(world_size) if nodes is None else nodes.to(torch.long)
        if group is None and self._nodes.numel() != world_size:
            raise ValueError(f"nodes has {self._nodes.numel()} ids without a group joining shards,"
                             f" expected world_size={world_size}")
        self.group = group
        self._traffic = Traffic()
        self.bytes_per_node = torch.zeros(world_size, dtype=torch.float64)
        self.events: list[CommEvent] = []
        self.alive = torch.ones(world_size, dtype=torch.bool)
        self._known_alive = self.alive
        self.drop_prob = 0.0
        self._gen = torch.Generator().manual_seed(seed)
        # received models are gathered into these (reused by the next exchange, as a real
        # rank's receive buffer is)
        self._scratch = Scratch()
        #: rows fetched from other shards by exchanges (0 without a group)
        self.rows_fetched = 0
        self._last_shares: tuple[tuple[torch.device, torch.dtype], Tensor, Tensor,
                                 Tensor | None] | None = None

    @property
    def nodes(self) -> Tensor:
        return self._nodes

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def traffic(self) -> Traffic:
        return self._traffic

    def state_dict(self) -> dict[str, Tensor]:
        """What the next rounds depend on: the bytes counted so far, who is (known to be) up and
        the state of the generator that drops messages (a simulation's checkpoint)."""
        return {"bytes_per_node": self.bytes_per_node.clone(), "alive": self.alive.clone(),
                "known_alive": self._known_alive.clone(), "drop_rng": self._gen.get_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        n = (self._world_size,)
        for key in ("bytes_per_node", "alive", "known_alive"):
            if tuple(state[key].shape) != n:
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, this communicator "
                                 f"joins {n[0]} nodes")
        self.bytes_per_node = state["bytes_per_node"].to(torch.float64).clone()
        self.alive = state["alive"].to(torch.bool).clone()
        self._known_alive = state["known_alive"].to(torch.bool).clone()
        self._gen.set_state(state["drop_rng"])
        self._last_shares = None

    def set_faults(self, alive: Tensor | None = None, drop_prob: float = 0.0) -> None:
        """Faults for the next calls (one call per round): who is up, the chance a message is lost.

        What the nodes *know* lags one call behind, as on real ranks: a node that goes down is
        found missing by its peers in the round it goes down, and left out of pairings and
        neighbourhoods (:meth:`alive_nodes`) from the next round on.
        """
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self._known_alive = self.alive
        self.alive = (torch.ones(self._world_size, dtype=torch.bool) if alive is None
                      else alive.to("cpu", torch.bool))
        self.drop_prob = drop_prob

    def _senders(self, x: Tensor, src: Tensor, delivered: Tensor) -> tuple[Tensor, Tensor]:
        """The rows the local slots read and where each slot finds its sender among them.

        Returns ``(rows, source)``: without a group ``rows`` is ``x`` itself (all N nodes) and
        ``source`` the sender ids. Across shards (equal contiguous ranges of node ids, in group
        rank order) each shard sends every other shard exactly the rows it will read, with one
        ``all_to_all``: ``rows`` is this shard's own rows followed by the fetched ones. Every
        shard derives who needs what from the global table, so no sizes are exchanged.
        """
        mine = src[self._nodes]  # [L, K] global sender ids of the local slots
        if self.group is None:
            return x, mine
        shards = dist.get_world_size(self.group)
        me = dist.get_rank(self.group)
        size = self._world_size // shards
        if size * shards != self._world_size or not torch.equal(
                self._nodes, torch.arange(me * size, (me + 1) * size)):
            raise ValueError(f"shard {me} of {shards} must hold nodes {me * size}.."
                             f"{(me + 1) * size - 1} of N={self._world_size} (equal contiguous "
                             f"shards in rank order), got {self._nodes.tolist()[:8]}...")
        owner = torch.arange(self._world_size) // size
        # needs[s]: the sorted nodes of other shards that shard s's delivered slots read
        wanted = torch.zeros(shards, self._world_size, dtype=torch.bool)
        receivers = owner.unsqueeze(1).expand_as(src)
        wanted[receivers[delivered], src[delivered]] = True
        wanted[owner, torch.arange(self._world_size)] = False  # own rows are at hand
        send = [wanted[s, me * size:(me + 1) * size].nonzero().flatten() for s in range(shards)]
        fetch = wanted[me].nonzero().flatten()  # sorted by node id, so grouped by owner
        device = x.device
        staged = x if dist.get_backend(self.group) != "gloo" else x.cpu()
        out = staged.new_empty((len(fetch), x.shape[1]))
        dist.all_to_all_single(
            out, staged[torch.cat(send).to(staged.device)].contiguous(),
            output_split_sizes=torch.bincount(owner[fetch], minlength=shards).tolist(),
            input_split_sizes=[len(t) for t in send], group=self.group)
        self.rows_fetched += len(fetch)
        where = torch.full((self._world_size,), -1, dtype=torch.long)
        where[self._nodes] = torch.arange(len(self._nodes))
        where[fetch] = len(self._nodes) + torch.arange(len(fetch))
        source = where[mine].clamp(min=0)  # slots that read nothing point at row 0
        return torch.cat([x, out.to(device)]), source

    def _sum(self, t: Tensor) -> Tensor:
        if self.group is not None:
            dist.all_reduce(t, group=self.group)
        return t

    def alive_nodes(self, step: int) -> Tensor:
        """The nodes known to be up at outer step ``step``: up as of the previous round."""
        del step
        return self._known_alive.clone()

    def all_reduce_mean_(self, x: Tensor, weight: Tensor | None = None, *,
                         compressor: Compressor | None = None) -> None:
        if not x.is_floating_point():
            raise ValueError(f"all_reduce_mean_ needs a floating-point tensor, got {x.dtype}")
        if compressor is not None and compressor.codec.lossy:
            stacked_all_reduce_mean_(self, x, weight, compressor)
            return
        coef, part = self._mean_coefficients(x, weight)
        # rows that do not take part contribute exact zeros, even if they hold NaN/inf
        xs = x if part is None else x.masked_fill(~part.unsqueeze(-1), 0)
        acc = self._sum(coef @ xs)
        senders = int(self.alive[self._nodes].sum())
        # every row gets the result: a node that is down contributes nothing, and pulls the
        # current global model when it comes back (as a returning FedAvg client or DiLoCo worker)
        x.copy_(acc.unsqueeze(0).expand_as(x))
        # a ring over the P nodes that are up (all N without faults, as on real ranks): each
        # sends 2 (P - 1) / P of the buffer, the volume the network model times for P
        p = max(1, int(self.alive.sum()))
        nbytes = x.shape[1] * x.element_size()
        self.bytes_per_node.add_(self.alive, alpha=nbytes * 2 * (p - 1) / p)
        # what the alive local rows send, each as a real rank would count it
        self._traffic.add("all_reduce", nbytes * 2 * (p - 1) // p * senders, messages=senders)
        self.events.append(CommEvent("all_reduce", nbytes, None, None, self.alive.clone()))

    def _mean_coefficients(self, x: Tensor, weight: Tensor | None
                           ) -> tuple[Tensor, Tensor | None]:
        """Each local row's share of the weighted mean (``x``'s dtype, on its device), and the
        rows that take part as a mask on that device (None: every row).

        The weights are bookkeeping: on the host unless the caller keeps them on the device.
        A sync whose weights, and nodes up, equal the last one's (FedAvg's and DiLoCo's every
        round without faults) reuses its shares, already on the device: the checks and the
        copy cost more host time than a round's kernels at N = 10,000 on a GPU."""
        alive_local = self.alive[self._nodes]
        w = torch.ones(x.shape[0], dtype=torch.float64) if weight is None \
            else weight.to(dtype=torch.float64)
        w = w * alive_local.to(w.device)
        last = self._last_shares
        if last is not None and last[0] == (x.device, x.dtype) and last[1].device == w.device \
                and torch.equal(last[1], w):
            return last[2], last[3]
        stats = self._sum(torch.stack([w.sum(), (w < 0).sum().to(w.dtype)]))
        total = stats[:1]
        if not weight_total_ok(float(total), float(stats[1])):
            raise ValueError("all_reduce_mean_: every participating weight is zero, or one is "
                             f"negative or not finite (their sum: {float(total)}, "
                             f"{int(stats[1])} negative)")
        part = w > 0
        coef = to_device((w / total).to(x.dtype), x.device)
        mask = None if bool(part.all()) else part.to(x.device)
        if self.group is None and not w.is_cuda:  # (shards' totals may change elsewhere)
            self._last_shares = ((x.device, x.dtype), w, coef, mask)
        return coef, mask

    def exchange(self, x: Tensor, peers: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`Communicator.exchange`. ``received`` is a buffer this communicator owns
        and reuses: the next exchange of the same shape overwrites it (copy it to keep it)."""
        got = self.exchange_slots(x, peers)
        return got.dense(), got.arrived

    def exchange_slots(self, x: Tensor, peers: Tensor) -> GatheredReceived:
        """A gather along the node axis, read slot by slot (no [L, K, P] tensor)."""
        table = check_peers(peers, self._world_size)
        valid = table >= 0
        src = table.clamp(min=0)
        delivered = valid & self.alive[src] & self.alive.unsqueeze(1)
        if self.drop_prob > 0:
            kept = torch.rand(table.shape, generator=self._gen) >= self.drop_prob
            delivered &= kept
        # like a real rank, slots whose message did not arrive read as zeros
        rows, source = self._senders(x, src, delivered)
        received = GatheredReceived(rows, source.to(x.device),
                                    delivered[self._nodes].to(x.device),
                                    self._scratch)
        nbytes = x.shape[1] * x.element_size()
        # every sender pays for each message it sends, delivered or not
        sends = torch.bincount(src[valid & self.alive.unsqueeze(1) & self.alive[src]],
                               minlength=self._world_size).to(torch.float64)
        self.bytes_per_node += sends * nbytes
        local_sends = sends[self._nodes]
        self._traffic.add("exchange", int(local_sends.sum()) * nbytes,
                          messages=int(local_sends.sum()))
        self.events.append(CommEvent("exchange", nbytes, table, delivered, None))
        return received

    def barrier(self) -> None:
        if self.group is not None:
            dist.barrier(group=self.group)
