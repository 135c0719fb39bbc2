"""The run layer (gossip.run): one spec and one table of defaults under both CLIs, user tasks,
any element-wise torch optimizer, learning-rate schedules, and the validation it owns."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gossip.run import RunSpec, build
from gossip.run.schedule import lr_factor
from gossip.run.spec import optimizer_class
from gossip.tasks import get_task
from launch.config import TrainConfig
from launch.config import build_parser as train_parser
from simulations.config import SimConfig
from simulations.config import build_parser as sim_parser
from simulations.training import LocalTrainer, StackedModel
from tests.user_task import make_task

torch.set_num_threads(1)


def _actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


# ----------------------------------------------------------------------------- one spec


def test_both_clis_share_every_run_flag_with_the_same_defaults() -> None:
    train, sim = _actions(train_parser()), _actions(sim_parser())
    shared = {f.name for f in dataclasses.fields(RunSpec)} | {"config"}
    assert shared <= set(train) and shared <= set(sim)
    for name in sorted(shared):
        a, b = train[name], sim[name]
        assert (a.option_strings, a.type, a.help, type(a)) == \
            (b.option_strings, b.type, b.help, type(b)), name
    defaults_t, defaults_s = TrainConfig(), SimConfig()
    for f in dataclasses.fields(RunSpec):
        assert getattr(defaults_t, f.name) == getattr(defaults_s, f.name), f.name
    # the flags that are not shared are the executor's own
    assert set(train) - shared == {
        "steps", "out", "backend", "device", "timeout", "eval_every", "checkpoint_every",
        "resume", "resume_override", "survive_failures", "dead_after", "keep_checkpoints"}
    # two algorithms' betas (and gammas) have distinct flags
    assert {"noloco_beta", "gossip_beta"} <= shared and "beta" not in shared
    assert {"noloco_gamma", "choco_gamma"} <= shared and "gamma" not in shared
    assert {"compress", "error_feedback"} <= shared  # every algorithm's


@pytest.mark.parametrize("algo", ["fedavg", "diloco", "noloco", "dpsgd", "gossip-vc", "choco"])
@pytest.mark.parametrize("nodes", [4, 16])
def test_one_table_of_defaults_for_both_executors(algo: str, nodes: int) -> None:
    task = get_task("digits")
    real = TrainConfig(algo=algo).resolved(task, nodes)
    sim = SimConfig(algo=algo, nodes=nodes).resolved(task)
    for f in dataclasses.fields(RunSpec):
        assert getattr(real, f.name) == getattr(sim, f.name), (algo, f.name)
    assert real.algorithm_config() == sim.algorithm_config()
    # the defaults never make a run that does not sync (H <= the default 300 steps)
    assert real.sync_every is not None and real.sync_every <= real.steps


def test_sim_h_is_sync_every_or_local_epochs_not_both() -> None:
    with pytest.raises(ValueError, match=r"local_epochs=2.*sync_every=5"):
        SimConfig(sync_every=5, local_epochs=2)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("cls", "fields", "name"), [
    (TrainConfig, {"lr": math.inf}, "lr"),
    (SimConfig, {"lr": math.nan}, "lr"),
    (TrainConfig, {"timeout": math.inf}, "timeout"),
    (TrainConfig, {"timeout": 1e-6}, "timeout"),
    (TrainConfig, {"dead_after": math.inf}, "dead_after"),
    (SimConfig, {"latency": math.inf}, "latency"),
    (SimConfig, {"bandwidth": math.inf}, "bandwidth"),
    (TrainConfig, {"grad_clip": math.inf}, "grad_clip"),
    (TrainConfig, {"algo": "diloco", "outer_lr": math.inf}, "outer_lr"),
    (TrainConfig, {"optimizer": "nosuch"}, "optimizer"),
    (TrainConfig, {"optimizer": "torch.nn.Linear"}, "optimizer"),
    (TrainConfig, {"optimizer_args": "[1]"}, "optimizer_args"),
    (TrainConfig, {"optimizer_args": "{alpha"}, "optimizer_args"),
    (TrainConfig, {"schedule": "step"}, "schedule"),
    (TrainConfig, {"warmup_steps": 5}, "warmup_steps"),
    (TrainConfig, {"task": "nomodule"}, "task"),
])
def test_bad_values_name_the_field(cls: type, fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"\b{name}="):
        cls(**fields)


def test_a_run_that_would_never_sync_is_an_error_naming_both_values() -> None:
    with pytest.raises(ValueError, match=r"sync_every=500.*steps=50"):
        TrainConfig(sync_every=500, steps=50)
    with pytest.raises(ValueError, match=r"sync_every=50.*steps=20"):
        TrainConfig(algo="diloco", steps=20)  # its default H
    assert TrainConfig(algo="diloco").algorithm_config().sync_every == 50


def test_out_is_checked_before_any_process_group(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from launch.train import main

    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SystemExit) as info:
            main(["--out", str(out), "--steps", "10"])
        assert info.value.code == 2
        assert f"out={str(out)!r}" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not __import__("os").access(locked, __import__("os").W_OK):  # root writes anywhere
        with pytest.raises(SystemExit):
            main(["--out", str(locked / "run"), "--steps", "10"])


def test_default_out_is_a_new_timestamped_directory_under_runs() -> None:
    from launch.config import default_out

    a, b = default_out(), default_out()
    assert Path(a).parent == Path("runs") and a != b
    assert TrainConfig().out is None  # chosen once, by rank 0, when the run starts


# ----------------------------------------------------------------------------- user tasks


def test_task_by_import_path_and_builtins_as_functions() -> None:
    task = build.load_task("tests.user_task:make_task", seed=3)
    assert task.name == "blobs" and task.loss_fn is not None
    out, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    want = torch.nn.functional.cross_entropy(out, y, label_smoothing=0.1)
    torch.testing.assert_close(task.loss(out, y), want)
    assert build.task_source("digits") == "gossip.tasks:digits"
    via_path = build.load_task("gossip.tasks:digits", seed=1)
    torch.testing.assert_close(via_path.data.x_train, get_task("digits", seed=1).data.x_train)
    for bad in ("tests.user_task:nothing", "no_such_module:f", "tests.user_task:torch"):
        with pytest.raises(ValueError, match="task="):
            build.load_task(bad, seed=0)


def test_simulator_runs_a_user_task_with_its_loss(tmp_path: Path) -> None:
    from simulations.run import main

    out = tmp_path / "sim"
    assert main(["--task", "tests.user_task:make_task", "--algo", "gossip-vc", "--nodes", "4",
                 "--rounds", "3", "--sync-every", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "config.json").read_text())
    assert (summary["task"], summary["task_source"]) == ("blobs", "tests.user_task:make_task")
    assert (config["task_name"], config["task_source"]) == ("blobs", "tests.user_task:make_task")


def test_simulated_user_loss_equals_the_loss_of_each_separate_model() -> None:
    task = make_task(0)
    model = StackedModel(task, range(3), seed=0, same_init=False)
    x = task.data.x_train[:24].view(3, 8, 8)
    y = task.data.y_train[:24].view(3, 8)
    got = model.node_losses(x, y)
    for i in range(3):
        ref = task.make_model(i)
        torch.testing.assert_close(got[i], task.loss(ref(x[i]), y[i]), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- optimizers


def test_optimizer_by_name_or_path_with_arguments() -> None:
    assert optimizer_class("adamw") is torch.optim.AdamW
    assert optimizer_class("RMSprop") is torch.optim.RMSprop
    assert optimizer_class("torch.optim.RMSprop") is torch.optim.RMSprop
    assert optimizer_class("torch.optim:Adagrad") is torch.optim.Adagrad
    spec = TrainConfig(optimizer="torch.optim.RMSprop", optimizer_args='{"alpha": 0.9}',
                       lr=0.01).resolved(get_task("digits"), 2)
    opt = build.make_optimizer(spec, nn.Linear(2, 2).parameters())
    assert isinstance(opt, torch.optim.RMSprop)
    assert (opt.defaults["alpha"], opt.defaults["lr"]) == (0.9, 0.01)
    bad = TrainConfig(optimizer="sgd", optimizer_args='{"betas": [0.9, 0.99]}')
    with pytest.raises(ValueError, match="optimizer='sgd'"):
        build.make_optimizer(bad.resolved(get_task("digits"), 2), nn.Linear(2, 2).parameters())


def _separate(task: Any, n: int, steps: int, masks: list[torch.Tensor], make_opt: Any,
              make_sched: Any | None, idx: list[torch.Tensor]) -> list[nn.Module]:
    """Reference: n separate models, each with its own torch optimizer (and LRScheduler)
    stepped only on its own steps."""
    models = [task.make_model(i) for i in range(n)]
    opts = [make_opt(m.parameters()) for m in models]
    scheds = [make_sched(o) for o in opts] if make_sched else []
    for s in range(steps):
        for i in range(n):
            if not masks[s][i]:
                continue
            loss = task.loss(models[i](task.data.x_train[idx[s][i]]),
                             task.data.y_train[idx[s][i]])
            opts[i].zero_grad()
            loss.backward()
            opts[i].step()
            if scheds:
                scheds[i].step()
    return models


def _stacked(task: Any, n: int, steps: int, masks: list[torch.Tensor], optimizer: str,
             kw: dict[str, Any], idx: list[torch.Tensor], schedule: str | None = None,
             total: int = 0) -> StackedModel:
    model = StackedModel(task, range(n), seed=0, same_init=False)
    trainer = LocalTrainer(model, task.data.x_train, task.data.y_train, optimizer=optimizer,
                           lr=kw["lr"], extra={k: v for k, v in kw.items() if k != "lr"})
    taken = torch.zeros(n, dtype=torch.long)
    for s in range(steps):
        lr = None
        if schedule is not None:
            lr = torch.tensor([kw["lr"] * lr_factor(schedule, int(t), total) for t in taken],
                              dtype=torch.float64)
        trainer.step(idx[s], masks[s], lr)
        taken += masks[s]
    return model


def _plan(n: int, steps: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    masks = [torch.rand(n, generator=g) < 0.7 for _ in range(steps)]
    idx = [torch.randint(0, 400, (n, 8), generator=g) for _ in range(steps)]
    return masks, idx


def _assert_same(model: StackedModel, refs: list[nn.Module], atol: float) -> None:
    for i, ref in enumerate(refs):
        for name, p in ref.named_parameters():
            torch.testing.assert_close(model.params[name][i], p.detach(), atol=atol, rtol=1e-5,
                                       msg=lambda m, i=i, name=name: f"node {i} {name}: {m}")


@pytest.mark.parametrize(("name", "cls", "kw"), [
    ("RMSprop", torch.optim.RMSprop, {"lr": 3e-3, "alpha": 0.9, "momentum": 0.5}),
    ("torch.optim.Adagrad", torch.optim.Adagrad, {"lr": 0.05}),
])
def test_a_non_builtin_optimizer_simulated_equals_separate_models(name: str, cls: type,
                                                                  kw: dict[str, Any]) -> None:
    task, n, steps = make_task(0), 4, 8
    masks, idx = _plan(n, steps)
    refs = _separate(task, n, steps, masks, lambda p: cls(p, **kw), None, idx)
    _assert_same(_stacked(task, n, steps, masks, name, kw, idx), refs, atol=2e-5)


def test_optimizers_that_are_not_elementwise_are_refused() -> None:
    task = make_task(0)
    model = StackedModel(task, range(2), seed=0, same_init=False)
    for name in ("Adamax", "NAdam"):
        with pytest.raises(ValueError, match=f"optimizer={name!r} is not supported"):
            LocalTrainer(model, task.data.x_train, task.data.y_train, optimizer=name, lr=0.1)
    with pytest.raises(ValueError, match=r"optimizer='LBFGS' is invalid: .* needs no closure"):
        LocalTrainer(model, task.data.x_train, task.data.y_train, optimizer="LBFGS", lr=0.1)
    with pytest.raises(ValueError, match="amsgrad"):
        LocalTrainer(model, task.data.x_train, task.data.y_train, optimizer="adam", lr=0.1,
                     extra={"amsgrad": True})


# ----------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(("schedule", "warmup"), [
    ("cosine", 0), ("warmup", 4), ("warmup-cosine", 4), ("constant", 0)])
def test_schedule_is_its_closed_form_and_torchs_scheduler(schedule: str, warmup: int) -> None:
    total, lr = 20, 0.1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    LR = torch.optim.lr_scheduler
    if schedule == "cosine":
        sched: Any = LR.CosineAnnealingLR(opt, T_max=total)
    elif schedule == "warmup":
        sched = LR.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1)
    elif schedule == "warmup-cosine":
        sched = LR.SequentialLR(opt, [
            LR.LinearLR(opt, start_factor=1 / warmup, total_iters=warmup - 1),
            LR.CosineAnnealingLR(opt, T_max=total - warmup)], milestones=[warmup])
    else:
        sched = LR.ConstantLR(opt, factor=1.0)
    for t in range(total):
        closed = {"cosine": (1 + math.cos(math.pi * t / total)) / 2,
                  "warmup": min(1.0, (t + 1) / max(warmup, 1)),
                  "warmup-cosine": (t + 1) / warmup if t < warmup else
                  (1 + math.cos(math.pi * (t - warmup) / (total - warmup))) / 2,
                  "constant": 1.0}[schedule]
        assert lr_factor(schedule, t, total, warmup) == pytest.approx(closed, abs=1e-12)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr * closed, abs=1e-9), t
        opt.step()
        sched.step()


def test_simulated_per_node_schedule_equals_a_torch_scheduler_per_model() -> None:
    """Nodes skip steps (masks), so each is at its own point of the cosine schedule."""
    task, n, steps, total = make_task(1), 4, 10, 10
    masks, idx = _plan(n, steps, seed=1)
    kw = {"lr": 0.2}
    refs = _separate(task, n, steps, masks, lambda p: torch.optim.SGD(p, lr=0.2),
                     lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total), idx)
    got = _stacked(task, n, steps, masks, "sgd", kw, idx, schedule="cosine", total=total)
    _assert_same(got, refs, atol=1e-6)
    constant = _stacked(task, n, steps, masks, "sgd", kw, idx)
    assert not torch.allclose(constant.params["0.weight"], got.params["0.weight"])


# ----------------------------------------------------------------------------- the protocol


def test_every_algorithm_declares_what_the_engine_reads() -> None:
    """The simulator reads only what the Algorithm protocol declares; each algorithm's state
    rows are exactly its per-node tensors [L, ...] (checked on a 4-node simulation)."""
    import inspect

    from gossip.algorithms import ALGORITHMS, Algorithm
    from simulations.engine import Simulation

    declared = {n for n in dir(Algorithm) if not n.startswith("_")} | set(
        Algorithm.__annotations__)
    assert declared >= {"step", "sampled", "state_rows", "state_dict", "load_state_dict",
                        "global_model", "same_init", "needs_topology"}
    source = inspect.getsource(Simulation)
    used = set(__import__("re").findall(r"self\.algorithm\.(\w+)", source))
    assert used and used <= declared, used - declared
    for algo in ALGORITHMS:
        sim = Simulation(SimConfig(algo=algo, nodes=4, rounds=1, sync_every=2))
        sim.run_round(0)  # lazily created state exists now
        rows = sim.algorithm.state_rows()
        assert all(t.shape[0] == 4 for t in rows), algo
        buffers = len(list(sim.model.flat.buffers()))
        # fedavg and the gossip family keep nothing per node but the model rows; noloco keeps
        # phi and delta, diloco phi and the outer momentum, choco x_hat and s, one per buffer
        assert len(rows) == (2 * buffers if algo in ("noloco", "diloco", "choco") else 0), algo


# ----------------------------------------------------------------------------- Dataset data


class _Items(torch.utils.data.Dataset):
    """(x, y) items read one at a time, as from files."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i].clone(), self.y[i].clone()


