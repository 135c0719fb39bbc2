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
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gossip.algorithms import ALGORITHMS, make_config, needs_topology
from gossip.data import partition as _partition
from gossip.flat import scope_from_spec
from gossip.tasks import TASK_NAMES
from simulations.network import ALLREDUCE_ALGOS

__all__ = [
    "ALGO_FIELDS",
    "OPTIMIZERS",
    "SimConfig",
    "applicable_fields",
    "build_parser",
    "field_flag",
    "from_args",
    "load_toml",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
TRAIN_IMPLS = ("auto", "matmul", "vmap", "loop")
DEVICES = ("cpu", "cuda")
TOPOLOGY_WEIGHTS = ("metropolis", "uniform")
STRAGGLER_POLICIES = ("wait", "deadline")
#: Inner optimizer each algorithm defaults to (None = the task's default optimizer).
DEFAULT_INNER_OPTIMIZER: dict[str, str | None] = {"diloco": "adamw", "noloco": "adam"}
#: Learning rate for an optimizer that is not of the task's default optimizer's family.
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
#: Arguments each topology name takes (see gossip.topology.make_topology).
_TOPOLOGY_ARGS = {
    "ring": (0, 0), "torus": (0, 1), "random-regular": (1, 1), "erdos-renyi": (1, 1),
    "small-world": (2, 2), "star": (0, 0), "complete": (0, 0), "exponential": (0, 0),
    "one-peer-exponential": (0, 0), "matching": (0, 0),
}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True, kw_only=True)
class SimConfig:
    """One simulated run. None = the algorithm's or task's default (see :meth:`resolved`)."""

    # run
    algo: str = field(default="fedavg", metadata=_help(f"one of {sorted(ALGORITHMS)}"))
    task: str = field(default="digits", metadata=_help(f"one of {list(TASK_NAMES)}"))
    nodes: int = field(default=16, metadata=_help("number of simulated nodes N"))
    rounds: int = field(default=50, metadata=_help("synchronisation rounds"))
    out: str | None = field(default=None, metadata=_help("run directory (default: none written)"))
    seed: int = field(default=0, metadata=_help(
        "seeds data split, partition, model init (seed or seed+node), batches, pairings, faults"))
    # data
    partition: str = field(default="iid", metadata=_help(
        "iid | dirichlet:ALPHA | shards:K | quantity:ALPHA (disjoint shards), or sample:iid | "
        "sample:dirichlet:ALPHA (each node draws its own shard from the whole training set, "
        "shards overlap: for more nodes than samples)"))
    shard_size: int | None = field(default=None, metadata=_help(
        "sample:* partitions: samples per node (default: max(batch size, train set / nodes))"))
    batch_size: int | None = field(default=None, metadata=_help("default: the task's"))
    # local training
    local_steps: int | None = field(default=None, metadata=_help(
        "inner steps per round H (= the algorithm's sync_every); default: local_epochs epochs "
        "of the largest shard"))
    local_epochs: int = field(default=1, metadata=_help(
        "epochs of its own shard each node runs per round when local_steps is not given"))
    optimizer: str | None = field(default=None, metadata=_help(
        f"{' | '.join(OPTIMIZERS)}; default: AdamW for diloco, Adam for noloco, else the task's"))
    lr: float | None = field(default=None, metadata=_help("inner learning rate"))
    momentum: float = field(default=0.0, metadata=_help("sgd: momentum"))
    weight_decay: float | None = field(default=None, metadata=_help(
        "inner weight decay (default: the optimizer's)"))
    grad_clip: float | None = field(default=None, metadata=_help(
        "clip each node's gradient norm to this value (default: off)"))
    train_impl: str = field(default="auto", metadata=_help(
        "auto | matmul (MLPs of Linear/ReLU/Tanh) | vmap | loop (per-node; BatchNorm)"))
    # algorithm (each maps to the field of the same name of the algorithm's config)
    outer_lr: float | None = field(default=None, metadata=_help("diloco: outer SGD lr"))
    outer_momentum: float | None = field(default=None, metadata=_help(
        "diloco: outer SGD momentum"))
    nesterov: bool | None = field(default=None, metadata=_help("diloco: Nesterov outer SGD"))
    alpha: float | None = field(default=None, metadata=_help("noloco: outer momentum"))
    beta: float | None = field(default=None, metadata=_help("noloco: outer lr"))
    gamma: float | None = field(default=None, metadata=_help("noloco: pull to the group's phi"))
    group_size: int | None = field(default=None, metadata=_help(
        "noloco: nodes per group (must divide nodes)"))
    client_fraction: float | None = field(default=None, metadata=_help(
        "fedavg: fraction of nodes sampled per round"))
    self_weight: float | None = field(default=None, metadata=_help(
        "gossip, gossip-vc: self weight beta of the merge"))
    vc_eps: float | None = field(default=None, metadata=_help("gossip-vc: variance ratio guard"))
    vc_ratio: float | None = field(default=None, metadata=_help(
        "gossip-vc: partial correction (1 = full)"))
    vc_scope: str | None = field(default=None, metadata=_help(
        "gossip-vc: tensors rescaled: weights | all | none | re:REGEX (default: weights)"))
    topology: str | None = field(default=None, metadata=_help(
        "dpsgd, gossip, gossip-vc: NAME[:ARGS] (default: random-regular:8, ring when nodes < 9)"))
    topology_weights: str | None = field(default=None, metadata=_help(
        "dpsgd: mixing weights of static graphs: metropolis | uniform (default: metropolis)"))
    # network / time model
    latency: float = field(default=0.05, metadata=_help("per-message latency alpha, seconds"))
    bandwidth: float = field(default=12.5e6, metadata=_help(
        "per-node link bandwidth, bytes/s (uplink and downlink)"))
    jitter: float = field(default=0.0, metadata=_help(
        "sigma of mean-one log-normal noise on message and compute times (0 = none)"))
    compute_time: float = field(default=0.01, metadata=_help("seconds per inner step per node"))
    allreduce: str = field(default="ring", metadata=_help(
        "all-reduce time model: ring | halving-doubling"))
    straggler_fraction: float = field(default=0.0, metadata=_help(
        "fraction of nodes that are slow in each round (redrawn every round)"))
    straggler_slowdown: float = field(default=4.0, metadata=_help(
        "how many times slower a straggler computes"))
    straggler_policy: str = field(default="wait", metadata=_help(
        "wait: stragglers finish their steps (and delay whoever waits for them) | deadline: "
        "they run floor(steps / slowdown) steps in the round"))
    # faults
    crash_fraction: float = field(default=0.0, metadata=_help(
        "fraction of nodes that crash for good at crash_round"))
    crash_round: int | None = field(default=None, metadata=_help(
        "round (0-based) of the crashes (default: rounds // 2)"))
    churn_fraction: float = field(default=0.0, metadata=_help(
        "fraction of nodes that go offline once, for churn_rounds rounds from a random round"))
    churn_rounds: int = field(default=5, metadata=_help("length of each offline period"))
    drop_prob: float = field(default=0.0, metadata=_help("probability a message is lost"))
    # execution
    actors: int = field(default=1, metadata=_help(
        "Ray actors sharding the nodes (1 = in this process)"))
    address: str | None = field(default=None, metadata=_help(
        "Ray cluster address (default: start a local one)"))
    device: str = field(default="cpu", metadata=_help("cpu | cuda"))
    eval_every: int = field(default=1, metadata=_help(
        "rounds between test-set evaluations (the last round is always evaluated)"))
    eval_samples: int | None = field(default=None, metadata=_help(
        "evaluate on the first K test samples (default: all)"))
    progress: bool | None = field(default=None, metadata=_help(
        "progress bar (default: only on a terminal)"))
    threads: int = field(default=0, metadata=_help(
        "torch CPU threads (0 = auto: 1 below 512 nodes, where small kernels lose to thread "
        "overhead, else torch's default)"))

    def __post_init__(self) -> None:
        _check_types(self)
        if self.algo not in ALGORITHMS:
            _bad("algo", self.algo, f"one of {sorted(ALGORITHMS)}")
        if self.task not in TASK_NAMES:
            _bad("task", self.task, f"one of {list(TASK_NAMES)}")
        _at_least("nodes", self.nodes, 2)
        _at_least("rounds", self.rounds, 1)
        _at_least("seed", self.seed, 0)
        _check_partition(self.partition)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("shard_size", self.shard_size, 1)
        if self.shard_size is not None and not self.partition.startswith("sample:"):
            _bad("shard_size", self.shard_size, "None unless partition is 'sample:...'")
        _at_least("local_steps", self.local_steps, 1)
        _at_least("local_epochs", self.local_epochs, 1)
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            _bad("optimizer", self.optimizer, f"one of {list(OPTIMIZERS)}")
        _positive("lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            _bad("momentum", self.momentum, "a number in [0, 1)")
        if self.momentum and self.optimizer not in (None, "sgd"):
            _bad("momentum", self.momentum, f"0 with optimizer={self.optimizer!r} (sgd only)")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            _bad("weight_decay", self.weight_decay, "a number >= 0")
        _positive("grad_clip", self.grad_clip)
        if self.train_impl not in TRAIN_IMPLS:
            _bad("train_impl", self.train_impl, f"one of {list(TRAIN_IMPLS)}")
        for name in ("latency", "compute_time", "jitter"):
            if not getattr(self, name) >= 0:
                _bad(name, getattr(self, name), "a number >= 0")
        _positive("bandwidth", self.bandwidth)
        if self.allreduce not in ALLREDUCE_ALGOS:
            _bad("allreduce", self.allreduce, f"one of {list(ALLREDUCE_ALGOS)}")
        for name in ("straggler_fraction", "churn_fraction"):
            _fraction(name, getattr(self, name))
        if not 0.0 <= self.crash_fraction < 1.0:
            _bad("crash_fraction", self.crash_fraction, "a number in [0, 1)")
        if not 0.0 <= self.drop_prob < 1.0:
            _bad("drop_prob", self.drop_prob, "a number in [0, 1)")
        if not self.straggler_slowdown >= 1.0:
            _bad("straggler_slowdown", self.straggler_slowdown, "a number >= 1")
        if self.straggler_policy not in STRAGGLER_POLICIES:
            _bad("straggler_policy", self.straggler_policy, f"one of {list(STRAGGLER_POLICIES)}")
        _at_least("crash_round", self.crash_round, 0)
        _at_least("churn_rounds", self.churn_rounds, 1)
        _at_least("actors", self.actors, 1)
        if self.actors > self.nodes:
            _bad("actors", self.actors, f"at most nodes={self.nodes}")
        if self.device not in DEVICES:
            _bad("device", self.device, f"one of {list(DEVICES)}")
        _at_least("eval_every", self.eval_every, 1)
        _at_least("eval_samples", self.eval_samples, 1)
        _at_least("threads", self.threads, 0)
        self._check_algorithm_fields()

    def _check_algorithm_fields(self) -> None:
        allowed = applicable_fields(self.algo)
        for name in sorted(ALGO_FIELDS - allowed):
            value = getattr(self, name)
            if value is not None:
                raise ValueError(f"{name}={value!r} does not apply to algo={self.algo!r} "
                                 f"(its fields: {', '.join(sorted(allowed))})")
        if self.topology is not None:
            _check_topology(self.topology)
        if self.topology_weights is not None and self.topology_weights not in TOPOLOGY_WEIGHTS:
            _bad("topology_weights", self.topology_weights, f"one of {list(TOPOLOGY_WEIGHTS)}")
        if self.vc_scope is not None:
            try:
                scope_from_spec(self.vc_scope)
            except ValueError as e:
                raise ValueError(f"vc_scope={self.vc_scope!r} is invalid: {e}") from None
        if self.algo == "noloco":
            g = self.group_size or 2
            if self.nodes % g:
                _bad("nodes", self.nodes, f"a multiple of group_size={g} for noloco")
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> SimConfig:
        """Load a TOML file (keys = field names, ``-`` or ``_``); ``overrides`` win."""
        return cls(**{**load_toml(path), **overrides})


# ----------------------------------------------------------------------------- fields


#: Algorithm config fields that are not flags: shared (seed, sync_every) or chosen by the name.
NOT_FLAGS = frozenset({"seed", "sync_every", "merge", "variance_correction"})


def _algorithm_field_names() -> set[str]:
    names: set[str] = set()
    for _, config_cls, _ in ALGORITHMS.values():
        names |= {f.name for f in dataclasses.fields(config_cls)}
    return names - NOT_FLAGS


#: SimConfig fields that belong to some algorithms only (None = not set).
ALGO_FIELDS: frozenset[str] = frozenset(
    _algorithm_field_names() | {"topology", "topology_weights", "vc_scope"})


def applicable_fields(algo: str) -> set[str]:
    """The algorithm-specific fields that ``algo`` uses."""
    _, config_cls, preset = ALGORITHMS[algo]
    names = {f.name for f in dataclasses.fields(config_cls)} - NOT_FLAGS
    if needs_topology(algo):
        names |= {"topology"}
        if preset.get("merge", "mixing") == "mixing":
            names |= {"topology_weights"}
            names -= {"self_weight"}
        if preset.get("variance_correction"):
            names |= {"vc_scope"}
        else:
            names -= {"vc_eps", "vc_ratio"}
    return names


def _field_types() -> dict[str, tuple[type, bool]]:
    """``{name: (base type, optional)}`` for every SimConfig field."""
    hints = typing.get_type_hints(SimConfig)
    out: dict[str, tuple[type, bool]] = {}
    for f in dataclasses.fields(SimConfig):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            base = next(a for a in args if a is not type(None))
            out[f.name] = (base, type(None) in args)
        else:
            out[f.name] = (hint, False)
    return out


def _check_types(cfg: SimConfig) -> None:
    for name, (base, optional) in _field_types().items():
        value = getattr(cfg, name)
        if value is None and optional:
            continue
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, name, float(value))
            continue
        ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
        if not ok:
            what = base.__name__ + (" or None" if optional else "")
            raise ValueError(f"{name}={value!r} is invalid: expected {what}")


