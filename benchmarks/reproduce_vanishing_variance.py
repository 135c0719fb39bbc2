"""Reproduce the vanishing-variance effect (Tian et al. 2024, arXiv 2404.04616) on digits.

Three simulated runs per seed through the engine's Python API
(:class:`simulations.engine.Simulation`), same data split, node data, batches and seeds:

- ``fedavg``: every client each round, all nodes start from one shared model;
- ``gossip``: plain gossip learning on a random 8-regular graph, the paper's merge
  ``x <- beta x + (1 - beta) mean(received)`` with beta = 0.5, no variance correction;
- ``gossip-vc``: the same merge followed by the variance correction (each weight tensor rescaled
  to the mean variance of the received models, keeping its mean).

Models start at the paper's initialization by default (``--init xavier``: Xavier-uniform weights,
zero biases, as in Tian et al.'s code; ``--init default`` is PyTorch's Linear init). The gossip
nodes start from independent initialisations (``seed + node``: the engine's default for gossip
algorithms, ``Gossip.same_init = False``), which is what makes the merged weights' variance
collapse (about 0.28x after one 50/50 merge with 8 uncorrelated neighbours). A round is
``--local-steps`` local SGD steps (default 1: the paper trains one mini-batch between merges),
then one synchronisation.

Node data as in Tian et al.'s code (``--partition sample:dirichlet:0.5``): each node's label
weights are drawn from Dir(0.5) and its batches are drawn from the whole training set with those
weights, ``rounds x local steps x batch`` draws per node, so no batch repeats one; every node
has as many samples, so FedAvg's sample-count weights are uniform, as the authors' server
average is. ``--partition dirichlet:0.5`` is a disjoint split instead (each class split over
the nodes by Dir(0.5); at 64 nodes, seeds 0-2: shards of 4 to 63 of the 1,438 digits, about a
third of the nodes with fewer than one batch).

Rounds to a level: the first evaluated round whose mean test accuracy over the nodes (FedAvg:
of its one global model) reaches it; evaluation every round by default.

Every seed (``--seeds 0,1,2``) reruns everything (data split, node data, graph, init, batches).
Writes to ``--out`` (default ``runs/vanishing_variance``): ``accuracy.png/.svg`` (mean test
accuracy across nodes vs round: the mean over seeds, +-1 std shaded), ``variance.png/.svg``
(per-layer weight variance vs round: the mean over nodes of each node's variance of that tensor,
mean over seeds, +-1 std shaded), ``summary.json``, and one run directory per algorithm and seed
(``ALGO/seed_S``; a rerun replaces them). Prints one JSON line per run, one per algorithm with
rounds to 50/80/90 % mean test accuracy (first crossing, and sustained) as mean and std over the
seeds that reached it, the issue's two checks, the sustained ratio to 80 %, and a table.

    python benchmarks/reproduce_vanishing_variance.py                 # 3 seeds x 300 rounds
    python benchmarks/reproduce_vanishing_variance.py --seeds 0 --rounds 1000 --init default
    python benchmarks/reproduce_vanishing_variance.py --quick         # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import band, figure, mean_std, parse_seeds, save
from gossip.tasks import get_task
from simulations.config import SimConfig
from simulations.engine import RunRecorder, Simulation

ALGOS = ("fedavg", "gossip", "gossip-vc")
COLORS = {"fedavg": "tab:blue", "gossip": "tab:red", "gossip-vc": "tab:green"}
THRESHOLDS = (0.5, 0.8, 0.9)


def rounds_to(records: Sequence[dict[str, Any]], thresholds: Sequence[float], *,
              sustained: bool = False) -> dict[str, int | None]:
    """First evaluated round whose mean test accuracy reaches each threshold (None = never);
    ``sustained``: the first from which every later evaluated round stays at or above it."""
    accs = [(r["round"], r["accuracy_mean"]) for r in records
            if r.get("accuracy_mean") is not None]
    out: dict[str, int | None] = {}
    for t in thresholds:
        if not sustained:
            out[f"{t:g}"] = next((rnd for rnd, acc in accs if acc >= t), None)
            continue
        hit = None  # walk back from the last evaluation while it stays at or above t
        for rnd, acc in reversed(accs):
            if acc < t:
                break
            hit = rnd
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


def sim_config(algo: str, seed: int, args: argparse.Namespace) -> SimConfig:
    """One arm's simulated run. A ``sample:`` partition without ``--shard-size`` draws
    ``rounds x local steps x batch`` samples per node: no batch repeats a draw, as in Tian et
    al.'s code, where every batch is drawn from the whole training set with the node's label
    weights."""
    extra: dict[str, Any] = {}
    if algo != "fedavg":
        extra["topology"] = f"random-regular:{args.degree}"
    shard = args.shard_size
    if shard is None and args.partition.startswith("sample:"):
        shard = args.rounds * args.local_steps * args.batch_size
    return SimConfig(algo=algo, task="digits", nodes=args.nodes, rounds=args.rounds,
                     partition=args.partition, shard_size=shard, sync_every=args.local_steps,
                     lr=args.lr, momentum=args.momentum, batch_size=args.batch_size, seed=seed,
                     init=args.init, eval_every=args.eval_every, threads=args.threads,
                     progress=False, optimizer="sgd", overwrite=True, **extra)


def run_algo(algo: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    cfg = sim_config(algo, seed, args)
    task = get_task("digits", seed=seed)
    sim = Simulation(cfg, task=task)
    out = Path(args.out) / algo / f"seed_{seed}"
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
    return {"algo": algo, "seed": seed, "summary": summary, "records": recorder.records,
            "independent_init": independent,
            "rounds_to": rounds_to(recorder.records, THRESHOLDS),
            "rounds_to_sustained": rounds_to(recorder.records, THRESHOLDS, sustained=True)}


def _eval0(sim: Simulation) -> dict[str, Any]:
    """Accuracy before any training (round 0)."""
    ev = sim.evaluate()
    acc = ev["accuracy"]
    return {"accuracy_mean": float(acc.mean()), "accuracy_min": float(acc.min()),
            "accuracy_max": float(acc.max()), "sim_seconds": 0.0}


def _evaluated(res: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    recs = [r for r in res["records"] if r.get(key) is not None]
    return [r["round"] for r in recs], [r[key] for r in recs]


def plot(results: Sequence[dict[str, Any]], out: Path, title: str) -> list[Path]:
    """Accuracy and per-layer weight variance vs round: mean over seeds, +-1 std shaded."""
    algos = list(dict.fromkeys(r["algo"] for r in results))
    fig = figure(8, 5)
    ax = fig.add_subplot(1, 1, 1)
    for algo in algos:
        runs = [r for r in results if r["algo"] == algo]
        xs, _ = _evaluated(runs[0], "accuracy_mean")
        band(ax, xs, [_evaluated(r, "accuracy_mean")[1] for r in runs],
             label=f"{algo} ({len(runs)} seeds)", color=COLORS.get(algo))
    for t in THRESHOLDS:
        ax.axhline(t, color="grey", lw=0.6, ls="--")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy, mean over nodes (mean over seeds, +-1 std)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(title, fontsize="medium")
    written = save(fig, out, "accuracy")

    names = sorted({k for res in results for r in res["records"] for k in r
                    if k.startswith("var/")})
    if names:
        fig = figure(5 * len(names), 4.2)
        for j, name in enumerate(names):
            ax = fig.add_subplot(1, len(names), j + 1)
            for algo in algos:
                runs = [r for r in results if r["algo"] == algo]
                xs, _ = _evaluated(runs[0], name)
                band(ax, xs, [_evaluated(r, name)[1] for r in runs], label=algo,
                     color=COLORS.get(algo))
            ax.set_yscale("log")
            ax.set_xlabel("round")
            ax.set_ylabel("weight variance (mean over nodes)")
            ax.set_title(f"layer {name[len('var/'):]}")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize="small")
        fig.suptitle(title, fontsize="medium")
        written += save(fig, out, "variance")
    return written


def aggregate(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per algorithm: rounds to each threshold (mean, std, seeds that reached it) and the final
    mean accuracy (mean, std)."""
    table: dict[str, dict[str, Any]] = {}
    for algo in dict.fromkeys(r["algo"] for r in results):
        runs = [r for r in results if r["algo"] == algo]
        row: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for key in ("rounds_to", "rounds_to_sustained"):
            for t in THRESHOLDS:
                per_seed = [r[key][f"{t:g}"] for r in runs]
                m, sd, k = mean_std(per_seed)
                row[f"{key}_{t:g}"] = {"mean": m, "std": sd, "reached": k, "per_seed": per_seed}
        m, sd, _ = mean_std([r["summary"]["final_accuracy_mean"] for r in runs])
        row["final_accuracy_mean"] = {"mean": m, "std": sd}
        row["wall_seconds"] = sum(r["summary"]["wall_seconds"] for r in runs)
        table[algo] = row
    return table


