"""The real training loop: torchrun subprocesses (2 ranks, Gloo), run directories, resume.

``torchrun --standalone`` rendezvouses on port 0, so parallel pytest-xdist workers never collide.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip.checkpoint import rank_file, read_latest, write_latest

pytestmark = pytest.mark.slow  # each torchrun costs several seconds

REPO = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"algo", "task", "world_size", "steps", "final_loss_mean", "final_accuracy_mean",
                "per_rank", "wall_seconds"}
PER_RANK_KEYS = {"rank", "final_loss", "final_accuracy", "bytes_sent", "sync_seconds"}
TIMING_KEYS = {"sync_seconds", "sync_seconds_total", "wall_seconds"}


def torchrun(out: Path, *args: str, nproc: int = 2, max_restarts: int = 0,
             env: dict[str, str] | None = None, check: bool = True,
             timeout: float = 240) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", f"--max-restarts={max_restarts}",
           "-m", "launch.train", "--out", str(out), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHELASTIC_")}
    full_env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                    f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_run_dir(out: Path, algo: str, task: str, steps: int, *, accuracy: bool = True) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert (summary["algo"], summary["task"], summary["world_size"], summary["steps"]) == \
        (algo, task, 2, steps)
    assert [r["rank"] for r in summary["per_rank"]] == [0, 1]
    for r in summary["per_rank"]:
        assert set(r) >= PER_RANK_KEYS
        assert r["bytes_sent"] > 0 and math.isfinite(r["final_loss"])
    assert math.isfinite(summary["final_loss_mean"])
    assert (summary["final_accuracy_mean"] is not None) == accuracy

    config = json.loads((out / "config.json").read_text())
    assert config["train"]["algo"] == algo and config["world_size"] == 2

    recs = records(out)
    kinds = {r["kind"] for r in recs}
    assert kinds == {"sync", "eval", "consensus"}
    for kind in ("sync", "eval"):
        assert {r["node"] for r in recs if r["kind"] == kind} == {0, 1}
    assert max(r["step"] for r in recs) == steps
    assert all(r["consensus_distance"] >= 0 for r in recs if r["kind"] == "consensus")
    keys = [(r["kind"], r["step"], r.get("node")) for r in recs]
    assert len(keys) == len(set(keys)), "duplicate records"

    assert (out / "loss.png").stat().st_size > 0
    assert (out / "accuracy.png").exists() == accuracy
    return summary


def assert_same_state(a: Any, b: Any, where: str = "") -> None:
    """Bit-identical nested checkpoint content."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_final(ref: Path, other: Path, step: int, ignore: frozenset[str] = frozenset()
                      ) -> None:
    for rank in range(2):
        a = torch.load(rank_file(ref, step, rank), weights_only=True)
        b = torch.load(rank_file(other, step, rank), weights_only=True)
        for key in ("params", "optimizer", "algorithm", "data", "rng", "step", "meta"):
            assert_same_state(a[key], b[key], f"rank {rank} {key}")
        for key in ("bytes_sent", "syncs"):
            assert a["launcher"][key] == b["launcher"][key]
    # the metrics agree too (bar timings), each record once
    def strip(recs: list[dict]) -> dict:
        return {(r["kind"], r["step"], r.get("node")): {k: v for k, v in r.items()
                                                        if k not in TIMING_KEYS | ignore}
                for r in recs}
    ra, rb = strip(records(ref)), strip(records(other))
    assert len(records(other)) == len(rb), "duplicate records after resume"
    assert {k: v for k, v in rb.items() if k in ra} == {k: ra[k] for k in rb if k in ra}
    assert set(ra) <= set(rb)


COMMON = ("--task", "digits", "--sync-every", "5", "--eval-every", "10")


