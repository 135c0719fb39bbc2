"""A group of Ray actors that behave like torchrun's worker processes.

``WorkerGroup`` starts W actors (``cpus_per_worker`` CPUs each, ``gpus_per_worker`` GPUs each),
puts in every actor's environment what torchrun would: RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT (actor 0's node IP and a port it found free), then
runs functions in all of them and gathers the results in rank order. Code that joins a
torch.distributed group with ``init_method="env://"`` (e.g. :func:`gossip.comm.init_from_env`)
therefore runs unchanged, as in Ray Train's torch backend.

Every wait is bounded: if a rank raises or its actor dies, the whole group is killed at once and
:class:`WorkerGroupError` names the rank; a run that outlives its timeout fails the same way with
the ranks that had not finished. A rank that is *frozen* (stopped with SIGSTOP, swapped out, or
hung holding Python's lock) is not dead to Ray and may never finish: every actor counts a
heartbeat into Ray's key-value store once a second from a thread of its own, and a rank whose
count stands still for ``heartbeat_s`` while a call runs is named as frozen and the group torn
down, long before its peers' collectives time out (where the error would name a peer). (Not a
ping through a concurrency group of the actor: that would run every call off the actor's main
thread, where code that installs signal handlers, as ``launch.train`` does, fails.) Nothing ever
blocks forever on a dead or frozen peer.

With whole GPUs per actor, the actors of one node all see the node's GPUs of the group (in
LOCAL_RANK order, as under torchrun), so ``cuda:LOCAL_RANK`` is the actor's own GPU. With a
fraction of a GPU per actor, each actor sees only its GPU, as ``cuda:0``. Either way
:func:`cuda_device_index` inside an actor returns the index of its own GPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import ray
from ray.experimental import internal_kv
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from gossip.allocator import reuse_freed_memory

__all__ = [
    "WorkerGroup",
    "WorkerGroupConfig",
    "WorkerGroupError",
    "WorkerInfo",
    "cuda_device_index",
    "ensure_ray",
    "run_on_workers",
    "worker_state",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

_POLL_S = 1.0  # how often a wait wakes up to notice dead actors and deadlines
_BEAT_S = 1.0  # how often an actor counts a heartbeat
_KV_NAMESPACE = "raytools-heartbeats"
_GRACE_S = 2.0  # after a first failure, how long to wait for its cause to surface


class WorkerGroupError(RuntimeError):
    """A rank failed, died or timed out; the group has been torn down.

    Attributes:
        ranks: the ranks that failed (the first one is the first failure seen).
    """

    def __init__(self, message: str, *, ranks: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.ranks = tuple(ranks)


@dataclass(frozen=True, kw_only=True)
class WorkerGroupConfig:
    """How many actors, what each one gets, and how long anything may take.

    Args:
        num_workers: W, the number of actors (ranks).
        cpus_per_worker: logical CPUs reserved per actor.
        gpus_per_worker: GPUs per actor: 0, a fraction (actors share a GPU) or a whole number.
        address: None starts a local cluster (if Ray is not initialised yet); "auto" joins the
            cluster on this machine; "ray://host:port" or "host:port" joins that one.
        start_timeout_s: how long the actors may take to be placed and started.
        timeout_s: default bound on one :meth:`WorkerGroup.run` (None: no bound beyond the
            failure of a rank).
        env: extra environment variables for every actor (set before the first function runs;
            the torchrun variables win over them).
        working_dir: the actors' working directory (default: the driver's, when it exists on
            the actor's node).
        placement_strategy: "PACK" (fill nodes one by one, like torchrun) or "SPREAD".
        heartbeat_s: how long a rank running a call may go without a heartbeat before it is
            declared frozen (None: never). A busy rank beats on time (the beat runs on its own
            thread; torch and NumPy release Python's lock in their kernels, and Python code
            yields it every 5 ms), so only a stopped process or one stuck in native code that
            holds the lock misses beats.
    """

    num_workers: int
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None
    start_timeout_s: float = 120.0
    timeout_s: float | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    working_dir: str | None = None
    placement_strategy: str = "PACK"
    heartbeat_s: float | None = 30.0

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker < 0:
            raise ValueError(f"cpus_per_worker must be >= 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ValueError("gpus_per_worker must be a fraction <= 1 or a whole number, got "
                             f"{self.gpus_per_worker}")
        if self.start_timeout_s <= 0:
            raise ValueError(f"start_timeout_s must be > 0, got {self.start_timeout_s}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 or None, got {self.timeout_s}")
        if self.heartbeat_s is not None and not self.heartbeat_s > 0:
            raise ValueError(f"heartbeat_s must be > 0 or None, got {self.heartbeat_s}")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ValueError("placement_strategy must be PACK, SPREAD, STRICT_PACK or "
                             f"STRICT_SPREAD, got {self.placement_strategy!r}")


@dataclass(frozen=True)
class WorkerInfo:
    """Where a rank runs and what torchrun-style environment it was given."""

    rank: int
    local_rank: int
    local_world_size: int
    node_id: str
    node_ip: str
    pid: int
    gpu_ids: tuple[str, ...]


def ensure_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    object_store_bytes: int | None = None,
) -> bool:
    """Initialise Ray unless it already is; return True if this call started it.

    ``address=None`` starts a new local cluster (never silently joins another one on the
    machine); "auto" joins the running cluster. ``num_cpus``, ``num_gpus`` and
    ``object_store_bytes`` only size a local cluster.
    """
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    if address is None:
        kwargs.update(address="local", num_cpus=num_cpus, num_gpus=num_gpus,
                      object_store_memory=object_store_bytes)
    else:
        kwargs["address"] = address
    ray.init(**kwargs)
    return True


_STATE: dict[str, Any] = {}


def worker_state() -> dict[str, Any]:
    """A dict that lives as long as the actor process: state kept between ``run`` calls."""
    return _STATE


def cuda_device_index() -> int:
    """Inside an actor with a GPU: the CUDA index of that GPU among the visible devices."""
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if not gpu_ids:
        raise RuntimeError("this actor was given no GPU (gpus_per_worker=0)")
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v]
    return visible.index(gpu_ids[0]) if gpu_ids[0] in visible else 0


def _beat(key: bytes) -> None:
    """An actor's heartbeat: a count in Ray's key-value store, one more every second."""
    count = 0
    while True:
        count += 1
        with contextlib.suppress(Exception):  # (a beat lost now and then is no verdict)
            internal_kv._internal_kv_put(key, str(count).encode(), overwrite=True,
                                         namespace=_KV_NAMESPACE)
        time.sleep(_BEAT_S)


class _Worker:
    """One rank. A plain class; :class:`WorkerGroup` wraps it with ``ray.remote``."""

    def __init__(self, rank: int, working_dir: str | None, beat_key: bytes) -> None:
        self.rank = rank
        threading.Thread(target=_beat, args=(beat_key,), daemon=True,
                         name="raytools-heartbeat").start()
        reuse_freed_memory()  # as launch.train does (gossip.allocator)
        if working_dir is not None and os.path.isdir(working_dir):
            os.chdir(working_dir)
        os.environ["RANK"] = str(rank)

    def __repr__(self) -> str:  # Ray prefixes the actor's log lines with this
        return f"rank{self.rank}"

    def info(self) -> tuple[str, str, int, tuple[str, ...]]:
        ctx = ray.get_runtime_context()
        return (ctx.get_node_id(), ray.util.get_node_ip_address(), os.getpid(),
                tuple(str(g) for g in ray.get_gpu_ids()))

    def free_port(self) -> int:
        host = ray.util.get_node_ip_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def set_env(self, env: Mapping[str, str]) -> None:
        os.environ.update(env)

    def execute(self, fn: Callable[..., Any], args: tuple[Any, ...],
                kwargs: Mapping[str, Any]) -> Any:
        try:
            return fn(*args, **kwargs)
        except SystemExit as e:  # sys.exit() would kill the actor and lose the reason
            if e.code in (None, 0):
                return None
            raise RuntimeError(f"rank {self.rank} called sys.exit({e.code!r})") from None


class WorkerGroup:
    """W Ray actors with torchrun's environment; ``run`` calls a function in all of them.

    Use as a context manager (or call :meth:`shutdown`): the actors, their placement group and,
    if this group started it, the local Ray cluster are released on exit.
    """

    def __init__(self, config: WorkerGroupConfig) -> None:
        self.config = config
        self._owns_ray = ensure_ray(
            config.address,
            num_cpus=max(os.cpu_count() or 1, math.ceil(config.num_workers
                                                        * config.cpus_per_worker)),
            num_gpus=None,
        )
        self._actors: list[Any] = []
        self._pg: PlacementGroup | None = None
        self._beats = f"{uuid.uuid4().hex}/"  # this group's heartbeat keys
        self.workers: list[WorkerInfo] = []
        try:
            self._start()
        except BaseException:
            self.shutdown()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.config
        w = cfg.num_workers
        bundle: dict[str, float] = {"CPU": cfg.cpus_per_worker}
        if cfg.gpus_per_worker:
            bundle["GPU"] = cfg.gpus_per_worker
        self._pg = placement_group([dict(bundle) for _ in range(w)],
                                   strategy=cfg.placement_strategy)
        ready, _ = ray.wait([self._pg.ready()], timeout=cfg.start_timeout_s)
        if not ready:
            have = ray.cluster_resources()
            raise WorkerGroupError(
                f"could not reserve {w} x {bundle} within {cfg.start_timeout_s} s "
                f"(cluster resources: CPU={have.get('CPU', 0)}, GPU={have.get('GPU', 0)})")

        actor_cls = ray.remote(_Worker)
        working_dir = cfg.working_dir if cfg.working_dir is not None else os.getcwd()
        for rank, bundle_index in enumerate(_ranked_bundles(self._pg)):
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=bundle_index)
            self._actors.append(actor_cls.options(
                num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                scheduling_strategy=strategy, max_restarts=0, max_task_retries=0,
            ).remote(rank, working_dir, self._beat_key(rank)))

        infos = self._gather_all([a.info.remote() for a in self._actors], cfg.start_timeout_s,
                                 "start")
        port = self._gather_all([self._actors[0].free_port.remote()], cfg.start_timeout_s,
                                "start", ranks=[0])[0]
        by_node: dict[str, list[int]] = {}
        for rank, (node_id, _, _, _) in enumerate(infos):
            by_node.setdefault(node_id, []).append(rank)
        master_addr = infos[0][1]

        envs: list[dict[str, str]] = []
        for rank, (node_id, ip, pid, gpu_ids) in enumerate(infos):
            peers = by_node[node_id]
            info = WorkerInfo(rank=rank, local_rank=peers.index(rank),
                              local_world_size=len(peers), node_id=node_id, node_ip=ip,
                              pid=pid, gpu_ids=gpu_ids)
            self.workers.append(info)
            env = {
                **cfg.env,
                "RANK": str(rank),
                "WORLD_SIZE": str(w),
                "LOCAL_RANK": str(info.local_rank),
                "LOCAL_WORLD_SIZE": str(info.local_world_size),
                "GROUP_RANK": str(list(by_node).index(node_id)),
                "MASTER_ADDR": master_addr,
                "MASTER_PORT": str(port),
            }
            if not cfg.gpus_per_worker:
                env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU reserved: use none
            elif cfg.gpus_per_worker >= 1:
                # torchrun's view: every local rank sees the node's GPUs; cuda:LOCAL_RANK is its own
                visible: list[str] = []
                for peer in peers:
                    visible += [g for g in infos[peer][3] if g not in visible]
                env["CUDA_VISIBLE_DEVICES"] = ",".join(visible)
            envs.append(env)
        self._gather([a.set_env.remote(e) for a, e in zip(self._actors, envs, strict=True)],
                     cfg.start_timeout_s, "start")
        log.info("started %d Ray workers on %d node(s); master %s:%d", w, len(by_node),
                 master_addr, port)

    def new_master_port(self) -> int:
        """Give the group a fresh MASTER_PORT (before each new process group on reused actors)."""
        if not self._actors:
            raise WorkerGroupError("the worker group has been shut down")
        timeout = self.config.start_timeout_s
        port = int(self._gather_all([self._actors[0].free_port.remote()], timeout,
                                    "new_master_port", ranks=[0])[0])
        self._gather([a.set_env.remote({"MASTER_PORT": str(port)}) for a in self._actors],
                     timeout, "new_master_port")
        return port

    def shutdown(self) -> None:
        """Kill every actor, drop the placement group, and stop Ray if this group started it."""
        for actor in self._actors:
            with contextlib.suppress(Exception):  # already dead is fine
                ray.kill(actor, no_restart=True)
        self._actors = []
        with contextlib.suppress(Exception):  # (Ray may be down already)
            internal_kv._internal_kv_del(self._beats, del_by_prefix=True, namespace=_KV_NAMESPACE)
        if self._pg is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(self._pg)
            self._pg = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def world_size(self) -> int:
        return self.config.num_workers

    @property
    def alive(self) -> bool:
        return bool(self._actors)

    # -- running --------------------------------------------------------------------------

    def run(self, fn: Callable[..., T], *args: Any, timeout_s: float | None = None,
            **kwargs: Any) -> list[T]:
        """Call ``fn(*args, **kwargs)`` in every rank; return the results in rank order.

        ``fn`` must be picklable (a module-level function, importable on the actors). On the
        first failure (an exception, a dead actor, the timeout) every actor is killed and
        :class:`WorkerGroupError` names the rank.
        """
        return self.run_each(fn, [args] * self.world_size, timeout_s=timeout_s, kwargs=kwargs)

    def run_each(self, fn: Callable[..., T], args_per_rank: Sequence[tuple[Any, ...]], *,
                 timeout_s: float | None = None, kwargs: Mapping[str, Any] | None = None,
                 what: str | None = None) -> list[T]:
        """Like :meth:`run`, with its own positional arguments for each rank; ``what`` names the
        call in errors (default: the function's name)."""
        refs, bound, name = self._submit(fn, args_per_rank, timeout_s, kwargs, what)
        results, _ = self._gather(refs, bound, name, heartbeat=self.config.heartbeat_s)
        return [results[r] for r in range(self.world_size)]

    def run_survivors(self, fn: Callable[..., T], args_per_rank: Sequence[tuple[Any, ...]], *,
                      timeout_s: float | None = None, kwargs: Mapping[str, Any] | None = None,
                      what: str | None = None) -> tuple[dict[int, T], dict[int, str]]:
        """Like :meth:`run_each` for work that survives the loss of ranks (``launch.train
        --survive-failures``): a rank that raises, dies or freezes does not stop the others.

        Returns the results of the ranks that finished and, for each other rank, why it did
        not ("died", "raised: ...", "frozen"). A frozen rank (no heartbeat for ``heartbeat_s``)
        is killed once every other rank is done, as ``launch.spawn`` does; the
        timeout still tears everything down. If any rank failed, the group is shut down at the
        end (its dead actors could not run another call)."""
        refs, bound, name = self._submit(fn, args_per_rank, timeout_s, kwargs, what)
        results, failures = self._gather(refs, bound, name, heartbeat=self.config.heartbeat_s,
                                         keep_going=True)
        if failures:
            self.shutdown()
        return results, failures

    def _submit(self, fn: Callable[..., Any], args_per_rank: Sequence[tuple[Any, ...]],
                timeout_s: float | None, kwargs: Mapping[str, Any] | None, what: str | None
                ) -> tuple[list[Any], float | None, str]:
        if not self._actors:
            raise WorkerGroupError("the worker group has been shut down")
        if len(args_per_rank) != self.world_size:
            raise ValueError(f"args_per_rank has {len(args_per_rank)} entries, world size is "
                             f"{self.world_size}")
        fn_ref = ray.put(fn)
        refs = [a.execute.remote(fn_ref, tuple(args), dict(kwargs or {}))
                for a, args in zip(self._actors, args_per_rank, strict=True)]
        bound = timeout_s if timeout_s is not None else self.config.timeout_s
        return refs, bound, what or getattr(fn, "__qualname__", repr(fn))

    def _gather_all(self, refs: list[Any], timeout_s: float | None, what: str,
                    ranks: Sequence[int] | None = None) -> list[Any]:
        """:meth:`_gather`'s results in the order of ``ranks`` (the start-up calls)."""
        results, _ = self._gather(refs, timeout_s, what, ranks)
        return [results[r] for r in (range(len(refs)) if ranks is None else ranks)]

    def _gather(self, refs: list[Any], timeout_s: float | None, what: str,
                ranks: Sequence[int] | None = None, heartbeat: float | None = None,
                keep_going: bool = False) -> tuple[dict[int, Any], dict[int, str]]:
        """Wait for ``refs`` (one per rank of ``ranks``): their results, and (``keep_going``
        only; otherwise the first failure raises) why the failed ranks failed."""
        ranks = list(range(len(refs))) if ranks is None else list(ranks)
        rank_of = {ref: r for ref, r in zip(refs, ranks, strict=True)}
        results: dict[int, Any] = {}
        failures: list[tuple[int, BaseException]] = []
        pending = list(refs)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        beats: dict[int, tuple[bytes | None, float]] = {}  # rank -> (its count, seen when)
        while pending:
            wait_s = _POLL_S if deadline is None else max(0.0, min(_POLL_S,
                                                                   deadline - time.monotonic()))
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=wait_s)
            self._collect(done, rank_of, results, failures)
            if failures and not keep_going:
                # a dead rank's peers often fail first ("connection reset"): give the cause a
                # moment to arrive, then report it
                grace_end = time.monotonic() + _GRACE_S
                while pending and time.monotonic() < grace_end:
                    done, pending = ray.wait(pending, num_returns=len(pending),
                                             timeout=max(0.0, grace_end - time.monotonic()))
                    self._collect(done, rank_of, results, failures)
                self._fail(what, failures)
            if pending and heartbeat is not None:
                frozen = self._silent([rank_of[r] for r in pending], beats, heartbeat)
                if frozen and not keep_going:
                    self.shutdown()
                    raise WorkerGroupError(f"{what}: {_frozen_message(frozen, heartbeat)}; the "
                                           f"worker group was shut down", ranks=frozen)
                if frozen and len(frozen) == len(pending):  # the others are done: kill them
                    for rank in frozen:
                        with contextlib.suppress(Exception):
                            ray.kill(self._actors[rank], no_restart=True)
                    log.warning("%s: %s; killed them once every other rank was done", what,
                                _frozen_message(frozen, heartbeat))
                    failures += [(r, _Frozen()) for r in frozen]
                    pending = []
            if pending and deadline is not None and time.monotonic() >= deadline:
                late = sorted(rank_of[r] for r in pending)
                self.shutdown()
                raise WorkerGroupError(f"{what}: rank(s) {late} did not finish within "
                                       f"{timeout_s} s; the worker group was shut down",
                                       ranks=late)
        return results, {rank: _why(err) for rank, err in failures}

    def _beat_key(self, rank: int) -> bytes:
        return f"{self._beats}{rank}".encode()

    def _silent(self, ranks: list[int], beats: dict[int, tuple[bytes | None, float]],
                heartbeat: float) -> list[int]:
        """The ranks in ``ranks`` whose heartbeat count has not moved for ``heartbeat`` seconds
        of this driver's clock (``beats``: each rank's last count and when it was first seen)."""
        now = time.monotonic()
        silent = []
        for rank in ranks:
            try:
                count = internal_kv._internal_kv_get(self._beat_key(rank),
                                                     namespace=_KV_NAMESPACE)
            except Exception:  # the store did not answer this time: no verdict on anyone
                return []
            last = beats.get(rank)
            if last is None or last[0] != count:
                beats[rank] = (count, now)
            elif now - last[1] >= heartbeat:
                silent.append(rank)
        return silent

    @staticmethod
    def _collect(done: list[Any], rank_of: Mapping[Any, int], results: dict[int, Any],
                 failures: list[tuple[int, BaseException]]) -> None:
        for ref in done:
            try:
                results[rank_of[ref]] = ray.get(ref)
            except Exception as e:  # reported with the rank
                failures.append((rank_of[ref], e))

    def _fail(self, what: str, failures: list[tuple[int, BaseException]]) -> None:
        # the likely cause first: a dead actor, then an error of its own, then a peer's symptom
        failures.sort(key=lambda f: (_severity(f[1]), f[0]))
        rank, err = failures[0]
        died = isinstance(err, ray.exceptions.RayActorError)
        detail = str(err)  # a task error carries the rank's traceback
        self.shutdown()
        verb = "died" if died else "failed"
        others = [r for r, _ in failures[1:]]
        also = f" (also failed: ranks {others})" if others else ""
        raise WorkerGroupError(f"{what}: rank {rank} {verb}{also}; the worker group was shut "
                               f"down.\n{detail}", ranks=[rank, *others]) from err


