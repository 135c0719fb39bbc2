"""The simulator's memory estimate, checked before anything proportional to N is allocated.

A simulation of N nodes holds, per node, its parameters times a factor for what else keeps a
model-sized tensor per node: the gradients (not on the fused SGD path), the inner optimizer's
state (SGD momentum: 1, Adam/AdamW: 2), the algorithm's state (:data:`ALGORITHM_FACTOR`:
DiLoCo's phi, outer momentum and pseudo-gradient; NoLoCo's phi, delta and the partner means;
gossip's merge result and the rows it receives) and one more for the transient copies of a sync
or an evaluation; plus the training set and every node's shard indices. :func:`check_fits`
refuses a run whose estimate exceeds the memory the machine has free (``MemAvailable``, or the
GPU's free memory), with both figures, before the build starts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["ALGORITHM_FACTOR", "MemoryEstimate", "check_fits", "estimate", "free_bytes",
           "simulation_estimate"]

#: Model-sized tensors per node that each algorithm keeps (or gathers) beyond the parameters.
ALGORITHM_FACTOR = {"fedavg": 0, "diloco": 3, "noloco": 3, "dpsgd": 2, "gossip": 2,
                    "gossip-vc": 2}
_OPTIMIZER_FACTOR = {"sgd": 0, "adam": 2, "adamw": 2}
_TRANSIENT = 1  # a sync's or an evaluation's temporary copies of the rows


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a simulation needs: ``nodes * per_node + data``."""

    nodes: int
    param_bytes: int  # one node's parameters
    factor: int  # model-sized tensors per node, parameters included
    data: int  # training set and shard indices

    @property
    def per_node(self) -> int:
        return self.param_bytes * self.factor

    @property
    def total(self) -> int:
        return self.nodes * self.per_node + self.data


def estimate(*, nodes: int, param_bytes: int, algo: str, optimizer: str, momentum: float,
             fused: bool, data_bytes: int, shard_samples: int) -> MemoryEstimate:
    """The estimate for ``nodes`` nodes of ``param_bytes`` each; ``fused``: the trainer's fused
    SGD path (no gradient tensors); ``shard_samples``: sample indices over all shards."""
    factor = 1 + (0 if fused else 1) + _OPTIMIZER_FACTOR.get(optimizer, 2)
    factor += 1 if optimizer == "sgd" and momentum else 0
    factor += ALGORITHM_FACTOR.get(algo, 3) + _TRANSIENT
    # shard indices: int64 arrays kept by the partition and by the batch schedule
    return MemoryEstimate(nodes=nodes, param_bytes=param_bytes, factor=factor,
                          data=data_bytes + 2 * 8 * shard_samples)


def simulation_estimate(cfg: Any, task: Any, rows: int) -> MemoryEstimate:
    """The estimate for ``rows`` nodes of the resolved ``cfg`` (a
    :class:`simulations.config.SimConfig`) on ``task``, from one model of the task."""
    from simulations.training import mlp_plan

    data = task.data
    model = task.make_model(cfg.seed)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fused = cfg.optimizer == "sgd" and cfg.grad_clip is None \
        and cfg.train_impl in ("auto", "matmul") and mlp_plan(model) is not None
    data_bytes = sum(t.numel() * t.element_size() for t in (
        data.x_train, data.y_train, data.x_test, data.y_test))
    if cfg.partition.startswith("sample:"):
        size = cfg.shard_size or max(cfg.batch_size, -(-data.num_train // cfg.nodes))
        shard_samples = rows * size
    else:
        shard_samples = data.num_train
    return estimate(nodes=rows, param_bytes=param_bytes, algo=cfg.algo,
                    optimizer=cfg.optimizer, momentum=cfg.momentum, fused=fused,
                    data_bytes=data_bytes, shard_samples=shard_samples)


def free_bytes(device: str = "cpu") -> int | None:
    """Memory free for a new allocation: ``MemAvailable`` of /proc/meminfo, or the free memory
    of the current CUDA device; None where it cannot be read."""
    if device == "cuda":
        import torch

        try:
            return int(torch.cuda.mem_get_info()[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def check_fits(est: MemoryEstimate, *, device: str = "cpu", free: int | None = None) -> None:
    """Raise a ValueError naming the estimate and the free memory when ``est`` does not fit."""
    avail = free_bytes(device) if free is None else free
    if avail is None or est.total <= avail:
        return
    gib = 2.0**30
    where = "on the GPU" if device == "cuda" else "on this machine (MemAvailable)"
    raise ValueError(
        f"nodes={est.nodes} is invalid: the simulation needs about {est.total / gib:.1f} GiB "
        f"({est.nodes} nodes x {est.per_node / 2**20:.2f} MiB of model-sized state "
        f"[{est.factor} x {est.param_bytes / 2**20:.3f} MiB of parameters] + "
        f"{est.data / gib:.2f} GiB of data and shards) but {avail / gib:.1f} GiB is free "
        f"{where}; use fewer nodes, or shard them over Ray actors on several machines "
        f"(--actors, --address)")
