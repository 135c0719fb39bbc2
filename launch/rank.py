"""What one real rank needs besides the loop: its process group, device, batches and metrics.

:func:`join_process_group` (torchrun restarts on one node), :func:`pick_device`,
:class:`ShardStream` (this rank's batches, the simulator's schedule), :func:`evaluate`,
:func:`consensus` (one all-reduce), and :func:`agree` (an error on any rank is every rank's).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from datetime import timedelta
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from gossip.batching import StackedBatches
from gossip.comm import CommTimeout, TorchCommunicator, init_from_env
from gossip.comm.torch_comm import STORE_PREFIX_ENV
from gossip.flat import FlatParams
from gossip.tasks import Task, TaskData
from launch.config import TrainConfig

__all__ = ["LOCAL_FIELDS", "RunError", "ShardStream", "agree", "check_same_config",
           "configure_logging", "consensus", "derived_seed", "evaluate", "free_port",
           "join_process_group", "leave", "pick_device", "roll_call", "single_process_env",
           "test_set"]


class RunError(ValueError):
    """An error every rank agrees on (so only rank 0 reports it)."""


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of ints (e.g. (seed, rank, purpose))."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ShardStream:
    """This rank's batches: :func:`gossip.batching.node_batch` over its shard (drawn through a
    one-node :class:`~gossip.batching.StackedBatches`, which keeps the epoch's permutation).

    The schedule is a pure function of (seed, rank, step), the very one a simulated node with the
    same id follows, so real runs and simulations see the same samples. ``state()`` is the
    number of batches taken (all a checkpoint needs to resume the order).
    """

    def __init__(self, task: Task, indices: np.ndarray, batch_size: int, seed: int, node: int,
                 device: torch.device) -> None:
        if len(indices) == 0:
            raise ValueError("the shard is empty")
        self.data = task.data
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.node = node
        self.device = device
        self.taken = 0
        self._batches = StackedBatches([self.indices], [node], batch_size, seed=seed)

    def state(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state(self, state: dict[str, int]) -> None:
        self.taken = int(state["taken"])

    def next(self) -> tuple[Tensor, Tensor]:
        idx = self._batches.batch(self.taken)[0]
        self.taken += 1
        x, y = self.data.train_batch(idx)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def pick_device(cfg: TrainConfig, backend: str) -> torch.device:
    want_cuda = cfg.device == "cuda" or backend == "nccl" or (
        cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RunError(f"device={cfg.device!r} with backend={backend!r} needs CUDA, which is "
                       "not available")
    index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def test_set(task: Task, device: torch.device) -> tuple[Tensor, Tensor]:
    """The task's whole test set (x, y) on ``device`` (a DatasetData's collated once)."""
    data = task.data
    if isinstance(data, TaskData):
        return data.x_test.to(device), data.y_test.to(device)
    chunks = list(data.test_chunks(1024))
    return (torch.cat([x for x, _ in chunks]).to(device),
            torch.cat([y for _, y in chunks]).to(device))


def evaluate(task: Task, model: nn.Module, x: Tensor, y: Tensor, chunk: int = 1024
             ) -> dict[str, float]:
    """The task's metrics of ``model`` on (x, y), already on the model's device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = torch.cat([model(x[i : i + chunk]) for i in range(0, len(x), chunk)])
        return task.metrics(out, y)
    finally:
        model.train(was_training)


def consensus(params: FlatParams, comm: TorchCommunicator) -> tuple[float, Tensor]:
    """Mean squared distance of the ranks' models to their mean, and the mean (fp64, flat).

    One all-reduce mean of ``[x, ||x||^2]`` in float64 (the difference of two large numbers),
    through the communicator (its timeout, its errors naming rank and peers).
    """
    x = torch.cat([b.detach().reshape(-1).to(torch.float64) for b in params.buffers()])
    packed = torch.cat([x, (x * x).sum().reshape(1)])
    comm.all_reduce_mean_(packed)
    mean = packed[:-1]
    mean_sq = float(packed[-1])
    distance = mean_sq - float(mean.dot(mean))
    # Below the rounding error of the subtraction (identical models) it is zero.
    if distance <= 1e-12 * mean_sq:
        distance = 0.0
    return distance, mean


#: Fields a rank may set for itself: its machine's paths and device, how long it waits.
LOCAL_FIELDS = frozenset({"out", "device", "timeout", "dead_after"})


