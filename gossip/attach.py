"""Attach an averaging algorithm to your own model, optimizer and training loop.

    attached = gossip.attach(model, optimizer, gossip.NoLoCoConfig(sync_every=50))
    with attached:
        for x, y in loader:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()  # one inner step; every H-th step also syncs

:func:`attach` flattens the model's parameters into the buffers the algorithms average
(:class:`gossip.flat.FlatParams`) and registers an optimizer step post-hook: each
``optimizer.step()`` is one inner step, counted from 1, and the algorithm's ``step(step)`` runs
after it, as in the project's own loop (``launch.train``). The caller counts nothing.
Like torchft's ``LocalSGD``/``DiLoCo`` context managers and torch's ``PeriodicModelAverager``.

The three ways a hand-written loop silently goes wrong, and what happens instead:

- ranks that start from different models: FedAvg, DiLoCo and NoLoCo need one shared start, so
  rank 0's parameters (frozen ones too) and buffers are broadcast at attach time; gossip
  compares a checksum with point-to-point messages only and raises naming the ranks that
  differ (or pass
  ``init="independent"``: Tian et al.'s setting, each node its own init);
- a parameter that no longer views the flat buffer (``model.double()``, ``model.to(...)``,
  ``load_state_dict(..., assign=True)`` after attach) raises before the next sync, naming it;
- buffers (BatchNorm running statistics) are synced with the parameters by default (see
  :func:`attach`), or kept per node with ``buffers="local"``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from types import TracebackType
from typing import Any, Literal

import torch
from torch import Tensor, nn

from gossip.algorithms import (
    ALGORITHMS,
    Algorithm,
    ChocoConfig,
    DiLoCoConfig,
    FedAvgConfig,
    GossipConfig,
    NoLoCoConfig,
    SyncStats,
    build_algorithm,
)
from gossip.comm.base import Communicator
from gossip.comm.torch_comm import TorchCommunicator, init_from_env
from gossip.flat import FlatParams, persistent_buffers
from gossip.topology import Topology, make_topology

__all__ = ["AlgorithmConfig", "Attached", "attach"]

#: The configs :func:`attach` accepts; the config's type picks the algorithm.
AlgorithmConfig = FedAvgConfig | DiLoCoConfig | NoLoCoConfig | GossipConfig | ChocoConfig

_BUFFER_MODES = ("average", "local")
_INIT_MODES = ("shared", "independent")

#: The open :class:`Attached` of each model and optimizer, by ``id`` (the entry checks identity,
#: so a reused id never matches): a second attach of either is refused while the first is open.
_OPEN: weakref.WeakValueDictionary[int, Attached] = weakref.WeakValueDictionary()


def _algo_name(config: object) -> str:
    """The :data:`gossip.algorithms.ALGORITHMS` entry whose config class ``config`` is."""
    for name, (_, config_cls, _) in ALGORITHMS.items():
        if type(config) is config_cls:
            return name
    known = sorted({entry[1].__name__ for entry in ALGORITHMS.values()})
    if isinstance(config, type) and config.__name__ in known:  # the class, not an instance
        raise ValueError(f"config must be an instance of one of {known}, got the class "
                         f"{config.__name__} itself: pass {config.__name__}(sync_every=...)")
    raise ValueError(f"config must be one of {known}, got {type(config).__name__}")


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: AlgorithmConfig,
    comm: Communicator | None = None,
    *,
    topology: Topology | str | None = None,
    buffers: Literal["average", "local"] = "average",
    init: Literal["shared", "independent"] = "shared",
) -> Attached:
    """Run the algorithm that ``config`` names (``FedAvgConfig`` gives FedAvg, ``DiLoCoConfig``
    DiLoCo, ``NoLoCoConfig`` NoLoCo, ``GossipConfig`` gossip, ``ChocoConfig`` CHOCO) under
    ``optimizer.step()``. A config's ``compress`` (and ``error_feedback``) applies to the
    parameters and to the buffer sync alike.

    Args:
        model: the local model, already on its device and in its final dtype. Its trainable
            parameters become views into flat buffers (same Parameter objects, new storage).
        optimizer: the inner optimizer. It may be built before or after attach (the
            parameters keep their identity), but it must hold the model's own parameters:
            any other tensor raises ``ValueError``.
        config: the algorithm and its schedule (``sync_every`` = H inner steps per sync),
            compression included.
        comm: the transport; None joins the group that torchrun describes
            (:func:`gossip.comm.init_from_env`).
        topology: gossip and CHOCO only: a :class:`gossip.topology.Topology` or a spec for
            :func:`gossip.topology.make_topology` (``"ring"``, ``"exponential"``, ...).
        buffers: ``"average"`` (default): floating-point persistent buffers (BatchNorm
            running statistics) are synced right after the parameters, at every sync: the
            mean over all nodes for FedAvg (with the same client sampling) and DiLoCo, the
            mean over the same NoLoCo group, the same gossip merge as the parameters (without
            variance correction). ``"local"``: buffers stay per node. Integer buffers
            (``num_batches_tracked``) are never averaged.
        init: ``"shared"`` (default): one shared start. FedAvg, DiLoCo and NoLoCo broadcast rank
            0's parameters (frozen ones too: they are never averaged) and persistent buffers
            now; gossip, which sends no collective, compares a checksum of them by
            point-to-point messages and raises ``ValueError`` naming the ranks that differ from
            rank 0. ``"independent"``: gossip only, each
            node keeps its own init (the setting variance correction is designed for).

    Returns:
        An :class:`Attached`; use it as a context manager, or call :meth:`Attached.close`, to
        remove the hook.
    """
    algo = _algo_name(config)
    cls = ALGORITHMS[algo][0]
    if buffers not in _BUFFER_MODES:
        raise ValueError(f"buffers must be one of {list(_BUFFER_MODES)}, got {buffers!r}")
    if init not in _INIT_MODES:
        raise ValueError(f"init must be one of {list(_INIT_MODES)}, got {init!r}")
    if init == "independent" and cls.same_init:
        raise ValueError(f"init='independent' is for gossip only: {type(config).__name__} needs "
                         "one shared start (rank 0's model is broadcast)")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got "
                         f"{type(optimizer).__name__}")
    _check_not_attached(model, optimizer)
    _check_optimizer(model, optimizer, ValueError)
    _check_devices(model, None)
    if cls.needs_topology and topology is None:
        raise ValueError(f"topology is required for {type(config).__name__}: a gossip.Topology "
                         "or a spec such as 'ring'")
    if not cls.needs_topology and topology is not None:
        raise ValueError(f"topology is only used by gossip, not by {type(config).__name__}, "
                         f"got {topology!r}")

    if comm is None:
        comm = init_from_env()
    if comm.nodes.numel() != 1:
        raise ValueError(f"comm must hold one node per process (a real rank), got "
                         f"{comm.nodes.numel()} nodes")
    _check_devices(model, getattr(comm, "backend", None))
    n = comm.world_size
    if isinstance(topology, str):
        topology = make_topology(topology, n)
    # what the algorithms' constructors would refuse, refused before the model is touched
    if topology is not None and topology.n != n:
        raise ValueError(f"topology has n={topology.n} nodes, the run has {n}")
    if isinstance(config, NoLoCoConfig) and n % config.group_size:
        raise ValueError(f"group_size={config.group_size} must divide the number of nodes N={n}")
    _check_same_config(comm, algo, config, buffers, init, topology,
                       next((p.device for p in model.parameters()), torch.device("cpu")))
    params = FlatParams.from_module(model)
    flat_buffers = FlatParams.from_buffers(model) if buffers == "average" else None
    if init == "shared":  # frozen parameters too: never averaged, so they must start equal
        frozen = [q for q in model.parameters() if not q.requires_grad]
        state = [*params.buffers(), *frozen, *persistent_buffers(model).values()]
        if cls.same_init:
            for t in state:
                _broadcast_from_rank0_(comm, t)
        else:
            _check_same_start(comm, state, params.groups[0].buffer.device)
    algorithm = build_algorithm(algo, config, params, comm, topology=topology)
    buffer_sync = None
    if flat_buffers is not None:
        buffer_algo, buffer_config = _buffer_sync_config(algo, config)
        buffer_sync = build_algorithm(buffer_algo, buffer_config, flat_buffers, comm,
                                      topology=topology)
    return Attached(model, optimizer, algorithm, cls.name, comm, params, flat_buffers,
                    buffer_sync, config.sync_every)


def _check_not_attached(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """A second attach would re-flatten the parameters under the first one (whose check then
    fails with a misleading message) and run two algorithms per step: refused."""
    for obj, what in ((model, "model"), (optimizer, "optimizer")):
        prev = Attached.of(obj)
        if prev is not None:
            raise ValueError(f"{what} is already attached ({prev.algo}, step {prev.step}) and "
                             "that Attached still syncs at every optimizer.step(), also when no "
                             "variable holds it any more: close it before attaching again "
                             f"(leave its with block, or gossip.Attached.of({what}).close())")


def _check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer,
                     error: type[Exception]) -> None:
    """Every tensor the optimizer steps must be one of the model's parameters."""
    own = {id(p) for p in model.parameters()}
    for i, group in enumerate(optimizer.param_groups):
        for j, p in enumerate(group["params"]):
            if id(p) not in own:
                raise error(
                    f"optimizer.param_groups[{i}]['params'][{j}] (shape {tuple(p.shape)}) is not "
                    "a parameter of model: build the optimizer over model.parameters() of the "
                    "model you attach (not a copy), and add no other tensor to it afterwards "
                    "(add_param_group): it would never be averaged")