class _Frozen(Exception):
    """A rank that stopped answering heartbeats (for :meth:`WorkerGroup.run_survivors`)."""


def _frozen_message(ranks: list[int], heartbeat: float) -> str:
    return (f"rank(s) {ranks} stopped answering: no heartbeat for {heartbeat} s "
            f"while the call ran (the process is frozen, e.g. stopped with SIGSTOP, or stuck in "
            f"native code holding Python's lock)")


def _why(err: BaseException) -> str:
    """How a rank failed, in a word and its cause: "died", "frozen" or "raised: ..."."""
    if isinstance(err, _Frozen):
        return "frozen"
    if isinstance(err, ray.exceptions.RayActorError):
        return "died"
    cause = getattr(err, "cause", err)
    return f"raised: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


_PEER_SYMPTOMS = ("Connection reset by peer", "Connection closed by peer", "gloo/transport",
                  "NCCL communicator was aborted", "Socket Timeout", "timed out")


def _severity(err: BaseException) -> int:
    """0: the actor died; 1: the rank raised; 2: the rank lost a peer (a symptom, not a cause)."""
    if isinstance(err, ray.exceptions.RayActorError):
        return 0
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException):
        is_dist = type(cause).__name__ in ("DistError", "DistBackendError", "DistNetworkError",
                                           "DistStoreError", "PeerFailure", "CommTimeout")
        if is_dist or any(s in str(cause) for s in _PEER_SYMPTOMS):
            return 2
    return 1


def _ranked_bundles(pg: PlacementGroup) -> list[int]:
    """Bundle indices in rank order: node by node (as torchrun numbers ranks), the driver's
    node first, so that rank 0 (which writes the run directory) runs beside the driver."""
    where: dict[int, str] = placement_group_table(pg).get("bundles_to_node_id", {})
    bundles = list(range(len(pg.bundle_specs)))
    if len(where) != len(bundles):
        return bundles
    here = ray.get_runtime_context().get_node_id()
    first_seen: dict[str, int] = {}
    for b in bundles:
        first_seen.setdefault(where[b], b)
    return sorted(bundles, key=lambda b: (where[b] != here, first_seen[where[b]], b))


def run_on_workers(fn: Callable[..., T], config: WorkerGroupConfig, *args: Any,
                   timeout_s: float | None = None, **kwargs: Any) -> list[T]:
    """Start a :class:`WorkerGroup`, run ``fn`` once in every rank, tear it down."""
    with WorkerGroup(config) as group:
        return group.run(fn, *args, timeout_s=timeout_s, **kwargs)
