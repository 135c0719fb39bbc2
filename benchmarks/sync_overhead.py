"""Cost of one synchronisation of our algorithms against the raw transfers they are built on.

Spawns real Gloo process groups (one process per rank, FileStore rendezvous) at each world size
and times, on one model of mixed-shape tensors, in the same run and interleaved repeat by repeat:

    all-reduce family   (a) FedAvg sync       (b) DiLoCo sync
                        (c) raw all_reduce of one flat fp32 buffer of the same bytes
                        (d) torch's PeriodicModelAverager(period=1) on a per-tensor copy
    pairwise family     (e) NoLoCo sync (group size 2)
                        (f) raw pair exchange of one flat buffer (batch_isend_irecv), same pairs
                        (g) the NoLoCo reference code's exchange (jkolehm/noloco): per-tensor
                            blocking send/recv of phi and theta - phi to the group root, the root
                            sends both means back, then the reference's outer update
    ring family         (h) D-PSGD sync on a ring (merge="mixing")
                        (i) raw exchange of one flat buffer with the ring neighbours

One timed sample is the wall time of the slowest rank (barrier, sync, all_reduce MAX of the
per-rank seconds). Each case is warmed up, then timed ``--repeats`` times; the cases take turns
inside each repeat so that machine noise hits them alike. Reported: the median seconds of each
case, and each ratio as the median over repeats of the two cases' ratio within one repeat (a
drift of the machine's load between repeats cancels). Workers run
with ``torch.set_num_threads(1)``. Between samples every rank nudges its model (outside the
timer), as local training would, so the averages have work to do.

Prints a header line and then one JSON line per (world size, family) on stdout.

    python benchmarks/sync_overhead.py --world-sizes 2,4,8 --repeats 5
    python benchmarks/sync_overhead.py --quick          # small model, 1 repeat (smoke test)
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gossip.algorithms import build_algorithm, make_config
from gossip.allocator import reuse_freed_memory
from gossip.comm import TorchCommunicator
from gossip.flat import FlatParams
from gossip.topology import make_topology, random_matching

FAMILIES: dict[str, tuple[str, ...]] = {
    "all_reduce": ("fedavg", "diloco", "raw_allreduce", "periodic_averager"),
    "pairwise": ("noloco", "raw_pair_exchange", "reference_per_tensor"),
    "ring": ("dpsgd_ring", "raw_ring_exchange"),
}
RATIOS: dict[str, tuple[str, str]] = {
    "fedavg/raw_allreduce": ("fedavg", "raw_allreduce"),
    "diloco/raw_allreduce": ("diloco", "raw_allreduce"),
    "fedavg/periodic_averager": ("fedavg", "periodic_averager"),
    "diloco/periodic_averager": ("diloco", "periodic_averager"),
    "noloco/raw_pair_exchange": ("noloco", "raw_pair_exchange"),
    "noloco/reference_per_tensor": ("noloco", "reference_per_tensor"),
    "noloco/diloco": ("noloco", "diloco"),
    "dpsgd_ring/raw_ring_exchange": ("dpsgd_ring", "raw_ring_exchange"),
}
TARGETS: dict[str, float] = {
    "fedavg/raw_allreduce": 1.2,
    "diloco/raw_allreduce": 1.2,
    "fedavg/periodic_averager": 1.0,
    "diloco/periodic_averager": 1.0,
    "noloco/raw_pair_exchange": 1.2,
    "noloco/reference_per_tensor": 0.5,
}


# ----------------------------------------------------------------------------- the model


class Block(nn.Module):
    """Pre-norm MLP block: LayerNorm, Linear(d, h), Linear(h, d); 6 tensors."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)


class Model(nn.Module):
    """Embeddings, 12 MLP blocks of varied widths (2d, 3d, 4d), final norm, output head.

    80 parameter tensors of mixed shapes, as in a small language model.
    """

    def __init__(self, d: int, vocab: int, context: int = 256, n_blocks: int = 12) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, d * (2 + i % 3)) for i in range(n_blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)


def model_width(target_params: float) -> tuple[int, int]:
    """The width d (a multiple of 8; vocabulary 16 d) whose model is nearest ``target_params``."""

    def count(d: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in Model(d, 16 * d).parameters())

    lo, hi = 1, 512  # d = 8 * k, count grows with k
    while lo < hi:
        mid = (lo + hi) // 2
        if count(8 * mid) < target_params:
            lo = mid + 1
        else:
            hi = mid
    d = min((8 * k for k in (max(lo - 1, 1), lo)), key=lambda d: abs(count(d) - target_params))
    return d, 16 * d


def build_model(target_params: float, seed: int) -> nn.Module:
    d, vocab = model_width(target_params)
    torch.manual_seed(seed)
    return Model(d, vocab)


# ----------------------------------------------------------------------------- baselines


