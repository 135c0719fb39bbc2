"""Hostile cases of the third red-team: are the figures the records hold true? Each failed
before its fix; each checks a figure against an independent recomputation (a plain
``nn.Module`` per node and ``Task.evaluate``, which is what a real rank reports)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gossip.metrics import read_jsonl
from gossip.rundir import RunDir
from gossip.tasks import Task, TaskData, get_task
from simulations.compare import compare
from simulations.compare import main as compare_main
from simulations.config import SimConfig
from simulations.engine import Simulation, drive
from simulations.run import main as run_main

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def _node_module(sim: Simulation, row: int) -> torch.nn.Module:
    """Node ``row``'s model as a plain module (its parameters and buffers copied out)."""
    model = sim.task.make_model(sim.cfg.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(sim.model.params[name][row])
        for name, b in model.named_buffers():
            b.copy_(sim.model.buffers[name][row])
    return model


# ----------------------------------------------------------------------------- a task's loss_fn


def _smoothed_digits() -> Task:
    task = get_task("digits", seed=0)
    return dataclasses.replace(
        task, loss_fn=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.3))


def _rmse_synthetic() -> Task:
    """A loss that is not a mean of per-sample terms: only the whole set gives its value."""
    task = get_task("synthetic", seed=0)
    return dataclasses.replace(task, loss_fn=lambda out, y: F.mse_loss(out, y).sqrt())