def _check_devices(model: nn.Module, backend: str | None) -> None:
    """Refuse, naming the tensor, a model the transport cannot send: parameters or buffers on
    the meta device (no data yet), or off CUDA under NCCL (which moves CUDA tensors only);
    persistent buffers too (the shared start sends them)."""
    for kind, named in (("parameter", dict(model.named_parameters())),
                        ("buffer", persistent_buffers(model))):
        for name, t in named.items():
            if t.device.type == "meta":
                raise ValueError(
                    f"{kind} {name!r} is on the meta device (it holds no data): materialize the "
                    "model before attach (model.to_empty(device=...) and initialise it, or load "
                    "a state_dict with assign=True)")
            if backend == "nccl" and t.device.type != "cuda":
                raise ValueError(
                    f"{kind} {name!r} is on {t.device}, but the process group is NCCL, which "
                    "sends CUDA tensors only: move the model to this rank's GPU before attach "
                    "(model.to(torch.device('cuda', local_rank))), or pass "
                    "comm=gossip.init_from_env(backend='gloo')")


def _buffer_sync_config(algo: str, config: AlgorithmConfig) -> tuple[str, Any]:
    """The algorithm that averages the buffers the way ``config`` averages the parameters."""
    if isinstance(config, DiLoCoConfig):  # the global mean, without the outer optimizer
        return "fedavg", FedAvgConfig(sync_every=config.sync_every, compress=config.compress,
                                      error_feedback=config.error_feedback)
    if isinstance(config, NoLoCoConfig):  # the mean over the same group, without momentum
        return algo, dataclasses.replace(config, alpha=0.0, beta=1.0, gamma=1.0)
    if isinstance(config, GossipConfig):  # the same merge; variance correction is for weights
        return algo, dataclasses.replace(config, variance_correction=False)
    # FedAvg: the same weighted mean over the same sampled clients; CHOCO: the same step
    return algo, config


