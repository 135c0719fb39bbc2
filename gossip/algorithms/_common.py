"""Pieces every algorithm uses: sync statistics, config checks, inactive-row protection."""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator, Mapping, Sequence
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
    "check_state",
    "check_step",
    "compressor_rows",
    "compressors_state",
    "frozen_rows",
    "load_compressors_state",
    "load_tensors",
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


def check_step(step: int) -> None:
    """``step`` of ``Algorithm.step``: the 1-based count of inner steps taken (a sync before
    any step, step 0, would pair the wrong rounds)."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (call step(k) after the k-th inner "
                         f"optimizer step), got step={step!r}")


def check_state(name: str, state: object, keys: Sequence[str],
                comps: list[list[Compressor]] | None, *, overlap: bool | None = None) -> Mapping:
    """Refuse, with a ValueError that says what differs, a state another algorithm saved, or
    one saved with compression, error feedback or ``overlap`` (DiLoCo, NoLoCo) on where this
    algorithm has it off or the reverse. ``keys``: what the algorithm's state must hold."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be the dict {name}.state_dict() returned, got "
                         f"{type(state).__name__}")
    saved = state.get("algorithm")
    if saved is not None and saved != name:
        raise ValueError(f"state was saved by algorithm {saved!r}, this is {name!r}")
    if overlap is not None and ("in_flight" in state) != overlap:
        raise ValueError(f"state was saved with overlap={not overlap}, this {name} has "
                         f"overlap={overlap}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"state is not a {name} state (saved by another algorithm?): it lacks "
                         f"{missing}; it has {sorted(state)}")
    if ("compress" in state) != (comps is not None):
        raise ValueError(f"state was saved {'with' if 'compress' in state else 'without'} "
                         f"compression, this {name} has compress="
                         f"{'none' if comps is None else repr(comps[0][0].codec.kind)}")
    if comps is not None:
        has_ef = comps[0][0].feedback is not None
        saved_ef = all("residual" in c for row in state["compress"] for c in row)
        if saved_ef != has_ef:
            raise ValueError(f"state was saved with error_feedback={saved_ef}, this {name} has "
                             f"error_feedback={has_ef}")
    return state


def load_tensors(name: str, key: str, dst: Sequence[Tensor], src: object) -> None:
    """Copy the saved tensors ``src`` (``state[key]``) into ``dst``, refusing, by a ValueError
    naming the tensor and both shapes, a state saved from another model (or world size)."""
    if not isinstance(src, Sequence) or len(src) != len(dst):
        count = len(src) if isinstance(src, Sequence) else type(src).__name__
        raise ValueError(f"state[{key!r}] holds {count} tensors, this {name} has {len(dst)}: "
                         "saved from another model (other dtypes or devices) or other fragments")
    for i, (d, s) in enumerate(zip(dst, src, strict=True)):
        if not isinstance(s, Tensor) or s.shape != d.shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"state[{key!r}][{i}] has shape {got}, this {name} has "
                             f"{tuple(d.shape)}: saved from another model (rows x flat size "
                             "differ)")
    with torch.no_grad():
        for d, s in zip(dst, src, strict=True):
            d.copy_(s)


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


def compressor_rows(comps: list[list[Compressor]] | None) -> list[Tensor]:
    """The compressors' per-node state [L, P]: the error-feedback residuals (for an algorithm's
    ``state_rows``; nothing without compression or without error feedback)."""
    if comps is None:
        return []
    return [c.feedback.residual for row in comps for c in row if c.feedback is not None]


def compressors_state(comps: list[list[Compressor]] | None) -> dict[str, object]:
    """The compressors' state for an algorithm's ``state_dict`` (nothing without compression)."""
    if comps is None:
        return {}
    return {"compress": [[c.state_dict() for c in row] for row in comps]}


def load_compressors_state(comps: list[list[Compressor]] | None, state: Mapping) -> None:
    """Restore :func:`compressors_state` (after :func:`check_state`)."""
    if comps is None:
        return
    if [len(row) for row in state["compress"]] != [len(row) for row in comps]:
        raise ValueError(f"state['compress'] has {[len(r) for r in state['compress']]} "
                         f"compressors, this algorithm has {[len(r) for r in comps]}")
    for i, (row, saved) in enumerate(zip(comps, state["compress"], strict=True)):
        for c, s in zip(row, saved, strict=True):
            if c.feedback is not None:
                saved_shape = tuple(s["residual"].shape)
                if saved_shape != tuple(c.feedback.residual.shape):
                    raise ValueError(f"state['compress'][{i}] holds an error-feedback residual "
                                     f"of shape {saved_shape}, this algorithm's is "
                                     f"{tuple(c.feedback.residual.shape)}: saved from another "
                                     "model (rows x flat size differ)")
                c.feedback.residual.copy_(s["residual"])
            c.calls = int(s["calls"])
