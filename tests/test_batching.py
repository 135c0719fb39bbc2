"""A real rank's batches are exactly the batches of the simulated node with the same id."""

from __future__ import annotations

import numpy as np
import torch

from gossip.batching import StackedBatches, node_batch, steps_per_epoch
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
