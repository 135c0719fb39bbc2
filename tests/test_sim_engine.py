"""The simulation engine: rounds, masks, faults end to end, sharding invariance."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch

from gossip.algorithms.noloco import group_table
from gossip.tasks import get_task
from simulations.config import SimConfig
from simulations.engine import Simulation
from simulations.training import steps_for_epochs
from tests.distributed import run_ranks

torch.set_num_threads(1)  # small kernels: threads only add overhead (and xdist runs 2)

SMALL = {"nodes": 8, "rounds": 3, "batch_size": 8, "partition": "dirichlet:0.5", "seed": 2}


def _sim(**kw) -> Simulation:
    return Simulation(SimConfig(**{**SMALL, **kw}))


def _snapshot(sim: Simulation, rows: torch.Tensor) -> list[torch.Tensor]:
    tensors = sim.trainer.state_tensors() + sim.algorithm.state_rows()
    return [t.detach()[rows].clone() for t in tensors]


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(("fields", "match"), [
    ({"nodes": 1}, "nodes=1"),
    ({"algo": "sgp"}, "algo='sgp'"),
    ({"partition": "dirichlet:-1"}, "partition"),
    ({"optimizer": "lamb"}, "optimizer='lamb'"),
    ({"momentum": 0.9, "optimizer": "adam"}, "momentum"),
    ({"outer_lr": 0.5}, "outer_lr=0.5 does not apply to algo='fedavg'"),
    ({"algo": "noloco", "nodes": 9}, "group_size=2"),
    ({"algo": "gossip-vc", "topology": "hypercube"}, "topology"),
    ({"drop_prob": 1.0}, "drop_prob"),
    ({"crash_fraction": 1.0}, "crash_fraction"),
    ({"straggler_policy": "skip"}, "straggler_policy"),
    ({"allreduce": "tree"}, "allreduce"),
    ({"actors": 20}, "actors=20"),
    ({"lr": "0.1"}, "lr='0.1'"),
    ({"algo": "diloco", "outer_momentum": 1.5}, "outer_momentum"),
])
def test_config_rejects_bad_values(fields: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SimConfig(**fields)


def test_resolved_defaults() -> None:
    task = get_task("digits")
    assert SimConfig(algo="gossip-vc", nodes=16).resolved(task).topology == "random-regular:8"
    assert SimConfig(algo="dpsgd", nodes=8).resolved(task).topology == "ring"
    # the run layer's one table: the lrs tuned for digits, as under torchrun
    r = SimConfig(algo="noloco").resolved(task)
    assert (r.optimizer, r.lr, r.topology, r.crash_round, r.sync_every) == \
        ("adam", 3e-3, None, 25, 50)
    r = SimConfig(algo="fedavg").resolved(task)
    assert (r.optimizer, r.lr, r.batch_size, r.sync_every) == ("sgd", 0.2, 16, 10)
    assert SimConfig(algo="fedavg", local_epochs=2).resolved(task).sync_every is None
    assert SimConfig(algo="diloco").resolved(task).optimizer == "adamw"


# ----------------------------------------------------------------------------- rounds


def test_local_epoch_rounds_mask_nodes_with_small_shards() -> None:
    sim = _sim(algo="fedavg", local_epochs=1)
    expected = steps_for_epochs(sim.sizes, 8, 1)
    assert sim.steps_per_round == int(expected.max()) and bool((expected < expected.max()).any())
    rec = sim.run_round(0)
    assert rec["node_steps"] == int(expected.sum())
    assert torch.equal(sim.local_step, expected)
    assert rec["step"] == sim.steps_per_round
    for key in ("accuracy_mean", "accuracy_min", "accuracy_max", "loss_mean",
                "consensus_distance", "bytes_per_node", "sim_seconds", "train_loss"):
        assert rec[key] is not None, key
    assert rec["consensus_distance"] < 1e-12  # FedAvg: everyone holds the average


def test_local_steps_fixed_and_client_sampling() -> None:
    sim = _sim(algo="fedavg", sync_every=5, client_fraction=0.5)
    rec = sim.run_round(0)
    assert rec["node_steps"] == 4 * 5
    assert int((sim.local_step > 0).sum()) == 4


def test_straggler_policies() -> None:
    wait = _sim(algo="fedavg", sync_every=4, straggler_fraction=0.25, straggler_slowdown=4.0)
    plain = _sim(algo="fedavg", sync_every=4)
    deadline = _sim(algo="fedavg", sync_every=4, straggler_fraction=0.25,
                    straggler_slowdown=4.0, straggler_policy="deadline")
    rw, rp, rd = wait.run_round(0), plain.run_round(0), deadline.run_round(0)
    assert rw["node_steps"] == rp["node_steps"] == 32
    assert rd["node_steps"] == 6 * 4 + 2 * 1
    assert rw["sim_seconds"] > rp["sim_seconds"]
    assert rd["sim_seconds"] == pytest.approx(rp["sim_seconds"])


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("algo", ["noloco", "dpsgd", "gossip-vc", "choco"])
def test_crashed_nodes_keep_params_and_state(algo: str) -> None:
    sim = _sim(algo=algo, rounds=4, crash_fraction=0.25, crash_round=1, sync_every=3)
    crashed = torch.from_numpy(sim.faults.crash_at <= 4)
    assert int(crashed.sum()) == 2
    sim.run_round(0)
    frozen = _snapshot(sim, crashed)
    others = sim.flat_params()[~crashed].clone()
    for r in range(1, 4):
        rec = sim.run_round(r)
        assert rec["alive"] == 6
    for before, after in zip(frozen, _snapshot(sim, crashed), strict=True):
        assert torch.equal(before, after)
    assert not torch.equal(others, sim.flat_params()[~crashed])


def _per_node(state: object, n: int) -> list[torch.Tensor]:
    """Every per-node tensor [N, ...] of a (nested) algorithm state dict."""
    if isinstance(state, torch.Tensor):
        return [state] if state.dim() and state.shape[0] == n else []
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, list | tuple):
        return [t for item in state for t in _per_node(item, n)]
    return []


@pytest.mark.parametrize(("algo", "fields"), [
    ("gossip-vc", {"compress": "int8", "error_feedback": True}),
    ("noloco", {"compress": "topk:0.3", "error_feedback": True}),
    ("choco", {"compress": "int8"}),
])
def test_crashed_nodes_keep_their_compression_state(algo: str, fields: dict) -> None:
    """Read from the algorithm's state_dict (not state_rows): a down node's error-feedback
    residuals and CHOCO's public copies x_hat and s do not move."""
    sim = _sim(algo=algo, rounds=4, crash_fraction=0.25, crash_round=1, sync_every=3, **fields)
    crashed = torch.from_numpy(sim.faults.crash_at <= 4)
    sim.run_round(0)
    before = [t.clone() for t in _per_node(sim.algorithm.state_dict(), 8)]
    assert len(before) >= len(list(sim.model.flat.buffers()))  # residuals (or x_hat, s) exist
    for r in range(1, 4):
        sim.run_round(r)
    after = _per_node(sim.algorithm.state_dict(), 8)
    for b, a in zip(before, after, strict=True):
        assert torch.equal(b[crashed], a[crashed])
    assert any(not torch.equal(b[~crashed], a[~crashed]) for b, a in zip(before, after,
                                                                      strict=True))


