"""The configuration of a simulated run: :class:`gossip.run.RunSpec` plus what a simulation adds.

Every field of :class:`SimConfig` is a flag (``drop_prob`` <-> ``--drop-prob``) and a TOML key
(``drop_prob`` or ``drop-prob``). Precedence: dataclass defaults < ``--config FILE.toml`` < flags
on the command line. The fields every run has (algorithm, task, optimizer, schedule, H =
``--sync-every``, ...), their defaults and how None defaults are filled in are in
:mod:`gossip.run.spec`, the very table real runs use.

A *round* is one synchronisation period: every node runs up to H inner steps, then the algorithm
syncs once. H is ``sync_every`` (default: the algorithm's); or, with ``local_epochs`` instead,
``local_epochs`` epochs of the largest shard, and a node with a smaller shard trains
``local_epochs`` epochs of its own shard and idles (masked: parameters and optimizer state
untouched) for the rest of the round.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gossip import configs
from gossip.configs import bad, check_positive, help_text
from gossip.run.spec import RunSpec, check_finite
from simulations.faults import nodes_for
from simulations.network import ALLREDUCE_ALGOS

__all__ = ["SimConfig", "build_parser", "from_args"]

TRAIN_IMPLS = ("auto", "matmul", "vmap", "loop")
DEVICES = ("cpu", "cuda")
STRAGGLER_POLICIES = ("wait", "deadline")
#: The algorithms whose sync is an all-reduce (the ones ``allreduce`` times).
ALLREDUCE_USERS = ("fedavg", "diloco")


@dataclass(frozen=True, kw_only=True)
class SimConfig(RunSpec):
    """One simulated run. None = the algorithm's or task's default (see :meth:`resolved`)."""

    nodes: int = field(default=16, metadata=help_text("number of simulated nodes N"))
    rounds: int = field(default=50, metadata=help_text("synchronisation rounds"))
    out: str | None = field(default=None, metadata=help_text(
        "run directory (default: none written)"))
    save_models: bool = field(default=False, metadata=help_text(
        "write the final per-node models to OUT/models.pt (stacked) + OUT/models.json (index), "
        "the input of python -m gossip.merge"))
    checkpoint_every: int = field(default=0, metadata=help_text(
        "rounds between checkpoints in --out, to continue a run that died with --resume "
        "(0 = never, else fewer than --rounds; one process: actors 1)"))
    keep_checkpoints: int | None = field(default=None, metadata=help_text(
        "keep only the newest K checkpoints (default: every one)"))
    resume: bool = field(default=False, metadata=help_text(
        "continue the run in --out from its latest checkpoint (start fresh if it has none); "
        "the configuration must be the checkpoint's, but for where and how often it writes, "
        "evaluates and reports"))
    # data
    shard_size: int | None = field(default=None, metadata=help_text(
        "sample:* partitions: samples per node (default: max(batch size, train set / nodes))"))
    # local training
    local_epochs: int | None = field(default=None, metadata=help_text(
        "instead of --sync-every: H = this many epochs of the largest shard (a node with a "
        "smaller shard trains this many epochs of its own and idles the rest of the round)"))
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
    cuda_graphs: bool = field(default=True, metadata=help_text(
        "on a GPU, record the local step and a global model's evaluation once and replay them "
        "(CUDA graphs, where their kernels repeat); --no-cuda-graphs issues every kernel"))
    eval_every: int = field(default=1, metadata=help_text(
        "rounds between test-set evaluations (the last round is always evaluated)"))
    eval_samples: int | None = field(default=None, metadata=help_text(
        "evaluate on the first K test samples (default: all)"))
    eval_nodes: int | None = field(default=None, metadata=help_text(
        "nodes evaluated per evaluation: a seeded sample of K of the nodes that are up "
        "(default: all up to 1000, a sample of 1000 beyond; one model where the algorithm "
        "has a global model)"))
    progress: bool | None = field(default=None, metadata=help_text(
        "progress bar (default: only on a terminal)"))
    threads: int = field(default=0, metadata=help_text(
        "torch CPU threads (0 = auto: 1 below 512 nodes, where small kernels lose to thread "
        "overhead, else the CPUs the machine's load leaves free; see simulations.threads)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("nodes", self.nodes, 2)
        _at_least("rounds", self.rounds, 1)
        _at_least("shard_size", self.shard_size, 1)
        if self.shard_size is not None and not self.partition.startswith("sample:"):
            bad("shard_size", self.shard_size, "None unless partition is 'sample:...'")
        _at_least("local_epochs", self.local_epochs, 1)
        if self.local_epochs is not None and self.sync_every is not None:
            bad("local_epochs", self.local_epochs,
                f"None with sync_every={self.sync_every} (H is one or the other)")
        if self.train_impl not in TRAIN_IMPLS:
            bad("train_impl", self.train_impl, f"one of {list(TRAIN_IMPLS)}")
        for name in ("latency", "compute_time", "jitter", "bandwidth", "server_bandwidth",
                     "straggler_slowdown"):
            check_finite(name, getattr(self, name))
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
        for name in ("crash_fraction", "churn_fraction", "straggler_fraction"):
            nodes_for(name, getattr(self, name), self.nodes)  # > 0 but no node: refused
        if not 0.0 <= self.drop_prob < 1.0:
            bad("drop_prob", self.drop_prob, "a number in [0, 1)")
        if not self.straggler_slowdown >= 1.0:
            bad("straggler_slowdown", self.straggler_slowdown, "a number >= 1")
        if self.straggler_policy not in STRAGGLER_POLICIES:
            bad("straggler_policy", self.straggler_policy, f"one of {list(STRAGGLER_POLICIES)}")
        _at_least("crash_round", self.crash_round, 0)
        if self.crash_fraction > 0 and self.crash_round is not None \
                and self.crash_round >= self.rounds:  # no node would crash
            bad("crash_round", self.crash_round, f"in [0, rounds={self.rounds}) with "
                f"crash_fraction={self.crash_fraction}")
        _at_least("churn_rounds", self.churn_rounds, 1)
        _at_least("actors", self.actors, 1)
        _at_least("checkpoint_every", self.checkpoint_every, 0)
        if self.checkpoint_every >= self.rounds > 0:  # it would write none: nothing to resume
            bad("checkpoint_every", self.checkpoint_every, f"0 or fewer than rounds="
                f"{self.rounds} (none is written after the last round, which ends the run)")
        _at_least("keep_checkpoints", self.keep_checkpoints, 1)
        for name in ("checkpoint_every", "resume"):
            if getattr(self, name) and (self.out is None or self.actors > 1):
                bad(name, getattr(self, name), f"{'0' if name == 'checkpoint_every' else 'False'}"
                    " unless out is set and actors is 1 (a sharded run is not checkpointed)")
        if self.keep_checkpoints is not None and not self.checkpoint_every:
            bad("keep_checkpoints", self.keep_checkpoints, "None without checkpoint_every")
        if self.resume and self.overwrite:
            bad("overwrite", self.overwrite, "False with resume=True: continue the run in out "
                "or replace it, not both")
        if self.save_models and (self.out is None or self.actors > 1):
            bad("save_models", self.save_models, "False unless out is set and actors is 1")
        if self.actors > self.nodes:
            bad("actors", self.actors, f"at most nodes={self.nodes}")
        if self.address is not None and self.actors == 1:  # it would run here, not there
            bad("address", self.address, "None unless actors > 1 (one actor runs in this "
                "process, not on the cluster)")
        if self.device not in DEVICES:
            bad("device", self.device, f"one of {list(DEVICES)}")
        _at_least("eval_every", self.eval_every, 1)
        _at_least("eval_samples", self.eval_samples, 1)
        _at_least("eval_nodes", self.eval_nodes, 1)
        _at_least("threads", self.threads, 0)
        self._check_algorithm_fields()

    def _check_algorithm_fields(self) -> None:
        super()._check_algorithm_fields()
        if self.algo not in ALLREDUCE_USERS and self.allreduce != "ring":  # no all-reduce
            bad("allreduce", self.allreduce, f"the default 'ring' with algo={self.algo!r} "
                f"(it has no all-reduce: only {list(ALLREDUCE_USERS)} time one)")
        if self.algo == "choco":
            # every copy of x_hat_j must see every q_j (gossip/algorithms/choco.py): a lost
            # message, or one a node misses while it is down, leaves its s_i wrong for good,
            # and the run's figures would be those of a broken consensus step
            for name in ("drop_prob", "churn_fraction"):
                if getattr(self, name) > 0:
                    bad(name, getattr(self, name), "0 with algo='choco' (its public copies "
                        "need every message: one lost or missed leaves a neighbour's copy "
                        "wrong for good)")
        if self.algo == "noloco":
            g = self.group_size or 2
            if self.nodes % g:
                bad("nodes", self.nodes, f"a multiple of group_size={g} for noloco")

    def resolved(self, task: Any, nodes: int | None = None) -> SimConfig:
        """A copy with every None default filled in (see :mod:`gossip.run.spec`); crash_round
        defaults to rounds // 2. With ``local_epochs``, sync_every stays None (H comes from
        the shard sizes)."""
        out = super().resolved(task, self.nodes if nodes is None else nodes)
        return dataclasses.replace(
            out, crash_round=self.rounds // 2 if self.crash_round is None else self.crash_round)

    def resolved_sync_every(self) -> int | None:
        """None with ``local_epochs`` (H then comes from the shard sizes)."""
        return None if self.local_epochs is not None else super().resolved_sync_every()


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        bad(name, value, f"an integer >= {low}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        bad(name, value, "a number in [0, 1]")


# ----------------------------------------------------------------------------- CLI and files


def build_parser(prog: str = "python -m simulations.run") -> argparse.ArgumentParser:
    """One flag per SimConfig field (and ``--config``); unset flags are absent from the result."""
    return configs.build_parser(
        SimConfig, prog=prog, description="Simulate decentralized training on many virtual nodes.")



def from_args(argv: Sequence[str] | None = None) -> SimConfig:
    """Parse the command line (``sys.argv[1:]`` by default) into a validated SimConfig."""
    return configs.from_args(SimConfig, argv, parser=build_parser())
