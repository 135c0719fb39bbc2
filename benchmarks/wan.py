"""Real syncs over real shaped links, next to what the simulator's network model predicts.

Every rank runs as its own process inside its own network namespace (:mod:`benchmarks.netns`:
veth pairs through a bridge, ``tc tbf`` at ``--rate-mbit`` on both ends of every link, a netem
delay too with ``--delay-ms`` where the kernel has netem). The ranks meet over a TCPStore on rank
0's address and form a Gloo group whose traffic crosses only the shaped links. Each rank holds a
flat fp32 model of ``--params`` million parameters.

Cases (``--cases``, comma-separated): the raw transfers ``raw_allreduce``, ``raw_send`` (one
way, in pairs), ``raw_pair_sends_first`` / ``raw_pair_recvs_first`` (a pair exchange through
``batch_isend_irecv`` with the sends or the receives listed first), ``raw_ring`` (both ring
neighbours at once, receives first: D-PSGD's exchange without its merge), ``raw_alltoall`` /
``raw_alltoall_p2p`` (``--params`` million bytes, int8's payload, in one chunk per rank, through
Gloo's ``all_to_all_single`` or through receives-then-sends all at once: the two ways of the
compressed all-reduce's reduce-scatter), and the algorithms
``fedavg``, ``diloco``, ``noloco`` (pairs), ``dpsgd`` and ``choco`` (ring), each optionally
compressed as ``ALGO:CODEC`` (e.g. ``diloco:int8``, ``choco:topk:0.01``).

Overlap cases time whole segments of training: ``compute`` is ``--inner-steps`` H stand-in inner
steps (a single-threaded ``--inner-size`` square matmul each) alone; ``ALGO[:CODEC]+steps`` is H
such steps followed by a blocking sync, ``ALGO[:CODEC]+overlap`` H steps followed by an
overlapped sync (``overlap=True``: the exchange started at one segment's sync is waited on at the
next one's). A sample is the mean over ``--repeats`` consecutive segments with no barrier between
them (a barrier would wait for the exchange in flight), so it is the steady state; ``/compute``
is its ratio to the ``compute`` case (the issue's target for ``+overlap``: <= 1.1 whenever the
H steps take longer than the transfer). ``diloco:int8+overlap`` has its compressed all-reduce in
flight on the communicator's worker thread (:mod:`gossip.comm.background`).

Where the CPU of a segment goes: every rank reads :mod:`benchmarks.cpu_probe` before and after
the timed segments (its threads' user/kernel seconds and context switches, the machine's CPU by
kind, softirqs, its veth's packets); a row carries every rank's reading (``probe``) and
``cpu_per_segment`` (:func:`summarize`), from the last round. ``--rounds R`` runs the case list R
times over, interleaved, so that the machine's load drifting between cases hits them alike;
``/compute`` is then the median of the R paired ratios (``/compute_by_round``). Variants of
the measured condition, each reported as such: ``--inner-sleep-ms`` (inner steps that leave
the CPU idle, as an accelerator's do), ``--mtu 9000`` (jumbo frames), ``--gso-max-size``
(smaller GSO segments: more packets through the stack and the tbf), ``--tbf-burst``.

One sample is the wall time of the slowest rank for one sync (barrier, sync, all_reduce MAX);
each case is warmed up and timed ``--repeats`` times, one case after the other (each case's
algorithm state is freed before the next is built, to bound memory: 8 ranks x 16M parameters).
The prediction runs the same algorithm for one sync on a :class:`StackedCommunicator` of the
same N rows and width, and feeds its logged events to :class:`simulations.network.SimClock`
(bandwidth = the TCP payload rate of the shaped link, :func:`tcp_payload_bandwidth`: 0.956 of
the rate at MTU 1500; latency = the delay; no compute): the same bytes, the same model.
Raw transfers are predicted by the same clock from the event they are.

Prints one JSON header line, then one JSON line per (world size, case): measured median seconds,
min/max, the model's seconds, measured/model, bytes per node. Needs root and ``ip netns``.

    python benchmarks/wan.py --world-sizes 4,8 --rate-mbit 100 --repeats 3
    python benchmarks/wan.py --world-sizes 4,8 --rate-mbit 1000 --repeats 3
    python benchmarks/wan.py --quick      # 2 ranks, 0.25M parameters, 4 cases, 1 repeat
    python benchmarks/wan.py --world-sizes 2 --params 1 --repeats 8 --inner-steps 60 \
        --cases compute,diloco+steps,diloco+overlap,noloco+overlap,diloco:int8+overlap
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cpu_probe import difference, snapshot
from benchmarks.netns import (
    ShapedLan,
    cleanup_stale,
    default_burst,
    netem_available,
    unavailable,
)
from benchmarks.sync_overhead import raw_exchange, time_once
from gossip.algorithms import build_algorithm, make_config, needs_topology
from gossip.allocator import reuse_freed_memory
from gossip.comm import StackedCommunicator, TorchCommunicator
from gossip.comm.stacked import CommEvent
from gossip.flat import FlatParams
from gossip.topology import make_topology, random_matching
from simulations.network import NetworkModel, SimClock, tcp_payload_bandwidth

RAW = ("raw_allreduce", "raw_send", "raw_pair_sends_first", "raw_pair_recvs_first", "raw_ring",
       "raw_alltoall", "raw_alltoall_p2p")
ALGOS = ("fedavg", "diloco", "noloco", "dpsgd", "choco")
CODECS = ("bf16", "fp16", "int8", "fp8", "topk:0.01", "randk:0.01")
DEFAULT_CASES = (*RAW, "fedavg", "diloco", "noloco", "dpsgd", *(f"diloco:{c}" for c in CODECS),
                 "noloco:int8", "choco:int8")
PORT = 29517
RUSAGE_THREAD = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
INNER_STEPS, INNER_SIZE = 10, 768  # overlap cases: H stand-in inner steps, matmul size


SEGMENT_MODES = ("steps", "overlap")


def split_segment(case: str) -> tuple[str, str | None]:
    """``ALGO[:CODEC]+MODE`` -> (``ALGO[:CODEC]``, MODE); anything else -> (case, None)."""
    base, plus, mode = case.partition("+")
    if not plus:
        return case, None
    if mode not in SEGMENT_MODES:
        raise ValueError(f"case {case!r}: the part after '+' must be one of "
                         f"{list(SEGMENT_MODES)}")
    return base, mode


def parse_case(case: str) -> tuple[str, str]:
    """``ALGO[:CODEC][+MODE]`` -> (algo, codec); a raw case or ``compute`` -> (case, "none")."""
    case, _ = split_segment(case)
    if case in RAW or case == "compute":
        return case, "none"
    algo, _, codec = case.partition(":")
    if algo not in ALGOS:
        raise ValueError(f"case must be one of {list(RAW)} or ALGO[:CODEC] with ALGO in "
                         f"{list(ALGOS)}, got {case!r}")
    return algo, codec or "none"


def build_sync(algo: str, codec: str, flat: FlatParams, comm: Any, n: int,
               overlap: bool = False) -> Any:
    """The algorithm object that syncs every step (NoLoCo in pairs, gossip on a ring)."""
    extra = {"overlap": True} if overlap else {}
    config = make_config(algo, sync_every=1, group_size=2, compress=codec, **extra)
    topology = make_topology("ring", n) if needs_topology(algo) else None
    return build_algorithm(algo, config, flat, comm, topology=topology)


def partner(rank: int, n: int, step: int) -> int:
    group = next(g for g in random_matching(n, 2, step, 0) if rank in g)
    return group[1] if group[0] == rank else group[0]


# ----------------------------------------------------------------------------- the model


def pair_table(n: int, step: int) -> torch.Tensor:
    return torch.tensor([[partner(i, n, step)] for i in range(n)])


def predict(case: str, n: int, numel: int, model: NetworkModel) -> tuple[float, float]:
    """(seconds, bytes sent per node) the network model gives one sync of ``case``."""
    nbytes = 4 * numel
    alive = torch.ones(n, dtype=torch.bool)
    if case == "raw_allreduce":
        events = [CommEvent("all_reduce", nbytes, None, None, alive)]
        sent = 2 * (n - 1) * nbytes / n
    elif case == "raw_send":  # the first of each pair sends, the second receives
        table = torch.full((n, 1), -1)
        for i in range(n):
            j = partner(i, n, 1)
            if j < i:
                table[i, 0] = j
        events = [CommEvent("exchange", nbytes, table, table >= 0, None)]
        sent = nbytes
    elif case == "raw_ring":  # both neighbours on a ring, as D-PSGD's exchange
        table = torch.tensor([[(i - 1) % n, (i + 1) % n] for i in range(n)])
        events = [CommEvent("exchange", nbytes, table, table >= 0, None)]
        sent = 2 * nbytes
    elif case in ("raw_alltoall", "raw_alltoall_p2p"):  # numel bytes (int8's) in n chunks
        table = torch.tensor([[j for j in range(n) if j != i] for i in range(n)])
        events = [CommEvent("exchange", numel // n, table, table >= 0, None)]
        sent = (n - 1) * (numel // n)
    elif case in RAW:
        table = pair_table(n, 1)
        events = [CommEvent("exchange", nbytes, table, table >= 0, None)]
        sent = nbytes
    else:
        algo, codec = parse_case(case)
        torch.manual_seed(0)
        flat = FlatParams.from_stacked({"w": torch.randn(n, numel)})
        comm = StackedCommunicator(n)
        sync = build_sync(algo, codec, flat, comm, n)
        sync.step(1)
        events = comm.events
        sent = float(comm.bytes_per_node.mean())
        del sync, flat
    clock = SimClock(model, n)
    for k, event in enumerate(events):
        clock.communicate(0, k, event, alive)
    return clock.now, sent


def predict_segment(case: str, n: int, numel: int, model: NetworkModel, compute: float,
                    repeats: int) -> tuple[float, float]:
    """(seconds, bytes sent per node) the network model gives one segment of an overlap case
    (``repeats`` segments in a row, as measured): ``compute`` seconds of inner steps (the
    measured ``compute`` case), then the sync's events, overlapped ones behind the next
    segment's compute (:class:`SimClock`)."""
    base, mode = split_segment(case)
    if base == "compute":
        return compute, 0.0
    algo, codec = parse_case(base)
    flat = FlatParams.from_stacked({"w": torch.randn(n, numel)})
    comm = StackedCommunicator(n)
    sync = build_sync(algo, codec, flat, comm, n, overlap=mode == "overlap")
    clock = SimClock(dataclasses.replace(model, compute_time=compute), n)
    alive, ones = torch.ones(n, dtype=torch.bool), torch.ones(n)
    for r in range(repeats):
        clock.compute(r, ones, ones)
        sync.step(r + 1)
        for k, event in enumerate(comm.events):
            clock.communicate(r, k, event, alive)
        comm.events.clear()
    return clock.now / repeats, float(comm.bytes_per_node.mean()) / repeats


