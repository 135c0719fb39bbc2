"""The simulator: many virtual nodes running the library's algorithms, stacked in one process.

``python -m simulations.run --algo gossip-vc --nodes 64 --partition dirichlet:0.5 --out runs/x``
runs one configuration; ``python -m simulations.compare`` compares FedAvg, DiLoCo, NoLoCo,
D-PSGD and variance-corrected gossip on one non-IID task. The pieces: :mod:`.config`
(:class:`SimConfig`), :mod:`.engine` (:class:`Simulation`, :func:`drive`), :mod:`.run`
(:func:`run`: picks the runner), :mod:`.training`
(vectorized local training), :mod:`.evaluate` (test metrics: a global model once, else a
seeded sample of nodes in one vectorized forward), :mod:`.network` (simulated time),
:mod:`.faults`, :mod:`.memory` (the size estimate checked before a build), :mod:`.threads`
(the automatic torch thread count); plots are in :mod:`gossip.plots`.

Importing this package imports nothing else (``SimConfig`` is loaded on first use), so that
``python -m simulations.run`` can pause the garbage collector before torch is imported
(:mod:`simulations.run`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from simulations.config import SimConfig

__all__ = ["SimConfig"]


def __getattr__(name: str) -> Any:
    if name == "SimConfig":
        from simulations.config import SimConfig

        return SimConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
