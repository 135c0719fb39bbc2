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


@pytest.mark.parametrize("case", [
    {"algo": "fedavg", "nodes": 3000, "partition": "sample:dirichlet:0.5", "local_epochs": 1,
     "momentum": 0.9, "weight_decay": 1e-3},
    {"algo": "diloco", "nodes": 64, "partition": "iid", "sync_every": 5},
    {"algo": "noloco", "nodes": 30, "partition": "iid", "sync_every": 4, "momentum": 0.5}])
def test_replayed_steps_equal_the_eager_steps(case):
    """CUDA graphs of the local step and of a global model's evaluation (simulations/graphs.py)
    against the same run with them off: the same bits. The FedAvg case starts a new epoch for
    every node each round (the redraw-all graph); DiLoCo's and NoLoCo's equal shards step
    inside epochs too (the no-redraw graph); FedAvg's and DiLoCo's evaluations are replayed
    from the third round. Steps that are not replayed (some rows masked or starting an epoch)
    run in test_simulator_on_cuda_matches_cpu's partitions and faults."""
    base = {"rounds": 4, "batch_size": 16, "seed": 2, "optimizer": "sgd", "lr": 0.05,
            "device": "cuda", **case}
    runs = {}
    for graphs in (True, False):
        sim = Simulation(SimConfig(**base, cuda_graphs=graphs))
        records = [sim.run_round(r) for r in range(4)]
        runs[graphs] = (sim.flat_params().cpu(), records, sim.graphs.replays)
    assert runs[True][2] > 0 and runs[False][2] == 0
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1] == runs[False][1]  # train losses and evaluations, replayed or not


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


CODECS = ("int8", "fp8", "bf16", "fp16", "topk:0.1", "randk:0.1")


def _compressed_one_rank(comm: TorchCommunicator, device: str) -> dict:
    from gossip.compress import Compressor, parse_codec

    out = {}
    for codec in CODECS:
        for weight in (None, torch.tensor([2.5], dtype=torch.float64)):
            x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(5)).to(device)
            comp = Compressor(parse_codec(codec), 1, 4096, error_feedback=True, seed=3,
                              device=device)
            for _ in range(2):  # the second sync adds the first one's residual
                comm.all_reduce_mean_(x, weight, compressor=comp)
            out[(codec, weight is None)] = x.cpu()
    return out


def test_compressed_all_reduce_under_nccl():
    """Every lossy codec with error feedback, weighted and not, at world size 1 under NCCL
    (CUDA tensors): the same result as Gloo with CPU tensors."""
    [nccl] = run_ranks(_compressed_one_rank, 1, "cuda", backend="nccl")
    [gloo] = run_ranks(_compressed_one_rank, 1, "cpu")
    for key, want in gloo.items():
        torch.testing.assert_close(nccl[key], want, rtol=0, atol=1e-6, msg=str(key))
