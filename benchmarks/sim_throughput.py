"""Simulator throughput against the plain per-client PyTorch loop a researcher writes by hand.

Workload (the digits task): MLP 64-128-10, batch 16, one local epoch per round, SGD lr 0.05,
FedAvg over every client each round, Dirichlet(0.5) label skew over N clients.

(a) **simulator**: the real engine path, :meth:`simulations.engine.Simulation.run_round`
    (batch schedule, vectorized local steps with per-node masks, the FedAvg object syncing
    through the stacked communicator, network/time model); no evaluation inside the timed
    rounds (``eval_every`` past the end).
(b) **loop**: for each client: its own ``nn.Module`` loaded from the global ``state_dict``, a
    fresh ``torch.optim.SGD``, its batches (a ``torch.randperm`` per epoch, batches of 16 that
    wrap around like the simulator's), then the global model = the sample-weighted mean of the
    clients' ``state_dict``\\ s. The same shards, the same number of steps per client and
    round, the same initial model.

Both run in this process with the same ``torch.set_num_threads`` (``--threads``; the loop's
turns may use another count, ``--loop-threads``: say, its best against the simulator's best) and
take turns, repeat by repeat (``--repeats``; each repeat times ``--rounds`` rounds after a
warm-up round), so machine noise hits them alike; medians are reported, in wall-clock seconds
and in CPU seconds of this process (the CPU figure is steadier on a loaded machine). A
client-step is one local SGD step of one client; both sides do exactly ``sum_i ceil(n_i / 16)``
of them per round.

Memory (``--memory``): a child process per N (and per algorithm of ``--memory-algos``: the
FedAvg workload, and gossip-VC merging over a random 8-regular graph) builds the simulation and
trains ``--rounds`` rounds; peak RSS (VmHWM, reset through /proc/self/clear_refs after the
task's data is loaded) minus the RSS at that point, divided by N, against the bytes of one
node's state tensors (parameters + gradients + optimizer state = what a per-node PyTorch model
needs). On CUDA:
``torch.cuda.max_memory_allocated``.

N larger than the training set (``--big-nodes``, default 10000 > 1437 samples): a disjoint
Dirichlet partition cannot give every node a sample, so those runs use the engine's
``sample:dirichlet:0.5`` partition (each node draws its own 16-sample shard with Dirichlet
class proportions; shards overlap).

Prints one JSON line per measurement on stdout.

    python benchmarks/sim_throughput.py                       # N=100,1000 + 10000, memory
    python benchmarks/sim_throughput.py --nodes 1000 --repeats 7 --no-memory --big-nodes 0
    python benchmarks/sim_throughput.py --quick               # smoke test (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gossip.batching import node_batch
from gossip.tasks import Task, get_task
from simulations.config import SimConfig
from simulations.engine import Simulation

BATCH, LR, ALPHA = 16, 0.05, 0.5


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - no getloadavg
        return "n/a"


#: the gossip workload of the memory measurement: Tian et al.'s merge over 8 neighbours
GOSSIP_TOPOLOGY = "random-regular:8"


def sim_config(nodes: int, *, samples: int, device: str, threads: int, seed: int,
               algo: str = "fedavg") -> SimConfig:
    partition = f"dirichlet:{ALPHA}" if nodes <= samples else f"sample:dirichlet:{ALPHA}"
    extra: dict[str, Any] = ({"client_fraction": 1.0} if algo == "fedavg"
                             else {"topology": GOSSIP_TOPOLOGY})
    return SimConfig(algo=algo, task="digits", nodes=nodes, rounds=10**6, seed=seed,
                     partition=partition, batch_size=BATCH, local_epochs=1, optimizer="sgd",
                     lr=LR, eval_every=10**6, device=device, threads=threads, progress=False,
                     **extra)


def uses_fused(sim: Simulation) -> bool:
    """Whether the simulator's trainer takes its fused SGD path."""
    trainer = sim.trainer
    applies = getattr(trainer, "fused_applies", None)
    return bool(getattr(trainer, "fused", False) and applies is not None and applies())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- the loop


