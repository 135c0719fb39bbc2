"""raytools.workers on a real local Ray cluster: torchrun's environment, a Gloo all-reduce
across actors, and bounded failure (a raising, dying, frozen or hanging rank tears the group
down)."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("ray")

from raytools.workers import WorkerGroup, WorkerGroupConfig, WorkerGroupError

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _all_reduce() -> tuple[float, dict[str, str]]:
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    try:
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        return float(t), {k: os.environ[k] for k in ENV_KEYS}
    finally:
        dist.destroy_process_group()


def _stall_on(rank: int, seconds: float) -> int:
    if int(os.environ["RANK"]) == rank:
        time.sleep(seconds)
    return int(os.environ["RANK"])


def _die_while_peer_waits() -> None:
    """Rank 1 dies (no exception, no goodbye) while rank 0 waits for it in an all-reduce."""
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
    if dist.get_rank() == 1:
        os._exit(17)
    dist.all_reduce(torch.ones(1))


def _freeze_while_peer_waits() -> None:
    """Rank 1 stops itself (SIGSTOP: alive to Ray, answering nothing) while rank 0 waits for it
    in an all-reduce whose own timeout is 120 s."""
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=120))
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    dist.all_reduce(torch.ones(1))


def _busy(seconds: float) -> int:
    """Rank 0 spins in Python (holding the lock but for the 5 ms switches), rank 1 in torch."""
    end = time.monotonic() + seconds
    rank = int(os.environ["RANK"])
    x = torch.randn(256, 256)
    n = 0
    while time.monotonic() < end:
        if rank == 0:
            n += sum(range(1000))
        else:
            x = torch.tanh(x @ x)
    return rank


def _fail_in_three_ways() -> int:
    """Rank 1 dies, rank 2 freezes, rank 3 raises; rank 0 works 3 s and finishes."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        os._exit(9)
    if rank == 2:
        os.kill(os.getpid(), signal.SIGSTOP)
    if rank == 3:
        raise ValueError("bad shard 3")
    time.sleep(3.0)
    return rank


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="num_workers"):
        WorkerGroupConfig(num_workers=0)
    with pytest.raises(ValueError, match="gpus_per_worker"):
        WorkerGroupConfig(num_workers=2, gpus_per_worker=1.5)
    with pytest.raises(ValueError, match="placement_strategy"):
        WorkerGroupConfig(num_workers=2, placement_strategy="NEAR")
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match=f"heartbeat_s must be > 0 or None, got {bad}"):
            WorkerGroupConfig(num_workers=2, heartbeat_s=bad)


@pytest.mark.ray
def test_all_reduce_env_reuse_and_a_dead_rank(ray_cluster: str) -> None:
    group = WorkerGroup(WorkerGroupConfig(num_workers=2))
    try:
        out = group.run(_all_reduce)
        assert [v for v, _ in out] == [3.0, 3.0]
        envs = [e for _, e in out]
        assert [e["RANK"] for e in envs] == ["0", "1"]
        assert [e["LOCAL_RANK"] for e in envs] == ["0", "1"]  # one node: local = global
        assert {e["WORLD_SIZE"] for e in envs} == {"2"}
        assert {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
        assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
        assert len({e["MASTER_PORT"] for e in envs}) == 1
        assert [w.rank for w in group.workers] == [0, 1]

        # the same actors form a second process group on a fresh port
        port = group.new_master_port()
        out = group.run(_all_reduce)
        assert [v for v, _ in out] == [3.0, 3.0]
        assert {e["MASTER_PORT"] for _, e in out} == {str(port)}

        # rank 1 dies while rank 0 waits for it: the error names rank 1, not rank 0's
        # "connection reset" symptom, and comes long before rank 0's 120 s timeout
        group.new_master_port()
        t0 = time.monotonic()
        with pytest.raises(WorkerGroupError, match="rank 1 died") as err:
            group.run(_die_while_peer_waits)
        assert err.value.ranks[0] == 1
        assert time.monotonic() - t0 < 60
        assert not group.alive
        with pytest.raises(WorkerGroupError, match="shut down"):
            group.run(_stall_on, 0, 0.0)
    finally:
        group.shutdown()


@pytest.mark.ray
def test_a_hanging_rank_times_out(ray_cluster: str) -> None:
    with WorkerGroup(WorkerGroupConfig(num_workers=1)) as group:
        t0 = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"rank\(s\) \[0\] did not finish") as err:
            group.run(_stall_on, 0, 600.0, timeout_s=2.0)
        assert err.value.ranks == (0,)
        assert time.monotonic() - t0 < 30
        assert not group.alive


@pytest.mark.ray
def test_a_frozen_rank_is_named_within_the_heartbeat(ray_cluster: str) -> None:
    """A SIGSTOPped rank is alive to Ray and its peer waits 120 s in Gloo: the heartbeat names
    it (not the waiting peer) within a few seconds, and the group is torn down. Busy ranks, in
    Python or in torch, answer the same heartbeat and finish."""
    with WorkerGroup(WorkerGroupConfig(num_workers=2, heartbeat_s=5.0)) as group:
        assert group.run(_busy, 8.0) == [0, 1]  # longer than the heartbeat
        pid = group.workers[1].pid
        t0 = time.monotonic()
        with pytest.raises(WorkerGroupError, match=r"rank\(s\) \[1\] stopped answering") as err:
            group.run(_freeze_while_peer_waits)
        assert err.value.ranks == (1,)
        assert time.monotonic() - t0 < 30
        assert not group.alive
    _assert_gone(pid)  # the stopped process is killed, not left behind

@pytest.mark.ray
def test_survivors_finish_past_dead_frozen_and_raising_ranks(ray_cluster: str) -> None:
    """run_survivors (launch.train --survive-failures under Ray): the one rank that works
    finishes; the others are reported by how they failed; the frozen one is killed once the
    rest are done; the group is shut down afterwards."""
    group = WorkerGroup(WorkerGroupConfig(num_workers=4, heartbeat_s=5.0))
    try:
        frozen_pid = group.workers[2].pid
        t0 = time.monotonic()
        results, failures = group.run_survivors(_fail_in_three_ways, [()] * 4)
        assert results == {0: 0}
        assert failures[1] == "died" and failures[2] == "frozen", failures
        assert failures[3].startswith("raised: ValueError: bad shard 3"), failures
        assert time.monotonic() - t0 < 30
        assert not group.alive
        _assert_gone(frozen_pid)
    finally:
        group.shutdown()


def _assert_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return  # killed; its parent has not reaped it yet
        time.sleep(0.5)
    raise AssertionError(f"process {pid} is still there")
