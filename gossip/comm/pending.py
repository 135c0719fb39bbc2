"""Communication started now and waited on later (overlapped outer steps).

:func:`start_all_reduce_mean_` and :func:`start_exchange` begin a communicator's
``all_reduce_mean_`` / ``exchange`` and return a :class:`Pending` whose :meth:`Pending.wait`
finishes it and gives its result. A communicator with async work handles
(:class:`~gossip.comm.torch_comm.TorchCommunicator`: ``start_all_reduce_mean_``,
``start_exchange``) returns after posting the work; any other (the simulator's
``StackedCommunicator``) completes the call at once and marks the events it logged
``overlapped``, so the network model charges them only where they outlast the compute that
follows. Until ``wait`` returns, the buffers handed in must not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from torch import Tensor

from gossip.comm.base import Communicator
from gossip.compress import Compressor

__all__ = ["Pending", "complete_now", "start_all_reduce_mean_", "start_exchange"]

T = TypeVar("T")


class Pending(Generic[T]):
    """A communication in flight; :meth:`wait` finishes it once and returns its result, or
    raises what finishing it raised (on every later wait too: the buffers are not a result)."""

    def __init__(self, finish: Callable[[], T]) -> None:
        self._finish: Callable[[], T] | None = finish
        self._result: T | None = None
        self._error: BaseException | None = None

    @classmethod
    def done(cls, result: T) -> Pending[T]:
        pending: Pending[T] = cls(lambda: result)
        pending.wait()
        return pending

    @property
    def completed(self) -> bool:
        return self._finish is None

    def wait(self) -> T:
        if self._finish is not None:
            finish, self._finish = self._finish, None
            try:
                self._result = finish()
            except BaseException as e:
                self._error = e
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]


def complete_now(comm: Communicator, call: Callable[[], T]) -> Pending[T]:
    """Run ``call`` now; the events a simulated communicator logs are marked overlapped."""
    events: list[Any] | None = getattr(comm, "events", None)
    first = len(events) if events is not None else 0
    result = call()
    if events is not None:
        for k in range(first, len(events)):
            events[k] = dataclasses.replace(events[k], overlapped=True)
    return Pending.done(result)


def start_all_reduce_mean_(comm: Communicator, x: Tensor, weight: Tensor | None = None, *,
                           compressor: Compressor | None = None) -> Pending[None]:
    """Start ``comm.all_reduce_mean_(x, weight, compressor=...)``; ``x`` holds the mean once
    ``wait()`` returns."""
    start = getattr(comm, "start_all_reduce_mean_", None)
    if start is not None:
        return start(x, weight, compressor=compressor)
    return complete_now(comm, lambda: comm.all_reduce_mean_(x, weight, compressor=compressor))


def start_exchange(comm: Communicator, x: Tensor, peers: Tensor,
                   received: Tensor) -> Pending[tuple[Tensor, Tensor]]:
    """Start ``comm.exchange(x, peers)`` into the caller's buffer ``received`` [L, K, P] (two
    exchanges may be in flight at once); ``wait()`` gives ``(received, arrived)``."""
    start = getattr(comm, "start_exchange", None)
    if start is not None:
        return start(x, peers, received=received)

    def call() -> tuple[Tensor, Tensor]:
        got, arrived = comm.exchange(x, peers)
        return received.copy_(got), arrived
    return complete_now(comm, call)