@pytest.mark.parametrize("algo", ["fedavg", "diloco"])
def test_crashed_nodes_pull_the_global_model(algo: str) -> None:
    sim = _sim(algo=algo, rounds=3, crash_fraction=0.25, crash_round=1, sync_every=3)
    crashed = torch.from_numpy(sim.faults.crash_at <= 3)
    sim.run_round(0)
    for r in range(1, 3):
        sim.run_round(r)
        rows = sim.flat_params()
        # one global model: every row, down or up, holds it after the sync
        assert torch.equal(rows[crashed], rows[~crashed][:1].expand(int(crashed.sum()), -1))
        for name in ("phi",):
            if hasattr(sim.algorithm, name):
                state = torch.cat([t.detach() for t in getattr(sim.algorithm, name)], 1)
                assert bool((state == state[:1]).all())


def _capture_sync(sim: Simulation) -> dict[str, torch.Tensor]:
    """Wrap algorithm.step to record the rows (and NoLoCo's phi/delta) just before the sync."""
    seen: dict[str, torch.Tensor] = {}
    original = sim.algorithm.step

    def step(step: int, active=None):
        seen["theta"] = sim.flat_params()
        seen["step"] = torch.tensor(step)
        for name in ("phi", "delta"):
            if hasattr(sim.algorithm, name):
                seen[name] = torch.cat([t.clone() for t in getattr(sim.algorithm, name)], 1)
        return original(step, active)

    sim.algorithm.step = step  # type: ignore[method-assign]
    return seen


def test_consensus_distance_is_the_mean_squared_distance_to_the_mean(monkeypatch) -> None:
    sim = _sim(algo="gossip", nodes=9, topology="ring")  # independent inits: rows differ
    monkeypatch.setattr("simulations.engine._ROW_CHUNK", 4)  # several row chunks
    x = sim.flat_params().double()
    mask = torch.tensor([True, False, True, True, True, False, True, True, True])
    for m in (None, mask):
        rows = x if m is None else x[m]
        ref = float(((rows - rows.mean(0)) ** 2).sum(dim=1).mean())
        assert sim.consensus_distance(m) == pytest.approx(ref, rel=1e-12)
    assert ref > 0


