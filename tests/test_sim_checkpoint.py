"""Checkpoints of a simulated run (simulations/checkpoint.py): a run that died (or was stopped
with Ctrl-C) and is resumed gives the same records, summary figures and models, bit for bit, as
the run that never stopped; and what does not fit is refused naming it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip import checkpoint as ckpt
from simulations.config import SimConfig
from simulations.engine import Simulation
from simulations.run import main, run

torch.set_num_threads(1)

BASE = {"task": "digits", "nodes": 8, "rounds": 6, "batch_size": 16, "sync_every": 3,
        "partition": "dirichlet:0.5", "seed": 1, "progress": False, "save_models": True}
CASES = {
    "fedavg": {"momentum": 0.9, "client_fraction": 0.5},
    "diloco": {"overlap": True, "compress": "int8", "error_feedback": True},
    "noloco": {"drop_prob": 0.2},
    "gossip-vc": {"crash_fraction": 0.25, "crash_round": 2, "churn_fraction": 0.25,
                  "straggler_fraction": 0.25, "jitter": 0.3},
    "choco": {},
    "dpsgd": {"optimizer": "adam", "lr": 1e-3, "schedule": "warmup-cosine", "warmup_steps": 3},
}
#: what may differ between a resumed run and the straight one: timings
TIMES = ("wall_seconds", "cpu_seconds", "build_seconds", "node_steps_per_second")


def _cfg(algo: str, out: Path, **kw: Any) -> SimConfig:
    return SimConfig(algo=algo, out=str(out), **BASE, **CASES[algo], **kw)


def _rows(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _summary(out: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads((out / "summary.json").read_text()).items()
            if k not in TIMES}


def _stop_at(monkeypatch: pytest.MonkeyPatch, r: int, error: type[BaseException]) -> None:
    """The process dies (``error`` raised) as round ``r`` starts."""
    start = Simulation.start_round

    def dying(self: Simulation, index: int) -> Any:
        if index == r:
            raise error("the process dies here")
        return start(self, index)
    monkeypatch.setattr(Simulation, "start_round", dying)


@pytest.mark.parametrize("algo", list(CASES))
def test_a_run_resumed_after_it_died_equals_the_run_that_never_stopped(
        algo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    straight, died = tmp_path / "straight", tmp_path / "died"
    run(_cfg(algo, straight))
    with monkeypatch.context() as m:
        _stop_at(m, 5, RuntimeError)  # round 4 (1-based) recorded after the checkpoint of 3
        with pytest.raises(RuntimeError):
            run(_cfg(algo, died, checkpoint_every=3))
    assert ckpt.read_latest(died)["step"] == 3
    assert max(r["round"] for r in _rows(died)) == 4  # written past the checkpoint
    run(_cfg(algo, died, checkpoint_every=3, resume=True))
    assert _rows(died) == _rows(straight)
    assert _summary(died) == _summary(straight)
    a = torch.load(straight / "models.pt", weights_only=True)["params"]
    b = torch.load(died / "models.pt", weights_only=True)["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensorboard_shows_each_step_once_after_a_resume(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run that died wrote round 4 past the checkpoint of round 3; after the resume its
    TensorBoard scalars are the straight run's, each step once (not round 4 twice)."""
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    straight, died = tmp_path / "straight", tmp_path / "died"
    run(_cfg("fedavg", straight, tensorboard=True))
    with monkeypatch.context() as m:
        _stop_at(m, 5, RuntimeError)
        with pytest.raises(RuntimeError):
            run(_cfg("fedavg", died, checkpoint_every=3, tensorboard=True))
    run(_cfg("fedavg", died, checkpoint_every=3, tensorboard=True, resume=True))

    def scalars(out: Path) -> tuple[list[int], list[float]]:
        acc = tb.EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        events = acc.Scalars("round/train_loss")
        return [e.step for e in events], [e.value for e in events]

    rounds = [r for r in _rows(straight) if r["kind"] == "round"]
    steps, losses = [r["step"] for r in rounds], [r["train_loss"] for r in rounds]
    assert len(steps) == 6
    for out in (straight, died):
        got_steps, got_losses = scalars(out)
        assert got_steps == steps and got_losses == pytest.approx(losses)


