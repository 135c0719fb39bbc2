"""The simulator sharded over Ray actors: N virtual nodes split into R contiguous shards.

Actor r holds nodes ``[r*N/R, (r+1)*N/R)`` as one :class:`simulations.engine.Simulation` whose
:class:`gossip.comm.StackedCommunicator` routes rows between the actors over a real
torch.distributed group (Gloo on CPUs; NCCL when every actor has a GPU of its own; Gloo over
shared GPUs when there are more actors than GPUs). Everything random in the engine derives from
``(seed, global node id)`` or ``(seed, round)``, so a run gives the same results on 1, 2 or R
actors.

:class:`RaySimulation` is the driver: it implements the engine's ``Runner`` protocol, so
:func:`simulations.engine.drive` loops the rounds and writes the very run directory the
in-process engine writes. Each shard's ``run_round`` already reduces its metrics over the group
(means over all nodes, bytes of all nodes, the global simulated clock), so every shard returns
the same global record; the driver keeps rank 0's and checks that the others agree.

    from simulations.config import SimConfig
    from simulations.run import run
    run(SimConfig(algo="gossip-vc", nodes=64, actors=4, rounds=20, out="runs/x"))
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from datetime import timedelta
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch import Tensor

from raytools.workers import (
    WorkerGroup,
    WorkerGroupConfig,
    cuda_device_index,
    ensure_ray,
    worker_state,
)
from simulations.config import SimConfig
from simulations.engine import Simulation, drive, set_threads

__all__ = ["RaySimulation", "run_on_ray", "shard_ranges"]

log = logging.getLogger(__name__)

#: Seconds any collective between the shards may wait before the actors give up.
GROUP_TIMEOUT_S = 300.0


def shard_ranges(nodes: int, actors: int) -> list[range]:
    """The contiguous global node ids of each of ``actors`` equal shards of ``nodes``."""
    if actors < 1:
        raise ValueError(f"actors={actors!r} is invalid: expected an integer >= 1")
    if actors > nodes or nodes % actors:
        raise ValueError(f"actors={actors!r} is invalid with nodes={nodes!r}: the actors hold "
                         "equal shards, so actors must divide nodes")
    size = nodes // actors
    return [range(r * size, (r + 1) * size) for r in range(actors)]


# ----------------------------------------------------------------------------- in the actors


def _build(cfg: SimConfig, nodes: list[int], backend: str, timeout_s: float) -> SimConfig:
    """Join the shards' process group (once per actor) and build this shard's Simulation."""
    state = worker_state()
    state.pop("sim", None)
    if cfg.device == "cuda":
        torch.cuda.set_device(cuda_device_index())
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
        dist.init_process_group(backend, init_method="env://",
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    set_threads(cfg)
    sim = Simulation(cfg, nodes=nodes, group=dist.group.WORLD)
    state["sim"] = sim
    return sim.cfg


def _sim() -> Simulation:
    sim = worker_state().get("sim")
    if sim is None:
        raise RuntimeError("this actor holds no simulation shard")
    return sim


def _drop() -> None:
    worker_state().pop("sim", None)


def _run_round(r: int) -> dict[str, Any]:
    return _sim().run_round(r)


def _info() -> dict[str, Any]:
    return _sim().info()


def _label_counts() -> np.ndarray | None:
    return _sim().label_counts()


def _flat_params() -> Tensor:
    return _sim().flat_params().cpu()


def _evaluate() -> dict[str, Tensor]:
    return _sim().evaluate()


# ----------------------------------------------------------------------------- the driver


def _gpus_per_actor(cfg: SimConfig) -> float:
    if cfg.device != "cuda":
        return 0.0
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if gpus < 1:
        raise ValueError("device='cuda' is invalid: the Ray cluster has no GPUs")
    if cfg.actors <= gpus:
        return 1.0
    share = math.ceil(cfg.actors / gpus)  # actors per GPU
    return math.floor(10_000 / share) / 10_000  # Ray counts GPU fractions in 1e-4 units


class RaySimulation:
    """The engine's ``Runner`` over ``cfg.actors`` Ray actors (one shard of nodes each).

    Args:
        cfg: the run (``cfg.actors`` shards, ``cfg.address`` the cluster; None starts a local
            one, "auto" joins the one on this machine).
        workers: actors to reuse (a :class:`WorkerGroup` of ``cfg.actors`` workers, e.g. for
            several runs in a row); default: start them here and stop them in :meth:`close`.
        timeout_s: how long a collective between the shards may wait.

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, cfg: SimConfig, *, workers: WorkerGroup | None = None,
                 timeout_s: float = GROUP_TIMEOUT_S) -> None:
        self.ranges = shard_ranges(cfg.nodes, cfg.actors)
        self._owns_ray = False
        self._to_stop: WorkerGroup | None = None  # actors this object started
        try:
            if workers is None:
                self._owns_ray = ensure_ray(cfg.address,
                                            num_cpus=max(os.cpu_count() or 1, cfg.actors))
                workers = WorkerGroup(WorkerGroupConfig(
                    num_workers=cfg.actors,
                    cpus_per_worker=1.0,
                    gpus_per_worker=_gpus_per_actor(cfg), address=cfg.address))
                self._to_stop = workers
            elif workers.world_size != cfg.actors:
                raise ValueError(f"actors={cfg.actors!r} does not match the "
                                 f"{workers.world_size} workers given")
            else:
                workers.new_master_port()  # in case they have no process group yet
            self.workers: WorkerGroup = workers
            gpus = workers.config.gpus_per_worker
            self.backend = "nccl" if cfg.device == "cuda" and gpus >= 1 else "gloo"
            resolved = workers.run_each(
                _build, [(cfg, list(nodes), self.backend, timeout_s) for nodes in self.ranges])
        except BaseException:
            self.close()
            raise
        self.cfg: SimConfig = resolved[0]
        log.info("simulation of %d nodes on %d Ray actors (%s)", cfg.nodes, cfg.actors,
                 self.backend)

    # -- the Runner protocol --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        infos = self.workers.run(_info)
        out = dict(infos[0])
        out["build_seconds"] = max(i.get("build_seconds", 0.0) for i in infos)
        out["actors"] = self.cfg.actors
        out["backend"] = self.backend
        return out

    def label_counts(self) -> np.ndarray | None:
        return self.workers.run(_label_counts)[0]

    def run_round(self, r: int) -> dict[str, Any]:
        records = self.workers.run(_run_round, r)
        first = records[0]
        for rank, rec in enumerate(records[1:], start=1):
            if rec.keys() != first.keys() or any(
                    not _same(rec[k], first[k]) for k in first):
                diff = {k: (first.get(k), rec.get(k)) for k in first.keys() | rec.keys()
                        if not _same(first.get(k), rec.get(k))}
                raise RuntimeError(f"round {r}: shard {rank} disagrees with shard 0 on the "
                                   f"global metrics: {diff}")
        return first

    # -- extras -------------------------------------------------------------------------

    def flat_params(self) -> Tensor:
        """All N nodes' parameters as one [N, P] tensor on the CPU (rows in node order)."""
        return torch.cat(self.workers.run(_flat_params))

    def evaluate(self) -> dict[str, Tensor]:
        """Every node on the test set: ``nodes`` [N], ``loss`` [N], maybe ``accuracy`` [N]."""
        parts = self.workers.run(_evaluate)
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        """Stop the actors (if this object started them) and Ray (if it started it)."""
        if self._to_stop is not None:
            self._to_stop.shutdown()
            self._to_stop = None
        elif getattr(self, "workers", None) is not None and self.workers.alive:
            with contextlib.suppress(Exception):  # free the shards, keep the caller's actors
                self.workers.run(_drop, timeout_s=60.0)
        if self._owns_ray:
            if ray.is_initialized():
                ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RaySimulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or math.isclose(
            a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def run_on_ray(cfg: SimConfig, *, workers: WorkerGroup | None = None) -> dict[str, Any]:
    """Run ``cfg`` sharded over ``cfg.actors`` Ray actors; write ``cfg.out`` like the
    in-process engine and return the same summary (plus ``records``)."""
    with RaySimulation(cfg, workers=workers) as sim:
        return drive(sim)

