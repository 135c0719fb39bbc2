"""A real rank's batches are exactly the batches of the simulated node with the same id."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gossip.batching import StackedBatches, _epoch_orders, _node_hash, node_batch, steps_per_epoch
from gossip.data import partition
from gossip.tasks import get_task
from launch.rank import ShardStream


def test_real_rank_stream_equals_simulated_node_batches():
    task = get_task("digits")
    shards = partition("dirichlet:0.5", task.data.y_train, 4, seed=3)
    sim = StackedBatches(shards, [0, 1, 2, 3], 16, seed=7)
    streams = [ShardStream(task, shards[r], 16, 7, r, torch.device("cpu")) for r in range(4)]
    for step in range(3 * steps_per_epoch(max(map(len, shards)), 16)):  # several epochs
        idx = sim.batch(step)
        for r, stream in enumerate(streams):
            x, y = stream.next()
            assert torch.equal(x, task.data.x_train[idx[r]])
            assert torch.equal(y, task.data.y_train[idx[r]])


def test_schedule_is_a_permutation_per_epoch_and_resumes_from_a_count():
    shard = np.arange(100, 137)  # 37 samples, batch 8: 5 batches, the last wraps around
    epoch = np.concatenate([node_batch(shard, 8, seed=1, node=2, step=s) for s in range(5)])
    assert sorted(set(epoch.tolist())) == shard.tolist()  # every sample, 3 repeats to fill
    task = get_task("digits")
    a = ShardStream(task, shard, 8, 1, 2, torch.device("cpu"))
    for _ in range(7):
        a.next()
    b = ShardStream(task, shard, 8, 1, 2, torch.device("cpu"))
    b.load_state(a.state())
    assert torch.equal(a.next()[0], b.next()[0])


# ------------------------------------------------------------------ the documented permutation

def _lowbias32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def _reference_epoch(shard: list[int], seed: int, node: int, epoch: int) -> list[int]:
    """The module docstring's formula in plain Python integers."""
    h = _lowbias32((seed & 0xFFFFFFFF) ^ 0x9E3779B9)
    for part in (seed >> 32, node & 0xFFFFFFFF, node >> 32, epoch & 0xFFFFFFFF, epoch >> 32):
        h = _lowbias32(h ^ part)
    keys = [_lowbias32(h ^ (((p + 1) * 0x9E3779B9) & 0xFFFFFFFF)) for p in range(len(shard))]
    return [shard[p] for p in sorted(range(len(shard)), key=keys.__getitem__)]


def test_epoch_permutation_is_the_documented_formula():
    shard = list(range(500, 537))  # 37 samples, batch 37: one batch = the whole epoch
    for seed, node, epoch in [(0, 0, 0), (7, 3, 2), (2**40 + 5, 2**33 + 1, 2**35 + 9)]:
        got = node_batch(np.array(shard), 37, seed=seed, node=node, step=epoch)
        assert got.tolist() == _reference_epoch(shard, seed, node, epoch)


def test_epoch_permutations_are_uniform():
    """Over 2,400 (node, epoch) draws of a 4-sample shard, the 24 orders are equally likely:
    Pearson's chi-square with 23 degrees of freedom stays under its 0.999 quantile (49.73)."""
    counts: dict[tuple[int, ...], int] = {}
    draws = [(node, epoch) for node in range(600) for epoch in range(4)]
    for node, epoch in draws:
        order = tuple(node_batch(np.arange(4), 4, seed=11, node=node, step=epoch).tolist())
        counts[order] = counts.get(order, 0) + 1
    expected = len(draws) / 24
    assert len(counts) == 24
    assert sum((c - expected) ** 2 / expected for c in counts.values()) < 49.73


