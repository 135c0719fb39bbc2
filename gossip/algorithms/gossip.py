"""Gossip averaging over a topology: D-PSGD mixing and variance-corrected merging.

- ``merge="mixing"`` (D-PSGD, Lian et al. 2017, arXiv 1705.09056): ``x_i = sum_j W_ij x_j`` with
  the topology's mixing matrix (Metropolis-Hastings or uniform weights; static or time-varying).
- ``merge="beta"`` (Tian et al. 2024, arXiv 2404.04616): ``A = beta x_i + (1 - beta)
  mean(received)``; with ``variance_correction`` each in-scope tensor of ``A`` is then rescaled to
  the mean variance of the received models, keeping its mean
  (:func:`gossip.ops.variance_correct_`).

Every ``sync_every`` inner steps each node sends one flat buffer to each out-neighbour and merges
what arrived (a missing neighbour's weight goes to self).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from gossip.algorithms._common import (
    SyncStats,
    check_bool,
    check_compress,
    check_fraction,
    check_nonnegative,
    check_positive,
    check_state,
    check_step,
    compressor_rows,
    compressors_state,
    frozen_rows,
    load_compressors_state,
    make_compressors,
    timed_sync,
)
from gossip.comm.base import Communicator
from gossip.comm.compressed import exchange_compressed
from gossip.flat import FlatParams
from gossip.ops import mix, segment_variances, variance_correct_, vc_segments
from gossip.scratch import Scratch
from gossip.topology import Topology

__all__ = ["Gossip", "GossipConfig"]


@dataclass(frozen=True, kw_only=True)
class GossipConfig:
    """Args:
    sync_every: inner steps between merges.
    merge: "mixing" (D-PSGD, W from the topology) or "beta" (Tian et al.'s self-weighted mean).
    self_weight: beta, the self weight of the "beta" merge (0.5 in Tian et al.'s code).
    variance_correction: rescale merged tensors to the received models' mean variance.
    vc_eps: guard in the variance ratio.
    vc_ratio: partial correction r (s = 1 + r (s - 1)); 1 = full correction.
    compress: what a node sends its neighbours (:func:`gossip.compress.parse_codec`); a node
        merges its own exact weights with the neighbours' decoded ones.
    error_feedback: carry what compression did not send into the next merge.
    """

    sync_every: int = 1
    merge: Literal["mixing", "beta"] = "mixing"
    self_weight: float = 0.5
    variance_correction: bool = False
    vc_eps: float = 1e-8
    vc_ratio: float = 1.0
    compress: str = "none"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        check_compress(self.compress, self.error_feedback)
        check_positive("sync_every", self.sync_every, integer=True)
        if self.merge not in ("mixing", "beta"):
            raise ValueError(f"merge must be 'mixing' or 'beta', got {self.merge!r}")
        check_fraction("self_weight", self.self_weight)
        check_bool("variance_correction", self.variance_correction)
        check_nonnegative("vc_eps", self.vc_eps)
        check_fraction("vc_ratio", self.vc_ratio)
        if self.variance_correction and self.merge != "beta":
            raise ValueError("variance_correction=True needs merge='beta', got merge='mixing'")


class Gossip:
    """Neighbour averaging (D-PSGD) or variance-corrected gossip over a topology."""

    name: ClassVar[str] = "gossip"
    same_init: ClassVar[bool] = False
    #: every node keeps its own model: a node that is down keeps its state
    global_model: ClassVar[bool] = False
    needs_topology: ClassVar[bool] = True

    def __init__(self, config: GossipConfig, params: FlatParams, comm: Communicator,
                 topology: Topology) -> None:
        if topology.n != comm.world_size:
            raise ValueError(f"topology has n={topology.n} nodes, the run has {comm.world_size}")
        if config.merge == "mixing":
            # D-PSGD keeps the nodes' average only if W is doubly stochastic (Lian et al. 2017)
            try:
                topology.check_doubly_stochastic(0)
            except ValueError as e:
                raise ValueError(f"D-PSGD mixing needs doubly stochastic weights; {e} (use "
                                 "topology_weights='metropolis')") from None
        self.config = config
        self.params = params
        self.comm = comm
        self.topology = topology
        self.merges = 0
        self._scratch = Scratch()  # merge results when a slot reads x itself
        self._comp = make_compressors(config.compress, config.error_feedback,
                                      [g.buffer for g in params.groups])

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based); ``active`` [L] False = skip this merge."""
        check_step(step)
        cfg = self.config
        if step % cfg.sync_every:
            return None
        peers, weights, self_weight = self.topology.peer_table(step // cfg.sync_every - 1)
        alive = self.comm.alive_nodes(step)
        if not bool(alive.all()):
            # dead nodes neither send nor receive: their links drop out of every neighbourhood
            # (a dropped link's weight goes to self in the merge, see gossip.ops.mix)
            cut = ~alive[peers.clamp(min=0)] | ~alive.unsqueeze(1)
            peers = peers.masked_fill(cut, -1)
        nodes = self.comm.nodes
        with timed_sync(self.comm, SyncStats(step)) as stats:
            for gi, group in enumerate(self.params.groups):
                x = group.buffer
                received = (self.comm.exchange_slots(x, peers) if self._comp is None else
                            exchange_compressed(self.comm, x, peers, self._comp[gi][0],
                                                active)[1])
                arrived = received.arrived
                if cfg.merge == "mixing":
                    w_self, w_peers = self_weight[nodes], weights[nodes]
                else:
                    # beta x + (1 - beta) mean(arrived); with nothing arrived: x unchanged
                    k = arrived.sum(dim=-1, keepdim=True)  # [L, 1]
                    w_peers = arrived * ((1 - cfg.self_weight) / k.clamp(min=1))
                    w_self = torch.where(k[:, 0] > 0, cfg.self_weight, 1.0)
                received_var = None
                if cfg.variance_correction:  # implies merge == "beta" (checked by the config)
                    received_var = received.sender_stats(
                        partial(segment_variances, segments=vc_segments(group.segments)))
                # merge in place unless the slots are read from x itself (one stacked shard)
                in_place = not received.reads(x)
                with frozen_rows([x], active):
                    merged = mix(x, received.slot, w_self.to(x.device), w_peers.to(x.device),
                                 arrived, out=x if in_place else self._scratch.like(x))
                    if received_var is not None:
                        variance_correct_(merged, received_var, arrived, group.segments,
                                          eps=cfg.vc_eps, ratio=cfg.vc_ratio)
                    if not in_place:
                        x.copy_(merged)
        self.merges += 1
        return stats

    def sampled(self, round_index: int) -> Tensor | None:
        """Every node takes part in every round."""
        return None

    def flush(self) -> None:
        """Nothing is ever in flight: every sync completes within :meth:`step`."""

    def state_rows(self) -> list[Tensor]:
        """Per-node state tensors [L, ...]: the error-feedback residuals, if any (else the model
        rows are all gossip keeps)."""
        return compressor_rows(self._comp)

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": self.name, "merges": self.merges, **compressors_state(self._comp)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state, ["merges"], self._comp)
        self.merges = int(state["merges"])
        load_compressors_state(self._comp, state)
