"""Test-set evaluation of a simulation's nodes that costs what it must.

A round's evaluation runs right after the round's sync. Then:

- an algorithm that declares **one model** (``one_model = True``: FedAvg; DiLoCo without
  streaming fragments, whose unsynced fragments differ between nodes) has given every node the
  same model (the stacked all-reduce writes one result into every row, a
  node that is down included), so one row is evaluated and stands for every node: one forward
  per round (per shard), not N. Not for a model with floating-point buffers (BatchNorm's
  running statistics), which the algorithms leave per node (the engine decides);
- otherwise the nodes differ, and a **seeded sample** of ``eval_nodes`` of the nodes that are up
  (default: all of them up to :data:`DEFAULT_EVAL_NODES`, a sample of that many beyond) is
  evaluated in one vectorized forward over their stacked models
  (:meth:`simulations.training.StackedModel.evaluate`, chunked to stay in cache).

The sample of round ``r`` is drawn from ``(seed, r)`` over global node ids, so it does not
depend on how the nodes are sharded. Records report the mean, min and max over the evaluated
nodes and their number (``eval_nodes``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from simulations.graphs import Graphs

__all__ = ["DEFAULT_EVAL_NODES", "eval_sample", "evaluate_rows"]

#: Nodes evaluated per round by default (all of them up to this many).
DEFAULT_EVAL_NODES = 1000
_SALT = 0xE7A1


def eval_sample(up: Tensor, eval_nodes: int | None, *, seed: int, round_index: int) -> Tensor:
    """Which nodes to evaluate in round ``round_index``: a bool mask [N] choosing
    ``min(k, up.sum())`` of the nodes in ``up`` [N] uniformly without replacement, where ``k``
    is ``eval_nodes`` (None: :data:`DEFAULT_EVAL_NODES`). Every up node when they are no more
    than ``k``."""
    k = DEFAULT_EVAL_NODES if eval_nodes is None else int(eval_nodes)
    if k < 1:
        raise ValueError(f"eval_nodes={eval_nodes!r} is invalid: expected an integer >= 1")
    up = up.to("cpu", torch.bool)
    ids = up.nonzero().flatten()
    if len(ids) <= k:
        return up.clone()
    rng = np.random.default_rng([seed, _SALT, round_index])
    pick = torch.from_numpy(rng.choice(len(ids), size=k, replace=False))
    mask = torch.zeros_like(up)
    mask[ids[pick]] = True
    return mask


def evaluate_rows(model: object, x: Tensor, y: Tensor, rows: Tensor, *, one_model: bool,
                  graphs: Graphs | None = None) -> dict[str, Tensor]:
    """Evaluate the local rows ``rows`` [K] of ``model`` (a
    :class:`simulations.training.StackedModel`) on ``(x, y)``.

    Returns ``{"loss": [K], "accuracy": [K] (not for regression)}``, float64 on ``x``'s device
    (queued there: the caller copies them to the host with whatever else it waits for). With
    ``one_model`` every row holds the same model, so only the first is evaluated: one entry
    each, which stands for all ``K``; ``graphs`` (a :class:`simulations.graphs.Graphs`) then
    replays that evaluation on a GPU.
    """
    rows = torch.as_tensor(rows, dtype=torch.long)
    if len(rows) == 0:
        return {"loss": torch.zeros(0, dtype=torch.float64, device=x.device)}
    first = int(rows[0])  # a global model: its first row, read in place (no gather)
    if one_model and graphs is not None:
        loss, acc = graphs.evaluate(model, x, y, first)  # type: ignore[arg-type]
    else:
        chosen = slice(first, first + 1) if one_model else rows
        loss, acc = model.evaluate(x, y, chosen)  # type: ignore[attr-defined]
    return {"loss": loss} if acc is None else {"loss": loss, "accuracy": acc}
