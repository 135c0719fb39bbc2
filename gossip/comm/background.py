"""Work that runs behind the caller's compute: the compressed all-reduce, overlapped.

The quantized all-reduce (:func:`gossip.comm.compressed.torch_all_reduce_mean_`) is two
transfers with work between them: the reduce-scatter of encoded chunks, then decoding and
summing them and encoding the sum, then the all-gather. Overlapping it with the next inner steps
needs something to do that middle work while the caller computes. Two ways were open:

- a progress call the algorithm makes after every inner step, advancing a small state machine
  when the reduce-scatter's work reports completion. Over Gloo, point-to-point work (the fast
  path on shaped links, :func:`gossip.comm.compressed._spread`) never reports completion to
  ``is_completed()`` (see ``TorchCommunicator._wait_peer``), so it would need the slower
  collectives; the all-gather would start only at the next inner step boundary; and every
  caller's loop would have to call it.
- **a worker thread with a process group of its own** (chosen). :class:`Background` runs each job
  (the whole compressed all-reduce, the very code of the blocking call, so the same bits) on one
  daemon thread, on a :class:`~gossip.comm.torch_comm.TorchCommunicator` over a second group of
  the same ranks, created at the first job (``new_group(use_local_synchronization=True)``: only
  these ranks take part). Its collectives and point-to-point tags never interleave with the
  main thread's on the first group, whatever the main thread does meanwhile (another fragment's
  all-reduce, metrics). Jobs run one at a time in the order they were submitted, which is the
  same on every rank (the algorithms submit at the same steps). The codec's encode and decode
  are torch ops that release the GIL, so they run beside the caller's compute.

Until a job's :meth:`Pending.wait` returns, the caller must leave its tensors (and its
compressor: the seed counter and the residual) alone. ``wait()`` re-raises what the job raised (a
:class:`~gossip.comm.base.CommError` naming the rank, the peers and the step); every wait inside
a job is bounded by the communicator's timeout (and, with a monitor, ends when a peer is found
dead), so a dead or frozen peer fails the job instead of hanging it. Bytes the job sent are
added to the owner's :class:`~gossip.comm.base.Traffic` when ``wait()`` returns, as an overlapped
exchange's are.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import torch.distributed as dist

from gossip.comm.base import Traffic
from gossip.comm.pending import Pending

if TYPE_CHECKING:
    from gossip.comm.torch_comm import TorchCommunicator

__all__ = ["Background"]

T = TypeVar("T")


class _Job:
    def __init__(self, fn: Callable[[TorchCommunicator], Any], step: int) -> None:
        self.fn = fn
        self.step = step
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.traffic = Traffic()


class Background:
    """One worker thread running jobs ``fn(side)`` in order, ``side`` a communicator over a
    process group of its own with the same ranks as ``owner``'s (made at the first submit:
    a collective call, every rank submits its first job at the same point)."""

    def __init__(self, owner: TorchCommunicator) -> None:
        self._owner = owner
        self._side: TorchCommunicator | None = None
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _make_side(self) -> TorchCommunicator:
        from gossip.comm.torch_comm import TorchCommunicator

        owner = self._owner
        group = dist.new_group(dist.get_process_group_ranks(owner.group),
                               timeout=timedelta(seconds=owner.timeout), backend=owner.backend,
                               use_local_synchronization=True)
        return TorchCommunicator(group, timeout=owner.timeout, monitor=owner.monitor)

    def submit(self, fn: Callable[[TorchCommunicator], T]) -> Pending[T]:
        """Queue ``fn``; ``wait()`` on the result waits for it, re-raises what it raised and
        counts its bytes in the owner's traffic."""
        if self._side is None:
            self._side = self._make_side()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="gossip-background")
            self._thread.start()
        job = _Job(fn, self._owner.step)
        self._jobs.put(job)

        def finish() -> T:
            job.done.wait()  # every wait inside the job is bounded (module doc)
            owner, side = self._owner, self._side
            assert side is not None
            for peer, step in side.deaths.items():
                owner.deaths.setdefault(peer, step)
            for peer, why in side.failures.items():
                owner.failures.setdefault(peer, why)
            for op, nbytes in job.traffic.by_op.items():
                owner.traffic.add(op, nbytes, messages=0)
            owner.traffic.messages += job.traffic.messages
            if job.error is not None:
                raise job.error
            return job.result
        return Pending(finish)

    def _run(self) -> None:
        side = self._side
        assert side is not None
        while True:
            job = self._jobs.get()
            side.step = job.step  # for error messages
            side._traffic = job.traffic
            try:
                job.result = job.fn(side)
            except BaseException as e:  # handed to the waiting thread
                job.error = e
            finally:
                job.done.set()
