"""Seeded fault schedules: crashes, churn, stragglers and lost messages.

A schedule is a pure function of ``(seed, round)`` over all N nodes, so every shard of a sharded
simulation derives the same masks without talking. Each round yields:

- ``alive(r)`` [N] bool: nodes that are up. A crashed node is down from its crash round on, for
  good; a churned node is down for ``churn_rounds`` consecutive rounds from a random round. A down
  node neither trains nor sends (the simulator passes the mask to ``comm.set_faults`` and as
  ``active`` to the training step and to ``algorithm.step``). The behaviours that follow are the
  algorithms': FedAvg/DiLoCo average the nodes that are up, and every node, a down one included,
  continues from that one global model (a node that returns pulls it); gossip and NoLoCo nodes
  keep their own models, so a down node keeps its parameters and state untouched, gossip merges
  what arrived (a missing neighbour's weight goes to self), and a NoLoCo node whose partner is
  down averages with whoever of its group it heard from (alone: keeps its own model for that
  step); from the next round on, peers leave the down node out of pairings and neighbourhoods.
- ``slowdown(r)`` [N] float: 1 for most nodes, ``straggler_slowdown`` for a fraction of them,
  redrawn every round (transient load, not a fixed slow tier).
- ``drop_prob``: the chance each message is lost, drawn per message by the communicator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["FaultSchedule", "nodes_for"]

# stream tags that keep the draws of each fault kind independent
_CRASH, _CHURN, _STRAGGLE = 0xC4A5, 0xC0A1, 0x5713


@dataclass(frozen=True)
class _Periods:
    start: np.ndarray  # [N] first round down (rounds + 1 = never)
    stop: np.ndarray  # [N] first round up again


class FaultSchedule:
    """Which nodes are up and which are slow in every round.

    Args:
        n: number of nodes N.
        rounds: rounds in the run (bounds the churn periods).
        seed: the run's seed.
        crash_fraction: fraction of nodes that crash for good at ``crash_round``.
        crash_round: the round (0-based) the crashes happen.
        churn_fraction: fraction of nodes that go offline once.
        churn_rounds: length of each offline period (rounds).
        straggler_fraction: fraction of nodes slowed down in each round.
        straggler_slowdown: their compute-time factor.
        drop_prob: probability that a message is lost.
    """

    def __init__(self, n: int, rounds: int, *, seed: int, crash_fraction: float = 0.0,
                 crash_round: int = 0, churn_fraction: float = 0.0, churn_rounds: int = 1,
                 straggler_fraction: float = 0.0, straggler_slowdown: float = 1.0,
                 drop_prob: float = 0.0) -> None:
        for name, value in (("crash_fraction", crash_fraction),
                            ("churn_fraction", churn_fraction),
                            ("straggler_fraction", straggler_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
        if churn_rounds < 1:
            raise ValueError(f"churn_rounds must be >= 1, got {churn_rounds!r}")
        if crash_fraction > 0 and not 0 <= crash_round < rounds:  # else no crash would happen
            raise ValueError(f"crash_round must be in [0, rounds={rounds}) with crash_fraction="
                             f"{crash_fraction}, got {crash_round!r}")
        if straggler_slowdown < 1.0:
            raise ValueError(f"straggler_slowdown must be >= 1, got {straggler_slowdown!r}")
        self.n = n
        self.rounds = rounds
        self.seed = seed
        self.drop_prob = drop_prob
        self.straggler_fraction = straggler_fraction
        self.straggler_slowdown = straggler_slowdown
        never = rounds + 1
        self.crash_at = np.full(n, never, dtype=np.int64)
        nodes_for("straggler_fraction", straggler_fraction, n)  # refused now, not at round r
        crashed = _choose("crash_fraction", n, crash_fraction,
                          np.random.default_rng([seed, _CRASH]))
        self.crash_at[crashed] = crash_round
        rng = np.random.default_rng([seed, _CHURN])
        churned = _choose("churn_fraction", n, churn_fraction, rng)
        start = np.full(n, never, dtype=np.int64)
        start[churned] = rng.integers(0, max(1, rounds - churn_rounds + 1), size=len(churned))
        self.churn = _Periods(start, start + churn_rounds)

    def alive(self, r: int) -> Tensor:
        """[N] bool: the nodes that are up in round ``r`` (0-based)."""
        down = (self.crash_at <= r) | ((self.churn.start <= r) & (r < self.churn.stop))
        return torch.from_numpy(~down)

    def slowdown(self, r: int) -> Tensor:
        """[N] float64: compute-time factor of each node in round ``r``."""
        out = np.ones(self.n)
        if self.straggler_fraction > 0 and self.straggler_slowdown > 1:
            slow = _choose("straggler_fraction", self.n, self.straggler_fraction,
                           np.random.default_rng([self.seed, _STRAGGLE, r]))
            out[slow] = self.straggler_slowdown
        return torch.from_numpy(out)


def nodes_for(name: str, fraction: float, n: int) -> int:
    """How many of ``n`` nodes ``fraction`` (the field ``name``) picks: ``round(fraction * n)``.
    A fraction above 0 that picks no node (0.01 of 10 nodes) is a ValueError naming the field,
    the value and the node count: it would silently run without the fault."""
    m = round(fraction * n)
    if fraction > 0 and m == 0:
        raise ValueError(f"{name}={fraction!r} is invalid with nodes={n}: {fraction!r} x {n} "
                         f"rounds to 0 nodes, so no node would be affected; use at least "
                         f"{1 / n:.4g} (one node) or 0")
    return m


def _choose(name: str, n: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    m = nodes_for(name, fraction, n)
    return np.sort(rng.choice(n, size=m, replace=False)) if m else np.zeros(0, dtype=np.int64)
