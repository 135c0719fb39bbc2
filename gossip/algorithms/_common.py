"""Pieces every algorithm uses: sync statistics, config checks, inactive-row protection."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gossip.comm.base import Communicator

__all__ = [
    "SyncStats",
    "check_bool",
    "check_fraction",
    "check_nonnegative",
    "check_positive",
    "check_seed",
    "frozen_rows",
    "timed_sync",
]


@dataclass
class SyncStats:
    """What one synchronisation did: when, how long, how many bytes this process sent."""

    step: int
    seconds: float = 0.0
    bytes_sent: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def check_positive(name: str, value: float, *, integer: bool = False) -> None:
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    _check_real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def check_nonnegative(name: str, value: float) -> None:
    _check_real(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")


def check_fraction(name: str, value: float, *, low_open: bool = False) -> None:
    _check_real(name, value)
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must be in {'(' if low_open else '['}0, 1], got {value!r}")


def check_seed(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@contextmanager
def frozen_rows(tensors: Sequence[Tensor], active: Tensor | None) -> Iterator[None]:
    """Leave the rows where ``active`` is False exactly as they were when the block started.

    A node that is down or not merging this tick must keep its parameters and its optimizer
    state bit for bit (a zero update is not a skipped update).
    """
    if active is None or bool(active.all()):
        yield
        return
    idle = ~active.to(torch.bool)
    saved = [(t, t[idle.to(t.device)].clone()) for t in tensors]
    yield
    for t, rows in saved:
        t[idle.to(t.device)] = rows


@contextmanager
def timed_sync(comm: Communicator, stats: SyncStats) -> Iterator[SyncStats]:
    """Fill ``stats.seconds`` and ``stats.bytes_sent`` from the wall clock and the comm counters."""
    before = comm.traffic.bytes_sent
    t0 = time.perf_counter()
    yield stats
    stats.seconds = time.perf_counter() - t0
    stats.bytes_sent = comm.traffic.bytes_sent - before
