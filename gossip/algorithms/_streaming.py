"""Streaming fragments and overlapped outer steps, shared by DiLoCo and NoLoCo.

**Fragments** (Streaming DiLoCo, Douillard et al. 2025, arXiv 2501.18512). The model's flat
parameters (its buffers laid end to end, ``T`` elements) are cut into ``F`` contiguous ranges,
fragment ``f`` = elements ``[T f // F, T (f + 1) // F)``, each split at buffer boundaries into
pieces (buffer ``b``, columns). Fragment ``f`` is synchronised at the inner steps ``s >= 1``
with ``s = o_f (mod H)``, offset ``o_f = f H // F`` (floor: with ``H`` not divisible by ``F``
the gaps between fragments differ by one step). Every fragment still syncs every ``H`` steps, one
at a time, so a sync moves ``1 / F`` of the model. ``F = 1`` is the plain algorithm.

**Overlap** (the one-step-delayed variant of Streaming DiLoCo's overlapped communication): the
exchange a fragment starts at one of its syncs is waited on at its next sync, ``H`` inner steps
later, and only then enters the outer update; see :class:`~gossip.algorithms.diloco.DiLoCo` and
:class:`~gossip.algorithms.noloco.NoLoCo` for the equations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from gossip.algorithms._common import check_bool, check_positive

__all__ = ["Piece", "check_streaming", "due_fragment", "fragment_pieces"]


def check_streaming(overlap: bool, fragments: int, sync_every: int) -> None:
    """The ``overlap`` and ``fragments`` config fields (``fragments <= sync_every``, so every
    fragment has its own offset)."""
    check_bool("overlap", overlap)
    check_positive("fragments", fragments, integer=True)
    if fragments > sync_every:
        raise ValueError(f"fragments must be <= sync_every={sync_every} (each fragment syncs "
                         f"at its own inner step), got fragments={fragments}")


@dataclass(frozen=True)
class Piece:
    """Columns ``cols`` of buffer ``buffer``: one fragment's part of that buffer."""

    buffer: int
    cols: slice


def fragment_pieces(buffers: Sequence[Tensor], fragments: int) -> list[list[Piece]]:
    """Fragment ``f``'s pieces, for every ``f`` (see the module doc); raises a ValueError naming
    ``fragments`` when there are fewer parameters than fragments."""
    widths = [int(b.shape[-1]) for b in buffers]
    total = sum(widths)
    if fragments > total:
        raise ValueError(f"fragments must be <= the number of parameters ({total}), got "
                         f"fragments={fragments}")
    out: list[list[Piece]] = []
    for f in range(fragments):
        lo, hi = total * f // fragments, total * (f + 1) // fragments
        pieces, offset = [], 0
        for b, width in enumerate(widths):
            start, stop = max(lo, offset), min(hi, offset + width)
            if start < stop:
                pieces.append(Piece(b, slice(start - offset, stop - offset)))
            offset += width
        out.append(pieces)
    return out


def due_fragment(step: int, sync_every: int, fragments: int) -> int | None:
    """The fragment synchronised after inner step ``step`` (1-based), or None."""
    if step < 1:
        return None
    phase = step % sync_every
    for f in range(fragments):
        if f * sync_every // fragments == phase:
            return f
    return None
