"""How many torch threads a simulation uses when ``--threads 0`` (auto).

Measured on the 2-core machines (digits MLP, FedAvg, fused SGD): below ~512 nodes the kernels
are too small for a second thread to pay; at N = 1,000 a second thread gains 1.2-1.4x on an idle
machine (``benchmarks/README.md``, steady-state rounds) but loses as soon as anything else runs
(issue 9: 455 client-steps/s on 2 threads against 746 on 1, end to end, on a shared machine;
2026-11-30 at a load average of 37, N = 1,000, FedAvg rounds with evaluation, alternating:
1,632 / 1,648 / 1,862 client-steps/s on 1 thread against 284 / 271 / 164 on 2), because a torch
thread that waits for a busy core stalls every parallel region. So the auto
choice takes the CPUs this process may run on (``os.sched_getaffinity``) minus what the others
use (the 1-minute load average, rounded), at least 1, and 1 below 512 nodes.
"""

from __future__ import annotations

import os

__all__ = ["MIN_NODES_FOR_THREADS", "auto_threads"]

#: Below this many nodes (stacked rows per process) one thread is used.
MIN_NODES_FOR_THREADS = 512


def auto_threads(rows: int, *, cpus: int | None = None, load: float | None = None) -> int:
    """Torch threads for a process holding ``rows`` stacked nodes; ``cpus`` and ``load``
    default to this process's CPU affinity and the machine's 1-minute load average."""
    if rows < MIN_NODES_FOR_THREADS:
        return 1
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:
            load = 0.0
    return max(1, min(cpus, round(cpus - load)))
