"""A real rank's resumable state: the launcher's counters, checkpoint save and load, and the
test metrics of the ranks' averaged model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gossip import checkpoint as ckpt
from gossip.flat import FlatParams
from launch.config import TrainConfig
from launch.rank import ShardStream, evaluate

__all__ = ["Counters", "eval_mean_model", "load", "save"]


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
    """This rank's state from the latest checkpoint in ``out`` (None = start fresh)."""
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
    path = ckpt.rank_file(out, step, rank)
    state = ckpt.load_rank_state(path, expect={**meta, "rank": rank})
    return {**state, "path": str(path)}


def save(out: Path, step: int, rank: int, meta: dict[str, Any], params: FlatParams,
          opt: torch.optim.Optimizer, algo: Any, stream: ShardStream, device: torch.device,
          c: Counters) -> None:
    state = {"meta": {**meta, "rank": rank}, "step": step, "params": ckpt.params_state(params),
             "optimizer": opt.state_dict(), "algorithm": algo.state_dict(),
             "data": stream.state(), "rng": ckpt.capture_rng(device),
             "launcher": dataclasses.asdict(c)}
    ckpt.atomic_torch_save(state, ckpt.rank_file(out, step, rank))


def eval_mean_model(task: Any, mean: Tensor, device: torch.device, x: Tensor, y: Tensor
                     ) -> dict[str, float]:
    """Test metrics of the average of all ranks' models (rank 0 only)."""
    params = FlatParams.from_module(model := task.make_model(0).to(device))
    chunks, offset = [], 0
    for b in params.buffers():
        chunks.append(mean[offset : offset + b.numel()].to(b.dtype).reshape(b.shape))
        offset += b.numel()
    ckpt.restore_params(params, chunks, source="the mean model")
    return evaluate(task, model, x, y)
