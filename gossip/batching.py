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
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32) and a constant ``c`` < 2**32. The int64
    product may overflow: NumPy arrays and torch tensors then wrap modulo 2**64 (two's
    complement), which keeps the low 32 bits exact (a test checks them against Python's
    integers on both, at the extremes)."""
    return (x * c) & _M32


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


def _epoch_hash(node_hash: Array, epochs: Array) -> Array:
    """``h(seed, node, epoch)``: :func:`_node_hash` of the nodes chained with the epochs."""
    return _mix(_mix(node_hash ^ (epochs & _M32)) ^ ((epochs >> 32) & _M32))


def _position_keys(epoch_hash: Array, positions: Array) -> Array:
    """The sort key of each position in a shard, given its row's :func:`_epoch_hash`."""
    return _mix(epoch_hash ^ _mul32(positions + 1, _GOLDEN))


def _epoch_orders(node_hash: Array, epochs: Array, sizes: Array, width: int) -> Array:
    """[L, width] int64: row ``l`` starts with the positions ``0 .. sizes[l] - 1`` of its node's
    shard in the order of epoch ``epochs[l]`` (padding after them); ``node_hash`` [L] is
    :func:`_node_hash` of the nodes. NumPy arrays (fewer overheads on the host) or tensors on
    any device: the same integer arithmetic, the same orders."""
    h = _epoch_hash(node_hash, epochs)
    if isinstance(h, Tensor):
        pos = torch.arange(width, device=h.device)
        keys = _position_keys(h[:, None], pos)
        return keys.masked_fill_(pos >= sizes[:, None], _ABSENT).argsort(dim=1)
    pos = np.arange(width, dtype=np.int64)
    keys = _position_keys(h[:, None], pos)
    keys[pos >= sizes[:, None]] = _ABSENT
    return keys.argsort(axis=1)


def _check_steps(step: object) -> None:
    """A step is an integer (or an integer tensor): 2.5 is refused, not truncated."""
    integral = (isinstance(step, Tensor) and not step.is_floating_point()
                and not step.is_complex() and step.dtype != torch.bool) or (
        isinstance(step, int | np.integer) and not isinstance(step, bool))
    if not integral:
        raise ValueError(f"step must be an integer, got {step!r}")


