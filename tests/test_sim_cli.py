"""The command line, config files, run directories and the comparison job."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

from gossip.metrics import read_jsonl
from simulations import compare
from simulations import run as sim_run
from simulations.config import SimConfig, build_parser, from_args
from simulations.run import main

torch.set_num_threads(1)  # small kernels: threads only add overhead (and xdist runs 2)

SUMMARY_KEYS = {"algo", "nodes", "rounds", "final_accuracy_mean", "final_loss_mean",
                "bytes_per_node", "simulated_seconds", "wall_seconds", "rounds_to_90"}
RECORD_KEYS = {"round", "accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean",
               "loss_min", "loss_max", "consensus_distance", "bytes_total", "bytes_per_node",
               "sim_seconds", "wall_seconds", "train_loss"}


def test_every_field_is_a_flag() -> None:
    import dataclasses

    flags = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(SimConfig)} <= flags


def test_cli_writes_the_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    code = main(["--algo", "gossip-vc", "--nodes", "8", "--topology", "ring", "--partition",
                 "dirichlet:0.5", "--rounds", "3", "--eval-every", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "gossip-vc on digits: 8 nodes, 3 rounds" in printed and str(out) in printed
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png", "loss.png",
                 "consensus.png", "label_distribution.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["rounds"] == 3 and summary["nodes"] == 8
    records = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "round"]
    assert [r["round"] for r in records] == [1, 2, 3]
    assert records[1].keys() >= RECORD_KEYS and "accuracy_mean" not in records[0]
    assert records[2].keys() >= RECORD_KEYS  # the last round is always evaluated
    config = json.loads((out / "config.json").read_text())
    assert config["topology"] == "ring" and config["optimizer"] == "sgd"


def test_toml_config_and_flag_override(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text('algo = "noloco"\nnodes = 6\nsync-every = 7\nnoloco-alpha = 0.3\n')
    cfg = from_args(["--config", str(path), "--nodes", "4"])
    assert (cfg.algo, cfg.nodes, cfg.sync_every, cfg.noloco_alpha) == ("noloco", 4, 7, 0.3)
    assert SimConfig.from_toml(path) == SimConfig(algo="noloco", nodes=6, sync_every=7,
                                                  noloco_alpha=0.3)
    path.write_text("nodez = 3\n")
    with pytest.raises(ValueError, match="unknown key 'nodez'"):
        from_args(["--config", str(path)])


def test_cli_reports_bad_values(capsys: pytest.CaptureFixture) -> None:
    assert main(["--algo", "noloco", "--nodes", "7"]) == 2
    assert "nodes=7" in capsys.readouterr().err


def test_actors_go_to_the_ray_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    fake = types.ModuleType("simulations.ray_backend")
    fake.run_on_ray = lambda cfg: seen.append(cfg) or {"ok": True}  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "simulations.ray_backend", fake)
    import simulations

    monkeypatch.setattr(simulations, "ray_backend", fake, raising=False)
    cfg = SimConfig(nodes=8, actors=2)
    assert sim_run.run(cfg) == {"ok": True} and seen == [cfg]


def test_compare_runs_every_algorithm(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = compare.main(["--nodes", "8", "--rounds", "2", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    for algo in compare.DEFAULT_ALGOS:
        assert algo in printed
        assert (tmp_path / algo / "summary.json").exists()
    assert (tmp_path / "comparison.png").exists()
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert set(table) == set(compare.DEFAULT_ALGOS)
    assert table["noloco"]["bytes_per_node"] < table["dpsgd"]["bytes_per_node"]


def test_compare_again_into_the_same_out_needs_overwrite(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    args = ["--algos", "fedavg", "--nodes", "4", "--rounds", "1", "--out", str(tmp_path)]
    assert compare.main(args) == 0
    first = (tmp_path / "fedavg" / "metrics.jsonl").read_text()
    assert compare.main(args) == 2  # a finished run is never replaced silently
    assert "holds a finished run" in capsys.readouterr().err
    assert (tmp_path / "fedavg" / "metrics.jsonl").read_text() == first
    assert compare.main([*args, "--overwrite"]) == 0  # what scripts/demo.sh passes
    assert json.loads((tmp_path / "fedavg" / "summary.json").read_text())["status"] == "finished"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only build")
def test_cuda_without_cuda_is_a_clear_error() -> None:
    """--device cuda on a machine without CUDA: a ValueError naming the device before anything
    is built (it was an AssertionError from deep in torch)."""
    from simulations.engine import Simulation

    with pytest.raises(ValueError, match="device='cuda' needs CUDA"):
        Simulation(SimConfig(algo="fedavg", nodes=4, rounds=1, device="cuda"))


BUILT: list[int] = []


def counting_task(seed: int = 0):
    """tests.user_task's task, counting how often a run built it."""
    from tests.user_task import make_task

    BUILT.append(seed)
    return make_task(seed)


def test_a_refused_run_directory_costs_no_build(tmp_path: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    """Into a finished run the simulator refuses before it builds anything (the task is never
    made), and touches none of its files; --overwrite builds and replaces it."""
    BUILT.clear()  # (a rerun in the same process starts from none)
    out = tmp_path / "run"
    args = ["--algo", "fedavg", "--task", f"{__name__}:counting_task", "--nodes", "4",
            "--rounds", "1", "--out", str(out)]
    assert main(args) == 0 and len(BUILT) == 1
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(args) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert len(BUILT) == 1  # refused before the task was made
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert main([*args, "--overwrite"]) == 0 and len(BUILT) == 2
