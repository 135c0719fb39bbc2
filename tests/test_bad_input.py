"""Bad input gets a clear error that names what is wrong, and nothing on disk is lost.

One test per row of the table in docs/errors.md. The launcher cases run ``python -m
launch.train`` as a user would (a subprocess: it initialises a process group); the simulator
cases call its CLI entry in-process. Checkpoint cases live in tests/test_checkpoint.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from simulations.run import main as sim_main

ROOT = Path(__file__).resolve().parents[1]


def _train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=cwd, text=True,
                          capture_output=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT),
                               "OMP_NUM_THREADS": "1"})


def _sim(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert sim_main(list(args)) == 2
    return capsys.readouterr().err


def test_invalid_config_value_names_field_and_value(tmp_path: Path) -> None:
    out = tmp_path / "run"
    res = _train("--steps", "0", "--out", str(out), cwd=tmp_path)
    assert res.returncode == 2
    assert "steps" in res.stderr and "0" in res.stderr
    assert not out.exists()  # nothing written


def test_unknown_algorithm_lists_the_known_ones(tmp_path: Path) -> None:
    res = _train("--algo", "fedprox", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert res.returncode == 2
    assert "algo" in res.stderr and "'fedprox'" in res.stderr and "noloco" in res.stderr


def test_unknown_topology_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _sim(capsys, "--algo", "gossip", "--nodes", "8", "--topology", "hypercube",
               "--rounds", "1", "--out", str(tmp_path / "sim"))
    assert "hypercube" in err and "ring" in err  # the bad name and the known ones
    assert not (tmp_path / "sim").exists()


def test_nodes_not_divisible_by_group_size(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    err = _sim(capsys, "--algo", "noloco", "--nodes", "7", "--rounds", "1",
               "--out", str(tmp_path / "sim"))
    assert "group_size=2" in err and "7" in err
    res = _train("--algo", "noloco", "--steps", "5", "--sync-every", "5",
                 "--out", str(tmp_path / "run"), cwd=tmp_path)  # one process: N = 1
    assert res.returncode == 2 and "group_size=2" in res.stderr and "N=1" in res.stderr


def test_dpsgd_rejects_weights_that_are_not_doubly_stochastic(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _sim(capsys, "--algo", "dpsgd", "--nodes", "5", "--topology", "star",
               "--topology-weights", "uniform", "--rounds", "1", "--out", str(tmp_path / "sim"))
    assert "doubly stochastic" in err and "'star'" in err and "column 0" in err
    assert "metropolis" in err  # what to use instead
    assert not (tmp_path / "sim").exists()


def test_disconnected_topology_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edges = tmp_path / "two_islands.txt"
    edges.write_text("0 1\n1 2\n2 3\n3 0\n4 5\n5 6\n6 7\n7 4\n")
    before = edges.read_text()
    err = _sim(capsys, "--algo", "dpsgd", "--nodes", "8", "--topology", f"file:{edges}",
               "--rounds", "1", "--out", str(tmp_path / "sim"))
    assert "disconnected" in err
    assert edges.read_text() == before
