"""Compressed communication: the quantized all-reduce and compressed exchanges.

**All-reduce** (as torchft's quantized all-reduce): the buffer ``[P]`` is split into N chunks of
``c = ceil(P / N)`` elements (zero-padded), each chunk encoded on its own (error feedback on the
whole row first);

1. reduce-scatter: rank r gets every rank's chunk r (an all-to-all of the encoded chunks);
2. rank r decodes them and takes the weighted sum in fp32, rank by rank in rank order;
3. rank r encodes its reduced chunk again, and an all-gather brings every reduced chunk to
   every rank, which decodes them.

Over Gloo both stages post every receive and every send at once (:func:`_post_spread`), each
destination's chunk is encoded just before its send and each chunk decoded as it lands (in rank
order for the sum: the same bits); with NCCL or a
:class:`~gossip.comm.monitor.PeerMonitor` they are ``all_to_all_single`` and ``all_gather``.

Only encoded bytes travel: ``2 (N - 1)`` encoded chunks per rank, the ring all-reduce's volume of
the compressed buffer. Top-k is the exception: the sum of N top-k chunks has up to N k entries,
and re-encoding it would drop most of them (with no residual to keep them), so top-k rows are
all-gathered whole, ``N - 1`` payloads per rank, and every rank sums them (as sparse all-reduces
do, e.g. Deep Gradient Compression); the simulator logs it as an ``all_gather``.
:func:`stacked_all_reduce_mean_` computes the very same numbers over N stacked rows (same chunks,
same seeds, same order of the sum), so a simulated run matches a real one. A row of weight 0
contributes nothing and keeps its residual.
Started as async work (overlapped DiLoCo, ``TorchCommunicator.start_all_reduce_mean_``),
:func:`torch_all_reduce_mean_` runs whole on the communicator's worker thread over a process
group of its own (:mod:`gossip.comm.background`).

**Exchange**: :func:`exchange_compressed` encodes each local row once (error feedback first),
exchanges the encoded bytes through any communicator's ``exchange_slots`` (so ``Traffic``, the
simulator's byte counts and its network model all see compressed bytes) and hands back what the
row sent (decoded, what its receivers will see) and a :class:`DecodedReceived`.
:func:`start_exchange_compressed` does the same as async work (overlapped NoLoCo): encoded now,
in flight until ``wait()``, decoded then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from gossip.comm.base import CommError, DenseReceived, PeerFailure, Received, weight_total_ok
from gossip.comm.pending import Pending, start_exchange
from gossip.compress import Compressor

if TYPE_CHECKING:
    from gossip.comm.base import Communicator
    from gossip.comm.stacked import StackedCommunicator
    from gossip.comm.torch_comm import TorchCommunicator

__all__ = ["DecodedReceived", "exchange_compressed", "stacked_all_reduce_mean_",
           "start_exchange_compressed", "torch_all_reduce_mean_"]


#: torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)


def _chunks(width: int, n: int) -> int:
    return max(1, math.ceil(width / n))


def _chunked(comp: Compressor, x: Tensor, n: int, nodes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Stage 1's input for local rows ``x`` [L, P]: ``v`` (x plus the residual, fp32), its n
    chunks per row [L * n, c] (zero-padded) and their row ids ``node * n + chunk``."""
    rows, width = x.shape
    c = _chunks(width, n)
    v = comp.begin(x)
    padded = v if n * c == width else torch.nn.functional.pad(v, (0, n * c - width))
    ids = (nodes.to(torch.int64).unsqueeze(1) * n + torch.arange(n)).reshape(-1)
    return v, padded.view(rows * n, c), ids


def _record_sent(comp: Compressor, v: Tensor, wire: Tensor, n: int, seed: int,
                 participating: Tensor) -> Tensor:
    """Decode the chunks sent (wire [L * n, B]) to [L, n, c] and update the residual of the
    participating rows."""
    rows, width = v.shape
    c = _chunks(width, n)
    sent = comp.codec.decode(wire, c, seed=seed).view(rows, n, c)
    comp.end(v, sent.view(rows, n * c)[:, :width], participating.to(v.device))
    return sent


