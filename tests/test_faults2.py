"""Fault paths and footguns of the launchers, checkpoints, simulator config and attach.

Real processes throughout: ranks frozen with SIGSTOP or never started before the process group
forms, a prune SIGKILLed midway, a rank SIGKILLed mid-run under ``launch.spawn`` and the run
resumed, and real SIGINTs to the three command lines.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gossip
from gossip import checkpoint as ckpt
from gossip.comm import StackedCommunicator
from gossip.metrics import read_jsonl
from launch.config import TrainConfig
from launch.rank import free_port
from simulations.config import SimConfig
from simulations.faults import FaultSchedule

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
TRAIN = [sys.executable, "-m", "launch.train", "--algo", "fedavg", "--task", "digits",
         "--sync-every", "5", "--eval-every", "5"]


def _sigint_default() -> None:
    """A child of a non-interactive shell or of pytest may ignore SIGINT: a terminal's Ctrl-C
    reaches a process whose SIGINT raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


# ------------------------------------------------------------------ 1. ranks that never join


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_start_up_names_the_ranks_that_never_joined(tmp_path: Path) -> None:
    """Gloo's own start-up timeout named no rank (``DistStoreError: Timed out after 4 seconds
    waiting for clients. 1/2 clients joined.``; under torchrun ``wait timeout after 8000ms, keys:
    /default_pg/0//cpu//0/1``). Three stores: rank 0 hosts it (env://) and rank 1 is frozen
    before it joins; torchrun's agent store (its environment, the store hosted here) and rank 1
    never started; a launcher's store (launch.spawn) and rank 2 of 3 never started."""
    from launch.spawn import spawn
    from launch.store import host_store

    agent = host_store()  # what torchrun's agent serves
    cases = {"env": (free_port(), {}),
             "torchrun": (agent.port, {"TORCHELASTIC_USE_AGENT_STORE": "True",
                                       "TORCHELASTIC_RESTART_COUNT": "0"})}
    procs = {}
    for name, (port, extra) in cases.items():
        for rank in (1, 0) if name == "env" else (0,):
            env = {**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(port), **extra}
            procs[name, rank] = subprocess.Popen(
                [*TRAIN, "--steps", "10", "--timeout", "3", "--out", str(tmp_path / name)],
                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            if rank == 1:
                os.kill(procs[name, 1].pid, signal.SIGSTOP)  # frozen while Python starts
    try:
        for name in cases:
            _, err = procs[name, 0].communicate(timeout=120)  # never hangs
            assert procs[name, 0].returncode == 3, (name, err)
            assert "rank(s) [1] of 2 never joined the process group within timeout=3 s" in err, \
                (name, err)
            assert "Traceback" not in err, (name, err)
    finally:
        procs["env", 1].kill()
        procs["env", 1].communicate()

    store = host_store()  # a standalone store, as `python -m launch.store` serves
    codes = spawn([*TRAIN[3:], "--steps", "10", "--timeout", "3", "--out", str(tmp_path / "b")],
                  nproc=2, world_size=3, store=f"127.0.0.1:{store.port}", run_id="faults2",
                  log_dir=tmp_path / "logs")
    assert codes == {0: 3, 1: 3}, codes
    for rank in (0, 1):
        log = (tmp_path / "logs" / f"rank_{rank}.log").read_text()
        assert "rank(s) [2] of 3 never joined" in log, log


# ------------------------------------------------------------------ 2. keep the newest K


def _fake_checkpoint(root: Path, step: int, ranks: int, mark: bool = True) -> None:
    for r in range(ranks):
        path = ckpt.rank_file(root, step, r)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(256))
    if mark:
        ckpt.write_latest(root, step, {"world_size": ranks}, ranks=ranks)


def _steps(root: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in ckpt.checkpoint_dir(root).glob("step_*"))