# ----------------------------------------------------------------------------- one rank


def pair_exchange(send: torch.Tensor, recv: torch.Tensor, peer: int, recvs_first: bool) -> None:
    ops = [dist.P2POp(dist.isend, send, peer), dist.P2POp(dist.irecv, recv, peer)]
    for work in dist.batch_isend_irecv(ops[::-1] if recvs_first else ops):
        work.wait()


def ring_exchange(send: torch.Tensor, recv: list[torch.Tensor], peers: list[int],
                  sends: list[torch.Tensor] | None = None) -> None:
    """Receives first, then one send to each peer (``send``, or ``sends[k]`` to ``peers[k]``),
    all at once (as ``TorchCommunicator.exchange`` and the compressed all-reduce's stages)."""
    ops = [dist.P2POp(dist.irecv, buf, j) for buf, j in zip(recv, peers, strict=True)]
    outs = sends if sends is not None else [send] * len(peers)
    ops += [dist.P2POp(dist.isend, x, j) for x, j in zip(outs, peers, strict=True)]
    for work in dist.batch_isend_irecv(ops):
        work.wait()


def one_way(send: torch.Tensor, recv: torch.Tensor, peer: int, rank: int) -> None:
    if rank < peer:
        dist.send(send, peer)
    else:
        dist.recv(recv, peer)


