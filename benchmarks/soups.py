"""Model soups of a decentralized run's final nodes (issue 13): merged models vs single nodes.

For each algorithm (gossip-VC, D-PSGD, NoLoCo) and node count (16, 64) one simulated run on
digits with a Dirichlet(0.5) partition writes its final per-node models (``--save-models``);
then :mod:`gossip.merge` merges them with each soup method and scores the merged model on the
test set. The table compares each merge with the mean single node (the average of the nodes'
test accuracies) and the best single node (chosen by test accuracy: an oracle, the most a
single node can give).

Merges: ``uniform``, ``greedy-soup`` and ``fisher`` as in :mod:`gossip.merge` (held-out set: a
seeded sample of the training split); ``ties`` (density 0.2) and ``dare`` (drop 0.9) against
the run's initial model when the nodes share one (NoLoCo), else against the uniform soup
(gossip nodes start from independent initialisations, so there is no common base).

Runs: ``--rounds`` rounds of ``--local-steps`` inner steps each, every algorithm at its
simulator defaults (gossip-VC and D-PSGD: SGD lr 0.05 on a random 8-regular graph; NoLoCo:
Adam lr 1e-3, pairs), ``--init`` default. Prints one JSON line per run and a markdown table;
writes ``soups.json`` and ``soups.png/.svg`` (test accuracy per algorithm and node count: the mean
node, the best node and each merge, mean over seeds with +-1 std error bars) to ``--out``.

    python benchmarks/soups.py                       # 3 algorithms x {16, 64} nodes, seed 0
    python benchmarks/soups.py --seeds 0,1,2
    python benchmarks/soups.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import figure, mean_std, parse_seeds, save
from gossip.merge import MergeOptions, load_models, merge, to_model
from simulations.config import SimConfig
from simulations.run import run

ALGOS = ("gossip-vc", "dpsgd", "noloco")
SHARED_INIT = {"noloco"}
METHODS = ("uniform", "greedy-soup", "fisher", "ties", "dare")


def one_run(algo: str, nodes: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out) / f"{algo}_n{nodes}_s{seed}"
    cfg = SimConfig(algo=algo, nodes=nodes, rounds=args.rounds, sync_every=args.local_steps,
                    partition=args.partition, seed=seed, init=args.init,
                    eval_every=args.rounds, out=str(out), save_models=True, progress=False,
                    threads=args.threads)
    t0 = time.perf_counter()
    summary = run(cfg)
    models = load_models([out])
    task = models.build_task()
    singles = [task.evaluate(to_model(task, i.state, seed=models.model_seed))["accuracy"]
               for i in models.items]
    row: dict[str, Any] = {"algo": algo, "nodes": nodes, "seed": seed,
                           "mean_node": sum(singles) / len(singles), "best_node": max(singles),
                           "consensus_distance": summary["final_consensus_distance"]}
    base = "init" if algo in SHARED_INIT else "mean"
    for method in METHODS:
        opts = MergeOptions(method=method, base=base, fisher_samples=args.fisher_samples,
                            seed=seed)
        row[method] = task.evaluate(merge(models, opts).model)["accuracy"]
    row["base"] = base
    row["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    cols = ("mean_node", "best_node", *METHODS)
    seeds = sorted({r["seed"] for r in rows})
    head = "| algo | nodes | " + " | ".join(c.replace("_", " ") for c in cols) + " |"
    lines = [head, "|" + "---|" * 2 + "---:|" * len(cols)]
    for key in dict.fromkeys((r["algo"], r["nodes"]) for r in rows):
        runs = [r for r in rows if (r["algo"], r["nodes"]) == key]
        cells = []
        for c in cols:
            m, sd, _ = mean_std([r[c] for r in runs])
            cells.append(f"{m:.3f}" if len(seeds) == 1 else f"{m:.3f} +- {sd:.3f}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Grouped bars: one group per (algorithm, nodes), one bar per single-node figure and
    merge; height the mean over seeds, error bar +-1 std."""
    cols = ("mean_node", "best_node", *METHODS)
    keys = list(dict.fromkeys((r["algo"], r["nodes"]) for r in rows))
    fig = figure(max(6.0, 1.6 * len(keys) + 2.0), 4.5)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(cols)
    for j, c in enumerate(cols):
        stats = [mean_std([r[c] for r in rows if (r["algo"], r["nodes"]) == k]) for k in keys]
        ax.bar([i + (j - (len(cols) - 1) / 2) * width for i in range(len(keys))],
               [m for m, _, _ in stats], width, yerr=[sd for _, sd, _ in stats], capsize=2,
               label=c.replace("_", " "), color="grey" if c == "mean_node" else None)
    ax.set_xticks(range(len(keys)), [f"{a}\n{n} nodes" for a, n in keys])
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize="small", ncol=len(cols), loc="lower center")
    ax.set_title(title, fontsize="small")
    return save(fig, out, "soups")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--nodes", default="16,64")
    p.add_argument("--seeds", default="0")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--local-steps", type=int, default=10)
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--init", default="default", choices=("default", "xavier"))
    p.add_argument("--fisher-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/soups")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    seeds = parse_seeds(args.seeds)
    sizes = [int(n) for n in args.nodes.split(",")]
    algos = [a for a in args.algos.split(",") if a]
    if args.quick:
        sizes, args.rounds, args.local_steps, args.fisher_samples = [8], 3, 5, 32
    torch.set_num_threads(args.threads)
    rows = []
    for seed in seeds:
        for nodes in sizes:
            for algo in algos:
                row = one_run(algo, nodes, seed, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soups.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    title = (f"test accuracy, digits, {args.partition}, {args.rounds} rounds x "
             f"{args.local_steps} local steps, seeds {args.seeds}")
    print(f"\n{title} (best node: by test accuracy)")
    print(table(rows))
    print(f"plots: {', '.join(str(x) for x in plot(rows, out, title))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