def check_same_config(config: dict[str, Any]) -> None:
    """Raise :class:`RunError` on every rank if any rank got other flags than rank 0 (a field
    outside :data:`LOCAL_FIELDS`): ``launch.spawn`` on several machines takes the flags once
    per machine, and ranks that disagree on, say, ``sync_every`` pair the wrong steps' syncs
    until Gloo aborts on a size mismatch."""
    configs: list[dict[str, Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(configs, config)
    ref = configs[0]
    assert ref is not None
    differ: dict[str, list[int]] = {}
    for rank, theirs in enumerate(configs):
        assert theirs is not None
        for name in sorted(set(theirs) | set(ref)):
            if name not in LOCAL_FIELDS and theirs.get(name) != ref.get(name):
                differ.setdefault(name, []).append(rank)
    if differ:
        listed = "; ".join(f"{name}: rank 0 has {ref.get(name)!r}, ranks {ranks} differ"
                           for name, ranks in differ.items())
        raise RunError(f"the ranks were started with different flags ({listed}): give every "
                       "rank the same ones")


def agree(fn: Any) -> Any:
    """Run ``fn`` on every rank; if any rank raises ValueError, every rank raises RunError."""
    error: str | None = None
    result = None
    try:
        result = fn()
    except ValueError as e:
        error = str(e)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise RunError(first)
    return result


def join_process_group(backend: str | None, timeout: float, *, survive: bool = False,
                       dead_after: float = 5.0) -> TorchCommunicator:
    """``init_from_env`` after a roll call that names the ranks that never arrive, made safe for
    ``torchrun --max-restarts`` on one node.

    Roll call: before the process group forms, each rank sets a key of its own in the rendezvous
    store (:func:`roll_call`); a rank that has not seen every key within ``timeout`` raises
    :class:`gossip.comm.CommTimeout` naming the ranks that never joined (frozen, dead or never
    started), where Gloo would time out naming none.

    torchrun's workers share the rendezvous TCPStore across restarts (TORCHELASTIC_USE_AGENT_STORE),
    so after a restart a rank can read a dead peer's address left by the previous attempt and
    the Gloo/NCCL connect fails or hangs (pytorch/pytorch#135712). On one node every worker sees
    the same TORCHELASTIC_RESTART_COUNT, so the group's keys are put under a per-attempt prefix.
    Across nodes the counts can differ: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun.
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        rank = int(env["RANK"])
        store, own = _rendezvous_store(rank, world, timeout)
        roll_call(store, rank, world, timeout)
        if own:  # the group forms on this store (init_from_env then finds it formed)
            if backend is None:
                backend = "nccl" if torch.cuda.is_available() and not survive else "gloo"
            kwargs: dict[str, Any] = {}
            if backend == "nccl":
                local_rank = int(env.get("LOCAL_RANK", "0"))
                torch.cuda.set_device(local_rank)
                kwargs["device_id"] = torch.device("cuda", local_rank)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=timeout), **kwargs)
    return init_from_env(backend, timeout=timeout, survive_peer_failures=survive,
                         dead_after=dead_after)


def _rendezvous_store(rank: int, world: int, timeout: float) -> tuple[dist.Store, bool]:
    """The store of this attempt's rendezvous, and whether the group must be formed on it here.

    A launcher's hosted store (launch.spawn, Ray: :data:`STORE_PREFIX_ENV`) and torchrun's agent
    store are joined as a client (``init_from_env`` forms the group on them, except after a
    torchrun restart on one node: see :func:`join_process_group`); otherwise rank 0 hosts it, as
    ``env://`` would."""
    env = os.environ
    addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    wait = timedelta(seconds=timeout)
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    try:
        if STORE_PREFIX_ENV in env:
            client = dist.TCPStore(addr, port, is_master=False, timeout=wait)
            return dist.PrefixStore(env[STORE_PREFIX_ENV], client), False
        if env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            client = dist.TCPStore(addr, port, is_master=False, timeout=wait)
            one_node = env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE")
            return dist.PrefixStore(f"gossip/restart_{restart}", client), (
                one_node and restart != "0")
        base = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=wait,
                             wait_for_workers=False)
        return dist.PrefixStore(f"gossip/restart_{restart}", base), True
    except (RuntimeError, OSError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        host = "rank 0" if STORE_PREFIX_ENV not in env and env.get(
            "TORCHELASTIC_USE_AGENT_STORE") != "True" else "the launcher"
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = ("cannot serve the rendezvous store on" if host == "rank 0" and rank == 0 else
                f"cannot reach the rendezvous store (hosted by {host}) at")
        raise CommTimeout(f"start-up: {what} {addr}:{port} within timeout={timeout:g} s: "
                          f"{first}", rank=rank, peers=(0,) if host == "rank 0" and rank else (),
                          step=0) from None


def roll_call(store: dist.Store, rank: int, world: int, timeout: float) -> None:
    """Say this rank has arrived (key ``gossip/joined/<rank>``) and wait until all ``world`` ranks
    have; past ``timeout`` s raise :class:`gossip.comm.CommTimeout` naming the ranks that never
    arrived (one wait on the store, then one check per rank only on the way out)."""
    keys = [f"gossip/joined/{r}" for r in range(world)]
    store.set(keys[rank], str(os.getpid()))
    try:
        store.wait(keys, timedelta(seconds=timeout))
        return
    except RuntimeError:  # DistStoreError: a timeout
        pass
    missing = tuple(r for r, key in enumerate(keys) if not store.check([key]))
    if not missing:  # the last arrived as the wait ended
        return
    shown = (f"{list(missing)}" if len(missing) <= 20
             else f"{list(missing[:20])} and {len(missing) - 20} more")
    raise CommTimeout(f"start-up: rank(s) {shown} of {world} never joined the process group "
                      f"within timeout={timeout:g} s (frozen, dead or never started); every "
                      "rank must be started with the same WORLD_SIZE and rendezvous address",
                      rank=rank, peers=missing, step=0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def single_process_env() -> None:
    """Outside torchrun (no ``RANK``): torchrun's environment for a world of one process."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())})


def configure_logging(rank: int) -> None:
    """INFO from rank 0, warnings from the others, each line naming its rank (stderr)."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stderr,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", force=True)


def leave(status: int) -> NoReturn:
    """Exit the process with ``status`` once its logs are flushed, skipping the interpreter's
    teardown: everything the run writes is closed by then, and the teardown of torch's
    distributed objects has failed two ways. It hung on a dead peer's connections (a NoLoCo
    survivor that had written everything never exited), and it aborted a finished rank
    ("terminate called without an active exception", exit -6) once in a loaded CI run, after
    which torchrun stopped rank 0 while it wrote its summary, and the run was marked interrupted
    at its last step."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
