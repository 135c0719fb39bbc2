"""Vectorized local training equals N separately trained nn.Modules with their own torch.optim."""

from __future__ import annotations

import dataclasses
from itertools import pairwise

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gossip.batching import node_batch
from gossip.data import partition
from gossip.tasks import Task, get_task
from simulations.training import (
    LocalTrainer,
    RowAdam,
    StackedModel,
    choose_impl,
    clip_rows_,
    mlp_plan,
)

torch.set_num_threads(1)  # small kernels: threads only add overhead (and xdist runs 2)

N, B, SEED = 4, 8, 3


@pytest.fixture(scope="module")
def digits() -> Task:
    return get_task("digits", seed=0)


def _shards(task: Task, n: int = N) -> list[np.ndarray]:
    if task.data.kind != "classification":
        return partition("iid", None, n, num_samples=task.data.num_train, seed=SEED)
    return partition("dirichlet:0.5", task.data.y_train, n, seed=SEED)


def _reference(task: Task, n: int, steps: int, masks: list[torch.Tensor], opt: str,
               *, clip: float | None = None, same_init: bool = False, **kw):
    """N plain modules with their own torch.optim; a node whose mask is False skips the step."""
    shards = _shards(task, n)
    models = [task.make_model(SEED if same_init else SEED + i) for i in range(n)]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt]
    opts = [cls(m.parameters(), **kw) for m in models]
    local = [0] * n
    for s in range(steps):
        for i in range(n):
            if not masks[s][i]:
                continue
            idx = torch.from_numpy(node_batch(shards[i], B, seed=SEED, node=i, step=local[i]))
            loss = task.loss(models[i](task.data.x_train[idx]), task.data.y_train[idx])
            opts[i].zero_grad()
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(models[i].parameters(), clip)
            opts[i].step()
            local[i] += 1
    return models, opts


def _stacked(task: Task, n: int, steps: int, masks: list[torch.Tensor], opt: str, *,
             impl: str = "auto", clip: float | None = None, same_init: bool = False, lr: float,
             momentum: float = 0.0, weight_decay: float | None = None):
    from gossip.batching import StackedBatches

    shards = _shards(task, n)
    model = StackedModel(task, range(n), seed=SEED, same_init=same_init, impl=impl)
    trainer = LocalTrainer(model, task.data.x_train, task.data.y_train, optimizer=opt, lr=lr,
                           momentum=momentum, weight_decay=weight_decay, grad_clip=clip)
    batches = StackedBatches(shards, list(range(n)), B, seed=SEED)
    local = torch.zeros(n, dtype=torch.long)
    for s in range(steps):
        trainer.step(batches.batch(local), masks[s])
        local += masks[s]
    return model, trainer


def _assert_rows_match(model: StackedModel, refs: list[nn.Module], atol: float = 1e-6) -> None:
    for i, ref in enumerate(refs):
        for name, p in ref.named_parameters():
            torch.testing.assert_close(model.params[name][i], p.detach(), atol=atol, rtol=1e-5,
                                       msg=lambda m, i=i, name=name: f"node {i} {name}: {m}")


def _masks(steps: int, n: int, seed: int = 0, p: float = 0.6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=g) < p for _ in range(steps)]


ALL = [torch.ones(N, dtype=torch.bool)] * 6


@pytest.mark.parametrize(("opt", "kw"), [
    ("sgd", {"lr": 0.05}),
    ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    ("adam", {"lr": 3e-3}),
    ("adamw", {"lr": 3e-3, "weight_decay": 0.05}),
])
def test_stacked_equals_separate_models(digits: Task, opt: str, kw: dict) -> None:
    refs, _ = _reference(digits, N, 6, ALL, opt, **kw)
    model, _ = _stacked(digits, N, 6, ALL, opt, **kw)
    assert model.impl == "matmul"
    # Adam divides by sqrt(v): rounding differences of batched vs per-model matmuls in
    # near-zero gradients grow to ~1e-6 (lr 3e-3); SGD stays at float32 rounding.
    _assert_rows_match(model, refs, atol=1e-6 if opt == "sgd" else 1e-5)


