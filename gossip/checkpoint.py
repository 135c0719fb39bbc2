"""Checkpoints of a distributed run: one file per rank, atomic writes, a ``latest`` marker.

Layout under a run directory::

    checkpoints/step_<s>/rank_<r>.pt    one per rank (torch.save, loaded with weights_only=True)
    checkpoints/latest                  JSON {"step", "world_size", "algo", "task", "config",
                                        "files": {"step_<s>/rank_<r>.pt": SHA-256, ...}
                                        [, "absent": [ranks dead when it was written]]}

Every file is written to a temporary file in the same directory, fsynced and renamed over its
final name, so a reader sees either the old file or the complete new one. The ``latest`` marker
is written (by rank 0) only after every rank has written its file, so a crash in the middle of a
checkpoint never leaves a half checkpoint marked latest. The marker is also the checkpoint's
manifest: the SHA-256 of every rank file, written in the same atomic rename, and checked by
:func:`load_rank_state` before it unpickles anything, so a file whose bytes changed after it was
written (a flipped bit, a copy gone wrong) is refused naming it. After ranks died (a run that
survives failures) a checkpoint is complete without them: the marker lists them as ``absent``.

:func:`prune` keeps the newest K checkpoints (``--keep-checkpoints``): it never touches the marked
one or a newer one (still being written), and a step directory is renamed out of the way before
it is removed, so a prune killed midway leaves every checkpoint it did not remove intact.

:func:`check_resume` compares the configuration a checkpoint was written with and the one
resuming it: a change of anything that alters the trajectory is refused unless overridden.

A rank file holds everything needed to continue bit for bit: the model's flat buffers, the inner
optimizer's and the algorithm's ``state_dict``, the step, the data position, the torch RNG states
and free-form launcher counters, plus metadata (format version, algo, task, world size, rank)
that :func:`load_rank_state` checks against the run that is resuming.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gossip.flat import FlatParams
from gossip.metrics import atomic_write, atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "NEUTRAL_FIELDS",
    "atomic_torch_save",
    "capture_rng",
    "check_resume",
    "checkpoint_dir",
    "expected_sha256",
    "file_sha256",
    "load_rank_state",
    "params_state",
    "prune",
    "rank_file",
    "read_latest",
    "restore_params",
    "restore_rng",
    "stand_in",
    "write_latest",
]

FORMAT_VERSION = 1
_REQUIRED = ("meta", "step", "params", "optimizer", "algorithm", "data", "rng")


def checkpoint_dir(root: str | os.PathLike[str]) -> Path:
    return Path(root) / "checkpoints"


def rank_file(root: str | os.PathLike[str], step: int, rank: int) -> Path:
    """``<root>/checkpoints/step_<step>/rank_<rank>.pt``."""
    return checkpoint_dir(root) / f"step_{step}" / f"rank_{rank}.pt"


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_latest(root: str | os.PathLike[str], step: int, meta: Mapping[str, Any], *,
                 ranks: int | Collection[int]) -> None:
    """Mark ``step`` as the latest complete checkpoint (call once all ``ranks`` have written).

    ``ranks``: how many ranks wrote (0..ranks-1), or which ranks did (the survivors, after
    deaths: the others of ``meta["world_size"]`` are recorded as ``"absent"``). The marker holds
    the SHA-256 of every rank file of the step (the manifest)."""
    base = checkpoint_dir(root)
    present = range(ranks) if isinstance(ranks, int) else sorted(ranks)
    files = {}
    for r in present:
        path = rank_file(root, step, r)
        files[path.relative_to(base).as_posix()] = file_sha256(path)
    record = {**meta, "step": int(step), "files": files}
    world = meta.get("world_size")
    absent = sorted(set(range(world)) - set(present)) if isinstance(world, int) else []
    if absent:
        record["absent"] = absent
    text = json.dumps(record, sort_keys=True) + "\n"
    try:
        atomic_write_text(base / "latest", text)
    except OSError:  # (a full disk) the old marker stands; the files it does not name go, or
        # a first checkpoint's would look like a run whose marker was lost
        try:
            marked = read_latest(root)
        except (OSError, ValueError):
            marked = {"step": step}  # (unreadable: leave everything as it is)
        if marked is None or int(marked["step"]) != int(step):
            shutil.rmtree(rank_file(root, step, 0).parent, ignore_errors=True)
        raise


def stand_in(latest: Mapping[str, Any], rank: int) -> int:
    """The rank whose file of the marked checkpoint ``rank`` resumes from: its own, or, for a
    rank ``absent`` from it (dead when it was written), the lowest rank that wrote one."""
    if rank not in latest.get("absent", ()):
        return rank
    present = sorted(set(range(int(latest["world_size"]))) - set(latest["absent"]))
    if not present:
        raise ValueError(f"checkpoint marker of step {latest['step']} lists no rank's file")
    return present[0]


def prune(root: str | os.PathLike[str], keep: int) -> list[int]:
    """Remove all but the newest ``keep`` checkpoints up to the marked one; returns the steps
    removed (oldest first).

    The marked checkpoint counts as one of the ``keep`` and is never removed, nor is any newer
    step directory (being written). Each removed directory is first renamed to
    ``.pruning_step_<s>`` (atomic), then deleted; leftovers of a prune that was killed midway
    are deleted by the next one, and nothing a resume reads is touched in between."""
    if keep < 1:
        raise ValueError(f"keep={keep!r} is invalid: expected an integer >= 1")
    base = checkpoint_dir(root)
    latest = read_latest(root)
    if latest is None:
        return []
    newest = int(latest["step"])
    steps = sorted(int(p.name[5:]) for p in base.glob("step_*") if p.name[5:].isdigit())
    older = [s for s in steps if s < newest]
    doomed = older[: max(len(older) - (keep - 1), 0)]
    for trash in base.glob(".pruning_step_*"):  # a killed prune's
        shutil.rmtree(trash, ignore_errors=True)
    for s in doomed:
        trash = base / f".pruning_step_{s}"
        try:
            os.rename(base / f"step_{s}", trash)
        except FileNotFoundError:  # another process pruned it first
            continue
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def read_latest(root: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The ``latest`` marker as a dict, or None when the run has no complete checkpoint."""
    path = checkpoint_dir(root) / "latest"
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        int(record["step"])
        files = record["files"]
        if not isinstance(files, dict):
            raise TypeError(f"files is {type(files).__name__}, expected a mapping")
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint marker {path} is corrupted or has no manifest: "
                         f"{type(e).__name__}: {e}") from None
    return record


