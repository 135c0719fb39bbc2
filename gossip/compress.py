"""Compressors for what the algorithms send: pure tensor math (no torch.distributed here).

A :class:`Codec` turns rows ``x`` [M, c] (fp32) into their wire form, one ``uint8`` row of
``nbytes(c)`` bytes per row (every part of a payload -- scales, indices, values -- packed into
that row, so a payload travels as one message and its byte count is exact), and back:

- ``none``: fp32 as is (the algorithms bypass compression altogether with it).
- ``bf16``, ``fp16``: a cast.
- ``int8[:BLOCK]``: per-block absmax scales (fp32, one per BLOCK elements, default 256),
  ``q = round(x / s)`` with ``s = absmax / 127``, so ``|x - s q| <= s / 2`` per element.
  ``int8-sr[:BLOCK]`` rounds stochastically (unbiased: ``E[s q] = x``), with noise drawn from a
  hash of (seed, row id, element index): the same bits whoever encodes the row.
- ``fp8[:BLOCK]``: e4m3 (``torch.float8_e4m3fn``) with per-block scales ``absmax / 448``.
- ``topk:RATIO``: the ``k = ceil(RATIO c)`` entries of largest magnitude (int32 indices and fp32
  values).
- ``randk:RATIO``: ``k`` entries at indices drawn from a seed every rank shares, so only the
  values travel (not rescaled by ``1 / RATIO``: a biased, contractive compressor, the kind error
  feedback and CHOCO-SGD assume).

Padding to a multiple of 4 bytes keeps every fp32/int32 part aligned; it counts as sent.

Non-finite input (a diverged model) stays non-finite, entry by entry, and spoils nothing else:
an inf or NaN decodes as itself with none/bf16/fp16/topk/randk, and as NaN with int8, int8-sr
and fp8 (which have no infinity), while the finite entries of its block keep their precision
(the block's scale is the absmax of its finite entries; int8 marks the entry with the code -128,
which no finite value uses). Empty rows (width 0) and zero rows encode to zero bytes.

:class:`ErrorFeedback` keeps a node's residual, what compression has not sent yet, and adds it
to the next input (Seide et al. 2014; Karimireddy et al. 2019, arXiv 1901.09847): over any number
of calls, the sum of what was sent plus the final residual equals the sum of the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["COMPRESSORS", "Codec", "Compressor", "ErrorFeedback", "parse_codec"]

#: The compressor names (``int8``/``fp8`` take ``:BLOCK``, ``topk``/``randk`` take ``:RATIO``).
COMPRESSORS = ("none", "bf16", "fp16", "int8", "int8-sr", "fp8", "topk", "randk")

_INT8_MAX = 127.0
_INT8_NAN = -128.0  # the int8 code no finite value uses: a non-finite entry
_FP8_MAX = 448.0  # largest finite float8_e4m3fn
_MASK32 = 0xFFFFFFFF


def _pad4(n: int) -> int:
    return -n % 4


def _cheap_to_read(device: torch.device) -> bool:
    """Whether the host may read a flag off ``device`` without waiting for it (a CPU)."""
    return device.type == "cpu"


def _hash_uniform(seed: int, rows: Tensor, width: int, device: torch.device) -> Tensor:
    """Uniform [0, 1) noise [M, width] from a 32-bit integer hash of (seed, row id, column).

    The same (seed, row, column) gives the same number on every rank and in every batch shape,
    unlike a generator's stream. Products stay below 2**63 (32-bit values, 31-bit constants).
    """
    col = torch.arange(width, dtype=torch.int64, device=device)
    h = (rows.to(device, torch.int64).unsqueeze(1) * 0x2545F491 + col * 0x6C8E9CF5
         + (seed & _MASK32)) & _MASK32
    for mult in (0x7FEB352D, 0x346B5C9B):  # lowbias32-style rounds, odd 31-bit multipliers
        h = h ^ (h >> 16)
        h = (h * mult) & _MASK32
    h = h ^ (h >> 16)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _part(wire: Tensor, start: int, count: int, dtype: torch.dtype, *,
          write: bool = False) -> Tensor:
    """Bytes ``[start, start + count * size)`` of every wire row [M, B] as ``count`` elements of
    ``dtype``: a view where the alignment allows, else (reading only) a copy. A ``write`` is
    always a view: a write into a copy would be lost, so misalignment raises instead."""
    size = torch.empty((), dtype=dtype).element_size()
    piece = wire[:, start : start + count * size]
    if write:
        return piece.view(dtype)
    try:
        return piece.view(dtype)
    except RuntimeError:  # misaligned for dtype (a slot of a bigger buffer): read a copy
        return piece.contiguous().view(dtype)


@dataclass(frozen=True)
class Codec:
    """One compressor: ``kind`` in :data:`COMPRESSORS`, ``block`` for int8/fp8, ``ratio`` for
    topk/randk. Build it with :func:`parse_codec`."""

    kind: str = "none"
    block: int = 256
    ratio: float = 1.0

    @property
    def lossy(self) -> bool:
        return self.kind != "none"

    @property
    def stochastic(self) -> bool:
        return self.kind == "int8-sr"

    def k(self, width: int) -> int:
        """Entries kept per row by topk/randk (none of an empty row)."""
        return max(min(1, width), min(width, math.ceil(self.ratio * width)))

    def nbytes(self, width: int) -> int:
        """Bytes on the wire for one row of ``width`` elements (padding included)."""
        if self.kind == "none":
            n = 4 * width
        elif self.kind in ("bf16", "fp16"):
            n = 2 * width
        elif self.kind in ("int8", "int8-sr", "fp8"):
            n = 4 * math.ceil(width / self.block) + width
        elif self.kind == "topk":
            n = 8 * self.k(width)
        else:  # randk
            n = 4 * self.k(width)
        return n + _pad4(n)

    def randk_indices(self, width: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
        """The shared random indices of a randk call (the same on every rank for ``seed``)."""
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(width, generator=g)[: self.k(width)].to(device)

    def encode(self, x: Tensor, *, seed: int = 0, rows: Tensor | None = None) -> Tensor:
        """Rows ``x`` [M, c] -> wire rows uint8 [M, nbytes(c)].

        ``seed`` picks randk's indices and, with ``rows`` (int64 [M] ids of the rows, default
        0..M-1), stochastic rounding's noise; callers that must agree pass the same values.
        """
        if x.dim() != 2:
            raise ValueError(f"x must be 2-D [rows, width], got shape {tuple(x.shape)}")
        m, width = x.shape
        x = x.to(torch.float32)
        if m == 0 or width == 0:
            return torch.zeros(m, self.nbytes(width), dtype=torch.uint8, device=x.device)
        if self.kind in ("int8", "int8-sr", "fp8"):
            return self._encode_scaled(x, seed, rows)
        if self.kind == "none":
            parts = [x]
        elif self.kind in ("bf16", "fp16"):
            parts = [x.to(torch.bfloat16 if self.kind == "bf16" else torch.float16)]
        elif self.kind == "topk":
            idx = x.abs().topk(self.k(width), dim=1, sorted=False).indices
            parts = [idx.to(torch.int32), torch.gather(x, 1, idx)]
        elif self.kind == "randk":
            parts = [x[:, self.randk_indices(width, seed, x.device)]]
        else:
            raise ValueError(f"unknown compressor kind {self.kind!r}")
        wire = torch.cat([p.contiguous().view(torch.uint8).reshape(m, -1) for p in parts], 1)
        pad = _pad4(wire.shape[1])
        if pad:
            wire = torch.nn.functional.pad(wire, (0, pad))
        assert wire.shape[1] == self.nbytes(width)
        return wire

    def _encode_scaled(self, x: Tensor, seed: int, rows: Tensor | None) -> Tensor:
        """int8 / int8-sr / fp8: scales and codes written straight into the wire rows (no
        concatenation, and no padded copy when the width is a multiple of the block)."""
        m, width = x.shape
        nb = math.ceil(width / self.block)
        padded = x if nb * self.block == width else \
            torch.nn.functional.pad(x, (0, nb * self.block - width))
        blocks = padded.view(m, nb, self.block)
        top = _INT8_MAX if self.kind != "fp8" else _FP8_MAX
        scale = blocks.abs().amax(dim=2).div_(top)  # [m, nb] (aminmax is 4x slower here)
        # an inf or NaN makes its block's absmax non-finite: then scale each block by its finite
        # entries. Checking costs nothing on a CPU; on an accelerator reading the flag would wait
        # for the device, so the safe path (the same bits for finite input) always runs there.
        finite = _cheap_to_read(x.device) and bool(torch.isfinite(scale).all())
        if not finite:
            scale = blocks.nan_to_num(0.0, 0.0, 0.0).abs().amax(dim=2).div_(top)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(2)
        y = (blocks / safe).view(m, -1)[:, :width]
        wire = torch.empty(m, self.nbytes(width), dtype=torch.uint8, device=x.device)
        wire[:, 4 * nb + width :].zero_()  # the padding
        if self.kind == "fp8":  # e4m3 has no infinity (a cast saturates inf to 448): NaN
            if not finite:
                y = y.masked_fill(~torch.isfinite(y), torch.nan)
            _part(wire, 0, nb, torch.float32, write=True).copy_(scale)
            _part(wire, 4 * nb, width, torch.float8_e4m3fn, write=True).copy_(y)
            return wire
        if self.stochastic:
            ids = torch.arange(m) if rows is None else rows
            y = torch.floor(y + _hash_uniform(seed, ids, width, x.device))
        else:
            y = y.round_()
        y.clamp_(-_INT8_MAX, _INT8_MAX)
        if not finite:  # the unused code -128 marks a non-finite entry; a negative scale the
            # blocks holding one, so decoding looks for the mark only there
            y = y.masked_fill_(~torch.isfinite(x), _INT8_NAN)
            marked = torch.nn.functional.pad(y, (0, nb * self.block - width)) == _INT8_NAN
            scale = torch.where(marked.view(m, nb, self.block).any(dim=2), -scale, scale)
        _part(wire, 0, nb, torch.float32, write=True).copy_(scale)
        _part(wire, 4 * nb, width, torch.int8, write=True).copy_(y)
        return wire

    def decode(self, wire: Tensor, width: int, *, seed: int = 0) -> Tensor:
        """Wire rows uint8 [M, nbytes(width)] -> fp32 rows [M, width]. All-zero bytes decode to
        zeros (a message that did not arrive)."""
        if wire.dim() != 2 or wire.shape[1] != self.nbytes(width) or wire.dtype != torch.uint8:
            raise ValueError(f"wire must be uint8 [rows, {self.nbytes(width)}], got "
                             f"{wire.dtype} {tuple(wire.shape)}")
        m = wire.shape[0]
        if m == 0 or width == 0:
            return torch.zeros(m, width, dtype=torch.float32, device=wire.device)

        def part(start: int, count: int, dtype: torch.dtype) -> Tensor:
            return _part(wire, start, count, dtype)

        if self.kind == "none":
            return part(0, width, torch.float32).clone()
        if self.kind in ("bf16", "fp16"):
            return part(0, width, torch.bfloat16 if self.kind == "bf16" else torch.float16
                        ).to(torch.float32)
        if self.kind in ("int8", "int8-sr", "fp8"):
            nb = math.ceil(width / self.block)
            scale = part(0, nb, torch.float32).unsqueeze(2)
            q = part(4 * nb, width, torch.float8_e4m3fn if self.kind == "fp8" else torch.int8)
            if self.kind != "fp8" and (not _cheap_to_read(wire.device)
                                       or bool(scale.signbit().any())):  # non-finite entries
                # (and always on an accelerator, where reading the flag would wait: same bits)
                y = torch.nn.functional.pad(q.to(torch.float32), (0, nb * self.block - width))
                y = y.view(m, nb, self.block)
                y = torch.where(y == _INT8_NAN, torch.nan, y * scale.abs())
                return y.view(m, -1)[:, :width].contiguous()
            if nb * self.block == width:  # one pass: the codes times their scales
                out = torch.empty(m, width, dtype=torch.float32, device=wire.device)
                # (a copy then an in-place product: faster than a mixed-dtype mul, and float8
                # has no type promotion)
                out.view(m, nb, self.block).copy_(q.view(m, nb, self.block)).mul_(scale)
                return out
            y = torch.nn.functional.pad(q.to(torch.float32), (0, nb * self.block - width))
            return (y.view(m, nb, self.block) * scale).view(m, -1)[:, :width].contiguous()
        out = torch.zeros(m, width, dtype=torch.float32, device=wire.device)
        k = self.k(width)
        if self.kind == "topk":
            idx = part(0, k, torch.int32).to(torch.int64)
            return out.scatter_(1, idx, part(4 * k, k, torch.float32))
        out[:, self.randk_indices(width, seed, wire.device)] = part(0, k, torch.float32)
        return out


def parse_codec(spec: str, field: str = "compress") -> Codec:
    """``none | bf16 | fp16 | int8[:BLOCK] | int8-sr[:BLOCK] | fp8[:BLOCK] | topk:RATIO |
    randk:RATIO`` -> :class:`Codec`. Raises ValueError naming ``field`` and the value."""
    def fail(why: str) -> ValueError:
        return ValueError(f"{field}={spec!r} is invalid: {why}")

    if not isinstance(spec, str):
        raise fail("expected a string")
    kind, _, arg = spec.partition(":")
    if kind not in COMPRESSORS:
        return_kinds = "none, bf16, fp16, int8[:BLOCK], int8-sr[:BLOCK], fp8[:BLOCK], " \
                       "topk:RATIO, randk:RATIO"
        raise fail(f"expected one of {return_kinds}")
    if kind in ("none", "bf16", "fp16"):
        if arg:
            raise fail(f"{kind} takes no argument")
        return Codec(kind)
    if kind in ("int8", "int8-sr", "fp8"):
        if not arg:
            return Codec(kind)
        if not arg.isdigit() or int(arg) < 1:
            raise fail("BLOCK must be an integer >= 1")
        return Codec(kind, block=int(arg))
    try:
        ratio = float(arg)
    except ValueError:
        raise fail(f"{kind} needs :RATIO, a number in (0, 1]") from None
    if not 0.0 < ratio <= 1.0:
        raise fail("RATIO must be in (0, 1]")
    return Codec(kind, ratio=ratio)


class ErrorFeedback:
    """The residual of each local row [L, P] (fp32): ``v = x + e`` is compressed, and ``e``
    becomes ``v - sent``. Rows that send nothing keep their residual."""

    def __init__(self, rows: int, width: int, device: torch.device | str = "cpu") -> None:
        self.residual = torch.zeros(rows, width, dtype=torch.float32, device=device)

    def add(self, x: Tensor) -> Tensor:
        """``x + e`` (fp32, a new tensor)."""
        return x.to(torch.float32) + self.residual

    def update(self, v: Tensor, sent: Tensor, rows: Tensor | None = None) -> None:
        """``e = v - sent`` on ``rows`` (bool [L], default all)."""
        if rows is None:
            torch.sub(v, sent, out=self.residual)
        else:
            self.residual[rows] = (v - sent)[rows]

    def state_dict(self) -> dict[str, Any]:
        return {"residual": self.residual.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residual.copy_(state["residual"])


class Compressor:
    """How one buffer of an algorithm is sent: a codec, optional error feedback, and a call
    counter that seeds randk and stochastic rounding (every rank calls in the same order, so they
    agree on the seed without a message).

    Args:
        codec: the compressor (:func:`parse_codec`).
        rows: the buffer's rows L (its shape is [L, P]).
        width: the buffer's width P.
        error_feedback: keep a residual per row (:class:`ErrorFeedback`).
        seed: offsets the per-call seeds.
    """

    def __init__(self, codec: Codec, rows: int, width: int, *, error_feedback: bool = False,
                 seed: int = 0, device: torch.device | str = "cpu") -> None:
        if error_feedback and not codec.lossy:
            raise ValueError("error_feedback=True needs a lossy compressor, got compress='none'")
        self.codec = codec
        self.seed = seed
        self.calls = 0
        self.feedback = ErrorFeedback(rows, width, device) if error_feedback else None

    def next_seed(self) -> int:
        """The seed of the next call (and count it)."""
        self.calls += 1
        return (self.seed * 1_000_003 + self.calls) & 0x7FFFFFFF

    def begin(self, x: Tensor) -> Tensor:
        """What to compress: ``x`` (+ the residual), fp32."""
        if self.feedback is None:
            return x.to(torch.float32)
        return self.feedback.add(x)

    def end(self, v: Tensor, sent: Tensor, rows: Tensor | None = None) -> None:
        """Record that ``sent`` (decoded) went out for ``v`` on ``rows`` (bool [L], default all)."""
        if self.feedback is not None:
            self.feedback.update(v, sent, rows)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"calls": self.calls}
        if self.feedback is not None:
            state.update(self.feedback.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        if self.feedback is not None:
            self.feedback.load_state_dict(state)
