"""Communicator over a torch.distributed ProcessGroup (NCCL on GPUs, Gloo on CPUs).

One rank is one node (L = 1). Models travel as the flat buffers of :mod:`gossip.flat`, one
message per buffer, never one per parameter tensor. Every wait is bounded by ``timeout`` and
raises a :class:`~gossip.comm.base.CommError` that names the rank, the peers and the step.
Gloo cannot send CUDA tensors point-to-point (both processes die in ``writev``), so over Gloo
the point-to-point traffic of CUDA tensors is staged through pinned CPU buffers.
:meth:`TorchCommunicator.start_all_reduce_mean_` and :meth:`TorchCommunicator.start_exchange`
post the same work as async handles (overlapped outer steps, :mod:`gossip.comm.pending`); their
``wait()`` goes through the same timed, monitored waits as the blocking calls, which are just
``start_...().wait()``. A compressed all-reduce started that way runs on a worker thread with a
process group of its own (:mod:`gossip.comm.background`).

With a :class:`~gossip.comm.monitor.PeerMonitor` the communicator survives dead peers: an
exchange leaves out peers known to be dead and turns a peer's failure (closed connection or
timeout) into a message that did not arrive, reporting the peer to every rank through the store;
``alive_nodes`` gives the membership all ranks agree on for a step; and a collective that waits on
a dead rank fails within the monitor's ``dead_after`` seconds with a :class:`PeerFailure` naming
it, instead of waiting out the full timeout.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from gossip.comm.background import Background
from gossip.comm.base import (
    CommError,
    CommTimeout,
    DenseReceived,
    PeerFailure,
    Traffic,
    check_peers,
    weight_total_ok,
)
from gossip.comm.compressed import torch_all_reduce_mean_
from gossip.comm.monitor import PeerMonitor
from gossip.comm.pending import Pending
from gossip.compress import Compressor
from gossip.scratch import Scratch

__all__ = ["STORE_PREFIX_ENV", "TorchCommunicator", "init_from_env"]


class TorchCommunicator:
    """The Communicator protocol over a ProcessGroup.

    Args:
        group: the process group (default: the world group).
        timeout: seconds any single wait may take before :class:`CommTimeout` is raised.
        monitor: watches the other ranks; with it, dead peers are survived (see module doc).
    """

    def __init__(self, group: dist.ProcessGroup | None = None, *, timeout: float = 300.0,
                 monitor: PeerMonitor | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self._world_size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))
        self.timeout = timeout
        self.step = -1  # the caller's step, for error messages
        self._traffic = Traffic()
        self._nodes = torch.tensor([self.rank], dtype=torch.long)
        # receive buffers of exchange(), reused by the next exchange of the same shape
        self._recv_buffers = Scratch()
        self.monitor = monitor
        self.deaths: dict[int, int] = {}  # peer -> step at which this rank learned it died
        self.failures: dict[int, str] = {}  # peer -> why this rank's exchange with it failed
        self._armed = False
        self._background: Background | None = None  # compressed all-reduces in flight
        # point-to-point work posted and not yet waited on, kept alive here: a Gloo receive
        # whose work object is garbage-collected is withdrawn, and the message meant for it then
        # lands in (or blocks) the next receive from that peer; an algorithm dropped with an
        # exchange in flight must not hang the next one (a test)
        self._posted: dict[int, object] = {}
        self._next_post = 0

    @property
    def nodes(self) -> Tensor:
        return self._nodes

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def traffic(self) -> Traffic:
        return self._traffic

    def _global(self, group_rank: int) -> int:
        if self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _wait(self, work: dist.Work, what: str, peers: tuple[int, ...], *,
              collective: bool = False) -> None:
        if self.monitor is not None and collective:
            self._watch(work, what, peers)
        try:
            ok = work.wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as e:
            msg = str(e)
            if self.monitor is not None and collective:
                # Gloo names the address whose connection broke, not the rank: ask the monitor
                dead = self.monitor.wait_for_verdict(peers, self.timeout)
                if dead:
                    self._learn(dead)
                    raise PeerFailure(f"{what} failed: rank(s) {sorted(dead)} died",
                                      rank=self.rank, peers=tuple(sorted(dead)),
                                      step=self.step) from e
            kind = CommTimeout if "imeout" in msg or "imed out" in msg else PeerFailure
            raise kind(f"{what} failed: {msg.splitlines()[0] if msg else e!r}",
                       rank=self.rank, peers=peers, step=self.step) from e
        if ok is False:
            raise CommTimeout(f"{what} timed out after {self.timeout} s",
                              rank=self.rank, peers=peers, step=self.step)

    def _watch(self, work: dist.Work, what: str, peers: tuple[int, ...]) -> None:
        """Wait for a collective while watching the monitor: a dead peer fails it early."""
        assert self.monitor is not None
        deadline = time.monotonic() + self.timeout
        pause = 1e-5
        while not work.is_completed():
            dead = self.monitor.dead() & set(peers)
            if dead:
                self._learn(dead)
                raise PeerFailure(f"{what} cannot finish: rank(s) {sorted(dead)} died",
                                  rank=self.rank, peers=tuple(sorted(dead)), step=self.step)
            if time.monotonic() > deadline:
                raise CommTimeout(f"{what} timed out after {self.timeout} s",
                                  rank=self.rank, peers=peers, step=self.step)
            time.sleep(pause)
            pause = min(2 * pause, 1e-3)

    def _arm(self) -> None:
        """On the first communication: peers judge this rank by its heartbeat from now on."""
        if self.monitor is not None and not self._armed:
            self.monitor.arm()
            self._armed = True

    def _learn(self, dead: set[int] | frozenset[int]) -> None:
        for r in dead - {self.rank}:  # a rank never counts itself dead
            self.deaths.setdefault(r, self.step)

    def alive_nodes(self, step: int) -> Tensor:
        """Which nodes every rank treats as alive at outer step ``step`` (bool [N]).

        Without a monitor everyone is alive. With one, the ranks agree through the store: the
        first rank to reach ``step`` writes the dead set it knows, and all ranks use that set.
        """
        alive = torch.ones(self._world_size, dtype=torch.bool)
        if self.monitor is not None:
            self._arm()
            dead = self.monitor.agreed_dead(step)
            self._learn(dead)
            alive[list(dead)] = False
        return alive

    def all_reduce_mean_(self, x: Tensor, weight: Tensor | None = None, *,
                         compressor: Compressor | None = None) -> None:
        if compressor is not None and compressor.codec.lossy:
            _check_float(x)
            self._arm()  # (peers judge this rank by its heartbeat only once it armed)
            torch_all_reduce_mean_(self, x, weight, compressor)
            return
        self.start_all_reduce_mean_(x, weight, compressor=compressor).wait()

    def start_all_reduce_mean_(self, x: Tensor, weight: Tensor | None = None, *,
                               compressor: Compressor | None = None) -> Pending[None]:
        """:meth:`all_reduce_mean_` posted as async work; ``wait()`` finishes it (through the
        same monitored wait as the blocking call). ``x`` must not change until then. The weights'
        8-byte all-reduce runs before this returns. A compressed all-reduce (whose two stages
        need work between them) runs whole, weights included, on a worker thread with a process
        group of its own (:mod:`gossip.comm.background`); ``x`` and ``compressor`` must not be
        touched until ``wait()``."""
        _check_float(x)
        self._arm()
        if compressor is not None and compressor.codec.lossy:
            if self._background is None:
                self._background = Background(self)
            return self._background.submit(
                lambda side: torch_all_reduce_mean_(side, x, weight, compressor))
        n = self._world_size
        everyone = tuple(r for r in range(n) if r != self.rank)
        if weight is not None:
            if weight.numel() != 1:
                raise ValueError(f"weight must have one entry on a real rank, got shape "
                                 f"{tuple(weight.shape)}")
            mine = float(weight.detach().reshape(()))
            # the sum, and how many ranks gave a negative weight: every rank refuses together
            stats = torch.tensor([mine, float(mine < 0)], dtype=torch.float64, device=x.device)
            self._wait(dist.all_reduce(stats, group=self.group, async_op=True),
                       "all_reduce of weights", everyone, collective=True)
            total = stats[:1]
            if not weight_total_ok(float(total), float(stats[1])):
                raise CommError(f"all weights are zero, or one is negative or not finite "
                                f"(total {float(total)}, {int(stats[1])} negative)",
                                rank=self.rank, step=self.step)
            if mine == 0:
                x.zero_()  # contributes exact zeros, even if this rank's model holds NaN/inf
            else:
                x.mul_(mine / float(total))
        work = dist.all_reduce(x, group=self.group, async_op=True)

        def finish() -> None:
            self._wait(work, "all_reduce", everyone, collective=True)
            if weight is None:
                x.div_(n)
            self._traffic.add("all_reduce", x.numel() * x.element_size() * 2 * (n - 1) // n)
        return Pending(finish)

    def exchange(self, x: Tensor, peers: Tensor) -> tuple[Tensor, Tensor]:
        """See :meth:`Communicator.exchange`.

        ``received`` is a buffer this communicator owns and reuses: the next exchange of a buffer
        of the same width and dtype overwrites it (copy it to keep it).
        """
        return self.start_exchange(x, peers).wait()

    def start_exchange(self, x: Tensor, peers: Tensor, *,
                       received: Tensor | None = None) -> Pending[tuple[Tensor, Tensor]]:
        """:meth:`exchange` posted as async point-to-point work; ``wait()`` finishes it and gives
        ``(received, arrived)``. ``x`` must not change until then. ``received`` [1, K, P]: the
        caller's receive buffer (default: this communicator's reused one)."""
        if x.dim() != 2 or x.shape[0] != 1:
            raise ValueError(f"x must have one row on a real rank, got shape {tuple(x.shape)}")
        table = check_peers(peers, self._world_size)
        me = self.rank
        recv_from = table[me].tolist()
        # one message per slot that lists this node (a row may list it more than once)
        listed = (table == me).sum(dim=1).tolist()
        send_to = [j for j, count in enumerate(listed) for _ in range(count)]

        stage = self.backend == "gloo" and x.is_cuda
        src = x[0]
        if stage:
            src = torch.empty(src.shape, dtype=src.dtype, pin_memory=True).copy_(src)
        k = table.shape[1]
        shape = (1, k, x.shape[1])
        if received is not None and (received.shape != shape or received.dtype != x.dtype):
            raise ValueError(f"received must have shape {shape} and dtype {x.dtype}, got "
                             f"{tuple(received.shape)} {received.dtype}")
        target = received  # the caller's buffer, if any (on x's device)
        if received is None:
            received = self._recv_buffers.get(shape, x.dtype, src.device)
        elif stage:  # its own CPU buffer: another exchange may be in flight
            received = torch.empty(shape, dtype=x.dtype)
        for slot, j in enumerate(recv_from):
            if j < 0:
                received[0, slot].zero_()  # padding holds zeros, like a message that never came
        arrived = torch.tensor([[j >= 0 for j in recv_from]], dtype=torch.bool, device=x.device)
        if self.monitor is None:
            # receives first: posted after the sends, they serialized the two directions of a
            # shaped link (measured: 2.65 s against 1.48 s for the same exchange)
            ops = [dist.P2POp(dist.irecv, received[0, slot], self._global(j), self.group)
                   for slot, j in enumerate(recv_from) if j >= 0]
            ops += [dist.P2POp(dist.isend, src, self._global(j), self.group) for j in send_to]
            works = dist.batch_isend_irecv(ops) if ops else []
            involved = tuple(sorted(set(send_to) | {j for j in recv_from if j >= 0}))

            def wait_all() -> list[int]:
                for work in works:
                    self._wait(work, "exchange", involved)
                return send_to
            held: object = works
        else:
            posted, wait_all = self._post_surviving(src, received, arrived, send_to, recv_from)
            held = posted
        recv = received
        token = self._next_post
        self._next_post += 1
        self._posted[token] = held

        def finish() -> tuple[Tensor, Tensor]:
            try:
                sent_to = wait_all()
            finally:
                self._posted.pop(token, None)
            self._traffic.add("exchange", len(sent_to) * src.numel() * src.element_size(),
                              messages=len(sent_to))
            if target is not None:
                return (target.copy_(recv) if stage else recv), arrived
            return (recv.to(x.device) if stage else recv), arrived
        return Pending(finish)

    def exchange_slots(self, x: Tensor, peers: Tensor) -> DenseReceived:
        """:meth:`exchange`; every slot is held at once (the communicator's reused buffer)."""
        return DenseReceived(*self.exchange(x, peers))

    def _post_surviving(self, src: Tensor, received: Tensor, arrived: Tensor,
                        send_to: list[int], recv_from: list[int]
                        ) -> tuple[list[tuple[int, int, dist.Work | None]],
                                   Callable[[], list[int]]]:
        """Exchange with every peer not known dead; a peer that fails is reported and skipped.

        Each operation is posted now (receives first) and waited on its own by the returned
        function, and each wait ends as soon as the monitor finds that peer dead (a frozen peer:
        after ``dead_after``), so one dead or frozen peer cannot take the others' messages down
        with it, nor hold this rank for the full timeout. Returns the posted work and that
        function, which returns the peers that were sent to.
        """
        assert self.monitor is not None
        self._arm()
        # only deaths this rank saw itself or all ranks agreed on: skipping a send on a mere
        # suspicion would make a live peer time out on us
        dead = set(self.deaths)
        posted: list[tuple[int, int, dist.Work | None]] = []  # (peer, slot or -1, work)
        for slot, j in enumerate(recv_from):
            if j < 0:
                continue
            if j in dead:
                arrived[0, slot] = False
                received[0, slot].zero_()
                continue
            posted.append((j, slot, self._post(dist.irecv, received[0, slot], j)))
        for j in send_to:
            if j not in dead:
                posted.append((j, -1, self._post(dist.isend, src, j)))
        return posted, lambda: self._finish_surviving(posted, received, arrived, send_to,
                                                      dead)

    def _finish_surviving(self, posted: list[tuple[int, int, dist.Work | None]],
                          received: Tensor, arrived: Tensor, send_to: list[int],
                          dead: set[int]) -> list[int]:
        assert self.monitor is not None
        failed: set[int] = set()
        for j, slot, work in posted:
            ok = work is not None and j not in failed
            if work is None:
                self.failures.setdefault(j, "its connection was already closed")
            if ok:
                try:
                    self._wait_peer(work, "exchange", j)
                except CommError as e:
                    ok = False
                    self.failures.setdefault(j, str(e))
            if not ok:
                failed.add(j)
                if slot >= 0:
                    arrived[0, slot] = False
                    received[0, slot].zero_()
        if failed:
            # an abandoned receive may still land later: its buffer is never handed out again
            self._recv_buffers = Scratch()
        for j in failed:
            self.deaths.setdefault(j, self.step)
            self.monitor.report_dead(j, self.step)
        return [j for j in send_to if j not in dead and j not in failed]

    def _wait_peer(self, work: dist.Work, what: str, peer: int) -> None:
        """Wait for one point-to-point operation with ``peer``, watching the monitor.

        Gloo's point-to-point work never reports completion to ``is_completed`` and a wait
        that times out closes the pair, so the wait runs on a daemon thread (for up to the
        timeout) while this thread watches the monitor: the monitor declaring ``peer`` dead ends
        it at once with :class:`PeerFailure`; the thread, left behind, keeps the work (and its
        tensor) alive until the timeout.
        """
        assert self.monitor is not None
        waiter = _Waiter(work, self.timeout)
        deadline = time.monotonic() + self.timeout
        poll = min(0.05, self.monitor.interval / 2)
        while not waiter.done.wait(poll):
            if peer in self.monitor.dead():
                raise PeerFailure(f"{what} abandoned: rank {peer} died",
                                  rank=self.rank, peers=(peer,), step=self.step)
            if time.monotonic() > deadline:
                raise CommTimeout(f"{what} timed out after {self.timeout} s",
                                  rank=self.rank, peers=(peer,), step=self.step)
        if waiter.error is not None:
            kind = CommTimeout if "imed out" in waiter.error or "imeout" in waiter.error \
                else PeerFailure
            raise kind(f"{what} failed: {waiter.error}", rank=self.rank, peers=(peer,),
                       step=self.step)

    def _post(self, op: object, tensor: Tensor, peer: int) -> dist.Work | None:
        """Post one isend/irecv; None if the peer's connection is already gone."""
        try:
            return op(tensor, self._global(peer), self.group)  # type: ignore[operator]
        except RuntimeError:
            return None

    def barrier(self) -> None:
        everyone = tuple(r for r in range(self._world_size) if r != self.rank)
        if self.backend == "gloo":
            try:
                dist.monitored_barrier(self.group, timeout=timedelta(seconds=self.timeout),
                                       wait_all_ranks=True)
            except RuntimeError as e:
                raise CommTimeout(f"barrier failed: {str(e).splitlines()[0]}",
                                  rank=self.rank, peers=everyone, step=self.step) from e
        else:
            self._wait(dist.barrier(self.group, async_op=True), "barrier", everyone,
                       collective=True)


def _check_float(x: Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"all_reduce_mean_ needs a floating-point tensor, got {x.dtype}")


class _Waiter:
    """``work.wait()`` on a daemon thread; ``done`` is set when it returns or raises."""

    def __init__(self, work: dist.Work, timeout: float) -> None:
        self.done = threading.Event()
        self.error: str | None = None
        self._work = work
        threading.Thread(target=self._run, args=(timeout,), daemon=True,
                         name="gossip-p2p-wait").start()

    def _run(self, timeout: float) -> None:
        try:
            if self._work.wait(timeout=timedelta(seconds=timeout)) is False:
                self.error = f"timed out after {timeout} s"
        except Exception as e:  # handed to the waiting thread
            self.error = str(e).splitlines()[0] if str(e) else repr(e)
        finally:
            self.done.set()


#: Set by launchers that host the store themselves (launch.spawn, launch.ray_launch): the store at
#: MASTER_ADDR:MASTER_PORT is joined as a client (no rank hosts it, so it outlives every rank) and
#: this run's keys live under this prefix (a standalone store may serve many runs).
STORE_PREFIX_ENV = "GOSSIP_STORE_PREFIX"


def _hosted_store(timeout: float) -> dist.Store:
    client = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                           is_master=False, timeout=timedelta(seconds=timeout))
    return dist.PrefixStore(os.environ[STORE_PREFIX_ENV], client)