@pytest.mark.parametrize("tensor_path", [False, True])
def test_stacked_batches_redraw_only_the_rows_whose_epoch_changed(tensor_path):
    """Both paths (NumPy on the host; the tensors a GPU runs) against :func:`node_batch`, through
    every redraw case: all rows, some, none."""
    shards = [np.arange(10 * i, 10 * i + n) for i, n in enumerate([3, 17, 1, 40])]
    batches = StackedBatches(shards, [4, 5, 6, 7], 8, seed=2, tensor_path=tensor_path)
    for steps in ([0, 0, 0, 0], [1, 2, 1, 3], [1, 3, 9, 5], [1, 3, 9, 5], [7, 3, 9, 6],
                  [14, 6, 18, 12]):
        got = batches.batch(torch.tensor(steps))
        for i, s in enumerate(steps):
            assert got[i].tolist() == node_batch(shards[i], 8, seed=2, node=4 + i,
                                                 step=s).tolist()


def test_host_and_tensor_arithmetic_give_the_same_orders():
    """``_epoch_orders`` on NumPy arrays (the host path) and on tensors (the GPU path)."""
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 40, size=64)
    nodes = rng.integers(0, 2**40, size=64)
    epochs = rng.integers(0, 2**34, size=64)
    host = _epoch_orders(_node_hash(3, nodes), epochs, sizes, 40)
    dev = _epoch_orders(_node_hash(3, torch.from_numpy(nodes)), torch.from_numpy(epochs),
                        torch.from_numpy(sizes), 40).numpy()
    for row, n in enumerate(sizes):
        assert host[row, :n].tolist() == dev[row, :n].tolist()
        assert sorted(host[row, :n].tolist()) == list(range(n))


def test_a_step_that_is_not_an_integer_is_refused():
    batches = StackedBatches([np.arange(5), np.arange(3)], [0, 1], 2, seed=0)
    for step in (2.5, True, torch.tensor([0.5, 1.0])):
        with pytest.raises(ValueError, match="step must be an integer"):
            batches.batch(step)
    with pytest.raises(ValueError, match=r"step must be an integer, got 2\.5"):
        node_batch(np.arange(5), 2, seed=0, node=0, step=2.5)


def test_a_negative_step_is_refused():
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        node_batch(np.arange(5), 2, seed=0, node=0, step=-1)
    batches = StackedBatches([np.arange(5), np.arange(3)], [0, 1], 2, seed=0)
    with pytest.raises(ValueError, match="step must be >= 0, got -2"):
        batches.batch(torch.tensor([0, -2]))


def test_mul32_is_exact_where_the_int64_product_overflows():
    """``_mul32``'s int64 product wraps modulo 2**64 on NumPy and torch; its low 32 bits are the
    exact product's, checked against Python's integers at and near the extremes."""
    from gossip.batching import _GOLDEN, _LOWBIAS, _mul32

    rng = np.random.default_rng(0)
    xs = np.concatenate([[0, 1, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1],
                         rng.integers(0, 2**32, size=2000)]).astype(np.int64)
    for c in (_GOLDEN, *_LOWBIAS, 2**32 - 1):
        want = [(int(x) * c) & 0xFFFFFFFF for x in xs]
        assert _mul32(xs, c).tolist() == want
        assert _mul32(torch.from_numpy(xs), c).tolist() == want


@pytest.mark.parametrize("tensor_path", [False, True])
def test_batches_of_the_rows_asked_for_are_their_steps_whatever_was_skipped(tensor_path):
    """``batch(step, rows)``: the rows asked for get :func:`node_batch`'s batch of their step
    over random masks (rows skipped while they crossed epochs included); the others hold
    indices of their own shard."""
    rng = np.random.default_rng(4)
    shards = [np.arange(100 * i, 100 * i + n) for i, n in enumerate([3, 17, 1, 40, 9])]
    batches = StackedBatches(shards, [10, 11, 12, 13, 14], 8, seed=6, tensor_path=tensor_path)
    steps = np.zeros(5, dtype=np.int64)
    for _ in range(40):
        rows = torch.from_numpy(rng.random(5) < 0.5)
        got = batches.batch(torch.from_numpy(steps), rows)
        for i in range(5):
            if rows[i]:
                assert got[i].tolist() == node_batch(shards[i], 8, seed=6, node=10 + i,
                                                     step=int(steps[i])).tolist()
            else:
                assert set(got[i].tolist()) <= set(shards[i].tolist())
        steps += rng.integers(0, 3, size=5)  # some rows jump whole epochs between reads