def _as_datasets(task: Any) -> Any:
    from gossip.tasks import DatasetData

    d = task.data
    data = DatasetData(_Items(d.x_train, d.y_train), _Items(d.x_test, d.y_test),
                       num_classes=d.num_classes, kind=d.kind, train_labels=d.y_train)
    return dataclasses.replace(task, data=data)


def test_dataset_data_gives_the_same_batches_shards_and_simulation() -> None:
    from launch.rank import ShardStream, test_set

    task = make_task(2)
    ds_task = _as_datasets(task)
    spec = TrainConfig(partition="dirichlet:0.5").resolved(task, 3)
    shards = build.make_shards(spec, task, 3)
    for a, b in zip(shards, build.make_shards(spec, ds_task, 3), strict=True):
        assert list(a) == list(b)
    cpu = torch.device("cpu")
    one = ShardStream(task, shards[1], 8, seed=0, node=1, device=cpu)
    two = ShardStream(ds_task, shards[1], 8, seed=0, node=1, device=cpu)
    for _ in range(3):
        for u, v in zip(one.next(), two.next(), strict=True):
            assert torch.equal(u, v)
    for u, v in zip(test_set(task, cpu), test_set(ds_task, cpu), strict=True):
        assert torch.equal(u, v)
    model = task.make_model(0)
    assert ds_task.evaluate(model) == task.evaluate(model)

    from simulations.engine import Simulation, drive

    cfg = SimConfig(nodes=4, rounds=2, sync_every=3, algo="noloco")
    a = drive(Simulation(cfg, task=task), out=None, progress=False)
    b = drive(Simulation(cfg, task=ds_task), out=None, progress=False)
    assert a["records"][-1]["loss_mean"] == b["records"][-1]["loss_mean"]



