"""Simulated time: per-node clocks advanced by compute and by each logged communication call.

Every node i has a clock ``t[i]`` (seconds). A round advances it in two phases:

1. **Compute.** ``t[i] += steps[i] * compute_time * slowdown[i] * jitter`` (one mean-one
   log-normal draw per node and round when ``jitter > 0``); ``slowdown`` marks stragglers.
2. **Communication**, one :class:`gossip.comm.stacked.CommEvent` at a time, in call order:

   - ``all_reduce`` (FedAvg, DiLoCo; synchronous): it starts when the slowest participant is
     ready and takes a bandwidth-optimal ring all-reduce,
     ``2 (P - 1) (latency + bytes / (P * bandwidth))`` for P participants, or with
     ``allreduce="halving-doubling"`` (Rabenseifner: reduce-scatter and all-gather by recursive
     halving/doubling, what MPI and Gloo use for small messages)
     ``2 ceil(log2 P) latency + 2 (P - 1) / P * bytes / bandwidth``, or with ``allreduce="star"``
     (client-server, FedAvg as deployed: every participant uploads its model to one server,
     which sends the average back over its own link of ``server_bandwidth``; with client
     sampling the participants are the sampled clients, the others catch up at the round's end)
     ``2 latency + 2 max(P bytes / server_bandwidth, bytes / bandwidth)``; times one jitter draw.
     Every participant's clock becomes the finish time.
   - ``all_gather`` (a top-k compressed all-reduce: every participant's payload to every
     other): a ring all-gather, ``(P - 1) (latency + bytes / bandwidth)`` with ``bytes`` one
     participant's payload, times one jitter draw; synchronous like an all-reduce.
   - ``exchange`` (gossip, NoLoCo): a node waits only for its own messages. Sender j, with
     ``out_j`` messages to send, shares its uplink fairly among them, so all of them leave by
     ``t[j] + out_j * bytes / bandwidth``; the one to i arrives ``latency * jitter`` later.
     Receiver i is done at ``max(its own sends done, arrival of every message sent to it)``. A
     message that is lost on the way still makes its receiver wait until it was due (a timeout);
     a message from or to a node that is down is never sent, and nobody waits for it. Waiting
     couples the clocks: a straggler delays its neighbours, and they delay theirs, one hop per
     round, as in a real decentralized run without a global barrier.

**Overlapped events** (``event.overlapped``: DiLoCo/NoLoCo with ``overlap``) start at the node's
clock when the sync is reached but do not hold it: their finish times (the same formulas, from the
same start) are kept as ``pending`` and the node's clock only waits for them at the end of the
next round's compute, ``t[i] = max(t[i] + compute, pending[i])``, where the overlapped outer step
waits on its handle, and after the last round (:meth:`SimClock.flush`: the run's last outer step,
which the final model holds). Communication is charged only where it outlasts the compute it
hides behind.

At the end of a round a node that is down takes the clock of the latest node that is up (it
rejoins "now"). The run's simulated time after round r is the latest clock of all nodes.
Bytes are not modelled here: the communicator counts them exactly (``comm.bytes_per_node``).

``bandwidth`` is in bytes of *payload* per second, the bytes the communicator counts. A link
sold (or shaped) at R bit/s carries Ethernet frames, so TCP moves less payload than R / 8:
:func:`tcp_payload_bandwidth` gives it, ``R / 8 * (MTU - 52) / (MTU + 14)`` (IPv4 20 + TCP 20 +
timestamps 12 bytes of headers per segment, 14 of Ethernet per frame: 0.956 of R / 8 at MTU
1500). Measured on a 100 Mbit/s ``tc tbf`` link (``benchmarks/wan.py``): the qdisc counted 1.0457
bytes per payload byte of a one-way transfer (1514 / 1448 = 1.0456).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gossip.comm.stacked import CommEvent

__all__ = ["ALLREDUCE_ALGOS", "NetworkModel", "SimClock", "allreduce_seconds",
           "ring_allreduce_seconds", "tcp_payload_bandwidth"]

ALLREDUCE_ALGOS = ("ring", "halving-doubling", "star")

_COMPUTE, _MESSAGE, _COLLECTIVE = 0xC0, 0x3E, 0xA1


@dataclass(frozen=True, kw_only=True)
class NetworkModel:
    """Link and compute parameters.

    Args:
        latency: seconds per message (alpha).
        bandwidth: bytes/s of every node's uplink and downlink (1/beta).
        jitter: sigma of the mean-one log-normal noise on message and compute times.
        compute_time: seconds per inner step of one node.
        allreduce: ``ring``, ``halving-doubling`` or ``star`` (client-server).
        server_bandwidth: bytes/s of the server's link with ``star`` (None: ``bandwidth``).
        seed: seeds the jitter.
    """

    latency: float = 0.05
    bandwidth: float = 12.5e6
    jitter: float = 0.0
    compute_time: float = 0.01
    allreduce: str = "ring"
    server_bandwidth: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("latency", "jitter", "compute_time"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {self.bandwidth!r}")
        if self.server_bandwidth is not None and not self.server_bandwidth > 0:
            raise ValueError(f"server_bandwidth must be > 0, got {self.server_bandwidth!r}")
        if self.allreduce not in ALLREDUCE_ALGOS:
            raise ValueError(f"allreduce must be one of {list(ALLREDUCE_ALGOS)}, got "
                             f"{self.allreduce!r}")

    def noise(self, shape: tuple[int, ...], *tags: int) -> np.ndarray:
        """Mean-one log-normal factors (all ones when ``jitter`` is 0)."""
        if self.jitter == 0:
            return np.ones(shape)
        z = np.random.default_rng([self.seed, *tags]).standard_normal(shape)
        return np.exp(self.jitter * z - 0.5 * self.jitter**2)


def tcp_payload_bandwidth(rate_bits: float, mtu: int = 1500) -> float:
    """Payload bytes/s that TCP over Ethernet moves on a link of ``rate_bits`` bit/s (module doc):
    ``rate_bits / 8 * (mtu - 52) / (mtu + 14)``."""
    if not rate_bits > 0:
        raise ValueError(f"rate_bits must be > 0, got {rate_bits!r}")
    if not isinstance(mtu, int) or mtu <= 52:
        raise ValueError(f"mtu must be an int > 52 (the TCP/IP headers), got {mtu!r}")
    return rate_bits / 8 * (mtu - 52) / (mtu + 14)


def ring_allreduce_seconds(participants: int, nbytes: float, latency: float,
                           bandwidth: float) -> float:
    """``2 (P - 1) (latency + nbytes / (P * bandwidth))``; 0 for P <= 1."""
    p = participants
    if p <= 1:
        return 0.0
    return 2 * (p - 1) * (latency + nbytes / (p * bandwidth))


def allreduce_seconds(algo: str, participants: int, nbytes: float, latency: float,
                      bandwidth: float, server_bandwidth: float | None = None) -> float:
    """All-reduce time of ``algo`` (``ring``, ``halving-doubling`` or ``star``); 0 for P <= 1
    (a star with one client still makes the round trip to the server)."""
    p = participants
    if algo == "star":
        if p < 1:
            return 0.0
        server = bandwidth if server_bandwidth is None else server_bandwidth
        return 2 * latency + 2 * max(p * nbytes / server, nbytes / bandwidth)
    if p <= 1:
        return 0.0
    if algo == "ring":
        return ring_allreduce_seconds(p, nbytes, latency, bandwidth)
    if algo == "halving-doubling":
        return 2 * math.ceil(math.log2(p)) * latency + 2 * (p - 1) / p * nbytes / bandwidth
    raise ValueError(f"allreduce must be one of {list(ALLREDUCE_ALGOS)}, got {algo!r}")


class SimClock:
    """Per-node simulated clocks of N nodes (the same on every shard: inputs are global)."""

    def __init__(self, model: NetworkModel, n: int) -> None:
        self.model = model
        self.n = n
        self.t = np.zeros(n)
        #: finish times of overlapped communication not yet waited on (-inf: none)
        self.pending = np.full(n, -np.inf)

    @property
    def now(self) -> float:
        """The latest clock: when the last node finished its last round."""
        return float(self.t.max())

    def state_dict(self) -> dict[str, Tensor]:
        """The clocks and the pending finish times (a simulation's checkpoint)."""
        return {"t": torch.from_numpy(self.t.copy()),
                "pending": torch.from_numpy(self.pending.copy())}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for key in ("t", "pending"):
            if tuple(state[key].shape) != (self.n,):
                raise ValueError(f"clock {key} has shape {tuple(state[key].shape)}, expected "
                                 f"({self.n},)")
        self.t = state["t"].numpy().astype(np.float64)
        self.pending = state["pending"].numpy().astype(np.float64)

    def compute(self, r: int, steps: Tensor, slowdown: Tensor) -> None:
        """Round ``r``'s local steps: ``steps`` [N] inner steps, ``slowdown`` [N] factors."""
        m = self.model
        dt = steps.double().numpy() * m.compute_time * slowdown.double().numpy()
        self.t += dt * m.noise((self.n,), _COMPUTE, r)
        # the overlapped outer step waits here for what the previous sync started
        self.t = np.maximum(self.t, self.pending)
        self.pending = np.full(self.n, -np.inf)

    def flush(self) -> None:
        """The run's last outer step (``algorithm.flush``): every node waits for the overlapped
        communication still in flight, whose update the final model holds."""
        self.t = np.maximum(self.t, self.pending)
        self.pending = np.full(self.n, -np.inf)

    def communicate(self, r: int, k: int, event: CommEvent, alive: Tensor) -> None:
        """Apply the ``k``-th communication event of round ``r`` (an overlapped one only sets
        when it will be done, see the module doc)."""
        if not event.overlapped:
            self.t = self._finish(r, k, event, alive)
            return
        # overlapped events of one sync run one after another, from the sync's clocks
        start = np.maximum(self.t, self.pending)
        done = self._finish(r, k, event, alive, start)
        self.pending = np.where(done > start, done, self.pending)

    def _finish(self, r: int, k: int, event: CommEvent, alive: Tensor,
                start: np.ndarray | None = None) -> np.ndarray:
        """Every node's clock after ``event``, started at ``start`` (default: the clocks)."""
        m = self.model
        t = (self.t if start is None else start).copy()
        up = alive.numpy().astype(bool)
        if event.op == "all_reduce":
            part = up if event.participants is None else event.participants.numpy().astype(bool)
            if not part.any():
                return t
            count = int(part.sum())
            dur = allreduce_seconds(m.allreduce, count, event.nbytes, m.latency, m.bandwidth,
                                    m.server_bandwidth)
            dur *= float(m.noise((1,), _COLLECTIVE, r, k)[0])
            t[part] = t[part].max() + dur
            return t
        if event.op == "all_gather":  # a ring all-gather of one payload per participant
            part = up if event.participants is None else event.participants.numpy().astype(bool)
            count = int(part.sum())
            if count == 0:
                return t
            dur = (count - 1) * (m.latency + event.nbytes / m.bandwidth)
            dur *= float(m.noise((1,), _COLLECTIVE, r, k)[0])
            t[part] = t[part].max() + dur
            return t
        if event.op != "exchange" or event.peers is None:
            raise ValueError(f"unknown communication event {event.op!r}")
        table = event.peers.numpy()
        valid = table >= 0
        src = np.where(valid, table, 0)
        sent = valid & up[src] & up[:, None]
        out_count = np.bincount(src[sent], minlength=self.n)
        tx = event.nbytes / m.bandwidth
        send_done = t + out_count * tx
        arrival = send_done[src] + m.latency * m.noise(table.shape, _MESSAGE, r, k)
        wait = np.where(sent, arrival, -np.inf).max(axis=1, initial=-np.inf)
        return np.where(up, np.maximum(send_done, wait), t)

    def end_round(self, alive: Tensor) -> None:
        """Nodes that are down catch up with the latest node that is up."""
        up = alive.numpy().astype(bool)
        if up.any() and not up.all():
            self.t[~up] = self.t[up].max()

