"""The merge of a run's models by method name, and the CLI ``python -m gossip.merge``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from gossip import checkpoint as ckpt
from gossip.merge.inputs import FORMAT, MERGED_KIND, Ingredient, Models, load_models
from gossip.merge.models import diagonal_fisher, has_running_stats, recompute_bn, state_of, to_model
from gossip.merge.soups import (
    CHECKPOINT_METHODS,
    SOUP_METHODS,
    State,
    average,
    dare,
    ema,
    fisher_average,
    greedy_soup,
    last_k,
    lawa,
    positive,
    ties,
)
from gossip.metrics import NO_SPACE, no_space_message
from gossip.rundir import check_creatable
from gossip.tasks import Task

__all__ = ["METHODS", "MergeOptions", "MergeResult", "build_parser", "main", "merge", "select"]

METHODS = SOUP_METHODS + CHECKPOINT_METHODS



@dataclass(frozen=True, kw_only=True)
class MergeOptions:
    """Options of :func:`merge` (each a CLI flag)."""

    method: str
    k: int = 3
    ema_decay: float = 0.9
    lawa_every: int = 1
    density: float = 0.2
    drop: float = 0.9
    scale: float = 1.0
    base: str = "init"
    rank: int | None = None
    heldout_samples: int = 1024
    fisher_samples: int = 256
    bn_recompute: bool | None = None
    bn_batches: int = 32
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is invalid: expected one of "
                             f"{list(METHODS)}")
        for name in ("k", "lawa_every", "heldout_samples", "fisher_samples", "bn_batches",
                     "batch_size"):
            positive(name, getattr(self, name))
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay={self.ema_decay!r} is invalid: expected [0, 1)")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"density={self.density!r} is invalid: expected (0, 1]")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError(f"drop={self.drop!r} is invalid: expected [0, 1)")
        if not math.isfinite(self.scale):
            raise ValueError(f"scale={self.scale!r} is invalid: expected a finite number")
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"rank={self.rank!r} is invalid: expected an integer >= 0")


@dataclass
class MergeResult:
    state: State
    used: list[Ingredient]
    chosen: list[int] | None
    model: nn.Module


def select(models: Models, method: str, rank: int | None = None) -> list[Ingredient]:
    """The ingredients ``method`` merges: for soups the latest step's model of every rank
    (all of them when the models have no steps); for checkpoint methods one rank's models
    (``rank``, default the lowest) over time, oldest first."""
    items = models.items
    steps = [i.step for i in items]
    if method in SOUP_METHODS:
        if any(s is None for s in steps):
            return list(items)
        last = max(s for s in steps if s is not None)
        return [i for i in items if i.step == last]
    ranks = sorted({i.rank for i in items if i.rank is not None})
    if ranks and all(s is not None for s in steps):
        want = ranks[0] if rank is None else rank
        if want not in ranks:
            raise ValueError(f"rank={rank} is invalid: the checkpoints are of ranks {ranks}")
        series = sorted((i for i in items if i.rank == want), key=lambda i: i.step or 0)
    elif any(i.rank is not None for i in items) and all(s is None for s in steps):
        raise ValueError(f"method={method!r} needs checkpoints over time; the inputs are one "
                         "step's models (a simulation's final nodes): use a soup method")
    else:
        series = list(items)
    return series


class _Scorer:
    """Held-out scores and BatchNorm recomputation on a seeded sample of the training split."""

    def __init__(self, task: Task, opts: MergeOptions, model_seed: int) -> None:
        self.task, self.opts, self.model_seed = task, opts, model_seed
        data = task.data
        order = torch.randperm(data.num_train, generator=torch.Generator().manual_seed(opts.seed))
        pick = order[:opts.heldout_samples]
        self.x, self.y = data.x_train[pick], data.y_train[pick]
        probe = task.make_model(model_seed)
        self.bn = has_running_stats(probe) if opts.bn_recompute is None else opts.bn_recompute

    def model(self, state: Mapping[str, Tensor]) -> nn.Module:
        model = to_model(self.task, state, seed=self.model_seed)
        if self.bn:
            recompute_bn(model, self.task.data.x_train, batch_size=self.opts.batch_size,
                         batches=self.opts.bn_batches, seed=self.opts.seed)
        return model

    def score(self, state: Mapping[str, Tensor]) -> float:
        """Held-out accuracy, or minus the loss for tasks without accuracy."""
        model = self.model(state)
        with torch.no_grad():
            m = self.task.metrics(model(self.x), self.y)
        return m["accuracy"] if "accuracy" in m else -m["loss"]


def merge(models: Models, opts: MergeOptions) -> MergeResult:
    """Merge ``models`` with ``opts.method``; returns the state, the ingredients used, the greedy
    soup's picks (indices into ``used``) and the merged model (BatchNorm recomputed if on)."""
    task = models.build_task()
    used = select(models, opts.method, opts.rank)
    states = [i.state for i in used]
    scorer = _Scorer(task, opts, models.model_seed)
    chosen = None
    m = opts.method
    param_names = [n for n, p in task.make_model(models.model_seed).named_parameters()
                   if p.requires_grad]
    if m == "uniform":
        state = average(states)
    elif m == "greedy-soup":
        state, chosen = greedy_soup(states, scorer.score)
    elif m == "fisher":
        x = scorer.x[:opts.fisher_samples]
        fishers = [diagonal_fisher(task, scorer.model(s), x, seed=opts.seed) for s in states]
        state = fisher_average(states, fishers)
    elif m == "last-k":
        state = last_k(states, opts.k)
    elif m == "ema":
        state = ema(states, opts.ema_decay)
    elif m == "lawa":
        state = lawa(states, opts.k, opts.lawa_every)
    else:
        base = _base(opts.base, models, task, states)
        if m == "ties":
            state = ties(base, states, density=opts.density, scale=opts.scale,
                         names=param_names)
        else:
            state = dare(base, states, drop=opts.drop, scale=opts.scale, seed=opts.seed,
                         names=param_names)
    return MergeResult(state, used, chosen, scorer.model(state))


