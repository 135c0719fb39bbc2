"""CUDA graphs of the simulator's repeated work: the local step and a global model's evaluation.

On a GPU, a local step of N stacked nodes is a few dozen small kernels (the batch draw's
integer hash, the fused forward, backward and update, :mod:`simulations.training`), and so is
evaluating one model on the test set. At N = 10,000 each kernel runs for microseconds, and
issuing them from Python costs more than running them: the GPU waits for the host.
:class:`Graphs` records such work once (``torch.cuda.CUDAGraph``) and replays it with one call.

Work is replayed only where its kernels are the same every time. A local step
(:meth:`Graphs.step`): every node trains (no mask), the learning rate is one constant, the fused
SGD path applies, and the schedule redraws either every node's permutation or none (a new epoch
for all, or a step inside it). An evaluation (:meth:`Graphs.evaluate`): one row, read in place.
Everything else runs as before. A graph reads its inputs from fixed addresses, so its key holds
the addresses of everything it touches (the parameters, the momentum buffers, the batch table,
the test set); if any moves (a resume that replaced a tensor), a new graph is recorded. The first
time a key is seen the work runs eagerly on the recording stream (its warm-up: cuBLAS handles,
the allocator's blocks); the second time it is recorded and replayed. Results are bit-identical
to the eager work (a GPU test checks it). ``enabled = False`` (``--no-cuda-graphs``) runs
everything eagerly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from gossip.batching import StackedBatches
from simulations.training import LocalTrainer, StackedModel

__all__ = ["Graphs"]

#: Graphs kept at once (each holds its own memory pool); the oldest is dropped beyond it.
MAX_GRAPHS = 6

Out = TypeVar("Out")


class Graphs:
    """Replays the recorded kernels of a local step or an evaluation where it can (module doc).

    :meth:`step` returns the per-row losses of a replayed step, or None when the step cannot
    be replayed (the caller then runs :meth:`StackedBatches.batch` and
    :meth:`LocalTrainer.step` itself, and nothing here has advanced).
    """

    def __init__(self, batches: StackedBatches, trainer: LocalTrainer,
                 device: torch.device) -> None:
        self.batches = batches
        self.trainer = trainer
        self.device = device
        self.enabled = device.type == "cuda"
        self._ej = torch.zeros(2, len(batches.nodes), dtype=torch.long, device=device)
        self._seen: set[tuple[Any, ...]] = set()
        self._graphs: dict[tuple[Any, ...], tuple[torch.cuda.CUDAGraph, Any]] = {}
        self._stream = torch.cuda.Stream(device) if self.enabled else None
        self.replays = 0

    def step(self, steps: Tensor) -> Tensor | None:
        """Draw every row's batch at its local step ``steps`` [L] (host int64) and train it."""
        trainer = self.trainer
        if not (self.enabled and trainer.fused and trainer.fused_applies()):
            return None
        n = len(self.batches.nodes)
        before = self.batches._epoch.copy()
        ej, redraw = self.batches.advance(steps)
        if 0 < len(redraw) < n:  # some rows start an epoch: not a fixed set of kernels
            self.batches._epoch = before
            return None
        self._ej.copy_(ej.pin_memory(), non_blocking=True)  # waits for no kernel
        group = trainer._opt.param_groups[0]
        state = trainer._opt.state
        tensors = [*trainer.params, self.batches._table, self.batches._shards]
        tensors += [state[p]["momentum_buffer"] for p in trainer.params
                    if state.get(p, {}).get("momentum_buffer") is not None]
        key = ("step", bool(len(redraw)), float(group["lr"]), float(group["momentum"]),
               float(group["weight_decay"]), *(t.data_ptr() for t in tensors))
        return self._run(key, lambda: trainer.step(self.batches.draw(self._ej, redraw), None))

    def evaluate(self, model: StackedModel, x: Tensor, y: Tensor, row: int
                 ) -> tuple[Tensor, Tensor | None]:
        """:meth:`StackedModel.evaluate` of the one row ``row`` on ``(x, y)``, replayed."""
        def work() -> tuple[Tensor, Tensor | None]:
            return model.evaluate(x, y, slice(row, row + 1))

        if not self.enabled or model.plan is None or model.task.loss_fn is not None:
            return work()  # (a task's own loss: any code, not recorded)
        key = ("eval", row, x.data_ptr(), y.data_ptr(), *(t.data_ptr() for t in model.parameters))
        return self._run(key, work)

    def _run(self, key: tuple[Any, ...], work: Callable[[], Out]) -> Out:
        graph = self._graphs.get(key)
        if graph is not None:
            graph[0].replay()
            self.replays += 1
            return graph[1]
        assert self._stream is not None
        main = torch.cuda.current_stream(self.device)
        if key not in self._seen:  # the warm-up: this time, eagerly on the recording stream
            self._seen.add(key)
            self._stream.wait_stream(main)
            with torch.cuda.stream(self._stream):
                out = work()
            main.wait_stream(self._stream)
            for t in _tensors(out):
                t.record_stream(main)  # read there: not reused before it is
            return out
        # recording runs nothing: record, then replay for this call
        if len(self._graphs) >= MAX_GRAPHS:
            self._graphs.pop(next(iter(self._graphs)))
        g = torch.cuda.CUDAGraph()
        self._stream.wait_stream(main)
        with torch.cuda.graph(g, stream=self._stream):
            out = work()
        self._graphs[key] = (g, out)
        g.replay()
        self.replays += 1
        return out


def _tensors(out: object) -> list[Tensor]:
    items = out if isinstance(out, tuple) else (out,)
    return [t for t in items if isinstance(t, Tensor)]