def test_a_label_split_of_dataset_data_without_labels_is_refused_on_real_ranks_only() -> None:
    """A real rank reads only its batches, so ``dirichlet`` needs ``train_labels`` (refused
    naming the field, ``iid`` accepted); the simulator holds the data and splits it by its
    labels: the shards the labelled data gives."""
    task = make_task(2)
    bare = _as_datasets(task)
    bare = dataclasses.replace(bare, data=dataclasses.replace(bare.data, train_labels=None))
    spec = TrainConfig(partition="dirichlet:0.5").resolved(task, 3)
    with pytest.raises(ValueError, match=r"partition='dirichlet:0.5' is invalid .*has no "
                                         r"train_labels: give DatasetData\(train_labels="):
        build.make_shards(spec, bare, 3)
    assert len(build.make_shards(TrainConfig(partition="iid").resolved(task, 3), bare, 3)) == 3

    from simulations.engine import Simulation

    cfg = SimConfig(nodes=3, rounds=1, partition="dirichlet:0.5")
    want = build.make_shards(cfg.resolved(task), task, 3)
    got = Simulation(cfg, task=bare).shards
    assert [list(s) for s in got] == [list(s) for s in want]


def _frozen_first_layer() -> nn.Module:
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    model[0].requires_grad_(False)  # e.g. a frozen embedding
    return model


