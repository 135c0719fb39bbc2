"""What a new user tries after the guides (docs/guide/*.md): their own model with BatchNorm or
dropout in the simulator, the guide's example with an --out that does not exist yet. Each case
is checked against a plain-torch reference (a per-node nn.Module), not the code under test."""

from __future__ import annotations

import json
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
    from tests.test_example_cnn_attach import torchrun_cnn_attach

    out = tmp_path / "new" / "cnn"
    torchrun_cnn_attach(tmp_path, "--algo", "fedavg", "--steps", "10", "--sync-every", "5",
                        "--out", str(out))
    models = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for name, tensor in models[0].items():  # FedAvg, last step a sync: the one average
        assert torch.equal(tensor, models[1][name]), name


def per_sample_loss(seed: int = 0) -> Task:
    """A user's loss_fn that forgot the reduction (``--task tests.test_docs_snippets:...``)."""
    task = _task(_batchnorm_model)
    return Task(name="per-sample", data=task.data, model_factory=_batchnorm_model,
                default_lr=0.05, default_batch_size=16,
                loss_fn=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"))


def test_a_per_sample_loss_is_refused_before_the_run_directory_is_written(tmp_path: Path
                                                                          ) -> None:
    """launch.train ran into it at the first training step: a traceback on every rank (exit 1)
    after config.json and metrics.jsonl were written, so the corrected run into the same --out
    was refused ('holds another run') until --overwrite; the simulator printed one line but left
    the same files. Now both refuse it in one line (exit 2) and write nothing."""
    from simulations.run import main as sim_main

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")}
    real, sim = tmp_path / "real", tmp_path / "sim"
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--task",
                           "tests.test_docs_snippets:per_sample_loss", "--algo", "fedavg",
                           "--steps", "4", "--sync-every", "2", "--out", str(real)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "loss_fn returned a torch.float32 tensor of shape (16,): it must return the batch's " \
           "mean loss" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not real.exists() or sorted(p.name for p in real.iterdir()) in ([], [".lock"])
    assert sim_main(["--task", "tests.test_docs_snippets:per_sample_loss", "--algo", "fedavg",
                     "--nodes", "2", "--rounds", "1", "--sync-every", "1", "--no-progress",
                     "--out", str(sim)]) == 2
    assert not sim.exists() or sorted(p.name for p in sim.iterdir()) in ([], [".lock"])


def test_attach_names_a_parameter_on_the_meta_device() -> None:
    """A model built on the meta device (as for large models, materialized later) used to get
    past attach's checks into the process group: 'No backend type associated with device type
    meta' from Gloo, naming no tensor. Refused now before any process group is joined."""
    import gossip

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to("meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"parameter '0\.weight' is on the meta device"):
        gossip.attach(model, optimizer, gossip.FedAvgConfig())
    assert not torch.distributed.is_initialized()
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[1].running_mean = torch.empty(4, device="meta")  # a buffer left on meta is named too
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"buffer '1\.running_mean' is on the meta device"):
        gossip.attach(model, optimizer, gossip.FedAvgConfig())


def _attach_cpu_model_under_nccl(comm: object) -> str:
    import gossip

    model = nn.Linear(3, 2)  # left on the CPU
    try:
        gossip.attach(model, torch.optim.SGD(model.parameters(), lr=0.1),
                      gossip.FedAvgConfig(), comm)  # type: ignore[arg-type]
    except ValueError as e:
        return str(e)
    return "attached"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (NCCL)")
def test_attach_names_a_cpu_parameter_under_nccl() -> None:
    """Under torchrun on a GPU machine the group is NCCL; a model left on the CPU failed in the
    start-up broadcast with NCCL's 'No backend type associated with device type cpu'."""
    from tests.distributed import run_ranks

    [message] = run_ranks(_attach_cpu_model_under_nccl, 1, backend="nccl")
    assert message.startswith("parameter 'weight' is on cpu, but the process group is NCCL"), \
        message


@pytest.mark.parametrize("cli", ["simulations.run", "simulations.compare"])
def test_sigterm_ends_a_simulation_like_ctrl_c(tmp_path: Path, cli: str) -> None:
    """docs/guide/run-directory.md: every run, real or simulated, says "interrupted" after
    Ctrl-C or SIGTERM. The simulator's CLIs died of SIGTERM (exit -15) leaving config.json and
    metrics.jsonl without a summary or a status; launch.train alone handled it."""
    import signal

    from tests.test_rundir import _check_interrupted, _interrupt_when_recorded

    out = tmp_path / "run"
    if cli == "simulations.run":
        cmd = [sys.executable, "-m", cli, "--algo", "fedavg", "--nodes", "4", "--sync-every",
               "2", "--no-progress", "--rounds", "100000", "--out", str(out)]
        run_dir = out
    else:
        cmd = [sys.executable, "-m", cli, "--algos", "fedavg", "--nodes", "4",
               "--rounds", "100000", "--out", str(out)]
        run_dir = out / "fedavg"
    proc, err = _interrupt_when_recorded(cmd, run_dir, signal.SIGTERM)
    assert proc.returncode == 130, err
    assert f"interrupted: kept {run_dir} (marked interrupted at round " in err, err
    assert "Traceback" not in err, err
    _check_interrupted(run_dir)


def test_attach_says_when_it_gets_a_config_class_instead_of_an_instance() -> None:
    """gossip.attach(model, opt, gossip.NoLoCoConfig) said 'config must be one of [...], got
    type', naming neither the class nor what to do."""
    import gossip

    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"got the class NoLoCoConfig itself: pass "
                                         r"NoLoCoConfig\(sync_every=\.\.\.\)"):
        gossip.attach(model, optimizer, gossip.NoLoCoConfig)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"config must be one of \[.*\], got dict"):
        gossip.attach(model, optimizer, {"sync_every": 5})  # type: ignore[arg-type]