def _encode_whole(comp: Compressor, x: Tensor, nodes: Tensor, seed: int,
                  participating: Tensor) -> tuple[Tensor, Tensor]:
    """Top-k's all-gather: each row encoded whole (no chunks); (wire [L, B], sent [L, P])."""
    v = comp.begin(x)
    wire = comp.codec.encode(v, seed=seed, rows=nodes)
    sent = comp.codec.decode(wire, x.shape[1], seed=seed)
    comp.end(v, sent, participating.to(x.device))
    return wire, sent


def _weighted_sum(rows: Tensor, frac: Tensor) -> Tensor:
    """``sum_i frac[i] rows[i]`` over rows with frac > 0, one by one in order (fp32; a row of
    weight 0 may hold NaN and contributes nothing)."""
    acc = torch.zeros_like(rows[0])
    for i in range(rows.shape[0]):
        f = float(frac[i])
        if f > 0:
            acc.add_(rows[i] * f)
    return acc


def _stage2(comp: Compressor, reduced: Tensor, n: int, seed: int, owners: Tensor) -> Tensor:
    """Re-encode reduced chunks [M, c] owned by ``owners``: the wire rows. Same seed as stage 1
    (randk keeps the indices the sum lives on, so re-encoding it loses nothing); row ids
    ``n * n + owner``, apart from stage 1's ``node * n + chunk``."""
    return comp.codec.encode(reduced, seed=seed, rows=n * n + owners.to(torch.int64))


def _fractions(weights: Tensor) -> Tensor:
    total, negative = float(weights.sum()), float((weights < 0).sum())
    if not weight_total_ok(total, negative):
        raise ValueError("all_reduce_mean_: every participating weight is zero, or one is "
                         f"negative or not finite (their sum: {total}, {int(negative)} "
                         "negative)")
    return (weights / total).to(torch.float32)


def _point_to_point(comm: TorchCommunicator) -> bool:
    """Whether :func:`_spread` posts point-to-point work (Gloo, no monitor) or collectives."""
    return comm.backend == "gloo" and comm.monitor is None


def _spread(comm: TorchCommunicator, send: Tensor, recv: Tensor, what: str) -> None:
    """Row ``j`` of ``send`` [n, B] to rank ``j``, row ``j`` of ``recv`` [n, B] from rank ``j``
    (this rank's own row is copied): the reduce-scatter stage, and the all-gather stage when
    ``send`` is one row expanded n times.

    Over Gloo without a monitor it posts every receive, then every send, all at once
    (``batch_isend_irecv``): on 100 Mbit/s shaped links one int8 reduce-scatter stage of 16M
    parameters took 1.40 s this way against 1.57 s through ``all_to_all_single`` at 8 ranks,
    1.18 s against 1.61 s at 4 (``benchmarks/wan.py --cases raw_alltoall,raw_alltoall_p2p``);
    Gloo's ``all_gather`` is a ring of n - 1 rounds, each waiting for the last. Elsewhere (NCCL,
    or a monitor, whose watch needs collectives that report completion) the collectives run.
    """
    n, me = comm.world_size, comm.rank
    everyone = tuple(r for r in range(n) if r != me)
    if _point_to_point(comm):
        arrived = _post_spread(comm, send, recv, what)
        for j in range(n):
            arrived(j)
        arrived(-1)
    elif send.stride(0) == 0:  # one row to everyone
        comm._wait(_all_gather(recv.view(-1), send[0].contiguous().view(-1), group=comm.group,
                               async_op=True), what, everyone, collective=True)
    else:
        comm._wait(dist.all_to_all_single(recv, send, group=comm.group, async_op=True),
                   what, everyone, collective=True)


