"""Parameters as views into flat contiguous buffers.

A real rank's model and the simulator's N stacked models are stored the same way: one buffer
``[L, P]`` per (dtype, device), with L = 1 on a real rank and L = N in the simulator, and every
parameter a view into it. Averaging then touches one buffer per dtype (no per-tensor messages, no
flatten/unflatten copies), and optimizers keep working on the parameters as usual.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gossip.ops import Segment

__all__ = ["FlatGroup", "FlatParams", "default_vc_scope", "scope_from_spec"]

ScopeFn = Callable[[str, nn.Module | None], bool]


def default_vc_scope(name: str, owner: nn.Module | None) -> bool:
    """Weights of Linear/Conv layers (Tian et al.'s scope); biases and norms are not rescaled."""
    linear_or_conv = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return name.rsplit(".", 1)[-1] == "weight" and isinstance(owner, linear_or_conv)


def scope_from_spec(spec: str) -> ScopeFn:
    """``"weights"`` (the default), ``"all"``, ``"none"``, or ``"re:REGEX"`` matched on names."""
    if spec == "weights":
        return default_vc_scope
    if spec == "all":
        return lambda name, owner: True
    if spec == "none":
        return lambda name, owner: False
    if spec.startswith("re:"):
        pattern = re.compile(spec[3:])
        return lambda name, owner: pattern.search(name) is not None
    raise ValueError(f"vc_scope must be 'weights', 'all', 'none' or 're:REGEX', got {spec!r}")


@dataclass
class FlatGroup:
    """Parameters of one dtype/device: ``buffer`` [L, P] and where each tensor lives in it."""

    buffer: Tensor
    segments: list[Segment]


class FlatParams:
    """The parameters of a module (L = 1) or of L stacked copies, as flat buffers.

    Build with :meth:`from_module` (a real rank) or :meth:`from_stacked` (the simulator).
    Parameters keep their identity (optimizers built before or after still work); their
    storage becomes a slice of a group's buffer.
    """

    def __init__(self, groups: list[FlatGroup], params: list[nn.Parameter],
                 names: list[str] | None = None) -> None:
        self.groups = groups
        self.params = params
        if names is None:  # params given in group order
            names = [seg.name for g in groups for seg in g.segments]
        self.names = names

    @property
    def rows(self) -> int:
        return self.groups[0].buffer.shape[0]

    @property
    def numel(self) -> int:
        return sum(g.buffer.shape[-1] for g in self.groups)

    @property
    def nbytes_per_row(self) -> int:
        return sum(g.buffer.shape[-1] * g.buffer.element_size() for g in self.groups)

    def buffers(self) -> Iterator[Tensor]:
        return (g.buffer for g in self.groups)

    @classmethod
    def from_module(cls, module: nn.Module, scope: ScopeFn = default_vc_scope) -> FlatParams:
        owners = _owners(module)
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("module has no trainable parameters")
        return cls._build(
            [(n, p, tuple(p.shape), scope(n, owners.get(n))) for n, p in named], lead=None
        )

    @classmethod
    def from_stacked(
        cls,
        stacked: Mapping[str, Tensor],
        module: nn.Module | None = None,
        scope: ScopeFn = default_vc_scope,
    ) -> FlatParams:
        """Flatten ``{name: Tensor[N, *shape]}`` (e.g. from ``torch.func.stack_module_state``).

        Returns params in the same order as the mapping, each an ``nn.Parameter`` [N, *shape].
        ``module`` (the base model) decides the variance-correction scope by layer type.
        """
        owners = _owners(module) if module is not None else {}
        items = list(stacked.items())
        if not items:
            raise ValueError("stacked has no tensors")
        lead = items[0][1].shape[0]
        for n, t in items:
            if t.shape[0] != lead:
                raise ValueError(f"stacked[{n!r}] has {t.shape[0]} rows, expected {lead}")
        entries = [(n, nn.Parameter(t.detach()), tuple(t.shape[1:]), scope(n, owners.get(n)))
                   for n, t in items]
        return cls._build(entries, lead=lead)

    @classmethod
    def _build(cls, entries: list, lead: int | None) -> FlatParams:
        by_key: dict[tuple[torch.dtype, torch.device], list] = {}
        for index, e in enumerate(entries):
            p = e[1]
            by_key.setdefault((p.dtype, p.device), []).append((index, *e))
        rows = 1 if lead is None else lead
        groups: list[FlatGroup] = []
        placed: dict[int, nn.Parameter] = {}
        for (dtype, device), group in by_key.items():
            total = sum(_numel(shape) for _, _, _, shape, _ in group)
            buf = torch.empty(rows, total, dtype=dtype, device=device)
            segments: list[Segment] = []
            offset = 0
            for index, name, p, shape, in_scope in group:
                n = _numel(shape)
                view = buf[:, offset : offset + n]
                if lead is None:
                    view = view[0].view(shape)
                    view.copy_(p.detach())
                else:
                    view = view.view(rows, *shape)
                    view.copy_(p.detach())
                p.data = view
                segments.append(Segment(name, offset, n, shape, in_scope))
                placed[index] = p
                offset += n
            groups.append(FlatGroup(buf, segments))
        # params (and named_views) in the caller's order, whatever the dtype grouping
        params = [placed[i] for i in range(len(entries))]
        return cls(groups, params, names=[e[0] for e in entries])

    def named_views(self) -> dict[str, Tensor]:
        """``{name: parameter}``, each with the leading row axis where L > 1."""
        return dict(zip(self.names, self.params, strict=True))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _owners(module: nn.Module) -> dict[str, nn.Module]:
    """Map each parameter's qualified name to the module that owns it."""
    owners: dict[str, nn.Module] = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    return owners
