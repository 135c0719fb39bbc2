"""Where a simulated round's time goes: rounds per second and the top functions of a profile.

The FedAvg digits workload of ``sim_end_to_end.py`` (MLP 64-128-10, one local epoch of SGD lr 0.05
with batch 16 per round, Dirichlet 0.5 label skew; ``sample:dirichlet:0.5`` beyond the 1,437
training samples) through :class:`simulations.engine.Simulation` in this process: one warm-up
round, then ``--rounds`` timed rounds with the global model evaluated every round and as many
without evaluation, each device synchronised before the clock stops; then the same evaluated
rounds under cProfile (its top functions by own time).

    python benchmarks/sim_profile.py --nodes 1000
    python benchmarks/sim_profile.py --nodes 10000 --device cuda --rounds 50
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations.config import SimConfig
from simulations.engine import Simulation


def timed(sim: Simulation, first: int, rounds: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for r in range(first, first + rounds):
        sim.run_round(r)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per measurement")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=15, help="functions listed from the profile")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.nodes
    base = {"algo": "fedavg", "task": "digits", "nodes": n, "batch_size": 16,
            "partition": "dirichlet:0.5" if n <= 1437 else "sample:dirichlet:0.5",
            "optimizer": "sgd", "lr": 0.05, "local_epochs": 1, "progress": False,
            "threads": args.threads, "device": args.device, "rounds": 2 * args.rounds + 1}
    out: dict[str, object] = {"bench": "sim_profile", "nodes": n, "device": args.device,
                              "threads": args.threads, "torch": torch.__version__}
    for label, every in (("eval_every_round", 1), ("no_eval", 10**9)):
        sim = Simulation(SimConfig(**base, eval_every=every))
        steps = int(sim.round_steps.sum())
        sim.run_round(0)  # warm-up: lazy allocations, the first epoch's draws
        seconds = timed(sim, 1, args.rounds, device)
        out[label] = {"ms_per_round": 1e3 * seconds / args.rounds,
                      "client_steps_per_s": steps * args.rounds / seconds}
        if every == 1:
            prof = cProfile.Profile()
            prof.enable()
            timed(sim, 1 + args.rounds, args.rounds, device)
            prof.disable()
    print(json.dumps(out), flush=True)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
