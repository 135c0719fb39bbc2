"""The averaging algorithms, each one object that runs on a real rank and in the simulator.

Every algorithm takes a frozen config, the local model rows (:class:`gossip.flat.FlatParams`) and a
:class:`gossip.comm.Communicator`, and exposes ``step(step, active=None) -> SyncStats | None``
(call it after every inner optimizer step), ``state_dict()`` and ``load_state_dict()``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Protocol

from torch import Tensor

from gossip.algorithms._common import SyncStats
from gossip.algorithms.choco import Choco, ChocoConfig
from gossip.algorithms.diloco import DiLoCo, DiLoCoConfig
from gossip.algorithms.fedavg import FedAvg, FedAvgConfig
from gossip.algorithms.gossip import Gossip, GossipConfig
from gossip.algorithms.noloco import NoLoCo, NoLoCoConfig
from gossip.comm.base import Communicator
from gossip.flat import FlatParams
from gossip.topology import Topology

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "Choco",
    "ChocoConfig",
    "DiLoCo",
    "DiLoCoConfig",
    "FedAvg",
    "FedAvgConfig",
    "Gossip",
    "GossipConfig",
    "NoLoCo",
    "NoLoCoConfig",
    "SyncStats",
    "build_algorithm",
    "make_config",
    "needs_topology",
    "same_init",
]


class Algorithm(Protocol):
    """What an executor (a real rank's loop, the simulator) may use of an algorithm object.

    Attributes:
        global_model: one model shared by all nodes (FedAvg, DiLoCo): a node that was down
            pulls it at the next sync; else every node keeps its own model and state.
        one_model: optional (False when absent): right after each sync every node holds the
            same whole model (FedAvg; DiLoCo without streaming fragments, whose other fragments
            stay local), so the simulator evaluates one row for all of them and reports a
            consensus distance of 0.
        same_init: the nodes start from one model (else from independent inits).
        needs_topology: the constructor takes a :class:`gossip.topology.Topology`.
    """

    global_model: ClassVar[bool]
    same_init: ClassVar[bool]
    needs_topology: ClassVar[bool]

    def step(self, step: int, active: Tensor | None = None) -> SyncStats | None:
        """Call after inner step ``step`` (1-based); ``active`` [L] masks rows out."""
        ...

    def sampled(self, round_index: int) -> Tensor | None:
        """The N nodes that take part in sync ``round_index`` (0-based), None = all."""
        ...

    def state_rows(self) -> list[Tensor]:
        """Every per-node state tensor [L, ...] besides the model rows (phi, momentum, ...):
        what must stay untouched on a node that is down. May grow after a sync (lazy state)."""
        ...

    def flush(self) -> None:
        """Apply any outer step still in flight (``overlap=True``): call once after the last
        step, so the final model holds every update. A no-op for the others."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# name -> (class, config class, preset fields)
ALGORITHMS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "fedavg": (FedAvg, FedAvgConfig, {}),
    "diloco": (DiLoCo, DiLoCoConfig, {}),
    "noloco": (NoLoCo, NoLoCoConfig, {}),
    "dpsgd": (Gossip, GossipConfig, {"merge": "mixing"}),
    "gossip": (Gossip, GossipConfig, {"merge": "beta"}),
    "gossip-vc": (Gossip, GossipConfig, {"merge": "beta", "variance_correction": True}),
    "choco": (Choco, ChocoConfig, {}),
}


def _entry(algo: str) -> tuple[type, type, dict[str, Any]]:
    if algo not in ALGORITHMS:
        raise ValueError(f"algo must be one of {sorted(ALGORITHMS)}, got {algo!r}")
    return ALGORITHMS[algo]


def make_config(algo: str, /, **fields: Any) -> Any:
    """The config of ``algo`` from a flat set of fields (e.g. a launcher's config).

    Fields the config does not have, and fields that are None (= use the default), are ignored.
    A field that contradicts what ``algo`` itself sets (``make_config("dpsgd", merge="beta")``,
    ``make_config("gossip-vc", variance_correction=False)``) raises ValueError: the preset
    would silently win.
    """
    _, config_cls, preset = _entry(algo)
    names = {f.name for f in dataclasses.fields(config_cls)}
    chosen = {k: v for k, v in fields.items() if k in names and v is not None}
    for k, v in preset.items():
        if k in chosen and chosen[k] != v:
            raise ValueError(f"{k}={chosen[k]!r} contradicts algo={algo!r}, which sets "
                             f"{k}={v!r}: pick the algorithm that has it, one of "
                             f"({sorted(a for a, e in ALGORITHMS.items() if e[1] is config_cls)})")
    return config_cls(**{**chosen, **preset})


def needs_topology(algo: str) -> bool:
    """Whether ``algo`` runs over a topology (the gossip family, CHOCO)."""
    return bool(_entry(algo)[0].needs_topology)


def same_init(algo: str) -> bool:
    """Whether the algorithm's nodes start from one shared model (else independent inits)."""
    return bool(_entry(algo)[0].same_init)


def build_algorithm(
    algo: str,
    config: Any,
    params: FlatParams,
    comm: Communicator,
    *,
    topology: Topology | None = None,
    weight: Tensor | None = None,
) -> Algorithm:
    """Construct ``algo`` with its config over ``params`` and ``comm``."""
    cls, config_cls, _ = _entry(algo)
    if not isinstance(config, config_cls):
        raise ValueError(f"config for {algo!r} must be {config_cls.__name__}, got "
                         f"{type(config).__name__}")
    if cls.needs_topology:
        if topology is None:
            raise ValueError(f"algo {algo!r} needs a topology")
        return cls(config, params, comm, topology)
    if cls is FedAvg:
        return FedAvg(config, params, comm, weight=weight)
    return cls(config, params, comm)
