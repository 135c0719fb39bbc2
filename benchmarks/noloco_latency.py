"""NoLoCo's latency model (Kolehmainen et al. 2025, arXiv 2506.10911, Section 5.3, Eqs. 5-7,
Fig. 5A): how much longer a tree all-reduce over n workers takes than NoLoCo's pair average.

The model, as in the paper:

- a message takes ``t`` seconds, log-normal with mean ``t_c`` (``t = t_c`` without jitter);
- a tree all-reduce reduces up a binary tree and broadcasts back down, ``log2 n`` levels each way;
  a tree node moves on when the messages of both its children have arrived (Eq. 6), so without
  jitter it takes ``2 t_c log2 n`` (Eq. 5);
- a pair average is the same over a group of two: ``2 t_c`` without jitter, and with jitter
  ``2 E[max(t1, t2)] = 2 (1 + erf(sigma / 2)) t_c`` (Eq. 7, sigma the log-normal's shape);
- so the ratio is ``log2 n`` without jitter, and grows with the jitter because a tree waits for
  the slowest of many paths.

The times come from the simulator's network model (:mod:`simulations.network`): every tree node
is a node of a :class:`simulations.network.SimClock`, every tree level one ``exchange`` event in
which a node waits for the messages sent to it, each message ``latency * noise`` with the
model's mean-one log-normal noise of shape ``jitter`` (so ``t_c = latency``). Jitter is given as
std/mean of the message time, ``r = sqrt(exp(sigma^2) - 1)``. ``--reps`` independent trees run
side by side in one clock.

Prints one JSON line per (n, jitter) and a Fig. 5A-style table; writes
``noloco_latency.png/.svg`` and ``noloco_latency.json`` to ``--out``.

    python benchmarks/noloco_latency.py                   # n = 4..1024, jitter 0..2.5
    python benchmarks/noloco_latency.py --quick
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.figures import figure, save
from gossip.comm.stacked import CommEvent
from simulations.network import NetworkModel, SimClock

SIZES = (4, 16, 64, 256, 1024)
JITTERS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5)


def sigma_for(ratio: float) -> float:
    """The log-normal shape sigma whose std/mean is ``ratio``."""
    return math.sqrt(math.log1p(ratio * ratio))


def expected_max_of_two(sigma: float, mean: float = 1.0) -> float:
    """Eq. 7: ``E[max(t1, t2)] = (1 + erf(sigma / 2)) * mean`` for i.i.d. log-normal t."""
    return (1.0 + math.erf(sigma / 2.0)) * mean


def closed_form_ratio(n: int) -> float:
    """Eq. 5 over the pair average without jitter: ``2 t_c log2 n / (2 t_c) = log2 n``."""
    return math.log2(n)


def _tree_events(n: int, reps: int) -> list[Tensor]:
    """Peer tables of a tree all-reduce over ``n`` leaves, ``reps`` trees side by side.

    Tree slots in heap order (root 0, children ``2i+1``, ``2i+2``, leaves ``n-1 .. 2n-2``), tree
    r's slots offset by ``r (2n - 1)``. Returns the reduce levels (each internal node receives
    from its two children), deepest first, then the broadcast levels (each node receives from
    its parent), top first.
    """
    levels = int(math.log2(n))
    if 2**levels != n:
        raise ValueError(f"n={n} is invalid: expected a power of two")
    slots = 2 * n - 1
    offset = (torch.arange(reps) * slots).repeat_interleave(slots)
    local = torch.arange(slots).repeat(reps)
    depth = torch.floor(torch.log2((local + 1).double())).long()
    events = []
    for d in range(levels - 1, -1, -1):  # reduce: depth d receives from depth d + 1
        table = torch.full((reps * slots, 2), -1, dtype=torch.long)
        at = depth == d
        table[at, 0] = offset[at] + 2 * local[at] + 1
        table[at, 1] = offset[at] + 2 * local[at] + 2
        events.append(table)
    for d in range(1, levels + 1):  # broadcast: depth d receives from its parent
        table = torch.full((reps * slots, 1), -1, dtype=torch.long)
        at = depth == d
        table[at, 0] = offset[at] + (local[at] - 1) // 2
        events.append(table)
    return events


def tree_allreduce_seconds(n: int, *, jitter: float, latency: float = 1.0, reps: int = 300,
                           seed: int = 0) -> np.ndarray:
    """Seconds until every leaf of a tree all-reduce over ``n`` workers holds the result, for
    ``reps`` independent draws (SimClock with message noise of shape ``jitter``)."""
    model = NetworkModel(latency=latency, jitter=jitter, compute_time=0.0, seed=seed)
    slots = 2 * n - 1
    clock = SimClock(model, reps * slots)
    alive = torch.ones(reps * slots, dtype=torch.bool)
    for k, table in enumerate(_tree_events(n, reps)):
        clock.communicate(0, k, CommEvent("exchange", 0, table, None, None), alive)
    leaves = clock.t.reshape(reps, slots)[:, n - 1:]
    return leaves.max(axis=1)


def measure(sizes: Sequence[int], ratios: Sequence[float], *, reps: int, seed: int
            ) -> list[dict[str, float]]:
    rows = []
    for r in ratios:
        sigma = sigma_for(r)
        pair = tree_allreduce_seconds(2, jitter=sigma, reps=max(reps, 20_000), seed=seed)
        for n in sizes:
            tree = tree_allreduce_seconds(n, jitter=sigma, reps=reps, seed=seed + 1)
            rows.append({
                "n": n, "jitter_std_over_mean": r, "sigma": sigma,
                "allreduce_seconds": float(tree.mean()),
                "pair_seconds": float(pair.mean()),
                "pair_seconds_eq7": 2 * expected_max_of_two(sigma),
                "ratio": float(tree.mean() / pair.mean()),
                "closed_form_no_jitter": closed_form_ratio(n)})
    return rows


def plot(rows: Sequence[dict[str, float]], out: Path) -> list[Path]:
    fig = figure(6.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for n in sorted({int(r["n"]) for r in rows}):
        pts = [r for r in rows if r["n"] == n]
        ax.plot([p["jitter_std_over_mean"] for p in pts], [p["ratio"] for p in pts],
                marker="o", label=f"n = {n}")
    ax.set_xlabel("message time std / mean")
    ax.set_ylabel("tree all-reduce time / pair-average time")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("NoLoCo latency model (Fig. 5A), simulator network model", fontsize="medium")
    return save(fig, out, "noloco_latency")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--jitters", default=",".join(map(str, JITTERS)),
                   help="message time std/mean values")
    p.add_argument("--reps", type=int, default=300, help="independent trees per point")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/noloco_latency")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    ratios = [float(s) for s in args.jitters.split(",")]
    if args.quick:
        sizes, ratios, args.reps = [4, 16], [0.0, 1.0], 200
    rows = measure(sizes, ratios, reps=args.reps, seed=args.seed)
    for row in rows:
        print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "noloco_latency.json").write_text(json.dumps(rows, indent=2) + "\n")
    plots = plot(rows, out)
    print(f"\nall-reduce / pair-average time ({args.reps} trees per point)")
    print(f"{'std/mean':>9}" + "".join(f"{'n=' + str(n):>9}" for n in sizes))
    print(f"{'log2 n':>9}" + "".join(f"{closed_form_ratio(n):>9.2f}" for n in sizes))
    for r in ratios:
        cells = [next(x["ratio"] for x in rows if x["n"] == n and x["jitter_std_over_mean"] == r)
                 for n in sizes]
        print(f"{r:>9.2f}" + "".join(f"{c:>9.2f}" for c in cells))
    print(f"plots: {', '.join(str(x) for x in plots)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
