"""Run a function on W real processes joined by a Gloo (or NCCL) group (FileStore: no ports,
xdist-safe).

``run_ranks(fn, world_size, *args)`` calls ``fn(comm, *args)`` in every rank, where ``comm`` is a
:class:`gossip.comm.TorchCommunicator` over the world group, and returns the ranks' return values
in rank order. ``fn`` must be a module-level function (it is pickled into the rank processes).
A rank that raises fails the call with its traceback; a hang fails it after ``timeout`` seconds.

The ranks are forked from one forkserver per test process that imported torch and the project
once (``PRELOAD``): each rank is still a fresh process with its own process group, but does not pay
``import torch`` again (seconds per rank on a loaded 2-core machine). The server is started before
any rank initialised CUDA or a process group, so a fork copies no threads or device state.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple,
            results: Any, comm_timeout: float, backend: str) -> None:
    from gossip.comm import TorchCommunicator

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=comm_timeout))
        comm = TorchCommunicator(timeout=comm_timeout)
        out = fn(comm, *args)
        # tensors travel as bytes: a shared-memory handle dies with the rank that made it
        buf = io.BytesIO()
        torch.save(out, buf)
        _store_barrier(store, world_size)  # nobody tears the group down while others talk
        results.put((rank, "ok", buf.getvalue()))
    except BaseException:  # report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _store_barrier(store: dist.Store, world_size: int, timeout: float = 60.0) -> None:
    """A barrier through the store (it works even when a test closed some Gloo pairs)."""
    store.add("harness/done", 1)
    deadline = time.monotonic() + timeout
    while store.add("harness/done", 0) < world_size and time.monotonic() < deadline:
        time.sleep(0.01)


#: imported once in the forkserver (a module that fails to import is skipped: ranks import it):
#: torch, what a rank imports lazily (torch._dynamo on the first optimizer step, matplotlib for
#: the plots), the project
PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "matplotlib.backends.backend_agg",
           "gossip", "gossip.comm", "launch.train", "tests.distributed"]


def _context() -> Any:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_ranks(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0,
              comm_timeout: float = 60.0, backend: str = "gloo") -> list[Any]:
    ctx = _context()
    results = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, daemon=True,
                             args=(r, world_size, store_path, fn, args, results, comm_timeout,
                                   backend))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        outs: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(outs) < world_size:
            if not results.empty():
                rank, status, value = results.get()
                if status == "error":
                    for p in procs:
                        p.kill()
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                outs[rank] = torch.load(io.BytesIO(value), weights_only=False)
                continue
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                raise TimeoutError(f"ranks {sorted(set(range(world_size)) - set(outs))} did not "
                                   f"finish within {timeout} s")
            if any(p.exitcode not in (None, 0) for p in procs) and results.empty():
                time.sleep(0.2)
                if results.empty():
                    codes = [p.exitcode for p in procs]
                    for p in procs:
                        p.kill()
                    raise AssertionError(f"a rank died without reporting: exit codes {codes}")
            time.sleep(0.01)
        for p in procs:
            p.join(timeout=10)
    return [outs[r] for r in range(world_size)]


def signal_when(ready: Callable[[], bool], pid: Callable[[], int], sig: int, *,
                timeout: float = 240.0) -> threading.Event:
    """Send ``sig`` to the process ``pid()`` as soon as ``ready()`` (polled every 50 ms, on a
    daemon thread, for at most ``timeout`` seconds); the returned event is set once it is sent.
    For faults injected mid-run: a rank frozen (SIGSTOP) or killed after its N-th step."""
    sent = threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                os.kill(pid(), sig)
                sent.set()
                return
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()
    return sent