def test_a_model_with_batchnorm_and_dropout_resumes_bit_exactly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Running statistics (each node's own buffers) and dropout (torch's RNG) continue too."""
    import dataclasses

    from torch import nn

    from gossip.tasks import get_task

    task = dataclasses.replace(get_task("digits", seed=1), model_factory=lambda: nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)))
    straight, died = tmp_path / "straight", tmp_path / "died"
    run(_cfg("fedavg", straight), task=task)
    with monkeypatch.context() as m:
        _stop_at(m, 5, RuntimeError)
        with pytest.raises(RuntimeError):
            run(_cfg("fedavg", died, checkpoint_every=3), task=task)
    run(_cfg("fedavg", died, checkpoint_every=3, resume=True), task=task)
    assert _rows(died) == _rows(straight)
    a, b = (torch.load(out / "models.pt", weights_only=True) for out in (straight, died))
    for part in ("params", "buffers"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert "1.running_mean" in a["buffers"]


def test_ctrl_c_then_resume_with_other_reporting_fields(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(_cfg("noloco", straight))
    with monkeypatch.context() as m:
        _stop_at(m, 4, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            run(_cfg("noloco", stopped, checkpoint_every=2, keep_checkpoints=1))
    assert json.loads((stopped / "summary.json").read_text())["status"] == "interrupted"
    # keep_checkpoints=1: only the newest remains
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["latest", "step_4"]
    # how often it evaluates and threads is not the trajectory: accepted
    run(_cfg("noloco", stopped, checkpoint_every=2, resume=True, eval_every=2, threads=1))
    rounds = [[r for r in _rows(out) if r["kind"] == "round"] for out in (straight, stopped)]
    for a, b in zip(*rounds, strict=True):  # the same figures; round 5 is not evaluated now
        assert b.items() <= a.items()
        assert ("accuracy_mean" in b) == (b["round"] != 5)


def _died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, algo: str = "fedavg") -> Path:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_at(m, 5, RuntimeError)
        with pytest.raises(RuntimeError):
            run(_cfg(algo, out, checkpoint_every=2))
    return out


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def _argv(out: Path, *extra: str) -> list[str]:
    return ["--algo", "fedavg", "--task", "digits", "--nodes", "8", "--rounds", "6",
            "--batch-size", "16", "--sync-every", "3", "--partition", "dirichlet:0.5",
            "--seed", "1", "--momentum", "0.9", "--client-fraction", "0.5", "--out", str(out),
            "--checkpoint-every", "2", "--resume", *extra]


def test_a_resume_that_does_not_fit_is_refused_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _died(tmp_path, monkeypatch)
    before = (out / "metrics.jsonl").read_bytes()
    assert "lr: 0.2 -> 0.1" in _refused(_argv(out, "--lr", "0.1"), capsys)
    assert "nodes=8; this run has nodes=9" in _refused(_argv(out, "--nodes", "9"),
                                                                  capsys)
    other = ["--algo", "noloco", "--task", "digits", "--nodes", "8", "--rounds", "6",
             "--sync-every", "3", "--out", str(out), "--resume"]
    assert "algo='fedavg'; this run has algo='noloco'" in _refused(other, capsys)
    # a flipped byte in the file: refused naming it, by its SHA-256
    path = ckpt.rank_file(out, 4, 0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert f"checkpoint file {path} is corrupted" in _refused(_argv(out), capsys)
    assert (out / "metrics.jsonl").read_bytes() == before  # nothing lost or rewritten


def test_a_finished_run_is_not_resumed_and_a_run_without_checkpoints_is_not_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = _died(tmp_path, monkeypatch)
    assert main(_argv(out)) == 0
    summary = (out / "summary.json").read_bytes()
    assert "holds a finished run" in _refused(_argv(out), capsys)
    assert (out / "summary.json").read_bytes() == summary
    plain = tmp_path / "plain"
    run(SimConfig(algo="fedavg", out=str(plain), **{**BASE, "rounds": 2}))
    assert "without a checkpoint to resume from" in _refused(_argv(plain), capsys)


def test_checkpoint_fields_are_checked_before_any_work() -> None:
    for kw, field in [({"checkpoint_every": 2}, "checkpoint_every"),
                      ({"resume": True}, "resume"),
                      ({"out": "x", "checkpoint_every": 2, "actors": 2}, "checkpoint_every"),
                      ({"out": "x", "keep_checkpoints": 2}, "keep_checkpoints"),
                      ({"out": "x", "checkpoint_every": 2, "keep_checkpoints": 0},
                       "keep_checkpoints"),
                      ({"out": "x", "resume": True, "overwrite": True}, "overwrite")]:
        with pytest.raises(ValueError, match=f"^{field}="):
            SimConfig(algo="fedavg", nodes=4, **kw)


@pytest.mark.slow
def test_a_process_killed_with_sigkill_resumes_to_the_same_run(tmp_path: Path) -> None:
    """A real ``python -m simulations.run`` killed (SIGKILL) mid-run, then resumed by the CLI."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    rounds, out = 120, tmp_path / "killed"
    argv = ["--algo", "gossip-vc", "--task", "digits", "--nodes", "8", "--rounds", str(rounds),
            "--batch-size", "16", "--sync-every", "3", "--partition", "dirichlet:0.5",
            "--seed", "1", "--drop-prob", "0.1", "--out", str(out), "--checkpoint-every", "5",
            "--keep-checkpoints", "2", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, "-m", "simulations.run", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            latest = ckpt.read_latest(out) if (out / "checkpoints" / "latest").exists() else None
            if latest is not None and latest["step"] >= 10:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not (out / "summary.json").exists()
    done = subprocess.run([sys.executable, "-m", "simulations.run", *argv, "--resume"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    straight = tmp_path / "straight"
    run(SimConfig(algo="gossip-vc", task="digits", nodes=8, rounds=rounds, batch_size=16,
                  sync_every=3, partition="dirichlet:0.5", seed=1, drop_prob=0.1,
                  out=str(straight), progress=False, threads=1))
    assert _rows(out) == _rows(straight)
    assert _summary(out) == _summary(straight)


def test_the_marker_lists_no_absent_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """A simulation's one file is complete: the marker names no rank as absent (the node count
    is not a world size of ranks that could have died)."""
    latest = ckpt.read_latest(_died(tmp_path, monkeypatch))
    assert latest is not None and "absent" not in latest and latest["nodes"] == 8
