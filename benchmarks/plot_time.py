"""Seconds per plot of a simulated run at large N, as ``simulations.run`` writes them.

Simulates ``--rounds`` rounds of each algorithm of ``--algos`` on the digits task with N nodes
(``sample:dirichlet:0.5``: each node draws 16 samples), evaluating every round (the engine's
default sample of 1,000 nodes where the nodes differ; one model for FedAvg), and keeps the
run's records. Then, in this process, times matplotlib's import once and each plotting call of
a run directory: the label-distribution plot (a heat map above 64 nodes) and
:func:`gossip.plots.plot_run` (accuracy, loss, and consensus where nodes differ), and prints
one JSON line per algorithm with seconds per written figure.

    python benchmarks/plot_time.py                          # N = 10,000, fedavg and gossip-vc
    python benchmarks/plot_time.py --nodes 100000 --algos fedavg --device cuda
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations.config import SimConfig
from simulations.engine import Simulation


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=10_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--algos", default="fedavg,gossip-vc")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    import matplotlib.pyplot  # noqa: F401  (what the first plot of a run pays once)

    from gossip.plots import plot_label_distribution, plot_run
    print(json.dumps({"bench": "plot_time", "matplotlib_import_s": time.perf_counter() - t0,
                      "nodes": args.nodes}), flush=True)
    for algo in args.algos.split(","):
        sim = Simulation(SimConfig(algo=algo, task="digits", nodes=args.nodes,
                                   partition="sample:dirichlet:0.5", batch_size=16, lr=0.05,
                                   local_epochs=1, rounds=args.rounds, eval_every=1,
                                   device=args.device, progress=False))
        records = []
        for r in range(args.rounds):
            rec = sim.run_round(r)
            records += rec.pop("eval_rows", [])
            records.append(rec)
        counts = sim.label_counts()
        assert counts is not None
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            plot_label_distribution(counts, Path(tmp) / "label_distribution.png")
            label_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            written = plot_run(records, tmp)
            run_s = time.perf_counter() - t0
        print(json.dumps({"algo": algo, "nodes": args.nodes, "eval_rows": sum(
            r.get("kind") == "eval" for r in records), "label_distribution_s": label_s,
            "plot_run_s": run_s, "plot_run_figures": [w.name for w in written],
            "plot_run_s_per_figure": run_s / max(1, len(written))}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
