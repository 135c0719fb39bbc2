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
from gossip.comm import TorchCommunicator, init_from_env
from gossip.flat import FlatParams
from gossip.tasks import Task, TaskData
from launch.config import TrainConfig

__all__ = ["RunError", "ShardStream", "agree", "configure_logging", "consensus", "derived_seed",
           "evaluate", "free_port", "interrupt", "join_process_group", "leave", "pick_device",
           "single_process_env", "test_set"]


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
    """``init_from_env``, made safe for ``torchrun --max-restarts`` on one node.

    torchrun's workers share the rendezvous TCPStore across restarts (TORCHELASTIC_USE_AGENT_STORE),
    so after a restart a rank can read a dead peer's address left by the previous attempt and
    the Gloo/NCCL connect fails or hangs (pytorch/pytorch#135712). On one node every worker sees
    the same TORCHELASTIC_RESTART_COUNT, so the group's keys are put under a per-attempt prefix.
    Across nodes the counts can differ: set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun.
    """
    env = os.environ
    restart = env.get("TORCHELASTIC_RESTART_COUNT", "0")
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    one_node = env.get("LOCAL_WORLD_SIZE") == env.get("WORLD_SIZE")
    if shared and one_node and restart != "0" and not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() and not survive else "gloo"
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        wait = timedelta(seconds=timeout)
        base = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world,
                             is_master=False, timeout=wait)
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            local_rank = int(env.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            kwargs["device_id"] = torch.device("cuda", local_rank)
        dist.init_process_group(backend, store=dist.PrefixStore(f"gossip/restart_{restart}", base),
                                rank=rank, world_size=world, timeout=wait, **kwargs)
    return init_from_env(backend, timeout=timeout, survive_peer_failures=survive,
                         dead_after=dead_after)


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


def interrupt(signum: int, _frame: object) -> None:
    """A signal handler that ends the run like Ctrl-C (for SIGTERM)."""
    raise KeyboardInterrupt(f"signal {signum}")


def leave(status: int, *, at_once: bool) -> NoReturn:
    """Exit the process with ``status``; ``at_once`` skips the interpreter's teardown, which can
    hang on a dead peer's connections (measured: a NoLoCo survivor that had written everything
    never exited)."""
    if at_once:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
