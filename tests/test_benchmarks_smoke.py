"""Smoke tests of the benchmark scripts (tiny ``--quick`` settings, run as subprocesses), and of
the fast batch schedule the simulator benchmark relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.batching import StackedBatches, node_batch
from gossip.data import partition

# one worker runs the module, so its module-scoped fixture runs once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("benchmarks_smoke")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(BENCH / script), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The scripts started together (they are mostly imports and waiting)."""
    out = tmp_path_factory.mktemp("vv")
    procs = {"throughput": _start("sim_throughput.py", "--quick"),
             "profile": _start("sim_profile.py", "--nodes", "12", "--rounds", "2",
                               "--first-rounds", "2", "--top", "3"),
             "bound": _start("sim_bound.py", "--quick"),
             "variance": _start("reproduce_vanishing_variance.py", "--quick", "--out", str(out))}
    return {"out": out, **{k: _finish(p) for k, p in procs.items()}}


def test_sim_throughput_quick(quick_runs: dict) -> None:
    rc, out, err = quick_runs["throughput"]
    assert rc == 0, err
    recs = _json_lines(out)
    check = next(r for r in recs if r.get("check") == "same_math")
    assert check["max_abs_diff_vs_loop"] < 1e-5  # the loop and the simulator agree
    thr = next(r for r in recs if r.get("bench") == "throughput")
    assert thr["sim_client_steps_per_s"] > 0 and thr["loop_client_steps_per_s"] > 0
    assert thr["ratio_wall"] > 0 and thr["fused_sgd"] is True
    mems = {r["algo"]: r for r in recs if r.get("bench") == "memory"}
    assert set(mems) == {"fedavg", "gossip-vc"}
    for mem in mems.values():
        assert "error" not in mem, mem
        assert mem["peak_bytes_per_node"] > 0 and mem["state_bytes_per_node"] > 0


def test_sim_profile_quick(quick_runs: dict) -> None:
    rc, out, err = quick_runs["profile"]
    assert rc == 0, err
    [rec] = _json_lines(out)
    for key in ("eval_every_round", "no_eval"):
        assert rec[key]["ms_per_round"] > 0 and rec[key]["client_steps_per_s"] > 0
    assert {k: len(v) for k, v in rec["first_rounds_ms"].items()} == {
        "cuda_graphs=True": 2, "cuda_graphs=False": 2}
    assert "function calls" in out  # the profile's table follows


def test_sim_bound_quick(quick_runs: dict) -> None:
    rc, out, err = quick_runs["bound"]
    assert rc == 0, err
    [rec] = [r for r in _json_lines(out) if r["bench"] == "sim_bound"]
    parts = [rec[k] for k in ("compute_ms", "calls_ms", "memory_ms")]
    assert all(v > 0 for v in parts) and rec["loop_client_steps_per_s"] > 0
    assert rec["floor_ms"] == pytest.approx(sum(parts))
    assert rec["floor_overlapped_ms"] == pytest.approx(max(parts))
    # every ratio is client-steps per second over the loop's, from the record's own figures
    steps, loop = rec["client_steps_per_round"], rec["loop_client_steps_per_s"]
    assert rec["ratio_sim"] == pytest.approx(steps / (rec["sim_round_ms"] / 1e3) / loop)
    assert rec["ratio_floor"] == pytest.approx(steps / (rec["floor_ms"] / 1e3) / loop)
    assert rec["compute_ms"] == pytest.approx(rec["compute_us_per_client_step"] * steps / 1e3)
    assert rec["calls_ms"] == pytest.approx(
        rec["step_fixed_us"] * rec["local_steps_per_round"] / 1e3)


@pytest.mark.parametrize("args, flag", [
    (["--nodes", "1"], "--nodes"), (["--nodes", ","], "--nodes"),
    (["--repeats", "0"], "--repeats"), (["--rounds", "x"], "--rounds")])
def test_sim_bound_refuses_bad_input_before_any_work(args: list[str], flag: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.sim_bound import main

    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: " in err and "is invalid: expected an integer >=" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA guard")
def test_sim_throughput_cuda_guard() -> None:
    rc, out, err = _finish(_start("sim_throughput.py", "--quick", "--device", "cuda"))
    assert rc == 2, err
    assert "cuda" in _json_lines(out)[0]["error"]


def test_vanishing_variance_quick(quick_runs: dict) -> None:
    rc, out, err = quick_runs["variance"]
    assert rc == 0, err
    lines = _json_lines(out)
    runs = [r for r in lines if "seed" in r]
    assert {(r["algo"], r["seed"]) for r in runs} == {
        (a, s) for a in ("fedavg", "gossip", "gossip-vc") for s in (0, 1)}
    for r in runs:
        assert r["independent_init"] is (r["algo"] != "fedavg")
    agg = {r["algo"]: r for r in lines if r.get("aggregate")}
    assert set(agg) == {"fedavg", "gossip", "gossip-vc"}
    for row in agg.values():
        assert row["seeds"] == [0, 1] and row["rounds_to_0.5"]["reached"] in (0, 1, 2)
    assert "gossip_vc_over_fedavg_rounds_to_80" in next(r for r in lines if "checks" in r)["checks"]
    base = quick_runs["out"]
    for name in ("accuracy.png", "accuracy.svg", "variance.png", "variance.svg", "summary.json"):
        assert (base / name).stat().st_size > 0
    assert (base / "gossip-vc" / "seed_1" / "metrics.jsonl").exists()
    assert json.loads((base / "summary.json").read_text())["args"]["init"] == "xavier"


def test_stacked_batches_equal_node_batch() -> None:
    """The vectorized epoch draws give exactly node_batch's schedule (many epochs, sizes)."""
    labels = np.repeat(np.arange(10), 40)
    n = 60
    shards = partition("dirichlet:0.3", labels, n, seed=4)
    assert min(len(s) for s in shards) == 1 < max(len(s) for s in shards)
    batches = StackedBatches(shards, list(range(100, 100 + n)), 8, seed=9)
    rng = np.random.default_rng(0)
    local = np.zeros(n, dtype=np.int64)
    for _ in range(10):
        got = batches.batch(torch.from_numpy(local))
        for i in range(n):
            ref = node_batch(shards[i], 8, seed=9, node=100 + i, step=int(local[i]))
            assert np.array_equal(got[i].numpy(), ref), (i, int(local[i]))
        local += rng.integers(0, 6, size=n)
    assert torch.equal(batches.batch(3), torch.stack([
        torch.from_numpy(node_batch(s, 8, seed=9, node=100 + i, step=3))
        for i, s in enumerate(shards)]))
