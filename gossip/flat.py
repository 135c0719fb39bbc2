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

__all__ = ["FlatGroup", "FlatParams", "default_vc_scope", "persistent_buffers", "scope_from_spec"]

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
                 names: list[str] | None = None, *, kind: str = "parameter") -> None:
        self.groups = groups
        self.params = params
        if names is None:  # params given in group order
            names = [seg.name for g in groups for seg in g.segments]
        self.names = names
        self.kind = kind  # what the tensors are, for error messages
        # where each tensor must stay: checked by check_views before every sync
        self._layouts = [_layout(p) for p in params]

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
    def from_buffers(cls, module: nn.Module) -> FlatParams | None:
        """The module's floating-point persistent buffers (BatchNorm running statistics) as flat
        buffers, each buffer a view like the parameters; None if it has none.

        Integer buffers (``num_batches_tracked``) and non-persistent buffers (constants that are
        not part of the model's state) are left out.
        """
        named = [(n, b) for n, b in persistent_buffers(module).items() if b.is_floating_point()]
        if not named:
            return None
        flat = cls._build([(n, b, tuple(b.shape), False) for n, b in named], lead=None)
        flat.kind = "buffer"
        return flat

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

    def check_views(self, current: Mapping[str, Tensor] | None = None) -> None:
        """Raise ``RuntimeError`` naming the first tensor that no longer views its slice of the
        flat buffers, so an average would silently miss it.

        That happens when a module is converted after flattening (``model.double()``,
        ``model.to(other_device)``: the same Parameter object gets new storage), or when a
        tensor is replaced (``load_state_dict(..., assign=True)``). ``current`` is the module's
        tensors now, e.g. ``dict(model.named_parameters())``: each flattened name must still
        map to the very tensor that was flattened, and no new trainable tensor may have
        appeared. Cheap: a pointer, dtype, device, shape and stride comparison per tensor.
        """
        kind = self.kind
        if current is not None:
            for name, p in zip(self.names, self.params, strict=True):
                now = current.get(name)
                if now is None:
                    raise RuntimeError(f"{kind} {name!r} is no longer in the model")
                if now is not p:
                    raise RuntimeError(
                        f"{kind} {name!r} was replaced by a new tensor after it was flattened "
                        "(e.g. load_state_dict(..., assign=True)): the algorithm would average "
                        "the old one; load without assign=True (it copies in place)")
            known = set(self.names)
            for name, t in current.items():
                if name not in known and t.requires_grad:
                    raise RuntimeError(f"{kind} {name!r} is trainable but was not flattened "
                                       "(added or unfrozen afterwards): it would never be "
                                       "averaged")
        for name, p, layout in zip(self.names, self.params, self._layouts, strict=True):
            if _layout(p) != layout:
                raise RuntimeError(
                    f"{kind} {name!r} no longer views the flat buffer the algorithm averages "
                    f"(now {p.dtype} on {p.device}, flattened as {layout[1]} on {layout[2]}): "
                    "convert or move the model (model.double(), model.to(...)) before "
                    "flattening it (gossip.attach), never after")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout(t: Tensor) -> tuple:
    """Where a tensor's elements live: equal layouts view the same memory the same way."""
    return (t.data_ptr(), t.dtype, t.device, tuple(t.shape), t.stride())


def persistent_buffers(module: nn.Module) -> dict[str, Tensor]:
    """``{name: buffer}`` of the module's buffers that are part of its ``state_dict``."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for mod_name, mod in module.named_modules():
        for b_name, buf in mod._buffers.items():
            if buf is None or b_name in mod._non_persistent_buffers_set or id(buf) in seen:
                continue
            seen.add(id(buf))
            out[f"{mod_name}.{b_name}" if mod_name else b_name] = buf
    return out


def _owners(module: nn.Module) -> dict[str, nn.Module]:
    """Map each parameter's qualified name to the module that owns it."""
    owners: dict[str, nn.Module] = {}
    for mod_name, mod in module.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod
    return owners
