"""The one builder both executors call: task, shards, initial model seed, inner optimizer,
learning-rate schedule, topology and algorithm, all from a resolved :class:`~gossip.run.RunSpec`.

A real rank calls it with its rank and its :class:`~gossip.flat.FlatParams`; the simulator with
the node ids it holds and the stacked rows. Both get the same shards, the same init seeds, the
same optimizer settings and the same algorithm config from the same spec.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gossip.algorithms import Algorithm, build_algorithm, needs_topology
from gossip.comm.base import Communicator
from gossip.data import partition, sampled_partition
from gossip.flat import FlatParams
from gossip.run.schedule import lr_factor
from gossip.run.spec import RunSpec, optimizer_class
from gossip.tasks import TASK_NAMES, DatasetData, Task, get_task
from gossip.topology import Topology, make_topology

__all__ = [
    "check_loss",
    "load_task",
    "make_algorithm",
    "make_optimizer",
    "make_shards",
    "make_topology_for",
    "node_model",
    "scheduled_lr",
    "task_source",
    "with_init",
]


def task_source(name: str) -> str:
    """The import path of a task: ``gossip.tasks:digits`` for the shorthand ``digits``."""
    return f"gossip.tasks:{name}" if name in TASK_NAMES else name


def load_task(name: str, *, seed: int, init: str = "default") -> Task:
    """The task ``name`` means: a built-in shorthand (digits, charlm, synthetic) or
    ``package.module:function``, called as ``function(seed=seed)`` (or ``function()`` when it
    takes no seed); it must return a :class:`gossip.tasks.Task`. ``init`` other than
    ``"default"`` replaces the task's :attr:`~gossip.tasks.Task.init`."""
    if name in TASK_NAMES:
        return get_task(name, seed=seed, init=init)
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"task={name!r} is invalid: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"task={name!r} is invalid: {attr!r} is not a function")
    try:
        takes_seed = "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature (a builtin): try the documented call
        takes_seed = True
    # (never retried on TypeError: a TypeError inside the function is the user's to see, once)
    task = fn(seed=seed) if takes_seed else fn()
    if not isinstance(task, Task):
        raise ValueError(f"task={name!r} is invalid: it returned {type(task).__name__}, "
                         "expected a gossip.tasks.Task")
    return with_init(task, init)


def with_init(task: Task, init: str) -> Task:
    """``task`` with :attr:`~gossip.tasks.Task.init` ``init``; ``"default"`` keeps the task's
    own."""
    return task if init == "default" else dataclasses.replace(task, init=init)


def make_shards(spec: RunSpec, task: Task, nodes: int, *, shard_size: int | None = None
                ) -> list[np.ndarray]:
    """Every node's indices into the task's training set (``spec.partition``)."""
    data = task.data
    labels = data.y_train if data.kind == "classification" else None
    try:
        if spec.partition.startswith("sample:"):
            size = shard_size or max(spec.batch_size or 1, -(-data.num_train // nodes))
            return sampled_partition(spec.partition[len("sample:"):], labels, nodes, size,
                                     num_samples=data.num_train, seed=spec.seed)
        return partition(spec.partition, labels, nodes, num_samples=data.num_train,
                         seed=spec.seed)
    except ValueError as e:
        hint = " (more nodes than samples: try partition='sample:iid')" \
            if nodes > data.num_train else ""
        if labels is None and isinstance(data, DatasetData) and data.kind == "classification":
            # the simulator holds the data and reads the labels from it; a real rank reads
            # only its own batches, so it needs them given
            hint = ("; the task's DatasetData has no train_labels: give DatasetData("
                    "train_labels=...) the class id of every training sample (e.g. an "
                    "ImageFolder's .targets), or split with 'iid' or 'quantity:ALPHA'")
        raise ValueError(f"partition={spec.partition!r} is invalid for task={spec.task!r} "
                         f"with {nodes} nodes: {e}{hint}") from None


def node_model(task: Task, seed: int, node: int, *, same_init: bool) -> torch.nn.Module:
    """Node ``node``'s initial model: ``task.make_model(seed)`` when the nodes share one start,
    else ``task.make_model(seed + node)``, whose frozen parameters (``requires_grad`` False)
    are then the shared model's too. Frozen parameters are never trained or averaged, so every
    node keeps the ones it starts with: one set for the whole run, on real ranks and simulated
    nodes alike (the simulator holds them once, not per node; ``gossip.merge`` reads them from
    the model at the run's seed)."""
    model = task.make_model(seed if same_init else seed + node)
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    if frozen and not same_init:
        shared = dict(task.make_model(seed).named_parameters())
        with torch.no_grad():
            for name in frozen:
                model.get_parameter(name).copy_(shared[name])
    return model


def check_loss(task: Task, model: torch.nn.Module, x: Tensor, y: Tensor, batch_size: int
               ) -> None:
    """Refuse a ``loss_fn`` that does not return the batch's mean loss (a per-sample vector, an
    integer) before the run writes anything: one forward of the first ``batch_size`` samples of
    ``(x, y)`` (on the model's device), in eval mode and without gradients, so nothing of the
    model changes (BatchNorm's running statistics included). Raises ``ValueError`` naming what
    ``loss_fn`` returned; it used to fail at the first training step, after the run directory
    was written."""
    if task.loss_fn is None:
        return
    device = next(model.parameters(), x).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            task.loss(model(x[:batch_size].to(device)), y[:batch_size].to(device))
    finally:
        model.train(training)


def make_optimizer(spec: RunSpec, params: Iterable[Tensor]) -> torch.optim.Optimizer:
    """The inner optimizer of a resolved spec over ``params`` (a real rank's parameters)."""
    assert spec.optimizer is not None
    cls = optimizer_class(spec.optimizer)
    kwargs = spec.optimizer_kwargs()
    if "momentum" in kwargs and cls is not torch.optim.SGD and spec.momentum:
        raise ValueError(f"momentum={spec.momentum!r} is invalid with optimizer="
                         f"{spec.optimizer!r}: expected 0 (momentum is for sgd)")
    try:
        return cls(params, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"optimizer={spec.optimizer!r} with arguments {kwargs} is invalid: "
                         f"{e}") from None


def scheduled_lr(spec: RunSpec, t: int, total: int) -> float:
    """The inner lr of a node's step ``t`` (0-based count of its steps taken) of ``total``."""
    assert spec.lr is not None
    return spec.lr * lr_factor(spec.schedule, t, total, spec.warmup_steps)


def make_topology_for(spec: RunSpec, nodes: int) -> Topology | None:
    """The gossip family's topology over ``nodes`` nodes, else None."""
    if not needs_topology(spec.algo):
        return None
    assert spec.topology is not None
    try:
        return make_topology(spec.topology, nodes, seed=spec.seed,
                             weights=spec.topology_weights or "metropolis")
    except ValueError as e:
        raise ValueError(f"topology={spec.topology!r} is invalid with {nodes} nodes: "
                         f"{e}") from None


def make_algorithm(spec: RunSpec, params: FlatParams, comm: Communicator, *,
                   topology: Topology | None, weight: Tensor, sync_every: int | None = None,
                   ) -> tuple[Algorithm, Any]:
    """The algorithm object and its config (H = ``sync_every``, default the spec's)."""
    config = spec.algorithm_config(sync_every)
    try:
        algo = build_algorithm(spec.algo, config, params, comm, topology=topology,
                               weight=weight)
    except ValueError as e:
        raise ValueError(f"algo={spec.algo!r} cannot run with {comm.world_size} nodes: "
                         f"{e}") from None
    return algo, config
