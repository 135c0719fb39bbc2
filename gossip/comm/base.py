"""The Communicator protocol: the seam between the algorithms and the transport.

An algorithm holds its models as rows ``x`` [L, P]: L = 1 on a real rank, L = N (or N/R per Ray
shard) in the simulator. ``nodes`` names the global node id of each row. Peers are given as one
global table ``peers`` [N, K] (-1 = no peer): row i lists the nodes whose models node i receives.
Every rank derives the same table from shared seeds, so nobody has to agree on who talks to whom.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from gossip.compress import Compressor
from gossip.scratch import Scratch

__all__ = [
    "CommError",
    "CommTimeout",
    "Communicator",
    "DenseReceived",
    "GatheredReceived",
    "PeerFailure",
    "Received",
    "Traffic",
    "check_peers",
]


@dataclass
class Traffic:
    """Bytes this process sent, by kind of operation (a running total).

    Counts model payload: an exchange counts each message's bytes once per receiver slot; an
    all-reduce of B bytes over n nodes counts ``2 (n - 1) B // n`` per node (a ring all-reduce);
    the 8-byte reduction of weights before a weighted mean is not counted.
    """

    bytes_sent: int = 0
    messages: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    def add(self, op: str, nbytes: int, messages: int = 1) -> None:
        self.bytes_sent += nbytes
        self.messages += messages
        self.by_op[op] = self.by_op.get(op, 0) + nbytes


class CommError(RuntimeError):
    """A communication call failed; says which rank, which peer(s) and which step."""

    def __init__(self, message: str, *, rank: int, peers: tuple[int, ...] = (), step: int = -1):
        super().__init__(f"rank {rank}, peers {list(peers)}, step {step}: {message}")
        self.rank = rank
        self.peers = peers
        self.step = step


class CommTimeout(CommError):
    """A wait ran past the communicator's timeout."""


class PeerFailure(CommError):
    """A peer is known to be dead (its connection closed or it missed a deadline)."""


