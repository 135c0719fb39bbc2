"""Deterministic, stateless mini-batch schedules for one node or N stacked nodes.

Node ``i`` with shard ``indices`` (n_i samples) sees, at its local step ``s`` (0-based), batch
``j = s mod m_i`` of epoch ``e = s div m_i``, where ``m_i = ceil(n_i / B)``. Batches always hold B
samples: the last batch of an epoch wraps around to the start of the same permutation.

Each epoch is a fresh permutation of the shard: position ``p`` gets the key
``mix(h(seed, i, e) xor (p + 1) * 0x9E3779B9 mod 2**32)`` and the shard is sorted by key, where
``mix`` is a 32-bit integer hash (Wellons' ``lowbias32``) and ``h`` chains it over the 32-bit
halves of the seed, the node id and the epoch. Both maps are bijections of 32-bit integers, so a
row's keys are distinct and the order is unique. Being integer arithmetic, the schedule is the
same on every device and for every number of nodes drawn together: a real rank, a simulated node
with the same id, on the CPU or a GPU, see exactly the same samples, and thousands of nodes
starting an epoch together cost a few vectorized tensor operations. Being a pure function of
(seed, node, step), the schedule needs no saved state to resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from gossip.ops import to_device

Array = TypeVar("Array", np.ndarray, Tensor)

__all__ = ["StackedBatches", "node_batch", "steps_per_epoch"]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9
_LOWBIAS = (0x7FEB352D, 0x846CA68B)
_ABSENT = 1 << 32  # the key of a padding position: after every real one


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)


def _mul32(x: Array, c: int) -> Array:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) and a constant ``c`` < 2**32, in two
    16-bit halves so that no product leaves int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & _M32


def _mix(x: Array) -> Array:
    """Wellons' ``lowbias32``: a bijection of 32-bit integers (held in int64)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _LOWBIAS[0])
    x = x ^ (x >> 15)
    x = _mul32(x, _LOWBIAS[1])
    return x ^ (x >> 16)


def _node_hash(seed: int, nodes: Array) -> Array:
    """The chained hash of the seed and the node ids [L] (any int64 values)."""
    h = _mix(nodes * 0 + ((seed & _M32) ^ _GOLDEN))
    for part in ((seed >> 32) & _M32, nodes & _M32, (nodes >> 32) & _M32):
        h = _mix(h ^ part)
    return h


def _epoch_orders(node_hash: Array, epochs: Array, sizes: Array, width: int) -> Array:
    """[L, width] int64: row ``l`` starts with the positions ``0 .. sizes[l] - 1`` of its node's
    shard in the order of epoch ``epochs[l]`` (padding after them); ``node_hash`` [L] is
    :func:`_node_hash` of the nodes. NumPy arrays (fewer overheads on the host) or tensors on
    any device: the same integer arithmetic, the same orders."""
    h = _mix(_mix(node_hash ^ (epochs & _M32)) ^ ((epochs >> 32) & _M32))
    if isinstance(h, Tensor):
        pos = torch.arange(width, device=h.device)
        keys = _mix(h[:, None] ^ _mul32(pos + 1, _GOLDEN))
        return keys.masked_fill_(pos >= sizes[:, None], _ABSENT).argsort(dim=1)
    pos = np.arange(width, dtype=np.int64)
    keys = _mix(h[:, None] ^ _mul32(pos + 1, _GOLDEN))
    keys[pos >= sizes[:, None]] = _ABSENT
    return keys.argsort(axis=1)