class _ItemModel(nn.Module):
    """A user's model that vmap cannot run: it reads a value with .item()."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(20, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 0.5 if x.abs().max().item() > 100 else 1.0
        return self.lin(x * scale)


def test_a_model_vmap_cannot_run_trains_node_by_node() -> None:
    """docs/guide/own-task-simulator.md: the model must work under torch.vmap. One that does
    not (.item(), data-dependent control flow) failed at the first round with vmap's own error,
    after the run directory was written; "auto" now trains it node by node, and an explicit
    train_impl='vmap' is refused naming the way out."""
    cfg = {"task": "digits", "algo": "fedavg", "nodes": 3, "rounds": 2, "sync_every": 2,
           "batch_size": 8, "seed": 3}
    auto = Simulation(SimConfig(**cfg), task=_task(_ItemModel))
    loop = Simulation(SimConfig(**cfg, train_impl="loop"), task=_task(_ItemModel))
    assert auto.model.impl == "loop"
    for r in range(2):
        assert auto.run_round(r)["loss_mean"] == loop.run_round(r)["loss_mean"]
    assert torch.equal(auto.flat_params(), loop.flat_params())
    with pytest.raises(ValueError, match=r"train_impl='vmap' cannot run this model under "
                                         r"torch\.vmap \(vmap: .*\.item\(\).*use "
                                         r"train_impl='loop'"):
        Simulation(SimConfig(**cfg, train_impl="vmap"), task=_task(_ItemModel))
    # a model vmap runs keeps vmap (dropout draws under vmap's randomness="different")
    assert Simulation(SimConfig(**cfg), task=_task(_dropout_model)).model.impl == "vmap"


def batchnorm_task(seed: int = 0) -> Task:
    """``--task tests.test_docs_snippets:batchnorm_task``: the user's model with BatchNorm."""
    return _task(_batchnorm_model)


@pytest.mark.slow
def test_the_averaged_model_of_a_batchnorm_run_uses_the_ranks_mean_statistics(tmp_path: Path
                                                                             ) -> None:
    """summary.json's avg_model_loss/accuracy (the 'averaged model' line launch.train prints)
    on two ranks whose BatchNorm statistics differ: the ranks' mean parameters with the mean of
    their statistics (tests/test_redteam3.py checks one rank, where the mean is the rank's own).
    Reference: plain torch on the ranks' final checkpoints."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "launch.train", "--task", "tests.test_docs_snippets:batchnorm_task",
           "--algo", "fedavg", "--steps", "8", "--sync-every", "4", "--checkpoint-every", "8",
           "--out", str(out)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    states = [torch.load(out / "checkpoints" / "step_8" / f"rank_{r}.pt", weights_only=True)
              for r in (0, 1)]
    task = batchnorm_task()
    model = task.make_model(0)
    names = [n for n, _ in model.named_parameters()]
    flat = [torch.cat([t.reshape(-1) for t in s["params"]]).double() for s in states]
    mean = (flat[0] + flat[1]) / 2
    with torch.no_grad():
        offset = 0
        for name in names:
            p = model.get_parameter(name)
            p.copy_(mean[offset:offset + p.numel()].reshape(p.shape))
            offset += p.numel()
        for name in ("1.running_mean", "1.running_var"):
            a, b = (s["buffers"][name].double() for s in states)
            assert not torch.equal(a, b)  # each rank's own statistics
            model.get_buffer(name).copy_((a + b) / 2)
    want = task.evaluate(model.eval())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["avg_model_loss"] == pytest.approx(want["loss"], abs=1e-5)
    assert summary["avg_model_accuracy"] == pytest.approx(want["accuracy"], abs=1e-6)


def test_a_refused_run_leaves_no_empty_run_directory(tmp_path: Path) -> None:
    """errors.md: a refused run writes nothing. launch.train without --out refused after it
    had made its runs/<UTC time> (a bad --optimizer-args, a task that cannot be imported) and
    left it behind holding only the lock, one more for every retry."""
    from gossip.rundir import LOCK_NAME, RunDir

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    proc = subprocess.run([sys.executable, "-m", "launch.train", "--optimizer", "sgd",
                           "--optimizer-args", '{"betas": [0.9, 0.99]}'], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "unexpected keyword argument 'betas'" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no runs/, no runs/<UTC time>/
    # what acquire made goes; what was there stays, and so does a directory with a run's file
    made = RunDir(tmp_path / "a" / "b")
    made.acquire()
    made.release()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "given").mkdir()
    given = RunDir(tmp_path / "given" / "run")
    given.acquire()
    given.release()
    assert list((tmp_path / "given").iterdir()) == []
    (tmp_path / "mine").mkdir()
    with RunDir(tmp_path / "mine"):
        pass
    assert [p.name for p in (tmp_path / "mine").iterdir()] == [LOCK_NAME]
    with RunDir(tmp_path / "wrote") as run:
        (run.path / "config.json").write_text("{}")
    assert sorted(p.name for p in (tmp_path / "wrote").iterdir()) == [LOCK_NAME, "config.json"]
