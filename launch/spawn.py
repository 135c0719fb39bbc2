"""Start the ranks of a run around a store that outlives every one of them.

    python -m launch.spawn --nproc 4 -- --algo noloco --steps 3000 --survive-failures --out runs/x
    python -m launch.spawn --nproc 4 --store HOST:P --world-size 8 --first-rank 4 --run-id ID -- ...

This is the launcher for ``--survive-failures``. It hosts the rendezvous TCPStore in its own
process (or, with ``--store``, joins a standalone one: ``python -m launch.store``), starts one
``python -m launch.train`` process per rank with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT) plus the run's key prefix in the store,
restarts nothing, and returns as soon as every rank has finished or died. No rank hosts the store,
so any rank, rank 0 included, can die and the others carry on; and no exit barrier waits for a
dead rank (torchrun's agents wait up to 300 s for one).

A rank that stopped heart-beating (frozen: SIGSTOP, a deadlock) while every other rank has
exited is killed after ``--dead-after`` seconds of silence: the survivors already went on without
it. SIGTERM is passed on to the ranks (Ctrl-C reaches them from the terminal). The exit status
is 0 when every rank that was not killed by a signal exited 0, and at least
one did; otherwise the highest exit status of the others (1 if none is left).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO

import torch.distributed as dist

from gossip.comm.monitor import PeerMonitor
from gossip.comm.torch_comm import STORE_PREFIX_ENV
from launch.store import host_store, parse_address

__all__ = ["build_parser", "exit_status", "main", "spawn", "torchrun_store_warning"]

log = logging.getLogger("launch.spawn")


def torchrun_store_warning(env: Mapping[str, str], survive: bool) -> str | None:
    """The warning for ``--survive-failures`` under a plain torchrun (None when not needed)."""
    if not survive or STORE_PREFIX_ENV in env or "TORCHELASTIC_RUN_ID" not in env:
        return None
    return ("--survive-failures under torchrun: the rendezvous store lives in the agent of "
            "rank 0's node, so losing that node (or its agent) ends the run for every rank, and "
            "the agents wait up to 300 s for a dead rank before they return. Use "
            "`python -m launch.spawn` (or launch.ray_launch) instead")


class _Heartbeats:
    """Reads the ranks' heartbeat counters in the run's store; tells when one stopped moving."""

    def __init__(self, host: str, port: int, run_id: str, dead_after: float) -> None:
        client = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=30))
        # where init_from_env puts a rank's PeerMonitor: the run's prefix of the hosted store
        self.store = dist.PrefixStore(run_id, client)
        self.dead_after = dead_after
        self.seen: dict[int, tuple[int, float]] = {}

    def silent(self, rank: int) -> bool:
        """True once ``rank``'s counter exists and has not moved for ``dead_after`` seconds."""
        key = PeerMonitor.heartbeat_key(rank)
        now = time.monotonic()
        if not self.store.check([key]):
            return False
        count = self.store.add(key, 0)
        last = self.seen.get(rank)
        if last is None or last[0] != count:
            self.seen[rank] = (count, now)
            return False
        return now - last[1] > self.dead_after


def exit_status(codes: Mapping[int, int]) -> int:
    """0 when the survivors (ranks not killed by a signal) all exited 0; else their worst."""
    survivors = {r: c for r, c in codes.items() if c >= 0}
    if not survivors:
        return 1
    return max(survivors.values())


