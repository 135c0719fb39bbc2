"""What a new user tries after the guides (docs/guide/*.md): their own model with BatchNorm or
dropout in the simulator, the guide's example with an --out that does not exist yet. Each case
is checked against a plain-torch reference (a per-node nn.Module), not the code under test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from gossip.tasks import Task, TaskData
from simulations.config import SimConfig
from simulations.engine import Simulation

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]


def _task(model_factory: object) -> Task:
    """A user's task (as in docs/guide/own-task-torchrun.md): two classes in 20 dimensions."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 20, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    data = TaskData(x[:400], y[:400], x[400:], y[400:], num_classes=2, kind="classification")
    return Task(name="user", data=data, model_factory=model_factory,  # type: ignore[arg-type]
                default_lr=0.05, default_batch_size=16)


def _batchnorm_model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))


def _dropout_model() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))


def _node_metrics(sim: Simulation, row: int) -> dict[str, float]:
    """Row ``row`` as a plain nn.Module, its parameters AND its own buffers, on the test set."""
    model = sim.task.make_model(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(sim.model.params[name][row])
        for name, b in model.named_buffers():
            b.copy_(sim.model.buffers[name][row])
    return sim.task.evaluate(model.eval())


@pytest.mark.parametrize("algo", ["fedavg", "diloco"])
def test_a_global_model_with_batchnorm_is_evaluated_with_each_nodes_statistics(algo: str) -> None:
    """FedAvg and DiLoCo average the parameters only: each node keeps its BatchNorm statistics
    (docs/guide/own-task-simulator.md), so the nodes' models differ. The simulator evaluated
    row 0 alone and reported its figures as every node's (min = max = mean)."""
    sim = Simulation(SimConfig(task="digits", algo=algo, nodes=4, rounds=1, sync_every=4,
                               batch_size=16, partition="dirichlet:0.5", seed=1),
                     task=_task(_batchnorm_model))
    record = sim.run_round(0)
    stats = sim.model.buffers["1.running_mean"]
    assert not torch.equal(stats, stats[:1].expand_as(stats))  # the nodes' statistics differ
    ref = [_node_metrics(sim, row) for row in range(4)]
    assert record["eval_nodes"] == 4
    for key in ("loss", "accuracy"):
        values = [m[key] for m in ref]
        assert record[f"{key}_mean"] == pytest.approx(float(np.mean(values)), abs=2e-6)
        assert record[f"{key}_min"] == pytest.approx(min(values), abs=2e-6)
        assert record[f"{key}_max"] == pytest.approx(max(values), abs=2e-6)
    assert len({round(m["loss"], 6) for m in ref}) > 1  # so row 0 could not stand for all
    assert record["consensus_distance"] == pytest.approx(0.0, abs=1e-12)  # parameters agree


@pytest.mark.parametrize("impl", ["vmap", "loop"])
def test_a_simulation_with_dropout_repeats_itself(impl: str) -> None:
    """Dropout draws from torch's global RNG, which the simulator did not seed: two runs with
    the same seed trained different models (launch.train seeds each rank; now so does the
    simulator, from the seed and the shard's first node)."""
    cfg = SimConfig(task="digits", algo="gossip", nodes=4, rounds=2, sync_every=3,
                    batch_size=16, seed=2, train_impl=impl)
    runs = []
    for _ in range(2):
        torch.manual_seed(len(runs))  # whatever the caller's RNG was
        sim = Simulation(cfg, task=_task(_dropout_model))
        for r in range(cfg.rounds):
            sim.run_round(r)
        runs.append(sim.flat_params())
    assert torch.equal(runs[0], runs[1])
    # and dropout is really drawn per node: rows differ although gossip started them equal
    assert not torch.equal(runs[0], runs[0][:1].expand_as(runs[0]))


@pytest.mark.slow
def test_cnn_attach_creates_its_out_directory(tmp_path: Path) -> None:
    """docs/guide/own-loop.md runs `examples/cnn_attach.py --algo fedavg --out /tmp/cnn`: with
    no /tmp/cnn yet, every rank trained and then crashed in torch.save (FileNotFoundError)."""
    out = tmp_path / "new" / "cnn"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "examples" / "cnn_attach.py"), "--algo", "fedavg", "--steps", "10",
           "--sync-every", "5", "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    models = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, tensor in models[0].items():  # FedAvg, last step a sync: the one average
        assert torch.equal(tensor, models[1][name]), name