class PlainLoop:
    """FedAvg written the usual way: one nn.Module per client, torch.optim.SGD, state_dicts."""

    def __init__(self, task: Task, shards: list, steps: Tensor, *, seed: int,
                 device: torch.device, batches: Callable[[int, int, int], Tensor] | None = None
                 ) -> None:
        self.task = task
        self.device = device
        self.x = task.data.x_train.to(device)
        self.y = task.data.y_train.to(device)
        self.shards = [torch.as_tensor(s, dtype=torch.long, device=device) for s in shards]
        self.steps = [int(s) for s in steps]
        sizes = torch.tensor([len(s) for s in shards], dtype=torch.float64)
        self.weights = (sizes / sizes.sum()).tolist()
        self.global_model = task.make_model(seed).to(device)
        self.clients = [task.make_model(seed).to(device) for _ in shards]
        self.offsets = torch.arange(BATCH, device=device)
        self.batches = batches  # (client, round, step) -> indices; default: randperm batches
        self.rounds = 0

    def run_round(self) -> None:
        global_state = self.global_model.state_dict()
        acc = {k: torch.zeros_like(v) for k, v in global_state.items()}
        for i, model in enumerate(self.clients):
            model.load_state_dict(global_state)
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            shard = self.shards[i]
            n = len(shard)
            perm = shard[torch.randperm(n, device=self.device)] if self.batches is None else None
            for s in range(self.steps[i]):
                if perm is not None:
                    idx = perm[(s * BATCH + self.offsets) % n]
                else:
                    assert self.batches is not None
                    idx = self.batches(i, self.rounds, s)
                loss = F.cross_entropy(model(self.x[idx]), self.y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            w = self.weights[i]
            for k, v in model.state_dict().items():
                acc[k].add_(v, alpha=w)
        self.global_model.load_state_dict(acc)
        self.rounds += 1

    @torch.no_grad()
    def accuracy(self) -> float:
        x, y = self.task.data.x_test.to(self.device), self.task.data.y_test.to(self.device)
        return float((self.global_model(x).argmax(-1) == y).float().mean())


# ----------------------------------------------------------------------------- measurements


def check_same_math(task: Task, nodes: int, device: torch.device, seed: int) -> dict[str, Any]:
    """One round of each side on identical batches: the global models must agree."""
    cfg = sim_config(nodes, samples=task.data.num_train, device=device.type, threads=0,
                     seed=seed)
    sim = Simulation(cfg, task=task)

    def same_batches(i: int, r: int, s: int) -> Tensor:
        local = r * int(sim.round_steps[i]) + s
        return torch.from_numpy(node_batch(sim.shards[i], BATCH, seed=seed, node=i,
                                           step=local)).to(device)

    loop = PlainLoop(task, sim.shards, sim.round_steps, seed=seed, device=device,
                     batches=same_batches)
    sim.run_round(0)
    loop.run_round()
    ref = torch.cat([p.detach().reshape(-1) for p in loop.global_model.parameters()])
    rows = sim.flat_params()
    return {"check": "same_math", "nodes": nodes,
            "max_abs_diff_vs_loop": float((rows - ref.to(rows.device)).abs().max())}


def throughput(task: Task, nodes: int, *, rounds: int, repeats: int, device: torch.device,
               threads: int, seed: int, fused: bool = True,
               loop_threads: int | None = None) -> dict[str, Any]:
    cfg = sim_config(nodes, samples=task.data.num_train, device=device.type, threads=threads,
                     seed=seed)
    sim = Simulation(cfg, task=task)
    sim.trainer.fused = fused
    loop = PlainLoop(task, sim.shards, sim.round_steps, seed=seed, device=device)
    client_steps = int(sim.round_steps.sum())
    r_sim = 0

    def run_sim() -> None:
        nonlocal r_sim
        sim.run_round(r_sim)
        r_sim += 1

    sides: dict[str, Callable[[], None]] = {"sim": run_sim, "loop": loop.run_round}
    side_threads = {"sim": threads, "loop": threads if loop_threads is None else loop_threads}
    for name, fn in sides.items():  # warm-up (lazy allocations, first epoch permutations)
        torch.set_num_threads(side_threads[name])
        fn()
    wall: dict[str, list[float]] = {k: [] for k in sides}
    cpu: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            torch.set_num_threads(side_threads[name])
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(rounds):
                fn()
            sync(device)
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    steps = client_steps * rounds
    rec: dict[str, Any] = {
        "bench": "throughput", "nodes": nodes, "partition": cfg.partition,
        "client_steps_per_round": client_steps, "sim_steps_per_round": sim.steps_per_round,
        "rounds_timed": rounds, "repeats": repeats, "threads": side_threads["sim"],
        "loop_threads": side_threads["loop"],
        "device": str(device), "train_impl": sim.model.impl,
        "fused_sgd": uses_fused(sim),
    }
    for name in sides:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        rec[f"{name}_client_steps_per_s"] = steps / w
        rec[f"{name}_client_steps_per_cpu_s"] = steps / c
        rec[f"{name}_us_per_client_step"] = 1e6 * w / steps
        rec[f"{name}_cpu_us_per_client_step"] = 1e6 * c / steps
    rec["ratio_wall"] = rec["sim_client_steps_per_s"] / rec["loop_client_steps_per_s"]
    rec["ratio_cpu"] = rec["sim_client_steps_per_cpu_s"] / rec["loop_client_steps_per_cpu_s"]
    rec["ratio_wall_per_repeat"] = [lw / sw for sw, lw in zip(wall["sim"], wall["loop"],
                                                              strict=True)]
    acc = sim.evaluate()["accuracy"]
    rec["sim_accuracy_mean"] = float(acc.mean())
    rec["loop_accuracy"] = loop.accuracy()
    rec["rounds_trained"] = r_sim
    rec["sim_breakdown_cpu_us_per_node"] = breakdown(sim, repeats, r_sim, device)
    rec["load"] = load()
    return rec


def breakdown(sim: Simulation, repeats: int, rounds_done: int, device: torch.device
              ) -> dict[str, float]:
    """Where a simulator step goes: the engine's parts called one by one (every node active,
    after the timed rounds), CPU microseconds per node, medians."""
    parts: dict[str, list[float]] = {"batch_schedule": [], "train_step": [], "fedavg_sync": []}
    rows = len(sim.nodes)
    for k in range(repeats):
        c0 = time.process_time()
        idx = sim.batches.batch(sim.local_step).to(device)
        c1 = time.process_time()
        sim.trainer.step(idx)
        sync(device)
        c2 = time.process_time()
        sim.algorithm.step(sim.steps_per_round * (rounds_done + k + 1))
        sync(device)
        c3 = time.process_time()
        sim.local_step += 1
        for key, dt in zip(parts, (c1 - c0, c2 - c1, c3 - c2), strict=True):
            parts[key].append(1e6 * dt / rows)
    return {k: statistics.median(v) for k, v in parts.items()}


def loop_step_time(task: Task, *, steps: int, repeats: int, device: torch.device
                   ) -> dict[str, Any]:
    """The bare per-step cost of the loop: one client model, one SGD, ``steps`` steps."""
    model = task.make_model(0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, y = task.data.x_train.to(device), task.data.y_train.to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    idx = torch.randint(0, len(x), (steps, BATCH), generator=g).to(device)
    wall, cpu = [], []
    for _ in range(repeats + 1):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for s in range(steps):
            loss = F.cross_entropy(model(x[idx[s]]), y[idx[s]])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"bench": "loop_single_step", "threads": torch.get_num_threads(),
            "device": str(device),
            "us_per_step": 1e6 * statistics.median(wall[1:]) / steps,
            "cpu_us_per_step": 1e6 * statistics.median(cpu[1:]) / steps, "load": load()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(nodes: int, *, rounds: int, device: torch.device, threads: int,
                 seed: int, fused: bool = True, algo: str = "fedavg") -> dict[str, Any]:
    """Peak memory of building and training the simulation, per node (run in a child)."""
    torch.set_num_threads(threads)
    task = get_task("digits", seed=seed)
    cfg = sim_config(nodes, samples=task.data.num_train, device=device.type, threads=threads,
                     seed=seed, algo=algo)
    # one-time costs (lazy imports, BLAS/OpenMP buffers, first-call caches) are not per node:
    # pay them with a small run first
    warm = Simulation(sim_config(10, samples=task.data.num_train, device=device.type,
                                 threads=threads, seed=seed, algo=algo), task=task)
    warm.trainer.fused = fused
    for r in range(2):
        warm.run_round(r)
    warm.evaluate()
    del warm
    method = "cuda max_memory_allocated"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset VmHWM to the current RSS
            method = "peak RSS (VmHWM after clear_refs) - RSS before the build"
        except OSError:
            method = "peak RSS (VmHWM since start) - RSS before the build"
        base = _rss_kib("VmRSS") * 1024
    sim = Simulation(cfg, task=task)
    sim.trainer.fused = fused
    for r in range(rounds):
        sim.run_round(r)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    params = sim.model.flat.nbytes_per_row
    opt_state = sum(t[0].numel() * t.element_size() for s in sim.trainer.optimizer.state.values()
                    for t in s.values() if isinstance(t, Tensor) and t.dim() >= 1)
    state = 2 * params + opt_state  # parameters + gradients + optimizer state
    return {"bench": "memory", "algo": algo,
            "topology": cfg.topology if algo != "fedavg" else None,
            "nodes": nodes, "partition": cfg.partition, "method": method,
            "rounds": rounds, "peak_bytes": peak, "peak_bytes_per_node": peak / nodes,
            "state_bytes_per_node": state, "param_bytes_per_node": params,
            "peak_over_state": peak / nodes / state, "device": str(device),
            "fused_sgd": uses_fused(sim),
            "load": load()}


def memory(nodes: int, *, rounds: int, device: str, threads: int, seed: int,
           fused: bool = True, algo: str = "fedavg") -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--_memory-child", str(nodes), "--rounds", str(rounds),
           "--device", device, "--threads", str(threads), "--seed", str(seed),
           "--fused" if fused else "--no-fused", "--memory-algos", algo]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"bench": "memory", "algo": algo, "nodes": nodes,
                "error": out.stderr.strip()[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nodes", default="100,1000", help="comma-separated N (default 100,1000)")
    p.add_argument("--big-nodes", default="10000", help="comma-separated large N, run with "
                   "the sample:dirichlet partition and fewer rounds ('0' = none)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per repeat")
    p.add_argument("--big-rounds", type=int, default=1, help="timed rounds per repeat, big N")
    p.add_argument("--repeats", type=int, default=5, help="repeats per side (median)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    p.add_argument("--loop-threads", type=int, default=None,
                   help="torch threads for the loop's turns only (default: --threads)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory per node in a child process per N")
    p.add_argument("--memory-algos", default="fedavg,gossip-vc",
                   help="algorithms whose memory is measured (gossip-vc merges over "
                        f"{GOSSIP_TOPOLOGY})")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="first check that both sides compute the same round")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="the trainer's fused SGD path (--no-fused: the autograd path)")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    p.add_argument("--_memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.nodes, args.big_nodes = "20", "0"
        args.rounds, args.repeats = 1, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        emit({"error": "--device cuda: torch.cuda.is_available() is False (torch "
                       f"{torch.__version__}); nothing measured"})
        return 2
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args._memory_child:
        emit(memory_child(args._memory_child, rounds=args.rounds, device=device,
                          threads=args.threads, seed=args.seed, fused=args.fused,
                          algo=args.memory_algos))
        return 0
    nodes = [int(n) for n in args.nodes.split(",") if n.strip() and int(n) > 0]
    big = [int(n) for n in args.big_nodes.split(",") if n.strip() and int(n) > 0]
    emit({"bench": "header", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
          "torch": torch.__version__, "threads": torch.get_num_threads(),
          "device": str(device), "cpus": os.cpu_count(), "load": load(),
          "workload": f"digits MLP 64-128-10, batch {BATCH}, 1 local epoch, SGD lr {LR}, "
                      f"FedAvg all clients, Dirichlet {ALPHA}"})
    task = get_task("digits", seed=args.seed)
    if args.check and nodes:
        emit(check_same_math(task, min(nodes), device, args.seed))
    emit(loop_step_time(task, steps=20 if args.quick else 300, repeats=args.repeats,
                        device=device))
    for n in nodes:
        emit(throughput(task, n, rounds=args.rounds, repeats=args.repeats, device=device,
                        threads=args.threads, seed=args.seed, fused=args.fused,
                        loop_threads=args.loop_threads))
    for n in big:
        emit(throughput(task, n, rounds=args.big_rounds, repeats=max(1, args.repeats // 2),
                        device=device, threads=args.threads, seed=args.seed, fused=args.fused,
                        loop_threads=args.loop_threads))
    if args.memory:
        for algo in args.memory_algos.split(","):
            for n in nodes + big:
                emit(memory(n, rounds=args.rounds, device=args.device, threads=args.threads,
                            seed=args.seed, fused=args.fused, algo=algo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
