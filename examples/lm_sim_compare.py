"""A small transformer language model in the simulator: DiLoCo against NoLoCo on 16 nodes.

The task is defined here (:func:`make_task`): a character-level GPT (``gossip.tasks.CharGPT``,
2 layers) on the Python standard library's own sources, as the built-in ``charlm`` task but
smaller, given to the simulator as ``--task lm_sim_compare:make_task``. Both algorithms run with
the same inner optimizer (Adam), H and seed; the script prints a table of final test loss,
next-character accuracy, bytes sent per node and simulated time.

    python examples/lm_sim_compare.py --rounds 20 --sync-every 10 --out runs/lm_compare
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gossip.tasks import Task, get_task
from simulations.config import SimConfig
from simulations.run import run


def make_task(seed: int = 0) -> Task:
    """A 2-layer character GPT (d_model 32, context 16) on 40k characters."""
    return get_task("charlm", seed=seed, context=16, max_chars=40_000, d_model=32,
                    n_layers=2, n_heads=2)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=16)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--sync-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="runs/lm_sim_compare")
    args = p.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # make_task by import path
    rows = []
    for algo in ("diloco", "noloco"):
        cfg = SimConfig(algo=algo, task="lm_sim_compare:make_task", nodes=args.nodes,
                        rounds=args.rounds, sync_every=args.sync_every, optimizer="adam",
                        lr=3e-3, batch_size=args.batch_size, eval_every=args.rounds,
                        out=str(Path(args.out) / algo), progress=False)  # all 249 test windows
        s = run(cfg)
        rows.append((algo, s["final_loss_mean"], s["final_accuracy_mean"],
                     s["bytes_per_node"] / 2**20, s["simulated_seconds"]))
    print(f"char-level GPT, {args.nodes} nodes, {args.rounds} rounds x H={args.sync_every}")
    print(f"{'algorithm':<10}{'test loss':>10}{'acc':>8}{'MiB/node':>10}{'sim s':>8}")
    for algo, loss, acc, mib, sim_s in rows:
        print(f"{algo:<10}{loss:>10.4f}{acc:>8.4f}{mib:>10.2f}{sim_s:>8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
