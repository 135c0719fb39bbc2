"""The simulator's evaluation (simulations/evaluate.py), threads, memory estimate and start-up
imports: against a per-node loop of plain nn.Modules, real forward counts, closed forms."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.data import class_entropy
from gossip.plots import plot_label_distribution
from simulations.config import SimConfig
from simulations.engine import Simulation
from simulations.evaluate import DEFAULT_EVAL_NODES, eval_sample
from simulations.memory import check_fits, estimate
from simulations.run import main
from simulations.threads import auto_threads

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"nodes": 12, "rounds": 2, "batch_size": 8, "sync_every": 3,
         "partition": "dirichlet:0.5", "seed": 4}


def _node_model(sim: Simulation, row: int) -> torch.nn.Module:
    """Row ``row`` of the stacked models as a plain nn.Module."""
    model = sim.task.make_model(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(sim.model.params[name][row])
    return model.eval()


def _loop_metrics(sim: Simulation, rows: list[int]) -> dict[str, list[float]]:
    """The per-node loop: each node's own nn.Module on the whole test set."""
    out: dict[str, list[float]] = {"loss": [], "accuracy": []}
    for row in rows:
        m = sim.task.evaluate(_node_model(sim, row))
        out["loss"].append(m["loss"])
        out["accuracy"].append(m["accuracy"])
    return out


def _check_record(record: dict, ref: dict[str, list[float]]) -> None:
    for key in ("loss", "accuracy"):
        assert record[f"{key}_mean"] == pytest.approx(float(np.mean(ref[key])), abs=2e-6)
        assert record[f"{key}_min"] == pytest.approx(min(ref[key]), abs=2e-6)
        assert record[f"{key}_max"] == pytest.approx(max(ref[key]), abs=2e-6)


@pytest.mark.parametrize("impl", ["matmul", "vmap"])
def test_sampled_evaluation_equals_the_per_node_loop(impl: str) -> None:
    sim = Simulation(SimConfig(algo="gossip", eval_nodes=5, train_impl=impl, **SMALL))
    for r in range(2):
        record = sim.run_round(r)
        chosen = eval_sample(torch.ones(12, dtype=torch.bool), 5, seed=4, round_index=r)
        rows = chosen.nonzero().flatten().tolist()
        assert record["eval_nodes"] == len(rows) == 5
        _check_record(record, _loop_metrics(sim, rows))
    # the nodes really differ, so the sample matters
    assert len({round(v, 6) for v in _loop_metrics(sim, list(range(12)))["loss"]}) > 1


def test_a_slice_of_rows_is_read_in_place_with_the_same_figures() -> None:
    sim = Simulation(SimConfig(algo="gossip", **SMALL))
    sim.run_round(0)
    x, y = sim.x_test, sim.y_test
    for a, b in [(3, 4), (0, 12), (5, 9)]:
        by_slice = sim.model.evaluate(x, y, slice(a, b))
        by_index = sim.model.evaluate(x, y, torch.arange(a, b))
        for got, want in zip(by_slice, by_index, strict=True):
            assert torch.equal(got, want)
    assert _loop_metrics(sim, [5, 6, 7, 8])["loss"] == pytest.approx(
        sim.model.evaluate(x, y, slice(5, 9))[0].tolist(), abs=2e-6)


def test_all_nodes_by_default_equal_the_per_node_loop() -> None:
    sim = Simulation(SimConfig(algo="dpsgd", crash_fraction=0.25, crash_round=0, **SMALL))
    record = sim.run_round(0)
    up = sim.faults.alive(0)
    assert record["eval_nodes"] == int(up.sum()) == 9
    _check_record(record, _loop_metrics(sim, up.nonzero().flatten().tolist()))


def _count_eval_forwards(sim: Simulation) -> list[int]:
    """Real forwards of the node model during evaluation (grad off), per round."""
    calls = [0]

    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> None:
        if not torch.is_grad_enabled():  # evaluation runs under no_grad, training does not
            calls[0] += 1

    handle = sim.model.base.register_forward_hook(hook)
    per_round = []
    try:
        for r in range(sim.cfg.rounds):
            before = calls[0]
            sim.run_round(r)
            per_round.append(calls[0] - before)
    finally:
        handle.remove()
    return per_round


