"""A real rank's resumable state: the launcher's counters, checkpoint save and load, and the
test metrics of the ranks' averaged model."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gossip import checkpoint as ckpt
from gossip.flat import FlatParams, persistent_buffers
from launch.config import TrainConfig
from launch.rank import ShardStream, evaluate

__all__ = ["Counters", "eval_mean_model", "load", "mean_buffers", "resume", "resume_changes",
           "save"]


@dataclasses.dataclass
class Counters:
    """Running totals that belong in a checkpoint (for the metrics, not for the math)."""

    bytes_sent: int = 0
    sync_seconds: float = 0.0
    syncs: int = 0
    sync_loss_sum: float = 0.0
    sync_loss_count: int = 0
    eval_loss_sum: float = 0.0
    eval_loss_count: int = 0
    wall_seconds: float = 0.0

    def add_losses(self, total: float, count: int) -> None:
        self.sync_loss_sum += total
        self.eval_loss_sum += total
        self.sync_loss_count += count
        self.eval_loss_count += count


def load(cfg: TrainConfig, out: Path, rank: int, meta: dict[str, Any]) -> dict[str, Any] | None:
    """This rank's state from the latest checkpoint in ``out`` (None = start fresh), checked
    against the marker's manifest (SHA-256) and config (:func:`gossip.checkpoint.check_resume`);
    ``"changes"`` lists the accepted trajectory changes. A rank the checkpoint lacks (dead when
    the survivors wrote it) resumes from the lowest surviving rank's state
    (:func:`gossip.checkpoint.stand_in`), as a replacement node copies a live one."""
    latest = ckpt.read_latest(out)
    if not cfg.resume:
        if latest is not None:
            raise ValueError(f"{ckpt.checkpoint_dir(out)} holds checkpoints (latest: step "
                             f"{latest['step']}); pass --resume to continue that run or choose "
                             "another --out")
        return None
    if latest is None:
        return None
    marker = ckpt.checkpoint_dir(out) / "latest"
    differ = [k for k in ("world_size", "algo", "task") if latest.get(k) != meta[k]]
    if differ:
        theirs = ", ".join(f"{k}={latest.get(k)!r}" for k in differ)
        ours = ", ".join(f"{k}={meta[k]!r}" for k in differ)
        raise ValueError(f"checkpoint {marker} was written with {theirs}; this run has {ours}")
    step = int(latest["step"])
    if step > cfg.steps:
        raise ValueError(f"checkpoint {marker} is at step {step}, beyond steps={cfg.steps}")
    # trajectory changes are refused unless overridden (--resume-override); kept with their step
    overrides = [f for f in (cfg.resume_override or "").split(",") if f]
    changes = ckpt.check_resume({**latest.get("config", {}), "world_size": latest.get(
        "world_size")}, {**cfg.to_dict(), "world_size": meta["world_size"]}, overrides)
    source = ckpt.stand_in(latest, rank)  # a rank dead when it was written: a survivor's file
    path = ckpt.rank_file(out, step, source)
    state = ckpt.load_rank_state(path, sha256=ckpt.expected_sha256(out, latest, path),
                                 expect={**meta, "rank": source})
    return {**state, "path": str(path), "changes": [{**c, "step": step} for c in changes]}


def resume(cfg: TrainConfig, out: Path, rank: int, meta: dict[str, Any], params: FlatParams,
           opt: torch.optim.Optimizer, algo: Any, stream: ShardStream, device: torch.device,
           model: torch.nn.Module | None = None) -> tuple[int, Counters, list[dict[str, Any]]]:
    """Restore this rank from the latest checkpoint (:func:`load`): the step to go on from, the
    counters and the accepted trajectory changes (0, fresh counters, [] = start fresh).
    ``model``: its buffers (BatchNorm's running statistics) are restored too."""
    state = load(cfg, out, rank, meta)
    if state is None:
        return 0, Counters(), []
    try:
        ckpt.restore_params(params, state["params"], source=state["path"])
        if model is not None:
            _restore_buffers(model, state.get("buffers", {}), state["path"])
        opt.load_state_dict(state["optimizer"])
        algo.load_state_dict(state["algorithm"])
        stream.load_state(state["data"])
        ckpt.restore_rng(state["rng"], device)
        return int(state["step"]), Counters(**state["launcher"]), state["changes"]
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # ValueError: the algorithm's
        # load_state_dict names what differs (another algorithm, shape, compression, overlap)
        what = f"it holds no {e}" if isinstance(e, KeyError) else str(e)
        hint = ""
        if state["changes"]:  # overridden fields that shape the saved state (compress, ...)
            listed = ", ".join(f"{c['field']}: {c['old']!r} -> {c['new']!r}"
                               for c in state["changes"])
            hint = (f"; the accepted change(s) {listed} alter the state the algorithm saved, "
                    "which a resume cannot change: resume without them")
        raise ValueError(f"checkpoint file {state['path']} does not fit this run ({what}){hint}"
                         ) from e


def resume_changes(out: Path, start: int, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The changes every resume of this run accepted: earlier ones (from config.json) + ``new``."""
    path = out / "config.json"
    if not start or not path.exists():
        return new
    return [*json.loads(path.read_text()).get("resume_changes", []), *new]


def _restore_buffers(model: torch.nn.Module, saved: dict[str, Tensor], path: str) -> None:
    """Copy the saved buffers into ``model``'s (a checkpoint written before they were saved
    has none: the model's stay as they are)."""
    mine = persistent_buffers(model)
    for name, value in saved.items():
        if name not in mine or mine[name].shape != value.shape:
            got = tuple(mine[name].shape) if name in mine else "no such buffer"
            raise ValueError(f"checkpoint {path}: buffer {name!r} {tuple(value.shape)} does not "
                             f"fit the model ({got})")
    with torch.no_grad():
        for name, value in saved.items():
            mine[name].copy_(value)


def save(out: Path, step: int, rank: int, meta: dict[str, Any], params: FlatParams,
          opt: torch.optim.Optimizer, algo: Any, stream: ShardStream, device: torch.device,
          c: Counters, model: torch.nn.Module | None = None) -> None:
    """This rank's checkpoint of ``step``; ``model``: its buffers too (BatchNorm's running
    statistics are no parameters, yet they are the model a test evaluates)."""
    buffers = {} if model is None else {n: b.detach().clone()
                                         for n, b in persistent_buffers(model).items()}
    state = {"meta": {**meta, "rank": rank}, "step": step, "params": ckpt.params_state(params),
             "buffers": buffers,
             "optimizer": opt.state_dict(), "algorithm": algo.state_dict(),
             "data": stream.state(), "rng": ckpt.capture_rng(device),
             "launcher": dataclasses.asdict(c)}
    ckpt.atomic_torch_save(state, ckpt.rank_file(out, step, rank))


def mean_buffers(model: torch.nn.Module, comm: Any) -> dict[str, Tensor]:
    """The mean over every rank of ``model``'s floating-point buffers (BatchNorm's running
    statistics), by name; one all-reduce (float64), so every rank calls it. Empty (and no
    collective) for a model without any."""
    named = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    if not named:
        return {}
    packed = torch.cat([b.detach().reshape(-1).to(torch.float64) for _, b in named])
    comm.all_reduce_mean_(packed)
    out, offset = {}, 0
    for n, b in named:
        out[n] = packed[offset:offset + b.numel()].reshape(b.shape).to(b.dtype)
        offset += b.numel()
    return out


def eval_mean_model(task: Any, mean: Tensor, device: torch.device, x: Tensor, y: Tensor,
                    buffers: dict[str, Tensor] | None = None) -> dict[str, float]:
    """Test metrics of the average of all ranks' models (rank 0 only): the mean parameters
    ``mean`` and the mean floating-point buffers ``buffers`` (:func:`mean_buffers`; a
    BatchNorm's running statistics at their initial values would not be the averaged model)."""
    params = FlatParams.from_module(model := task.make_model(0).to(device))
    chunks, offset = [], 0
    for b in params.buffers():
        chunks.append(mean[offset : offset + b.numel()].to(b.dtype).reshape(b.shape))
        offset += b.numel()
    ckpt.restore_params(params, chunks, source="the mean model")
    with torch.no_grad():
        for name, b in model.named_buffers():
            if buffers and name in buffers:
                b.copy_(buffers[name])
    return evaluate(task, model, x, y)
