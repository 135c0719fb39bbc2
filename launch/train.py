"""The training loop for real runs: one process per rank, under torchrun.

    torchrun --standalone --nproc-per-node 4 -m launch.train \\
        --algo fedavg --task digits --steps 300 --sync-every 10 --out runs/x

Each rank trains its own model on its own shard of the task's training data (``--partition``)
and calls the algorithm after every inner optimizer step; the algorithm decides when to
communicate. Every ``--eval-every`` steps each rank evaluates its current model on the task's
test set and the launcher measures the consensus distance (one all-reduce of ``[x, ||x||^2]``).
Rank 0 gathers the per-rank records and writes the run directory (``config.json``,
``metrics.jsonl``, ``summary.json``, plots). ``--checkpoint-every`` writes resumable
checkpoints (see :mod:`gossip.checkpoint`); ``--resume`` continues from the latest one in
``--out`` bit for bit, also as the restart command of ``torchrun --max-restarts``.

All randomness derives from ``--seed`` and the rank: the model init (shared or per rank, as the
algorithm wants), the data order (:func:`gossip.batching.node_batch`, as in the simulator), the
algorithm's pairings/sampling (per step); the torch RNG (unused by the built-in models) is seeded
per rank and checkpointed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from gossip import checkpoint as ckpt
from gossip.algorithms import build_algorithm, needs_topology, same_init
from gossip.batching import node_batch
from gossip.comm import CommError, TorchCommunicator, init_from_env
from gossip.comm.monitor import PeerMonitor
from gossip.data import partition
from gossip.flat import FlatParams, scope_from_spec
from gossip.metrics import RunWriter, append_jsonl, atomic_write_text, read_jsonl, to_jsonable
from gossip.plots import plot_metrics
from gossip.rundir import RunDir
from gossip.tasks import Task, get_task
from gossip.topology import make_topology
from launch.config import TrainConfig, build_parser, from_args
from launch.spawn import torchrun_store_warning

__all__ = ["RunError", "ShardStream", "main", "train"]

log = logging.getLogger("launch.train")

#: Fault injection for tests of ``torchrun --max-restarts``: the last rank exits (status 17) after
#: this step, on the first attempt only (TORCHELASTIC_RESTART_COUNT == 0).
FAULT_ENV = "GOSSIP_FAULT_EXIT_AT_STEP"


class RunError(ValueError):
    """An error every rank agrees on (so only rank 0 reports it)."""


# ----------------------------------------------------------------------------- pieces


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from a tuple of ints (e.g. (seed, rank, purpose))."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class ShardStream:
    """This rank's batches: :func:`gossip.batching.node_batch` over its shard.

    The schedule is a pure function of (seed, rank, step), the very one a simulated node with the
    same id follows, so real runs and simulations see the same samples. ``state()`` is the
    number of batches taken (all a checkpoint needs to resume the order).
    """

    def __init__(self, task: Task, indices: np.ndarray, batch_size: int, seed: int, node: int,
                 device: torch.device) -> None:
        if len(indices) == 0:
            raise ValueError("the shard is empty")
        self.x = task.data.x_train
        self.y = task.data.y_train
        self.indices = np.asarray(indices)
        self.batch_size = batch_size
        self.seed = seed
        self.node = node
        self.device = device
        self.taken = 0

    def state(self) -> dict[str, int]:
        return {"taken": self.taken}

    def load_state(self, state: dict[str, int]) -> None:
        self.taken = int(state["taken"])

    def next(self) -> tuple[Tensor, Tensor]:
        idx = torch.from_numpy(node_batch(self.indices, self.batch_size, seed=self.seed,
                                          node=self.node, step=self.taken))
        self.taken += 1
        return (self.x[idx].to(self.device, non_blocking=True),
                self.y[idx].to(self.device, non_blocking=True))


def make_optimizer(cfg: TrainConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    kwargs: dict[str, Any] = {"lr": cfg.lr}
    if cfg.weight_decay is not None:
        kwargs["weight_decay"] = cfg.weight_decay
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, **kwargs)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, **kwargs)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"optimizer={cfg.optimizer!r} is invalid")


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


def _agree(fn: Any) -> Any:
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _setup_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr, force=True)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class _Counters:
    """Running totals that belong in a checkpoint (for the metrics, not for the math)."""

    bytes_sent: int = 0
    sync_seconds: float = 0.0
    syncs: int = 0
    sync_loss_sum: float = 0.0
    sync_loss_count: int = 0
    eval_loss_sum: float = 0.0
    eval_loss_count: int = 0
    wall_seconds: float = 0.0


class _Run:
    """One rank's training run (state shared by the loop's helpers)."""

    def __init__(self, cfg: TrainConfig, comm: TorchCommunicator) -> None:
        self.comm = comm
        self.rank, self.n = comm.rank, comm.world_size
        self.out = Path(cfg.out)
        self.device = pick_device(cfg, comm.backend)
        self.task = get_task(cfg.task, seed=cfg.seed)
        self.cfg = cfg = cfg.resolved(self.task)
        torch.manual_seed(derived_seed(cfg.seed, self.rank, 1))

        data = self.task.data
        labels = data.y_train if data.kind == "classification" else None
        try:
            shards = partition(cfg.partition, labels, self.n, num_samples=data.num_train,
                               seed=cfg.seed)
        except ValueError as e:
            raise RunError(f"partition={cfg.partition!r} is invalid for task={cfg.task!r} "
                           f"with {self.n} ranks: {e}") from None
        self.shard_sizes = [len(s) for s in shards]
        self.shard = shards[self.rank]
        self.x_test = data.x_test.to(self.device)
        self.y_test = data.y_test.to(self.device)

        init_seed = cfg.seed if same_init(cfg.algo) else cfg.seed + self.rank
        self.model = self.task.make_model(init_seed).to(self.device)
        self.model.train()
        self.params = FlatParams.from_module(self.model, scope_from_spec(cfg.vc_scope or "weights"))
        self.opt = make_optimizer(cfg, self.params.params)
        topology = None
        if needs_topology(cfg.algo):
            try:
                topology = make_topology(cfg.topology or "ring", self.n, seed=cfg.seed,
                                         weights=cfg.topology_weights or "metropolis")
            except ValueError as e:
                raise RunError(f"topology={cfg.topology!r} is invalid with {self.n} ranks: "
                               f"{e}") from None
        self.algo_config = cfg.algorithm_config()
        try:
            self.algo = build_algorithm(
                cfg.algo, self.algo_config, self.params, comm, topology=topology,
                weight=torch.tensor([float(len(self.shard))], dtype=torch.float64))
        except ValueError as e:
            raise RunError(f"algo={cfg.algo!r} cannot run with {self.n} ranks: {e}") from None
        self.stream = ShardStream(self.task, self.shard, cfg.batch_size or 1, cfg.seed,
                                  self.rank, self.device)
        self.meta = {"format": ckpt.FORMAT_VERSION, "algo": cfg.algo, "task": cfg.task,
                     "world_size": self.n}
        self.counters = _Counters()
        self.records: list[dict[str, Any]] = []  # this rank's records not yet written
        self.deaths_seen: set[int] = set()
        # surviving dead peers: no collectives after the start; each rank writes its own records
        self.tolerant = comm.monitor is not None
        self.final: dict[str, Any] = {}
        self.start_step = 0
        self.last_step = 0
        self.resume_changes: list[dict[str, Any]] = []  # [faults] accepted by --resume-override

    # ------------------------------------------------------------------ checkpoints

    def _load(self) -> dict[str, Any] | None:
        latest = ckpt.read_latest(self.out)
        if not self.cfg.resume:
            if latest is not None:
                raise ValueError(
                    f"{ckpt.checkpoint_dir(self.out)} holds checkpoints (latest: step "
                    f"{latest['step']}); pass --resume to continue that run or choose another "
                    "--out")
            return None
        if latest is None:
            return None
        marker = ckpt.checkpoint_dir(self.out) / "latest"
        mine = {"world_size": self.n, "algo": self.cfg.algo, "task": self.cfg.task}
        differ = [k for k, v in mine.items() if latest.get(k) != v]
        if differ:
            theirs = ", ".join(f"{k}={latest.get(k)!r}" for k in differ)
            ours = ", ".join(f"{k}={mine[k]!r}" for k in differ)
            raise ValueError(f"checkpoint {marker} was written with {theirs}; this run has "
                             f"{ours}")
        step = int(latest["step"])
        if step > self.cfg.steps:
            raise ValueError(f"checkpoint {marker} is at step {step}, beyond steps="
                             f"{self.cfg.steps}")
        # [faults] trajectory changes are refused unless overridden; recorded with their step
        overrides = [f for f in (self.cfg.resume_override or "").split(",") if f]
        changes = ckpt.check_resume({**latest.get("config", {}), "world_size": latest.get(
            "world_size")}, {**self.cfg.to_dict(), "world_size": self.n}, overrides)
        self.resume_changes = [{**c, "step": step} for c in changes]
        path = ckpt.rank_file(self.out, step, self.rank)
        state = ckpt.load_rank_state(path, sha256=ckpt.expected_sha256(self.out, latest, path),
                                     expect={**self.meta, "rank": self.rank})
        try:
            ckpt.restore_params(self.params, state["params"], source=str(path))
            self.opt.load_state_dict(state["optimizer"])
            self.algo.load_state_dict(state["algorithm"])
            self.stream.load_state(state["data"])
            ckpt.restore_rng(state["rng"], self.device)
            self.counters = _Counters(**state["launcher"])
        except (KeyError, RuntimeError, TypeError) as e:
            raise ValueError(f"checkpoint file {path} does not fit this run: {e}") from e
        return state

    def resume(self) -> None:
        if self.tolerant:  # a previous attempt's final record must not pass for this one's
            (self.out / "ranks" / f"rank_{self.rank}.final.json").unlink(missing_ok=True)
        state = _agree(self._load)
        if state is None:
            if self.cfg.resume:
                log.info("no checkpoint in %s: starting from step 0", self.out)
            return
        self.start_step = int(state["step"])
        log.info("resumed from %s at step %d", ckpt.checkpoint_dir(self.out), self.start_step)

    def save(self, step: int) -> None:
        state = {
            "meta": {**self.meta, "rank": self.rank},
            "step": step,
            "params": ckpt.params_state(self.params),
            "optimizer": self.opt.state_dict(),
            "algorithm": self.algo.state_dict(),
            "data": self.stream.state(),
            "rng": ckpt.capture_rng(self.device),
            "launcher": dataclasses.asdict(self.counters),
        }
        ckpt.atomic_torch_save(state, ckpt.rank_file(self.out, step, self.rank))
        if self.tolerant:  # no collective: the marker moves only if every rank wrote its file
            if self._all_ranks_wrote(step) and self.rank == 0:
                ckpt.write_latest(self.out, step, self._marker_meta(), ranks=self.n)
            return
        self.comm.barrier()  # every rank's file is on disk before the marker moves
        if self.rank == 0:
            ckpt.write_latest(self.out, step, self._marker_meta(), ranks=self.n)

    def _marker_meta(self) -> dict[str, Any]:
        return {**self.meta, "config": self.cfg.to_dict()}  # [faults] for check_resume

    def _all_ranks_wrote(self, step: int) -> bool:
        """Count this rank's checkpoint in the store; True once all ranks have (bounded wait).

        After a death a checkpoint can never be complete (the world size is fixed), so the
        ``latest`` marker stays at the last checkpoint every rank wrote.
        """
        store = PeerMonitor.default_store()
        key = f"gossip/checkpoint/{step}"
        store.add(key, 1)
        deadline = time.monotonic() + self.cfg.timeout
        while time.monotonic() < deadline:
            if store.add(key, 0) >= self.n:
                return True
            if self.comm.deaths or (self.comm.monitor and self.comm.monitor.dead()):
                return False
            time.sleep(0.01)
        return False

    # ------------------------------------------------------------------ records

    def flush(self, writer: RunWriter) -> None:
        """Gather every rank's pending records on rank 0 and append them to metrics.jsonl.

        When surviving failures, each rank appends its own ``ranks/rank_<r>.jsonl`` instead (no
        collective); the summary's writer merges them at the end.
        """
        if self.tolerant:
            path = self.out / "ranks" / f"rank_{self.rank}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            append_jsonl(path, self.records)
            self.records = []
            return
        gathered: list[Any] | None = [None] * self.n if self.rank == 0 else None
        dist.gather_object(self.records, gathered, dst=0)
        self.records = []
        if gathered is not None:
            for r in _sorted_records(r for part in gathered for r in part):
                writer.log(r)

    def on_sync(self, stats: Any) -> None:
        c = self.counters
        c.bytes_sent += stats.bytes_sent
        c.sync_seconds += stats.seconds
        c.syncs += 1
        loss = c.sync_loss_sum / max(c.sync_loss_count, 1)
        c.sync_loss_sum, c.sync_loss_count = 0.0, 0
        self.records.append({"kind": "sync", "step": stats.step, "rank": self.rank,
                             "loss": loss, "bytes_sent": stats.bytes_sent,
                             "sync_seconds": stats.seconds, "bytes_total": c.bytes_sent,
                             **stats.extra})
        for dead, at in self.comm.deaths.items():
            if dead not in self.deaths_seen:
                self.deaths_seen.add(dead)
                log.warning("rank %d: peer rank %d is dead (noticed at step %d); going on "
                            "without it", self.rank, dead, at)
                self.records.append({"kind": "death", "step": stats.step, "rank": dead,
                                     "detected_by": self.rank, "detected_at_step": at,
                                     "unix_time": time.time(),
                                     "reason": self.comm.failures.get(
                                         dead, "no heartbeat, or a peer reported it")})

    def on_eval(self, step: int, *, final: bool, record: bool = True) -> dict[str, Any]:
        c = self.counters
        metrics = evaluate(self.task, self.model, self.x_test, self.y_test)
        train_loss = c.eval_loss_sum / c.eval_loss_count if c.eval_loss_count else None
        c.eval_loss_sum, c.eval_loss_count = 0.0, 0
        distance: float | None = None
        mean: Tensor | None = None
        if not self.tolerant:  # an all-reduce would wait on dead ranks
            distance, mean = consensus(self.params, self.comm)
        rec: dict[str, Any] = {"kind": "eval", "step": step, "rank": self.rank,
                               "test_loss": metrics["loss"], "train_loss": train_loss,
                               "bytes_total": c.bytes_sent, "sync_seconds_total": c.sync_seconds}
        if "accuracy" in metrics:
            rec["test_accuracy"] = metrics["accuracy"]
        if record:
            self.records.append(rec)
            if self.rank == 0 and distance is not None:
                self.records.append({"kind": "consensus", "step": step,
                                     "consensus_distance": distance})
        if final:
            self.final = {"eval": rec, "consensus_distance": distance}
            if self.rank == 0 and mean is not None:
                self.final["avg_model"] = self._eval_mean_model(mean)
        return {"test_loss": metrics["loss"], "test_accuracy": metrics.get("accuracy"),
                "consensus": distance}

    def _gather_from_files(self, mine: dict[str, Any], writer: RunWriter
                           ) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
        """Without collectives: each rank leaves its final record in a file; the lowest rank
        still alive waits (bounded) for the live ranks' files and merges everything."""
        ranks_dir = self.out / "ranks"
        atomic_write_text(ranks_dir / f"rank_{self.rank}.final.json",
                          json.dumps(to_jsonable(mine)) + "\n")
        monitor = self.comm.monitor
        assert monitor is not None
        # [faults] this rank is always live (it is running this), so the set is never empty
        live = (set(range(self.n)) - set(monitor.dead()) - set(self.comm.deaths)) | {self.rank}
        if min(live) != self.rank:
            return None, []
        deadline = time.monotonic() + self.cfg.timeout
        while True:
            dead = set(monitor.dead()) | set(self.comm.deaths)
            done = {r for r in range(self.n) if (ranks_dir / f"rank_{r}.final.json").exists()}
            if set(range(self.n)) <= done | dead or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        per_rank = [json.loads((ranks_dir / f"rank_{r}.final.json").read_text())
                    for r in sorted(done)]
        records: list[dict[str, Any]] = []
        for r in range(self.n):
            path = ranks_dir / f"rank_{r}.jsonl"
            if path.exists():
                records += read_jsonl(path)
        records = _sorted_records(records)
        if writer.enabled:
            for rec in records:
                writer.log(rec)
        else:  # rank 0 died: this rank writes metrics.jsonl
            atomic_write_text(self.out / "metrics.jsonl",
                              "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
        return per_rank, _death_summary(records)

    def _eval_mean_model(self, mean: Tensor) -> dict[str, float]:
        """Test metrics of the average of all ranks' models (rank 0 only)."""
        model = self.task.make_model(0).to(self.device)
        params = FlatParams.from_module(model)
        chunks, offset = [], 0
        for b in params.buffers():
            chunks.append(mean[offset : offset + b.numel()].to(b.dtype).reshape(b.shape))
            offset += b.numel()
        ckpt.restore_params(params, chunks, source="the mean model")
        return evaluate(self.task, model, self.x_test, self.y_test)

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any] | None:
        # [faults] rank 0 owns --out for the run's life; a refusal stops every rank
        self.run_dir = RunDir(self.out, resume=self.cfg.resume, overwrite=self.cfg.overwrite)
        _agree(lambda: self.run_dir.acquire() if self.rank == 0 else None)
        try:
            return self._run()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: say so instead of leaving no summary
            if self.rank == 0:
                self.run_dir.write_interrupted(self.last_step, algo=self.cfg.algo,
                                               steps=self.cfg.steps)
            raise
        finally:
            self.run_dir.release()

    def _run(self) -> dict[str, Any] | None:
        self.resume()
        self.last_step = self.start_step
        resumed = self.start_step > 0
        writer = None
        if resumed and self.tolerant:
            _truncate_metrics(self.out / "ranks" / f"rank_{self.rank}.jsonl", self.start_step)
        if self.rank == 0:
            if resumed:
                _truncate_metrics(self.out / "metrics.jsonl", self.start_step)
            writer = RunWriter(self.out, self._config_record(), append=resumed)
        else:
            writer = RunWriter(self.out, {}, enabled=False)
        try:
            self._loop(writer)
            return self._finish(writer)
        finally:
            writer.close()

    def _loop(self, writer: RunWriter) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        c = self.counters
        show_bar = self.rank == 0 and sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.start_step, disable=not show_bar,
                   desc=f"{cfg.algo} {cfg.task}", unit="step", dynamic_ncols=True)
        t0 = time.perf_counter()
        wall0 = c.wall_seconds
        # the losses of steps not yet folded into the counters, summed on the device (a host
        # sync per step would stall a GPU); both the sync and the eval averages take them
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        pending = 0

        def fold() -> None:
            nonlocal pending
            if pending:
                total = float(loss_sum)
                c.sync_loss_sum += total
                c.eval_loss_sum += total
                c.sync_loss_count += pending
                c.eval_loss_count += pending
                loss_sum.zero_()
                pending = 0

        fault_step = int(os.environ.get(FAULT_ENV, "0") or 0)
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" or self.rank != self.n - 1:
            fault_step = 0
        try:
            for step in range(self.start_step + 1, cfg.steps + 1):
                self.comm.step = step
                x, y = self.stream.next()
                loss = self.task.loss(self.model(x), y)
                self.opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.params.params, cfg.grad_clip)
                self.opt.step()
                loss_sum += loss.detach().to(torch.float64)
                pending += 1
                stats = self.algo.step(step)
                if stats is not None:
                    fold()
                    self.on_sync(stats)
                last = step == cfg.steps
                if step % (cfg.eval_every or 50) == 0 or last:
                    fold()
                    res = self.on_eval(step, final=last)
                    c.wall_seconds = wall0 + time.perf_counter() - t0
                    self.flush(writer)
                    self._report(step, res, bar)
                if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
                    fold()
                    c.wall_seconds = wall0 + time.perf_counter() - t0
                    self.flush(writer)
                    self.save(step)
                bar.update(1)
                self.last_step = step
                if step == fault_step:
                    log.warning("%s=%d: exiting on purpose", FAULT_ENV, step)
                    os._exit(17)
            if not self.final:  # resumed at the end: evaluate without re-recording
                self.on_eval(cfg.steps, final=True, record=False)
        finally:
            bar.close()
        c.wall_seconds = wall0 + time.perf_counter() - t0

    def _report(self, step: int, res: dict[str, Any], bar: Any) -> None:
        if self.rank != 0:
            return
        acc = res["test_accuracy"]
        text = (f"loss {res['test_loss']:.4f}" + (f" acc {acc:.4f}" if acc is not None else "")
                + ("" if res["consensus"] is None else f" consensus {res['consensus']:.3g}"))
        if bar.disable:
            log.info("step %d/%d (rank 0) test %s", step, self.cfg.steps, text)
        else:
            bar.set_postfix_str(text)

    def _config_record(self) -> dict[str, Any]:
        return {
            "train": self.cfg.to_dict(),
            "algorithm": dataclasses.asdict(self.algo_config),
            "world_size": self.n,
            "backend": self.comm.backend,
            "device": str(self.device),
            "shard_sizes": self.shard_sizes,
            "model_parameters": self.params.numel,
            "torch": torch.__version__,
            "resume_changes": self._past_changes() + self.resume_changes,  # [faults]
        }

    def _past_changes(self) -> list[dict[str, Any]]:
        """[faults] The changes earlier resumes of this run accepted (from config.json)."""
        path = self.out / "config.json"
        if not self.start_step or not path.exists():
            return []
        return list(json.loads(path.read_text()).get("resume_changes", []))

    def _finish(self, writer: RunWriter) -> dict[str, Any] | None:
        c = self.counters
        mine = {
            "rank": self.rank,
            "samples": len(self.shard),
            "final_loss": self.final["eval"]["test_loss"],
            "final_accuracy": self.final["eval"].get("test_accuracy"),
            "final_train_loss": self.final["eval"]["train_loss"],
            "bytes_sent": c.bytes_sent,
            "sync_seconds": c.sync_seconds,
            "syncs": c.syncs,
        }
        if self.tolerant:
            per_rank, deaths = self._gather_from_files(mine, writer)
            if per_rank is None:
                return None
        else:
            per_rank = [None] * self.n if self.rank == 0 else None
            dist.gather_object(mine, per_rank, dst=0)
            if per_rank is None:
                return None
            deaths = []
        summary = _summary(self.cfg, self.n, per_rank, self.final, c.wall_seconds,
                           resumed_from=self.start_step or None)
        if self.tolerant:
            summary["deaths"] = deaths
            summary["survivors"] = [r["rank"] for r in per_rank]
        self.run_dir.write_summary(summary)  # [faults] also when rank 0 died and this took over
        try:
            plot_metrics(read_jsonl(self.out / "metrics.jsonl"), self.out,
                         title=f"{self.cfg.algo} on {self.cfg.task}, {self.n} ranks")
        except Exception:
            log.exception("plotting failed")
        print(_table(summary), flush=True)
        return summary