def init_from_env(
    backend: str | None = None, *, timeout: float = 300.0, init_method: str | None = None,
    survive_peer_failures: bool = False, dead_after: float = 5.0,
) -> TorchCommunicator:
    """Join the process group that torchrun (or the Ray launcher) describes in the environment.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (and
    :data:`STORE_PREFIX_ENV`, set by launchers that host the store). The backend is NCCL when CUDA
    is available and Gloo otherwise; an explicit ``backend`` wins. Under NCCL the current CUDA
    device is set to LOCAL_RANK. ``survive_peer_failures`` attaches a :class:`PeerMonitor`
    (heartbeats through the rendezvous store; a rank silent for ``dead_after`` s is dead).
    """
    for var in ("RANK", "WORLD_SIZE"):
        if var not in os.environ:
            raise RuntimeError(f"{var} is not set: launch with torchrun or the Ray launcher")
    if backend is None:  # surviving dead peers needs Gloo (CUDA tensors are staged through CPU)
        backend = "nccl" if torch.cuda.is_available() and not survive_peer_failures else "gloo"
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if survive_peer_failures and backend != "gloo":
        # surviving posts each send/recv on its own; NCCL needs a pair's send and recv grouped
        raise ValueError(f"survive_peer_failures needs backend='gloo', got {backend!r}")
    store: dist.Store | None = None  # the monitor's: the hosted store when there is one
    if not dist.is_initialized():
        kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout)}
        if init_method is not None:
            kwargs["init_method"] = init_method
        elif STORE_PREFIX_ENV in os.environ:
            kwargs["store"] = store = _hosted_store(timeout)
            kwargs["rank"] = int(os.environ["RANK"])
            kwargs["world_size"] = int(os.environ["WORLD_SIZE"])
        if backend == "nccl":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(**kwargs)
    monitor = None
    if survive_peer_failures:
        monitor = PeerMonitor(store or PeerMonitor.default_store(), dist.get_rank(),
                              dist.get_world_size(), dead_after=min(dead_after, timeout))
    return TorchCommunicator(timeout=timeout, monitor=monitor)
