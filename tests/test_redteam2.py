"""Hostile cases of the second red-team on user tasks, each failing before its fix.

The task functions below are user tasks (``--task tests.test_redteam2:NAME``), as a researcher
would write them with a mistake in them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossip.run import build
from gossip.tasks import Task, TaskData

CALLS: list[int] = []


class FrozenEmbedding(nn.Module):
    """A frozen random projection (requires_grad=False) under a trained head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Linear(4, 8).requires_grad_(False)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.emb(x)))


def _task(**kw: object) -> Task:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, generator=g)
    y = (x[:, 0] > 0).long()
    fields = {"name": "rt2", "data": TaskData(x[:48], y[:48], x[48:], y[48:], num_classes=2,
                                              kind="classification"),
              "model_factory": lambda: nn.Linear(4, 2), "default_lr": 0.1,
              "default_batch_size": 8, **kw}
    return Task(**fields)  # type: ignore[arg-type]


def per_sample_loss(seed: int = 0) -> Task:
    """A loss_fn that forgot the reduction: one loss per sample."""
    return _task(loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"))


def frozen_task(seed: int = 0) -> Task:
    return _task(model_factory=FrozenEmbedding)


def bn_task(seed: int = 0) -> Task:
    """A model with BatchNorm running statistics (the reproduction of a finding outside this
    file's modules: the simulator and launch.train never sync them; gossip.attach does)."""
    return _task(model_factory=lambda: nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8),
                                                     nn.ReLU(), nn.Linear(8, 2)))


def type_error_inside(seed: int = 0) -> Task:
    """A task function with a bug that raises TypeError."""
    CALLS.append(seed)
    return _task(default_lr=None + 1)  # type: ignore[operator]


def test_a_task_function_is_called_once_and_its_own_type_error_shows() -> None:
    """load_task used to catch any TypeError of ``fn(seed=seed)`` and call ``fn()`` again: the
    user's bug ran twice (and a TypeError inside a function taking a seed looked like a
    missing seed parameter)."""
    CALLS.clear()
    with pytest.raises(TypeError, match="NoneType"):
        build.load_task("tests.test_redteam2:type_error_inside", seed=7)
    assert CALLS == [7]


@pytest.mark.parametrize("loss_fn", [
    lambda out, y: F.cross_entropy(out, y, reduction="none"),    # a vector
    lambda out, y: (out.argmax(1) == y).sum(),                   # an integer count
    lambda out, y: [F.cross_entropy(out, y)],                    # not a tensor
])
def test_loss_fn_must_return_a_float_scalar(loss_fn: object) -> None:
    """A per-sample loss used to fail deep in the simulator ('size of tensor a (4) must match
    the size of tensor b (16)') or in backward under torchrun ('grad can be implicitly created
    only for scalar outputs'); an integer loss in backward ('does not require grad')."""
    task = _task(loss_fn=loss_fn)
    out, y = torch.randn(8, 2), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match=r"loss_fn returned .* must return the batch's mean loss"):
        task.loss(out, y)
    with pytest.raises(ValueError, match="loss_fn returned"):  # per node, as the simulator does
        torch.vmap(task.loss)(out.expand(3, 8, 2), y.expand(3, 8))
    good = _task(loss_fn=lambda o, t: F.cross_entropy(o, t))
    torch.testing.assert_close(torch.vmap(good.loss)(out.expand(3, 8, 2), y.expand(3, 8)),
                               F.cross_entropy(out, y).expand(3))


def test_simulator_names_a_per_sample_loss(capsys: pytest.CaptureFixture[str]) -> None:
    from simulations.run import main

    code = main(["--task", "tests.test_redteam2:per_sample_loss", "--algo", "fedavg",
                 "--nodes", "2", "--rounds", "1", "--sync-every", "1", "--no-progress"])
    assert code == 2
    assert "loss_fn returned a torch.float32 tensor of shape (8,)" in capsys.readouterr().err


def test_an_optimizer_that_needs_a_closure_is_refused_before_training() -> None:
    """LBFGS used to pass the config and kill every rank at the first step of launch.train
    ('LBFGS.step() missing 1 required positional argument: closure')."""
    from gossip.run.spec import optimizer_class
    from launch.config import TrainConfig

    with pytest.raises(ValueError, match=r"optimizer='LBFGS' is invalid: expected an optimizer "
                                         r"whose step\(\) needs no closure"):
        optimizer_class("LBFGS")
    with pytest.raises(ValueError, match=r"optimizer='torch\.optim\.LBFGS' is invalid"):
        TrainConfig(optimizer="torch.optim.LBFGS")
    assert optimizer_class("RMSprop") is torch.optim.RMSprop  # closure optional: fine


def test_one_node_gossip_names_the_topology_and_the_node_count() -> None:
    """Gossip under torchrun --nproc-per-node 1 used to say only 'n must be an int >= 2'."""
    from gossip.topology import make_topology

    with pytest.raises(ValueError, match=r"topology 'ring' needs n >= 2 nodes .* got n=1"):
        make_topology("ring", 1)


@pytest.mark.slow
def test_merge_a_simulation_of_a_model_with_frozen_parameters(tmp_path: Path) -> None:
    """A simulation saves only the trained parameters; every merge method used to refuse it
    ('the models lack parameters ['emb.bias', 'emb.weight']'). The merged model takes the
    frozen ones from the task's model at the run's seed, as every simulated node did."""
    from gossip import merge
    from simulations.run import main as sim_main

    run = tmp_path / "frozen"
    assert sim_main(["--task", "tests.test_redteam2:frozen_task", "--algo", "dpsgd", "--nodes",
                     "3", "--rounds", "2", "--sync-every", "2", "--seed", "5", "--out",
                     str(run), "--save-models", "--no-progress"]) == 0
    blob = torch.load(run / "models.pt", weights_only=True)["params"]
    assert set(blob) == {"head.weight", "head.bias"}
    models = merge.load_models([str(run)])
    for method in ("uniform", "fisher", "ties", "dare"):
        result = merge.merge(models, merge.MergeOptions(method=method))
        got = dict(result.model.named_parameters())
        want_emb = frozen_task(5).make_model(5).emb
        assert torch.equal(got["emb.weight"], want_emb.weight), method
        if method == "uniform":
            torch.testing.assert_close(got["head.weight"], blob["head.weight"].mean(0))
