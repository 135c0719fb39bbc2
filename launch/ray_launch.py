"""Run ``launch.train`` on a Ray cluster: one Ray actor per rank instead of one torchrun process.

    python -m launch.ray_launch --num-workers 4 [--address auto] [--gpus-per-worker 0|1] \\
        [--cpus-per-worker 1] -- --algo noloco --task digits --steps 300 --out runs/x

The flags after ``--`` (or any flag this launcher does not know) go unchanged to
``launch.train.main``, which every actor runs with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; see :mod:`raytools.workers`): the same training loop as
under torchrun, over Gloo on CPUs or NCCL with one GPU per actor. Ranks are numbered node by
node, this machine's first; rank 0 writes the run directory, so on a multi-node cluster whose
driver node holds no actor, ``--out`` must be on a filesystem the nodes share. The actors start
in this directory (when it exists on their node), so a relative ``--out`` means the same place.
Rank 0's output (the progress log and the summary table) appears here, prefixed ``(rank0 ...)``.

The driver hosts the rendezvous store (a TCPStore on a free port of this machine), so it outlives
every rank. The exit status is 0 when every rank returns 0. A rank that raises, dies, freezes (its
heartbeat silent for 30 s: :mod:`raytools.workers`) or outlives
``--run-timeout-s`` stops all of them and the error names the rank. With ``--survive-failures``
the others carry on instead, as under ``launch.spawn``: a dead or raising rank is reported when
the survivors are done, a frozen one is killed then, and the exit status is 0 when every
survivor returned 0 (:func:`launch.spawn.exit_status`; a dead rank counts as killed by SIGKILL, a
frozen one by SIGSTOP).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from gossip.comm.torch_comm import STORE_PREFIX_ENV
from launch.spawn import exit_status
from launch.store import host_store
from raytools.workers import WorkerGroup, WorkerGroupConfig, WorkerGroupError

__all__ = ["DEFAULT_ENTRY", "build_parser", "launch", "main", "parse"]

log = logging.getLogger("launch.ray_launch")

DEFAULT_ENTRY = "launch.train:main"
_LOG_FLUSH_S = 1.0  # Ray's log monitor polls actor logs every 0.1 s
SURVIVE_FLAG = "--survive-failures"
#: the exit status a failed rank counts as (launch.spawn's: minus the signal that ended it)
_FAILED_CODES = {"died": -9, "frozen": -19}


def _resolve(entry: str) -> Callable[[list[str]], Any]:
    module, sep, name = entry.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"entry={entry!r} is invalid: expected 'module:function'")
    fn = getattr(importlib.import_module(module), name, None)
    if not callable(fn):
        raise ValueError(f"entry={entry!r} is invalid: {module} has no function {name!r}")
    return fn


def _run_entry(entry: str, argv: list[str]) -> int:
    """In an actor: call ``entry(argv)``; its return value (None = 0) is the exit status."""
    code = _resolve(entry)(list(argv))
    if code is None:
        return 0
    if not isinstance(code, int):
        raise TypeError(f"{entry} returned {code!r}; expected an exit status (int or None)")
    return code


def launch(train_argv: Sequence[str], config: WorkerGroupConfig | None = None, *,
           workers: WorkerGroup | None = None, entry: str = DEFAULT_ENTRY) -> list[int]:
    """Run ``entry(train_argv)`` (default ``launch.train.main``) once in each of W actors.

    Either ``config`` (start W actors, stop them at the end) or ``workers`` (reuse running
    actors; they get a fresh MASTER_PORT). Returns every rank's exit status in rank order.
    Raises :class:`WorkerGroupError` naming the rank if one raises, dies or times out (all the
    actors are then killed).
    """
    if (config is None) == (workers is None):
        raise ValueError("pass exactly one of config and workers")
    _resolve(entry)  # fail here, not in W actors, on a bad entry
    if workers is not None:
        workers.new_master_port()
        return _run(workers, entry, train_argv)
    assert config is not None
    with WorkerGroup(config) as group:
        return _run(group, entry, train_argv)


def _set_env(env: dict[str, str]) -> None:
    os.environ.update(env)


def _run(group: WorkerGroup, entry: str, train_argv: Sequence[str]) -> list[int]:
    # The driver hosts the rendezvous store: it outlives every rank, rank 0 included (with
    # --survive-failures the others carry on); each launch uses its own key prefix.
    import ray

    server = host_store("0.0.0.0", 0)
    group.run(_set_env, {"MASTER_ADDR": ray.util.get_node_ip_address(),
                         "MASTER_PORT": str(server.port),
                         STORE_PREFIX_ENV: f"ray-{uuid.uuid4().hex[:12]}"})
    per_rank = [(entry, list(train_argv))] * group.world_size
    try:
        if not _survives(entry, train_argv):
            codes = group.run_each(_run_entry, per_rank, what=entry)
        else:  # the survivors carry on without a rank that dies, freezes or raises
            done, failed = group.run_survivors(_run_entry, per_rank, what=entry)
            for rank, why in sorted(failed.items()):
                log.warning("rank %d: %s", rank, why)
            codes = [done[r] if r in done else _FAILED_CODES.get(failed[r], 1)
                     for r in range(group.world_size)]
        time.sleep(_LOG_FLUSH_S)  # Ray forwards the actors' last lines before they may be killed
    finally:
        del server
    return codes


def _survives(entry: str, train_argv: Sequence[str]) -> bool:
    """Whether the run carries on past a lost rank: ``--survive-failures`` as ``launch.train``
    reads it (an abbreviation, a ``--config`` file), or the flag itself for another entry."""
    if entry == DEFAULT_ENTRY:
        from launch.config import from_args

        return from_args(list(train_argv)).survive_failures
    return SURVIVE_FLAG in train_argv


def _train_flags_help() -> str:
    """The option list of ``python -m launch.train --help``, so one --help shows every flag."""
    from launch.config import build_parser as train_parser

    text = train_parser().format_help()
    start = text.find("options:")
    return text[start:] if start >= 0 else text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.ray_launch", allow_abbrev=False,
        description="Run launch.train on Ray actors (one per rank). Flags after '--', and "
                    "flags this launcher does not know, go to launch.train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m launch.ray_launch --num-workers 4 -- --algo noloco "
               "--task digits --steps 300 --out runs/noloco\n\n"
               "flags passed to launch.train:\n" + _train_flags_help())
    parser.add_argument("--num-workers", type=int, required=True, metavar="W",
                        help="ranks (Ray actors)")
    parser.add_argument("--address", default=None, help="Ray cluster to join: 'auto' (the one "
                        "on this machine) or HOST:PORT; default: start a local one")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C",
                        help="logical CPUs per actor (default: 1)")
    parser.add_argument("--gpus-per-worker", type=int, default=0, choices=(0, 1),
                        help="GPUs per actor: 1 runs NCCL, one GPU per rank (default: 0, Gloo)")
    parser.add_argument("--start-timeout-s", type=float, default=300.0, metavar="S",
                        help="seconds the actors may take to be placed and started")
    parser.add_argument("--run-timeout-s", type=float, default=None, metavar="S",
                        help="stop the run if it takes longer (default: no limit)")
    parser.add_argument("--entry", default=DEFAULT_ENTRY, metavar="MODULE:FUNCTION",
                        help=f"the function every rank runs with the training flags "
                             f"(default: {DEFAULT_ENTRY})")
    return parser


def parse(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """This launcher's flags and the flags that go to the training entry."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if "--" in args:
        cut = args.index("--")
        ns = parser.parse_args(args[:cut])
        return ns, args[cut + 1 :]
    ns, rest = parser.parse_known_args(args)
    return ns, rest


