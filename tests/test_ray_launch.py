"""launch.ray_launch on a real local Ray cluster: the very training loop of torchrun, run as Ray
actors, gives the same run (same seeds, same metrics), and a failing rank fails the launch."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

from gossip.metrics import read_jsonl
from launch.ray_launch import launch, parse
from raytools.workers import WorkerGroup, WorkerGroupConfig
from tests.distributed import signal_when

REPO = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--task", "digits", "--steps", "30", "--sync-every", "10", "--seed", "3"]


def _fail_on_rank_1(argv: list[str]) -> int:
    """A training entry whose rank 1 raises while rank 0 runs the real loop (and waits)."""
    if os.environ["RANK"] == "1":
        raise ValueError("injected failure on rank 1")
    from launch.train import main as train_main

    return train_main(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def _start_torchrun(argv: list[str], nproc: int = 2) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "launch.train", *argv]
    return subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait(proc: subprocess.Popen[str], timeout: float = 240) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-4000:]


def _read(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    summary = json.loads((out / "summary.json").read_text())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal structure; numbers allclose; anything measured in wall-clock seconds skipped."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, a, b)
        for k in a:
            if "seconds" not in k:
                _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def test_parse_splits_launcher_and_training_flags() -> None:
    ns, rest = parse(["--num-workers", "4", "--address", "auto", "--", "--algo", "noloco",
                      "--timeout", "30"])
    assert (ns.num_workers, ns.address, rest) == (4, "auto", ["--algo", "noloco", "--timeout",
                                                               "30"])
    # without "--": unknown flags pass through; --timeout is not mistaken for --run-timeout-s
    ns, rest = parse(["--algo", "fedavg", "--num-workers", "2", "--timeout", "30",
                      "--gpus-per-worker", "1"])
    assert (ns.num_workers, ns.gpus_per_worker, ns.run_timeout_s) == (2, 1, None)
    assert rest == ["--algo", "fedavg", "--timeout", "30"]


@pytest.fixture(scope="module")
def pair(ray_cluster: str) -> Iterator[WorkerGroup]:
    """Two actors reused by the runs of this module (each run gets a fresh MASTER_PORT)."""
    with WorkerGroup(WorkerGroupConfig(num_workers=2)) as group:
        yield group


@pytest.mark.ray
@pytest.mark.parametrize("algo", ["fedavg", "noloco"])
def test_ray_launch_matches_torchrun(pair: WorkerGroup, tmp_path: Path, algo: str) -> None:
    flags = ["--algo", algo, *TRAIN_FLAGS]
    ray_out, torchrun_out = tmp_path / "ray", tmp_path / "torchrun"

    reference = _start_torchrun([*flags, "--out", str(torchrun_out)])  # runs meanwhile
    try:
        codes = launch([*flags, "--out", str(ray_out)], workers=pair)
    finally:
        _wait(reference)
    assert codes == [0, 0]
    for name in ("config.json", "metrics.jsonl", "summary.json", "loss.png"):
        assert (ray_out / name).is_file(), name
    summary, records = _read(ray_out)
    assert summary["world_size"] == 2 and summary["steps"] == 30
    assert summary["final_accuracy_mean"] > 0.5  # it learned something
    assert any(r["kind"] == "sync" for r in records)

    ref_summary, ref_records = _read(torchrun_out)
    _assert_same(summary, ref_summary)
    _assert_same(records, ref_records)


@pytest.mark.ray
def test_failing_rank_fails_the_launch(ray_cluster: str, tmp_path: Path) -> None:
    """The command line, joining the running cluster: rank 1 raises while rank 0 trains."""
    cmd = [sys.executable, "-m", "launch.ray_launch", "--num-workers", "2",
           "--address", ray_cluster, "--entry", f"{__name__}:_fail_on_rank_1", "--",
           "--algo", "fedavg", *TRAIN_FLAGS, "--out", str(tmp_path / "run")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=180)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1 failed" in proc.stderr and "injected failure on rank 1" in proc.stderr
    assert elapsed < 90  # rank 0 would otherwise wait --timeout (300 s) for rank 1


@pytest.mark.ray
@pytest.mark.slow
def test_survivors_finish_under_ray_past_a_frozen_rank(ray_cluster: str, tmp_path: Path) -> None:
    """--survive-failures under Ray, as under launch.spawn: rank 2 is SIGSTOPped at step 40 of
    NoLoCo; the three others leave it out and finish, summary.json names rank 2 alone, the
    frozen actor is killed once they are done, and the launch returns (a frozen rank counts as
    stopped by SIGSTOP)."""
    out = tmp_path / "run"
    flags = ["--algo", "noloco", "--task", "digits", "--steps", "200", "--sync-every", "10",
             "--eval-every", "50", "--survive-failures", "--timeout", "60", "--dead-after", "10",
             "--out", str(out)]
    group = WorkerGroup(WorkerGroupConfig(num_workers=4, heartbeat_s=5.0))
    victim = out / "ranks" / "rank_2.jsonl"
    frozen = signal_when(
        lambda: victim.exists() and max((r["step"] for r in read_jsonl(victim)), default=0) >= 40,
        lambda: group.workers[2].pid, signal.SIGSTOP)
    try:
        codes = launch(flags, workers=group)
    finally:
        group.shutdown()
    assert frozen.is_set(), "rank 2 never reached step 40"
    assert codes == [0, 0, -19, 0], codes
    summary = json.loads((out / "summary.json").read_text())
    assert [d["rank"] for d in summary["deaths"]] == [2], summary["deaths"]
    assert summary["survivors"] == [0, 1, 3]
    assert summary["final_accuracy_mean"] > 0.8