def node_batch(indices: np.ndarray, batch_size: int, *, seed: int, node: int,
               step: int) -> np.ndarray:
    """The sample indices node ``node`` trains on at its local step ``step`` (0-based)."""
    if len(indices) == 0:
        raise ValueError(f"node {node} has no samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    n = len(indices)
    epoch, j = divmod(step, steps_per_epoch(n, batch_size))
    order = _epoch_orders(_node_hash(seed, np.array([node])), np.array([epoch]),
                          np.array([n]), n)[0]
    return np.asarray(indices)[order[(j * batch_size + np.arange(batch_size)) % n]]


class StackedBatches:
    """:func:`node_batch` for many nodes at once: ``batch(step)`` -> int64 [L, B] on ``device``.

    Keeps each node's current epoch permutation in one padded table (NumPy on the host, a
    tensor on a GPU, where nothing is copied back), so a step costs one gather; the rows whose
    epoch changed are redrawn together (:func:`_epoch_orders`).
    """

    def __init__(self, shards: Sequence[np.ndarray], nodes: Sequence[int], batch_size: int,
                 *, seed: int, device: torch.device | str = "cpu") -> None:
        if len(shards) != len(nodes):
            raise ValueError(f"got {len(shards)} shards for {len(nodes)} nodes")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for node, s in zip(nodes, shards, strict=True):
            if len(s) == 0:
                raise ValueError(f"node {node} has no samples")
        self.device = torch.device(device)
        self.nodes = list(nodes)
        self.batch_size = batch_size
        self.seed = seed
        self._sizes = np.array([len(s) for s in shards], dtype=np.int64)
        self._m = (self._sizes + batch_size - 1) // batch_size  # steps per epoch
        padded = np.zeros((len(shards), int(self._sizes.max())), dtype=np.int64)
        starts = np.cumsum(self._sizes) - self._sizes
        padded[np.repeat(np.arange(len(shards)), self._sizes),
               np.arange(int(self._sizes.sum())) - np.repeat(starts, self._sizes)] = \
            np.concatenate(shards)
        self._node_hash = _node_hash(seed, np.asarray(self.nodes, dtype=np.int64))
        self._epoch = np.full(len(shards), -1, dtype=np.int64)
        self._offsets = np.arange(batch_size)
        self._host = self.device.type == "cpu"
        self._shards = padded if self._host else torch.from_numpy(padded).to(self.device)
        self._table = np.zeros_like(padded) if self._host else torch.empty_like(self._shards)
        if not self._host:
            self._dev = {"hash": torch.from_numpy(self._node_hash).to(self.device),
                         "sizes": torch.from_numpy(self._sizes).to(self.device),
                         "offsets": torch.from_numpy(self._offsets).to(self.device)}

    def batch(self, step: int | Tensor) -> Tensor:
        """Sample indices [L, B] at local step ``step`` (an int, or one step per node [L])."""
        steps = torch.as_tensor(step, dtype=torch.long).cpu().expand(len(self.nodes)).numpy()
        if steps.min() < 0:
            raise ValueError(f"step must be >= 0, got {int(steps.min())}")
        epoch, j = steps // self._m, steps % self._m
        redraw = np.flatnonzero(epoch != self._epoch)
        self._epoch = epoch.copy()
        width = self._table.shape[1]
        if self._host:
            if len(redraw):
                order = _epoch_orders(self._node_hash[redraw], epoch[redraw],
                                      self._sizes[redraw], width)
                self._table[redraw] = np.take_along_axis(self._shards[redraw], order, axis=1)
            pos = (j[:, None] * self.batch_size + self._offsets) % self._sizes[:, None]
            return torch.from_numpy(np.take_along_axis(self._table, pos, axis=1))
        # one host-to-device copy per step; nothing here waits for the device
        dev = self._dev
        ej = to_device(torch.from_numpy(np.stack([epoch, j])), self.device)
        if len(redraw) == len(steps):
            self._table = self._shards.gather(1, _epoch_orders(dev["hash"], ej[0], dev["sizes"],
                                                               width))
        elif len(redraw):
            rows = to_device(torch.from_numpy(redraw), self.device)
            order = _epoch_orders(dev["hash"][rows], ej[0][rows], dev["sizes"][rows], width)
            self._table[rows] = self._shards[rows].gather(1, order)
        pos = (ej[1][:, None] * self.batch_size + dev["offsets"]) % dev["sizes"][:, None]
        return self._table.gather(1, pos)