def reference_outer_step(group: list[int], params: list[nn.Parameter], p_olds: list[torch.Tensor],
                         moms: list[torch.Tensor], outer_lr: float, outer_momentum: float) -> None:
    """jkolehm/noloco ``sparse_optimizer_c.outer_step``: per-tensor blocking send/recv.

    ``group[0]`` is the root; every other member sends phi then (theta - phi) per tensor, the root
    averages and sends both means back per tensor; then the reference's heavy-ball update.
    """
    root = group[0]
    rank = dist.get_rank()
    for p, p_old, m in zip(params, p_olds, moms, strict=True):
        p_old_cpu = p_old.clone().detach().cpu()
        mean = torch.zeros_like(p).to(device="cpu")
        mean_g = (p.detach() - p_old).cpu()
        if rank == root:
            tmp = torch.zeros_like(p).to(device="cpu")
            with torch.no_grad():
                mean.add_(p_old_cpu)
                for irank in group[1:]:
                    dist.recv(tmp, src=irank)
                    mean.add_(tmp)
                    dist.recv(tmp, src=irank)
                    mean_g.add_(tmp)
                mean.mul_(1.0 / len(group))
                mean_g.mul_(1.0 / len(group))
                for irank in group[1:]:
                    dist.send(mean, dst=irank)
                    dist.send(mean_g, dst=irank)
        else:
            dist.send(p_old_cpu, dst=root)
            dist.send((p.detach() - p_old).cpu(), dst=root)
            dist.recv(mean, src=root)
            dist.recv(mean_g, src=root)
        with torch.no_grad():
            m_ = ((outer_momentum - 1.0) * m + outer_lr * mean_g
                  + outer_lr * (mean - p_old))
            m.add_(m_)
            p.mul_(0.0)
            p_old.add_(m)
            p.add_(p_old)