def node_batch(indices: np.ndarray, batch_size: int, *, seed: int, node: int,
               step: int) -> np.ndarray:
    """The sample indices node ``node`` trains on at its local step ``step`` (0-based)."""
    if len(indices) == 0:
        raise ValueError(f"node {node} has no samples")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _check_steps(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    n = len(indices)
    epoch, j = divmod(step, steps_per_epoch(n, batch_size))
    order = _epoch_orders(_node_hash(seed, np.array([node])), np.array([epoch]),
                          np.array([n]), n)[0]
    return np.asarray(indices)[order[(j * batch_size + np.arange(batch_size)) % n]]


class StackedBatches:
    """:func:`node_batch` for many nodes at once: ``batch(step)`` -> int64 [L, B] on ``device``.

    Keeps each node's current epoch permutation, so a step costs one gather, and redraws the
    rows whose epoch changed together. On the host the shards lie end to end in one flat array
    and a redraw sorts the changed rows' positions by (row, key) at once: no padding, whose cost
    grows with the largest shard where most are small (non-IID splits of many nodes). On a GPU
    they lie in one padded table (:func:`_epoch_orders`), whose kernels keep one shape, and
    nothing is copied back. ``tensor_path`` takes the GPU's tensor path on the CPU too (the
    same batches; for tests).
    """

    def __init__(self, shards: Sequence[np.ndarray], nodes: Sequence[int], batch_size: int,
                 *, seed: int, device: torch.device | str = "cpu",
                 tensor_path: bool = False) -> None:
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
        self._starts = np.cumsum(self._sizes) - self._sizes
        # element -> its position in its own shard
        self._position = (np.arange(int(self._sizes.sum()))
                          - np.repeat(self._starts, self._sizes))
        self._node_hash = _node_hash(seed, np.asarray(self.nodes, dtype=np.int64))
        self._epoch = np.full(len(shards), -1, dtype=np.int64)
        self._offsets = np.arange(batch_size)
        self._host = self.device.type == "cpu" and not tensor_path
        flat = np.concatenate(shards).astype(np.int64)
        if self._host:  # the epoch's order, row by row (until a row's first draw: its shard)
            self._flat, self._order = flat, flat.copy()
            return
        padded = np.zeros((len(shards), int(self._sizes.max())), dtype=np.int64)
        padded[np.repeat(np.arange(len(shards)), self._sizes), self._position] = flat
        self._shards = torch.from_numpy(padded).to(self.device)
        self._table = self._shards.clone()  # until a row's first draw: its shard
        self._dev = {"hash": torch.from_numpy(self._node_hash).to(self.device),
                     "sizes": torch.from_numpy(self._sizes).to(self.device),
                     "offsets": torch.from_numpy(self._offsets).to(self.device)}

    def batch(self, step: int | Tensor, rows: Tensor | None = None) -> Tensor:
        """Sample indices [L, B] at local step ``step`` (an int, or one step per node [L]).

        ``rows`` (bool [L]; None: all): the rows whose batches the caller reads. The others
        hold indices of their own shard, not necessarily their step's batch: a row that starts
        an epoch outside ``rows`` is redrawn when it is next read (a masked local step then
        sorts only the nodes that train)."""
        ej, redraw = self.advance(step, rows)
        if not self._host:  # one host-to-device copy per step; nothing waits for the device
            return self.draw(to_device(ej, self.device), redraw)
        epoch, j = ej.numpy()
        if len(redraw):
            self._redraw_host(redraw, epoch[redraw])
        sizes = self._sizes[:, None]
        pos = (j[:, None] * self.batch_size + self._offsets) % sizes + self._starts[:, None]
        return torch.from_numpy(self._order[pos])

    def _redraw_host(self, rows: np.ndarray, epochs: np.ndarray) -> None:
        """The epoch orders of the rows ``rows`` (ascending) into their segments of the flat
        order: their positions sorted by (row, key), keys distinct within a row."""
        sizes = self._sizes[rows]
        if len(rows) == len(self.nodes):
            elems: np.ndarray | slice = slice(None)
        else:  # the rows' segments, in row order
            lengths = np.cumsum(sizes)
            elems = np.arange(int(lengths[-1])) + np.repeat(self._starts[rows] - lengths + sizes,
                                                             sizes)
        owner = np.repeat(np.arange(len(rows), dtype=np.int64), sizes)
        keys = _position_keys(_epoch_hash(self._node_hash[rows], epochs)[owner],
                              self._position[elems])
        self._order[elems] = self._flat[elems][np.argsort((owner << 32) | keys)]

    def advance(self, step: int | Tensor, rows: Tensor | None = None
                ) -> tuple[Tensor, np.ndarray]:
        """The host's half of :meth:`batch`: each row's epoch and batch within it at ``step``
        (int64 [2, L], on the host) and the rows to redraw: those of ``rows`` (None: all)
        whose epoch changed since their last draw."""
        _check_steps(step)
        steps = torch.as_tensor(step, dtype=torch.long).cpu().expand(len(self.nodes)).numpy()
        if steps.min() < 0:
            raise ValueError(f"step must be >= 0, got {int(steps.min())}")
        epoch, j = steps // self._m, steps % self._m
        changed = epoch != self._epoch
        if rows is not None:
            if not isinstance(rows, Tensor) or rows.dtype != torch.bool or tuple(
                    rows.shape) != (len(self.nodes),):  # ([True] would broadcast to all)
                what = (f"{rows.dtype} {tuple(rows.shape)}" if isinstance(rows, Tensor)
                        else type(rows).__name__)
                raise ValueError(f"rows must be a bool tensor [{len(self.nodes)}] (one flag "
                                 f"per row), got {what}")
            changed &= rows.to("cpu", torch.bool).numpy()
        redraw = np.flatnonzero(changed)
        self._epoch[redraw] = epoch[redraw]
        return torch.from_numpy(np.stack([epoch, j])), redraw

    def draw(self, ej: Tensor, redraw: np.ndarray) -> Tensor:
        """The device's half of :meth:`batch` (not on the host path): ``ej`` is
        :meth:`advance`'s [2, L] on the device. Issues no host-device synchronisation, and
        keeps the permutation table at one address, so a CUDA graph may record it."""
        assert not self._host
        dev, width = self._dev, self._table.shape[1]
        if len(redraw) == len(self.nodes):
            order = _epoch_orders(dev["hash"], ej[0], dev["sizes"], width)
            torch.gather(self._shards, 1, order, out=self._table)
        elif len(redraw):
            rows = to_device(torch.from_numpy(redraw), self.device)
            order = _epoch_orders(dev["hash"][rows], ej[0][rows], dev["sizes"][rows], width)
            self._table[rows] = self._shards[rows].gather(1, order)
        pos = (ej[1][:, None] * self.batch_size + dev["offsets"]) % dev["sizes"][:, None]
        return self._table.gather(1, pos)