def _broadcast_from_rank0_(comm: Communicator, t: Tensor) -> None:
    """Set ``t`` on every node to node 0's ``t``, bit for bit, with the protocol's weighted mean
    (weight 1 on node 0, 0 elsewhere: the others contribute exact zeros)."""
    weight = (comm.nodes == 0).to(torch.float64)
    if t.is_floating_point() and t.dim() == 2 and t.shape[0] == 1:  # a flat buffer [1, P]
        comm.all_reduce_mean_(t, weight)
        return
    # any other tensor travels as float64, exact for every float and every integer below 2**53
    x = t.detach().reshape(1, -1).to(torch.float64)
    comm.all_reduce_mean_(x, weight)
    with torch.no_grad():
        t.copy_(x.view(t.shape))


def _digest(tensors: list[Tensor]) -> Tensor:
    """SHA-256 of the tensors' bytes, as int64 [1, 4]."""
    h = hashlib.sha256()
    for t in tensors:
        data = t.detach().cpu().contiguous().reshape(-1)
        h.update(str(data.dtype).encode())
        h.update(data.view(torch.uint8).numpy().tobytes())
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.int64).reshape(1, 4)


def _differ_from_rank0(comm: Communicator, digest: Tensor, what: str) -> list[int]:
    """The ranks whose ``digest`` [1, 4] differs from rank 0's.

    Every node sends its digest to every other (point to point, no collective), so every rank
    sees all of them and returns the same list.
    """
    n = comm.world_size
    peers = torch.tensor([[j for j in range(n) if j != i] for i in range(n)], dtype=torch.long)
    received, arrived = comm.exchange(digest, peers)
    rank = int(comm.nodes[0])
    digests: dict[int, Tensor] = {rank: digest[0].cpu()}
    for slot, j in enumerate(peers[rank].tolist()):
        if not bool(arrived[0, slot]):
            raise RuntimeError(f"rank {rank} got no {what} checksum from rank {j}")
        digests[j] = received[0, slot].cpu()
    return [r for r in range(n) if not torch.equal(digests[r], digests[0])]


