"""simulations.ray_backend on a real local Ray cluster: the nodes sharded over 1, 2 or 4 actors
give the same run (parameters and metrics) as the in-process simulator, and engine.run writes
the same run directory."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("ray")

from gossip.rundir import RunDir
from raytools.workers import WorkerGroup, WorkerGroupConfig, WorkerGroupError
from simulations.config import SimConfig
from simulations.engine import Simulation, drive
from simulations.ray_backend import RaySimulation, run_on_ray, shard_ranges
from simulations.run import run
from tests.distributed import signal_when

ALGOS = ("fedavg", "noloco", "gossip-vc")
#: metrics measured on the wall clock (or per process) rather than computed
WALL_KEYS = ("wall_seconds", "build_seconds", "node_steps_per_second", "actors", "backend")


def _config(algo: str, actors: int = 1, **changes: Any) -> SimConfig:
    return SimConfig(algo=algo, nodes=8, rounds=3, sync_every=4, seed=5, eval_samples=256,
                     partition="dirichlet:0.5", progress=False, actors=actors, **changes)


def _assert_records_close(got: list[dict[str, Any]], want: list[dict[str, Any]]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for k in g:
            if k in WALL_KEYS:
                continue
            if isinstance(w[k], float):
                assert math.isclose(g[k], w[k], rel_tol=1e-5, abs_tol=1e-7), (g["round"], k)
            else:
                assert g[k] == w[k], (g["round"], k)


@pytest.fixture(scope="module")
def in_process() -> dict[str, tuple[list[dict[str, Any]], torch.Tensor]]:
    """Each algorithm run by the in-process engine (1 actor): records and final [N, P]."""
    out = {}
    for algo in ALGOS:
        sim = Simulation(_config(algo))
        summary = drive(sim, out=None, progress=False)
        out[algo] = (summary["records"], sim.flat_params())
    return out


def test_shards_are_equal_contiguous_ranges() -> None:
    assert shard_ranges(8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    assert shard_ranges(8, 1) == [range(0, 8)]
    with pytest.raises(ValueError, match="actors must divide nodes"):
        shard_ranges(10, 4)
    with pytest.raises(ValueError, match="actors=16"):
        shard_ranges(8, 16)


def test_engine_run_hands_sharded_runs_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    from simulations import ray_backend

    seen: list[SimConfig] = []
    monkeypatch.setattr(ray_backend, "run_on_ray", lambda cfg: seen.append(cfg) or {"ok": 1})
    cfg = _config("fedavg", actors=2)
    assert run(cfg) == {"ok": 1} and seen == [cfg]


@pytest.mark.ray
@pytest.mark.parametrize("actors", [2, 4])
def test_same_results_on_any_number_of_actors(
        ray_cluster: str, in_process: dict[str, tuple[list[dict[str, Any]], torch.Tensor]],
        actors: int, tmp_path: Path) -> None:
    with WorkerGroup(WorkerGroupConfig(num_workers=actors)) as workers:
        for algo in ALGOS:
            want_records, want_params = in_process[algo]
            with RaySimulation(_config(algo, actors), workers=workers) as sim:
                summary = drive(sim, out=None, progress=False)
                params = sim.flat_params()
                evaluated = sim.evaluate()
            assert params.shape == want_params.shape
            torch.testing.assert_close(params, want_params, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, a=algo: f"{a}: {m}")
            _assert_records_close(summary["records"], want_records)
            assert evaluated["nodes"].tolist() == list(range(8))
            assert summary["actors"] == actors
        if actors == 2:  # the whole path once more, with a run directory
            out = tmp_path / "run"
            summary = run_on_ray(_config("gossip-vc", actors, out=str(out)), workers=workers)
            _check_run_dir(out, summary, in_process["gossip-vc"][0])


def _check_run_dir(out: Path, summary: dict[str, Any], want: list[dict[str, Any]]) -> None:
    for name in ("config.json", "metrics.jsonl", "summary.json", "accuracy.png"):
        assert (out / name).is_file(), name
    _assert_records_close(summary["records"], want)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    _assert_records_close([r for r in records if r["kind"] == "round"], want)
    written = json.loads((out / "summary.json").read_text())
    assert written["final_loss_mean"] == summary["final_loss_mean"]
    assert math.isclose(written["final_loss_mean"], want[-1]["loss_mean"], rel_tol=1e-5)
    assert written["actors"] == 2 and written["nodes"] == 8
    config = json.loads((out / "config.json").read_text())
    assert config["actors"] == 2 and config["algo"] == "gossip-vc"


@pytest.mark.ray
def test_a_frozen_shard_is_named_within_the_heartbeat(ray_cluster: str, tmp_path: Path) -> None:
    """Actor 1 is SIGSTOPped after round 2: actor 0 waits for it in a Gloo collective (300 s),
    the driver names actor 1 within its heartbeat, and the run directory keeps its rounds and
    is released: a rerun into it is refused (not blocked by a stale lock, not overwritten)."""
    out = tmp_path / "run"
    cfg = SimConfig(algo="fedavg", nodes=8, rounds=10**6, seed=5, eval_samples=64,
                    progress=False, actors=2, out=str(out))
    workers = WorkerGroup(WorkerGroupConfig(num_workers=2, heartbeat_s=5.0))
    metrics = out / "metrics.jsonl"
    frozen = signal_when(
        lambda: metrics.exists() and metrics.read_text().count('"kind": "round"') >= 2,
        lambda: workers.workers[1].pid, signal.SIGSTOP)
    try:
        with pytest.raises(WorkerGroupError, match=r"rank\(s\) \[1\] stopped answering") as err:
            run_on_ray(cfg, workers=workers)
        assert frozen.is_set() and err.value.ranks == (1,)
        assert not workers.alive
        assert (out / "metrics.jsonl").read_text().count('"kind": "round"') >= 2
        with pytest.raises(ValueError, match="holds another run"):
            RunDir(out).acquire()
    finally:
        workers.shutdown()