def test_fedavg_averages_the_clients_that_are_up() -> None:
    sim = _sim(algo="fedavg", crash_fraction=0.25, crash_round=0)
    seen = _capture_sync(sim)
    sim.run_round(0)
    up = sim.faults.alive(0)
    w = sim.sizes.double() * up
    expected = (w / w.sum()).float() @ seen["theta"]
    rows = sim.flat_params()
    # every client, up or down, continues from the average of the clients that were up
    torch.testing.assert_close(rows, expected.expand(len(rows), -1), atol=1e-6, rtol=0)


def test_noloco_node_whose_partner_is_down_keeps_its_own_model() -> None:
    sim = _sim(algo="noloco", crash_fraction=0.25, crash_round=1, sync_every=3)
    sim.run_round(0)
    seen = _capture_sync(sim)
    sim.run_round(1)
    cfg = sim.algorithm.config
    table, _ = group_table(8, 2, int(seen["step"]), cfg.seed)
    partner = table.max(dim=1).values
    up = sim.faults.alive(1)
    lonely = [i for i in range(8) if up[i] and not up[partner[i]]]
    paired = [i for i in range(8) if up[i] and up[partner[i]]]
    assert lonely and paired
    theta, phi, delta = seen["theta"], seen["phi"], seen["delta"]
    rows = sim.flat_params()
    for i in lonely:  # mean over its group = its own model
        d = cfg.alpha * delta[i] + cfg.beta * (theta[i] - phi[i])
        d = d - cfg.gamma * (phi[i] - phi[i])
        torch.testing.assert_close(rows[i], phi[i] + d, atol=1e-6, rtol=0)
    for i in paired:
        j = int(partner[i])
        d = (cfg.alpha * delta[i] + cfg.beta * ((theta[i] + theta[j]) / 2 - (phi[i] + phi[j]) / 2)
             - cfg.gamma * (phi[i] - (phi[i] + phi[j]) / 2))
        torch.testing.assert_close(rows[i], phi[i] + d, atol=1e-6, rtol=0)


def test_gossip_merges_what_arrived_and_counts_lost_bytes() -> None:
    lossy = _sim(algo="gossip-vc", drop_prob=0.4, sync_every=2)
    clean = _sim(algo="gossip-vc", sync_every=2)
    for r in range(2):
        a, b = lossy.run_round(r), clean.run_round(r)
    assert a["bytes_total"] == b["bytes_total"] > 0  # senders pay for lost messages too
    assert not torch.equal(lossy.flat_params(), clean.flat_params())


def test_churned_node_comes_back() -> None:
    sim = _sim(algo="gossip-vc", rounds=6, churn_fraction=0.25, churn_rounds=2, sync_every=2)
    churned = np.flatnonzero(sim.faults.churn.start <= 6)
    assert len(churned) == 2
    for r in range(6):
        rec = sim.run_round(r)
        assert rec["alive"] == 8 - sum(1 for i in churned
                                       if sim.faults.churn.start[i] <= r < sim.faults.churn.stop[i])
    expected = torch.full((8,), 12)
    expected[torch.from_numpy(churned)] = 8  # trained in the 4 rounds it was up
    assert torch.equal(sim.local_step, expected)


def test_runs_are_deterministic() -> None:
    kw = {"algo": "gossip-vc", "sync_every": 2, "drop_prob": 0.2, "jitter": 0.3}
    a, b = _sim(**kw), _sim(**kw)
    ra = [a.run_round(r) for r in range(2)]
    rb = [b.run_round(r) for r in range(2)]
    assert torch.equal(a.flat_params(), b.flat_params())
    assert [r["sim_seconds"] for r in ra] == [r["sim_seconds"] for r in rb]


@pytest.mark.parametrize("algo", ["fedavg", "gossip-vc"])
def test_drive_starts_the_next_round_before_it_reads_the_last_one(algo: str, tmp_path) -> None:
    """drive() reads round r's figures after starting round r + 1 (Simulation.start_round):
    the same records as rounds run one at a time, each with the figures of its own round
    (bytes, consensus distance, evaluation), not the next one's."""
    from gossip.metrics import iter_jsonl
    from simulations.engine import drive

    kw = {"algo": algo, "sync_every": 2, "drop_prob": 0.2, "eval_nodes": 3}
    a, b = _sim(**kw), _sim(**kw)
    one_by_one = [a.run_round(r) for r in range(a.cfg.rounds)]
    drive(b, out=tmp_path / "run", progress=False, plots=False)
    written = [rec for rec in iter_jsonl(tmp_path / "run" / "metrics.jsonl")
               if rec["kind"] in ("eval", "round")]
    expected = []
    for rec in one_by_one:
        expected += [*rec.pop("eval_rows"), rec]
    for rec in written:
        rec.pop("wall_seconds", None)
    assert written == expected
    driven = [rec for rec in written if rec["kind"] == "round"]
    assert len({rec["bytes_total"] for rec in driven}) == len(driven)  # grows every round
    assert torch.equal(a.flat_params(), b.flat_params())