def _death_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per dead rank: when it was first noticed, and by whom."""
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "death":
            continue
        entry = out.setdefault(r["rank"], {"rank": r["rank"], "step": r["detected_at_step"],
                                           "unix_time": r["unix_time"], "detected_by": []})
        entry["step"] = min(entry["step"], r["detected_at_step"])
        entry["unix_time"] = min(entry["unix_time"], r["unix_time"])
        entry["detected_by"] = sorted({*entry["detected_by"], r["detected_by"]})
    return [out[k] for k in sorted(out)]


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _summary(cfg: TrainConfig, n: int, per_rank: list[dict[str, Any]], final: dict[str, Any],
             wall: float, *, resumed_from: int | None) -> dict[str, Any]:
    avg = final.get("avg_model", {})
    return {
        "algo": cfg.algo,
        "task": cfg.task,
        "world_size": n,
        "steps": cfg.steps,
        "sync_every": cfg.sync_every,
        "topology": cfg.topology,
        "partition": cfg.partition,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "final_loss_mean": _mean([r["final_loss"] for r in per_rank]),
        "final_accuracy_mean": _mean([r["final_accuracy"] for r in per_rank]),
        "final_train_loss_mean": _mean([r["final_train_loss"] for r in per_rank]),
        "final_consensus_distance": final.get("consensus_distance"),
        "avg_model_loss": avg.get("loss"),
        "avg_model_accuracy": avg.get("accuracy"),
        "bytes_sent_total": sum(r["bytes_sent"] for r in per_rank),
        "sync_seconds_mean": _mean([r["sync_seconds"] for r in per_rank]),
        "wall_seconds": wall,
        "resumed_from_step": resumed_from,
        "per_rank": per_rank,
    }


def _table(s: dict[str, Any]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{s['algo']} on {s['task']}: {s['world_size']} ranks, {s['steps']} steps, "
             f"{s['wall_seconds']:.1f} s",
             f"{'rank':>4} {'samples':>7} {'test loss':>9} {'test acc':>8} {'MB sent':>8} "
             f"{'sync s':>7}"]
    for r in s["per_rank"]:
        lines.append(f"{r['rank']:>4} {r['samples']:>7} {f(r['final_loss'], '.4f'):>9} "
                     f"{f(r['final_accuracy'], '.4f'):>8} {r['bytes_sent'] / 1e6:>8.2f} "
                     f"{r['sync_seconds']:>7.2f}")
    lines.append(f"{'mean':>4} {'':>7} {f(s['final_loss_mean'], '.4f'):>9} "
                 f"{f(s['final_accuracy_mean'], '.4f'):>8} "
                 f"{s['bytes_sent_total'] / 1e6 / len(s['per_rank']):>8.2f} "
                 f"{s['sync_seconds_mean']:>7.2f}")
    lines.append(f"averaged model: test loss {f(s['avg_model_loss'], '.4f')}, test acc "
                 f"{f(s['avg_model_accuracy'], '.4f')}; consensus distance "
                 f"{f(s['final_consensus_distance'], '.3g')}")
    return "\n".join(lines)


_RECORD_ORDER = {"sync": 0, "death": 1, "eval": 2, "consensus": 3}


def _sorted_records(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records in metrics.jsonl order: by step, then kind, then rank."""
    return sorted(records, key=lambda r: (r["step"], _RECORD_ORDER.get(r["kind"], 9),
                                          r.get("rank", -1)))


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint by a run that then died)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# ----------------------------------------------------------------------------- entry