def main(argv: Sequence[str] | None = None) -> int:
    ns, train_argv = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s", stream=sys.stderr)
    try:
        config = WorkerGroupConfig(
            num_workers=ns.num_workers, cpus_per_worker=ns.cpus_per_worker,
            gpus_per_worker=float(ns.gpus_per_worker), address=ns.address,
            start_timeout_s=ns.start_timeout_s, timeout_s=ns.run_timeout_s)
        _resolve(ns.entry)
        if ns.entry == DEFAULT_ENTRY:  # bad training flags fail here, not in W actors
            from launch.config import from_args

            from_args(train_argv)
    except ValueError as e:
        build_parser().error(str(e))  # exits with status 2
    log.info("running %s on %d Ray actor(s): %s", ns.entry, ns.num_workers,
             " ".join(train_argv))
    try:
        codes = launch(train_argv, config, entry=ns.entry)
    except WorkerGroupError as e:
        print(f"ray_launch: {e}", file=sys.stderr, flush=True)
        return 1
    failed = {rank: code for rank, code in enumerate(codes) if code != 0}
    if failed:
        print(f"ray_launch: ranks exited with non-zero status: {failed}", file=sys.stderr,
              flush=True)
    return exit_status(dict(enumerate(codes)))


if __name__ == "__main__":
    sys.exit(main())