@pytest.mark.parametrize("make", [_smoothed_digits, _rmse_synthetic])
@pytest.mark.parametrize("algo", ["gossip", "fedavg"])
def test_test_loss_is_the_tasks_own_loss_fn(make, algo: str) -> None:
    """Input: a task with its own ``loss_fn`` (label-smoothed cross-entropy; RMSE).
    Expected: each eval row's loss is ``task.evaluate(node model)["loss"]``, the loss_fn over
    the test set, as ``launch.train`` records it. Got (before): plain cross-entropy / MSE
    (25.6 for an RMSE of 4.0), so the simulator and a real run of one task disagreed."""
    task = make()
    sim = Simulation(SimConfig(algo=algo, nodes=4, rounds=1, batch_size=8, sync_every=2,
                               partition="iid", task="digits" if task.name == "digits"
                               else "synthetic"), task=task)
    rows = sim.run_round(0)["eval_rows"]
    for row in rows:
        node = 0 if row["node"] is None else row["node"]
        ref = sim.task.evaluate(_node_module(sim, node))
        assert row["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        if "accuracy" in ref:
            assert row["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-6)  # float32 mean
    assert len(rows) == (1 if algo == "fedavg" else 4)


# ----------------------------------------------------------------------------- simulations.compare


def test_compare_checks_every_algorithm_before_the_first_runs(tmp_path: Path) -> None:
    """Input: ``--algos fedavg,noloco --nodes 9`` (NoLoCo pairs nodes: 9 is refused).
    Expected: the ValueError naming nodes before anything runs, no run directory written.
    Got (before): FedAvg ran to its end and wrote ``out/fedavg``, then NoLoCo was refused."""
    out = tmp_path / "cmp"
    with pytest.raises(ValueError, match="nodes=9 is invalid"):
        compare(["fedavg", "noloco"], out=out, nodes=9, rounds=1, batch_size=8)
    assert not out.exists()
    # a topology that cannot have N nodes (degree 9 of 4 nodes): refused before FedAvg runs
    with pytest.raises(ValueError, match="topology='random-regular:9' is invalid with 4 nodes"):
        compare(["fedavg", "dpsgd"], out=out, nodes=4, rounds=1, batch_size=8,
                topology="random-regular:9")
    assert not out.exists()
    # a later algorithm's run directory that holds another run: refused before the first runs
    (out / "dpsgd").mkdir(parents=True)
    (out / "dpsgd" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="dpsgd"):
        compare(["fedavg", "dpsgd"], out=out, nodes=4, rounds=1, batch_size=8)
    assert not (out / "fedavg").exists()


@pytest.mark.parametrize("argv", [["--algos", ",,"], ["--algos", "fedavg,fedavg"]])
def test_compare_refuses_no_algorithm_or_one_twice(argv: list[str], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Input: ``--algos ,,`` / ``--algos fedavg,fedavg``. Expected: exit 2 naming algos.
    Got (before): a StopIteration traceback after nothing ran / FedAvg run twice into one
    directory."""
    assert compare_main([*argv, "--nodes", "4", "--rounds", "1",
                         "--out", str(tmp_path / "c")]) == 2
    assert "algos" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------- bad --out


def test_out_under_a_file_is_refused_naming_out(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Input: ``--out FILE/run`` (a path below a plain file). Expected: exit 2, ``error:
    out=... is invalid`` naming the file, before the simulation is built. Got (before): a
    NotADirectoryError traceback from mkdir once the simulation was built."""
    plain = tmp_path / "notes.txt"
    plain.write_text("x")
    with pytest.raises(ValueError, match=r"out='.*notes.txt/run' is invalid: .*notes.txt is a "
                                         "file"):
        RunDir(plain / "run").check()
    argv = ["--nodes", "4", "--rounds", "1", "--no-progress", "--out", str(plain / "run")]
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "error: out=" in err and "Traceback" not in err


def test_out_that_cannot_be_created_is_a_value_error(tmp_path: Path) -> None:
    """Input: an out that check() cannot foresee failing (mkdir refused: here a path through
    /proc, which refuses even root). Expected: acquire raises ValueError naming out (exit 2 in
    the commands). Got (before): FileNotFoundError, a traceback."""
    with pytest.raises(ValueError, match=r"out='/proc/gossip-run' is invalid: cannot create"):
        RunDir("/proc/gossip-run").acquire()


# ----------------------------------------------------------------------------- renamed flags


@pytest.mark.parametrize(("argv", "flag"), [
    (["--algo", "noloco", "--noloco-gamma", "-1"], "noloco_gamma must be >= 0, got -1.0"),
    (["--algo", "gossip", "--gossip-beta", "2"], "gossip_beta must be in [0, 1], got 2.0"),
    (["--algo", "choco", "--choco-gamma", "2"], "choco_gamma must be in (0, 1], got 2.0"),
])
def test_a_renamed_flag_is_named_by_its_flag(argv: list[str], flag: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Input: a bad value of a flag that sets an algorithm field of another name
    (``--gossip-beta`` sets GossipConfig.self_weight). Expected: the error names the flag the
    user typed. Got (before): ``self_weight must be in [0, 1], got 2.0`` / ``gamma must be ...``,
    a name that is no flag of the command."""
    assert run_main(["--nodes", "4", "--rounds", "1", *argv]) == 2
    assert f"error: {flag}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- simulated time


def _ring_seconds(p: int, nbytes: float, latency: float, bandwidth: float) -> float:
    """A bandwidth-optimal ring all-reduce of ``nbytes`` over ``p`` nodes (Patarasuk & Yuan)."""
    return 2 * (p - 1) * (latency + nbytes / (p * bandwidth))


@pytest.mark.parametrize("rounds", [1, 3])
def test_overlapped_run_ends_when_its_last_outer_step_has_arrived(rounds: int) -> None:
    """Input: DiLoCo with ``overlap`` (the all-reduce started at sync t is applied at sync
    t + 1), R rounds of H steps. The run's last outer step (``flush``) waits for the last
    all-reduce, and the final model holds it. Expected simulated seconds: the first all-reduce
    hides behind the next round's compute, each later one starts when the previous has
    arrived, and the last is waited for at the end: ``H c + (R - 1) max(H c, A) + A``.
    Got (before): the last all-reduce was never charged (R = 2: 0.745 s instead of 1.451 s,
    half the time of the same run without overlap)."""
    n, h, c, lat, bw = 8, 4, 0.01, 0.05, 12.5e6
    sim = Simulation(SimConfig(algo="diloco", overlap=True, nodes=n, rounds=rounds,
                               sync_every=h, batch_size=8, compute_time=c, latency=lat,
                               bandwidth=bw))
    a = _ring_seconds(n, sim.model.flat.nbytes_per_row, lat, bw)
    seconds = [sim.run_round(r)["sim_seconds"] for r in range(rounds)]
    assert seconds[-1] == pytest.approx(h * c + (rounds - 1) * max(h * c, a) + a, rel=1e-9)


# ----------------------------------------------------------------------------- one model's row


def test_a_global_model_with_accuracy_zero_is_still_one_row() -> None:
    """Input: FedAvg evaluated on one test sample that its global model gets wrong (accuracy
    exactly 0.0). Expected: one eval row with node null (the model every node holds), as in
    every other FedAvg round. Got (before): the loop kept the figure in the variable that said
    'one model', so a 0.0 turned it off: 4 per-node rows this round and 1 in the others (and
    summary.json's final_eval_nodes 4 or 1 by the accuracy's value)."""
    base = dict(algo="fedavg", nodes=4, rounds=1, batch_size=8, eval_samples=1,
                sync_every=1, lr=1e-4)
    seen = set()
    for seed in range(4):  # seeds 0, 1: the sample right; 2, 3: wrong (checked below)
        sim = Simulation(SimConfig(**base, seed=seed))
        record = sim.run_round(0)
        rows = record["eval_rows"]
        model = _node_module(sim, 0).eval()
        with torch.no_grad():
            right = float(model(sim.x_test).argmax(-1).eq(sim.y_test).float().mean())
        seen.add(right)
        assert [r["node"] for r in rows] == [None]
        assert rows[0]["accuracy"] == record["accuracy_mean"] == right
        assert record["eval_nodes"] == 4
    assert seen == {0.0, 1.0}


# ----------------------------------------------------------------------------- CHOCO and faults


@pytest.mark.parametrize(("flag", "value"), [("drop_prob", 0.2), ("churn_fraction", 0.25)])
def test_choco_refuses_faults_that_break_its_public_copies(flag: str, value: float) -> None:
    """CHOCO keeps s_i = sum_j W_ij x_hat_j by applying every q_j to every copy of x_hat_j.
    Input: ``--algo choco`` with lost messages or churn. Expected: refused naming the field.
    Got (before): accepted; after 4 rounds s differed from W x_hat by 46% (drop 0.2) / 23%
    (churn), the consensus distance was 16.4 against 5.6 without faults, and nothing said so.
    Without faults the invariant holds (checked here against W x_hat)."""
    cfg = dict(algo="choco", nodes=8, rounds=4, batch_size=8)
    with pytest.raises(ValueError, match=rf"{flag}={value} is invalid: expected 0 with "
                                         "algo='choco'"):
        SimConfig(**cfg, **{flag: value})
    sim = Simulation(SimConfig(**cfg))
    for r in range(4):
        sim.run_round(r)
    w = torch.as_tensor(sim.topology.mixing_matrix(0), dtype=torch.float64)
    x_hat, s = sim.algorithm.x_hat[0].double(), sim.algorithm.mixed[0].double()
    assert float((s - w @ x_hat).norm() / s.norm()) < 1e-5


# ----------------------------------------------------------------------------- wall seconds


def test_a_rounds_wall_seconds_is_when_it_ended_not_when_the_next_did() -> None:
    """drive() starts round r + 1 before it reads round r's figures. On the CPU start_round
    runs the whole round. Input: rounds made to last 0.1, 0.2, 0.3, 0.4 s longer. Expected: the
    gaps between the records' wall_seconds are the gaps between the rounds' ends. Got
    (before): round r carried round r + 1's end (0.74 s for a round that ended at 0.29 s; the
    last two rounds the same time)."""
    sim = Simulation(SimConfig(algo="gossip", nodes=4, rounds=4, batch_size=8, sync_every=1))
    start_round, ends = sim.start_round, []

    def slow_start(r: int):  # the round, then 0.1 (r + 1) s more of it
        finish = start_round(r)
        time.sleep(0.1 * (r + 1))
        ends.append(time.perf_counter())
        return finish

    sim.start_round = slow_start  # type: ignore[method-assign]
    walls = [rec["wall_seconds"] for rec in drive(sim, progress=False, plots=False)["records"]]
    assert np.diff(walls) == pytest.approx(np.diff(ends), abs=0.03)


# ----------------------------------------------------------------------------- launch.train, BN


def bn_task(seed: int = 0) -> Task:
    """A model with BatchNorm running statistics, on inputs far from mean 0, variance 1 (so
    statistics at their initial values give other test figures)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g) * 10 + 5
    y = (x[:, 0] > 5).long()
    return Task("bn", TaskData(x[:300], y[:300], x[300:], y[300:], num_classes=2,
                               kind="classification"),
                lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8),
                                            torch.nn.ReLU(), torch.nn.Linear(8, 2)),
                default_lr=0.05, default_batch_size=16)


