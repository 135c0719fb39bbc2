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
from gossip.tasks import Task
from simulations.config import SimConfig, from_args
from simulations.engine import Simulation, drive, set_threads

__all__ = ["format_summary", "main", "run"]


def run(cfg: SimConfig, *, task: Task | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end and return its summary (plus ``records``, the per-round metrics).

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

def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_summary(summary: dict[str, Any]) -> str:
    """A few human-readable lines of a run's summary."""
    lines = [
        f"{summary['algo']} on {summary['task']}: {summary['nodes']} nodes, "
        f"{summary['rounds']} rounds x {summary.get('steps_per_round', '?')} local steps, "
        f"partition {summary['partition']}"
        + (f", topology {summary['topology']}" if summary.get("topology") else ""),
        f"  test accuracy  mean {_fmt(summary['final_accuracy_mean'])}  "
        f"min {_fmt(summary['final_accuracy_min'])}  max {_fmt(summary['final_accuracy_max'])}"
        f"   test loss {_fmt(summary['final_loss_mean'])}",
        f"  rounds to 90%  {_fmt(summary['rounds_to_90'])}   consensus distance "
        f"{_fmt(summary['final_consensus_distance'], '.3g')}",
        f"  sent per node  {summary['bytes_per_node'] / 2**20:.2f} MiB   simulated time "
        f"{summary['simulated_seconds']:.1f} s   wall time {summary['wall_seconds']:.2f} s "
        f"({_fmt(summary.get('node_steps_per_second'), '.0f')} node-steps/s)",
    ]
    return "\n".join(lines)


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
    print(format_summary(summary))
    if cfg.out:
        print(f"  run directory  {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