def _check_same_config(comm: Communicator, algo: str, config: AlgorithmConfig, buffers: str,
                       init: str, topology: Topology | None, device: torch.device) -> None:
    """Raise ``ValueError`` on every rank if any rank attaches another algorithm, config,
    buffer or init mode, or topology than rank 0: their syncs would not pair up (a sync_every
    that differs paired the wrong steps silently; another algorithm aborted Gloo)."""
    if comm.world_size == 1:
        return
    text = f"{algo}|{config!r}|buffers={buffers}|init={init}"
    tensors = [torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)]
    if topology is not None:  # the graph, not its name (a ring of 2 is every 2-node graph)
        text += f"|topology={topology.spec}"
        tensors += list(topology.peer_table(0))
        if topology.time_varying:  # later steps' graphs follow from the spec
            tensors.append(torch.frombuffer(bytearray(topology.spec.encode()), dtype=torch.uint8))
    differ = _differ_from_rank0(comm, _digest(tensors).to(device), "config")
    if differ:
        raise ValueError(
            f"ranks {differ} attach with another configuration than rank 0 (the algorithm, its "
            f"config, buffers, init and topology must agree on every rank); this rank has "
            f"{text}")


def _check_same_start(comm: Communicator, tensors: list[Tensor], device: torch.device) -> None:
    """Raise ``ValueError`` naming the ranks whose model differs from rank 0's (every rank
    raises the same error)."""
    # where the transport sends from (NCCL: the GPU)
    differ = _differ_from_rank0(comm, _digest(tensors).to(device), "model")
    if differ:
        raise ValueError(
            f"ranks {differ} start from a different model than rank 0 (checksums of the "
            "parameters and buffers differ): seed the model's init the same on every rank, or "
            "pass init='independent' if each node should keep its own init")


