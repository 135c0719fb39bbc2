"""Smoke test of benchmarks/sim_end_to_end.py: both sides run as processes and agree on the work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sim_end_to_end_quick() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sim_end_to_end.py"),
                          "--quick"], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         check=False)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    run = next(r for r in recs if r.get("bench") == "end_to_end")
    sim, loop = run["sim"], run["loop"]
    assert "error" not in sim and "error" not in loop, run
    # the same partition and epochs: the same number of client steps on both sides
    assert sim["client_steps"] == loop["client_steps"] > 0
    assert {"accuracy.png", "label_distribution.png", "loss.png"} <= set(sim["plots"])
    assert 0 < sim["startup_s"] < sim["process_wall_s"]
    assert run["steps_ratio"] == pytest.approx(
        sim["client_steps_per_s"] / loop["client_steps_per_s"])