def checks(table: dict[str, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """The issue's done-when ratios of mean rounds. Where the slower arm missed the level in
    some seed, that seed counts as ``rounds`` and the ratio is a lower bound (``*_at_least``).
    The checks use first crossings; the sustained ratio to 80 % is reported beside them."""
    def ratio(slow: str, fast: str, t: str, key: str = "rounds_to"
              ) -> tuple[float | None, bool]:
        if slow not in table or fast not in table:
            return None, False
        a, b = table[slow][f"{key}_{t}"], table[fast][f"{key}_{t}"]
        n = len(table[fast]["seeds"])
        if b["reached"] < n or not b["mean"]:
            return None, False
        filled = [rounds if v is None else v for v in a["per_seed"]]
        return sum(filled) / len(filled) / b["mean"], a["reached"] < len(filled)

    vc, vc_bound = ratio("gossip-vc", "fedavg", "0.8")
    plain, plain_bound = ratio("gossip", "fedavg", "0.5")
    vc_sus, vc_sus_bound = ratio("gossip-vc", "fedavg", "0.8", "rounds_to_sustained")
    return {"gossip_vc_over_fedavg_rounds_to_80": vc, "vc_at_least": vc_bound,
            "target_vc": "<= 1.3", "vc_ok": vc is not None and not vc_bound and vc <= 1.3,
            "gossip_over_fedavg_rounds_to_50": plain, "gossip_at_least": plain_bound,
            "target_gossip": ">= 3", "gossip_ok": plain is not None and plain >= 3.0,
            "gossip_vc_over_fedavg_sustained_80": vc_sus, "vc_sustained_at_least": vc_sus_bound}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--algos", default=",".join(ALGOS))
    p.add_argument("--nodes", type=int, default=64)
    p.add_argument("--degree", type=int, default=8, help="random regular graph degree")
    p.add_argument("--partition", default="sample:dirichlet:0.5",
                   help="sample:dirichlet:A = the paper's (each node's label weights ~ Dir(A), "
                        "its batches drawn from the whole training set); dirichlet:A = a "
                        "disjoint split (each class split over the nodes by Dir(A))")
    p.add_argument("--shard-size", type=int, default=None,
                   help="sample:* partitions: samples each node draws (default: rounds x "
                        "local steps x batch size, so no batch repeats a draw)")
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--local-steps", type=int, default=1, help="local SGD steps per round")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--init", default="xavier", choices=("default", "xavier"),
                   help="model init (xavier: the paper's)")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/vanishing_variance")
    p.add_argument("--run-plots", action=argparse.BooleanOptionalAction, default=False,
                   help="each run directory's own plots (accuracy, loss, consensus, labels)")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    args = p.parse_args(argv)
    try:
        args.seed_list = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    if args.quick:
        args.nodes, args.degree, args.rounds, args.eval_every = 12, 4, 4, 2
        args.seed_list = args.seed_list[:2]
        args.run_plots = False
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    results = []
    for seed in args.seed_list:
        for algo in algos:
            res = run_algo(algo, seed, args)
            s = res["summary"]
            print(json.dumps({"algo": algo, "seed": seed, "rounds_to": res["rounds_to"],
                              "rounds_to_sustained": res["rounds_to_sustained"],
                              "final_accuracy_mean": s["final_accuracy_mean"],
                              "independent_init": res["independent_init"],
                              "wall_seconds": round(s["wall_seconds"], 1)}), flush=True)
            results.append(res)
    title = (f"digits, {args.nodes} nodes, {args.partition}, random {args.degree}-regular "
             f"graph (gossip), {args.init} init,\n{args.local_steps} local step(s)/round, "
             f"SGD lr {args.lr}, seeds {args.seeds}")
    table = aggregate(results)
    for algo, row in table.items():
        print(json.dumps({"algo": algo, "aggregate": True, **row}), flush=True)
    check = checks(table, args.rounds)
    print(json.dumps({"checks": check}), flush=True)
    plots = plot(results, out, title)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with open(out / "summary.json", "w") as fh:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "results": table,
                   "checks": check, "load": load, "plots": [str(p) for p in plots]}, fh,
                  indent=2)
    n = len(args.seed_list)
    heads = "".join(f"{'rounds to ' + format(t, '.0%'):>22}" for t in THRESHOLDS)
    print(f"\n{args.init} init, {n} seed(s): mean +- std over the seeds that reached the level "
          f"[how many of {n}]")
    print(f"{'algo':<10}{heads} {'final mean acc':>16} {'wall s':>8}")
    for algo, row in table.items():
        cells = "".join(f"{_cell(row[f'rounds_to_{t:g}'], n):>22}" for t in THRESHOLDS)
        acc = row["final_accuracy_mean"]
        print(f"{algo:<10}{cells} {acc['mean']:>9.3f} +- {acc['std']:.3f} "
              f"{row['wall_seconds']:>8.1f}")
    print(f"gossip-vc / fedavg rounds to 80%: "
          f"{_fmt(check['gossip_vc_over_fedavg_rounds_to_80'], check['vc_at_least'])} "
          f"(target <= 1.3)   gossip / fedavg rounds to 50%: "
          f"{_fmt(check['gossip_over_fedavg_rounds_to_50'], check['gossip_at_least'])} "
          f"(target >= 3)")
    sustained = _fmt(check["gossip_vc_over_fedavg_sustained_80"], check["vc_sustained_at_least"])
    print(f"gossip-vc / fedavg rounds to 80% sustained (the first round from which the mean "
          f"accuracy stays at or above it): {sustained}")
    print(f"plots: {', '.join(str(p) for p in plots)}")
    return 0


def _cell(stat: dict[str, Any], n: int) -> str:
    if stat["reached"] == 0:
        return f"not reached [0/{n}]"
    return f"{stat['mean']:.0f} +- {stat['std']:.0f} [{stat['reached']}/{n}]"


def _fmt(x: float | None, at_least: bool = False) -> str:
    if x is None:
        return "n/a (fedavg did not reach it in every seed)"
    return f">= {x:.2f} (not reached in every seed)" if at_least else f"{x:.2f}"


if __name__ == "__main__":
    sys.exit(main())
