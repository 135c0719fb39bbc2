"""Large CPU tensors without page faults: keep freed memory for reuse (glibc ``malloc``).

glibc serves an allocation above its *mmap threshold* (dynamic, at most 32 MiB on 64-bit Linux)
with fresh pages from ``mmap`` and returns them to the kernel on ``free``. Every new tensor of
that size then page-faults on first touch: on these machines a new 64 MB fp32 tensor costs about
50 ms of page faults against 6 ms for the arithmetic that fills it. Model-sized temporaries are
exactly what a sync makes (an outer gradient, a decoded int8 buffer, a stacked simulator state),
so at 16M parameters this, not the math, dominated the CPU side of a sync.

:func:`reuse_freed_memory` raises the threshold (and the trim threshold) with ``mallopt``, so such
tensors come from the heap and freed ones are reused by the next allocation of the same size:
measured on a 16M-element buffer, int8 encode 0.22 -> 0.07 s, decode 0.15 -> 0.02 s, ``x.abs()``
64 -> 8 ms (one thread; ``python benchmarks/allocator.py`` prints them). The price is that the
process keeps its peak heap instead of returning freed memory to the system, the usual trade
of a training process (as with jemalloc or tcmalloc).

It changes the whole process, so the library never calls it by itself: the project's launchers
(``launch.train``, the Ray workers, ``simulations.run`` and ``simulations.compare``) call it at
start, and a user's own script may (``gossip.reuse_freed_memory()``). ``GOSSIP_REUSE_MEMORY=0`` in
the environment turns it off, and glibc's own ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_`` variables, when set, are left to rule. Elsewhere than on glibc it does
nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Allocations up to this size come from the heap (larger ones still use mmap).
DEFAULT_MAX_BYTES = 1 << 30

_applied: bool | None = None


def reuse_freed_memory(max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Let allocations up to ``max_bytes`` reuse freed heap memory (see the module doc).

    Returns whether the setting is in force: False off glibc, with ``GOSSIP_REUSE_MEMORY=0``,
    where the user set glibc's variables, or if glibc refused the value. Calling it again is
    free."""
    global _applied
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("GOSSIP_REUSE_MEMORY", "1") == "0" or any(
            v in os.environ for v in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl and others raise here
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    limit = min(max_bytes, (1 << 31) - 1)
    # the trim threshold first: memory freed at the top of the heap stays for reuse
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)) and bool(
        mallopt(_M_MMAP_THRESHOLD, limit))
    return _applied