def raw_exchange(send: torch.Tensor, recv: list[torch.Tensor], send_to: list[int],
                 recv_from: list[int]) -> None:
    """One flat buffer to each of ``send_to``, one into each ``recv`` from ``recv_from``."""
    ops = [dist.P2POp(dist.isend, send, j) for j in send_to]
    ops += [dist.P2POp(dist.irecv, buf, j) for buf, j in zip(recv, recv_from, strict=True)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


# ----------------------------------------------------------------------------- one rank


def build_cases(rank: int, n: int, target_params: float, seed: int
                ) -> tuple[dict[str, Callable[[int], Any]], Callable[[], None], dict[str, Any]]:
    """The timed cases of this rank (each takes the step number), a nudge, and model facts."""
    comm = TorchCommunicator(timeout=600.0)
    model = build_model(target_params, seed)
    flat = FlatParams.from_module(model)
    (buf,) = list(flat.buffers())
    nbytes = flat.nbytes_per_row
    numel = flat.numel

    # (a), (b), (e), (h): our algorithms, all over the same flat buffer (their cost does not
    # depend on the values, only on the shapes).
    fedavg = build_algorithm("fedavg", make_config("fedavg", sync_every=1), flat, comm)
    diloco = build_algorithm("diloco", make_config("diloco", sync_every=1), flat, comm)
    noloco = build_algorithm("noloco", make_config("noloco", sync_every=1, group_size=2),
                             flat, comm)
    ring = make_topology("ring", n)
    dpsgd = build_algorithm("dpsgd", make_config("dpsgd", sync_every=1), flat, comm,
                            topology=ring)

    # (c), (f), (i): raw transfers of one flat fp32 buffer of the same bytes (persistent buffers)
    raw = torch.randn(numel)
    raw_recv = [torch.empty(numel), torch.empty(numel)]
    peers, _, _ = ring.peer_table(0)
    ring_in = [j for j in peers[rank].tolist() if j >= 0]
    ring_out = [i for i in range(n) if rank in peers[i].tolist()]

    # (d): torch's averager on a per-tensor copy of the same model (regular parameters). It only
    # averages parameters that have a gradient, as after a backward pass.
    twin = build_model(target_params, seed)
    for p in twin.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "period=1: use DDP instead"
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        averager = PeriodicModelAverager(period=1, warmup_steps=0)

    # (g): the reference's state: phi (step_params) and momentum, per tensor
    ref_params = list(model.parameters())
    ref_phi = [p.detach().clone() for p in ref_params]
    ref_mom = [torch.zeros_like(p) for p in ref_params]

    def partner(step: int) -> int:
        for group in random_matching(n, 2, step, 0):
            if rank in group:
                return group[1] if group[0] == rank else group[0]
        raise AssertionError("rank in no group")

    def ref_group(step: int) -> list[int]:
        return next(g for g in random_matching(n, 2, step, 0) if rank in g)

    cases: dict[str, Callable[[int], Any]] = {
        "fedavg": lambda step: fedavg.step(step),
        "diloco": lambda step: diloco.step(step),
        "raw_allreduce": lambda step: dist.all_reduce(raw),
        "periodic_averager": lambda step: averager.average_parameters(twin.parameters()),
        "noloco": lambda step: noloco.step(step),
        "raw_pair_exchange": lambda step: raw_exchange(raw, raw_recv[:1], [partner(step)],
                                                       [partner(step)]),
        "reference_per_tensor": lambda step: reference_outer_step(
            ref_group(step), ref_params, ref_phi, ref_mom, outer_lr=0.7, outer_momentum=0.5),
        "dpsgd_ring": lambda step: dpsgd.step(step),
        "raw_ring_exchange": lambda step: raw_exchange(raw, raw_recv[:len(ring_in)], ring_out,
                                                       ring_in),
    }
    eps = 1e-4 * (rank + 1)

    def nudge() -> None:
        """Stand-in for local training: every rank moves its models a little, differently."""
        with torch.no_grad():
            buf.add_(eps)
            for p in twin.parameters():
                p.add_(eps)

    facts = {"params": numel, "tensors": len(flat.params), "bytes": nbytes,
             "d_model": model_width(target_params)[0]}
    return cases, nudge, facts


def time_once(fn: Callable[[int], Any], step: int) -> float:
    """Seconds of the slowest rank for one call of ``fn`` (all ranks start at a barrier)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn(step)
    dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(dt, op=dist.ReduceOp.MAX)
    return float(dt)


def worker(rank: int, n: int, store_path: str, opts: dict[str, Any], out: Any) -> None:
    faulthandler.enable()  # a C++ abort in a rank prints its Python stack
    reuse_freed_memory()  # as launch.train's ranks do (GOSSIP_REUSE_MEMORY=0: glibc's default)
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, n)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n,
                            timeout=timedelta(seconds=600))
    try:
        cases, nudge, facts = build_cases(rank, n, opts["params"], opts["seed"])
        samples: dict[str, list[float]] = {name: [] for name in cases}
        step = 0
        for phase, count in (("warmup", opts["warmup"]), ("timed", opts["repeats"])):
            for _ in range(count):
                for name, fn in cases.items():
                    step += 1
                    nudge()
                    dt = time_once(fn, step)
                    if phase == "timed":
                        samples[name].append(dt)
        if rank == 0:
            facts["worker_threads"] = torch.get_num_threads()
            out.put((facts, samples))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def run_world(n: int, opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, list[float]]]:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(n, os.path.join(tmp, "store"), opts, out), nprocs=n,
                           join=True, start_method="spawn")
        return out.get()


def summarise(n: int, facts: dict[str, Any], samples: dict[str, list[float]],
              opts: dict[str, Any]) -> list[dict[str, Any]]:
    median = {name: statistics.median(v) for name, v in samples.items()}
    lines = []
    for family, names in FAMILIES.items():
        # paired: the median over repeats of (a / b) within the same repeat, so that a drift of
        # the machine's load between repeats cancels out
        ratios = {key: round(statistics.median(x / y for x, y in zip(samples[a], samples[b],
                                                                       strict=True)), 3)
                  for key, (a, b) in RATIOS.items() if a in names}
        lines.append({
            "world_size": n,
            "family": family,
            "seconds": {name: round(median[name], 4) for name in names},
            "min_max": {name: [round(min(samples[name]), 4), round(max(samples[name]), 4)]
                        for name in names},
            "ratios": ratios,
            "targets": {k: TARGETS[k] for k in ratios if k in TARGETS},
            "params": facts["params"],
            "bytes": facts["bytes"],
            "repeats": opts["repeats"],
        })
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default="2,4,8",
                        help="comma-separated world sizes (even: NoLoCo uses pairs)")
    parser.add_argument("--repeats", type=int, default=5, help="timed syncs per case")
    parser.add_argument("--warmup", type=int, default=2, help="untimed syncs per case first")
    parser.add_argument("--params", type=float, default=16.0,
                        help="model size in millions of fp32 parameters")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: ~0.5M parameters, 1 warmup, 1 repeat")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.world_sizes.split(",") if s.strip()]
    for n in sizes:
        if n < 2 or n % 2:
            parser.error(f"--world-sizes must be even numbers >= 2, got {n}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    opts = {"params": args.params * 1e6, "seed": args.seed, "repeats": args.repeats,
            "warmup": args.warmup}
    if args.quick:
        opts.update(params=0.5e6, repeats=1, warmup=1)

    header_done = False
    for n in sizes:
        facts, samples = run_world(n, opts)
        if not header_done:
            print(json.dumps({
                "benchmark": "sync_overhead", "torch": torch.__version__,
                "num_threads": torch.get_num_threads(),
                "worker_threads": facts["worker_threads"], "cpu_count": os.cpu_count(),
                "params": facts["params"], "tensors": facts["tensors"],
                "bytes": facts["bytes"], "d_model": facts["d_model"],
                "world_sizes": sizes, "repeats": opts["repeats"], "warmup": opts["warmup"],
            }), flush=True)
            header_done = True
        for line in summarise(n, facts, samples, opts):
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