def _base(spec: str, models: Models, task: Task, states: Sequence[State]) -> State:
    """``init``: the run's initial model (the shared start of FedAvg, DiLoCo and NoLoCo);
    ``mean``: the uniform soup; else a path to a model file."""
    if spec == "init":  # (what the models hold: a simulation does not save frozen parameters)
        init = state_of(task.make_model(models.model_seed))
        return {n: init[n] for n in states[0] if n in init}
    if spec == "mean":
        return average(states)
    found = load_models([spec], task=models.task, seed=0)
    if len(found.items) != 1:
        raise ValueError(f"base={spec!r} holds {len(found.items)} models, expected one")
    return found.items[0].state


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m gossip.merge",
        description="Merge the models of a run (soups, Fisher, checkpoint averaging, TIES, "
                    "DARE) and score the result on the task's test set.")
    p.add_argument("inputs", nargs="*", metavar="RUN_DIR_OR_FILES",
                   help="run directories, models.json indexes, checkpoint or merged files")
    p.add_argument("--method", required=True, help=" | ".join(METHODS))
    p.add_argument("--out", required=True, help="file to write the merged model to")
    p.add_argument("--task", help="task: a built-in name or package.module:function "
                   "(default: what the inputs record)")
    p.add_argument("--seed", type=int, help="the run's data seed (default: recorded)")
    p.add_argument("--init", help="the run's model init (default: recorded)")
    p.add_argument("--k", type=int, default=3, help="last-k, lawa: checkpoints averaged")
    p.add_argument("--ema-decay", type=float, default=0.9, help="ema: decay d")
    p.add_argument("--lawa-every", type=int, default=1,
                   help="lawa: spacing of the averaged checkpoints, in checkpoints")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction kept by trim")
    p.add_argument("--drop", type=float, default=0.9, help="dare: drop probability p")
    p.add_argument("--scale", type=float, default=1.0, help="ties, dare: scale of the merged "
                   "task vector")
    p.add_argument("--base", default="init", help="ties, dare: init (the run's initial model) "
                   "| mean (the uniform soup) | PATH")
    p.add_argument("--rank", type=int, help="checkpoint methods: the rank (default: lowest)")
    p.add_argument("--heldout-samples", type=int, default=1024,
                   help="training samples scored by greedy-soup and used by fisher")
    p.add_argument("--fisher-samples", type=int, default=256)
    p.add_argument("--bn-recompute", action=argparse.BooleanOptionalAction, default=None,
                   help="recompute BatchNorm statistics on training batches (default: when "
                        "the model has BatchNorm)")
    p.add_argument("--bn-batches", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="BatchNorm recompute batch size")
    p.add_argument("--merge-seed", type=int, default=0,
                   help="seeds the held-out sample, DARE's masks, sampled Fisher labels")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if Path(args.out).is_dir():  # refused before the merge, not by the final rename
            raise ValueError(f"out={args.out!r} is a directory: expected the path of the file "
                             "to write the merged model to (e.g. OUT/merged.pt)")
        check_creatable(args.out)  # (a read-only mount: refused before the merge)
        opts = MergeOptions(
            method=args.method, k=args.k, ema_decay=args.ema_decay, lawa_every=args.lawa_every,
            density=args.density, drop=args.drop, scale=args.scale, base=args.base,
            rank=args.rank, heldout_samples=args.heldout_samples,
            fisher_samples=args.fisher_samples, bn_recompute=args.bn_recompute,
            bn_batches=args.bn_batches, batch_size=args.batch_size, seed=args.merge_seed)
        models = load_models(args.inputs, task=args.task, seed=args.seed, init=args.init)
        result = merge(models, opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    task = models.build_task()
    scorer = _Scorer(task, opts, models.model_seed)
    singles = [task.evaluate(scorer.model(i.state)) for i in result.used]
    merged = task.evaluate(result.model)
    key = "accuracy" if "accuracy" in merged else "loss"
    values = [s[key] for s in singles]
    best = max(values) if key == "accuracy" else min(values)
    print(f"{opts.method}: {len(result.used)} models of task {models.task} "
          f"(seed {models.seed}, init {models.init})")
    if result.chosen is not None:
        print(f"  greedy soup kept {len(result.chosen)}: "
              + ", ".join(result.used[i].label for i in result.chosen))
    print(f"  ingredients' test {key}: best {best:.4f}  mean {sum(values) / len(values):.4f}")
    print(f"  merged test loss {merged['loss']:.4f}"
          + (f"  accuracy {merged['accuracy']:.4f}" if "accuracy" in merged else ""))
    out = Path(args.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_torch_save({"kind": MERGED_KIND, "format": FORMAT, "task": models.task,
                                "seed": models.seed, "init": models.init,
                                "method": opts.method,
                                "ingredients": [i.label for i in result.used],
                                "state": state_of(result.model), "metrics": merged}, out)
    except OSError as e:  # a full disk: one line, no traceback (no half-written file stays)
        if e.errno not in NO_SPACE:
            raise
        print(f"error: {no_space_message(e, out.parent)}", file=sys.stderr)
        return 1
    print(f"  wrote {out}")
    print(f"{key}={merged[key]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
