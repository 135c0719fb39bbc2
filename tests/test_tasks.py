"""Tests for the built-in tasks in gossip.tasks."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state

from gossip.batching import node_batch
from gossip.tasks import TASK_NAMES, Task, TaskData, get_task


@pytest.fixture(scope="module")
def tasks() -> dict[str, Task]:
    return {name: get_task(name, seed=0) for name in TASK_NAMES}


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_builds_fast(name: str) -> None:
    get_task(name)  # warm imports / file cache
    start = time.perf_counter()
    task = get_task(name, seed=1)
    assert time.perf_counter() - start < 1.0
    data = task.data
    assert task.name == name
    assert data.kind in ("classification", "regression", "lm")
    assert len(data.x_train) == len(data.y_train) > 0
    assert len(data.x_test) == len(data.y_test) > 0
    assert task.default_lr > 0
    assert task.default_batch_size > 0
    assert task.default_optimizer in ("sgd", "adam")


def test_digits_data(tasks: dict[str, Task]) -> None:
    data = tasks["digits"].data
    assert data.kind == "classification"
    assert data.num_classes == 10
    assert data.x_train.shape[1] == 64
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.x_test) == pytest.approx(0.2 * 1797, abs=10)
    assert data.x_train.dtype == torch.float32 and data.y_train.dtype == torch.int64
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    assert set(data.y_test.tolist()) == set(range(10))  # stratified
    # Same split for the same seed, different split for another seed.
    assert torch.equal(get_task("digits", seed=0).data.y_test, data.y_test)
    assert not torch.equal(get_task("digits", seed=1).data.x_test, data.x_test)


def test_digits_matches_sklearn_loader(tasks: dict[str, Task]) -> None:
    from sklearn.datasets import load_digits

    from gossip.tasks import _load_digits_arrays

    x, y = load_digits(return_X_y=True)
    ours_x, ours_y = _load_digits_arrays()
    assert np.array_equal(ours_x, x)
    assert np.array_equal(ours_y, y)
    data = tasks["digits"].data
    both = torch.cat([data.x_train, data.x_test]).double() * 16
    assert torch.allclose(both.sum(0), torch.from_numpy(x).sum(0))
    assert np.array_equal(
        np.bincount(torch.cat([data.y_train, data.y_test]).numpy()), np.bincount(y)
    )


@pytest.mark.parametrize(
    ("name", "out_shape"),
    [("digits", (5, 10)), ("synthetic", (5, 1))],
)
def test_forward_shapes(tasks: dict[str, Task], name: str, out_shape: tuple[int, ...]) -> None:
    task = tasks[name]
    model = task.make_model(0)
    x, y = task.data.x_train[:5], task.data.y_train[:5]
    out = model(x)
    assert tuple(out.shape) == out_shape
    loss = task.loss(out, y)
    assert loss.ndim == 0 and torch.isfinite(loss)


def test_charlm_forward_shapes(tasks: dict[str, Task]) -> None:
    task = tasks["charlm"]
    data = task.data
    vocab = task.extra["vocab"]
    assert data.kind == "lm"
    assert data.num_classes == len(vocab)
    assert vocab == "".join(sorted(vocab)) and "?" in vocab and "\n" in vocab
    assert data.x_train.shape[1] == 32 and data.x_train.dtype == torch.int64
    # y is x shifted by one character.
    assert torch.equal(data.x_train[:, 1:], data.y_train[:, :-1])
    assert torch.equal(data.y_train[:-1, -1], data.x_train[1:, 0])
    model = task.make_model(0)
    out = model(data.x_train[:4])
    assert tuple(out.shape) == (4, 32, len(vocab))
    assert tuple(model(data.x_train[:2, :7]).shape) == (2, 7, len(vocab))
    metrics = task.metrics(out, data.y_train[:4])
    assert set(metrics) == {"loss", "accuracy"}
    assert metrics["loss"] == pytest.approx(np.log(len(vocab)), rel=0.1)  # near-uniform init


def test_charlm_is_causal(tasks: dict[str, Task]) -> None:
    model = tasks["charlm"].make_model(0)
    x = tasks["charlm"].data.x_train[:2].clone()
    base = model(x)
    x[:, 20:] = 0
    changed = model(x)
    assert torch.allclose(base[:, :20], changed[:, :20], atol=1e-6)
    assert not torch.allclose(base[:, 20:], changed[:, 20:])


def test_charlm_options_and_custom_text() -> None:
    task = get_task("charlm", context=8, max_chars=5000)
    assert task.data.x_train.shape[1] == 8
    total_windows = len(task.data.x_train) + len(task.data.x_test)
    assert total_windows == pytest.approx(5000 / 8, abs=3)
    assert len(task.data.x_test) == pytest.approx(0.1 * 5000 / 8, abs=2)
    small = get_task("charlm", context=4, text="héllo wörld\tabc\n" * 20, d_model=16, n_heads=4)
    assert "é" not in small.extra["vocab"] and "\t" not in small.extra["vocab"]
    assert small.make_model(0)(small.data.x_test).shape[-1] == len(small.extra["vocab"])
    with pytest.raises(ValueError, match="max_chars=10"):
        get_task("charlm", context=32, max_chars=10)


def test_synthetic_least_squares_near_optimum(tasks: dict[str, Task]) -> None:
    task = tasks["synthetic"]
    data = task.data
    assert data.kind == "regression" and data.num_classes is None
    assert tuple(data.x_train.shape) == (4000, 20) and tuple(data.y_train.shape) == (4000, 1)
    assert tuple(data.x_test.shape) == (1000, 20) and tuple(data.y_test.shape) == (1000, 1)
    assert task.optimum is not None and tuple(task.optimum.shape) == (20,)
    solution = torch.linalg.lstsq(data.x_train, data.y_train).solution.squeeze(1)
    assert torch.allclose(solution, task.optimum, atol=0.01)
    residual = data.y_test - data.x_test @ task.optimum.unsqueeze(1)
    assert float(residual.pow(2).mean()) == pytest.approx(0.01, rel=0.2)  # noise 0.1
    assert "accuracy" not in task.metrics(data.y_test, data.y_test)
    other = get_task("synthetic", seed=1)
    assert not torch.equal(other.optimum, task.optimum)
    assert torch.equal(get_task("synthetic", seed=0).optimum, task.optimum)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_same_seed_same_init(tasks: dict[str, Task], name: str) -> None:
    task = tasks[name]
    state = torch.random.get_rng_state()
    a, b, c = task.make_model(7), task.make_model(7), task.make_model(8)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert _params_equal(a, b)
    assert not _params_equal(a, c)


def test_digits_sgd_reaches_90_percent(tasks: dict[str, Task]) -> None:
    # Default lr/batch: ~600 steps reach 90%, 1500 steps (~17 epochs, ~0.5 s) about 94%.
    task = tasks["digits"]
    model = task.make_model(0)
    opt = torch.optim.SGD(model.parameters(), lr=task.default_lr)
    idx = np.arange(task.data.num_train)
    for step in range(1500):
        batch = torch.from_numpy(node_batch(idx, task.default_batch_size, seed=0, node=0,
                                            step=step))
        opt.zero_grad()
        task.loss(model(task.data.x_train[batch]), task.data.y_train[batch]).backward()
        opt.step()
    metrics = task.evaluate(model)
    assert metrics["accuracy"] > 0.9
    assert metrics["loss"] < task.evaluate(task.make_model(0))["loss"] / 5


def test_charlm_vmap_functional_call(tasks: dict[str, Task]) -> None:
    task = tasks["charlm"]
    models = [task.make_model(s) for s in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor):
        return functional_call(base, (p, b), (x,))

    x = task.data.x_train[:4]
    batched = torch.vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    assert tuple(batched.shape) == (3, 4, 32, task.data.num_classes)
    for i, model in enumerate(models):
        assert torch.allclose(batched[i], model(x), atol=1e-5)
    # Different inputs per copy, and gradients through the vmapped loss.
    xs = task.data.x_train[:12].reshape(3, 4, 32)
    ys = task.data.y_train[:12].reshape(3, 4, 32)

    def loss_fn(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x, y):
        return task.loss(functional_call(base, (p, b), (x,)), y)

    grads = torch.vmap(torch.func.grad(loss_fn), in_dims=(0, 0, 0, 0))(params, buffers, xs, ys)
    for i, model in enumerate(models):
        model.zero_grad()
        task.loss(model(xs[i]), ys[i]).backward()
        for name, param in model.named_parameters():
            assert torch.allclose(grads[name][i], param.grad, atol=1e-5), name


def test_get_task_errors() -> None:
    with pytest.raises(ValueError, match=r"'mnist'.*digits.*charlm.*synthetic"):
        get_task("mnist")
    with pytest.raises(ValueError, match="'widht'"):
        get_task("digits", widht=3)
    with pytest.raises(ValueError, match="seed=-1"):
        get_task("digits", seed=-1)
    with pytest.raises(ValueError, match="context=0"):
        get_task("charlm", context=0)
    with pytest.raises(ValueError, match="kind"):
        TaskData(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), None, "other")


def test_task_data_refuses_bad_labels_and_non_finite_samples() -> None:
    """Labels outside [0, num_classes) and float class labels used to fail at the first batch
    deep in the loss ('Target 5 is out of bounds', 'expected target dtype to be Long'); a NaN
    sample trained silently until a batch drew it."""
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])

    def make(**kw: object) -> TaskData:
        fields = {"x_train": x, "y_train": y, "x_test": x, "y_test": y, "num_classes": 2,
                  "kind": "classification", **kw}
        return TaskData(**fields)  # type: ignore[arg-type]

    make()
    with pytest.raises(ValueError, match=r"y_train holds class 5, outside \[0, num_classes=2\)"):
        make(y_train=torch.tensor([0, 1, 5, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"y_test holds class -1"):
        make(y_test=torch.tensor([0, 1, -1, 1, 0, 1]))
    with pytest.raises(ValueError, match=r"y_train must hold integer class ids .* torch.float32"):
        make(y_train=y.float())
    bad = x.clone()
    bad[4, 1] = float("inf")
    with pytest.raises(ValueError, match=r"x_train\[4\] holds a non-finite value"):
        make(x_train=bad)
    with pytest.raises(ValueError, match=r"y_test\[2\] holds a non-finite value"):
        TaskData(x, x, x, torch.tensor([[0.0], [1.0], [float("nan")], [0.0], [1.0], [0.0]]),
                 num_classes=None, kind="regression")
