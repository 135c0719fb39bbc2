"""The run spec both executors share: one frozen dataclass of the fields every run has, and ONE
table of defaults.

``launch.config.TrainConfig`` (real runs) and ``simulations.config.SimConfig`` (simulated runs)
both extend :class:`RunSpec`, so a flag has one name, one meaning and one default in both CLIs.
Fields left at None mean "the default for this algorithm and task", filled in by
:meth:`RunSpec.resolved` once the task and the number of nodes are known:

========== ================ ============================= =================================
algo       inner optimizer  sync_every (H)                topology
========== ================ ============================= =================================
fedavg     task default     FedAvgConfig (10)             -
diloco     AdamW            :data:`SYNC_EVERY` (50)       -
noloco     Adam             NoLoCoConfig (50)             - (random groups of group_size)
dpsgd,     task default     GossipConfig (1)              :func:`default_topology`
gossip,
gossip-vc
choco      task default     ChocoConfig (1)               :func:`default_topology`
========== ================ ============================= =================================

Inner lr: :data:`TUNED_LR` first, else the task's default lr when the optimizer is (of the family
of) the task's default one, else :data:`DEFAULT_LR` (1e-3 for optimizers not listed there).

Flags that two algorithms read differently carry the algorithm's name: ``--noloco-beta`` is
NoLoCo's outer learning rate, ``--gossip-beta`` the gossip merge's self weight,
``--noloco-gamma`` NoLoCo's pull and ``--choco-gamma`` CHOCO's consensus step size (each
algorithm config keeps the paper's symbol: ``NoLoCoConfig.beta``, ``GossipConfig.self_weight``,
``ChocoConfig.gamma``). ``--compress`` and ``--error-feedback`` are every algorithm's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from gossip.algorithms import (
    ALGORITHMS,
    ChocoConfig,
    GossipConfig,
    NoLoCoConfig,
    make_config,
    needs_topology,
)
from gossip.configs import FileConfig, bad, check_positive, check_types, help_text
from gossip.data import partition as _partition
from gossip.flat import scope_from_spec
from gossip.tasks import INITS, TASK_NAMES

__all__ = [
    "ALGO_FIELDS",
    "DEFAULT_INNER_OPTIMIZER",
    "DEFAULT_LR",
    "FLAG_FIELDS",
    "OPTIMIZERS",
    "RENAMED",
    "SCHEDULES",
    "SYNC_EVERY",
    "TUNED_LR",
    "AlgorithmOptions",
    "RunSpec",
    "applicable_fields",
    "check_finite",
    "check_topology",
    "default_topology",
    "optimizer_class",
]

# ----------------------------------------------------------------------------- the defaults

#: Optimizer shorthands (any ``torch.optim`` class name or ``package.module:Class`` works too).
OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
#: Inner optimizer each algorithm defaults to (absent = the task's default optimizer).
DEFAULT_INNER_OPTIMIZER: dict[str, str] = {"diloco": "adamw", "noloco": "adam"}
#: Inner learning rates tuned here (4 ranks, 300 steps, H = 10 reach >= 92% on digits; the
#: task's own default_lr, 0.05, reaches 88.6% with FedAvg). Looked up first.
TUNED_LR: dict[tuple[str, str], float] = {
    ("digits", "sgd"): 0.2, ("digits", "adam"): 3e-3, ("digits", "adamw"): 3e-3,
    # linear regression, noise 0.1 (optimum MSE 0.01): Adam at 1e-3 is still at MSE 11 after
    # 200 steps; 0.1 reaches 0.012 with DiLoCo (SGD 0.05, the task's default, reaches 0.010).
    ("synthetic", "adam"): 0.1, ("synthetic", "adamw"): 0.1}
#: Learning rate for an optimizer that is not the task's default one (and not tuned).
DEFAULT_LR = {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3}
#: H where a run's default differs from the algorithm config's own default. DiLoCo's paper H
#: (500, ``DiLoCoConfig``) is longer than a default run (300 steps): it would never sync.
SYNC_EVERY: dict[str, int] = {"diloco": 50}
#: Inner learning-rate schedules (see :mod:`gossip.run.schedule`).
SCHEDULES = ("constant", "cosine", "warmup", "warmup-cosine")

#: Option flags that two algorithms read differently: (config class, field) -> flag.
RENAMED: dict[tuple[type, str], str] = {
    (NoLoCoConfig, "alpha"): "noloco_alpha", (NoLoCoConfig, "beta"): "noloco_beta",
    (NoLoCoConfig, "gamma"): "noloco_gamma", (GossipConfig, "self_weight"): "gossip_beta",
    (ChocoConfig, "gamma"): "choco_gamma"}
#: The renamed option flags and the config field each one sets.
FLAG_FIELDS: dict[str, str] = {flag: name for (_, name), flag in RENAMED.items()}
#: Algorithm config fields that are not option flags: shared (seed) or chosen by the algo name.
NOT_FLAGS = frozenset({"seed", "merge", "variance_correction"})
TOPOLOGY_WEIGHTS = ("metropolis", "uniform")
#: Arguments each topology name takes (see gossip.topology.make_topology).
_TOPOLOGY_ARGS = {
    "ring": (0, 0), "torus": (0, 1), "random-regular": (1, 1), "erdos-renyi": (1, 1),
    "small-world": (2, 2), "star": (0, 0), "complete": (0, 0), "exponential": (0, 0),
    "one-peer-exponential": (0, 0), "matching": (0, 0),
}


def default_topology(nodes: int) -> str:
    """The gossip family's topology when none is given, real or simulated: a random 8-regular
    graph (fast mixing at any size), or a ring below 9 nodes (where 8-regular is impossible)."""
    return "random-regular:8" if nodes >= 9 else "ring"


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True, kw_only=True)
class AlgorithmOptions:
    """algorithm options (None = the algorithm's default)

    Each sets one field of the algorithm's config (``--noloco-beta`` sets ``NoLoCoConfig.beta``,
    ``--gossip-beta`` sets ``GossipConfig.self_weight``, the others the field of the same name);
    a field the chosen algorithm does not use must stay None.
    """

    sync_every: int | None = field(default=None, metadata=help_text(
        "inner steps between syncs (H); default: the algorithm's (diloco: 50)"))
    outer_lr: float | None = field(default=None, metadata=help_text("diloco: outer SGD lr"))
    outer_momentum: float | None = field(default=None, metadata=help_text(
        "diloco: outer SGD momentum"))
    nesterov: bool | None = field(default=None, metadata=help_text("diloco: Nesterov outer SGD"))
    noloco_alpha: float | None = field(default=None, metadata=help_text(
        "noloco: outer momentum alpha"))
    noloco_beta: float | None = field(default=None, metadata=help_text(
        "noloco: outer lr beta"))
    noloco_gamma: float | None = field(default=None, metadata=help_text(
        "noloco: pull gamma to the group's phi"))
    group_size: int | None = field(default=None, metadata=help_text(
        "noloco: nodes per group (must divide the number of nodes)"))
    client_fraction: float | None = field(default=None, metadata=help_text(
        "fedavg: fraction of the nodes (ranks) sampled per round"))
    gossip_beta: float | None = field(default=None, metadata=help_text(
        "gossip, gossip-vc: self weight beta of the merge"))
    choco_gamma: float | None = field(default=None, metadata=help_text(
        "choco: consensus step size gamma"))
    vc_eps: float | None = field(default=None, metadata=help_text(
        "gossip-vc: variance ratio guard"))
    vc_ratio: float | None = field(default=None, metadata=help_text(
        "gossip-vc: partial correction (1 = full)"))
    vc_scope: str | None = field(default=None, metadata=help_text(
        "gossip-vc: tensors rescaled: weights | all | none | re:REGEX (default: weights)"))
    topology: str | None = field(default=None, metadata=help_text(
        "dpsgd, gossip, gossip-vc, choco: NAME[:ARGS], e.g. ring, random-regular:4, exponential "
        "(default: random-regular:8, ring below 9 nodes)"))
    topology_weights: str | None = field(default=None, metadata=help_text(
        "dpsgd, choco: mixing weights of static graphs: metropolis | uniform (default: "
        "metropolis)"))
    compress: str | None = field(default=None, metadata=help_text(
        "what every sync sends: none | bf16 | fp16 | int8[:BLOCK] | int8-sr[:BLOCK] | "
        "fp8[:BLOCK] | topk:RATIO | randk:RATIO (default: none)"))
    error_feedback: bool | None = field(default=None, metadata=help_text(
        "carry what compression did not send into the next sync (default: off)"))
    overlap: bool | None = field(default=None, metadata=help_text(
        "diloco, noloco: run each outer exchange behind the next H inner steps and apply its "
        "update one outer step late (default: off)"))
    fragments: int | None = field(default=None, metadata=help_text(
        "diloco, noloco: sync the model in F staggered fragments, one every H/F steps "
        "(default: 1)"))


@dataclass(frozen=True, kw_only=True)
class RunSpec(AlgorithmOptions, FileConfig):
    """The fields every run has, real or simulated. None = the algorithm's or task's default."""

    algo: str = field(default="fedavg", metadata=help_text(f"one of {sorted(ALGORITHMS)}"))
    task: str = field(default="digits", metadata=help_text(
        f"one of {list(TASK_NAMES)}, or package.module:function returning a gossip.tasks.Task"))
    seed: int = field(default=0, metadata=help_text(
        "seeds data split, partition, model init, data order, pairings, ..."))
    init: str = field(default="default", metadata=help_text(
        "model init: default (the task's) | xavier (Xavier-uniform weights, zero biases)"))
    partition: str = field(default="iid", metadata=help_text(
        "iid | dirichlet:ALPHA | shards:K | quantity:ALPHA (disjoint shards); simulator only: "
        "sample:iid | sample:dirichlet:ALPHA (each node draws its own, overlapping shard)"))
    batch_size: int | None = field(default=None, metadata=help_text("default: the task's"))
    optimizer: str | None = field(default=None, metadata=help_text(
        "inner optimizer: sgd | adam | adamw | any torch.optim class (RMSprop, "
        "torch.optim.Adagrad) | package.module:Class; default: AdamW for diloco, Adam for "
        "noloco, else the task's"))
    optimizer_args: str | None = field(default=None, metadata=help_text(
        "JSON object of extra optimizer keyword arguments, e.g. '{\"alpha\": 0.9}'"))
    lr: float | None = field(default=None, metadata=help_text("inner learning rate (peak)"))
    momentum: float = field(default=0.0, metadata=help_text("sgd: momentum"))
    weight_decay: float | None = field(default=None, metadata=help_text(
        "inner weight decay (default: the optimizer's)"))
    grad_clip: float | None = field(default=None, metadata=help_text(
        "clip each node's gradient norm to this value (default: off)"))
    schedule: str = field(default="constant", metadata=help_text(
        f"inner lr schedule over a node's own steps: {' | '.join(SCHEDULES)}"))
    warmup_steps: int = field(default=0, metadata=help_text(
        "warmup, warmup-cosine: steps of linear warm-up from 0 to lr"))
    tensorboard: bool = field(default=False, metadata=help_text(
        "also write the metrics as TensorBoard scalars under OUT/tensorboard (extra 'track')"))
    overwrite: bool = field(default=False, metadata=help_text(
        "start fresh in an --out that holds another run: its files (only those) are removed "
        "first"))

    def __post_init__(self) -> None:
        check_types(self)
        if self.algo not in ALGORITHMS:
            bad("algo", self.algo, f"one of {sorted(ALGORITHMS)}")
        if self.task not in TASK_NAMES and ":" not in self.task:
            bad("task", self.task, f"one of {list(TASK_NAMES)} or 'package.module:function'")
        if not 0 <= self.seed < 2**62:  # per-node seeds add the node id; int64 everywhere
            bad("seed", self.seed, "an integer in [0, 2**62)")
        if self.init not in INITS:
            bad("init", self.init, f"one of {list(INITS)}")
        check_partition(self.partition)
        check_positive("batch_size", self.batch_size)
        if self.optimizer is not None:
            optimizer_class(self.optimizer)
        optimizer_kwargs(self.optimizer_args)
        check_finite("lr", self.lr)
        check_positive("lr", self.lr)
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", self.momentum, "a number in [0, 1)")
        if self.momentum and self.optimizer not in (None, "sgd"):
            bad("momentum", self.momentum, f"0 with optimizer={self.optimizer!r} (sgd only; "
                                           "use --optimizer-args for others)")
        if self.weight_decay is not None and not (math.isfinite(self.weight_decay)
                                                  and self.weight_decay >= 0):
            bad("weight_decay", self.weight_decay, "a finite number >= 0")
        check_finite("grad_clip", self.grad_clip)
        check_positive("grad_clip", self.grad_clip)
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, f"one of {list(SCHEDULES)}")
        if self.warmup_steps < 0:
            bad("warmup_steps", self.warmup_steps, "an integer >= 0")
        if self.warmup_steps and not self.schedule.startswith("warmup"):
            bad("warmup_steps", self.warmup_steps,
                f"0 with schedule={self.schedule!r} (or schedule='warmup'/'warmup-cosine')")
        self._check_algorithm_fields()

    # ------------------------------------------------------------------ algorithm fields

    def _check_algorithm_fields(self) -> None:
        allowed = applicable_fields(self.algo)
        for name in sorted(ALGO_FIELDS - allowed):
            value = getattr(self, name)
            if value is not None:
                raise ValueError(f"{name}={value!r} does not apply to algo={self.algo!r} "
                                 f"(its fields: {', '.join(sorted(allowed))})")
        for name in ALGO_FIELDS:
            value = getattr(self, name)
            if isinstance(value, float):
                check_finite(name, value)
        if self.topology is not None:
            check_topology(self.topology)
        if self.topology_weights is not None and self.topology_weights not in TOPOLOGY_WEIGHTS:
            bad("topology_weights", self.topology_weights, f"one of {list(TOPOLOGY_WEIGHTS)}")
        if self.vc_scope is not None:
            try:
                scope_from_spec(self.vc_scope)
            except ValueError as e:
                raise ValueError(f"vc_scope={self.vc_scope!r} is invalid: {e}") from None
        self.algorithm_config()  # the algorithm's own checks name field and value

    def algorithm_config(self, sync_every: int | None = None) -> Any:
        """The algorithm's config (``FedAvgConfig``, ...): the option flags mapped to its
        fields, H = ``sync_every`` (default: this spec's, else :data:`SYNC_EVERY`, else the
        config's own default), None fields at the config's defaults."""
        config_cls = ALGORITHMS[self.algo][1]
        fields = {name: getattr(self, _flag(config_cls, name))
                  for name in _config_fields(config_cls)}
        if sync_every is None:
            sync_every = self.sync_every
        fields["sync_every"] = SYNC_EVERY.get(self.algo) if sync_every is None else sync_every
        try:
            return make_config(self.algo, **fields, seed=self.seed)
        except ValueError as e:  # the config names its field: say the flag the user set
            message = str(e)
            for (cls, name), flag in RENAMED.items():
                if cls is config_cls and re.match(rf"{name}\b(?!_)", message):
                    raise ValueError(flag + message[len(name):]) from None
            raise

    # ------------------------------------------------------------------ defaults

    def resolved(self, task: Any, nodes: int) -> Any:
        """A copy with every None default filled in for ``task`` (a :class:`gossip.tasks.Task`)
        and ``nodes`` nodes (ranks): the one table of defaults of this module."""
        optimizer = self.optimizer or DEFAULT_INNER_OPTIMIZER.get(self.algo) \
            or task.default_optimizer
        lr = self.lr
        if lr is None:
            lr = TUNED_LR.get((task.name, optimizer))
        if lr is None:
            adaptive = {"adam", "adamw"}
            same_family = optimizer == task.default_optimizer or (
                optimizer in adaptive and task.default_optimizer in adaptive)
            lr = task.default_lr if same_family else DEFAULT_LR.get(optimizer, 1e-3)
        fields = applicable_fields(self.algo)
        return dataclasses.replace(
            self,
            optimizer=optimizer,
            lr=float(lr),
            batch_size=self.batch_size or task.default_batch_size,
            sync_every=self.resolved_sync_every(),
            topology=(self.topology or default_topology(nodes)) if "topology" in fields else None,
            topology_weights=(self.topology_weights or "metropolis")
            if "topology_weights" in fields else None,
            vc_scope=(self.vc_scope or "weights") if "vc_scope" in fields else None,
        )

    def resolved_sync_every(self) -> int | None:
        """H once defaults are filled in (an executor may derive it otherwise: None)."""
        return int(self.algorithm_config().sync_every)

    def optimizer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of the inner optimizer: lr, weight decay, momentum, and
        ``optimizer_args`` (which win)."""
        kwargs: dict[str, Any] = {"lr": self.lr}
        if self.weight_decay is not None:
            kwargs["weight_decay"] = self.weight_decay
        if self.momentum:
            kwargs["momentum"] = self.momentum
        return {**kwargs, **optimizer_kwargs(self.optimizer_args)}


# ----------------------------------------------------------------------------- fields


def _config_fields(config_cls: type) -> set[str]:
    """The fields of an algorithm config that option flags set."""
    return {f.name for f in dataclasses.fields(config_cls)} - NOT_FLAGS


def _flag(config_cls: type, name: str) -> str:
    """The option flag (field of :class:`AlgorithmOptions`) that sets field ``name``."""
    return RENAMED.get((config_cls, name), name)


#: RunSpec fields that belong to some algorithms only (None = not set); sync_every is every
#: algorithm's.
ALGO_FIELDS: frozenset[str] = frozenset(
    {_flag(config_cls, n) for _, config_cls, _ in ALGORITHMS.values()
     for n in _config_fields(config_cls)}
    | {"topology", "topology_weights", "vc_scope"})


def applicable_fields(algo: str) -> set[str]:
    """The option flags (field names of :class:`AlgorithmOptions`) that ``algo`` uses."""
    _, config_cls, preset = ALGORITHMS[algo]
    names = _config_fields(config_cls)
    if needs_topology(algo):
        names |= {"topology"}
        if preset.get("merge", "mixing") == "mixing":
            names |= {"topology_weights"}
            names -= {"self_weight"}
        if preset.get("variance_correction"):
            names |= {"vc_scope"}
        else:
            names -= {"vc_eps", "vc_ratio"}
    return {_flag(config_cls, n) for n in names}


# ----------------------------------------------------------------------------- checks


def check_finite(name: str, value: float | None) -> None:
    """None passes; anything else must be a finite number (not inf, not nan)."""
    if value is not None and not math.isfinite(value):
        bad(name, value, "a finite number")


@functools.lru_cache(maxsize=64)
def check_partition(spec: str) -> None:
    """A partition the partitioners accept (``sample:*`` included; the simulator's). Cached: a
    spec is checked once per process, not on every copy of a config."""
    inner = spec.strip()
    if inner.startswith("sample:"):
        inner = inner[len("sample:"):]
        if inner.split(":", 1)[0] not in ("iid", "dirichlet"):
            bad("partition", spec, "'sample:iid' or 'sample:dirichlet:ALPHA'")
    # The partitioners are pure and cheap: run the real parser on a dummy label set.
    try:
        _partition(inner, np.zeros(10_000, dtype=np.int64), 1, seed=0)
    except ValueError as e:
        raise ValueError(f"partition={spec!r} is invalid: {e}") from None


def check_topology(spec: str) -> None:
    """A known topology name with the right number of ``:``-separated arguments.

    Full checks need the world size (see gossip.topology.make_topology).
    """
    name, _, rest = spec.strip().partition(":")
    if name == "file":
        if not rest:
            bad("topology", spec, "'file:PATH'")
        return
    if name not in _TOPOLOGY_ARGS:
        bad("topology", spec, f"one of {[*_TOPOLOGY_ARGS, 'file']} with its arguments, "
                              "e.g. 'ring', 'random-regular:4'")
    low, high = _TOPOLOGY_ARGS[name]
    count = len(rest.split(":")) if rest else 0
    if not low <= count <= high:
        bad("topology", spec, f"{name!r} with {low}..{high} ':'-separated arguments")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class ``name`` means: a shorthand (sgd, adam, adamw), a ``torch.optim``
    class name (``RMSprop``), a dotted path (``torch.optim.RMSprop``) or ``module:Class``."""
    target = OPTIMIZERS.get(name, name)
    if ":" in target:
        module, _, attr = target.partition(":")
    elif "." in target:
        module, _, attr = target.rpartition(".")
    else:
        module, attr = "torch.optim", target
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        bad("optimizer", name, f"one of {list(OPTIMIZERS)}, a torch.optim class name or "
                               "'package.module:Class'")
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        bad("optimizer", name, "a torch.optim.Optimizer subclass")
    closure = inspect.signature(cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        bad("optimizer", name, "an optimizer whose step() needs no closure (the training loops "
                               "call optimizer.step() once per batch; LBFGS re-evaluates the "
                               "loss through a closure)")
    return cls


def optimizer_kwargs(text: str | None) -> dict[str, Any]:
    """``--optimizer-args`` (a JSON object) as a dict."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"optimizer_args={text!r} is invalid: not JSON ({e})") from None
    if not isinstance(value, dict):
        bad("optimizer_args", text, "a JSON object, e.g. '{\"alpha\": 0.9}'")
    return value
