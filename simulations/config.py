"""The simulator's configuration: one frozen dataclass, its CLI flags (1:1) and TOML files.

Every field of :class:`SimConfig` is a flag (``local_steps`` <-> ``--local-steps``) and a TOML key
(``local_steps`` or ``local-steps``). Precedence: dataclass defaults < ``--config FILE.toml`` <
flags on the command line. Fields left at None mean "the default for this algorithm and task",
filled in by :meth:`SimConfig.resolved` once the task is known (the same rules as the real
launcher, ``launch.config``):

========== ================ ======================== ==========================================
algo       inner optimizer  inner lr                 topology
========== ================ ======================== ==========================================
fedavg     task default     task default             -
diloco     AdamW            1e-3 (3e-3 on charlm)    -
noloco     Adam             1e-3 (3e-3 on charlm)    - (random groups of ``group_size``)
dpsgd,     task default     task default             random-regular:8 (ring when nodes < 9)
gossip,
gossip-vc
========== ================ ======================== ==========================================

A *round* is one synchronisation period: every node runs up to H inner steps, then the algorithm
syncs once. H is ``local_steps`` when given; otherwise ``local_epochs`` epochs of the largest
shard, and a node with a smaller shard trains ``local_epochs`` epochs of its own shard and idles
(masked: parameters and optimizer state untouched) for the rest of the round.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gossip import configs
from gossip.algorithms import ALGORITHMS, make_config
from gossip.configs import (
    FileConfig,
    bad,
    check_positive,
    check_types,
    field_flag,
    help_text,
)
from gossip.data import partition as _partition
from gossip.tasks import TASK_NAMES
from launch import config as launch_config
from launch.config import AlgorithmOptions
from simulations.network import ALLREDUCE_ALGOS

__all__ = [
    "ALGO_FIELDS",
    "OPTIMIZERS",
    "SimConfig",
    "applicable_fields",
    "build_parser",
    "field_flag",
    "from_args",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
TRAIN_IMPLS = ("auto", "matmul", "vmap", "loop")
DEVICES = ("cpu", "cuda")
STRAGGLER_POLICIES = ("wait", "deadline")
#: Inner optimizer each algorithm defaults to (None = the task's default optimizer).
DEFAULT_INNER_OPTIMIZER: dict[str, str | None] = {"diloco": "adamw", "noloco": "adam"}
#: Learning rate for an optimizer that is not of the task's default optimizer's family.
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}


@dataclass(frozen=True, kw_only=True)
class SimConfig(AlgorithmOptions, FileConfig):
    """One simulated run. None = the algorithm's or task's default (see :meth:`resolved`)."""

    # run
    algo: str = field(default="fedavg", metadata=help_text(f"one of {sorted(ALGORITHMS)}"))
    task: str = field(default="digits", metadata=help_text(f"one of {list(TASK_NAMES)}"))
    nodes: int = field(default=16, metadata=help_text("number of simulated nodes N"))
    rounds: int = field(default=50, metadata=help_text("synchronisation rounds"))
    out: str | None = field(default=None, metadata=help_text(
        "run directory (default: none written)"))
    overwrite: bool = field(default=False, metadata=help_text(  # [faults]
        "replace the run already in --out (its files are removed first)"))
    seed: int = field(default=0, metadata=help_text(
        "seeds data split, partition, model init (seed or seed+node), batches, pairings, faults"))
    # data
    partition: str = field(default="iid", metadata=help_text(
        "iid | dirichlet:ALPHA | shards:K | quantity:ALPHA (disjoint shards), or sample:iid | "
        "sample:dirichlet:ALPHA (each node draws its own shard from the whole training set, "
        "shards overlap: for more nodes than samples)"))
    shard_size: int | None = field(default=None, metadata=help_text(
        "sample:* partitions: samples per node (default: max(batch size, train set / nodes))"))
    batch_size: int | None = field(default=None, metadata=help_text("default: the task's"))
    # local training
    local_steps: int | None = field(default=None, metadata=help_text(
        "inner steps per round H (= the algorithm's sync_every); default: local_epochs epochs "
        "of the largest shard"))
    local_epochs: int = field(default=1, metadata=help_text(
        "epochs of its own shard each node runs per round when local_steps is not given"))
    optimizer: str | None = field(default=None, metadata=help_text(
        f"{' | '.join(OPTIMIZERS)}; default: AdamW for diloco, Adam for noloco, else the task's"))
    lr: float | None = field(default=None, metadata=help_text("inner learning rate"))
    momentum: float = field(default=0.0, metadata=help_text("sgd: momentum"))
    weight_decay: float | None = field(default=None, metadata=help_text(
        "inner weight decay (default: the optimizer's)"))
    grad_clip: float | None = field(default=None, metadata=help_text(
        "clip each node's gradient norm to this value (default: off)"))
    train_impl: str = field(default="auto", metadata=help_text(
        "auto | matmul (MLPs of Linear/ReLU/Tanh) | vmap | loop (per-node; BatchNorm)"))
    # network / time model
    latency: float = field(default=0.05, metadata=help_text("per-message latency alpha, seconds"))
    bandwidth: float = field(default=12.5e6, metadata=help_text(
        "per-node link bandwidth, bytes/s (uplink and downlink)"))
    jitter: float = field(default=0.0, metadata=help_text(
        "sigma of mean-one log-normal noise on message and compute times (0 = none)"))
    compute_time: float = field(default=0.01, metadata=help_text("seconds per inner step per node"))
    allreduce: str = field(default="ring", metadata=help_text(
        "all-reduce time model (fedavg, diloco): ring | halving-doubling | star (client-server)"))
    server_bandwidth: float | None = field(default=None, metadata=help_text(
        "allreduce=star: the server's link, bytes/s (default: bandwidth)"))
    straggler_fraction: float = field(default=0.0, metadata=help_text(
        "fraction of nodes that are slow in each round (redrawn every round)"))
    straggler_slowdown: float = field(default=4.0, metadata=help_text(
        "how many times slower a straggler computes"))
    straggler_policy: str = field(default="wait", metadata=help_text(
        "wait: stragglers finish their steps (and delay whoever waits for them) | deadline: "
        "they run floor(steps / slowdown) steps in the round"))
    # faults
    crash_fraction: float = field(default=0.0, metadata=help_text(
        "fraction of nodes that crash for good at crash_round"))
    crash_round: int | None = field(default=None, metadata=help_text(
        "round (0-based) of the crashes (default: rounds // 2)"))
    churn_fraction: float = field(default=0.0, metadata=help_text(
        "fraction of nodes that go offline once, for churn_rounds rounds from a random round"))
    churn_rounds: int = field(default=5, metadata=help_text("length of each offline period"))
    drop_prob: float = field(default=0.0, metadata=help_text("probability a message is lost"))
    # execution
    actors: int = field(default=1, metadata=help_text(
        "Ray actors sharding the nodes (1 = in this process)"))
    address: str | None = field(default=None, metadata=help_text(
        "Ray cluster address (default: start a local one)"))
    device: str = field(default="cpu", metadata=help_text("cpu | cuda"))
    eval_every: int = field(default=1, metadata=help_text(
        "rounds between test-set evaluations (the last round is always evaluated)"))
    eval_samples: int | None = field(default=None, metadata=help_text(
        "evaluate on the first K test samples (default: all)"))
    progress: bool | None = field(default=None, metadata=help_text(
        "progress bar (default: only on a terminal)"))
    threads: int = field(default=0, metadata=help_text(
        "torch CPU threads (0 = auto: 1 below 512 nodes, where small kernels lose to thread "
        "overhead, else torch's default)"))

    def __post_init__(self) -> None:
        check_types(self)
        launch_config.check_run_fields(self)
        _at_least("nodes", self.nodes, 2)
        _at_least("rounds", self.rounds, 1)
        _check_partition(self.partition)
        _at_least("shard_size", self.shard_size, 1)
        if self.shard_size is not None and not self.partition.startswith("sample:"):
            bad("shard_size", self.shard_size, "None unless partition is 'sample:...'")
        _at_least("local_steps", self.local_steps, 1)
        _at_least("local_epochs", self.local_epochs, 1)
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", self.momentum, "a number in [0, 1)")
        if self.momentum and self.optimizer not in (None, "sgd"):
            bad("momentum", self.momentum, f"0 with optimizer={self.optimizer!r} (sgd only)")
        if self.train_impl not in TRAIN_IMPLS:
            bad("train_impl", self.train_impl, f"one of {list(TRAIN_IMPLS)}")
        for name in ("latency", "compute_time", "jitter"):
            if not getattr(self, name) >= 0:
                bad(name, getattr(self, name), "a number >= 0")
        check_positive("bandwidth", self.bandwidth)
        check_positive("server_bandwidth", self.server_bandwidth)
        if self.server_bandwidth is not None and self.allreduce != "star":
            bad("server_bandwidth", self.server_bandwidth, "None unless allreduce='star'")
        if self.allreduce not in ALLREDUCE_ALGOS:
            bad("allreduce", self.allreduce, f"one of {list(ALLREDUCE_ALGOS)}")
        for name in ("straggler_fraction", "churn_fraction"):
            _fraction(name, getattr(self, name))
        if not 0.0 <= self.crash_fraction < 1.0:
            bad("crash_fraction", self.crash_fraction, "a number in [0, 1)")
        if not 0.0 <= self.drop_prob < 1.0:
            bad("drop_prob", self.drop_prob, "a number in [0, 1)")
        if not self.straggler_slowdown >= 1.0:
            bad("straggler_slowdown", self.straggler_slowdown, "a number >= 1")
        if self.straggler_policy not in STRAGGLER_POLICIES:
            bad("straggler_policy", self.straggler_policy, f"one of {list(STRAGGLER_POLICIES)}")
        _at_least("crash_round", self.crash_round, 0)
        _at_least("churn_rounds", self.churn_rounds, 1)
        _at_least("actors", self.actors, 1)
        if self.actors > self.nodes:
            bad("actors", self.actors, f"at most nodes={self.nodes}")
        if self.device not in DEVICES:
            bad("device", self.device, f"one of {list(DEVICES)}")
        _at_least("eval_every", self.eval_every, 1)
        _at_least("eval_samples", self.eval_samples, 1)
        _at_least("threads", self.threads, 0)
        self._check_algorithm_fields()

    def _check_algorithm_fields(self) -> None:
        launch_config.check_algorithm_fields(self, applicable_fields(self.algo), ALGO_FIELDS)
        if self.algo == "noloco":
            g = self.group_size or 2
            if self.nodes % g:
                bad("nodes", self.nodes, f"a multiple of group_size={g} for noloco")
        self.algorithm_config(1)  # the algorithm's own checks name field and value

    def algorithm_config(self, sync_every: int) -> Any:
        """The algorithm's config (``FedAvgConfig``, ...) with ``sync_every`` = H."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k in ALGO_FIELDS}
        return make_config(self.algo, **fields, sync_every=sync_every, seed=self.seed)

    def resolved(self, task: Any) -> SimConfig:
        """A copy with every None default filled in for ``task`` (a :class:`gossip.tasks.Task`)."""
        optimizer = self.optimizer or DEFAULT_INNER_OPTIMIZER.get(self.algo) \
            or task.default_optimizer
        lr = self.lr
        if lr is None:
            adaptive = {"adam", "adamw"}
            same_family = optimizer == task.default_optimizer or (
                optimizer in adaptive and task.default_optimizer in adaptive)
            lr = task.default_lr if same_family else DEFAULT_LR[optimizer]
        fields = applicable_fields(self.algo)
        topology = None
        if "topology" in fields:
            topology = self.topology or ("random-regular:8" if self.nodes >= 9 else "ring")
        return dataclasses.replace(
            self,
            optimizer=optimizer,
            lr=float(lr),
            batch_size=self.batch_size or task.default_batch_size,
            topology=topology,
            topology_weights=(self.topology_weights or "metropolis")
            if "topology_weights" in fields else None,
            vc_scope=(self.vc_scope or "weights") if "vc_scope" in fields else None,
            crash_round=self.rounds // 2 if self.crash_round is None else self.crash_round,
        )