def test_fedavg_evaluates_one_forward_per_round_not_n() -> None:
    # train_impl="loop" runs every node model through its own forward, so the hook counts models
    cfg = {**SMALL, "rounds": 3, "train_impl": "loop"}
    fedavg = Simulation(SimConfig(algo="fedavg", **cfg))
    assert _count_eval_forwards(fedavg) == [1, 1, 1]
    gossip = Simulation(SimConfig(algo="gossip", **cfg))
    assert _count_eval_forwards(gossip) == [12, 12, 12]
    sampled = Simulation(SimConfig(algo="gossip", eval_nodes=4, **cfg))
    assert _count_eval_forwards(sampled) == [4, 4, 4]


@pytest.mark.parametrize("algo", ["fedavg", "diloco"])
def test_global_model_figures_equal_the_loop_for_every_node(algo: str) -> None:
    sim = Simulation(SimConfig(algo=algo, **SMALL))
    record = sim.run_round(0)
    rows = torch.cat([b for b in sim.model.flat.buffers()], dim=1)
    assert torch.equal(rows, rows[:1].expand_as(rows))  # what the one-forward shortcut relies on
    assert record["eval_nodes"] == 12 and record["consensus_distance"] == 0.0
    _check_record(record, _loop_metrics(sim, list(range(12))))


def test_streaming_diloco_evaluates_every_node_since_their_models_differ() -> None:
    """DiLoCo with fragments syncs one fragment per round; the others hold each node's own
    progress, so one row cannot stand for all (it did: node 0's figures were reported as every
    node's, and a consensus distance of 0)."""
    sim = Simulation(SimConfig(algo="diloco", fragments=2, **{**SMALL, "sync_every": 4}))
    record = sim.run_round(0)
    rows = torch.cat([b for b in sim.model.flat.buffers()], dim=1).double()
    assert not torch.equal(rows, rows[:1].expand_as(rows))
    assert record["eval_nodes"] == 12
    _check_record(record, _loop_metrics(sim, list(range(12))))
    spread = float((rows - rows.mean(dim=0)).square().sum(dim=1).mean())  # (1/n) sum ||x_i - m||^2
    assert record["consensus_distance"] == pytest.approx(spread, rel=1e-9) and spread > 0
    assert len(record["eval_rows"]) == 12


def test_eval_sample_is_seeded_uniform_and_within_the_up_nodes() -> None:
    up = torch.ones(5000, dtype=torch.bool)
    up[::3] = False
    a = eval_sample(up, 100, seed=1, round_index=7)
    assert torch.equal(a, eval_sample(up, 100, seed=1, round_index=7))
    assert not torch.equal(a, eval_sample(up, 100, seed=1, round_index=8))
    assert int(a.sum()) == 100 and not bool((a & ~up).any())
    assert int(eval_sample(up, None, seed=0, round_index=0).sum()) == DEFAULT_EVAL_NODES
    assert torch.equal(eval_sample(up[:900], None, seed=0, round_index=0), up[:900])
    # every up node is about as likely: counts over many rounds
    hits = sum(eval_sample(up[:30], 10, seed=0, round_index=r).double() for r in range(3000))
    assert float(hits[~up[:30]].max()) == 0
    assert hits[up[:30]].min() > 0.9 * 3000 * 10 / 20 and hits[up[:30]].max() < 1.1 * 1500
    with pytest.raises(ValueError, match="eval_nodes=0"):
        SimConfig(eval_nodes=0)


# ----------------------------------------------------------------------------- plots


