"""FedAvg / periodic model averaging (McMahan et al. 2017, arXiv 1602.05629).

Every ``sync_every`` inner steps, the participating nodes' models are averaged, weighted by their
sample counts, and every node continues from the average. Client sampling (a fraction of nodes
per round, drawn from a seed shared by all ranks) and dropped clients (weight 0) are explicit
inputs. Over torch.distributed this is one all-reduce per flat buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
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
    load_compressors_state,
    make_compressors,
    timed_sync,
)
from gossip.comm.base import Communicator
from gossip.flat import FlatParams

__all__ = ["FedAvg", "FedAvgConfig"]


@dataclass(frozen=True, kw_only=True)
class FedAvgConfig:
    """Args:
    sync_every: inner steps between averages (H).
    client_fraction: fraction C of nodes sampled each round (at least one).
    seed: seeds the client sampling (shared by all ranks).
    compress: what the model all-reduce sends (:func:`gossip.compress.parse_codec`).
    error_feedback: carry what compression did not send into the next round.
    """

    sync_every: int = 10
    client_fraction: float = 1.0
    seed: int = 0
    compress: str = "none"
    error_feedback: bool = False

    def __post_init__(self) -> None:
        check_compress(self.compress, self.error_feedback)
        check_positive("sync_every", self.sync_every, integer=True)
        check_fraction("client_fraction", self.client_fraction, low_open=True)
        check_seed("seed", self.seed)


class FedAvg:
    """Sample-weighted periodic averaging.

    Args:
        config: the schedule and sampling.
        params: the local model rows.
        comm: the transport.
        weight: sample count of each local row [L] (default: equal weights).
    """

    name: ClassVar[str] = "fedavg"
    same_init: ClassVar[bool] = True
    #: one global model: a node that is down pulls it when it returns
    global_model: ClassVar[bool] = True
    #: after each sync every node holds the whole global model
    one_model: ClassVar[bool] = True
    needs_topology: ClassVar[bool] = False

    def __init__(self, config: FedAvgConfig, params: FlatParams, comm: Communicator,
                 *, weight: Tensor | None = None) -> None:
        self.config = config
        self.params = params
        self.comm = comm
        rows = params.rows
        if weight is None:
            weight = torch.ones(rows, dtype=torch.float64)
        # a NaN passes "< 0" and an inf divides to NaN: both refused here, not at the first sync
        if weight.shape != (rows,) or not bool((torch.isfinite(weight) & (weight >= 0)).all()):
            raise ValueError(f"weight must be {rows} finite non-negative numbers, got "
                             f"{weight.tolist()}")
        self.weight = weight.to(torch.float64)
        self.rounds = 0
        self._comp = make_compressors(config.compress, config.error_feedback,
                                      list(params.buffers()), seed=config.seed)

    def sampled(self, round_index: int) -> Tensor | None:
        """Which of the N nodes take part in round ``round_index`` (same on every rank); None:
        every node (``client_fraction`` 1)."""
        n = self.comm.world_size
        if self.config.client_fraction >= 1.0:
            return None
        m = max(1, round(self.config.client_fraction * n))
        rng = np.random.default_rng((self.config.seed, round_index))
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.from_numpy(rng.choice(n, size=m, replace=False))] = True
        return mask

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based). ``active`` [L]: False = dropped this round."""
        check_step(step)
        if step % self.config.sync_every:
            return None
        round_index = step // self.config.sync_every - 1
        sampled = self.sampled(round_index)
        w = self.weight if sampled is None else self.weight * sampled[self.comm.nodes]
        if active is not None:
            w = w * active.to("cpu", torch.float64)
        with timed_sync(self.comm, SyncStats(step)) as stats:
            for i, buf in enumerate(self.params.buffers()):
                if self._comp is None:
                    self.comm.all_reduce_mean_(buf, w)
                else:
                    self.comm.all_reduce_mean_(buf, w, compressor=self._comp[i][0])
        stats.extra["participants"] = float(w.gt(0).sum())
        self.rounds += 1
        return stats

    def flush(self) -> None:
        """Nothing is ever in flight: every sync completes within :meth:`step`."""

    def state_rows(self) -> list[Tensor]:
        """Per-node state tensors [L, ...]: the error-feedback residuals, if any (else the model
        rows are all FedAvg keeps)."""
        return compressor_rows(self._comp)

    def state_dict(self) -> dict[str, Any]:
        return {"algorithm": self.name, "rounds": self.rounds, **compressors_state(self._comp)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state(self.name, state, ["rounds"], self._comp)
        self.rounds = int(state["rounds"])
        load_compressors_state(self._comp, state)
