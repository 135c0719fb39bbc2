"""Command line: run one simulated configuration and write its run directory.

Example::

    python -m simulations.run --algo gossip-vc --nodes 64 --topology random-regular:8 \\
        --partition dirichlet:0.5 --task digits --rounds 50 --out runs/x

Every :class:`simulations.config.SimConfig` field is a flag (``--sync-every``, ``--drop-prob``,
...); ``--config FILE.toml`` loads the same fields from a file and flags override it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from gossip.allocator import reuse_freed_memory
from gossip.records import table
from gossip.tasks import Task
from simulations.config import SimConfig, from_args
from simulations.engine import Simulation, drive, set_threads

__all__ = ["main", "run"]


def run(cfg: SimConfig, *, task: Task | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end and return its summary (plus ``records``, its ``round`` records).

    ``cfg.actors > 1`` shards the nodes over Ray actors (:mod:`simulations.ray_backend`).
    """
    if cfg.actors > 1:
        if task is not None:
            raise ValueError("task= is not supported with actors > 1 (each actor builds "
                             f"task={cfg.task!r} itself)")
        from simulations import ray_backend

        return ray_backend.run_on_ray(cfg)
    set_threads(cfg)
    sim = Simulation(cfg, task=task)
    summary = drive(sim)
    if cfg.save_models:  # SimConfig allows it only with out set and one process
        assert cfg.out is not None
        sim.save_models(cfg.out)
    return summary

def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, print a summary; returns the exit code."""
    reuse_freed_memory()  # model-sized temporaries without page faults (gossip.allocator)
    try:
        cfg = from_args(argv)
        summary = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    summary.pop("records", None)
    print(table(summary))
    if cfg.out:
        print(f"  run directory  {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
