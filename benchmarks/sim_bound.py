"""How fast the simulator's FedAvg round could be on this machine: a floor from measured parts.

Issue 9's targets are ratios to a plain per-client loop (10x at N = 100, 20x at N = 1,000, both
on 1 thread). Whether a machine allows them depends on how fast it multiplies small matrices,
how fast it streams memory and how fast it runs the loop, which differ between machines: this
script measures all three in one process and prints the ratio that a round built from them
would reach, next to the ratio the simulator reaches.

The workload is ``sim_end_to_end.py``'s: digits MLP 64-128-10, FedAvg, Dirichlet 0.5, one
local epoch of SGD lr 0.05 with batch 16, the global model evaluated every round. For each N:

- **loop**: ``sim_end_to_end.py``'s plain per-client loop (evaluation every round) in a fresh
  process, its client-steps/s over the rounds;
- **sim**: warm rounds of the simulator with evaluation every round (as
  ``sim_profile.py`` times them), its client-steps/s;
- **floor** of a round, three parts, each measured here:

  - *compute*: what one more node adds to a local step whose rows stay in cache (a step of C
    nodes less a step of one, over C - 1; C = the rows of one fused chunk; ``LocalTrainer`` on a
    simulation of C nodes), times the round's client-steps: the batched products and
    element-wise work of forward, backward and update;
  - *calls*: the round's local steps (the most any node takes) times the fixed cost of a step
    (a step of one node less one node's compute): the operator calls every step makes whatever
    its width (once per step: a step of more than C nodes, in chunks, pays some of it per
    chunk, which the floor leaves out);
  - *memory*: the round's traffic over the N stacked rows (N x 9,610 floats): the sync reads
    every row and writes the mean into every row, the local step reads and writes every row
    that trains; at the bandwidth of ``sum()`` (read) and ``fill_()`` (write) on a buffer of
    that size (in cache at N = 100, from memory at N = 1,000 on this project's machines).

  ``floor`` is their sum and ``floor_overlapped`` the largest of the three (as if memory
  traffic hid entirely behind compute). Left out, so both are below what a round can cost:
  the evaluation, the batch draws, the bookkeeping, Python.

A ratio the floor allows under a target says the target needs a different computation on that
machine (fewer passes over the rows, or faster products), not a leaner implementation of this one.

    python benchmarks/sim_bound.py                    # N = 100 and 1,000
    python benchmarks/sim_bound.py --nodes 1000 --repeats 3
    python benchmarks/sim_bound.py --quick            # smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sim_end_to_end import run_loop
from benchmarks.sim_profile import timed
from benchmarks.sim_throughput import sim_config
from simulations.engine import Simulation

TARGETS = {100: 10.0, 1000: 20.0}
SAMPLES = 1437  # the digits training set


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def simulation(nodes: int, threads: int) -> Simulation:
    cfg = sim_config(nodes, samples=SAMPLES, device="cpu", threads=threads, seed=0)
    return Simulation(dataclasses.replace(cfg, eval_every=1))


def step_costs(chunk: int, threads: int, repeats: int) -> tuple[float, float]:
    """A local step's seconds as ``fixed + per_node * k`` for k nodes in cache, from steps of
    ``chunk`` nodes and of one (of a simulation of ``chunk`` nodes): ``(per_node, fixed)``."""
    sim = simulation(chunk, threads)
    trainer, idx = sim.trainer, sim.batches.batch(sim.local_step)
    one = torch.zeros(chunk, dtype=torch.bool)
    one[0] = True
    every = median_seconds(lambda: trainer.step(idx), repeats)
    single = median_seconds(lambda: trainer.step(idx, one), repeats)
    per_node = max(0.0, every - single) / (chunk - 1)
    return per_node, max(0.0, single - per_node)


def bandwidth(numel: int, repeats: int) -> tuple[float, float]:
    """Seconds to read and to write ``numel`` float32 once (``sum`` and ``fill_``)."""
    buf = torch.ones(numel)
    read = median_seconds(buf.sum, repeats)
    write = median_seconds(lambda: buf.fill_(0.5), repeats)
    return read, write


def bound(nodes: int, rounds: int, threads: int, repeats: int) -> dict[str, Any]:
    """Each repeat measures every part once, in turn (the machines' speed drifts by minutes);
    the record holds the medians."""
    torch.set_num_threads(threads)
    sim = simulation(nodes, threads)
    steps = sim.round_steps
    client_steps = int(steps.sum())
    row = sim.model.flat.numel
    chunk = sim.trainer._chunk_rows(sim.batches.batch_size)
    trained = float((steps > 0).double().mean())  # the share of rows a round trains
    sim.run_round(0)  # warm-up: lazy allocations, the first epoch's draws
    seen: dict[str, list[float]] = {k: [] for k in ("loop", "sim", "per_node", "fixed", "read",
                                                    "write")}
    for k in range(repeats):
        loop = run_loop(nodes, rounds, threads, "cpu")  # a fresh process, as sim_end_to_end's
        if "error" in loop:
            raise RuntimeError(f"the loop failed: {loop['error']}")
        seen["loop"].append(loop["client_steps_per_s"])
        seen["sim"].append(timed(sim, 1 + k * rounds, rounds, torch.device("cpu")) / rounds)
        per_node, fixed = step_costs(max(2, min(chunk, nodes)), threads, 20)
        read, write = bandwidth(nodes * row, 5)
        for key, v in (("per_node", per_node), ("fixed", fixed), ("read", read),
                       ("write", write)):
            seen[key].append(v)
    m = {k: statistics.median(v) for k, v in seen.items()}
    parts = {"compute_ms": 1e3 * m["per_node"] * client_steps,
             "calls_ms": 1e3 * m["fixed"] * int(steps.max()),
             "memory_ms": 1e3 * (1 + trained) * (m["read"] + m["write"])}
    floor_ms = sum(parts.values())
    overlapped_ms = max(parts.values())
    loop_rate, sim_rate = m["loop"], client_steps / m["sim"]

    def ratio(ms: float) -> float:
        return client_steps / (ms / 1e3) / loop_rate

    return {"bench": "sim_bound", "nodes": nodes, "threads": threads, "repeats": repeats,
            "client_steps_per_round": client_steps, "local_steps_per_round": int(steps.max()),
            "chunk_rows": chunk, "state_mib": nodes * row * 4 / 2**20,
            "loop_client_steps_per_s": loop_rate, "sim_client_steps_per_s": sim_rate,
            "sim_round_ms": 1e3 * m["sim"], **parts, "floor_ms": floor_ms,
            "floor_overlapped_ms": overlapped_ms,
            "read_gb_per_s": nodes * row * 4 / m["read"] / 1e9,
            "write_gb_per_s": nodes * row * 4 / m["write"] / 1e9,
            "compute_us_per_client_step": 1e6 * m["per_node"],
            "step_fixed_us": 1e6 * m["fixed"],
            "ratio_sim": sim_rate / loop_rate, "ratio_floor": ratio(floor_ms),
            "ratio_floor_overlapped": ratio(overlapped_ms), "target": TARGETS.get(nodes),
            "load": os.getloadavg()[0]}


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r} is invalid: expected an integer >= {low}")
        return value
    return parse


def _node_counts(text: str) -> list[int]:
    return [_at_least(2)(v) for v in text.split(",") if v.strip()] or [_at_least(2)("")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=_node_counts, default=[100, 1000],
                   help="comma-separated N, each >= 2 (default 100,1000)")
    p.add_argument("--rounds", type=_at_least(1), default=10,
                   help="rounds per timing (default 10)")
    p.add_argument("--repeats", type=_at_least(1), default=3,
                   help="timings per measurement (median)")
    p.add_argument("--threads", type=_at_least(1), default=1, help="torch threads (default 1)")
    p.add_argument("--quick", action="store_true", help="N = 20, 2 rounds, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.rounds, args.repeats = [20], 2, 1
    print(json.dumps({"bench": "header", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                               time.gmtime()),
                      "cpus": os.cpu_count(), "load": os.getloadavg()[0],
                      "torch": torch.__version__}), flush=True)
    for n in args.nodes:
        print(json.dumps(bound(n, args.rounds, args.threads, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