class Attached:
    """An algorithm attached to an optimizer by :func:`attach`.

    Each ``optimizer.step()`` advances :attr:`step` by one and runs the algorithm's
    ``step(step)``; every ``sync_every``-th step syncs (parameters, then buffers), after
    checking that every parameter still views the flat buffer.

    Attributes:
        step: inner steps taken since attach (the last one passed to the algorithm).
        last_stats: what the last sync did (None before the first).
        bytes_sent: model bytes this rank sent in all syncs since attach (parameters and
            buffers; the start-up broadcast or checksum is not counted).
        algorithm: the algorithm object (its ``state_dict`` is part of :meth:`state_dict`).
        params: the flat parameter buffers.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, algorithm: Algorithm,
                 algo: str, comm: Communicator, params: FlatParams,
                 flat_buffers: FlatParams | None, buffer_sync: Algorithm | None,
                 sync_every: int) -> None:
        self.model = model
        self.optimizer = optimizer
        self.algorithm = algorithm
        self.algo = algo
        self.comm = comm
        self.params = params
        self._flat_buffers = flat_buffers
        self._buffer_sync = buffer_sync
        self._sync_every = sync_every
        self.step = 0
        self.last_stats: SyncStats | None = None
        self.bytes_sent = 0
        self._handle: Any = optimizer.register_step_post_hook(self._after_step)
        _OPEN[id(model)] = _OPEN[id(optimizer)] = self

    @classmethod
    def of(cls, obj: nn.Module | torch.optim.Optimizer) -> Attached | None:
        """The open Attached of a model or optimizer (None if it has none), e.g. to close one
        whose handle was dropped: the optimizer's hook keeps it syncing (like a torch hook whose
        handle is dropped), so dropping it neither stops the syncs nor frees the model."""
        found = _OPEN.get(id(obj))
        if found is not None and found.attached and obj in (found.model, found.optimizer):
            return found
        return None

    @property
    def attached(self) -> bool:
        """Whether ``optimizer.step()`` still drives the algorithm."""
        return self._handle is not None

    def close(self, *, flush: bool = True) -> None:
        """Remove the hook: later ``optimizer.step()`` calls train locally and never sync.
        With ``flush`` (the default) an overlapped outer step still in flight is applied first
        (:meth:`gossip.algorithms.Algorithm.flush`), so the model holds every update."""
        if self._handle is None:
            return
        if flush:
            self.algorithm.flush()
        self._handle.remove()
        self._handle = None

    def __enter__(self) -> Attached:
        if self._handle is None:  # its steps would train locally, silently never synced
            raise RuntimeError("this Attached is closed: optimizer.step() no longer syncs; "
                               "call gossip.attach again to sync again")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close(flush=exc_type is None)  # after an error, nothing more is waited for

    def check(self) -> None:
        """Raise ``RuntimeError`` naming any parameter or buffer that no longer views the flat
        buffers (see :meth:`gossip.flat.FlatParams.check_views`), or any tensor the optimizer
        steps that is not one of the model's parameters (``add_param_group`` after attach).
        Runs before every sync."""
        self.params.check_views(dict(self.model.named_parameters()))
        _check_optimizer(self.model, self.optimizer, RuntimeError)
        if self._flat_buffers is not None:
            self._flat_buffers.check_views()

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        step = self.step
        if isinstance(self.comm, TorchCommunicator):
            self.comm.step = step  # named in communication errors
        if step % self._sync_every == 0:
            self.check()
        stats = self.algorithm.step(step)
        if stats is None:
            return
        if self._buffer_sync is not None:
            extra = self._buffer_sync.step(step)
            if extra is not None:
                stats.seconds += extra.seconds
                stats.bytes_sent += extra.bytes_sent
                stats.extra["buffer_bytes"] = float(extra.bytes_sent)
        self.bytes_sent += stats.bytes_sent
        self.last_stats = stats

    def state_dict(self) -> dict[str, Any]:
        """The step counter and the algorithm's state (and the buffer sync's): save it with
        the model's and the optimizer's ``state_dict()`` to resume bit-exactly."""
        return {
            "algo": self.algo,
            "step": self.step,
            "bytes_sent": self.bytes_sent,
            "algorithm": self.algorithm.state_dict(),
            "buffers": None if self._buffer_sync is None else self._buffer_sync.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (after attach; load the model's and the optimizer's
        state too, the model's without ``assign=True``)."""
        if state.get("algo") != self.algo:
            raise ValueError(f"state was saved by algo={state.get('algo')!r}, this is "
                             f"algo={self.algo!r}")
        if (state["buffers"] is None) != (self._buffer_sync is None):
            saved = "local" if state["buffers"] is None else "average"
            raise ValueError(f"state was saved with buffers={saved!r}, this has the other mode")
        self.algorithm.load_state_dict(state["algorithm"])
        if self._buffer_sync is not None:
            self._buffer_sync.load_state_dict(state["buffers"])
        self.step = int(state["step"])
        self.bytes_sent = int(state["bytes_sent"])
