"""A full disk, for real: a run directory on a small tmpfs (mounted in a private mount namespace,
``unshare -m``) fills while a checkpoint is written. The command stops with one line naming the
disk and what the run kept, no traceback; the last complete checkpoint is intact; after room is
made (the tmpfs remounted larger), ``--resume`` finishes the run with the records of a run that
never stopped."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: what may differ between a resumed run and the straight one: timings
TIMES = ("wall_seconds", "cpu_seconds", "build_seconds", "node_steps_per_second", "unix_time",
         "sync_seconds", "sync_seconds_total", "seconds")


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, timeout=30, check=False)
    return probe.returncode == 0


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and mount (root)")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TORCHELASTIC_", "GOSSIP_FAULT"))}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    return env


def _rows(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_in_namespace(tmp_path: Path, script: str, timeout: float = 600) -> Path:
    """Run the shell lines ``script`` in a private mount namespace, DISK standing for
    ``tmp_path/disk`` (a directory to mount a tmpfs on) and KEPT for ``tmp_path/kept`` (where
    the script copies what must outlive the namespace, whose tmpfs goes with it); returns KEPT."""
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    kept.mkdir()
    script = "set -u\n" + script.replace("DISK", str(disk)).replace("KEPT", str(kept))
    subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=_env(), timeout=timeout,
                   check=True)
    return kept


def _fill_then_resume(tmp_path: Path, command: list[str], size: str) -> dict[str, Any]:
    """Run ``command`` (its ``--out`` is ``DISK/run``) on a tmpfs of ``size``, then, with the
    tmpfs remounted at 64 MiB, the same command with ``--resume``. Returns both exit codes and
    outputs, and what the run directory held in between and at the end."""
    cmd = " ".join(shlex.quote(c) for c in command)
    kept = run_in_namespace(tmp_path, f"""
mount -t tmpfs -o size={size} tmpfs DISK
{cmd} > KEPT/first.out 2> KEPT/first.err; echo $? > KEPT/first.rc
cp -r DISK/run KEPT/full
mount -o remount,size=64m DISK
{cmd} --resume > KEPT/second.out 2> KEPT/second.err; echo $? > KEPT/second.rc
cp -r DISK/run KEPT/end
""")
    return {"rc": [int((kept / f"{p}.rc").read_text()) for p in ("first", "second")],
            "err": (kept / "first.err").read_text(), "second": (kept / "second.err").read_text(),
            "full": kept / "full", "end": kept / "end"}


def _straight(tmp_path: Path, command: list[str]) -> Path:
    out = tmp_path / "straight"
    res = subprocess.run([*command[:-1], str(out)], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_a_simulation_that_fills_the_disk_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    # 16 nodes of the digits MLP: a checkpoint is 0.6 MB; the second does not fit in 1,000 KiB
    command = [sys.executable, "-m", "simulations.run", "--nodes", "16", "--rounds", "6",
               "--checkpoint-every", "2", "--no-progress", "--out",
               str(tmp_path / "disk" / "run")]
    got = _fill_then_resume(tmp_path, command, "1000k")
    assert got["rc"] == [1, 0], got["err"][-3000:] + got["second"][-3000:]
    assert "Traceback" not in got["err"]
    assert "error: no space left on the device of" in got["err"]
    assert "could not write rank_0.pt" in got["err"]
    assert "stopped: kept" in got["err"] and "--resume continues from round 2" in got["err"]
    marker = json.loads((got["full"] / "checkpoints" / "latest").read_text())
    assert marker["step"] == 2
    assert not list(got["full"].rglob("*.tmp"))  # the half-written checkpoint is gone
    assert _rows(got["end"]) == _rows(_straight(tmp_path, command))


def test_a_real_run_that_fills_the_disk_stops_cleanly_and_resumes(tmp_path: Path) -> None:
    # one rank of the digits MLP: checkpoints of 48 KiB; the second does not fit in 100 KiB
    command = [sys.executable, "-m", "launch.train", "--task", "digits", "--algo", "fedavg",
               "--steps", "30", "--sync-every", "5", "--eval-every", "10",
               "--checkpoint-every", "10", "--out", str(tmp_path / "disk" / "run")]
    got = _fill_then_resume(tmp_path, command, "100k")
    assert got["rc"] == [1, 0], got["err"][-3000:] + got["second"][-3000:]
    assert "Traceback" not in got["err"]
    assert "rank 0 stops: no space left on the device of" in got["err"]
    assert "stopped: kept" in got["err"] and "--resume continues from step 10" in got["err"]
    marker = json.loads((got["full"] / "checkpoints" / "latest").read_text())
    assert marker["step"] == 10
    assert not list(got["full"].rglob("*.tmp"))
    assert _rows(got["end"]) == _rows(_straight(tmp_path, command))


def test_a_comparison_that_fills_the_disk_names_it_and_what_it_kept(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "simulations.compare", "--algos", "fedavg,noloco", "--nodes",
           "4", "--rounds", "3", "--out", str(tmp_path / "disk" / "cmp")]
    kept = run_in_namespace(tmp_path, f"""
mount -t tmpfs -o size=60k tmpfs DISK
{" ".join(shlex.quote(c) for c in cmd)} > KEPT/out 2> KEPT/err; echo $? > KEPT/rc
""")
    err = (kept / "err").read_text()
    assert int((kept / "rc").read_text()) == 1, err[-3000:]
    assert "Traceback" not in err and "error: no space left on" in err.lower()
    assert "(finished, " in err and "--overwrite" not in err  # a finished run needs none
    assert "stopped: kept" in err or "stopped: nothing was written" in err
