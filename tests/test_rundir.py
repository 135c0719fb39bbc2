"""Run directories (issue 11, case 6 and 11): one run per directory, --overwrite, Ctrl-C, modes.

The unit tests drive :class:`gossip.rundir.RunDir` itself; the others run the simulator and the
real launcher (``python -m launch.train``, a world of one process) as subprocesses, holding the
lock from another real process and interrupting with a real SIGINT / SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gossip.metrics import append_jsonl, atomic_write_text, read_jsonl
from gossip.rundir import LOCK_NAME, RunDir, run_files

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
SIM = [sys.executable, "-m", "simulations.run", "--algo", "fedavg", "--nodes", "4",
       "--sync-every", "2", "--no-progress"]
TRAIN = [sys.executable, "-m", "launch.train", "--algo", "fedavg", "--sync-every", "5",
         "--eval-every", "5"]

_HOLD = """
import sys, time
from gossip.rundir import RunDir
RunDir(sys.argv[1], overwrite=True).acquire()  # a run that replaces what is there
print("held", flush=True)
time.sleep(120)
"""


def _hold(path: Path) -> subprocess.Popen[str]:
    """Another process that owns ``path`` (as a concurrent run would) until killed."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], env=ENV, text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
            for p in root.rglob("*") if p.is_file() and p.name != LOCK_NAME}


def _finished(path: Path) -> None:
    with RunDir(path) as run_dir:
        atomic_write_text(path / "config.json", "{}\n")
        append_jsonl(path / "metrics.jsonl", [{"step": 1}])
        run_dir.write_summary({"loss": 1.0})


# ----------------------------------------------------------------------------- unit


def test_second_run_into_a_finished_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    _finished(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "loss.png").write_bytes(b"png")
    before = {p: p.read_bytes() for p in run_files(tmp_path)}
    with pytest.raises(ValueError, match="holds a finished run") as info:
        RunDir(tmp_path, resume=False).acquire()  # the launcher, which can resume
    assert "--overwrite" in str(info.value) and str(tmp_path) in str(info.value)
    assert "pass --resume to continue it" in str(info.value)
    with pytest.raises(ValueError, match="holds a finished run") as info:
        RunDir(tmp_path).acquire()  # the simulator: it has no --resume to suggest
    assert "--overwrite" in str(info.value) and "--resume" not in str(info.value)
    with pytest.raises(ValueError, match="without a checkpoint to resume"):
        RunDir(tmp_path, resume=True).acquire()
    assert {p: p.read_bytes() for p in run_files(tmp_path)} == before  # nothing touched
    with RunDir(tmp_path, overwrite=True):
        assert run_files(tmp_path) == []  # the old run's files are gone first
    assert (tmp_path / "notes.txt").read_text() == "mine"  # and nothing else


def test_concurrent_run_is_refused_naming_the_holders_pid(tmp_path: Path) -> None:
    holder = _hold(tmp_path)
    try:
        with pytest.raises(ValueError, match=f"in use by another run \\(PID {holder.pid}\\)"):
            RunDir(tmp_path).acquire()
        with pytest.raises(ValueError, match=f"PID {holder.pid}"):
            RunDir(tmp_path, overwrite=True).acquire()  # not even --overwrite
    finally:
        holder.kill()
        holder.wait()
    with RunDir(tmp_path) as run_dir:  # the holder died: its lock went with it
        assert run_dir.held


def test_out_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"out='.*f' is invalid: it is a file"):
        RunDir(tmp_path / "f").acquire()


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_gets_one_mode_from_the_umask(tmp_path: Path, umask: int) -> None:
    from gossip import checkpoint as ckpt

    old = os.umask(umask)
    try:
        with RunDir(tmp_path) as run_dir:
            atomic_write_text(tmp_path / "config.json", "{}\n")
            append_jsonl(tmp_path / "metrics.jsonl", [{"step": 1}])
            ckpt.atomic_torch_save({"x": 1}, ckpt.rank_file(tmp_path, 1, 0))
            run_dir.write_summary({})
    finally:
        os.umask(old)
    modes = _modes(tmp_path)
    assert len(modes) == 4 and set(modes.values()) == {0o666 & ~umask}, modes


