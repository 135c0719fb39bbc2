"""The simulator as users run it, end to end, against a plain per-client loop: separate processes.

Workload (issue 9): the digits task (MLP 64-128-10), FedAvg over N clients with Dirichlet(0.5)
label skew (``sample:dirichlet:0.5`` when N exceeds the 1,437 training samples: each client
draws its own 16 samples), one local epoch of SGD lr 0.05 with batch 16 per round, the global
model evaluated on the 360 test samples after every round.

(a) **simulator**: ``python -m simulations.run --algo fedavg --task digits --nodes N
    --partition P --batch-size 16 --optimizer sgd --lr 0.05 --local-epochs 1 --rounds R
    --eval-every 1 --threads T --out DIR``, plots on, a fresh process.
(b) **loop**: a fresh process running the loop a researcher writes: the same task data, model
    and partition; per round and client, the global ``state_dict`` loaded into the client's
    ``nn.Module``, a new ``torch.optim.SGD``, one epoch of shuffled batches of 16 (the last one
    wrapping around, as the simulator's do), then the sample-weighted mean of the clients'
    ``state_dict``\\ s and an evaluation of the global model on the test set. Beyond the data
    size each client draws its own 16 samples with Dirichlet class proportions, as the
    simulator's ``sample:`` partition does (other draws, the same distribution and step count).

Per side and N: **client-steps/s** over the rounds (training + the evaluation of every round;
the simulator's ``summary.json`` ``node_steps / wall_seconds``, the loop's own timer; the loop's
first ``torch.optim.SGD``, which imports torch's compiler stack, is built before its timer), the
same per CPU second of the process over the rounds (``cpu_seconds``, ``time.process_time``:
on a shared machine the wall-time rate measures the scheduler as much as the code), the
**process wall seconds** from spawn to exit (imports, data, build, rounds, plots) and the
**process CPU seconds** (``getrusage`` of the child: steadier than wall time on a loaded
machine). For the simulator also: **start-up** (spawn to its ``config.json``, written just
before round 1) and **after the rounds** (its ``summary.json`` to exit: the plots). Ratios:
simulator over loop in client-steps/s (wall and CPU); loop over simulator in process wall and
CPU seconds. Both sides run with ``--threads`` torch threads (default 1), one process at a time;
``--repeats`` alternates them and reports each repeat. The 1-minute load average before each
run is printed: the machines are shared.

    python benchmarks/sim_end_to_end.py                         # N = 100, 1000, 10000
    python benchmarks/sim_end_to_end.py --runs 1000:3 --repeats 3
    python benchmarks/sim_end_to_end.py --quick                 # smoke test
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BATCH, LR, ALPHA, SEED = 16, 0.05, 0.5, 0


def load() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover
        return float("nan")


def emit(record: dict[str, Any]) -> None:
    print(json.dumps(record), flush=True)


def partition_for(nodes: int, samples: int) -> str:
    return f"dirichlet:{ALPHA}" if nodes <= samples else f"sample:dirichlet:{ALPHA}"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


# ----------------------------------------------------------------------------- the two sides


def run_sim(nodes: int, rounds: int, threads: int, device: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="sim_e2e_") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "simulations.run", "--algo", "fedavg", "--task", "digits",
               "--nodes", str(nodes), "--partition", partition_for(nodes, 1437),
               "--batch-size", str(BATCH), "--optimizer", "sgd", "--lr", str(LR),
               "--local-epochs", "1", "--rounds", str(rounds), "--eval-every", "1",
               "--threads", str(threads), "--device", device, "--out", str(out)]
        t0_epoch, t0, c0 = time.time(), time.perf_counter(), _children_cpu()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(),
                             check=False)
        wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
        if res.returncode != 0:
            return {"error": res.stderr.strip()[-2000:]}
        summary = json.loads((out / "summary.json").read_text())
        plots = sorted(p.name for p in out.glob("*.png"))
        startup = (out / "config.json").stat().st_mtime - t0_epoch
        after = wall - ((out / "summary.json").stat().st_mtime - t0_epoch)
    return {"process_wall_s": wall, "process_cpu_s": cpu, "client_steps": summary["node_steps"],
            "rounds_s": summary["wall_seconds"],
            "client_steps_per_s": summary["node_steps"] / summary["wall_seconds"],
            "rounds_cpu_s": summary["cpu_seconds"],
            "client_steps_per_cpu_s": summary["node_steps"] / summary["cpu_seconds"],
            "startup_s": startup, "after_rounds_s": after, "plots": plots,
            "accuracy": summary["final_accuracy_mean"], "build_s": summary.get("build_seconds")}


def run_loop(nodes: int, rounds: int, threads: int, device: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_loop", str(nodes),
           "--_rounds", str(rounds), "--threads", str(threads), "--device", device]
    t0, c0 = time.perf_counter(), _children_cpu()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=_env(), check=False)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if res.returncode != 0:
        return {"error": res.stderr.strip()[-2000:]}
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_s"], out["process_cpu_s"] = wall, cpu
    return out


def loop_child(nodes: int, rounds: int, threads: int, device: str) -> dict[str, Any]:
    """The plain per-client FedAvg loop (runs in its own process)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gossip.data import partition
    from gossip.tasks import get_task

    torch.set_num_threads(threads)
    dev = torch.device(device)
    task = get_task("digits", seed=SEED)
    x, y = task.data.x_train.to(dev), task.data.y_train.to(dev)
    x_test, y_test = task.data.x_test.to(dev), task.data.y_test.to(dev)
    n_train = len(y)
    if nodes <= n_train:
        shards = partition(f"dirichlet:{ALPHA}", task.data.y_train, nodes, seed=SEED)
    else:  # each client draws its own 16 samples with Dirichlet(ALPHA) class proportions
        rng = np.random.default_rng(SEED)
        labels = task.data.y_train.numpy()
        members = [np.flatnonzero(labels == c) for c in range(10)]
        shards = []
        for _ in range(nodes):
            classes = rng.choice(10, size=BATCH, p=rng.dirichlet(np.full(10, ALPHA)))
            shards.append(np.array([rng.choice(members[c]) for c in classes]))
    shards_t = [torch.as_tensor(s, dtype=torch.long, device=dev) for s in shards]
    sizes = torch.tensor([len(s) for s in shards], dtype=torch.float64)
    weights = (sizes / sizes.sum()).tolist()
    global_model = task.make_model(SEED).to(dev)
    client = task.make_model(SEED).to(dev)
    torch.optim.SGD(client.parameters(), lr=LR)  # the first one imports torch._dynamo: not timed
    offsets = torch.arange(BATCH, device=dev)
    steps = 0
    accuracy = float("nan")
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(rounds):
        state = global_model.state_dict()
        acc = {k: torch.zeros_like(v) for k, v in state.items()}
        for i, shard in enumerate(shards_t):
            client.load_state_dict(state)
            opt = torch.optim.SGD(client.parameters(), lr=LR)
            n = len(shard)
            perm = shard[torch.randperm(n, device=dev)]
            for s in range(-(-n // BATCH)):
                idx = perm[(s * BATCH + offsets) % n]
                loss = F.cross_entropy(client(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                steps += 1
            for k, v in client.state_dict().items():
                acc[k].add_(v, alpha=weights[i])
        global_model.load_state_dict(acc)
        with torch.no_grad():
            accuracy = float((global_model(x_test).argmax(-1) == y_test).double().mean())
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"client_steps": steps, "rounds_s": seconds, "client_steps_per_s": steps / seconds,
            "rounds_cpu_s": cpu, "client_steps_per_cpu_s": steps / cpu, "accuracy": accuracy}


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", default="100:20,1000:3,10000:2",
                   help="comma-separated NODES:ROUNDS (default 100:20,1000:3,10000:2)")
    p.add_argument("--repeats", type=int, default=1, help="alternating repeats per N")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both sides")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-loop", action="store_true", help="the simulator only (GPU sizes)")
    p.add_argument("--quick", action="store_true", help="N = 50 for 2 rounds (smoke test)")
    p.add_argument("--_loop", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--_rounds", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.runs, args.repeats = "50:2", 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._loop:
        emit(loop_child(args._loop, args._rounds, args.threads, args.device))
        return 0
    runs = [tuple(int(v) for v in item.split(":")) for item in args.runs.split(",") if item]
    # byte-compiled first, as an installed package is: with PYTHONDONTWRITEBYTECODE set (as on
    # this project's machines) every run would otherwise compile our ~50 modules (~0.1 s)
    for package in ("gossip", "simulations"):
        compileall.compile_dir(ROOT / package, quiet=1)
    emit({"bench": "header", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "cpus": os.cpu_count(), "threads": args.threads, "device": args.device,
          "load": load(), "workload": f"digits MLP 64-128-10, FedAvg, Dirichlet {ALPHA}, "
          f"1 local epoch SGD lr {LR} batch {BATCH}, global eval every round, plots on"})
    for nodes, rounds in runs:
        ratios, walls = [], []
        for rep in range(args.repeats):
            rec: dict[str, Any] = {"bench": "end_to_end", "nodes": nodes, "rounds": rounds,
                                   "partition": partition_for(nodes, 1437), "repeat": rep,
                                   "load_before": load()}
            rec["sim"] = run_sim(nodes, rounds, args.threads, args.device)
            if not args.no_loop:
                rec["loop_load_before"] = load()
                rec["loop"] = run_loop(nodes, rounds, args.threads, args.device)
            sim, loop = rec["sim"], rec.get("loop")
            if loop and "error" not in sim and "error" not in loop:
                rec["steps_ratio"] = sim["client_steps_per_s"] / loop["client_steps_per_s"]
                rec["steps_ratio_cpu"] = (sim["client_steps_per_cpu_s"]
                                          / loop["client_steps_per_cpu_s"])
                rec["wall_ratio"] = loop["process_wall_s"] / sim["process_wall_s"]
                rec["cpu_ratio"] = loop["process_cpu_s"] / sim["process_cpu_s"]
                ratios.append(rec["steps_ratio"])
                walls.append(rec["wall_ratio"])
            rec["load_after"] = load()
            emit(rec)
        if len(ratios) > 1:
            emit({"bench": "end_to_end_median", "nodes": nodes,
                  "steps_ratio": statistics.median(ratios), "wall_ratio": statistics.median(walls)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
