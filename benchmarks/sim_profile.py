"""Where a simulated round's time goes: rounds per second and the top functions of a profile.

The FedAvg digits workload of ``sim_end_to_end.py`` (MLP 64-128-10, one local epoch of SGD lr 0.05
with batch 16 per round, Dirichlet 0.5 label skew; ``sample:dirichlet:0.5`` beyond the 1,437
training samples) through :class:`simulations.engine.Simulation` in this process: one warm-up
round, then ``--rounds`` timed rounds with the global model evaluated every round and as many
without evaluation, each device synchronised before the clock stops; then the same evaluated
rounds under cProfile (its top functions by own time). Rounds run as
:func:`simulations.engine.drive` runs them: each started before the last one's figures are read.

``--first-rounds K`` also times each of the first K rounds of a fresh simulation, with and
without CUDA graphs (``cuda_graphs``): what a short run pays once (lazy allocations, a GPU's
kernel loading and cuBLAS set-up, graph recording), which the warm rounds above leave out.

    python benchmarks/sim_profile.py --nodes 1000
    python benchmarks/sim_profile.py --nodes 10000 --device cuda --rounds 50 --first-rounds 5
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
    pending = None
    for r in range(first, first + rounds):  # as drive() runs them: start r + 1, then read r
        started = sim.start_round(r)
        if pending is not None:
            pending()
        pending = started
    if pending is not None:
        pending()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def first_rounds(base: dict, k: int, device: torch.device) -> dict[str, list[float]]:
    """Milliseconds of each of the first ``k`` rounds of fresh simulations (device synchronised
    after each), with CUDA graphs on and off (on a CPU the flag changes nothing)."""
    out: dict[str, list[float]] = {}
    for graphs in (True, False):
        sim = Simulation(SimConfig(**{**base, "eval_every": 1, "cuda_graphs": graphs,
                                      "rounds": max(k, base["rounds"])}))
        times = []
        for r in range(k):
            times.append(1e3 * timed(sim, r, 1, device))
        out[f"cuda_graphs={graphs}"] = [round(t, 2) for t in times]
        del sim
    return out


def kernel_profile(sim: Simulation, first: int, rounds: int, device: torch.device,
                   top: int) -> str:
    """Device time per round against wall time under torch.profiler, and the top operators."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        wall = timed(sim, first, rounds, device)
    events = prof.key_averages()
    attr = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    if device.type == "cuda":  # the kernels' own rows (an operator's row repeats its kernels')
        from torch.autograd import DeviceType

        busy_us = sum(e.self_device_time_total for e in events
                      if e.device_type == DeviceType.CUDA)
    else:
        busy_us = sum(e.self_cpu_time_total for e in events)
    launches = sum(e.count for e in events if e.key.startswith(("cudaLaunchKernel",
                                                                 "cuLaunchKernel")))
    head = (f"under torch.profiler: {1e3 * wall / rounds:.2f} ms a round (wall), "
            f"{busy_us / 1e3 / rounds:.2f} ms of {'device' if device.type == 'cuda' else 'op'} "
            f"time a round, {launches / rounds:.0f} kernel launches a round")
    return head + "\n" + events.table(sort_by=attr, row_limit=top)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per measurement")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--top", type=int, default=15, help="functions listed from the profile")
    p.add_argument("--first-rounds", type=int, default=0, metavar="K",
                   help="also time each of the first K rounds of a fresh simulation")
    p.add_argument("--kernels", action="store_true",
                   help="also the evaluated rounds under torch.profiler: device time per round "
                        "against wall time, and the top operators by device time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n = args.nodes
    base = {"algo": "fedavg", "task": "digits", "nodes": n, "batch_size": 16,
            "partition": "dirichlet:0.5" if n <= 1437 else "sample:dirichlet:0.5",
            "optimizer": "sgd", "lr": 0.05, "local_epochs": 1, "progress": False,
            "threads": args.threads, "device": args.device, "rounds": 3 * args.rounds + 1}
    out: dict[str, object] = {"bench": "sim_profile", "nodes": n, "device": args.device,
                              "threads": args.threads, "torch": torch.__version__}
    if args.first_rounds > 0:  # first: nothing of this process is warm yet
        out["first_rounds_ms"] = first_rounds(base, args.first_rounds, device)
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
            if args.kernels:
                out["kernels"] = kernel_profile(sim, 1 + 2 * args.rounds, args.rounds, device,
                                                args.top)
    print(json.dumps({k: v for k, v in out.items() if k != "kernels"}), flush=True)
    if "kernels" in out:
        print(out["kernels"])
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