def _post_spread(comm: TorchCommunicator, send: Tensor | Callable[[int], Tensor], recv: Tensor,
                 what: str) -> Callable[[int], None]:
    """:func:`_spread`'s point-to-point work, posted: every receive, then a send to each peer in
    the order ``me + 1, me + 2, ...`` (not all to rank 0 first); ``send`` is the rows [n, B] or
    a function giving row ``j`` when its send is posted. The returned function waits for row
    ``j`` of ``recv`` (``-1``: for every send), so a caller can use each row as it lands."""
    n, me = comm.world_size, comm.rank
    everyone = tuple(r for r in range(n) if r != me)
    row = send.__getitem__ if isinstance(send, Tensor) else send
    try:
        receives = {j: dist.irecv(recv[j], comm._global(j), comm.group) for j in everyone}
        sends = [dist.isend(row(j), comm._global(j), comm.group)
                 for j in ((me + k) % n for k in range(1, n))]
    except RuntimeError as e:  # a pair already closed (a peer died or gave up on this rank)
        raise PeerFailure(f"{what} could not be posted: {str(e).splitlines()[0]}",
                          rank=me, peers=everyone, step=comm.step) from e
    recv[me].copy_(row(me))

    def arrived(j: int) -> None:
        for work in sends if j < 0 else [receives.get(j)]:
            if work is not None:
                comm._wait(work, what, everyone)
    return arrived


def torch_all_reduce_mean_(comm: TorchCommunicator, x: Tensor, weight: Tensor | None,
                           comp: Compressor) -> None:
    """The compressed weighted all-reduce on a real rank (x [1, P]); see the module doc."""
    n, me = comm.world_size, comm.rank
    everyone = tuple(r for r in range(n) if r != me)
    mine = 1.0 if weight is None else float(weight.detach().reshape(()))
    # NCCL reduces device tensors only; Gloo takes them on the host
    weights = torch.zeros(n, dtype=torch.float64,
                          device=x.device if comm.backend == "nccl" else "cpu")
    weights[me] = mine
    if weight is not None:  # every rank needs every weight (to weight the chunks it reduces)
        comm._wait(dist.all_reduce(weights, group=comm.group, async_op=True),
                   "all_reduce of weights", everyone, collective=True)
    else:
        weights.fill_(1.0)
    try:
        frac = _fractions(weights)
    except ValueError as e:
        raise CommError(str(e), rank=me, step=comm.step) from None
    width = x.shape[1]
    c = _chunks(width, n)
    seed = comp.next_seed()
    stage = comm.backend == "gloo" and x.is_cuda
    if comp.codec.kind == "topk":  # sparse: all-gather every rank's top-k, sum them here
        wire, _ = _encode_whole(comp, x, comm.nodes, seed, torch.tensor([mine > 0]))
        wire = wire.cpu() if stage else wire
        full = wire.new_empty((n, wire.shape[1]))
        _spread(comm, wire.expand(n, -1), full, "compressed all_reduce (all-gather of top-k)")
        out = _weighted_sum(comp.codec.decode(full, width, seed=seed), frac.to(full.device))
        x.copy_(out.unsqueeze(0).to(x.device))
        comm.traffic.add("all_reduce", (n - 1) * wire.shape[1])
        return
    v, chunks, ids = _chunked(comp, x, n, comm.nodes)
    what = "compressed all_reduce (reduce-scatter)"
    if _point_to_point(comm):
        # each destination's chunk encoded just before its send (the first transfer starts
        # after 1/n of the encoding); decoded and added as it lands, in rank order (the same sum)
        encoded: dict[int, Tensor] = {}

        def encode(j: int) -> Tensor:
            row = comp.codec.encode(chunks[j : j + 1], seed=seed, rows=ids[j : j + 1])
            encoded[j] = row.cpu() if stage else row
            return encoded[j][0]
        got = torch.empty((n, comp.codec.nbytes(c)), dtype=torch.uint8,
                          device="cpu" if stage else x.device)
        arrived = _post_spread(comm, encode, got, what)
        reduced = torch.zeros(c, dtype=torch.float32, device=got.device)
        for i in range(n):
            arrived(i)
            f = float(frac[i])
            if f > 0:  # the same sum as _weighted_sum, one decoded row at a time
                reduced.add_(comp.codec.decode(got[i : i + 1], c, seed=seed)[0] * f)
        arrived(-1)
        # what was sent, for the residual (else ``got``: the same shape and device)
        wire = torch.cat([encoded[j] for j in range(n)]) if comp.feedback is not None else got
    else:
        wire = comp.codec.encode(chunks, seed=seed, rows=ids)
        wire = wire.cpu() if stage else wire
        got = torch.empty_like(wire)  # [n, B]: every rank's chunk ``me``
        _spread(comm, wire, got, what)
        reduced = _weighted_sum(comp.codec.decode(got, c, seed=seed), frac.to(got.device))
    if comp.feedback is not None:
        _record_sent(comp, v, wire.to(x.device), n, seed, torch.tensor([mine > 0]))
    mine_wire = _stage2(comp, reduced.unsqueeze(0), n, seed, torch.tensor([me])).to(wire.device)
    full = torch.empty_like(wire)
    what = "compressed all_reduce (all-gather)"
    if _point_to_point(comm):  # decode each reduced chunk into x as it lands
        arrived = _post_spread(comm, mine_wire.expand(n, -1), full, what)
        for j in range(n):
            arrived(j)
            cols = slice(j * c, min((j + 1) * c, width))
            if cols.start < cols.stop:
                row = comp.codec.decode(full[j : j + 1], c, seed=seed)[:, : cols.stop - cols.start]
                x[:, cols].copy_(row.to(x.device))
        arrived(-1)
    else:
        _spread(comm, mine_wire.expand(n, -1), full, what)
        out = comp.codec.decode(full, c, seed=seed).view(1, n * c)[:, :width]
        x.copy_(out.to(x.device))
    comm.traffic.add("all_reduce", 2 * (n - 1) * wire.shape[1])


