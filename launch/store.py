"""A standalone rendezvous store that outlives every rank.

    python -m launch.store --port 29400 [--host 0.0.0.0]

Serves a c10d TCPStore until SIGINT/SIGTERM. Runs started with
``python -m launch.spawn --store HOST:29400 --run-id ID ...`` on one or more machines join it,
each run under its own key prefix, so one store can serve many runs one after another. Because no
rank hosts it, any rank (rank 0 included) can die and the others carry on with
``--survive-failures``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist

__all__ = ["host_store", "main", "parse_address"]


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ValueError naming the value otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"store={text!r} is invalid: expected HOST:PORT with 0 < PORT < 65536")
    return host, int(port)


def host_store(host: str = "127.0.0.1", port: int = 0) -> dist.TCPStore:
    """A TCPStore server in this process (``port=0``: a free port; read it from ``.port``)."""
    return dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                         timeout=timedelta(seconds=60))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.store", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True, help="TCP port to serve on (0: a free "
                    "one, printed)")
    ap.add_argument("--host", default="0.0.0.0", help="address to bind (default: all)")
    args = ap.parse_args(argv)
    if not 0 <= args.port < 65536:
        ap.error(f"port={args.port} is invalid: expected 0 <= PORT < 65536")
    try:
        store = host_store(args.host, args.port)
    except (RuntimeError, OSError) as e:  # the port is taken, the host unknown, ...
        print(f"launch.store: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"launch.store: serving on {args.host}:{store.port}", flush=True)
    while not stop.wait(1.0):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