# ----------------------------------------------------------------------------- simulator


def test_simulator_refuses_a_second_run_and_overwrites_on_request(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = subprocess.run([*SIM, "--rounds", "2", "--out", str(out)], env=ENV, text=True,
                           capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert len(set(_modes(out).values())) == 1, _modes(out)
    before = (out / "metrics.jsonl").read_bytes()
    again = subprocess.run([*SIM, "--rounds", "3", "--out", str(out)], env=ENV, text=True,
                           capture_output=True, timeout=300)
    assert again.returncode == 2 and "holds a finished run" in again.stderr, again.stderr
    assert (out / "metrics.jsonl").read_bytes() == before
    holder = _hold(out)
    try:
        busy = subprocess.run([*SIM, "--rounds", "3", "--out", str(out), "--overwrite"],
                              env=ENV, text=True, capture_output=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 2 and f"PID {holder.pid}" in busy.stderr, busy.stderr
    over = subprocess.run([*SIM, "--rounds", "3", "--out", str(out), "--overwrite"], env=ENV,
                          text=True, capture_output=True, timeout=300)
    assert over.returncode == 0, over.stderr
    assert [r["round"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "round"] \
        == [1, 2, 3]


def _interrupt_when_recorded(cmd: list[str], out: Path, sig: int
                             ) -> tuple[subprocess.Popen[str], str]:
    """Start ``cmd``, send ``sig`` once ``out`` holds two records; the process and its stderr."""
    proc = subprocess.Popen(cmd, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                             signal.default_int_handler))
    deadline = time.monotonic() + 300
    path = out / "metrics.jsonl"
    while not (path.exists() and len(read_jsonl(path)) >= 2):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc, err


def _check_interrupted(out: Path) -> None:
    summary = json.loads((out / "summary.json").read_text())
    records = read_jsonl(out / "metrics.jsonl")  # every line parses
    assert summary["status"] == "interrupted"
    assert summary["last_step"] >= 1
    assert not list(out.glob("*.png"))  # plots only at a successful end
    with RunDir(out, overwrite=True):  # the lock was given back
        pass
    assert records


def test_simulator_ctrl_c_leaves_an_interrupted_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc, err = _interrupt_when_recorded([*SIM, "--rounds", "100000", "--out", str(out)], out,
                                         signal.SIGINT)
    _check_interrupted(out)
    # one line naming what was kept, no traceback (tests/test_faults2.py: the other CLIs)
    assert proc.returncode == 130, err
    assert err.strip().startswith(f"interrupted: kept {out} (marked interrupted at round "), err
    assert len(err.strip().splitlines()) == 1, err


# ----------------------------------------------------------------------------- real launcher


@pytest.mark.slow
@pytest.mark.timeout(900)  # four real launches
def test_launcher_refuses_second_and_concurrent_runs_and_records_interrupts(tmp_path: Path
                                                                            ) -> None:
    out = tmp_path / "run"
    first = subprocess.run([*TRAIN, "--steps", "10", "--out", str(out)], env=ENV, text=True,
                           capture_output=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert len(set(_modes(out).values())) == 1, _modes(out)
    before = {p.name: p.read_bytes() for p in run_files(out) if p.is_file()}
    again = subprocess.run([*TRAIN, "--steps", "10", "--out", str(out)], env=ENV, text=True,
                           capture_output=True, timeout=300)
    assert again.returncode == 2 and "holds a finished run" in again.stderr, again.stderr
    assert {p.name: p.read_bytes() for p in run_files(out) if p.is_file()} == before
    holder = _hold(out)
    try:
        busy = subprocess.run([*TRAIN, "--steps", "10", "--out", str(out), "--overwrite"],
                              env=ENV, text=True, capture_output=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert busy.returncode == 2 and f"PID {holder.pid}" in busy.stderr, busy.stderr
    proc, _ = _interrupt_when_recorded([*TRAIN, "--steps", "1000000", "--out", str(out),
                                        "--overwrite"], out, signal.SIGTERM)
    assert proc.returncode == 130
    _check_interrupted(out)
