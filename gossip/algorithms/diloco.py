"""DiLoCo (Douillard et al. 2023, arXiv 2311.08105).

Every ``sync_every`` inner steps: pseudo-gradient ``g = mean over nodes of (phi - theta)`` (old
minus new), weights restored to ``phi``, ``g`` fed as ``.grad`` to a persistent stock
``torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)`` over ``phi``; the result becomes both the
new ``phi`` and the model. The first outer step therefore moves ``phi`` by ``-0.7 * 1.9 g =
-1.33 g``. ``phi`` and the outer momentum are fp32 whatever the model dtype.
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
    check_fraction,
    check_positive,
    timed_sync,
)
from gossip.comm.base import Communicator
from gossip.flat import FlatParams

__all__ = ["DiLoCo", "DiLoCoConfig"]


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig:
    """Args:
    sync_every: inner steps between outer steps (H).
    outer_lr: outer SGD learning rate.
    outer_momentum: outer SGD momentum.
    nesterov: Nesterov momentum in the outer SGD (the DiLoCo paper's choice).
    """

    sync_every: int = 500
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    nesterov: bool = True

    def __post_init__(self) -> None:
        check_positive("sync_every", self.sync_every, integer=True)
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
        self.params = params
        self.comm = comm
        self.phi = [torch.nn.Parameter(b.detach().to(torch.float32).clone())
                    for b in params.buffers()]
        # the pseudo-gradients live in persistent buffers: a fresh model-sized tensor per sync
        # costs a page fault per 4 KiB (about as much as the all-reduce itself on CPU)
        self._grads = [torch.empty_like(p) for p in self.phi]
        # foreach: the default single-tensor SGD on CPU allocates a model-sized tensor for the
        # Nesterov term (grad.add(buf)); foreach adds into the gradient in place, same bits.
        # (fused=True would save three passes but rounds a few tail elements differently
        # depending on the buffer length, so a real rank [1, P] and the simulator [N, P] differ.)
        self.outer = torch.optim.SGD(self.phi, lr=config.outer_lr, foreach=True,
                                     momentum=config.outer_momentum, nesterov=config.nesterov)

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based). ``active`` [L]: rows that contribute."""
        if step % self.config.sync_every:
            return None
        weight = None if active is None else active.to(torch.float64)
        with timed_sync(self.comm, SyncStats(step)) as stats:
            for phi, theta, g in zip(self.phi, self.params.buffers(), self._grads, strict=True):
                torch.sub(phi.detach(), theta, out=g)
                self.comm.all_reduce_mean_(g, weight)
                phi.grad = g
            self.outer.step()
            self.outer.zero_grad(set_to_none=True)
            for phi, theta in zip(self.phi, self.params.buffers(), strict=True):
                theta.copy_(phi.detach())
        return stats

    def sampled(self, round_index: int) -> Tensor | None:
        """Every node takes part in every round."""
        return None

    def state_rows(self) -> list[Tensor]:
        """Per-node state tensors [L, ...]: phi and the outer momentum (equal on every node)."""
        momentum = [self.outer.state[p].get("momentum_buffer") for p in self.phi]
        return [*self.phi, *(m for m in momentum if m is not None)]

    def state_dict(self) -> dict[str, Any]:
        # the optimizer's state_dict holds references to its live momentum buffers: copy them, so
        # a saved state does not change as training goes on
        return {"phi": [p.detach().clone() for p in self.phi],
                "outer": copy.deepcopy(self.outer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.phi, state["phi"], strict=True):
                p.copy_(saved)
        # load a copy: Optimizer.load_state_dict keeps the given tensors as its live buffers
        self.outer.load_state_dict(copy.deepcopy(state["outer"]))
