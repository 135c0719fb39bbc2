"""How a real run's records reach its run directory: one object, chosen once per run.

- :class:`Collective` (the default): every flush gathers the ranks' pending records on rank 0,
  which appends them to ``metrics.jsonl``; the consensus distance is one all-reduce; a
  checkpoint's ``latest`` marker moves after a barrier; rank 0 gets the final records.
- :class:`PerRankFiles` (``--survive-failures``): no collective after the start, since one could
  wait on a dead peer. Each rank appends its own ``ranks/rank_<r>.jsonl`` and leaves its final
  record in ``ranks/rank_<r>.final.json``; the lowest live rank merges them (bounded wait) and
  writes ``metrics.jsonl`` and gets the final records and the dead; checkpoints are counted in the
  store, so the marker moves only when every rank wrote its file or is dead (the marker lists
  the dead as absent, see :func:`gossip.checkpoint.write_latest`).

Both give ``metrics.jsonl`` in one order (:func:`gossip.records.sorted_records`), in the one
record schema of :mod:`gossip.records`; the rank that gets the final records writes
``summary.json`` (:func:`gossip.records.summarize` of the records after :func:`describe`,
through its :class:`gossip.rundir.RunDir`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor

from gossip.comm import TorchCommunicator
from gossip.comm.monitor import PeerMonitor
from gossip.flat import FlatParams
from gossip.metrics import (
    RunWriter,
    append_jsonl,
    atomic_write_text,
    read_jsonl,
    to_jsonable,
    truncate_jsonl,
)
from gossip.records import sorted_records
from launch.rank import consensus

__all__ = ["Collective", "PerRankFiles", "death_summary", "describe", "gatherer"]


def death_summary(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per dead rank (``death`` records' ``node``): when it was first noticed, and by
    whom."""
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        if r.get("kind") != "death":
            continue
        entry = out.setdefault(r["node"], {"rank": r["node"], "step": r["detected_at_step"],
                                           "unix_time": r["unix_time"], "detected_by": []})
        entry["step"] = min(entry["step"], r["detected_at_step"])
        entry["unix_time"] = min(entry["unix_time"], r["unix_time"])
        entry["detected_by"] = sorted({*entry["detected_by"], r["detected_by"]})
    return [out[k] for k in sorted(out)]