# ----------------------------------------------------------------------------- fields


#: Algorithm config fields that are not flags: shared (seed, sync_every) or chosen by the name.
NOT_FLAGS = launch_config.NOT_FLAGS | {"sync_every"}  # H is local_steps here
#: SimConfig fields that belong to some algorithms only (None = not set).
ALGO_FIELDS: frozenset[str] = launch_config.ALGO_FIELDS - NOT_FLAGS


def applicable_fields(algo: str) -> set[str]:
    """The algorithm-specific fields that ``algo`` uses (launch.config's, but sync_every)."""
    return launch_config.applicable_fields(algo) - NOT_FLAGS


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        bad(name, value, f"an integer >= {low}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        bad(name, value, "a number in [0, 1]")


def _check_partition(spec: str) -> None:
    # The partitioners are pure and cheap: run the real parser on a dummy label set.
    inner = spec.strip()
    if inner.startswith("sample:"):
        inner = inner[len("sample:"):]
        if inner.split(":", 1)[0] not in ("iid", "dirichlet"):
            bad("partition", spec, "'sample:iid' or 'sample:dirichlet:ALPHA'")
    try:
        _partition(inner, np.zeros(10_000, dtype=np.int64), 1, seed=0)
    except ValueError as e:
        raise ValueError(f"partition={spec!r} is invalid: {e}") from None


# ----------------------------------------------------------------------------- CLI and files


def build_parser(prog: str = "python -m simulations.run") -> argparse.ArgumentParser:
    """One flag per SimConfig field (and ``--config``); unset flags are absent from the result."""
    return configs.build_parser(
        SimConfig, prog=prog, description="Simulate decentralized training on many virtual nodes.")



def from_args(argv: Sequence[str] | None = None) -> SimConfig:
    """Parse the command line (``sys.argv[1:]`` by default) into a validated SimConfig."""
    return configs.from_args(SimConfig, argv, parser=build_parser())