def stacked_all_reduce_mean_(comm: StackedCommunicator, x: Tensor, weight: Tensor | None,
                             comp: Compressor) -> None:
    """The same numbers as :func:`torch_all_reduce_mean_` over stacked rows x [L, P]."""
    from gossip.comm.stacked import CommEvent

    n = comm.world_size
    alive_local = comm.alive[comm.nodes]
    w = torch.ones(x.shape[0], dtype=torch.float64) if weight is None \
        else weight.to("cpu", torch.float64)
    w = w * alive_local
    weights = torch.zeros(n, dtype=torch.float64)
    weights[comm.nodes] = w
    if comm.group is not None:
        dist.all_reduce(weights, group=comm.group)
    frac = _fractions(weights)
    width = x.shape[1]
    c = _chunks(width, n)
    seed = comp.next_seed()
    senders = int(alive_local.sum())
    if comp.codec.kind == "topk":  # as on a real rank: an all-gather of every node's top-k
        wire, sent = _encode_whole(comp, x, comm.nodes, seed, w > 0)
        out = _weighted_sum(sent, frac[comm.nodes].to(x.device))
        if comm.group is not None:
            dist.all_reduce(out, group=comm.group)
        x.copy_(out.to(x.device).expand_as(x))
        nbytes = wire.shape[1]
        up = max(1, int(comm.alive.sum()))  # every node that is up gets every payload
        comm.bytes_per_node[comm.alive] += (up - 1) * nbytes
        comm.traffic.add("all_reduce", (up - 1) * nbytes * senders, messages=senders)
        comm.events.append(CommEvent("all_gather", nbytes, None, None, comm.alive.clone()))
        return
    v, chunks, ids = _chunked(comp, x, n, comm.nodes)
    wire = comp.codec.encode(chunks, seed=seed, rows=ids)
    sent = _record_sent(comp, v, wire, n, seed, w > 0)
    reduced = _weighted_sum(sent.view(x.shape[0], n * c),
                            frac[comm.nodes].to(x.device)).view(n, c)
    if comm.group is not None:  # shards' partial sums (summed in another order than one rank)
        dist.all_reduce(reduced, group=comm.group)
    full = _stage2(comp, reduced, n, seed, torch.arange(n))
    out = comp.codec.decode(full, c, seed=seed).view(1, n * c)[:, :width]
    x.copy_(out.to(x.device).expand_as(x))
    # the volume of a ring over the P nodes that are up (all N without faults, the very
    # chunks above): 2 (P - 1) encoded chunks of width / P each
    up = max(1, int(comm.alive.sum()))
    nbytes = wire.shape[1] if up == n else comp.codec.nbytes(_chunks(width, up))
    comm.bytes_per_node[comm.alive] += 2 * (up - 1) * nbytes
    comm.traffic.add("all_reduce", 2 * (up - 1) * nbytes * senders, messages=senders)
    # the network model charges an all-reduce of the whole encoded buffer (P chunks)
    comm.events.append(CommEvent("all_reduce", up * nbytes, None, None, comm.alive.clone()))


