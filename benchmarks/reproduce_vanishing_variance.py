"""Reproduce the vanishing-variance effect (Tian et al. 2024, arXiv 2404.04616) on digits.

Three simulated runs through the engine's Python API (:class:`simulations.engine.Simulation`),
same data split, partition, batches and seeds:

- ``fedavg``: every client each round, all nodes start from one shared model;
- ``gossip``: plain gossip learning on a random 8-regular graph, the paper's merge
  ``x <- beta x + (1 - beta) mean(received)`` with beta = 0.5, no variance correction;
- ``gossip-vc``: the same merge followed by the variance correction (each weight tensor rescaled
  to the mean variance of the received models, keeping its mean).

The gossip nodes start from independent initialisations (``seed + node``: the engine's default
for gossip algorithms, ``Gossip.same_init = False``), which is what makes the merged weights'
variance collapse (about 0.28x after one 50/50 merge with 8 uncorrelated neighbours). A round is
``--local-steps`` local SGD steps (default 1: the paper trains one mini-batch between merges),
then one synchronisation.

Writes to ``--out`` (default ``runs/vanishing_variance``): ``accuracy.png`` (mean test accuracy
across nodes vs round, min-max band shaded, all three runs), ``variance.png`` (per-layer weight
variance vs round: the mean over nodes of each node's variance of that tensor),
``summary.json``, and one run directory per algorithm (config, metrics.jsonl, summary, plots).
Prints one JSON line per algorithm with rounds to 90 % mean test accuracy (``null`` = not
reached) and a closing table.

    python benchmarks/reproduce_vanishing_variance.py                 # ~ a few minutes
    python benchmarks/reproduce_vanishing_variance.py --rounds 400 --eval-every 2
    python benchmarks/reproduce_vanishing_variance.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gossip.tasks import get_task
from simulations.config import SimConfig
from simulations.engine import RunRecorder, Simulation

ALGOS = ("fedavg", "gossip", "gossip-vc")
COLORS = {"fedavg": "tab:blue", "gossip": "tab:red", "gossip-vc": "tab:green"}
THRESHOLDS = (0.5, 0.8, 0.9)


def rounds_to(records: Sequence[dict[str, Any]], thresholds: Sequence[float]
              ) -> dict[str, int | None]:
    """First evaluated round whose mean test accuracy reaches each threshold (None = never)."""
    out: dict[str, int | None] = {}
    for t in thresholds:
        hit = next((r["round"] for r in records if (r.get("accuracy_mean") or 0.0) >= t), None)
        out[f"{t:g}"] = hit
    return out


def weight_variance(sim: Simulation) -> dict[str, float]:
    """``{tensor name: mean over nodes of Var(node's tensor)}`` for weights (not biases)."""
    out = {}
    for name, p in sim.model.params.items():
        if name.rsplit(".", 1)[-1] != "weight":
            continue
        rows = p.detach().reshape(p.shape[0], -1).double()
        out[name] = float(rows.var(dim=1, unbiased=False).mean())
    return out


def run_algo(algo: str, args: argparse.Namespace) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if algo != "fedavg":
        extra["topology"] = f"random-regular:{args.degree}"
    cfg = SimConfig(algo=algo, task="digits", nodes=args.nodes, rounds=args.rounds,
                    partition=args.partition, sync_every=args.local_steps, lr=args.lr,
                    momentum=args.momentum, batch_size=args.batch_size, seed=args.seed,
                    eval_every=args.eval_every, threads=args.threads, progress=False,
                    optimizer="sgd", **extra)
    task = get_task("digits", seed=args.seed)
    sim = Simulation(cfg, task=task)
    out = Path(args.out) / algo
    recorder = RunRecorder(sim.cfg, out, label_counts=sim.label_counts(),
                           plots=args.run_plots)
    rows = sim.flat_params()
    independent = not bool((rows == rows[0]).all())
    t0 = time.perf_counter()
    first = {f"var/{k}": v for k, v in weight_variance(sim).items()}
    recorder.log({"round": 0, "step": 0, **first, **_eval0(sim)})
    for r in range(cfg.rounds):
        rec = sim.run_round(r)
        rec["wall_seconds"] = time.perf_counter() - t0
        if "accuracy_mean" in rec:
            rec.update({f"var/{k}": v for k, v in weight_variance(sim).items()})
        recorder.log(rec)
    wall = time.perf_counter() - t0
    summary = recorder.finish(wall_seconds=wall, info=sim.info())
    records = recorder.records
    return {"algo": algo, "summary": summary, "records": records,
            "independent_init": independent}


def _eval0(sim: Simulation) -> dict[str, Any]:
    """Accuracy before any training (round 0)."""
    ev = sim.evaluate()
    acc = ev["accuracy"]
    return {"accuracy_mean": float(acc.mean()), "accuracy_min": float(acc.min()),
            "accuracy_max": float(acc.max()), "sim_seconds": 0.0}


def plot(results: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for res in results:
        recs = [r for r in res["records"] if r.get("accuracy_mean") is not None]
        xs = [r["round"] for r in recs]
        color = COLORS.get(res["algo"])
        ax.plot(xs, [r["accuracy_mean"] for r in recs], label=res["algo"], color=color)
        ax.fill_between(xs, [r["accuracy_min"] for r in recs],
                        [r["accuracy_max"] for r in recs], color=color, alpha=0.15, lw=0)
    ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean over nodes, min-max shaded)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize="medium")
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    written.append(path)

    names = sorted({k for res in results for r in res["records"] for k in r
                    if k.startswith("var/")})
    if names:
        fig = Figure(figsize=(5 * len(names), 4.2))
        FigureCanvasAgg(fig)
        for j, name in enumerate(names):
            ax = fig.add_subplot(1, len(names), j + 1)
            for res in results:
                pts = [(r["round"], r[name]) for r in res["records"] if name in r]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=res["algo"],
                        color=COLORS.get(res["algo"]))
            ax.set_yscale("log")
            ax.set_xlabel("round")
            ax.set_ylabel("weight variance (mean over nodes)")
            ax.set_title(name[len("var/"):])
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small")
        fig.suptitle(title, fontsize="medium")
        fig.tight_layout()
        path = out / "variance.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--degree", type=int, default=8, help="random regular graph degree")
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--local-steps", type=int, default=1, help="local SGD steps per round")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/vanishing_variance")
    p.add_argument("--run-plots", action=argparse.BooleanOptionalAction, default=True,
                   help="each run directory's own plots (accuracy, loss, consensus, labels)")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.degree, args.rounds, args.eval_every = 12, 4, 4, 2
        args.run_plots = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    results = []
    for algo in algos:
        res = run_algo(algo, args)
        s = res["summary"]
        line = {"algo": algo, "rounds_to_90": s["rounds_to_90"],
                "rounds_to": rounds_to(res["records"], THRESHOLDS),
                "final_accuracy_mean": s["final_accuracy_mean"],
                "final_accuracy_min": s["final_accuracy_min"],
                "independent_init": res["independent_init"], "wall_seconds": s["wall_seconds"],
                "rounds": args.rounds, "local_steps": args.local_steps}
        print(json.dumps(line), flush=True)
        results.append(res)
    title = (f"digits, {args.nodes} nodes, {args.partition}, random {args.degree}-regular "
             f"graph (gossip), {args.local_steps} local step(s)/round, SGD lr {args.lr}")
    plots = plot(results, out, title)
    table = {r["algo"]: {**{k: r["summary"][k] for k in
                            ("rounds_to_90", "final_accuracy_mean", "final_accuracy_min",
                             "final_accuracy_max", "wall_seconds")},
                         "rounds_to": rounds_to(r["records"], THRESHOLDS)} for r in results}
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with open(out / "summary.json", "w") as fh:
        json.dump({"args": vars(args), "results": table, "load": load,
                   "plots": [str(p) for p in plots]}, fh, indent=2)
    heads = "".join(f"{'rounds to ' + format(t, '.0%'):>16}" for t in THRESHOLDS)
    print(f"\n{'algo':<10}{heads} {'final mean acc':>15} {'wall s':>8}")
    for algo, row in table.items():
        cells = "".join(f"{('not reached' if v is None else str(v)):>16}"
                        for v in row["rounds_to"].values())
        print(f"{algo:<10}{cells} {_fmt(row['final_accuracy_mean']):>15} "
              f"{row['wall_seconds']:>8.1f}")
    print(f"plots: {', '.join(str(p) for p in plots)}")
    return 0


def _fmt(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


if __name__ == "__main__":
    sys.exit(main())