# ----------------------------------------------------------------------------- sharding

SHARDED = {
    "gossip-vc": {"drop_prob": 0.2, "crash_fraction": 0.25, "crash_round": 1, "jitter": 0.2},
    "diloco": {"churn_fraction": 0.25, "churn_rounds": 1},
    "noloco": {"straggler_fraction": 0.25},
}


def _sharded_config(algo: str) -> SimConfig:
    return SimConfig(**{**SMALL, "sync_every": 3, "algo": algo, **SHARDED[algo]})


def _shard_rank(comm) -> dict[str, tuple[np.ndarray, list[dict]]]:
    import torch.distributed as dist

    rank = int(comm.nodes[0])
    out = {}
    for algo in SHARDED:
        cfg = _sharded_config(algo)
        sim = Simulation(cfg, nodes=list(range(4 * rank, 4 * rank + 4)), group=dist.group.WORLD)
        records = [sim.run_round(r) for r in range(cfg.rounds)]
        out[algo] = (sim.flat_params().numpy().copy(), records)
    return out


def test_sharded_simulation_equals_one_process() -> None:
    shards = run_ranks(_shard_rank, 2, timeout=240.0)
    for algo in SHARDED:
        cfg = _sharded_config(algo)
        sim = Simulation(cfg)
        records = [sim.run_round(r) for r in range(cfg.rounds)]
        rows = torch.cat([torch.from_numpy(shards[k][algo][0]) for k in range(2)])
        torch.testing.assert_close(rows, sim.flat_params(), atol=1e-6, rtol=1e-6)
        for k in range(2):
            for mine, theirs in zip(records, shards[k][algo][1], strict=True):
                assert mine.keys() == theirs.keys()
                for key in mine:  # eval_rows: each evaluated node's row, from either shard
                    assert _close(mine[key], theirs[key]), (algo, key)


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-9)
    return a == b


def test_shard_needs_a_group() -> None:
    with pytest.raises(ValueError, match="needs a group"):
        Simulation(SimConfig(**SMALL), nodes=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        Simulation(SimConfig(**SMALL), nodes=[0, 0, 1])


def test_info_and_label_counts() -> None:
    sim = _sim(algo="gossip-vc")
    info = sim.info()
    assert info["train_impl"] == "matmul" and info["params_per_node"] == 64 * 128 + 128 + 1290
    assert 0 < info["spectral_gap"] <= 1
    counts = sim.label_counts()
    assert counts is not None and counts.shape == (8, 10)
    assert int(counts.sum()) == sim.task.data.num_train
    assert dataclasses.is_dataclass(sim.cfg) and sim.cfg.topology == "ring"


def test_sampled_partition_allows_more_nodes_than_samples() -> None:
    from gossip.data import sampled_partition

    y = get_task("digits").data.y_train
    a = sampled_partition("dirichlet:0.1", y, 3000, 16, num_samples=len(y), seed=1)
    b = sampled_partition("dirichlet:0.1", y, 10, 16, num_samples=len(y), seed=1)
    assert len(a) == 3000 and all(len(s) == 16 for s in a)
    assert all(np.array_equal(a[i], b[i]) for i in range(10))  # depends on (seed, node) only
    assert np.mean([len(np.unique(y[s])) for s in a]) < 4  # label skew
    iid = sampled_partition("iid", None, 5, 20, num_samples=100, seed=0)
    assert all(len(np.unique(s)) == 20 for s in iid)
    sim = _sim(algo="fedavg", partition="sample:iid", shard_size=12)
    assert sim.sizes.tolist() == [12] * 8
    with pytest.raises(ValueError, match="shard_size"):
        SimConfig(shard_size=4)
    with pytest.raises(ValueError, match="sample:iid"):
        Simulation(SimConfig(nodes=2000, rounds=1))


def test_a_failing_plot_loses_nothing(tmp_path, monkeypatch, caplog) -> None:
    """Plots come after summary.json; a plot that raises is logged and the run still returns
    its summary (it used to end the program with a traceback and exit status 1)."""
    import json

    import gossip.plots
    from simulations.engine import drive

    def broken(*args, **kwargs):
        raise RuntimeError("no display")

    monkeypatch.setattr(gossip.plots, "plot_run", broken)
    summary = drive(_sim(algo="noloco", sync_every=2), out=tmp_path / "run", progress=False)
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written["final_accuracy_mean"] == summary["final_accuracy_mean"]
    assert "plotting failed" in caplog.text and "no display" in caplog.text
