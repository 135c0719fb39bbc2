"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105).

Every ``sync_every`` inner steps: pseudo-gradient ``g = mean over nodes of (phi - theta)`` (old
minus new), weights restored to ``phi``, ``g`` fed as ``.grad`` to a persistent stock
``torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`` over ``phi``; the result becomes both the
new ``phi`` and the model. The first outer step therefore moves ``phi`` by ``-0.7 * 1.9 g =
-1.33 g``. ``phi`` and the outer momentum are fp32 whatever the model dtype.

**Fragments** (``fragments = F``, Streaming DiLoCo): the flat parameters are cut into F
contiguous fragments, fragment f synchronised at inner steps ``s = f H // F (mod H)``
(:mod:`gossip.algorithms._streaming`); a sync applies the update above to that fragment only (its
slice of ``phi``, its own outer momentum), so each sync moves 1 / F of the model.

**Overlap** (``overlap=True``, one-step delay): the all-reduce a fragment starts at its sync t
is waited on at its sync t + 1, H inner steps later. With ``s_t`` the fragment's weights when
segment t began (the model the node trained from) and ``phi`` the slow weights, sync t does

    Delta_t = s_t - theta_t                      (local, never waits)
    start   g_t = mean over nodes of Delta_t     (async)
    wait    g_{t-1};  phi = OuterSGD(phi, g_{t-1})     (t >= 2; nothing at t = 1)
    theta   = s_{t+1} = phi

so g_t, measured from ``s_t = phi`` before g_{t-1} was applied, is applied one outer step late,
and the inner model restarts from the slow weights that hold every update received so far (not
from its own local progress, which reaches ``phi`` one step later). Every node holds the same
``phi``. The in-flight ``g`` is state: :meth:`DiLoCo.state_dict` waits for it and saves it, so a
resume is bit-exact. The last sync's ``g`` stays pending (:meth:`DiLoCo.flush` applies it).
A compressed all-reduce is in flight too: on a real rank it runs whole (reduce-scatter, decode,
sum, re-encode, all-gather) on the communicator's worker thread with a process group of its own
(:mod:`gossip.comm.background`), the same bits as the blocking call; its compressor (seed,
residual) is the thread's until the wait, so :meth:`DiLoCo.state_dict` waits first.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from gossip.algorithms._common import (
    SyncStats,
    check_bool,
    check_compress,
    check_fraction,
    check_positive,
    check_state,
    check_step,
    compressor_rows,
    compressors_state,
    load_compressors_state,
    load_tensors,
    make_compressors,
    timed_sync,
)
from gossip.algorithms._streaming import check_streaming, due_fragment, fragment_pieces
from gossip.comm.base import Communicator
from gossip.comm.pending import Pending, start_all_reduce_mean_
from gossip.flat import FlatParams

__all__ = ["DiLoCo", "DiLoCoConfig"]


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig:
    """Args:
    sync_every: inner steps between outer steps (H).
    outer_lr: outer SGD learning rate.
    outer_momentum: outer SGD momentum.
    nesterov: Nesterov momentum in the outer SGD (the DiLoCo paper's choice).
    compress: what the pseudo-gradient all-reduce sends (:func:`gossip.compress.parse_codec`).
    error_feedback: carry what compression did not send into the next outer step.
    overlap: start the all-reduce and apply its update one outer step late (module doc).
    fragments: F, the model synchronised in F staggered fragments (module doc).
    """

    sync_every: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True
    compress: str = "none"
    error_feedback: bool = False
    overlap: bool = False
    fragments: int = 1

    def __post_init__(self) -> None:
        check_compress(self.compress, self.error_feedback)
        check_positive("sync_every", self.sync_every, integer=True)
        check_streaming(self.overlap, self.fragments, self.sync_every)
        check_positive("outer_lr", self.outer_lr)
        check_fraction("outer_momentum", self.outer_momentum)
        check_bool("nesterov", self.nesterov)
        if self.nesterov and self.outer_momentum == 0:
            raise ValueError("nesterov=True needs outer_momentum > 0, got outer_momentum=0")


