"""A task defined outside the package, as a user would: ``--task tests.user_task:make_task``.

Two Gaussian blobs per class in 8 dimensions, a tiny MLP, and its own loss (cross-entropy with
label smoothing 0.1), so a run that ignored ``loss_fn`` would train to a different loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gossip.tasks import Task, TaskData


def smoothed_ce(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output, target, label_smoothing=0.1)


def make_task(seed: int = 0) -> Task:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.randint(0, 3, (600,), generator=g)
    x = centers[y] + torch.randn(600, 8, generator=g)
    data = TaskData(x[:480], y[:480], x[480:], y[480:], num_classes=3, kind="classification")

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))

    return Task(name="blobs", data=data, model_factory=model, default_lr=0.1,
                default_batch_size=16, loss_fn=smoothed_ce)