class Received:
    """What one exchange delivered, read slot by slot.

    Slot ``k`` of local row ``l`` holds the model of ``peers[nodes[l], k]``, or zeros where
    ``arrived[l, k]`` is False. A real rank holds every slot (:class:`DenseReceived`); a stacked
    communicator gathers a slot from the senders' rows when it is read (:class:`GatheredReceived`),
    so a merge over K neighbours of N stacked nodes needs one ``[L, P]`` temporary, not
    ``[L, K, P]``. Read it before the exchanged buffer changes or the next exchange.
    """

    arrived: Tensor  #: [L, K] bool

    @property
    def num_slots(self) -> int:
        return int(self.arrived.shape[1])

    def slot(self, k: int) -> Tensor:
        """Slot ``k`` of every local row, [L, P]."""
        raise NotImplementedError

    def sender_stats(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """``fn`` (rows [M, P] -> per-row statistics [M, S]) of every received model, [L, K, S];
        0 where nothing arrived. A stacked communicator applies ``fn`` once per sender instead of
        once per message."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """Every slot at once, [L, K, P]."""
        raise NotImplementedError

    def reads(self, x: Tensor) -> bool:
        """Whether reading a slot reads ``x``'s memory (then ``x`` must not be written before
        the last read)."""
        raise NotImplementedError


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class DenseReceived(Received):
    """Slots held in one tensor ``received`` [L, K, P] (what a real rank receives into)."""

    def __init__(self, received: Tensor, arrived: Tensor) -> None:
        self.received = received
        self.arrived = arrived

    def slot(self, k: int) -> Tensor:
        return self.received[:, k]

    def sender_stats(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        rows, slots = self.received.shape[:2]
        stats = fn(self.received.reshape(rows * slots, -1))
        stats = stats.reshape(rows, slots, -1)
        return stats.masked_fill(~self.arrived.unsqueeze(-1), 0)

    def dense(self) -> Tensor:
        return self.received

    def reads(self, x: Tensor) -> bool:
        return _same_memory(self.received, x)


class GatheredReceived(Received):
    """Slots gathered on demand: slot k of row l is ``full[source[l, k]]``.

    Args:
        full: every sender's row [N, P] (all nodes, or all gathered from the shards).
        source: [L, K] row of ``full`` that each slot comes from (any valid row where nothing
            arrived).
        arrived: [L, K] bool.
        scratch: where slots are gathered into (a fresh model-sized tensor per read costs a
            page fault per 4 KiB on CPU, several times the gather). A slot read is valid until
            the next read.
    """

    def __init__(self, full: Tensor, source: Tensor, arrived: Tensor, scratch: Scratch) -> None:
        self.full = full
        self.source = source
        self.arrived = arrived
        self._scratch = scratch

    def _gather(self, source: Tensor, arrived: Tensor) -> Tensor:
        out = self._scratch.get((source.numel(), self.full.shape[1]), self.full.dtype,
                                self.full.device)
        torch.index_select(self.full, 0, source.reshape(-1), out=out)
        lost = ~arrived.reshape(-1)
        if bool(lost.any()):
            out[lost] = 0
        return out

    def slot(self, k: int) -> Tensor:
        return self._gather(self.source[:, k], self.arrived[:, k])

    def sender_stats(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        stats = fn(self.full)  # [N, S]: once per node, not once per message
        out = stats[self.source]
        return out.masked_fill_(~self.arrived.unsqueeze(-1), 0)

    def dense(self) -> Tensor:
        return self._gather(self.source, self.arrived).view(*self.source.shape, -1)

    def reads(self, x: Tensor) -> bool:
        return _same_memory(self.full, x)


@runtime_checkable
class Communicator(Protocol):
    """What an algorithm may ask of the transport."""

    @property
    def nodes(self) -> Tensor:
        """Global node ids of the local rows, int64 [L]."""
        ...

    @property
    def world_size(self) -> int:
        """Number of nodes N in the whole run."""
        ...

    @property
    def traffic(self) -> Traffic:
        """Running total of what this process sent."""
        ...

    def all_reduce_mean_(self, x: Tensor, weight: Tensor | None = None, *,
                         compressor: Compressor | None = None) -> None:
        """Set every row of ``x`` [L, P] to the weighted mean over all N nodes' rows.

        ``weight`` [L] (>= 0, e.g. sample counts; 0 = not participating); None = plain mean.
        ``compressor``: a lossy one moves only its encoded bytes (a quantized reduce-scatter and
        all-gather, :mod:`gossip.comm.compressed`); None or ``none``: exact fp all-reduce.
        """
        ...

    def exchange(self, x: Tensor, peers: Tensor) -> tuple[Tensor, Tensor]:
        """Send each local row to the nodes that list it in ``peers`` [N, K]; receive ours.

        Returns ``received`` [L, K, P] (row l, slot k = the model of ``peers[nodes[l], k]``) and
        ``arrived`` [L, K] bool: False for padding (-1) and for messages that did not arrive.
        """
        ...

    def exchange_slots(self, x: Tensor, peers: Tensor) -> Received:
        """:meth:`exchange`, with what arrived read slot by slot (:class:`Received`)."""
        ...

    def barrier(self) -> None:
        """Wait until every node has reached this point."""
        ...

    def alive_nodes(self, step: int) -> Tensor:
        """bool [N]: the nodes every caller treats as up at outer step ``step``.

        The same on every rank, so algorithms that plan who talks to whom (NoLoCo's groups,
        gossip neighbourhoods) can leave dead nodes out without a message to agree on it.
        """
        ...


def check_peers(peers: Tensor, world_size: int) -> Tensor:
    """Validate a global peer table [N, K] and return it as int64 on the CPU.

    Entries must be -1 (padding) or a node id in [0, N), and no row may list its own node. Every
    rank checks the whole table (it is the same on all ranks), so a bad table raises the same
    ``ValueError`` everywhere instead of leaving some ranks waiting for messages never sent.
    A row may list a node more than once: it then receives that node's model in each slot.
    """
    table = peers.detach().to("cpu", torch.long)
    if table.dim() != 2 or table.shape[0] != world_size:
        raise ValueError(f"peers must have shape [N={world_size}, K], got {tuple(table.shape)}")
    bad = (table < -1) | (table >= world_size)
    if bool(bad.any()):
        i, k = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"peers[{i}, {k}] = {int(table[i, k])} is not -1 or a node id in "
                         f"[0, {world_size})")
    own = table == torch.arange(world_size).unsqueeze(1)
    if bool(own.any()):
        i = int(own.nonzero()[0, 0])
        raise ValueError(f"peers[{i}] lists the node itself")
    return table


def weight_total_ok(total: float, negative: float = 0.0) -> bool:
    """Whether the participating weights of a weighted mean, summing to ``total`` with
    ``negative`` of them below zero, make a mean: their sum finite and > 0 (all zero, a NaN or
    an inf weight is not) and none negative (a sample count or a share is never below zero)."""
    return math.isfinite(total) and total > 0 and negative == 0