@pytest.mark.parametrize(("opt", "kw"), [
    ("sgd", {"lr": 0.05, "momentum": 0.9}),
    ("adam", {"lr": 3e-3}),
])
def test_masked_nodes_skip_steps_like_separate_models(digits: Task, opt: str, kw: dict) -> None:
    # Adam's bias correction must follow each node's own step count.
    masks = _masks(8, N)
    masks[0][1] = False  # node 1 idles on the very first step (lazy optimizer state)
    refs, ref_opts = _reference(digits, N, 8, masks, opt, **kw)
    model, trainer = _stacked(digits, N, 8, masks, opt, **kw)
    _assert_rows_match(model, refs, atol=1e-6 if opt == "sgd" else 1e-5)
    if opt == "adam":
        steps = trainer.optimizer.state[model.params["0.weight"]]["step"]
        expected = torch.stack(masks).sum(0).float()
        assert torch.equal(steps, expected)
        for i in range(N):
            ref_state = ref_opts[i].state[refs[i][0].weight]
            torch.testing.assert_close(
                trainer.optimizer.state[model.params["0.weight"]]["exp_avg_sq"][i],
                ref_state["exp_avg_sq"], atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_idle_rows_are_untouched_bit_for_bit(digits: Task, opt: str) -> None:
    _, trainer = _stacked(digits, N, 3, ALL[:3], opt, lr=0.01,
                              momentum=0.9 if opt == "sgd" else 0.0)
    before = [t.detach().clone() for t in trainer.state_tensors()]
    active = torch.tensor([True, False, True, False])
    idx = torch.randint(0, digits.data.num_train, (N, B), generator=torch.Generator()
                        .manual_seed(1))
    trainer.step(idx, active)
    after = trainer.state_tensors()
    assert len(before) == len(after) >= 3
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[~active], a[~active])
    assert not torch.equal(before[0][active], after[0][active])


def test_grad_clip_is_per_node(digits: Task) -> None:
    refs, _ = _reference(digits, N, 4, ALL, "sgd", lr=0.5, clip=0.05)
    model, _ = _stacked(digits, N, 4, ALL, "sgd", lr=0.5, clip=0.05)
    _assert_rows_match(model, refs)


def test_clip_rows_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 4, 5, generator=g), torch.randn(3, 7, generator=g)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * torch.tensor([0.01, 1.0, 10.0]).view(
            (3,) + (1,) * (p.dim() - 1))
    expected = []
    for i in range(3):
        rows = [p[i].clone() for p in params]
        for row, p in zip(rows, params, strict=True):
            row.grad = p.grad[i].clone()
        torch.nn.utils.clip_grad_norm_(rows, 1.0)
        expected.append([row.grad for row in rows])
    clip_rows_(params, 1.0)
    for i in range(3):
        for p, e in zip(params, expected[i], strict=True):
            torch.testing.assert_close(p.grad[i], e)


def test_matmul_equals_vmap_path(digits: Task) -> None:
    masks = _masks(5, N, seed=2)
    a, _ = _stacked(digits, N, 5, masks, "adam", impl="matmul", lr=3e-3)
    b, _ = _stacked(digits, N, 5, masks, "adam", impl="vmap", lr=3e-3)
    assert (a.impl, b.impl) == ("matmul", "vmap")
    for name in a.params:
        torch.testing.assert_close(a.params[name], b.params[name], atol=1e-5, rtol=1e-5)
    la, aa = a.evaluate(digits.data.x_test, digits.data.y_test)
    lb, ab = b.evaluate(digits.data.x_test, digits.data.y_test)
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert aa is not None and ab is not None
    torch.testing.assert_close(aa, ab)


def test_evaluate_matches_task_evaluate(digits: Task) -> None:
    model = StackedModel(digits, [5, 9], seed=SEED, same_init=False)
    loss, acc = model.evaluate(digits.data.x_test, digits.data.y_test)
    assert acc is not None
    for row, node in enumerate([5, 9]):
        ref = digits.evaluate(digits.make_model(SEED + node))
        assert abs(float(loss[row]) - ref["loss"]) < 1e-5
        assert abs(float(acc[row]) - ref["accuracy"]) < 1e-6


def test_same_init_rows_are_identical(digits: Task) -> None:
    model = StackedModel(digits, range(3), seed=7, same_init=True)
    ref = digits.make_model(7)
    for name, p in ref.named_parameters():
        for i in range(3):
            assert torch.equal(model.params[name][i], p.detach())