def _train(out: Path, *extra: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    """``python -m launch.train`` as one process (a world of one rank)."""
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("TORCHELASTIC_", "GOSSIP_FAULT"))}
    full.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "launch.train", "--task", "tests.test_redteam3:bn_task",
         "--algo", "fedavg", "--steps", "40", "--sync-every", "5", "--eval-every", "20",
         "--checkpoint-every", "20", "--out", str(out), *extra],
        cwd=ROOT, env=full, capture_output=True, text=True, timeout=120)


def _eval_rows(out: Path) -> list[dict]:
    return [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "eval"]


def test_batchnorm_statistics_survive_a_resume_and_reach_the_averaged_model(tmp_path: Path
                                                                             ) -> None:
    """Input: launch.train of a BatchNorm model, (a) straight through, (b) killed after its
    checkpoint at step 20 and resumed. Expected: (b)'s test figures at step 40 equal (a)'s (the
    resume is exact), and the averaged model of one rank is that rank's model. Got (before):
    checkpoints held the parameters only, so a resumed rank's running statistics restarted
    from their initial values (final test loss 0.349 against 0.366); and the averaged model
    was evaluated with initial statistics (test accuracy 0.85 where every rank had 0.74-0.75)."""
    straight = _train(tmp_path / "a")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _train(tmp_path / "b", env={"GOSSIP_FAULT_EXIT_AT_STEP": "20"})
    assert killed.returncode == 17, killed.stderr[-3000:]
    resumed = _train(tmp_path / "b", "--resume", env={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = [(r["step"], r["loss"], r["accuracy"]) for r in _eval_rows(tmp_path / "a")]
    assert [(r["step"], r["loss"], r["accuracy"]) for r in _eval_rows(tmp_path / "b")] == ref
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    (rank,) = summary["per_rank"]
    assert summary["avg_model_loss"] == pytest.approx(rank["final_loss"], rel=1e-6)
    assert summary["avg_model_accuracy"] == rank["final_accuracy"]


def test_merge_keeps_the_batchnorm_statistics_a_real_checkpoint_saved(tmp_path: Path) -> None:
    """Input: the checkpoints of a one-rank launch.train of a BatchNorm model, merged (uniform
    soup of one model) without recomputing the statistics. Expected: the merged model is the
    rank's model, running statistics included: its test figures are the run's final ones. Got
    (before): gossip.merge read the parameters only and gave the model fresh statistics
    (mean 0, variance 1), far from this task's inputs."""
    from gossip.merge import MergeOptions, load_models, merge

    run = _train(tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    final = json.loads((tmp_path / "run" / "summary.json").read_text())["per_rank"][0]
    models = load_models([tmp_path / "run"])
    result = merge(models, MergeOptions(method="uniform", bn_recompute=False))
    assert [i.step for i in result.used] == [40]
    task = bn_task()
    result.model.eval()
    with torch.no_grad():
        got = task.metrics(result.model(task.data.x_test), task.data.y_test)
    assert got["loss"] == pytest.approx(final["final_loss"], rel=1e-5)
    assert got["accuracy"] == final["final_accuracy"]
    path = tmp_path / "run" / "checkpoints" / "step_40" / "rank_0.pt"
    state = torch.load(path, weights_only=True)
    saved = state["buffers"]
    assert saved and all(torch.equal(result.state[n], t) for n, t in saved.items())

    # a buffer that does not fit the task's model is refused naming it and the file
    state["buffers"]["1.running_mean"] = torch.zeros(3)
    foreign = tmp_path / "run" / "checkpoints" / "step_40" / "rank_9.pt"
    torch.save(state, foreign)
    with pytest.raises(ValueError, match=r"rank_9\.pt: buffer '1\.running_mean' \(3,\) does not "
                                         r"fit the task's model \(\(8,\)\)"):
        load_models([foreign])


# ----------------------------------------------------------------------------- --config FILE


def test_a_config_file_that_sets_one_field_twice_is_refused(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    """Input: a TOML file with ``drop-prob = 0.1`` and ``drop_prob = 0.3`` (both spellings are
    keys of one field). Expected: exit 2 naming both keys. Got (before): accepted, the later
    value silently won."""
    path = tmp_path / "run.toml"
    path.write_text("drop-prob = 0.1\ndrop_prob = 0.3\n")
    assert run_main(["--config", str(path), "--nodes", "4", "--rounds", "1",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "keys 'drop-prob' and 'drop_prob' both set drop_prob (0.1, 0.3)" in err


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_star_fedavg_with_client_sampling_talks_to_the_sampled_clients(fraction: float) -> None:
    """Input: FedAvg, ``allreduce="star"`` (client-server), client_fraction C of N = 8.
    Expected round time (network.py's star formula over the P = C N sampled clients): H c +
    2 latency + 2 max(P bytes / server bandwidth, bytes / bandwidth), every round. Got
    (before): P = 8 whatever C (0.249 s instead of 0.212 s at C = 0.25; 10x the transfer time
    at N = 100, C = 0.1). The byte counts stay those of the all-reduce real ranks run."""
    n, h, c, lat, bw = 8, 10, 0.01, 0.05, 12.5e6
    sim = Simulation(SimConfig(algo="fedavg", nodes=n, rounds=3, batch_size=8, sync_every=h,
                               client_fraction=fraction, allreduce="star", compute_time=c,
                               latency=lat, bandwidth=bw))
    b = sim.model.flat.nbytes_per_row
    p = max(1, round(fraction * n))
    records = [sim.run_round(r) for r in range(3)]
    expected = h * c + 2 * lat + 2 * max(p * b / bw, b / bw)
    assert [r["round_sim_seconds"] for r in records] == pytest.approx([expected] * 3, rel=1e-9)
    assert records[-1]["bytes_per_node"] == pytest.approx(3 * 2 * (n - 1) / n * b)


@pytest.mark.parametrize(("fields", "message"), [
    ({"address": "auto"}, "address='auto' is invalid: expected None unless actors > 1"),
    ({"algo": "gossip", "allreduce": "star"},
     "allreduce='star' is invalid: expected the default 'ring' with algo='gossip'"),
    ({"algo": "noloco", "allreduce": "halving-doubling"},
     "allreduce='halving-doubling' is invalid: expected the default 'ring' with algo='noloco'"),
])
def test_an_option_that_would_change_nothing_is_refused(fields: dict, message: str) -> None:
    """Input: ``--address`` with one actor (the run stays in this process), an all-reduce time
    model for an algorithm that has no all-reduce. Expected: refused naming the field, as
    ``server_bandwidth`` without ``star`` is. Got (before): accepted; the run and its figures
    were the same as without the option."""
    with pytest.raises(ValueError, match=re.escape(message)):
        SimConfig(nodes=4, **fields)
    # where it does something, it is taken
    SimConfig(nodes=4, **{**fields, "algo": "diloco", "actors": 2})


def test_more_eval_samples_than_the_test_set_has_is_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Input: ``--eval-samples 5000`` for digits (359 test samples). Expected: exit 2 naming
    eval_samples and the test set's size, before a round runs. Got (before): accepted, the
    figures were over 359 samples and nothing said so."""
    assert run_main(["--nodes", "4", "--rounds", "1", "--eval-samples", "5000",
                     "--no-progress"]) == 2
    assert "eval_samples=5000 is invalid: expected at most the 359 test samples of " \
        "task='digits'" in capsys.readouterr().err


@pytest.mark.parametrize("compress", ["none", "int8", "topk:0.1"])
def test_an_all_reduce_after_crashes_sends_a_ring_over_the_nodes_that_are_up(compress: str
                                                                            ) -> None:
    """Input: FedAvg on 8 nodes, 2 of them crashed from round 1. The network model times an
    all-reduce over the P = 6 nodes that are up. Expected bytes per up node in round 1: a ring
    over P, ``2 (P - 1) / P`` of the buffer (compressed: 2 (P - 1) encoded chunks of width /
    P; top-k: its payload to the P - 1 others); the crashed send nothing. Got (before): the
    volume of a ring over all N = 8 (67,270 bytes instead of 64,067), so bytes and time
    described two different rings; without faults nothing changes (P = N, as on real ranks)."""
    n = 8
    sim = Simulation(SimConfig(algo="fedavg", nodes=n, rounds=2, batch_size=8, sync_every=2,
                               crash_fraction=0.25, crash_round=1, compress=compress))
    width = sim.model.flat.numel
    sim.run_round(0)
    before = sim.comm.bytes_per_node.clone()
    sim.run_round(1)
    sent = sim.comm.bytes_per_node - before
    up = sim.faults.alive(1)
    p = int(up.sum())
    assert p == 6
    def pad4(b: int) -> int:
        return b + (-b) % 4

    if compress == "none":
        expected = 2 * (p - 1) / p * width * 4
    elif compress == "int8":  # a chunk: one fp32 scale per 256 int8 codes, padded to 4 bytes
        chunk = math.ceil(width / p)
        expected = 2 * (p - 1) * pad4(4 * math.ceil(chunk / 256) + chunk)
    else:  # top-k: k fp32 values and k int32 indices
        expected = (p - 1) * 8 * math.ceil(0.1 * width)
    assert sent[up].tolist() == pytest.approx([expected] * p)
    assert sent[~up].tolist() == [0.0, 0.0]
