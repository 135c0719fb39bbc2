"""Compare FedAvg, DiLoCo, NoLoCo, D-PSGD and variance-corrected gossip on one non-IID task.

    python -m simulations.compare                      # digits, 16 nodes, dirichlet:0.5
    python -m simulations.compare --nodes 32 --rounds 80 --out runs/compare32

Each algorithm runs with the same data split, batches, rounds (one local epoch per round by
default) and network model; the per-algorithm settings are :data:`ALGO_SETTINGS`, chosen so every
method reaches good accuracy on digits (inner Adam/AdamW at 3e-3..5e-3 for DiLoCo/NoLoCo with
their papers' outer settings; SGD with momentum 0.9 and lr 0.05 for the others). Prints a table
(final accuracy, rounds to 90 %, bytes sent per node, simulated seconds) and writes one run
directory per algorithm plus ``comparison.png`` (all algorithms: accuracy vs round and vs
simulated seconds; PNG and SVG) and ``comparison.json`` under ``--out``.

``--seeds 0,1,2`` runs the whole comparison once per seed (data split, partition, init,
batches, graph: everything seeded) into ``--out/seed_S``, prints each algorithm's figures as
mean +- std over the seeds (sample std; rounds to 90 % over the seeds that reached it) and writes
``comparison.png/.svg`` (mean over seeds, +-1 std shaded) and ``comparison_seeds.json`` to
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __name__ == "__main__" and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
    def _startup_interrupt(*_: object) -> None:  # Ctrl-C while torch imports: no traceback
        print("interrupted during start-up: nothing was written", file=sys.stderr, flush=True)
        os._exit(130)  # at once: an import's `except BaseException` could swallow an exception

    signal.signal(signal.SIGINT, _startup_interrupt)  # main() takes Ctrl-C over


from gossip.algorithms import needs_topology
from gossip.allocator import reuse_freed_memory
from gossip.configs import parse_seeds
from gossip.metrics import NO_SPACE, atomic_write_text, no_space_message, to_jsonable
from gossip.plots import plot_comparison, plot_comparison_seeds
from gossip.records import runs_table
from gossip.run import build
from gossip.rundir import RunDir, interrupt_on_signal, interrupted_report
from simulations.config import SimConfig
from simulations.run import run

__all__ = ["ALGO_SETTINGS", "SEED_KEYS", "compare", "compare_seeds", "format_seed_table",
           "format_table", "main", "seed_stats"]

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
    # CHOCO-SGD as the paper runs it: compressed (top-10 %), consensus step gamma 0.5
    "choco": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "compress": "topk:0.1"},
}
DEFAULT_ALGOS = ("fedavg", "diloco", "noloco", "dpsgd", "gossip-vc")


def compare(algos: Sequence[str] = DEFAULT_ALGOS, *, out: str | Path | None = "runs/compare",
            progress: bool | None = None, **fields: Any) -> dict[str, dict[str, Any]]:
    """Run every algorithm with ``fields`` (shared SimConfig fields) on top of its
    :data:`ALGO_SETTINGS`; returns ``{algo: summary}`` (each with its ``records``).

    Every algorithm's config, and its run directory, is checked before the first one runs: a
    value one algorithm refuses (``nodes`` odd for NoLoCo's pairs) fails at once, not after the
    others have run."""
    configs = _configs(algos, out, progress, fields)
    results: dict[str, dict[str, Any]] = {}
    for algo, cfg in configs.items():
        t0 = time.perf_counter()
        summary = run(cfg)
        summary["wall_seconds_total"] = time.perf_counter() - t0
        results[algo] = summary
    if out is not None:
        first = next(iter(results.values()))
        title = (f"{first['task']}, {first['nodes']} nodes, {first['partition']}, "
                 f"{first['rounds']} rounds")
        plot_comparison({a: s["records"] for a, s in results.items()},
                        Path(out) / "comparison.png", title=title, formats=("png", "svg"))
        table = {a: {k: v for k, v in s.items() if k != "records"} for a, s in results.items()}
        atomic_write_text(Path(out) / "comparison.json",
                          json.dumps(to_jsonable(table), indent=2, sort_keys=True) + "\n")
    return results


def _configs(algos: Sequence[str], out: str | Path | None, progress: bool | None,
             fields: dict[str, Any]) -> dict[str, SimConfig]:
    """Each algorithm's validated SimConfig, its run directory checked (nothing is created)."""
    if isinstance(algos, str) or not algos:
        raise ValueError(f"algos={algos!r} is invalid: expected one or more of "
                         f"{sorted(ALGO_SETTINGS)}")
    for name in ("checkpoint_every", "keep_checkpoints", "resume"):  # the CLI has no flags
        if fields.get(name):  # checkpoints a comparison's --resume could not continue from
            raise ValueError(f"{name}={fields[name]!r} is invalid: a comparison does not "
                             "checkpoint its runs (python -m simulations.run "
                             "--checkpoint-every does)")
    configs: dict[str, SimConfig] = {}
    for algo in algos:
        if algo not in ALGO_SETTINGS:
            raise ValueError(f"algos: {algo!r} is not one of {sorted(ALGO_SETTINGS)}")
        if algo in configs:
            raise ValueError(f"algos: {algo!r} is given twice")
        shared = dict(fields)
        if not needs_topology(algo):
            shared.pop("topology", None)
        cfg = SimConfig(algo=algo, **{**ALGO_SETTINGS[algo], **shared},
                        out=None if out is None else str(Path(out) / algo), progress=progress)
        if needs_topology(algo) and cfg.topology is not None:  # its fit to N (D < N, ...)
            build.make_topology_for(cfg, cfg.nodes)
        if cfg.out is not None:
            RunDir(cfg.out, overwrite=cfg.overwrite).check()
        configs[algo] = cfg
    return configs


#: Summary figures aggregated over seeds by :func:`seed_stats`.
SEED_KEYS = ("final_accuracy_mean", "final_accuracy_min", "rounds_to_90", "bytes_per_node",
             "simulated_seconds", "sim_seconds_to_90", "wall_seconds_total")


def compare_seeds(algos: Sequence[str], seeds: Sequence[int], *,
                  out: str | Path | None = "runs/compare", progress: bool | None = None,
                  **fields: Any) -> dict[str, list[dict[str, Any]]]:
    """:func:`compare` once per seed (into ``out/seed_S``); returns ``{algo: [summary per
    seed]}`` and, with ``out``, writes the band plot and ``comparison_seeds.json`` there."""
    per_algo: dict[str, list[dict[str, Any]]] = {}
    for seed in seeds:  # every seed's configs checked before the first runs
        _configs(algos, None if out is None else Path(out) / f"seed_{seed}", progress,
                 {**fields, "seed": seed})
    for seed in seeds:
        sub = None if out is None else Path(out) / f"seed_{seed}"
        for algo, summary in compare(algos, out=sub, progress=progress, seed=seed,
                                     **fields).items():
            per_algo.setdefault(algo, []).append(summary)
    if out is not None:
        first = next(iter(per_algo.values()))[0]
        title = (f"{first['task']}, {first['nodes']} nodes, {first['partition']}, "
                 f"{first['rounds']} rounds, seeds {', '.join(map(str, seeds))}")
        plot_comparison_seeds({a: [s["records"] for s in runs] for a, runs in per_algo.items()},
                              Path(out) / "comparison.png", title=title,
                              formats=("png", "svg"))
        atomic_write_text(Path(out) / "comparison_seeds.json", json.dumps(to_jsonable(
            {"seeds": list(seeds), "stats": seed_stats(per_algo)}), indent=2,
            sort_keys=True) + "\n")
    return per_algo


def seed_stats(per_algo: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{algo: {key: {"mean", "std", "n"}}}`` over the seeds' summaries for :data:`SEED_KEYS`:
    mean and sample std (0 for one value) of the seeds where the figure exists (``rounds_to_90``
    is None where a seed never reached 90 %), ``n`` how many they are."""
    stats: dict[str, dict[str, Any]] = {}
    for algo, runs in per_algo.items():
        row: dict[str, Any] = {"optimizer": runs[0]["optimizer"], "lr": runs[0]["lr"],
                               "seeds": len(runs)}
        for key in SEED_KEYS:
            got = [float(s[key]) for s in runs if s.get(key) is not None]
            row[key] = {"mean": statistics.fmean(got) if got else None,
                        "std": (statistics.stdev(got) if len(got) > 1 else 0.0) if got else None,
                        "n": len(got)}
        stats[algo] = row
    return stats


def format_seed_table(stats: dict[str, dict[str, Any]]) -> str:
    """:func:`seed_stats` as a fixed-width text table (mean +- std over the seeds)."""
    def pm(cell: dict[str, Any], spec: str, scale: float = 1.0) -> str:
        if cell["mean"] is None:
            return "-"
        return f"{format(cell['mean'] / scale, spec)} +- {format(cell['std'] / scale, spec)}"

    head = (f"{'algorithm':<10} {'optimizer':<14} {'acc mean':>15} {'acc min':>15} "
            f"{'rounds→90% [seeds]':>20} {'MiB/node':>9} {'sim s':>15} {'wall s':>7}")
    lines = [head, "-" * len(head)]
    for algo, row in stats.items():
        r90 = row["rounds_to_90"]
        reached = f"{pm(r90, '.1f')} [{r90['n']}/{row['seeds']}]"
        lines.append(
            f"{algo:<10} {row['optimizer'] + ' ' + format(row['lr'], 'g'):<14} "
            f"{pm(row['final_accuracy_mean'], '.3f'):>15} "
            f"{pm(row['final_accuracy_min'], '.3f'):>15} {reached:>20} "
            f"{row['bytes_per_node']['mean'] / 2**20:>9.2f} "
            f"{pm(row['simulated_seconds'], '.1f'):>15} "
            f"{row['wall_seconds_total']['mean']:>7.1f}")
    return "\n".join(lines)


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
    parser.add_argument("--seeds", default=None,
                        help="comma-separated seeds, e.g. 0,1,2: mean +- std over them "
                             "(replaces --seed)")
    parser.add_argument("--eval-every", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the runs a previous comparison left in --out")
    args = parser.parse_args(argv)
    t0, started = time.perf_counter(), time.time()
    algos = [a.strip() for a in args.algos.split(",") if a.strip()]
    shared = dict(task=args.task, nodes=args.nodes, rounds=args.rounds, partition=args.partition,
                  topology=args.topology, local_epochs=args.local_epochs,
                  eval_every=args.eval_every, threads=args.threads, overwrite=args.overwrite)
    try:
        if args.seeds is not None:
            seeds = parse_seeds(args.seeds)
            per_algo = compare_seeds(algos, seeds, out=args.out, **shared)
        else:
            results = compare(algos, out=args.out, seed=args.seed, **shared)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, a full disk: one line naming the
        # run directories kept, no traceback
        if isinstance(e, OSError) and e.errno not in NO_SPACE:
            raise
        kept = sorted(p.parent for p in Path(args.out).glob("**/metrics.jsonl")
                      if p.stat().st_mtime >= started)  # this comparison's, not older ones
        if isinstance(e, OSError):
            print(f"error: {no_space_message(e, args.out)}", file=sys.stderr)
            print(interrupted_report(kept, reason="stopped"), file=sys.stderr)
            return 1
        print(interrupted_report(kept), file=sys.stderr)
        return 130
    if args.seeds is not None:
        first = next(iter(per_algo.values()))[0]
        print(f"{first['task']}: {first['nodes']} nodes, partition {first['partition']}, "
              f"{first['rounds']} rounds of {first['steps_per_round']} local steps, "
              f"seeds {', '.join(map(str, seeds))}: mean +- std over the seeds (rounds to 90 %: "
              "over the seeds that reached it)")
        print(format_seed_table(seed_stats(per_algo)))
        print(f"total wall time {time.perf_counter() - t0:.1f} s; per-seed comparisons in "
              f"{args.out}/seed_S; comparison.png/.svg and comparison_seeds.json in {args.out}")
        return 0
    first = next(iter(results.values()))
    print(f"{first['task']}: {first['nodes']} nodes, partition {first['partition']}, "
          f"{first['rounds']} rounds of {first['steps_per_round']} local steps "
          f"({args.local_epochs} local epoch(s) of the largest shard), seed {args.seed}")
    print(format_table(results))
    print(f"total wall time {time.perf_counter() - t0:.1f} s; run directories, comparison.png "
          f"and comparison.json in {args.out}")
    return 0


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C is main()'s from here
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt_on_signal)
    sys.exit(main())