def _bn_task(digits: Task) -> Task:
    def factory() -> nn.Module:
        return nn.Sequential(nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    return dataclasses.replace(digits, name="digits-bn", model_factory=factory)


def test_batchnorm_falls_back_to_loop_with_same_results(digits: Task) -> None:
    task = _bn_task(digits)
    assert choose_impl(task.make_model(0)) == "loop"
    with pytest.raises(ValueError, match="BatchNorm"):
        choose_impl(task.make_model(0), "vmap")
    masks = _masks(4, N, seed=5)
    refs, _ = _reference(task, N, 4, masks, "sgd", lr=0.05, momentum=0.9)
    model, _ = _stacked(task, N, 4, masks, "sgd", lr=0.05, momentum=0.9)
    assert model.impl == "loop"
    _assert_rows_match(model, refs)
    for i, ref in enumerate(refs):
        for name, b in ref.named_buffers():
            assert torch.equal(model.buffers[name][i], b), (i, name)
    loss, _ = model.evaluate(digits.data.x_test, digits.data.y_test)
    for i, ref in enumerate(refs):
        assert abs(float(loss[i]) - task.evaluate(ref.eval())["loss"]) < 1e-5


def test_transformer_runs_under_vmap() -> None:
    task = get_task("charlm", max_chars=4000, context=8, d_model=16, n_layers=1, n_heads=2)
    assert mlp_plan(task.make_model(0)) is None
    assert choose_impl(task.make_model(0)) == "vmap"
    refs, _ = _reference(task, 2, 2, [torch.ones(2, dtype=torch.bool)] * 2, "adam", lr=3e-3)
    model, _ = _stacked(task, 2, 2, [torch.ones(2, dtype=torch.bool)] * 2, "adam", lr=3e-3)
    _assert_rows_match(model, refs, atol=1e-5)


def test_row_adam_rejects_bad_args() -> None:
    p = torch.zeros(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="lr"):
        RowAdam([p], lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        RowAdam([p], betas=(1.0, 0.9))


def test_class_major_sums_equal_cross_entropy_and_argmax() -> None:
    """The evaluation's per-node sums over class-major outputs (the batched MLP's transposed
    view) equal F.cross_entropy and torch.argmax over the classes, ties and NaN included."""
    from simulations.training import _argmax_classes, _per_node_sums

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 10, 37, generator=g)
    scores[0, [2, 6], 3] = 9.0  # a tie: the first maximal class counts
    scores[1, :, 4] = 0.5  # all tied
    scores[2, 7, 5] = float("nan")  # argmax takes a NaN as maximal
    scores[3, 1, 6] = float("-inf")
    y = torch.randint(0, 10, (37,), generator=g)
    y[3], y[4] = 2, 0
    assert torch.equal(_argmax_classes(scores), scores.argmax(dim=1))
    out = scores.transpose(1, 2)  # [L, T, K], a view of class-major memory
    loss, hits = _per_node_sums("classification", out, y)
    ref_loss = torch.stack([F.cross_entropy(o, y, reduction="sum") for o in out.contiguous()])
    ref_hits = torch.stack([(o.argmax(-1) == y).sum() for o in out.contiguous()])
    assert hits is not None and torch.equal(hits, ref_hits.double())
    finite = torch.isfinite(ref_loss)
    assert torch.equal(finite, torch.isfinite(loss))
    torch.testing.assert_close(loss[finite], ref_loss[finite].double(), rtol=1e-6, atol=1e-4)


def test_even_chunks_are_as_few_as_the_cap_allows_and_about_equal() -> None:
    from simulations.training import even_bounds

    assert even_bounds(100, 62) == [0, 50, 100] and even_bounds(13, 4) == [0, 3, 6, 9, 13]
    for rows in range(0, 300):
        for cap in (1, 7, 62, 64):
            bounds = even_bounds(rows, cap)
            sizes = [b - a for a, b in pairwise(bounds)]
            assert bounds[0] == 0 and bounds[-1] == rows and len(sizes) == -(-rows // cap)
            assert not sizes or (max(sizes) <= cap and max(sizes) - min(sizes) <= 1)