@pytest.mark.parametrize(("algo", "task", "extra"), [
    ("dpsgd", "synthetic", ("--topology", "exponential", "--steps", "20")),
    ("gossip", "charlm", ("--steps", "6", "--sync-every", "2", "--eval-every", "3",
                          "--batch-size", "4")),
])
def test_run_writes_run_directory(tmp_path: Path, algo: str, task: str, extra: tuple) -> None:
    out = tmp_path / "run"
    proc = torchrun(out, "--algo", algo, "--task", task, *extra)
    steps = int(extra[extra.index("--steps") + 1])
    check_run_dir(out, algo, task, steps, accuracy=task != "synthetic")
    assert "averaged model" in proc.stdout  # rank 0's results table
    assert proc.stdout.count("mean ") == 1  # printed once, by rank 0 only


# One algorithm: the launcher saves and restores ``algo.state_dict()`` whatever the algorithm
# (DiLoCo's holds the most: the outer optimizer's momentum); every algorithm's state continuing
# bit for bit, gossip-vc included, is pinned by
# tests/test_algorithms.py::test_state_dict_round_trip_continues_bit_for_bit.
@pytest.mark.parametrize("algo", ["diloco"])
def test_resume_from_checkpoint_is_bit_exact(tmp_path: Path, algo: str) -> None:
    ref = tmp_path / "ref"
    torchrun(ref, "--algo", algo, *COMMON, "--steps", "30", "--checkpoint-every", "15",
             "--partition", "dirichlet:0.5")
    summary = check_run_dir(ref, algo, "digits", 30)
    assert summary["final_accuracy_mean"] > 0.5
    # a run that stopped at step 15: the reference's first checkpoint, marked latest
    part = tmp_path / "part"
    shutil.copytree(rank_file(ref, 15, 0).parent, rank_file(part, 15, 0).parent)
    marker = read_latest(ref)
    assert marker is not None and marker["step"] == 30
    write_latest(part, 15, {k: v for k, v in marker.items() if k not in ("step", "files")},
                 ranks=marker["world_size"])
    shutil.copy(ref / "metrics.jsonl", part / "metrics.jsonl")  # with records past 15
    torchrun(part, "--algo", algo, *COMMON, "--steps", "30", "--checkpoint-every", "15",
             "--partition", "dirichlet:0.5", "--resume")
    assert_same_final(ref, part, 30)
    assert json.loads((part / "summary.json").read_text())["resumed_from_step"] == 15


NOLOCO = ("--algo", "noloco", *COMMON, "--checkpoint-every", "15")


@pytest.fixture(scope="module")
def noloco_ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 uninterrupted noloco steps, checkpoints at 15 and 30: the reference of both tests
    below (they share one xdist worker, so it runs once)."""
    ref = tmp_path_factory.mktemp("noloco") / "ref"
    torchrun(ref, *NOLOCO, "--steps", "30")
    check_run_dir(ref, "noloco", "digits", 30)
    return ref


@pytest.mark.xdist_group("train_noloco_ref")
def test_stop_then_resume_is_bit_exact(tmp_path: Path, noloco_ref: Path) -> None:
    """noloco: --steps 15 with a checkpoint, then --steps 30 --resume == 30 steps at once."""
    part = tmp_path / "part"
    torchrun(part, *NOLOCO, "--steps", "15")
    assert read_latest(part)["step"] == 15
    torchrun(part, *NOLOCO, "--steps", "30", "--resume")
    # the stopped run evaluated at its last step, 15: the next eval's mean train loss covers
    # steps 16-20 instead of 11-20
    assert_same_final(noloco_ref, part, 30, ignore=frozenset({"train_loss"}))


@pytest.mark.xdist_group("train_noloco_ref")
def test_crash_and_torchrun_restart_is_bit_exact(tmp_path: Path, noloco_ref: Path) -> None:
    """noloco: rank 1 dies at step 20; torchrun --max-restarts 1 resumes from step 15."""
    crashed = tmp_path / "crashed"
    proc = torchrun(crashed, *NOLOCO, "--steps", "30", "--resume", max_restarts=1,
                    env={"GOSSIP_FAULT_EXIT_AT_STEP": "20"})
    assert "exiting on purpose" in proc.stderr
    assert "resumed from" in proc.stderr
    assert_same_final(noloco_ref, crashed, 30)