def _bad(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"{name}={value!r} is invalid: expected {expected}")


def _positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        _bad(name, value, "a number > 0")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        _bad(name, value, f"an integer >= {low}")


def _fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        _bad(name, value, "a number in [0, 1]")


def _check_partition(spec: str) -> None:
    # The partitioners are pure and cheap: run the real parser on a dummy label set.
    inner = spec.strip()
    if inner.startswith("sample:"):
        inner = inner[len("sample:"):]
        if inner.split(":", 1)[0] not in ("iid", "dirichlet"):
            _bad("partition", spec, "'sample:iid' or 'sample:dirichlet:ALPHA'")
    try:
        _partition(inner, np.zeros(10_000, dtype=np.int64), 1, seed=0)
    except ValueError as e:
        raise ValueError(f"partition={spec!r} is invalid: {e}") from None


def _check_topology(spec: str) -> None:
    # Full checks need the node count and happen in make_topology; here: name and arity.
    name, _, rest = spec.strip().partition(":")
    if name == "file":
        if not rest:
            _bad("topology", spec, "'file:PATH'")
        return
    if name not in _TOPOLOGY_ARGS:
        _bad("topology", spec, f"one of {[*_TOPOLOGY_ARGS, 'file']} with its arguments, "
                               "e.g. 'ring', 'random-regular:4'")
    low, high = _TOPOLOGY_ARGS[name]
    count = len(rest.split(":")) if rest else 0
    if not low <= count <= high:
        _bad("topology", spec, f"{name!r} with {low}..{high} ':'-separated arguments")


