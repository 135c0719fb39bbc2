"""GPU paths, against the CPU results: skipped without CUDA (this project's CI has none).

A lent one-GPU machine runs them (see DESIGN.md section 6 for what one GPU allows): NCCL at world
size 1 only (NCCL refuses two ranks on one GPU), CUDA tensors over Gloo at world size 2 (Gloo's
point-to-point of CUDA tensors is staged through pinned CPU buffers), and the simulator with
``device="cuda"`` against the same run on the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gossip.comm import TorchCommunicator
from simulations.config import SimConfig
from simulations.engine import Simulation
from tests.distributed import run_ranks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _nccl_rank(comm: TorchCommunicator) -> dict:
    assert comm.backend == "nccl"
    x = torch.arange(12, dtype=torch.float32, device="cuda").view(1, 12)
    comm.all_reduce_mean_(x)  # one rank: the mean is itself
    weighted = torch.ones(1, 5, device="cuda")
    comm.all_reduce_mean_(weighted, torch.tensor([3.0], dtype=torch.float64))
    return {"mean": x.cpu(), "weighted": weighted.cpu()}


def test_nccl_at_world_size_one():
    [out] = run_ranks(_nccl_rank, 1, backend="nccl")
    assert torch.equal(out["mean"], torch.arange(12, dtype=torch.float32).view(1, 12))
    assert torch.equal(out["weighted"], torch.ones(1, 5))


def _gloo_cuda_rank(comm: TorchCommunicator) -> dict:
    me = comm.rank
    x = torch.full((1, 7), float(me + 1), device="cuda")
    comm.all_reduce_mean_(x)
    mine = torch.arange(9, dtype=torch.float32, device="cuda").view(1, 9) + 100 * me
    received, arrived = comm.exchange(mine, torch.tensor([[1], [0]]))
    assert received.is_cuda  # handed back on the caller's device
    return {"mean": x.cpu(), "received": received.cpu(), "arrived": arrived.cpu()}


def test_cuda_tensors_over_gloo_are_staged():
    outs = run_ranks(_gloo_cuda_rank, 2)
    for me, out in enumerate(outs):
        assert torch.equal(out["mean"], torch.full((1, 7), 1.5))
        other = torch.arange(9, dtype=torch.float32) + 100 * (1 - me)
        assert torch.equal(out["received"][0, 0], other)
        assert bool(out["arrived"].all())


FAULTS = {"crash_fraction": 0.25, "crash_round": 1, "churn_fraction": 0.25, "churn_rounds": 1,
          "straggler_fraction": 0.5, "straggler_policy": "deadline", "drop_prob": 0.2}


@pytest.mark.parametrize(("algo", "faults"), [
    ("fedavg", False), ("diloco", False), ("noloco", False), ("gossip-vc", False),
    ("fedavg", True), ("gossip-vc", True), ("noloco", True)])
def test_simulator_on_cuda_matches_cpu(algo, faults):
    """The same run on the GPU and on the CPU; with faults, the partial rounds too (down,
    crashed and late nodes: host masks sent to the device, rows frozen through the sync)."""
    base = {"algo": algo, "nodes": 8, "rounds": 3, "batch_size": 8, "partition": "dirichlet:0.5",
            "seed": 1, "sync_every": 3, **(FAULTS if faults else {})}
    runs = {}
    for device in ("cpu", "cuda"):
        sim = Simulation(SimConfig(**base, device=device))
        for r in range(3):
            sim.run_round(r)
        runs[device] = sim.flat_params().cpu()
    torch.testing.assert_close(runs["cuda"], runs["cpu"], rtol=1e-4, atol=1e-5)


def test_batch_schedule_on_cuda_is_the_host_schedule():
    from gossip.batching import StackedBatches

    rng = np.random.default_rng(2)
    shards = [rng.integers(0, 1000, size=n) for n in rng.integers(1, 60, size=300)]
    host = StackedBatches(shards, list(range(7, 307)), 16, seed=4)
    cuda = StackedBatches(shards, list(range(7, 307)), 16, seed=4, device="cuda")
    steps = np.zeros(300, dtype=np.int64)
    for _ in range(12):  # every row redrawn, then only those whose epoch changed
        want, got = host.batch(torch.from_numpy(steps)), cuda.batch(torch.from_numpy(steps))
        assert got.is_cuda and torch.equal(got.cpu(), want)
        steps += rng.integers(0, 3, size=300)


def _gloo_cuda_compressed_rank(comm: TorchCommunicator) -> dict:
    from gossip.compress import Compressor, parse_codec

    out = {}
    for device in ("cpu", "cuda"):
        x = torch.linspace(-2.0, 3.0, 4096, device=device).view(1, 4096) * (comm.rank + 1)
        comp = Compressor(parse_codec("int8"), 1, 4096, error_feedback=True, seed=3,
                          device=device)
        comm.all_reduce_mean_(x, compressor=comp)
        out[device] = x.cpu()
    return out


def test_compressed_all_reduce_of_cuda_tensors_over_gloo():
    """int8 with error feedback: CUDA tensors over Gloo (staged through the host) give the
    CPU tensors' result."""
    for out in run_ranks(_gloo_cuda_compressed_rank, 2):
        torch.testing.assert_close(out["cuda"], out["cpu"], rtol=0, atol=1e-6)
