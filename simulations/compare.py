"""Compare FedAvg, DiLoCo, NoLoCo, D-PSGD and variance-corrected gossip on one non-IID task.

    python -m simulations.compare                      # digits, 16 nodes, dirichlet:0.5
    python -m simulations.compare --nodes 32 --rounds 80 --out runs/compare32

Each algorithm runs with the same data split, batches, rounds (one local epoch per round by
default) and network model; the per-algorithm settings are :data:`ALGO_SETTINGS`, chosen so every
method reaches good accuracy on digits (inner Adam/AdamW at 3e-3..5e-3 for DiLoCo/NoLoCo with
their papers' outer settings; SGD with momentum 0.9 and lr 0.05 for the others). Prints a table
(final accuracy, rounds to 90 %, bytes sent per node, simulated seconds) and writes one run
directory per algorithm plus ``comparison.png`` (all algorithms: accuracy vs round and vs
simulated seconds) and ``comparison.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gossip.algorithms import needs_topology
from gossip.allocator import reuse_freed_memory
from gossip.metrics import atomic_write_text, to_jsonable
from gossip.plots import plot_comparison
from gossip.records import runs_table
from simulations.config import SimConfig
from simulations.run import run

__all__ = ["ALGO_SETTINGS", "compare", "format_table", "main"]

#: Per-algorithm settings (fields of SimConfig). Outer settings left out take the papers'
#: defaults: DiLoCo outer SGD lr 0.7, momentum 0.9, Nesterov; NoLoCo alpha 0.5,
#: beta = gamma = 0.7, groups of 2; gossip-vc self weight 0.5, full correction.
ALGO_SETTINGS: dict[str, dict[str, Any]] = {
    "fedavg": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "diloco": {"optimizer": "adamw", "lr": 3e-3},
    "noloco": {"optimizer": "adam", "lr": 5e-3},
    "dpsgd": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "gossip-vc": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
    "gossip": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9},
}
DEFAULT_ALGOS = ("fedavg", "diloco", "noloco", "dpsgd", "gossip-vc")


def compare(algos: Sequence[str] = DEFAULT_ALGOS, *, out: str | Path | None = "runs/compare",
            progress: bool | None = None, **fields: Any) -> dict[str, dict[str, Any]]:
    """Run every algorithm with ``fields`` (shared SimConfig fields) on top of its
    :data:`ALGO_SETTINGS`; returns ``{algo: summary}`` (each with its ``records``)."""
    results: dict[str, dict[str, Any]] = {}
    for algo in algos:
        if algo not in ALGO_SETTINGS:
            raise ValueError(f"algos: {algo!r} is not one of {sorted(ALGO_SETTINGS)}")
        shared = dict(fields)
        if not needs_topology(algo):
            shared.pop("topology", None)
        cfg = SimConfig(algo=algo, **{**ALGO_SETTINGS[algo], **shared},
                        out=None if out is None else str(Path(out) / algo), progress=progress)
        t0 = time.perf_counter()
        summary = run(cfg)
        summary["wall_seconds_total"] = time.perf_counter() - t0
        results[algo] = summary
    if out is not None:
        first = next(iter(results.values()))
        title = (f"{first['task']}, {first['nodes']} nodes, {first['partition']}, "
                 f"{first['rounds']} rounds")
        plot_comparison({a: s["records"] for a, s in results.items()},
                        Path(out) / "comparison.png", title=title)
        table = {a: {k: v for k, v in s.items() if k != "records"} for a, s in results.items()}
        atomic_write_text(Path(out) / "comparison.json",
                          json.dumps(to_jsonable(table), indent=2, sort_keys=True) + "\n")
    return results


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """The comparison as a fixed-width text table (:func:`gossip.records.runs_table`)."""
    return runs_table(results)


def main(argv: Sequence[str] | None = None) -> int:
    reuse_freed_memory()  # model-sized temporaries without page faults (gossip.allocator)
    parser = argparse.ArgumentParser(prog="python -m simulations.compare",
                                     description=__doc__.split("\n", 1)[0])
    parser.add_argument("--algos", default=",".join(DEFAULT_ALGOS),
                        help=f"comma-separated, from {sorted(ALGO_SETTINGS)}")
    parser.add_argument("--task", default="digits")
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--topology", default=None,
                        help="gossip family (default: random-regular:8, ring below 9 nodes)")
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the runs a previous comparison left in --out")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        results = compare(
            [a.strip() for a in args.algos.split(",") if a.strip()], out=args.out,
            task=args.task, nodes=args.nodes, rounds=args.rounds, partition=args.partition,
            topology=args.topology, local_epochs=args.local_epochs, seed=args.seed,
            eval_every=args.eval_every, threads=args.threads, overwrite=args.overwrite)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    first = next(iter(results.values()))
    print(f"{first['task']}: {first['nodes']} nodes, partition {first['partition']}, "
          f"{first['rounds']} rounds of {first['steps_per_round']} local steps "
          f"({args.local_epochs} local epoch(s) of the largest shard), seed {args.seed}")
    print(format_table(results))
    print(f"total wall time {time.perf_counter() - t0:.1f} s; run directories, comparison.png "
          f"and comparison.json in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