class DecodedReceived(Received):
    """What a compressed exchange delivered, decoded slot by slot (zeros where nothing came)."""

    def __init__(self, wire: Received, comp: Compressor, width: int, seed: int) -> None:
        self.wire = wire
        self.arrived = wire.arrived
        self._decode: Callable[[Tensor], Tensor] = \
            lambda rows: comp.codec.decode(rows, width, seed=seed)

    def slot(self, k: int) -> Tensor:
        return self._decode(self.wire.slot(k)).masked_fill_(~self.arrived[:, k : k + 1], 0)

    def sender_stats(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        return self.wire.sender_stats(lambda rows: fn(self._decode(rows)))

    def dense(self) -> Tensor:
        return torch.stack([self.slot(k) for k in range(self.num_slots)], dim=1)

    def reads(self, x: Tensor) -> bool:
        return False  # slots are decoded copies


def _encode_for_exchange(comm: Communicator, x: Tensor, comp: Compressor, active: Tensor | None,
                         need_sent: bool) -> tuple[int, Tensor, Tensor | None]:
    """(seed, wire [L, B], what each row sent decoded [L, P] or None): error feedback first; the
    residual of rows where ``active`` [L] is False is kept."""
    seed = comp.next_seed()
    v = comp.begin(x)
    wire = comp.codec.encode(v, seed=seed, rows=comm.nodes)
    if not need_sent and comp.feedback is None:
        return seed, wire, None
    sent = comp.codec.decode(wire, x.shape[1], seed=seed)
    comp.end(v, sent, None if active is None else active.to(torch.bool).to(x.device))
    return seed, wire, sent


def exchange_compressed(comm: Communicator, x: Tensor, peers: Tensor, comp: Compressor,
                        active: Tensor | None = None) -> tuple[Tensor, DecodedReceived]:
    """Send each local row of ``x`` [L, P] through ``comp`` to the nodes that list it in
    ``peers``; returns (what each row sent, decoded fp32 [L, P]; what arrived, decoded).

    The residual of rows where ``active`` [L] is False is kept (they do not use this round).
    """
    seed, wire, sent = _encode_for_exchange(comm, x, comp, active, need_sent=True)
    assert sent is not None
    got = comm.exchange_slots(wire, peers)
    return sent, DecodedReceived(got, comp, x.shape[1], seed)


def start_exchange_compressed(comm: Communicator, x: Tensor, peers: Tensor, comp: Compressor,
                              received: Tensor, active: Tensor | None = None
                              ) -> Pending[DecodedReceived]:
    """:func:`exchange_compressed` as async work (overlapped outer steps): ``x`` is encoded
    now (the same bytes, seeds and residual), its exchange posted into the caller's ``received``
    (uint8 [L, K, B], B the wire width) through :func:`gossip.comm.pending.start_exchange`;
    ``wait()`` gives what arrived, decoded on demand."""
    seed, wire, _ = _encode_for_exchange(comm, x, comp, active, need_sent=False)
    work = start_exchange(comm, wire, peers, received)

    def finish() -> DecodedReceived:
        got, arrived = work.wait()
        return DecodedReceived(DenseReceived(got, arrived), comp, x.shape[1], seed)
    return Pending(finish)
