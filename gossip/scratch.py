"""Reusable scratch tensors.

A fresh model-sized tensor per call costs a page fault per 4 KiB page on a CPU the first time it
is written (PyTorch's CPU allocator keeps no cache, and glibc returns large blocks to the OS on
free): about as long as moving the tensor over loopback Gloo. Hot paths that need a model-sized
temporary on every call (receive buffers, merge results, gathered rows) keep one here instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["Scratch"]


class Scratch:
    """One reusable tensor per (shape, dtype, device); a tensor handed out is overwritten by the
    next caller that asks for the same key."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[tuple[int, ...], torch.dtype, torch.device], Tensor] = {}

    def get(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype,
            device: torch.device | str) -> Tensor:
        key = (tuple(shape), dtype, torch.device(device))
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = torch.empty(key[0], dtype=dtype, device=device)
        return buf

    def like(self, x: Tensor) -> Tensor:
        """A reusable tensor shaped like ``x``."""
        return self.get(x.shape, x.dtype, x.device)
