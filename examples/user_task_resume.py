"""Your own task through ``launch.train``: checkpoints, a stop, ``--resume``, and the check that
the resumed run is the uninterrupted one, bit for bit.

The task is defined right here (:func:`make_task`: two-moons-like data, a small MLP, cross-entropy
with label smoothing) and reaches the ranks as ``--task user_task_resume:make_task`` (this
directory is put on PYTHONPATH). The script runs NoLoCo, under ``torchrun --nproc-per-node 2``:

1. ``--steps S/2 --checkpoint-every C``: the first half, then the ranks exit;
2. ``--steps S --resume`` in the same directory: continues from the checkpoint at S/2;
3. ``--steps S`` uninterrupted in another directory;

and prints both final test losses, which are equal.

    python examples/user_task_resume.py --steps 60 --out runs/user_task
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gossip.tasks import Task, TaskData

HERE = Path(__file__).resolve().parent


def smoothed_cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, label_smoothing=0.05)


def make_task(seed: int = 0) -> Task:
    """Two interleaved half circles with noise (a classic non-linear toy problem)."""
    g = torch.Generator().manual_seed(seed)
    n = 1200
    t = torch.rand(n, generator=g) * math.pi
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.stack([torch.cos(t) + y, torch.sin(t) * (1 - 2 * y) + 0.5 * y], dim=1)
    x = x + 0.1 * torch.randn(n, 2, generator=g)
    data = TaskData(x[:1000], y[:1000], x[1000:], y[1000:], num_classes=2, kind="classification")

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))

    return Task(name="moons", data=data, model_factory=model, default_lr=0.1,
                default_batch_size=32, loss_fn=smoothed_cross_entropy)


def torchrun(out: Path, *flags: str, nproc: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "launch.train", "--task",
           "user_task_resume:make_task", "--algo", "noloco", "--sync-every", "5",
           "--out", str(out), *flags]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="total steps (even)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", default="runs/user_task_resume")
    args = p.parse_args(argv)
    if args.steps < 2 or args.steps % 2 or args.nproc < 1:
        p.error(f"--steps must be even and >= 2 and --nproc >= 1, got {args.steps} and "
                f"{args.nproc}")
    half = args.steps // 2
    out = Path(args.out)
    resumed, straight = out / "resumed", out / "straight"
    torchrun(resumed, "--steps", str(half), "--checkpoint-every", str(half), nproc=args.nproc)
    a = torchrun(resumed, "--steps", str(args.steps), "--checkpoint-every", str(half),
                 "--resume", nproc=args.nproc)
    b = torchrun(straight, "--steps", str(args.steps), nproc=args.nproc)
    print(f"task {a['task']} ({a['task_source']}), {args.nproc} ranks, {args.steps} steps")
    print(f"  stopped at {half} and resumed: final test loss {a['final_loss_mean']:.6f} "
          f"(resumed from step {a['resumed_from_step']})")
    print(f"  uninterrupted:                 final test loss {b['final_loss_mean']:.6f}")
    same = a["final_loss_mean"] == b["final_loss_mean"]
    print(f"  identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
