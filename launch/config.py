"""The configuration of a real run: :class:`gossip.run.RunSpec` plus what a real run adds.

Every field of :class:`TrainConfig` is a flag (``sync_every`` <-> ``--sync-every``) and a TOML
key (``sync_every`` or ``sync-every``). Precedence: dataclass defaults < ``--config FILE.toml`` <
flags given on the command line. The fields every run has, their defaults and how None defaults
are filled in (one table, the simulator's too) are in :mod:`gossip.run.spec`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gossip import configs
from gossip.configs import bad, check_positive, help_text
from gossip.run.spec import RunSpec, check_finite

__all__ = ["TrainConfig", "build_parser", "check_out", "default_out", "from_args"]

BACKENDS = ("auto", "nccl", "gloo")
DEVICES = ("auto", "cpu", "cuda")


def default_out() -> str:
    """A new run directory under runs/, named by the UTC time (to the microsecond)."""
    return str(Path("runs") / datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f"))


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunSpec):
    """Everything one real training run needs. None = the algorithm's or task's default."""

    steps: int = field(default=300, metadata=help_text(
        "inner steps per rank (total, incl. resumed)"))
    out: str | None = field(default=None, metadata=help_text(
        "run directory (default: a new runs/<UTC time>)"))
    # runtime
    backend: str = field(default="auto", metadata=help_text(
        "auto | nccl | gloo (auto: nccl when CUDA is available)"))
    device: str = field(default="auto", metadata=help_text(
        "auto | cpu | cuda (auto: cuda:LOCAL_RANK when CUDA is available)"))
    timeout: float = field(default=300.0, metadata=help_text("seconds any communication may wait"))
    eval_every: int | None = field(default=None, metadata=help_text(
        "steps between test-set evaluations (default: every sync if 10 <= H <= 50, else 50)"))
    checkpoint_every: int = field(default=0, metadata=help_text(
        "steps between checkpoints, plus one at the end (0 = never)"))
    keep_checkpoints: int | None = field(default=None, metadata=help_text(
        "keep only the newest K checkpoints, deleting older ones once a newer one is complete "
        "(default: keep every checkpoint)"))
    resume: bool = field(default=False, metadata=help_text(
        "resume from the latest checkpoint in --out (start fresh if there is none)"))
    survive_failures: bool = field(default=False, metadata=help_text(
        "keep going when ranks die: noloco and the gossip family leave dead peers out; fedavg "
        "and diloco fail fast naming the dead rank. Needs a store that outlives workers: launch "
        "with python -m launch.spawn or launch.ray_launch. "
        "Gloo only (auto picks Gloo, also on GPUs)"))
    dead_after: float = field(default=5.0, metadata=help_text(
        "with --survive-failures: seconds without a heartbeat before a rank counts as dead"))
    resume_override: str | None = field(default=None, metadata=help_text(
        "with --resume: FIELD[,FIELD...] whose change from the checkpoint's config is accepted "
        "(seed, lr, ...); the change is recorded in config.json with its step"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("steps", self.steps)
        if self.warmup_steps >= self.steps:  # (warmup_steps > 0 needs a warm-up schedule)
            bad("warmup_steps", self.warmup_steps,
                f"fewer than steps={self.steps} (the warm-up would never end)")
        if self.resume and self.overwrite:  # RunDir refuses it too, but only on rank 0, later
            bad("overwrite", self.overwrite, "False with resume=True: continue the run in out "
                "or replace it, not both")
        if self.resume_override and not self.resume:  # a flag that would do nothing
            bad("resume_override", self.resume_override, "None without resume=True (it names "
                "the fields a resume may change)")
        if self.out is not None and not self.out:
            bad("out", self.out, "a non-empty path")
        if self.partition.strip().startswith("sample:"):
            bad("partition", self.partition, "a disjoint partition (sample:* is the simulator's)")
        if self.backend not in BACKENDS:
            bad("backend", self.backend, f"one of {list(BACKENDS)}")
        if self.device not in DEVICES:
            bad("device", self.device, f"one of {list(DEVICES)}")
        if self.backend == "nccl" and self.device == "cpu":
            bad("device", self.device, "'cuda' or 'auto' with backend='nccl'")
        if self.survive_failures and self.backend == "nccl":
            bad("backend", self.backend, "'gloo' (or 'auto' on CPUs) with survive_failures")
        # a timeout is a limit: inf would mean "wait forever", which no wait may do here
        check_finite("timeout", self.timeout)
        if not 1e-3 <= self.timeout <= 7 * 24 * 3600:
            bad("timeout", self.timeout, "seconds in [0.001, 604800]")
        check_finite("dead_after", self.dead_after)
        check_positive("dead_after", self.dead_after)
        check_positive("eval_every", self.eval_every)
        if self.checkpoint_every < 0:
            bad("checkpoint_every", self.checkpoint_every, "an integer >= 0 (0 = never)")
        if self.keep_checkpoints is not None:
            if self.keep_checkpoints < 1:
                bad("keep_checkpoints", self.keep_checkpoints, "an integer >= 1 (or unset: "
                    "keep every checkpoint)")
            if not self.checkpoint_every:  # a flag that would do nothing
                bad("keep_checkpoints", self.keep_checkpoints, "unset without checkpoint_every "
                    "(no checkpoint is written)")
        h = self.algorithm_config().sync_every
        if h > self.steps:
            raise ValueError(f"sync_every={h} is invalid with steps={self.steps}: the run would "
                             "never synchronize (H must be <= steps)")

    def resolved(self, task: Any, nodes: int) -> TrainConfig:
        """A copy with every None default filled in (see :mod:`gossip.run.spec`); eval_every
        defaults to every sync when 10 <= H <= 50, else every 50 steps."""
        out = super().resolved(task, nodes)
        h = out.sync_every
        eval_every = self.eval_every or (h if 10 <= h <= 50 else 50)
        return dataclasses.replace(out, eval_every=eval_every)


def check_out(path: str | Path) -> Path:
    """``--out`` must be (or become) a writable directory: checked before any process group
    forms. Returns the path; raises ValueError naming it."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        bad("out", str(path), "a directory (it is a file)")
    parent = p if p.exists() else next((q for q in p.parents if q.exists()), Path("."))
    if not parent.is_dir():
        bad("out", str(path), f"a directory ({parent} is a file)")


    if not os.access(parent, os.W_OK | os.X_OK):
        bad("out", str(path), f"a writable directory ({parent} is not writable)")
    return p


def build_parser(prog: str = "python -m launch.train") -> argparse.ArgumentParser:
    """One flag per TrainConfig field (and ``--config``); unset flags are absent from the result."""
    return configs.build_parser(
        TrainConfig, prog=prog, description="Decentralized training (run under torchrun).")


def from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Parse the command line (``sys.argv[1:]`` by default) into a validated TrainConfig."""
    return configs.from_args(TrainConfig, argv, parser=build_parser())