def spawn(train_argv: Sequence[str], *, nproc: int, store: str | None = None,
          world_size: int | None = None, first_rank: int = 0, run_id: str | None = None,
          dead_after: float | None = None, module: str = "launch.train",
          log_dir: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
          on_start: object = None) -> dict[int, int]:
    """Run ``python -m module *train_argv`` as ranks ``first_rank .. first_rank + nproc - 1``.

    Returns every local rank's exit status (negative: killed by that signal). ``dead_after``
    (seconds; None = never) kills a rank whose heartbeat stopped once all the others exited.
    ``log_dir`` writes each rank's output to ``rank_<r>.log`` there (default: inherited).
    ``on_start(procs)`` (optional) is called with ``{rank: Popen}`` once all have started.
    """
    world = nproc if world_size is None else world_size
    if nproc < 1:
        raise ValueError(f"nproc={nproc} is invalid: expected an integer >= 1")
    if first_rank < 0 or first_rank + nproc > world:
        raise ValueError(f"first_rank={first_rank} with nproc={nproc} is invalid for "
                         f"world_size={world}: expected 0 <= first_rank <= world_size - nproc")
    if world > nproc and (store is None or run_id is None):
        raise ValueError(f"world_size={world} spans more than this machine's nproc={nproc}: "
                         "pass --store HOST:P (python -m launch.store) and the same --run-id "
                         "on every machine")
    server = None
    if store is None:
        server = host_store("127.0.0.1", 0)
        host, port = "127.0.0.1", server.port
    else:
        host, port = parse_address(store)
    run_id = run_id or f"gossip-{uuid.uuid4().hex[:12]}"
    base = {**os.environ, **(env or {})}
    base.setdefault("OMP_NUM_THREADS", "1")  # as torchrun: N ranks must not oversubscribe
    procs: dict[int, subprocess.Popen[bytes]] = {}
    logs: list[IO[bytes]] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def forward(sig: int, _frame: object) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(sig)

    try:
        # Ctrl-C reaches the ranks from the terminal (same process group): not sent twice
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, forward)
        for local in range(nproc):
            rank = first_rank + local
            rank_env = {**base, "RANK": str(rank), "WORLD_SIZE": str(world),
                        "LOCAL_RANK": str(local), "LOCAL_WORLD_SIZE": str(nproc),
                        "MASTER_ADDR": host, "MASTER_PORT": str(port),
                        STORE_PREFIX_ENV: run_id}
            out = None
            if log_dir is not None:
                Path(log_dir).mkdir(parents=True, exist_ok=True)
                out = open(Path(log_dir) / f"rank_{rank}.log", "wb")  # noqa: SIM115 - closed below
                logs.append(out)
            procs[rank] = subprocess.Popen([sys.executable, "-m", module, *train_argv],
                                           env=rank_env, stdout=out, stderr=out)
        if callable(on_start):
            on_start(dict(procs))
        beats = None if dead_after is None else _Heartbeats(host, port, run_id, dead_after)
        codes: dict[int, int] = {}
        killed: set[int] = set()
        while len(codes) < len(procs):
            for rank, p in procs.items():
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
            running = [r for r in procs if r not in codes]
            if beats is not None and running and len(running) < len(procs):
                for rank in running:
                    if rank in killed:
                        continue
                    if all(r in codes for r in procs if r != rank) and beats.silent(rank):
                        killed.add(rank)
                        log.warning("rank %d has been silent for %.1f s while every other rank "
                                    "exited: killing it", rank, dead_after)
                        procs[rank].kill()
            time.sleep(0.05)
        return codes
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in logs:
            fh.close()
        del server


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m launch.spawn", allow_abbrev=False, description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags after '--' go to launch.train.")
    ap.add_argument("--nproc", type=int, required=True, help="ranks to start on this machine")
    ap.add_argument("--store", default=None, metavar="HOST:P",
                    help="join a standalone store (python -m launch.store); default: host one")
    ap.add_argument("--world-size", type=int, default=None,
                    help="ranks of the whole run, over all machines (default: --nproc)")
    ap.add_argument("--first-rank", type=int, default=0,
                    help="the rank of this machine's first process (default: 0)")
    ap.add_argument("--run-id", default=None,
                    help="the run's key prefix in the store; the same on every machine "
                         "(default: a fresh one)")
    ap.add_argument("--log-dir", default=None,
                    help="write each rank's output to LOG_DIR/rank_<r>.log")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    parser = build_parser()
    ns = parser.parse_args(args[:cut])
    train_argv = args[cut + 1 :]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s launch.spawn %(levelname)s: %(message)s")
    from launch.config import from_args

    try:
        cfg = from_args(train_argv)  # bad training flags fail here, not in N processes
        if ns.store is not None:
            parse_address(ns.store)
    except ValueError as e:
        parser.error(str(e))
    try:
        codes = spawn(train_argv, nproc=ns.nproc, store=ns.store, world_size=ns.world_size,
                      first_rank=ns.first_rank, run_id=ns.run_id,
                      dead_after=cfg.dead_after if cfg.survive_failures else None,
                      log_dir=ns.log_dir)
    except ValueError as e:
        parser.error(str(e))
    for rank, code in sorted(codes.items()):
        if code < 0:
            log.warning("rank %d died (%s)", rank, signal.Signals(-code).name)
        elif code:
            log.warning("rank %d exited with status %d", rank, code)
    return exit_status(codes)


if __name__ == "__main__":
    sys.exit(main())
