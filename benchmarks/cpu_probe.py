"""Where a process's CPU goes over an interval, read from ``/proc`` and ``/sys`` (Linux).

:func:`snapshot` reads, for the calling process,

- every thread's user and kernel ticks and its voluntary / involuntary context switches
  (``/proc/self/task/TID/stat`` and ``status``), keyed by thread id with its name;
- the machine's CPU ticks by kind (``/proc/stat``: user, nice, system, idle, iowait, irq,
  softirq, steal; every process on the machine, ours and others');
- the NET_RX / NET_TX / HRTIMER softirqs raised (``/proc/softirqs``, summed over CPUs);
- the packets and bytes of one network interface (``/sys/class/net/DEV/statistics``: inside
  :mod:`benchmarks.netns`'s namespaces, the rank's own veth end).

:func:`difference` turns two snapshots into seconds and counts: threads grouped as ``main`` (the
thread that called :func:`snapshot`, i.e. the compute thread), ``gloo`` (threads created by
Gloo/torch.distributed, by name: ``gloo_tcp_loop``, ``pt_gloo_runloop``, ``pt_tcpstore_uv``)
and ``other`` (Python threads: in ``benchmarks/wan.py``, the compressed all-reduce's worker of
:mod:`gossip.comm.background`; torch runs no intra-op threads at ``set_num_threads(1)``).

Without ``CONFIG_IRQ_TIME_ACCOUNTING`` (this machine's kernel) the kernel charges a tick that
lands in softirq context (TCP, veth, bridge, tbf) both to the machine's ``softirq`` and to the
thread it interrupted, so a compute thread's kernel time includes network work done on its CPU,
and softirq work that interrupts another process (or runs in ``ksoftirqd``) is outside the ranks.
Ticks are ``1 / SC_CLK_TCK`` s (10 ms here): measure intervals of seconds.
"""

from __future__ import annotations

import os
import threading
from typing import Any

__all__ = ["difference", "snapshot"]

TICK = 1.0 / os.sysconf("SC_CLK_TCK")
STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
SOFTIRQS = ("NET_RX", "NET_TX", "HRTIMER", "TIMER")
NET_FIELDS = ("tx_packets", "rx_packets", "tx_bytes", "rx_bytes")


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _thread(tid: str) -> tuple[str, list[int]] | None:
    """(name, [utime, stime, voluntary, involuntary]) of one thread, None if it ended."""
    try:
        stat = _read(f"/proc/self/task/{tid}/stat")
        status = _read(f"/proc/self/task/{tid}/status")
    except (FileNotFoundError, ProcessLookupError):
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()  # fields 3.. of proc(5)
    switches = dict(line.split(":", 1) for line in status.splitlines() if "ctxt_switches" in line)
    return name, [int(fields[11]), int(fields[12]), int(switches["voluntary_ctxt_switches"]),
                  int(switches["nonvoluntary_ctxt_switches"])]


def snapshot(dev: str = "eth0") -> dict[str, Any]:
    """The counters listed in the module doc, now."""
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        got = _thread(tid)
        if got is not None:
            threads[int(tid)] = got
    cpu = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1 : 1 + len(STAT_FIELDS)]]
    softirqs = {}
    for line in _read("/proc/softirqs").splitlines()[1:]:
        name, *counts = line.split()
        if name.rstrip(":") in SOFTIRQS:
            softirqs[name.rstrip(":")] = sum(int(c) for c in counts)
    net = {}
    for field in NET_FIELDS:
        try:
            net[field] = int(_read(f"/sys/class/net/{dev}/statistics/{field}"))
        except FileNotFoundError:
            net[field] = 0
    return {"main": threading.get_native_id(), "threads": threads, "cpu": cpu,
            "softirqs": softirqs, "net": net}


def _kind(name: str, tid: int, main: int) -> str:
    if tid == main:
        return "main"
    if "gloo" in name.lower() or name.startswith(("pt_", "ProcessGroup", "torch")):
        return "gloo"
    return "other"


def difference(before: dict[str, Any], after: dict[str, Any], per: float = 1.0
               ) -> dict[str, Any]:
    """``after - before``, divided by ``per`` (e.g. the number of segments): per thread kind
    ``[user s, kernel s, voluntary, involuntary switches]`` and the thread count, the names
    seen, the machine's CPU seconds by kind, softirqs raised and the interface's counters."""
    kinds: dict[str, list[float]] = {}
    names: dict[str, int] = {}
    for tid, (name, now) in after["threads"].items():
        old = before["threads"].get(tid, (name, [0, 0, 0, 0]))[1]
        d = [b - a for a, b in zip(old, now, strict=True)]
        k = _kind(name, tid, after["main"])
        acc = kinds.setdefault(k, [0.0, 0.0, 0.0, 0.0, 0])
        acc[0] += d[0] * TICK / per
        acc[1] += d[1] * TICK / per
        acc[2] += d[2] / per
        acc[3] += d[3] / per
        acc[4] += 1
        names[name] = names.get(name, 0) + 1
    machine = {f: (b - a) * TICK / per
               for f, a, b in zip(STAT_FIELDS, before["cpu"], after["cpu"], strict=True)}
    return {
        "threads": {k: {"user": round(v[0], 4), "kernel": round(v[1], 4),
                        "voluntary": round(v[2], 1), "involuntary": round(v[3], 1),
                        "count": int(v[4])} for k, v in sorted(kinds.items())},
        "thread_names": names,
        "machine": {k: round(v, 4) for k, v in machine.items()},
        "softirqs": {k: round((after["softirqs"][k] - before["softirqs"].get(k, 0)) / per, 1)
                     for k in after["softirqs"]},
        "net": {k: round((after["net"][k] - before["net"][k]) / per, 1) for k in NET_FIELDS},
    }