def worker(opts: dict[str, Any]) -> None:
    rank, n = opts["rank"], opts["world_size"]
    reuse_freed_memory()  # as launch.train's ranks do (GOSSIP_REUSE_MEMORY=0: glibc's default)
    torch.set_num_threads(1)
    store = dist.TCPStore(opts["master"], PORT, n, is_master=rank == 0,
                          timeout=timedelta(seconds=opts["timeout"]))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=n,
                            timeout=timedelta(seconds=opts["timeout"]))
    try:
        comm = TorchCommunicator(timeout=opts["timeout"])
        numel = opts["numel"]
        torch.manual_seed(rank)
        raw = torch.randn(numel)
        got = torch.empty(numel)
        ring = [(rank - 1) % n, (rank + 1) % n]
        got2 = [got, torch.empty(numel)]
        chunks = torch.randint(0, 255, (n, numel // n), dtype=torch.uint8)
        got_chunks = torch.empty_like(chunks)
        others = [j for j in range(n) if j != rank]
        raws: dict[str, Callable[[int], Any]] = {
            "raw_allreduce": lambda step: dist.all_reduce(raw),
            "raw_send": lambda step: one_way(raw, got, partner(rank, n, 1), rank),
            "raw_pair_sends_first": lambda step: raw_exchange(raw, [got], [partner(rank, n, 1)],
                                                              [partner(rank, n, 1)]),
            "raw_pair_recvs_first": lambda step: pair_exchange(raw, got, partner(rank, n, 1),
                                                               True),
            "raw_ring": lambda step: ring_exchange(raw, got2, ring),
            "raw_alltoall": lambda step: dist.all_to_all_single(got_chunks, chunks),
            "raw_alltoall_p2p": lambda step: ring_exchange(
                chunks, [got_chunks[j] for j in others], others, [chunks[j] for j in others]),
        }
        eps = 1e-4 * (rank + 1)
        samples: dict[str, list[float]] = {}
        step = 0
        inner = opts.get("inner_size", INNER_SIZE)
        a, b = torch.randn(inner, inner), torch.randn(inner, inner)

        sleep = opts.get("inner_sleep_ms", 0.0) / 1e3

        def inner_steps() -> None:  # stand-in for H steps of local training
            for _ in range(opts.get("inner_steps", INNER_STEPS)):
                if sleep > 0:  # an accelerator's step: the CPU is idle meanwhile
                    time.sleep(sleep)
                else:
                    torch.mm(a, b)

        # one case at a time, its algorithm (model, anchor, momentum, residuals) freed before
        # the next: all of them at once would hold ~3.5 GiB per rank at 16M parameters
        # --rounds: every case once per round, so that a drift of the machine's load between
        # cases hits them alike (overlap cases: a sample per round, each warmed up)
        for case in [c for _ in range(opts.get("rounds", 1)) for c in opts["cases"]]:
            base, mode = split_segment(case)
            if base == "compute" or mode is not None:
                flat = None
                sync = None
                if base != "compute":
                    algo, codec = parse_case(base)
                    flat = FlatParams.from_stacked({"w": torch.randn(1, numel)})
                    sync = build_sync(algo, codec, flat, comm, n, overlap=mode == "overlap")
                samples.setdefault(case, [])
                for i in range(opts["warmup"] + 1):
                    dist.barrier()
                    ru0, proc0 = resource.getrusage(RUSAGE_THREAD), time.process_time()
                    probe0 = snapshot()
                    sync_user = sync_sys = 0.0
                    t0 = time.perf_counter()
                    for _ in range(opts["repeats"]):
                        step += 1
                        inner_steps()
                        if sync is not None and flat is not None:
                            with torch.no_grad():
                                for buf in flat.buffers():
                                    buf.add_(eps)
                            s0 = resource.getrusage(RUSAGE_THREAD)
                            sync.step(step)
                            s1 = resource.getrusage(RUSAGE_THREAD)
                            sync_user += s1.ru_utime - s0.ru_utime
                            sync_sys += s1.ru_stime - s0.ru_stime
                    dt = (time.perf_counter() - t0) / opts["repeats"]
                    ru1, proc1 = resource.getrusage(RUSAGE_THREAD), time.process_time()
                    probe = difference(probe0, snapshot(), opts["repeats"])
                    main = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
                    # CPU seconds per segment (this rank): the main thread's user and kernel time
                    # outside the sync call, the sync call's, and the process's other threads'
                    # (Gloo's)
                    samples[f"{case}:cpu"] = [
                        round(x / opts["repeats"], 4) for x in (
                            ru1.ru_utime - ru0.ru_utime - sync_user,
                            ru1.ru_stime - ru0.ru_stime - sync_sys, sync_user + sync_sys,
                            proc1 - proc0 - main)]
                    if sync is not None and hasattr(sync, "flush"):
                        sync.flush()  # the last exchange, outside the timing
                    probes: list[Any] = [None] * n
                    dist.all_gather_object(probes, probe)
                    samples[f"{case}:probe"] = probes  # type: ignore[assignment]
                    worst = torch.tensor([dt], dtype=torch.float64)
                    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
                    if i >= opts["warmup"]:
                        samples[case].append(float(worst))
                del sync, flat
                gc.collect()
                continue
            flat = None
            if case in RAW:
                fn = raws[case]
            else:
                algo, codec = parse_case(case)
                flat = FlatParams.from_stacked({"w": torch.randn(1, numel)})
                fn = build_sync(algo, codec, flat, comm, n).step
            samples.setdefault(case, [])
            for i in range(opts["warmup"] + opts["repeats"]):
                step += 1
                if flat is not None:  # stand-in for local training: the average has work
                    with torch.no_grad():
                        for buf in flat.buffers():
                            buf.add_(eps)
                dt = time_once(fn, step)
                if i >= opts["warmup"]:
                    samples[case].append(dt)
            del fn, flat
            gc.collect()
        if rank == 0:
            Path(opts["out"]).write_text(json.dumps(samples))
        dist.barrier()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def summarize(probes: list[dict[str, Any]]) -> dict[str, float]:
    """One segment's CPU from every rank's probe (:func:`benchmarks.cpu_probe.difference`):
    seconds summed over the ranks' compute (main) threads, Gloo threads and other threads (the
    compressed all-reduce's worker), the machine's busy,
    kernel, softirq and steal seconds (both cores, every process: rank 0's reading), the busy
    seconds outside the ranks' threads (others' processes, ksoftirqd), the compute threads'
    involuntary and Gloo threads' voluntary context switches, and rank 0's veth packets."""
    def total(kind: str, *fields: str) -> float:
        return sum(p["threads"].get(kind, {}).get(f, 0.0) for p in probes for f in fields)

    machine = probes[0]["machine"]
    busy = sum(v for k, v in machine.items() if k not in ("idle", "iowait"))
    ranks = sum(t["user"] + t["kernel"] for p in probes for t in p["threads"].values())
    net = probes[0]["net"]
    return {k: round(v, 3) for k, v in {
        "main_user": total("main", "user"), "main_kernel": total("main", "kernel"),
        "gloo": total("gloo", "user", "kernel"), "other_threads": total("other", "user", "kernel"),
        "machine_busy": busy,
        "machine_system": machine["system"], "machine_softirq": machine["softirq"],
        "machine_steal": machine["steal"], "outside_ranks": busy - ranks,
        "main_involuntary_switches": total("main", "involuntary"),
        "gloo_voluntary_switches": total("gloo", "voluntary"),
        "packets_rank0": net["tx_packets"] + net["rx_packets"]}.items()}


def run_world(n: int, opts: dict[str, Any], timeout: float) -> dict[str, list[float]]:
    """Build the shaped LAN, run the ranks in it, tear it down; the timed samples."""
    with ShapedLan(n, opts["rate_mbit"], delay_ms=opts["delay_ms"], mtu=opts.get("mtu", 1500),
                   gso_max_size=opts.get("gso_max_size"), burst=opts.get("burst")) as lan, \
            tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "samples.json")
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "eth0", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        procs = []
        try:
            for r in range(n):
                args = {**opts, "rank": r, "world_size": n, "master": lan.addresses[0],
                        "out": out, "timeout": timeout}
                cmd = lan.command(r, [sys.executable, __file__, "--worker", json.dumps(args)])
                procs.append(subprocess.Popen(cmd, env=env))
            deadline = time.monotonic() + timeout
            for p in procs:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
                if rc != 0:
                    raise RuntimeError(f"a rank exited with {rc} (world size {n})")
            return json.loads(Path(out).read_text())
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-sizes", default="4,8", help="comma-separated even sizes")
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="every link, both ways")
    parser.add_argument("--delay-ms", type=float, default=None,
                        help="one-way netem delay (default: 5 where netem works, else 0)")
    parser.add_argument("--params", type=float, default=16.0, help="millions of fp32 parameters")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--inner-steps", type=int, default=INNER_STEPS,
                        help="overlap cases: stand-in inner steps H per segment")
    parser.add_argument("--inner-size", type=int, default=INNER_SIZE,
                        help="overlap cases: one inner step is a square matmul of this size")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the case list this many times over, interleaved (overlap "
                             "cases: /compute is the median of each round's ratio)")
    parser.add_argument("--inner-sleep-ms", type=float, default=0.0,
                        help="overlap cases: an inner step sleeps this long instead of the "
                             "matmul (an accelerator's step: the CPU idles meanwhile)")
    parser.add_argument("--mtu", type=int, default=1500,
                        help="every veth's MTU (1500: the measured default; 9000: a variant)")
    parser.add_argument("--gso-max-size", type=int, default=None,
                        help="largest GSO segment on every veth (default: the kernel's 64 KiB)")
    parser.add_argument("--tbf-burst", type=int, default=None,
                        help="tbf bucket in bytes (default: netns.default_burst)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds one world size may take in all")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 2 ranks, 0.25M parameters, 4 cases, 1 repeat")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(json.loads(args.worker))
        return
    if args.quick:
        args.world_sizes, args.params, args.repeats = "2", 0.25, 1
        args.cases = "raw_send,raw_pair_recvs_first,diloco,noloco:int8"
    sizes = [int(s) for s in args.world_sizes.split(",") if s.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for n in sizes:
        if n < 2 or n % 2:
            parser.error(f"--world-sizes must be even numbers >= 2, got {n}")
    for case in cases:
        try:
            parse_case(case)
        except ValueError as e:
            parser.error(str(e))
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not args.inner_sleep_ms >= 0:  # (a negative one silently ran the matmul instead)
        parser.error(f"--inner-sleep-ms must be >= 0, got {args.inner_sleep_ms}")
    if args.repeats < 1 or args.warmup < 0 or not args.params > 0 or not args.rate_mbit > 0:
        parser.error("--repeats must be >= 1, --warmup >= 0, --params and --rate-mbit > 0")
    why = unavailable()
    if why is not None:
        sys.exit(f"wan.py: {why}")
    cleanup_stale()
    netem = netem_available()
    delay = args.delay_ms if args.delay_ms is not None else (5.0 if netem else 0.0)
    if delay > 0 and not netem:
        parser.error("--delay-ms needs the netem qdisc, which this kernel lacks")
    numel = int(args.params * 1e6)
    opts = {"numel": numel, "cases": cases, "repeats": args.repeats, "warmup": args.warmup,
            "rate_mbit": args.rate_mbit, "delay_ms": delay, "inner_steps": args.inner_steps,
            "inner_size": args.inner_size, "inner_sleep_ms": args.inner_sleep_ms,
            "rounds": args.rounds,
            "mtu": args.mtu, "gso_max_size": args.gso_max_size, "burst": args.tbf_burst}
    # the model's bandwidth is payload bytes/s; the tbf's rate counts Ethernet frames
    bandwidth = tcp_payload_bandwidth(args.rate_mbit * 1e6, args.mtu)
    model = NetworkModel(latency=delay / 1e3, bandwidth=bandwidth, compute_time=0.0)
    print(json.dumps({
        "benchmark": "wan", "torch": torch.__version__, "cpu_count": os.cpu_count(),
        "mode": f"tbf+netem {delay} ms" if delay > 0 else "tbf (bandwidth only: no netem)",
        "netem_available": netem, "rate_mbit": args.rate_mbit,
        "model_bandwidth_bytes_per_s": round(bandwidth), "params": numel,
        "bytes": 4 * numel, "world_sizes": sizes, "repeats": args.repeats,
        "warmup": args.warmup, "inner_steps": args.inner_steps, "inner_size": args.inner_size,
        "inner_sleep_ms": args.inner_sleep_ms, "mtu": args.mtu, "gso_max_size": args.gso_max_size,
        "rounds": args.rounds,
        "tbf_burst": args.tbf_burst or default_burst(args.rate_mbit),
        "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)
    for n in sizes:
        samples = run_world(n, opts, args.timeout)
        compute = statistics.median(samples["compute"]) if "compute" in samples else None
        for case in cases:
            if case == "compute" or split_segment(case)[1] is not None:
                if compute is None:
                    parser.error("overlap cases need the 'compute' case too")
                seconds, sent = predict_segment(case, n, numel, model, compute, args.repeats)
            else:
                seconds, sent = predict(case, n, numel, model)
            measured = statistics.median(samples[case])
            row = {"world_size": n, "case": case, "seconds": round(measured, 3),
                   "min_max": [round(min(samples[case]), 3), round(max(samples[case]), 3)],
                   "model_seconds": round(seconds, 3),
                   "measured/model": round(measured / seconds, 3) if seconds > 0 else None,
                   "bytes_per_node": int(sent)}
            if split_segment(case)[1] is not None and compute:
                # paired by round: each round's sample over that round's compute
                row["/compute"] = round(statistics.median(
                    m / c for m, c in zip(samples[case], samples["compute"], strict=True)), 3)
                if len(samples[case]) > 1:
                    row["/compute_by_round"] = [
                        round(m / c, 3)
                        for m, c in zip(samples[case], samples["compute"], strict=True)]
            if f"{case}:cpu" in samples:  # rank 0's CPU seconds per segment
                row["cpu_rank0"] = dict(zip(("compute_user", "compute_sys", "sync_call",
                                             "other_threads"), samples[f"{case}:cpu"],
                                            strict=True))
            if f"{case}:probe" in samples:  # every rank's threads, the machine, the veth
                row["probe"] = samples[f"{case}:probe"]
                row["cpu_per_segment"] = summarize(row["probe"])
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