def expected_sha256(root: str | os.PathLike[str], latest: Mapping[str, Any],
                    path: str | os.PathLike[str]) -> str:
    """The SHA-256 the manifest of ``latest`` records for ``path`` (ValueError if none)."""
    key = Path(path).relative_to(checkpoint_dir(root)).as_posix()
    digest = latest["files"].get(key)
    if digest is None:
        raise ValueError(f"checkpoint file {path} is not in the manifest "
                         f"{checkpoint_dir(root) / 'latest'}")
    return str(digest)


#: Fields of a run's configuration that do not change its trajectory (how long it runs, where it
#: writes, how it talks and waits); every other field does, and so does the world size.
NEUTRAL_FIELDS = frozenset({
    "out", "resume", "resume_override", "overwrite", "steps", "timeout", "eval_every",
    "checkpoint_every", "keep_checkpoints", "survive_failures", "dead_after", "backend", "device",
    "config", "tensorboard"})


def check_resume(old: Mapping[str, Any], new: Mapping[str, Any],
                 overrides: Collection[str] = (), *, can_override: bool = True
                 ) -> list[dict[str, Any]]:
    """Compare the config a checkpoint was written with (``old``) and the resuming one (``new``).

    Both are flat dicts of resolved fields (``world_size`` included). A field outside
    :data:`NEUTRAL_FIELDS` whose value differs changes the trajectory: unless it is named in
    ``overrides`` this raises ValueError listing every such field with its old and new value.
    Returns the accepted changes, ``[{"field", "old", "new"}]`` in field order. An override
    that names no field of ``new`` is a ValueError. ``can_override=False``: the caller has no
    ``--resume-override`` (the simulator), and the message does not suggest one.
    """
    unknown = sorted(set(overrides) - set(new) - set(old))
    if unknown:
        raise ValueError(f"resume_override={sorted(overrides)!r} is invalid: {unknown} "
                         f"name no config field")
    changes, refused = [], []
    for name in sorted(set(old) | set(new)):
        if name in NEUTRAL_FIELDS or old.get(name) == new.get(name):
            continue
        change = {"field": name, "old": old.get(name), "new": new.get(name)}
        (changes if name in overrides else refused).append(change)
    if refused:
        listed = ", ".join(f"{c['field']}: {c['old']!r} -> {c['new']!r}" for c in refused)
        names = ",".join(c["field"] for c in refused)
        how = f", or pass --resume-override {names} to accept the change" if can_override \
            else " (or start a new run in another --out)"
        raise ValueError(f"--resume would change the run's trajectory ({listed}); resume with "
                         f"the checkpoint's values{how}")
    return changes


def params_state(params: FlatParams) -> list[Tensor]:
    """The model's flat buffers (copies)."""
    return [b.detach().clone() for b in params.buffers()]


def restore_params(params: FlatParams, saved: list[Tensor], *, source: str = "checkpoint") -> None:
    buffers = list(params.buffers())
    if len(saved) != len(buffers):
        raise ValueError(f"{source} has {len(saved)} parameter buffers, the model has "
                         f"{len(buffers)}")
    for i, (dst, src) in enumerate(zip(buffers, saved, strict=True)):
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(f"{source}: buffer {i} is {src.dtype}{list(src.shape)}, the model's "
                             f"is {dst.dtype}{list(dst.shape)}")
    with torch.no_grad():
        for dst, src in zip(buffers, saved, strict=True):
            dst.copy_(src)


def capture_rng(device: torch.device | None = None) -> dict[str, Tensor]:
    """The torch RNG states this process uses (CPU, and the CUDA device if given)."""
    state = {"torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: Mapping[str, Tensor], device: torch.device | None = None) -> None:
    torch.set_rng_state(state["torch"])
    if device is not None and device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_rank_state(path: str | os.PathLike[str], *, sha256: str | None = None,
                    expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Load one rank file with ``torch.load(weights_only=True)`` and check it.

    Raises ValueError naming the file when it is missing, its bytes do not hash to ``sha256``
    (the manifest's, see :func:`expected_sha256`), it is truncated or corrupted, and naming both
    values when its metadata differs from ``expect`` (e.g. another world size or algo).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise ValueError(f"checkpoint file {path} is corrupted: its SHA-256 is {actual}, "
                             f"the manifest recorded {sha256}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            ValueError, KeyError, IndexError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"checkpoint file {path} is truncated or corrupted: {first}") from e
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"checkpoint file {path} is not a gossip checkpoint (keys: {keys})")
    meta = state["meta"]
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"checkpoint file {path} has format {meta.get('format')!r}, this "
                         f"version reads format {FORMAT_VERSION}")
    for key, want in (expect or {}).items():
        if key in meta and meta[key] != want:
            raise ValueError(f"checkpoint file {path} was written with {key}={meta[key]!r}, "
                             f"this run has {key}={want!r}")
    return state