def test_class_entropy_closed_form() -> None:
    counts = np.array([[5, 0, 0, 0], [1, 1, 1, 1], [2, 2, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_allclose(class_entropy(counts), [0.0, 2.0, 1.0, 0.0])


def test_label_plot_of_many_nodes_is_one_image(tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    counts = np.random.default_rng(0).integers(0, 30, size=(10_000, 10))
    drawn: list[Figure] = []
    original = Figure.savefig

    def keep(fig: Figure, *args: object, **kw: object) -> None:
        drawn.append(fig)
        original(fig, *args, **kw)

    Figure.savefig = keep  # type: ignore[method-assign]
    try:
        plot_label_distribution(counts[:10], tmp_path / "warm.png")  # first-use costs (fonts)
        t0 = time.process_time()  # CPU time: a loaded machine stretches wall time at random
        plot_label_distribution(counts, tmp_path / "labels.png")
        seconds = time.process_time() - t0
    finally:
        Figure.savefig = original  # type: ignore[method-assign]
    assert (tmp_path / "labels.png").stat().st_size > 0
    heat, hist = drawn[-1].axes[0], drawn[-1].axes[-1]  # (the colorbar is between)
    assert len(heat.images) == 1 and not heat.patches
    assert len(hist.patches) == 1  # the entropy histogram is one step artist
    assert seconds < 2.0  # 0.37 CPU s measured at a load of 28 on 2 cores


# ----------------------------------------------------------------------------- threads, memory


def test_auto_threads() -> None:
    assert auto_threads(100, cpus=8, load=0.0) == 1
    assert auto_threads(1000, cpus=2, load=0.1) == 2
    assert auto_threads(1000, cpus=2, load=1.2) == 1
    assert auto_threads(1000, cpus=2, load=9.0) == 1
    assert auto_threads(1000, cpus=16, load=3.0) == 13


def test_memory_estimate_factors() -> None:
    kw = {"nodes": 1000, "param_bytes": 4000, "data_bytes": 10, "shard_samples": 5}
    fused = estimate(algo="fedavg", optimizer="sgd", momentum=0.0, fused=True, **kw)
    assert fused.factor == 2 and fused.total == 1000 * 8000 + 10 + 80
    adam = estimate(algo="noloco", optimizer="adam", momentum=0.0, fused=False, **kw)
    assert adam.factor == 1 + 1 + 2 + 3 + 1
    check_fits(fused, free=fused.total)
    with pytest.raises(ValueError, match=r"nodes=1000 .* GiB is free"):
        check_fits(fused, free=fused.total - 1)


def test_huge_nodes_refused_before_anything_is_built(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    t0 = time.perf_counter()
    code = main(["--nodes", str(10**9), "--partition", "sample:iid", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "nodes=1000000000 is invalid" in err and "GiB is free" in err
    assert not out.exists()
    assert time.perf_counter() - t0 < 60  # nothing proportional to N was allocated


# ----------------------------------------------------------------------------- start-up


def test_a_fused_sgd_run_imports_no_compiler_plotting_or_graphs(tmp_path: Path) -> None:
    code = (
        "import sys, json\n"
        "from simulations.config import SimConfig\n"
        "from simulations.run import run\n"
        "s = run(SimConfig(algo='fedavg', nodes=8, rounds=1, optimizer='sgd', momentum=0.5))\n"
        "print(json.dumps({m: m in sys.modules for m in "
        "('torch._dynamo', 'matplotlib', 'networkx', 'ray', 'pandas')}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         timeout=240, check=False)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {
        "torch._dynamo": False, "matplotlib": False, "networkx": False, "ray": False,
        "pandas": False}


def test_the_autograd_path_builds_torch_sgd_over_the_same_momentum() -> None:
    cfg = SimConfig(algo="fedavg", nodes=6, rounds=2, sync_every=2, batch_size=8,
                    optimizer="sgd", momentum=0.9, seed=3)
    fused, switched = Simulation(cfg), Simulation(cfg)
    fused.run_round(0)
    switched.run_round(0)  # fused: momentum in PlainSGD's buffers, no torch.optim.SGD yet
    switched.trainer.fused = False  # round 1 on autograd + the stock torch.optim.SGD
    fused.run_round(1)
    switched.run_round(1)
    opt = switched.trainer.optimizer
    assert type(opt) is torch.optim.SGD
    assert float(opt.state[switched.model.params["0.weight"]]["momentum_buffer"].abs().sum()) > 0
    # had the momentum not carried over, round 1 would differ by a whole momentum term
    torch.testing.assert_close(switched.flat_params(), fused.flat_params(), rtol=1e-4, atol=1e-5)


def test_sampled_dirichlet_partition_draws_each_node_from_its_proportions() -> None:
    from gossip.data import _SAMPLE, sampled_partition

    y = np.repeat(np.arange(5), 200)
    shards = sampled_partition("dirichlet:1.0", y, 3, 20_000, num_samples=len(y), seed=7)
    p = np.random.default_rng([7, _SAMPLE, 0]).dirichlet(np.ones(5), size=1024)[:3]
    for i in range(3):
        freq = np.bincount(y[shards[i]], minlength=5) / 20_000
        np.testing.assert_allclose(freq, p[i], atol=0.015)
        top = int(np.argmax(p[i]))  # >= 4,000 draws over its 200 samples: uniform hits all
        assert set(np.flatnonzero(y == top)) <= set(shards[i].tolist())
