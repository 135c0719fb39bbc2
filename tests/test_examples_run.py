"""Every example runs, at small sizes, as a user would run it (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # three torchruns, start-up bound

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 1100) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / script), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_user_task_resume_is_bit_exact(tmp_path: Path) -> None:
    out = _run("user_task_resume.py", "--steps", "20", "--out", str(tmp_path))
    assert "task moons (user_task_resume:make_task)" in out
    assert "identical: True" in out and "resumed from step 10" in out


def test_lm_sim_compare_runs_both_algorithms(tmp_path: Path) -> None:
    out = _run("lm_sim_compare.py", "--nodes", "4", "--rounds", "2", "--sync-every", "2",
               "--batch-size", "4", "--out", str(tmp_path))
    lines = out.splitlines()
    assert lines[-2].startswith("diloco") and lines[-1].startswith("noloco")
    for algo in ("diloco", "noloco"):
        assert (tmp_path / algo / "summary.json").exists()


def test_user_task_resume_refuses_steps_it_cannot_halve() -> None:
    """--steps 1 used to start torchrun with --steps 0 and fail inside a subprocess."""
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "user_task_resume.py"),
                           "--steps", "1"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2 and "--steps must be even and >= 2" in proc.stderr
