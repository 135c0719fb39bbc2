"""Deterministic, stateless mini-batch schedules for one node or N stacked nodes.

Node ``i`` with shard ``indices`` (n_i samples) sees, at its local step ``s`` (0-based), batch
``j = s mod m_i`` of epoch ``e = s div m_i``, where ``m_i = ceil(n_i / B)`` and each epoch is a
fresh permutation drawn from ``numpy.random.default_rng([seed, i, e])``. Batches always hold B
samples: the last batch of an epoch wraps around to the start of the same permutation. Being a
pure function of (seed, node, step), the schedule needs no saved state to resume, and a real rank
and a simulated node with the same id see exactly the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["StackedBatches", "node_batch", "steps_per_epoch"]


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def _perm(indices: np.ndarray, seed: int, node: int, epoch: int) -> np.ndarray:
    return indices[np.random.default_rng([seed, node, epoch]).permutation(len(indices))]


def node_batch(indices: np.ndarray, batch_size: int, *, seed: int, node: int,
               step: int) -> np.ndarray:
    """The sample indices node ``node`` trains on at its local step ``step`` (0-based)."""
    if len(indices) == 0:
        raise ValueError(f"node {node} has no samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    m = steps_per_epoch(len(indices), batch_size)
    epoch, j = divmod(step, m)
    perm = _perm(np.asarray(indices), seed, node, epoch)
    return perm[(j * batch_size + np.arange(batch_size)) % len(perm)]


class StackedBatches:
    """:func:`node_batch` for many nodes at once: ``batch(step)`` -> int64 [L, B].

    Keeps each node's current epoch permutation in one padded table, so a step costs one
    gather; a node's permutation is redrawn only when its epoch changes.
    """

    def __init__(self, shards: Sequence[np.ndarray], nodes: Sequence[int], batch_size: int,
                 *, seed: int) -> None:
        if len(shards) != len(nodes):
            raise ValueError(f"got {len(shards)} shards for {len(nodes)} nodes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for node, s in zip(nodes, shards, strict=True):
            if len(s) == 0:
                raise ValueError(f"node {node} has no samples")
        self.shards = [np.asarray(s) for s in shards]
        self.nodes = list(nodes)
        self.batch_size = batch_size
        self.seed = seed
        self.sizes = torch.tensor([len(s) for s in self.shards], dtype=torch.long)
        self.m = (self.sizes + batch_size - 1) // batch_size
        self._table = torch.zeros(len(self.shards), int(self.sizes.max()), dtype=torch.long)
        self._epoch = torch.full((len(self.shards),), -1, dtype=torch.long)
        self._offsets = torch.arange(batch_size)

    def batch(self, step: int | Tensor) -> Tensor:
        """Sample indices [L, B] at local step ``step`` (an int, or one step per node [L])."""
        steps = torch.as_tensor(step, dtype=torch.long).expand(len(self.shards))
        epoch = steps // self.m
        for row in (epoch != self._epoch).nonzero().flatten().tolist():
            e = int(epoch[row])
            perm = _perm(self.shards[row], self.seed, self.nodes[row], e)
            self._table[row, : len(perm)] = torch.from_numpy(perm)
            self._epoch[row] = e
        j = steps % self.m
        pos = (j.unsqueeze(1) * self.batch_size + self._offsets) % self.sizes.unsqueeze(1)
        return self._table.gather(1, pos)