def test_prune_keeps_the_newest_k_never_the_marked_or_a_newer_one(tmp_path: Path) -> None:
    for step in (5, 10, 15):
        _fake_checkpoint(tmp_path, step, 2)
    _fake_checkpoint(tmp_path, 20, 1, mark=False)  # being written: newer than the marker
    assert ckpt.prune(tmp_path, 2) == [5]
    assert _steps(tmp_path) == [10, 15, 20]
    assert ckpt.prune(tmp_path, 1) == [10]
    assert _steps(tmp_path) == [15, 20] and ckpt.read_latest(tmp_path)["step"] == 15
    with pytest.raises(ValueError, match="keep=0 is invalid"):
        ckpt.prune(tmp_path, 0)
    for bad_keep, match in ((0, "keep_checkpoints=0 is invalid: expected an integer >= 1"),
                            (2, "keep_checkpoints=2 is invalid: expected unset without "
                                "checkpoint_every")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(keep_checkpoints=bad_keep,
                        checkpoint_every=5 if bad_keep == 0 else 0)


_KILLED_PRUNE = """
import os, shutil, signal, sys
from gossip import checkpoint as ckpt

def rmtree(path, ignore_errors=False):  # removes one file of the directory, then dies
    os.unlink(os.path.join(path, sorted(os.listdir(path))[0]))
    os.kill(os.getpid(), signal.SIGKILL)

ckpt.shutil.rmtree = rmtree
ckpt.prune(sys.argv[1], 1)
"""


def test_a_prune_killed_midway_loses_nothing_a_resume_reads(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        _fake_checkpoint(tmp_path, step, 3)
    latest = ckpt.read_latest(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _KILLED_PRUNE, str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    base = ckpt.checkpoint_dir(tmp_path)
    assert (base / ".pruning_step_10").is_dir() and _steps(tmp_path) == [20, 30]
    assert ckpt.read_latest(tmp_path) == latest  # the marker and its files: untouched
    for r in range(3):
        path = ckpt.rank_file(tmp_path, 30, r)
        assert ckpt.file_sha256(path) == ckpt.expected_sha256(tmp_path, latest, path)
    assert ckpt.prune(tmp_path, 1) == [20]  # the next prune clears the killed one's leftovers
    assert sorted(p.name for p in base.iterdir()) == ["latest", "step_30"]


# ------------------------------------------------------------------ 3. after a death


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_after_a_death_the_survivors_checkpoints_are_the_resume_point(tmp_path: Path) -> None:
    """``latest`` stayed at the last checkpoint the dead rank had written (step 20 of 80); now it
    moves with the survivors' and the resume continues from their newest. ``--keep-checkpoints
    2`` end to end on the way: the two newest are left, and the resume picks the newest."""
    from benchmarks.dead_peer import run_case
    from launch.spawn import spawn

    flags = ["--checkpoint-every", "20", "--keep-checkpoints", "2"]
    res = run_case("gossip", mode="kill", world=3, victim=2, steps=80, kill_at=20, timeout=60,
                   dead_after=10, out=tmp_path, extra=flags)
    assert res["status"] == 0 and res["dead"] == [2], res
    out = tmp_path / "gossip_kill"
    latest = ckpt.read_latest(out)
    assert latest["step"] == 80 and latest["absent"] == [2], latest
    assert sorted(latest["files"]) == ["step_80/rank_0.pt", "step_80/rank_1.pt"]
    assert _steps(out) == [60, 80]
    counters = torch.load(ckpt.rank_file(out, 80, 0), weights_only=True)["launcher"]

    argv = ["--algo", "gossip", "--task", "digits", "--topology", "ring", "--steps", "90",
            "--sync-every", "10", "--eval-every", "50", "--out", str(out),
            "--survive-failures", "--timeout", "60", "--dead-after", "10", *flags, "--resume"]
    codes = spawn(argv, nproc=3, dead_after=10, log_dir=tmp_path / "resume_logs")
    assert codes == {0: 0, 1: 0, 2: 0}, codes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from_step"] == 80 and summary["survivors"] == [0, 1, 2]
    log = (tmp_path / "resume_logs" / "rank_0.log").read_text()
    assert "has no file of rank(s) [2]" in log and "from rank 0's state" in log, log
    # rank 2 went on from rank 0's state: its counters continue rank 0's
    sync = next(r for r in read_jsonl(out / "ranks" / "rank_2.jsonl")
                if r["kind"] == "sync" and r["step"] == 90)
    assert sync["bytes_total"] == counters["bytes_sent"] + sync["bytes_sent"]
    final = ckpt.read_latest(out)
    assert final["step"] == 90 and "absent" not in final and _steps(out) == [80, 90]


# ------------------------------------------------------------------ 4. fractions of no node


def test_a_fault_fraction_that_picks_no_node_is_refused() -> None:
    with pytest.raises(ValueError, match=r"crash_fraction=0.01 is invalid with nodes=10: .* "
                                         r"rounds to 0 nodes"):
        SimConfig(algo="gossip", nodes=10, crash_fraction=0.01)
    for name in ("churn_fraction", "straggler_fraction"):
        with pytest.raises(ValueError, match=rf"{name}=0.04 is invalid with nodes=10"):
            SimConfig(algo="gossip", nodes=10, **{name: 0.04})
        with pytest.raises(ValueError, match=rf"{name}=0.04 is invalid with nodes=10"):
            FaultSchedule(10, 5, seed=0, **{name: 0.04})
    assert (~FaultSchedule(10, 5, seed=0, crash_fraction=0.1).alive(0)).sum() == 1


# ------------------------------------------------------------------ 5. Ctrl-C


def _interrupt(cmd: list[str], ready: Path | None, tmp_path: Path) -> tuple[int, str]:
    """Start ``cmd``, SIGINT it once ``ready`` holds a record (None: at once), return its exit
    status and stderr."""
    proc = subprocess.Popen(cmd, env=ENV, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=_sigint_default, cwd=tmp_path)
    deadline = time.monotonic() + 240
    while ready is not None and not (ready.exists() and read_jsonl(ready)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    if ready is None:
        time.sleep(1.0)  # while it imports torch
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_is_one_line_naming_what_was_kept_and_exit_130(tmp_path: Path) -> None:
    code, err = _interrupt([sys.executable, "-m", "simulations.run", "--algo", "gossip",
                            "--nodes", "4", "--rounds", "100000"], None, tmp_path)
    # (on a machine that imports torch within the second: the run's own line, without --out)
    assert code == 130 and _one_line(err) in ("interrupted during start-up: nothing was written",
                                              "interrupted: nothing was written")

    out = tmp_path / "cmp"
    code, err = _interrupt([sys.executable, "-m", "simulations.compare", "--algos",
                            "fedavg,noloco", "--nodes", "4", "--rounds", "100000", "--out",
                            str(out)], out / "fedavg" / "metrics.jsonl", tmp_path)
    line = _one_line(err)
    records = len(read_jsonl(out / "fedavg" / "metrics.jsonl"))
    summary = json.loads((out / "fedavg" / "summary.json").read_text())
    assert code == 130 and summary["status"] == "interrupted"
    assert line == (f"interrupted: kept {out / 'fedavg'} (marked interrupted at round "
                    f"{summary['last_step']} of 100000, {records} records, no checkpoint: "
                    "--overwrite starts it again)"), line

    out = tmp_path / "train"
    code, err = _interrupt([*TRAIN, "--steps", "1000000", "--checkpoint-every", "5", "--out",
                            str(out)], out / "metrics.jsonl", tmp_path)
    summary = json.loads((out / "summary.json").read_text())
    latest = ckpt.read_latest(out)  # None when stopped between the first records and marker
    resume = ", no checkpoint: --overwrite starts it again" if latest is None \
        else f", --resume continues from step {latest['step']}"
    records = len(read_jsonl(out / "metrics.jsonl"))
    assert code == 130 and summary["status"] == "interrupted"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].endswith(  # after the run's progress lines
        f"WARNING launch.train: interrupted: kept {out} (marked interrupted at step "
        f"{summary['last_step']} of 1000000, {records} records{resume})"), err


# ------------------------------------------------------------------ 6. a dropped Attached


def test_a_dropped_attached_still_syncs_and_the_refusal_says_how_to_close_it() -> None:
    """A dropped handle is not released: its hook on the optimizer keeps syncing, as a torch
    hook does when its handle is dropped (releasing it on collection would turn
    ``gossip.attach(model, opt, cfg)`` without a name into silent local training). The refusal
    of a second attach says how to close it without the handle."""
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gossip.attach(model, opt, gossip.FedAvgConfig(sync_every=2), StackedCommunicator(1))
    gc.collect()
    for _ in range(2):
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    dropped = gossip.Attached.of(model)
    assert dropped is not None and dropped.step == 2 and dropped.last_stats is not None
    assert gossip.Attached.of(opt) is dropped
    del dropped
    with pytest.raises(ValueError, match=textwrap.dedent(r"""
            model is already attached \(fedavg, step 2\) and that Attached still syncs at
            every optimizer.step\(\), also when no variable holds it any more: close it before
            attaching again \(leave its with block, or gossip.Attached.of\(model\).close\(\)\)
            """).strip().replace("\n", " ")):
        gossip.attach(model, opt, gossip.FedAvgConfig(sync_every=2), StackedCommunicator(1))
    gossip.Attached.of(model).close()
    assert gossip.Attached.of(model) is None and gossip.Attached.of(opt) is None
    again = gossip.attach(model, opt, gossip.FedAvgConfig(sync_every=2), StackedCommunicator(1))
    assert gossip.Attached.of(model) is again
    again.close()
