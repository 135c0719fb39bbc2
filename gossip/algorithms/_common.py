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
from gossip.compress import Compressor, parse_codec

__all__ = [
    "SyncStats",
    "check_bool",
    "check_compress",
    "check_fraction",
    "check_nonnegative",
    "check_positive",
    "check_seed",
    "compressors_state",
    "frozen_rows",
    "load_compressors_state",
    "make_compressors",
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


def check_compress(compress: str, error_feedback: bool) -> None:
    """The ``compress`` and ``error_feedback`` fields every algorithm config has."""
    codec = parse_codec(compress, "compress")
    check_bool("error_feedback", error_feedback)
    if error_feedback and not codec.lossy:
        raise ValueError("error_feedback=True needs a lossy compress, got compress='none'")


def make_compressors(compress: str, error_feedback: bool, buffers: Sequence[Tensor], *,
                     seed: int = 0, copies: int = 1) -> list[list[Compressor]] | None:
    """``copies`` compressors per buffer (one per thing the algorithm sends of it), each with its
    own residual and seeds; None for ``compress='none'`` (the uncompressed paths, unchanged)."""
    codec = parse_codec(compress, "compress")
    if not codec.lossy:
        return None
    return [[Compressor(codec, b.shape[0], b.shape[1], error_feedback=error_feedback,
                        seed=seed * 7919 + 31 * i + j, device=b.device) for j in range(copies)]
            for i, b in enumerate(buffers)]


def compressors_state(comps: list[list[Compressor]] | None) -> dict[str, object]:
    """The compressors' state for an algorithm's ``state_dict`` (nothing without compression)."""
    if comps is None:
        return {}
    return {"compress": [[c.state_dict() for c in row] for row in comps]}


def load_compressors_state(comps: list[list[Compressor]] | None, state: dict) -> None:
    if comps is None:
        return
    for row, saved in zip(comps, state["compress"], strict=True):
        for c, s in zip(row, saved, strict=True):
            c.load_state_dict(s)
