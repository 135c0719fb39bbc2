"""Accuracy against bytes: DiLoCo, NoLoCo, gossip-VC and CHOCO, each with every compressor, with
and without error feedback, simulated on one non-IID task.

    python benchmarks/compression.py                   # digits, 8 nodes, dirichlet:0.5
    python benchmarks/compression.py --quick           # a smoke test: 2 algorithms, 3 rounds

Every run uses the same data split, batches, rounds and network model (the simulator's defaults:
100 Mbit/s links, 50 ms latency, 10 ms per inner step). Per-algorithm settings are those of
``simulations.compare`` (CHOCO: SGD with momentum, like D-PSGD). CHOCO's consensus step size
gamma is 1 with lossless or 16-bit sends, 0.8 with 8-bit and 0.1 with 1 % sparsification (not
tuned further); CHOCO has no error-feedback rows (its public copies are its error memory). Prints
one JSON line per run, then a Markdown table: final mean test accuracy and loss, MiB sent per node,
simulated seconds to 90 % mean accuracy (- if never reached).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from simulations.compare import ALGO_SETTINGS
from simulations.config import SimConfig
from simulations.run import run

SETTINGS: dict[str, dict[str, Any]] = {
    **ALGO_SETTINGS, "choco": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}}
ALGOS = ("diloco", "noloco", "gossip-vc", "choco")
COMPRESSORS = ("none", "bf16", "int8", "fp8", "topk:0.01", "randk:0.01")


def choco_gamma(compress: str) -> float:
    kind = compress.split(":")[0]
    if kind in ("none", "bf16", "fp16"):
        return 1.0
    return 0.1 if kind in ("topk", "randk") else 0.8


def cases(algos: Sequence[str], compressors: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for algo in algos:
        for comp in compressors:
            for ef in (False, True):
                if ef and (comp == "none" or algo == "choco"):
                    continue
                fields: dict[str, Any] = {"algo": algo, "compress": comp, "error_feedback": ef,
                                          **SETTINGS[algo]}
                if algo == "choco":
                    fields["choco_gamma"] = choco_gamma(comp)
                out.append(fields)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| algorithm | compress | error feedback | final accuracy | final loss | MiB/node | "
             "sim s to 90% |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        t90 = "-" if r["sim_seconds_to_90"] is None else f"{r['sim_seconds_to_90']:.1f}"
        ef = "yes" if r["error_feedback"] else "no"
        lines.append(f"| {r['algo']} | {r['compress']} | {ef} | {r['final_accuracy']:.4f} | "
                     f"{r['final_loss']:.4f} | {r['mib_per_node']:.3f} | {t90} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--algos", default=",".join(ALGOS))
    parser.add_argument("--compress", default=",".join(COMPRESSORS))
    parser.add_argument("--task", default="digits")
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-steps", type=int, default=20)
    parser.add_argument("--partition", default="dirichlet:0.5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    algos = [a for a in args.algos.split(",") if a]
    comps = [c for c in args.compress.split(",") if c]
    rounds = args.rounds
    if args.quick:
        algos, comps, rounds = ["diloco", "choco"], ["none", "int8"], 3
    rows = []
    t0 = time.perf_counter()
    for fields in cases(algos, comps):
        try:
            cfg = SimConfig(task=args.task, nodes=args.nodes, rounds=rounds,
                            sync_every=args.local_steps, partition=args.partition,
                            seed=args.seed, progress=False, **fields)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        s = run(cfg)
        row = {"algo": fields["algo"], "compress": fields["compress"],
               "error_feedback": fields["error_feedback"],
               "final_accuracy": s["final_accuracy_mean"], "final_loss": s["final_loss_mean"],
               "mib_per_node": s["bytes_per_node"] / 2**20,
               "sim_seconds_to_90": s["sim_seconds_to_90"],
               "simulated_seconds": s["simulated_seconds"], "rounds": rounds,
               "local_steps": args.local_steps, "nodes": args.nodes, "task": args.task}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.task}, {args.nodes} nodes, {args.partition}, {rounds} rounds of "
          f"{args.local_steps} local steps, seed {args.seed}; wall "
          f"{time.perf_counter() - t0:.0f} s\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
