"""Command line: run one simulated configuration and write its run directory.

Example::

    python -m simulations.run --algo gossip-vc --nodes 64 --topology random-regular:8 \\
        --partition dirichlet:0.5 --task digits --rounds 50 --out runs/x

Every :class:`simulations.config.SimConfig` field is a flag (``--sync-every``, ``--drop-prob``,
...); ``--config FILE.toml`` loads the same fields from a file and flags override it.

Start-up and exit: run as a program, this module turns Python's cyclic garbage collector off
before anything else is imported and back on once the simulation is built (:func:`run`), the
objects of the start-up frozen out of later collections (``gc.freeze``): importing torch
allocates hundreds of thousands of long-lived objects, and collecting among them cost about
0.2 s of the ~2 s to the first round. Reference counting still frees everything that is not in
a cycle. Before exit the run's objects are frozen too, so the interpreter's teardown does not
collect among them either (with both freezes it took 0.3 s instead of 0.8 s).
"""

from __future__ import annotations

import gc
import os
import signal
import sys

if __name__ == "__main__":
    gc.disable()

    def _startup_interrupt(*_: object) -> None:  # Ctrl-C while torch imports: no traceback
        print("interrupted during start-up: nothing was written", file=sys.stderr, flush=True)
        os._exit(130)  # at once: an import's `except BaseException` could swallow an exception

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _startup_interrupt)  # main() takes Ctrl-C over

from collections.abc import Sequence
from typing import Any

from gossip.allocator import reuse_freed_memory
from gossip.metrics import NO_SPACE, no_space_message
from gossip.records import table
from gossip.rundir import RunDir, interrupt_on_signal, interrupted_report
from gossip.tasks import Task
from simulations import checkpoint
from simulations.config import SimConfig, from_args
from simulations.engine import Simulation, drive, set_threads

__all__ = ["main", "run"]

#: True while the collector is off for this program's start-up (see the module docstring).
_STARTUP_GC_PAUSED = __name__ == "__main__"


def _resume_gc() -> None:
    """The start-up is over: freeze its objects out of collections, collector back on."""
    global _STARTUP_GC_PAUSED
    if _STARTUP_GC_PAUSED:
        _STARTUP_GC_PAUSED = False
        gc.freeze()
        gc.enable()


def run(cfg: SimConfig, *, task: Task | None = None) -> dict[str, Any]:
    """Run ``cfg`` to the end and return its summary (plus ``records``, its ``round`` records).

    ``cfg.actors > 1`` shards the nodes over Ray actors (:mod:`simulations.ray_backend`).
    A run directory that holds another run is refused before anything is built (2 s at
    N = 100,000, not 12 s), and nothing is created for it (:meth:`RunDir.check`).
    """
    if cfg.actors > 1 and task is not None:
        raise ValueError("task= is not supported with actors > 1 (each actor builds "
                         f"task={cfg.task!r} itself)")
    if cfg.out is not None:
        RunDir(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite).check()
    if cfg.actors > 1:
        _resume_gc()
        from simulations import ray_backend

        return ray_backend.run_on_ray(cfg)
    set_threads(cfg)
    try:
        sim = Simulation(cfg, task=task)
    finally:
        _resume_gc()
    state = checkpoint.load(sim.cfg)  # (the resolved config) refused before any round
    if state is not None:
        sim.load_state_dict(state, source=state["path"])
    # with save_models (SimConfig allows it only with out set and one process), drive writes
    # the models before the summary
    return drive(sim, resume=state)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, print a summary; returns the exit code
    (2: refused input; 130: Ctrl-C, after one line naming what was kept; 1: a full disk,
    likewise)."""
    reuse_freed_memory()  # model-sized temporaries without page faults (gossip.allocator)
    cfg = None
    try:
        cfg = from_args(argv)
        summary = run(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line saying what was kept, no traceback
        print(interrupted_report([cfg.out] if cfg is not None and cfg.out else []),
              file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        # a full disk: what it says and what the run kept, no traceback
        print(f"error: {no_space_message(e, cfg.out if cfg is not None else None)}",
              file=sys.stderr)
        print(interrupted_report([cfg.out] if cfg is not None and cfg.out else [],
                                 reason="stopped"), file=sys.stderr)
        return 1
    finally:
        _resume_gc()
    summary.pop("records", None)
    print(table(summary))
    if cfg.out:
        print(f"  run directory  {cfg.out}")
    return 0


if __name__ == "__main__":
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # Ctrl-C is main()'s from here
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupt_on_signal)  # ends the run like Ctrl-C
    code = main()
    gc.freeze()  # the interpreter's teardown then collects none of the run's objects
    sys.exit(code)
