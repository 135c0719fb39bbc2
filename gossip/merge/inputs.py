"""Where models come from: a real run's rank checkpoints, a simulation's stacked final models
(``models.json`` + ``models.pt``), single checkpoint files and merged-model files."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gossip import checkpoint as ckpt
from gossip.flat import FlatParams, persistent_buffers
from gossip.merge.models import state_of, to_model
from gossip.merge.soups import State, check_states
from gossip.metrics import atomic_write_text
from gossip.run.build import load_task
from gossip.tasks import INITS, Task

__all__ = ["FORMAT", "MERGED_KIND", "STACKED_KIND", "Ingredient", "Models", "load_models",
           "save_stacked"]

FORMAT = 1
STACKED_KIND = "gossip-stacked-models"
MERGED_KIND = "gossip-merged-model"


@dataclass(frozen=True)
class Ingredient:
    """One model to merge: its state and where it came from."""

    label: str
    state: State
    step: int | None = None
    rank: int | None = None


@dataclass
class Models:
    """The models found in the inputs, and the task (name, data seed, init) they belong to."""

    task: str
    seed: int
    init: str
    items: list[Ingredient] = field(default_factory=list)

    @property
    def model_seed(self) -> int:
        """The run's model seed: its shared initial model (FedAvg, DiLoCo, NoLoCo), or node 0's
        (gossip algorithms start each node from ``seed + node``)."""
        return self.seed

    def build_task(self) -> Task:
        """The task (a built-in name or ``package.module:function``, as both CLIs take it)."""
        return load_task(self.task, seed=self.seed, init=self.init)


def save_stacked(out: str | os.PathLike[str], params: Mapping[str, Tensor],
                 buffers: Mapping[str, Tensor], *, nodes: Sequence[int], task: str, seed: int,
                 init: str = "default", info: Mapping[str, Any] | None = None) -> Path:
    """Write stacked models (every tensor ``[N, ...]``, row i = node ``nodes[i]``) as
    ``out/models.pt`` and the index ``out/models.json`` (task, seed, init, nodes, the SHA-256
    of models.pt, ``info``). Returns the index path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = len(nodes)
    for name, t in {**params, **buffers}.items():
        if t.shape[:1] != (rows,):
            raise ValueError(f"stacked tensor {name!r} has shape {list(t.shape)}, expected "
                             f"{rows} rows")
    blob = {"kind": STACKED_KIND, "format": FORMAT,
            "params": {n: t.detach().cpu().contiguous() for n, t in params.items()},
            "buffers": {n: t.detach().cpu().contiguous() for n, t in buffers.items()}}
    path = out / "models.pt"
    ckpt.atomic_torch_save(blob, path)
    index = {"kind": STACKED_KIND, "format": FORMAT, "file": path.name,
             "sha256": _sha256(path), "task": task, "seed": int(seed), "init": init,
             "nodes": [int(i) for i in nodes], **(info or {})}
    atomic_write_text(out / "models.json", json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out / "models.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Found:
    """Models of one input before the task is known (a real-run checkpoint holds flat buffers
    of parameters and its model's buffers by name: :class:`_Flat`)."""

    task: str | None
    seed: int | None
    init: str | None
    entries: list[tuple[str, int | None, int | None, State | _Flat]]


@dataclass
class _Flat:
    """A real-run checkpoint's model: flat parameter buffers and named buffers (BatchNorm's
    running statistics; none in a checkpoint written before they were saved)."""

    params: list[Tensor]
    buffers: dict[str, Tensor]


def load_models(paths: Sequence[str | os.PathLike[str]], *, task: str | None = None,
                seed: int | None = None, init: str | None = None) -> Models:
    """Read every model in ``paths`` (run directories, ``models.json`` indexes or their
    directories, checkpoint files, merged-model files). ``task``, ``seed`` and ``init`` override
    what the inputs record; inputs that record different ones are refused."""
    if not paths:
        raise ValueError("no inputs given (expected run directories or model files)")
    found = [_read_input(Path(p)) for p in paths]
    resolved: dict[str, Any] = {}
    for key, given in (("task", task), ("seed", seed), ("init", init)):
        if given is not None:
            resolved[key] = given
            continue
        seen = {getattr(f, key) for f in found} - {None}
        if len(seen) > 1:
            raise ValueError(f"the inputs come from runs with different {key}: "
                             f"{sorted(map(str, seen))}")
        resolved[key] = seen.pop() if seen else None
    if resolved["task"] is None:
        raise ValueError("the inputs do not say which task they belong to: pass --task")
    if resolved["seed"] is None:
        raise ValueError("the inputs do not say which data seed their run used: pass --seed")
    init_name = resolved["init"] or "default"
    if init_name not in INITS:
        raise ValueError(f"init={init_name!r} is invalid: expected one of {list(INITS)}")
    models = Models(resolved["task"], int(resolved["seed"]), init_name)
    built = models.build_task()
    for f in found:
        for label, step, rank, content in f.entries:
            state = content if isinstance(content, dict) else \
                _unflat(built, content, label, models.model_seed)
            models.items.append(Ingredient(label, state, step, rank))
    check_states([i.state for i in models.items])
    to_model(built, models.items[0].state)  # the names and shapes fit the task's model
    return models


def _unflat(task: Task, saved: _Flat, label: str, seed: int) -> State:
    """A real-run checkpoint's model as named tensors of ``task``'s model: its parameters,
    and its buffers as saved (a checkpoint without them leaves the fresh model's)."""
    model = task.make_model(seed)
    flat = FlatParams.from_module(model)
    ckpt.restore_params(flat, saved.params, source=label)
    mine = persistent_buffers(model)
    for name, value in saved.buffers.items():
        if name not in mine or mine[name].shape != value.shape:
            got = tuple(mine[name].shape) if name in mine else "no such buffer"
            raise ValueError(f"{label}: buffer {name!r} {tuple(value.shape)} does not fit "
                             f"the task's model ({got})")
    with torch.no_grad():
        for name, value in saved.buffers.items():
            mine[name].copy_(value)
    return state_of(model)


def _read_input(path: Path) -> _Found:
    if path.is_dir():
        if (path / "models.json").is_file():
            return _read_stacked(path / "models.json")
        if ckpt.checkpoint_dir(path).is_dir():
            return _read_run_dir(path)
        raise ValueError(f"{path} is neither a run directory with checkpoints/ nor a "
                         "directory with models.json")
    if not path.is_file():
        raise ValueError(f"input {path} does not exist")
    if path.suffix == ".json":
        return _read_stacked(path)
    return _read_file(path)


def _read_stacked(index_path: Path) -> _Found:
    try:
        index = json.loads(index_path.read_text())
    except (ValueError, OSError) as e:
        raise ValueError(f"{index_path} is not a models index: {e}") from None
    if not isinstance(index, dict) or index.get("kind") != STACKED_KIND:
        raise ValueError(f"{index_path} is not a models index (kind {STACKED_KIND!r})")
    if index.get("format") != FORMAT:
        raise ValueError(f"{index_path} has format {index.get('format')!r}, this version reads "
                         f"{FORMAT}")
    blob_path = index_path.parent / str(index.get("file", "models.pt"))
    if not blob_path.is_file():
        raise ValueError(f"{blob_path} (named by {index_path}) does not exist")
    if _sha256(blob_path) != index.get("sha256"):
        raise ValueError(f"{blob_path} does not match the SHA-256 in {index_path} (changed or "
                         "truncated)")
    blob = torch.load(blob_path, map_location="cpu", weights_only=True)
    nodes = list(index["nodes"])
    tensors = {**blob["params"], **blob["buffers"]}
    entries: list[tuple[str, int | None, int | None, State | list[Tensor]]] = []
    for row, node in enumerate(nodes):
        state = {n: t[row].clone() for n, t in tensors.items()}
        entries.append((f"{index_path.parent} node {node}", None, int(node), state))
    return _Found(index.get("task"), index.get("seed"), index.get("init"), entries)


def _run_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    return config.get("train", config) if isinstance(config, dict) else {}


def _read_run_dir(run_dir: Path) -> _Found:
    files = sorted(ckpt.checkpoint_dir(run_dir).glob("step_*/rank_*.pt"))
    if not files:
        raise ValueError(f"{ckpt.checkpoint_dir(run_dir)} holds no rank checkpoints")
    config = _run_config(run_dir)
    found = _Found(config.get("task"), config.get("seed"), config.get("init"), [])
    for f in files:
        part = _read_file(f, config)
        found.task = found.task or part.task
        found.entries += part.entries
    found.entries.sort(key=lambda e: (e[1] or 0, e[2] or 0))
    return found


def _read_file(path: Path, config: Mapping[str, Any] | None = None) -> _Found:
    try:
        head = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, KeyError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a model file this tool reads: {first}") from None
    if isinstance(head, dict) and head.get("kind") == MERGED_KIND:
        return _Found(head.get("task"), head.get("seed"), head.get("init"),
                      [(str(path), None, None, dict(head["state"]))])
    state = ckpt.load_rank_state(path)  # names the file if it is no gossip checkpoint
    meta = state["meta"]
    if config is None:
        config = _run_config(path.parents[2]) if len(path.parents) > 2 else {}
    saved = _Flat(list(state["params"]), dict(state.get("buffers") or {}))
    return _Found(meta.get("task"), config.get("seed"), config.get("init"),
                  [(f"{path}", int(state["step"]), int(meta.get("rank", 0)), saved)])

