"""The one builder both executors call: task, shards, initial model seed, inner optimizer,
learning-rate schedule, topology and algorithm, all from a resolved :class:`~gossip.run.RunSpec`.

A real rank calls it with its rank and its :class:`~gossip.flat.FlatParams`; the simulator with
the node ids it holds and the stacked rows. Both get the same shards, the same init seeds, the
same optimizer settings and the same algorithm config from the same spec.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gossip.algorithms import Algorithm, build_algorithm, needs_topology, same_init
from gossip.comm.base import Communicator
from gossip.data import partition, sampled_partition
from gossip.flat import FlatParams
from gossip.run.schedule import lr_factor
from gossip.run.spec import RunSpec, optimizer_class
from gossip.tasks import TASK_NAMES, Task, get_task
from gossip.topology import Topology, make_topology

__all__ = [
    "init_seed",
    "load_task",
    "make_algorithm",
    "make_optimizer",
    "make_shards",
    "make_topology_for",
    "scheduled_lr",
    "task_source",
]


def task_source(name: str) -> str:
    """The import path of a task: ``gossip.tasks:digits`` for the shorthand ``digits``."""
    return f"gossip.tasks:{name}" if name in TASK_NAMES else name


def load_task(name: str, *, seed: int) -> Task:
    """The task ``name`` means: a built-in shorthand (digits, charlm, synthetic) or
    ``package.module:function``, called as ``function(seed=seed)`` (or ``function()`` when it
    takes no seed); it must return a :class:`gossip.tasks.Task`."""
    if name in TASK_NAMES:
        return get_task(name, seed=seed)
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"task={name!r} is invalid: cannot import it ({e})") from None
    if not callable(fn):
        raise ValueError(f"task={name!r} is invalid: {attr!r} is not a function")
    try:
        task = fn(seed=seed)
    except TypeError:
        task = fn()
    if not isinstance(task, Task):
        raise ValueError(f"task={name!r} is invalid: it returned {type(task).__name__}, "
                         "expected a gossip.tasks.Task")
    return task


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
        raise ValueError(f"partition={spec.partition!r} is invalid for task={spec.task!r} "
                         f"with {nodes} nodes: {e}{hint}") from None


def init_seed(spec: RunSpec, node: int) -> int:
    """The seed of node ``node``'s initial model: shared when the algorithm wants one start."""
    return spec.seed if same_init(spec.algo) else spec.seed + node


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