def test_frozen_parameters_are_the_runs_one_set_on_every_node() -> None:
    """Independent inits differ in what trains, never in what is frozen: the frozen layer is
    the model's at the run's seed on every node, real (node_model) or simulated in any shard
    (as the Ray backend splits them); with one shared start everything is that model."""
    task = dataclasses.replace(make_task(0), model_factory=_frozen_first_layer)
    want = task.make_model(7)
    models = [build.node_model(task, 7, node, same_init=False) for node in range(4)]
    for m in models:
        assert torch.equal(m[0].weight, want[0].weight) and torch.equal(m[0].bias, want[0].bias)
    assert not torch.equal(models[1][2].weight, models[2][2].weight)  # trainable: own inits
    assert torch.equal(models[2][2].weight, task.make_model(9)[2].weight)  # seed + node
    shared = [build.node_model(task, 7, node, same_init=True) for node in range(2)]
    for a, b in zip(shared[0].state_dict().values(), shared[1].state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    shards = [StackedModel(task, nodes, seed=7, same_init=False) for nodes in ([0, 1], [2, 3])]
    for shard in shards:
        assert torch.equal(shard.base[0].weight, want[0].weight)
    assert torch.equal(shards[1].params["2.weight"][0], models[2][2].weight)


def test_a_warm_up_as_long_as_the_run_is_refused(tmp_path: Path) -> None:
    """The warm-up would never end: refused by name, before anything is written."""
    with pytest.raises(ValueError, match=r"warmup_steps=10 is invalid: expected fewer than "
                                         r"steps=10 \(the warm-up would never end\)"):
        TrainConfig(steps=10, schedule="warmup-cosine", warmup_steps=10)
    TrainConfig(steps=11, schedule="warmup-cosine", warmup_steps=10)
    from simulations.run import run

    out = tmp_path / "sim"
    cfg = SimConfig(task="digits", nodes=4, rounds=2, sync_every=5, schedule="warmup",
                    warmup_steps=10, out=str(out))
    with pytest.raises(ValueError, match=r"warmup_steps=10 is invalid: expected fewer than the "
                                         r"run's 10 local steps \(2 rounds of 5"):
        run(cfg)
    assert not out.exists()
