"""Reproduce NoLoCo vs DiLoCo (Kolehmainen et al. 2025, arXiv 2506.10911: Table 2, Fig. 3A/3B,
Section 5.3) on the ``charlm`` char-level GPT, scaled to 2 CPU cores, with seeds.

Arms (every one: the same shared initial model, the same iid shards, inner Adam with linear
warm-up and cosine decay, gradient clipping 1.0 per replica, as in the paper):

- ``allreduce``: the paper's FSDP/DDP reference, an all-reduce of gradients every step. Run
  exactly, not approximated: DDP averages the replicas' gradients (each the mean loss gradient of
  its own batch of B samples), clips the average and takes one Adam step that every replica
  repeats. With equal batches that average is the gradient of the mean loss over the union of
  the replicas' batches, so ONE model trained on the concatenated batches (replica i's batch at
  step s is :func:`gossip.batching.node_batch` of its shard, the very samples simulated node i
  draws) is bit-for-bit what every DDP replica holds. DiLoCo/FedAvg with H = 1 would not be:
  averaging parameters after N separate Adam steps (each with its own moments) is local Adam,
  not Adam on the averaged gradient.
- ``diloco-hb``: the paper's DiLoCo baseline, H = 100, heavy-ball outer step
  ``delta = 0.3 delta - 0.7 g; phi += delta`` (``jkolehm/noloco`` ``PipelineDiLoCoOptimizer``),
  i.e. torch SGD with lr 0.7, momentum 0.3, no Nesterov.
- ``diloco-nesterov``: DiLoCo as torchft/OpenDiLoCo run it: SGD lr 0.7, momentum 0.9,
  Nesterov, same H.
- ``noloco``: the paper's settings, H = 50, pairs, alpha 0.5, beta = gamma = 0.7.

Metrics, as the paper defines them:

- validation perplexity ``exp(mean over replicas of each replica's test loss)`` (the reference
  code sums the replicas' validation losses); DiLoCo's replicas hold one model after the sync;
- Eq. 4, relative perplexity difference at the same step:
  ``(PPL_DiLoCo - PPL_NoLoCo) / PPL_allreduce`` (positive: NoLoCo better), Fig. 3A;
- the std of the weights across replicas (the code's ``eval_weight_variance``:
  ``sqrt(sum over parameters and replicas of (p - mean_p)^2 / (numel * N))``), Fig. 3B. It is
  computed from the simulator's consensus distance ``(1/N) sum_i ||x_i - mean||^2`` as
  ``sqrt(consensus / numel)``, right after each sync. DiLoCo's replicas are identical then (0).

Evaluations happen every ``--eval-every`` steps (a multiple of both H) so all arms are compared
at the same steps; NoLoCo is also evaluated after every outer step for Fig. 3B.

A second part prints the latency model of Section 5.3 (Eqs. 5-7, Fig. 5A) from
:mod:`benchmarks.noloco_latency` (``--no-latency`` skips it).

Writes to ``--out`` (default ``runs/reproduce_noloco``): ``fig3a_relative_ppl.png/.svg``,
``fig3b_weight_std.png/.svg``, ``perplexity.png/.svg`` (every arm, mean over seeds +-1 std),
``summary.json``, and the latency part's files under ``latency/``.

    python benchmarks/reproduce_noloco.py                       # 4 arms x 3 seeds, 8 replicas
    python benchmarks/reproduce_noloco.py --replicas 16 --seeds 0
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

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import noloco_latency
from benchmarks.figures import band, figure, mean_std, parse_seeds, save
from gossip.batching import node_batch
from gossip.run.build import make_shards, scheduled_lr
from gossip.run.schedule import lr_factor
from gossip.tasks import Task, get_task
from simulations.config import SimConfig
from simulations.run import run

ARMS = ("allreduce", "diloco-hb", "diloco-nesterov", "noloco")
COLORS = {"allreduce": "black", "diloco-hb": "tab:blue", "diloco-nesterov": "tab:purple",
          "noloco": "tab:red"}
#: Outer settings per simulated arm (SimConfig fields); H is added from the flags.
OUTER: dict[str, dict[str, Any]] = {
    "diloco-hb": {"algo": "diloco", "outer_lr": 0.7, "outer_momentum": 0.3, "nesterov": False},
    "diloco-nesterov": {"algo": "diloco", "outer_lr": 0.7, "outer_momentum": 0.9,
                        "nesterov": True},
    "noloco": {"algo": "noloco", "noloco_alpha": 0.5, "noloco_beta": 0.7, "noloco_gamma": 0.7,
               "group_size": 2},
}


# ----------------------------------------------------------------------------- metrics


def weight_std(consensus_distance: float, numel: int) -> float:
    """``eval_weight_variance`` of the NoLoCo code from the simulator's consensus distance
    ``(1/N) sum_i ||x_i - mean||^2`` over ``numel`` parameters per replica."""
    return math.sqrt(max(consensus_distance, 0.0) / numel)


def relative_ppl_difference(diloco: float, noloco: float, reference: float) -> float:
    """Eq. 4: ``(PPL_DiLoCo - PPL_NoLoCo) / PPL_FSDP`` (positive: NoLoCo is better)."""
    return (diloco - noloco) / reference


# ----------------------------------------------------------------------------- arms


def scaled_task(args: argparse.Namespace) -> Task:
    return get_task("charlm", seed=0, context=args.context, max_chars=args.max_chars,
                    d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads)


def sim_config(arm: str, seed: int, args: argparse.Namespace) -> SimConfig:
    """The simulator config of a DiLoCo or NoLoCo arm."""
    h = args.h_noloco if arm == "noloco" else args.h_diloco
    eval_every = 1 if arm == "noloco" else args.eval_every // h
    return SimConfig(**OUTER[arm], task="charlm", nodes=args.replicas, rounds=args.steps // h,
                     sync_every=h, seed=seed, partition="iid", optimizer="adam", lr=args.lr,
                     batch_size=args.batch_size, grad_clip=args.clip,
                     schedule="warmup-cosine", warmup_steps=args.warmup_steps,
                     eval_every=eval_every, progress=False, threads=args.threads)


def run_sim(arm: str, task: Task, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """``[{step, ppl, weight_std}]`` of one simulated arm, after each evaluated sync."""
    summary = run(sim_config(arm, seed, args), task=task)
    numel = sum(p.numel() for p in task.make_model(seed).parameters() if p.requires_grad)
    return [{"step": r["step"], "ppl": math.exp(r["loss_mean"]),
             "weight_std": weight_std(r["consensus_distance"], numel)}
            for r in summary["records"] if r.get("loss_mean") is not None]


def run_allreduce(task: Task, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The DDP reference (module docstring): one model, Adam on the replicas' mean gradient."""
    spec = sim_config("diloco-hb", seed, args).resolved(task)  # the same shards and schedule
    shards = make_shards(spec, task, args.replicas)
    model = task.make_model(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    rows = []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = scheduled_lr(spec, step, args.steps)
        idx = np.concatenate([node_batch(s, args.batch_size, seed=seed, node=i, step=step)
                              for i, s in enumerate(shards)])
        x, y = task.data.train_batch(torch.as_tensor(idx))
        loss = task.loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        if (step + 1) % args.eval_every == 0:
            test_loss = task.evaluate(model)["loss"]
            rows.append({"step": step + 1, "ppl": math.exp(test_loss), "weight_std": 0.0})
    return rows


def run_arm(arm: str, task: Task, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    if arm == "allreduce":
        return run_allreduce(task, seed, args)
    return run_sim(arm, task, seed, args)


# ----------------------------------------------------------------------------- aggregation


def at_steps(rows: Sequence[dict[str, Any]], key: str, steps: Sequence[int]) -> list[float]:
    by_step = {r["step"]: r[key] for r in rows}
    return [by_step[s] for s in steps]


def eq4_series(runs: dict[tuple[str, int], list[dict[str, Any]]], diloco: str, seed: int,
               steps: Sequence[int]) -> list[float]:
    ref = at_steps(runs[("allreduce", seed)], "ppl", steps)
    dil = at_steps(runs[(diloco, seed)], "ppl", steps)
    nol = at_steps(runs[("noloco", seed)], "ppl", steps)
    return [relative_ppl_difference(d, n, r) for d, n, r in zip(dil, nol, ref, strict=True)]


def final_table(runs: dict[tuple[str, int], list[dict[str, Any]]], arms: Sequence[str],
                seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    table = {}
    for arm in arms:
        finals = [runs[(arm, s)][-1]["ppl"] for s in seeds]
        m, sd, _ = mean_std(finals)
        table[arm] = {"mean": m, "std": sd, "per_seed": finals}
    return table


def lr_at(args: argparse.Namespace, steps: Sequence[int]) -> list[float]:
    """The inner lr of the last step before each of ``steps`` (1-based step counts)."""
    return [args.lr * lr_factor("warmup-cosine", s - 1, args.steps, args.warmup_steps)
            for s in steps]


# ----------------------------------------------------------------------------- plots


def plot(runs: dict[tuple[str, int], list[dict[str, Any]]], arms: Sequence[str],
         seeds: Sequence[int], common: Sequence[int], args: argparse.Namespace,
         title: str) -> list[Path]:
    out = Path(args.out)
    written: list[Path] = []
    fig = figure(7, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for arm in arms:
        band(ax, list(common), [at_steps(runs[(arm, s)], "ppl", common) for s in seeds],
             label=arm, color=COLORS[arm])
    ax.set_xlabel("inner step")
    ax.set_ylabel("validation perplexity (mean over seeds, +-1 std)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title, fontsize="small")
    written += save(fig, out, "perplexity")

    dilocos = [a for a in ("diloco-hb", "diloco-nesterov") if a in arms]
    if {"allreduce", "noloco"} <= set(arms) and dilocos:
        fig = figure(7, 4.5)
        ax = fig.add_subplot(1, 1, 1)
        for diloco in dilocos:
            band(ax, list(common), [eq4_series(runs, diloco, s, common) for s in seeds],
                 label=f"({diloco} - noloco) / allreduce", color=COLORS[diloco])
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("inner step")
        ax.set_ylabel("relative perplexity difference (Eq. 4)")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title(f"Fig. 3A at this scale (> 0: NoLoCo better)\n{title}", fontsize="small")
        written += save(fig, out, "fig3a_relative_ppl")

    if "noloco" in arms:
        steps = [r["step"] for r in runs[("noloco", seeds[0])]]
        fig = figure(7, 4.5)
        ax = fig.add_subplot(1, 1, 1)
        band(ax, steps, [at_steps(runs[("noloco", s)], "weight_std", steps) for s in seeds],
             label="noloco: std of weights across replicas", color=COLORS["noloco"])
        ax.set_xlabel("inner step")
        ax.set_ylabel("weight std across replicas")
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot(steps, lr_at(args, steps), color="grey", ls="--", label="inner lr")
        lr_ax.set_ylabel("inner learning rate")
        lines = ax.get_legend_handles_labels()
        more = lr_ax.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize="small")
        ax.set_title(f"Fig. 3B at this scale (after each outer step; DiLoCo: 0)\n{title}",
                     fontsize="small")
        written += save(fig, out, "fig3b_weight_std")
    return written


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {ARMS}")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--replicas", type=int, default=8, help="data-parallel replicas N (8 or 16)")
    p.add_argument("--steps", type=int, default=600, help="inner steps per replica")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3, help="peak inner Adam lr")
    p.add_argument("--clip", type=float, default=1.0, help="gradient norm clip per replica")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per replica per step")
    p.add_argument("--h-diloco", type=int, default=100, help="DiLoCo's H (paper: 100)")
    p.add_argument("--h-noloco", type=int, default=50, help="NoLoCo's H (paper: 50)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="steps between evaluations of every arm (a multiple of both H)")
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--max-chars", type=int, default=200_000)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--latency", action=argparse.BooleanOptionalAction, default=True,
                   help="print the latency model's Fig. 5A table (benchmarks/noloco_latency.py)")
    p.add_argument("--latency-args", default="",
                   help="extra arguments of noloco_latency.py, e.g. '--quick'")
    p.add_argument("--out", default="runs/reproduce_noloco")
    args = p.parse_args(argv)
    try:
        args.seed_list = parse_seeds(args.seeds)
        check_args(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_args(args: argparse.Namespace) -> None:
    args.arm_list = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arm_list if a not in ARMS]
    if unknown or not args.arm_list:
        raise ValueError(f"arms={args.arms!r} is invalid: expected a list from {ARMS}")
    for name in ("replicas", "steps", "h_diloco", "h_noloco", "eval_every", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name}={getattr(args, name)!r} is invalid: expected >= 1")
    if args.replicas % 2:
        raise ValueError(f"replicas={args.replicas} is invalid: expected an even number "
                         "(NoLoCo pairs)")
    for name in ("h_diloco", "h_noloco"):
        if args.eval_every % getattr(args, name):
            raise ValueError(f"eval_every={args.eval_every} is invalid: expected a multiple "
                             f"of {name}={getattr(args, name)}")
    if args.steps % args.eval_every:
        raise ValueError(f"steps={args.steps} is invalid: expected a multiple of "
                         f"eval_every={args.eval_every}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = scaled_task(args)
    numel = sum(p.numel() for p in task.make_model(0).parameters())
    print(f"charlm: d_model {args.d_model}, {args.n_layers} layers, context {args.context}, "
          f"{numel:,} parameters, {task.data.num_train:,} train / {task.data.num_test:,} test "
          f"windows; {args.replicas} replicas x batch {args.batch_size}, {args.steps} steps "
          f"(warm-up {args.warmup_steps}, cosine to 0), Adam lr {args.lr:g}, clip {args.clip:g}",
          flush=True)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    walls: dict[str, float] = dict.fromkeys(args.arm_list, 0.0)
    for seed in args.seed_list:
        for arm in args.arm_list:
            t0 = time.perf_counter()
            runs[(arm, seed)] = run_arm(arm, task, seed, args)
            wall = time.perf_counter() - t0
            walls[arm] += wall
            print(json.dumps({"arm": arm, "seed": seed, "final_ppl": runs[(arm, seed)][-1]["ppl"],
                              "wall_seconds": round(wall, 1)}), flush=True)
    common = list(range(args.eval_every, args.steps + 1, args.eval_every))
    table = final_table(runs, args.arm_list, args.seed_list)
    n = len(args.seed_list)
    print(f"\nfinal validation perplexity after {args.steps} steps, mean +- std over {n} seed(s)")
    print(f"{'arm':<16}{'H':>5}{'ppl':>18}   per seed{'':<16}{'wall s':>8}")
    for arm, row in table.items():
        h = {"allreduce": 1, "noloco": args.h_noloco}.get(arm, args.h_diloco)
        seeds = " ".join(f"{v:.3f}" for v in row["per_seed"])
        print(f"{arm:<16}{h:>5}{row['mean']:>10.3f} +- {row['std']:.3f}   {seeds:<24}"
              f"{walls[arm]:>8.1f}")
    result: dict[str, Any] = {"final_ppl": table}
    if {"allreduce", "noloco"} <= set(args.arm_list):
        for diloco in ("diloco-hb", "diloco-nesterov"):
            if diloco not in args.arm_list:
                continue
            per_seed = [eq4_series(runs, diloco, s, common) for s in args.seed_list]
            cells = [mean_std([p[i] for p in per_seed]) for i in range(len(common))]
            result[f"eq4_{diloco}"] = {"steps": common, "mean": [c[0] for c in cells],
                                       "std": [c[1] for c in cells]}
            print(f"Eq. 4 ({diloco} - noloco) / allreduce, mean over seeds, at steps "
                  f"{common[0]}..{common[-1]}: "
                  + " ".join(f"{c[0]:+.3f}" for c in cells))
    if "noloco" in args.arm_list:
        steps = [r["step"] for r in runs[("noloco", args.seed_list[0])]]
        stds = [float(np.mean([at_steps(runs[("noloco", s)], "weight_std", steps)[i]
                               for s in args.seed_list])) for i in range(len(steps))]
        lrs = lr_at(args, steps)
        corr = float(np.corrcoef(stds, lrs)[0, 1]) \
            if len(steps) > 2 and np.std(stds) > 0 and np.std(lrs) > 0 else None
        peak = steps[int(np.argmax(stds))]
        result["noloco_weight_std"] = {"steps": steps, "mean": stds, "peak_step": peak,
                                       "pearson_with_lr": corr}
        print(f"NoLoCo weight std across replicas: peak {max(stds):.2e} at step {peak} "
              f"(warm-up ends at {args.warmup_steps}), final {stds[-1]:.2e}; Pearson "
              f"correlation with the inner lr {corr if corr is None else format(corr, '.2f')} "
              "(paper: 0.91-0.97)")
    order = sorted(table, key=lambda a: table[a]["mean"])
    print("ordering by mean final perplexity (best first): " + " < ".join(order)
          + "   (paper, Table 2: FSDP < NoLoCo < DiLoCo)")
    title = (f"charlm {numel:,} params, {args.replicas} replicas, {args.steps} steps, "
             f"seeds {args.seeds}")
    plots = plot(runs, args.arm_list, args.seed_list, common, args, title)
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with open(out / "summary.json", "w") as fh:
        json.dump({"args": {k: v for k, v in vars(args).items()}, "numel": numel, **result,
                   "runs": {f"{a}/seed_{s}": r for (a, s), r in runs.items()},
                   "load": load, "plots": [str(p) for p in plots]}, fh, indent=2)
    print(f"plots: {', '.join(str(p) for p in plots)}", flush=True)
    if args.latency:
        print("\nlatency model (Section 5.3, Eqs. 5-7, Fig. 5A): benchmarks/noloco_latency.py",
              flush=True)
        return noloco_latency.main(["--out", str(out / "latency"), *args.latency_args.split()])
    return 0


if __name__ == "__main__":
    sys.exit(main())