class Collective:
    """Records through collectives to rank 0 (see the module docstring)."""

    def __init__(self, out: Path, comm: TorchCommunicator, config: dict[str, Any], *,
                 resumed_from: int, timeout: float, tensorboard: bool = False) -> None:
        self.out, self.comm, self.rank, self.n = out, comm, comm.rank, comm.world_size
        if self.rank == 0 and resumed_from:
            truncate_jsonl(out / "metrics.jsonl", resumed_from)
        self.writer = RunWriter(out, config if self.rank == 0 else {},
                                resumed_at=resumed_from or None, enabled=self.rank == 0,
                                tensorboard=tensorboard)

    def flush(self, records: list[dict[str, Any]]) -> None:
        gathered: list[Any] | None = [None] * self.n if self.rank == 0 else None
        dist.gather_object(records, gathered, dst=0)
        if gathered is not None:
            self.writer.log_many(sorted_records(r for part in gathered for r in part))

    def consensus(self, params: FlatParams) -> tuple[float | None, Tensor | None]:
        return consensus(params, self.comm)

    def checkpoint_complete(self, step: int) -> list[int] | None:
        """On the rank that moves the ``latest`` marker to ``step``: the ranks whose file of it
        is on disk, once they all are; None on the others."""
        self.comm.barrier()  # every rank's file is on disk before the marker moves
        return list(range(self.n)) if self.rank == 0 else None

    def finish(self, mine: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        per_rank: list[Any] | None = [None] * self.n if self.rank == 0 else None
        dist.gather_object(mine, per_rank, dst=0)
        return None if per_rank is None else (per_rank, {})

    def close(self) -> None:
        self.writer.close()


class PerRankFiles(Collective):
    """Records through per-rank files, no collective (see the module docstring)."""

    def __init__(self, out: Path, comm: TorchCommunicator, config: dict[str, Any], *,
                 resumed_from: int, timeout: float, tensorboard: bool = False) -> None:
        super().__init__(out, comm, config, resumed_from=resumed_from, timeout=timeout,
                         tensorboard=tensorboard)
        assert comm.monitor is not None
        self.monitor = comm.monitor
        self.timeout = timeout
        self.ranks_dir = out / "ranks"
        self.ranks_dir.mkdir(parents=True, exist_ok=True)
        # a previous attempt's final record must not pass for this one's
        (self.ranks_dir / f"rank_{self.rank}.final.json").unlink(missing_ok=True)
        if resumed_from:
            truncate_jsonl(self.ranks_dir / f"rank_{self.rank}.jsonl", resumed_from)

    def _dead(self) -> set[int]:
        return set(self.monitor.dead()) | set(self.comm.deaths)

    def flush(self, records: list[dict[str, Any]]) -> None:
        append_jsonl(self.ranks_dir / f"rank_{self.rank}.jsonl", records)

    def consensus(self, params: FlatParams) -> tuple[float | None, Tensor | None]:
        return None, None  # an all-reduce would wait on dead ranks

    def checkpoint_complete(self, step: int) -> list[int] | None:
        """Say in the store that this rank's file of ``step`` is on disk; wait (bounded) until
        every rank has said so or is dead. The lowest live rank then gets the ranks whose file
        is in (the survivors', after deaths: their checkpoints stay the resume point); the others
        and a wait past the timeout get None (the marker stays where it is)."""
        store = PeerMonitor.default_store()
        count, keys = f"gossip/checkpoint/{step}", [f"gossip/checkpoint/{step}/{r}"
                                                     for r in range(self.n)]
        store.set(keys[self.rank], "1")
        store.add(count, 1)
        deadline = time.monotonic() + self.timeout
        while True:
            dead = self._dead()
            if store.add(count, 0) >= self.n:  # one call while nobody died
                break
            if dead and all(r in dead or store.check([keys[r]]) for r in range(self.n)):
                break
            if time.monotonic() > deadline:
                return None
            time.sleep(0.01)
        if min(set(range(self.n)) - dead - {self.rank} | {self.rank}) != self.rank:
            return None
        # the ranks whose file is in: a rank that wrote its file and then died too
        return [r for r in range(self.n) if r not in dead or store.check([keys[r]])]

    def finish(self, mine: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
        """Leave this rank's final record; the lowest live rank waits (bounded) for the live
        ranks' files, merges everything into metrics.jsonl and returns the per-rank records."""
        atomic_write_text(self.ranks_dir / f"rank_{self.rank}.final.json",
                          json.dumps(to_jsonable(mine)) + "\n")
        live = set(range(self.n)) - self._dead() - {self.rank}
        if min(live | {self.rank}) != self.rank:
            return None
        deadline = time.monotonic() + self.timeout
        while True:
            done = {r for r in range(self.n)
                    if (self.ranks_dir / f"rank_{r}.final.json").exists()}
            if set(range(self.n)) <= done | self._dead() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        per_rank = [json.loads((self.ranks_dir / f"rank_{r}.final.json").read_text())
                    for r in sorted(done)]
        records: list[dict[str, Any]] = []
        for r in range(self.n):
            path = self.ranks_dir / f"rank_{r}.jsonl"
            if path.exists():
                records += read_jsonl(path)
        records = sorted_records(records)
        if self.writer.enabled:
            self.writer.log_many(records)
        else:  # rank 0 died: this rank writes metrics.jsonl
            atomic_write_text(self.out / "metrics.jsonl",
                              "".join(json.dumps(to_jsonable(r)) + "\n" for r in records))
        return per_rank, {"deaths": death_summary(records),
                          "survivors": [r["rank"] for r in per_rank]}



def gatherer(out: Path, comm: TorchCommunicator, config: dict[str, Any], *, resumed_from: int,
             timeout: float, tensorboard: bool = False) -> Collective:
    """:class:`PerRankFiles` when the run survives failures (a peer monitor), else
    :class:`Collective`."""
    cls = PerRankFiles if comm.monitor is not None else Collective
    return cls(out, comm, config, resumed_from=resumed_from, timeout=timeout,
               tensorboard=tensorboard)


def _mean(values: list[Any]) -> float | None:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def describe(cfg: Any, task_name: str, n: int, per_rank: list[dict[str, Any]],
             final: dict[str, Any], wall: float, *, resumed_from: int | None,
             task_source: str) -> dict[str, Any]:
    """What a real run's summary.json says besides the figures of its records
    (:func:`gossip.records.summarize`): the run's settings and the ranks' final records."""
    avg = final.get("avg_model", {})
    bytes_sent = sum(r["bytes_sent"] for r in per_rank)
    return {
        "algo": cfg.algo,
        "task": task_name,
        "task_source": task_source,
        "world_size": n,
        "nodes": n,
        "steps": cfg.steps,
        "sync_every": cfg.sync_every,
        "topology": cfg.topology,
        "partition": cfg.partition,
        "optimizer": cfg.optimizer,
        "lr": cfg.lr,
        "schedule": cfg.schedule,
        "avg_model_loss": avg.get("loss"),
        "avg_model_accuracy": avg.get("accuracy"),
        "bytes_sent_total": bytes_sent,
        "bytes_per_node": bytes_sent / len(per_rank),
        "sync_seconds_mean": _mean([r["sync_seconds"] for r in per_rank]),
        "wall_seconds": wall,
        "resumed_from_step": resumed_from,
        "per_rank": per_rank,
    }