# ----------------------------------------------------------------------------- CLI and files


def field_flag(name: str) -> str:
    """``local_steps`` -> ``--local-steps``."""
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "python -m simulations.run") -> argparse.ArgumentParser:
    """One flag per SimConfig field (and ``--config``); unset flags are absent from the result."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Simulate decentralized training on many virtual nodes.",
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", metavar="FILE.toml", help="load fields from a TOML file "
                        "(flags on the command line override it)")
    types_ = _field_types()
    for f in dataclasses.fields(SimConfig):
        base, _ = types_[f.name]
        default = f.default
        help_text = f.metadata.get("help", "")
        if default is not None:
            help_text += f" (default: {default})"
        if base is bool:
            parser.add_argument(field_flag(f.name), dest=f.name,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(field_flag(f.name), dest=f.name, type=base,
                                metavar=f.name.upper(), help=help_text)
    return parser


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a flat TOML file of SimConfig fields; unknown keys raise ValueError naming them."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ValueError(f"config={str(path)!r} is invalid: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"config={str(path)!r} is not valid TOML: {e}") from None
    names = {f.name for f in dataclasses.fields(SimConfig)}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            raise ValueError(f"{path}: unknown key {key!r}; known: {', '.join(sorted(names))}")
        out[name] = value
    return out


def from_args(argv: Sequence[str] | None = None) -> SimConfig:
    """Parse the command line (``sys.argv[1:]`` by default) into a validated SimConfig."""
    ns = vars(build_parser().parse_args(argv))
    config_file = ns.pop("config", None)
    base: Mapping[str, Any] = load_toml(config_file) if config_file else {}
    return SimConfig(**{**base, **ns})