class DiLoCo:
    """Inner optimizer steps locally; an outer Nesterov SGD steps on averaged pseudo-gradients."""

    name: ClassVar[str] = "diloco"
    same_init: ClassVar[bool] = True
    #: one global model: a node that is down pulls it when it returns
    global_model: ClassVar[bool] = True
    needs_topology: ClassVar[bool] = False

    def __init__(self, config: DiLoCoConfig, params: FlatParams, comm: Communicator) -> None:
        self.config = config
        #: after each sync every node holds the whole global model; not with streaming
        #: fragments: the fragments not synced hold each node's own progress
        self.one_model = config.fragments == 1
        self.params = params
        self.comm = comm
        buffers = list(params.buffers())
        # one slow-weight tensor per piece of a fragment (F = 1: one per buffer)
        self._fragments = fragment_pieces(buffers, config.fragments)
        self.phi = [torch.nn.Parameter(buffers[p.buffer][:, p.cols].detach()
                                       .to(torch.float32).clone())
                    for pieces in self._fragments for p in pieces]
        first = [0]
        for pieces in self._fragments:
            first.append(first[-1] + len(pieces))
        #: fragment f's slow weights are phi[first[f]:first[f + 1]]
        self._first = first
        # the pseudo-gradients live in persistent buffers: a fresh model-sized tensor per sync
        # costs a page fault per 4 KiB (about as much as the all-reduce itself on CPU)
        self._grads = [torch.empty_like(p) for p in self.phi]
        # overlap: Delta_t goes into the spare while g_{t-1} (in _grads) is still in flight
        self._spare = [torch.empty_like(p) for p in self.phi] if config.overlap else []
        self._pending: list[list[Pending[None]] | None] = [None] * config.fragments
        # foreach: the default single-tensor SGD on CPU allocates a model-sized tensor for the
        # Nesterov term (grad.add(buf)); foreach adds into the gradient in place, same bits.
        # (fused=True would save three passes but rounds a few tail elements differently
        # depending on the buffer length, so a real rank [1, P] and the simulator [N, P] differ.)
        # A fragment's sync gives only its own slices a .grad: SGD skips the others.
        self.outer = torch.optim.SGD(self.phi, lr=config.outer_lr, foreach=True,
                                     momentum=config.outer_momentum, nesterov=config.nesterov)
        self._comp = make_compressors(config.compress, config.error_feedback, self._grads)

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based). ``active`` [L]: rows that contribute."""
        check_step(step)
        f = due_fragment(step, self.config.sync_every, self.config.fragments)
        if f is None:
            return None
        weight = None if active is None else active.to(torch.float64)
        with timed_sync(self.comm, SyncStats(step)) as stats:
            if self.config.overlap:
                self._overlapped(f, weight)
                return stats
            for i, theta, cols in self._slots(f):
                phi, g = self.phi[i], self._grads[i]
                torch.sub(phi.detach(), theta[:, cols], out=g)
                if self._comp is None:
                    self.comm.all_reduce_mean_(g, weight)
                else:
                    self.comm.all_reduce_mean_(g, weight, compressor=self._comp[i][0])
                phi.grad = g
            self._outer_step(f)
        return stats

    def _slots(self, f: int) -> list[tuple[int, Tensor, slice]]:
        """Fragment ``f``'s pieces: (index into phi, the model buffer, its columns)."""
        buffers = list(self.params.buffers())
        return [(self._first[f] + k, buffers[p.buffer], p.cols)
                for k, p in enumerate(self._fragments[f])]

    def _outer_step(self, f: int) -> None:
        """Step fragment ``f``'s slow weights on their ``.grad`` and restart theta from them."""
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        for i, theta, cols in self._slots(f):
            theta[:, cols].copy_(self.phi[i].detach())

    def _overlapped(self, f: int, weight: Tensor | None) -> None:
        """Sync t of fragment f with overlap (module doc): start g_t, apply g_{t-1}."""
        previous = self._pending[f]
        if previous is not None:
            for work in previous:
                work.wait()
        started = []
        for i, theta, cols in self._slots(f):
            delta = self._spare[i]
            torch.sub(self.phi[i].detach(), theta[:, cols], out=delta)
            comp = None if self._comp is None else self._comp[i][0]
            started.append(start_all_reduce_mean_(self.comm, delta, weight, compressor=comp))
        if previous is not None:
            for i, _, _ in self._slots(f):
                self.phi[i].grad = self._grads[i]
        self._outer_step(f)  # with no .grad (t = 1) only theta = phi
        for i, _, _ in self._slots(f):  # the buffer in flight is _grads from now on
            self._grads[i], self._spare[i] = self._spare[i], self._grads[i]
        self._pending[f] = started

    def flush(self) -> None:
        """Wait for every in-flight all-reduce and apply it (theta = phi for those fragments):
        at the end of an overlapped run, the last outer step. A no-op without overlap."""
        for f, pending in enumerate(self._pending):
            if pending is None:
                continue
            for work in pending:
                work.wait()
            for i, _, _ in self._slots(f):
                self.phi[i].grad = self._grads[i]
            self._outer_step(f)
            self._pending[f] = None

    def sampled(self, round_index: int) -> Tensor | None:
        """Every node takes part in every round."""
        return None

    def state_rows(self) -> list[Tensor]:
        """Per-node state tensors [L, ...]: phi and the outer momentum (equal on every node),
        the error-feedback residuals, if any, and with overlap the outer gradients in flight."""
        in_flight = self._in_flight()  # first: a compressed all-reduce in flight owns the
        # compressor (its residual) until waited for
        momentum = [self.outer.state[p].get("momentum_buffer") for p in self.phi]
        return [*self.phi, *(m for m in momentum if m is not None),
                *compressor_rows(self._comp), *in_flight]

    def _in_flight(self) -> list[Tensor]:
        """The in-flight outer gradients, waited for (fragment by fragment, piece by piece)."""
        out = []
        for f, pending in enumerate(self._pending):
            if pending is not None:
                for work in pending:
                    work.wait()
                out += [self._grads[i] for i, _, _ in self._slots(f)]
        return out

    def state_dict(self) -> dict[str, Any]:
        # waited for first (collective: every rank saves at the same step): a compressed
        # all-reduce in flight owns the compressor (its residual) until then
        in_flight = [p is not None for p in self._pending]
        grads = [g.clone() for g in self._in_flight()]
        # the optimizer's state_dict holds references to its live momentum buffers: copy them, so
        # a saved state does not change as training goes on
        state = {"algorithm": self.name, "phi": [p.detach().clone() for p in self.phi],
                 "outer": copy.deepcopy(self.outer.state_dict()),
                 **compressors_state(self._comp)}
        if self.config.overlap:
            state["in_flight"] = in_flight
            state["grads"] = grads
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state,
                    ["phi", "outer", *(["in_flight", "grads"] if self.config.overlap else [])],
                    self._comp, overlap=self.config.overlap)
        load_tensors(self.name, "phi", self.phi, state["phi"])
        # load a copy: Optimizer.load_state_dict keeps the given tensors as its live buffers
        self.outer.load_state_dict(copy.deepcopy(state["outer"]))
        load_compressors_state(self._comp, state)
        if self.config.overlap:
            saved = iter(state["grads"])
            for f, flying in enumerate(state["in_flight"]):
                self._pending[f] = None
                if flying:
                    for i, _, _ in self._slots(f):
                        self._grads[i].copy_(next(saved))
                    self._pending[f] = [Pending.done(None)]
