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


# --------------------------------------------------------------------------- fast epoch draws
#
# A node's epoch permutation is ``default_rng([seed, node, epoch]).permutation(n)``. Building that
# generator costs ~10 us (SeedSequence hashing, PCG64 seeding), which dominates the simulator's
# batching when thousands of nodes start an epoch together. StackedBatches therefore computes
# the PCG64 states of all those nodes at once: SeedSequence's hash (numpy's documented
# algorithm, on uint32 arrays) and PCG64's seeding, then sets one reused generator's state and
# draws the same permutation. ``_fast_draws_ok`` checks the result against numpy once per
# process and falls back to ``_perm`` if they ever differ (another numpy's algorithms).

_M32 = 0xFFFFFFFF
_M128 = (1 << 128) - 1
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341


def _hashmix(value: np.ndarray, h: int) -> tuple[np.ndarray, int]:
    value = value ^ np.uint32(h)
    h = (h * _MULT_A) & _M32
    value = value * np.uint32(h)
    return value ^ (value >> np.uint32(16)), h


def _pcg64_states(seed: int, nodes: np.ndarray, epochs: np.ndarray) -> list[tuple[int, int]]:
    """``(state, inc)`` of ``PCG64(SeedSequence([seed, node, epoch]))`` for each pair (all
    three below 2**32)."""
    rows = len(nodes)
    entropy = [np.full(rows, seed, np.uint32), nodes.astype(np.uint32), epochs.astype(np.uint32),
               np.zeros(rows, np.uint32)]
    h = _INIT_A
    mixer = []
    for v in entropy:  # SeedSequence.mix_entropy, pool size 4
        m, h = _hashmix(v, h)
        mixer.append(m)
    for src in range(4):
        for dst in range(4):
            if src != dst:
                hv, h = _hashmix(mixer[src], h)
                r = np.uint32(_MIX_L) * mixer[dst] - np.uint32(_MIX_R) * hv
                mixer[dst] = r ^ (r >> np.uint32(16))
    h = _INIT_B
    words = []
    for i in range(8):  # generate_state(4, uint64): 8 uint32 words, little-endian pairs
        v = mixer[i % 4] ^ np.uint32(h)
        h = (h * _MULT_B) & _M32
        v = v * np.uint32(h)
        words.append((v ^ (v >> np.uint32(16))).astype(np.uint64))
    w = [(words[2 * k] | (words[2 * k + 1] << np.uint64(32))).tolist() for k in range(4)]
    out = []
    for s0, s1, i0, i1 in zip(*w, strict=True):  # pcg_setseq_128_srandom_r
        inc = ((((i0 << 64) | i1) << 1) | 1) & _M128
        state = (inc + ((s0 << 64) | s1)) & _M128
        out.append(((state * _PCG_MULT + inc) & _M128, inc))
    return out


def _set_pcg64(bitgen: np.random.PCG64, state: int, inc: int) -> None:
    bitgen.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                    "has_uint32": 0, "uinteger": 0}


_FAST_OK: bool | None = None


def _fast_draws_ok() -> bool:
    global _FAST_OK
    if _FAST_OK is None:
        try:
            triples = [(0, 0, 0), (7, 123456, 3), (4294967295, 1, 4294967295)]
            states = [_pcg64_states(s, np.array([n]), np.array([e]))[0] for s, n, e in triples]
            bitgen = np.random.PCG64()
            gen = np.random.Generator(bitgen)
            ok = True
            for (s, n, e), (state, inc) in zip(triples, states, strict=True):
                ref = np.random.default_rng([s, n, e])
                _set_pcg64(bitgen, state, inc)
                ok &= bitgen.state == ref.bit_generator.state
                ok &= bool(np.array_equal(gen.permutation(37), ref.permutation(37)))
            _FAST_OK = bool(ok)
        except Exception:  # pragma: no cover - a numpy without these internals
            _FAST_OK = False
    return _FAST_OK


class StackedBatches:
    """:func:`node_batch` for many nodes at once: ``batch(step)`` -> int64 [L, B].

    Keeps each node's current epoch permutation in one padded table, so a step costs one
    gather; a node's permutation is redrawn only when its epoch changes (all redrawn nodes'
    generator states computed at once; a one-sample shard needs no draw).
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
        self._sizes = self.sizes.numpy()
        self._m = self.m.numpy()
        self._node_ids = np.asarray(self.nodes, dtype=np.int64)
        self._table = np.zeros((len(self.shards), int(self.sizes.max())), dtype=np.int64)
        self._epoch = np.full(len(self.shards), -1, dtype=np.int64)
        self._offsets = np.arange(batch_size)
        self._bitgen = np.random.PCG64()
        self._gen = np.random.Generator(self._bitgen)

    def batch(self, step: int | Tensor) -> Tensor:
        """Sample indices [L, B] at local step ``step`` (an int, or one step per node [L])."""
        steps = torch.as_tensor(step, dtype=torch.long).expand(len(self.shards)).cpu().numpy()
        epoch = steps // self._m
        redraw = np.flatnonzero(epoch != self._epoch)
        if len(redraw):
            self._redraw(redraw, epoch[redraw])
            self._epoch[redraw] = epoch[redraw]
        j = steps % self._m
        pos = (j[:, None] * self.batch_size + self._offsets) % self._sizes[:, None]
        return torch.from_numpy(np.take_along_axis(self._table, pos, axis=1))

    def _redraw(self, rows: np.ndarray, epochs: np.ndarray) -> None:
        """Fill the table rows ``rows`` with their nodes' permutations of epoch ``epochs``."""
        sizes = self._sizes[rows]
        single = sizes == 1  # a one-sample shard's permutation is itself
        self._table[rows[single], 0] = [self.shards[r][0] for r in rows[single].tolist()]
        rows, epochs = rows[~single], epochs[~single]
        if not len(rows):
            return
        nodes = self._node_ids[rows]
        small = 0 <= self.seed <= _M32 and int(nodes.min()) >= 0 \
            and int(nodes.max()) <= _M32 and int(epochs.max()) <= _M32
        if not (small and _fast_draws_ok()):
            for r, e in zip(rows.tolist(), epochs.tolist(), strict=True):
                self._table[r, : self._sizes[r]] = _perm(self.shards[r], self.seed,
                                                         self.nodes[r], e)
            return
        states = _pcg64_states(self.seed, nodes, epochs)
        for r, (state, inc) in zip(rows.tolist(), states, strict=True):
            _set_pcg64(self._bitgen, state, inc)
            shard = self.shards[r]
            self._table[r, : len(shard)] = shard[self._gen.permutation(len(shard))]
