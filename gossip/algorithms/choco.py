"""CHOCO-SGD / CHOCO-Gossip (Koloskova, Stich, Jaggi 2019, arXiv 1902.00340, Algorithm 1).

Every node i keeps public copies ``x_hat_j`` of itself and its neighbours, known to all of them.
Every ``sync_every`` inner steps (after the local step ``x_i <- x_i - eta grad``):

    q_i     = Q(x_i - x_hat_i)                       sent to the neighbours, compressed
    x_hat_j = x_hat_j + q_j                          for j = i and every neighbour j
    x_i     = x_i + gamma sum_j W_ij (x_hat_j - x_hat_i)

Every neighbour of j applies the same ``q_j`` to the same start (zeros), so all copies of
``x_hat_j`` are equal, and since W is row-stochastic ``sum_j W_ij (x_hat_j - x_hat_i) = s_i -
x_hat_i`` with ``s_i = sum_j W_ij x_hat_j``. A node therefore keeps two model-sized tensors, its
own ``x_hat_i`` and ``s_i`` (updated by ``s_i += sum_j W_ij q_j``), instead of one copy per
neighbour: the paper's memory-efficient form, the same numbers. With ``compress="none"`` and
``gamma = 1`` a step is D-PSGD's ``x_i = sum_j W_ij x_j``.

The mixing matrix must be fixed (a static, doubly stochastic topology), and messages must arrive:
a lost ``q_j`` leaves node i's ``s_i`` without it for good (the paper assumes reliable links).
Error feedback is refused: the public copies already carry what compression has not sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from gossip.algorithms._common import (
    SyncStats,
    check_compress,
    check_fraction,
    check_positive,
    check_seed,
    check_state,
    check_step,
    compressor_rows,
    compressors_state,
    frozen_rows,
    load_compressors_state,
    load_tensors,
    make_compressors,
    timed_sync,
)
from gossip.comm.base import Communicator, Received
from gossip.comm.compressed import exchange_compressed
from gossip.flat import FlatParams
from gossip.ops import mix
from gossip.topology import Topology

__all__ = ["Choco", "ChocoConfig"]


@dataclass(frozen=True, kw_only=True)
class ChocoConfig:
    """Args:
    sync_every: inner steps between gossip steps.
    gamma: consensus step size in (0, 1] (the paper tunes it per compressor: near 1 for mild
        quantization, about 0.01-0.1 for top-1%).
    compress: the compression operator Q (:func:`gossip.compress.parse_codec`).
    error_feedback: must stay False (see the module doc).
    seed: seeds randk and stochastic rounding.
    """

    sync_every: int = 1
    gamma: float = 0.5
    compress: str = "none"
    error_feedback: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("sync_every", self.sync_every, integer=True)
        # (0, 1] as in the paper: with exact messages x <- (I + gamma (W - I)) x, which leaves
        # consensus for gamma > 1 on graphs with a negative eigenvalue of W (a ring of 6 with
        # Metropolis weights: distance 3.0 after 100 steps at gamma 1.5, inf at 2)
        check_fraction("gamma", self.gamma, low_open=True)
        check_compress(self.compress, self.error_feedback)
        if self.error_feedback:
            raise ValueError("error_feedback=True does not apply to choco: its public copies "
                             "x_hat already carry what compression has not sent")
        check_seed("seed", self.seed)


class Choco:
    """Compressed gossip with public copies (CHOCO-SGD's consensus step)."""

    name: ClassVar[str] = "choco"
    same_init: ClassVar[bool] = False
    #: every node keeps its own model: a node that is down keeps its state
    global_model: ClassVar[bool] = False
    needs_topology: ClassVar[bool] = True

    def __init__(self, config: ChocoConfig, params: FlatParams, comm: Communicator,
                 topology: Topology) -> None:
        if topology.n != comm.world_size:
            raise ValueError(f"topology has n={topology.n} nodes, the run has {comm.world_size}")
        if topology.time_varying:
            raise ValueError(f"topology={topology.spec!r} is time-varying; choco needs a fixed "
                             "mixing matrix (its s_i = sum_j W_ij x_hat_j assumes one)")
        try:
            topology.check_doubly_stochastic(0)
        except ValueError as e:
            raise ValueError(f"choco needs doubly stochastic weights; {e} (use "
                             "topology_weights='metropolis')") from None
        self.config = config
        self.params = params
        self.comm = comm
        self.topology = topology
        buffers = [g.buffer for g in params.groups]
        self.x_hat = [torch.zeros(b.shape, dtype=torch.float32, device=b.device)
                      for b in buffers]
        self.mixed = [torch.zeros_like(h) for h in self.x_hat]  # s_i = sum_j W_ij x_hat_j
        self._comp = make_compressors(config.compress, False, buffers, seed=config.seed)
        self.merges = 0

    def _send(self, i: int, q: Tensor, peers: Tensor) -> tuple[Tensor, Received]:
        """Send q [L, P] to the neighbours: (what was sent, decoded; what arrived)."""
        if self._comp is None:
            return q, self.comm.exchange_slots(q, peers)
        return exchange_compressed(self.comm, q, peers, self._comp[i][0])

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based); ``active`` [L] False = this row's model
        skips the consensus step (its public copy still moves, as its neighbours saw)."""
        check_step(step)
        cfg = self.config
        if step % cfg.sync_every:
            return None
        peers, weights, self_weight = self.topology.peer_table(0)
        nodes = self.comm.nodes
        with timed_sync(self.comm, SyncStats(step)) as stats:
            for i, group in enumerate(self.params.groups):
                x, x_hat, s = group.buffer, self.x_hat[i], self.mixed[i]
                q = x.to(torch.float32) - x_hat
                sent, got = self._send(i, q, peers)
                x_hat.add_(sent)
                dev = x.device
                s.add_(mix(sent, got.slot, self_weight[nodes].to(dev), weights[nodes].to(dev),
                           got.arrived))
                with frozen_rows([x], active):
                    x.add_((s - x_hat).mul_(cfg.gamma).to(x.dtype))
        self.merges += 1
        return stats

    def sampled(self, round_index: int) -> Tensor | None:
        """Every node takes part in every round."""
        return None

    def flush(self) -> None:
        """Nothing is ever in flight: every sync completes within :meth:`step`."""

    def state_rows(self) -> list[Tensor]:
        """Per-node state tensors [L, ...]: the public copy x_hat and s = sum_j W_ij x_hat_j
        of every buffer (and the error-feedback residuals, if any: none, it is refused). A node
        that is down keeps both: its neighbours got no q from it and it got none from them."""
        return [*self.x_hat, *self.mixed, *compressor_rows(self._comp)]

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": self.name, "merges": self.merges,
                "x_hat": [h.clone() for h in self.x_hat],
                "mixed": [s.clone() for s in self.mixed], **compressors_state(self._comp)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state, ["merges", "x_hat", "mixed"], self._comp)
        load_tensors(self.name, "x_hat", self.x_hat, state["x_hat"])
        load_tensors(self.name, "mixed", self.mixed, state["mixed"])
        self.merges = int(state["merges"])
        load_compressors_state(self._comp, state)