def train(cfg: TrainConfig, comm: TorchCommunicator) -> dict[str, Any] | None:
    """Run ``cfg`` on this rank of an initialised process group; rank 0 returns the summary."""
    return _Run(cfg, comm).run()


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        cfg = from_args(argv)
    except ValueError as e:
        parser.error(str(e))  # exits with status 2
    backend = None if cfg.backend == "auto" else cfg.backend
    if "RANK" not in os.environ:  # plain `python -m launch.train`: a world of one process
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                           "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    comm = join_process_group(backend, cfg.timeout, survive=cfg.survive_failures,
                              dead_after=cfg.dead_after)
    _setup_logging(comm.rank)
    warning = torchrun_store_warning(os.environ, cfg.survive_failures)  # [faults]
    if warning and comm.rank == 0:
        log.warning("%s", warning)
    signal.signal(signal.SIGTERM, _interrupt)  # [faults] SIGTERM ends the run like Ctrl-C
    try:
        train(cfg, comm)
    except KeyboardInterrupt:
        log.warning("rank %d: interrupted", comm.rank)
        return 130
    except RunError as e:
        if comm.rank == 0:
            log.error("%s", e)
        return 2
    except CommError as e:
        log.error("rank %d stops: %s", comm.rank, e)
        return 3
    finally:
        if comm.monitor is not None:
            comm.monitor.close()
        if dist.is_initialized() and not comm.deaths:
            dist.destroy_process_group()  # with dead peers it could wait on them: just exit
        _DEAD_PEERS.update(comm.deaths)  # [faults]
    return 0


#: [faults] peers this process saw die: then the interpreter's teardown can hang on their
#: connections (measured: a NoLoCo survivor that had written everything never exited), so the
#: command line leaves at once
_DEAD_PEERS: set[int] = set()

if __name__ == "__main__":
    status = main()
    if _DEAD_PEERS:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
