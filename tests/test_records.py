"""The one record schema (gossip.records): one eval row per node per evaluation from both
executors, the one summary and table made from it, and load_runs reading both alike."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip.metrics import LOAD_COLUMNS, read_jsonl
from gossip.records import eval_rows, sorted_records, summarize, table
from simulations.config import SimConfig
from simulations.engine import Simulation, drive
from simulations.evaluate import eval_sample
from tests.distributed import run_ranks

torch.set_num_threads(1)

#: The figures every summary.json has, whichever executor wrote it.
SHARED = {"final_step", "evaluations", "final_eval_nodes", "final_loss_mean", "final_loss_min",
          "final_loss_max", "final_accuracy_mean", "final_accuracy_min", "final_accuracy_max",
          "final_train_loss_mean", "final_consensus_distance", "steps_to_90", "algo", "task",
          "nodes", "partition", "bytes_per_node", "wall_seconds"}


def test_summarize_from_shuffled_records_of_a_real_run() -> None:
    rows = [*eval_rows(10, [0, 1], [1.0, 3.0], [0.8, 0.9], train_loss=[2.0, 4.0]),
            *eval_rows(20, [0, 1], [0.5, float("nan")], [0.9, 1.0], train_loss=[1.0, 2.0])]
    others = [{"kind": "sync", "step": 10, "node": 1, "train_loss": 9.0},
              {"kind": "consensus", "step": 10, "consensus_distance": 0.5},
              {"kind": "consensus", "step": 20, "consensus_distance": 0.25}]
    records = rows + others
    random.Random(0).shuffle(records)
    s = summarize(sorted_records(records), algo="x")
    assert s["algo"] == "x" and (s["final_step"], s["evaluations"]) == (20, 2)
    assert s["final_eval_nodes"] == 2 and s["steps_to_90"] == 20  # mean 0.85, then 0.95
    assert (s["final_accuracy_mean"], s["final_accuracy_min"], s["final_accuracy_max"]) == \
        pytest.approx((0.95, 0.9, 1.0))
    assert (s["final_loss_mean"], s["final_loss_min"]) == (0.5, 0.5)  # the NaN row: None
    assert s["final_train_loss_mean"] == 1.5 and s["final_consensus_distance"] == 0.25


def test_a_diverged_node_is_counted_not_hidden() -> None:
    """A NaN test loss became null and the summary's mean skipped it: the table printed
    'test loss -' (as if nothing was evaluated) for a run where every node diverged, and the
    mean of the others where some did."""
    fields = {"algo": "x", "task": "t", "nodes": 2, "rounds": 1, "partition": "iid",
              "bytes_per_node": 0, "simulated_seconds": 0.0, "wall_seconds": 0.0}
    all_nan = summarize(eval_rows(4, [0, 1], [float("nan"), float("inf")]), **fields)
    assert all_nan["final_loss_nonfinite"] == 2 and all_nan["final_loss_mean"] is None
    assert "test loss nan (2 of 2 non-finite)" in table(all_nan)
    # a real rank may write the float itself: it is left out of the mean and counted too
    rows = [*eval_rows(4, [0], [0.25]), {"kind": "eval", "step": 4, "node": 1,
                                         "loss": float("nan")}]
    one = summarize(rows, **fields)
    assert (one["final_loss_mean"], one["final_loss_nonfinite"]) == (0.25, 1)
    assert "test loss 0.2500 over the finite; 1 of 2 non-finite" in table(one)
    fine = summarize(eval_rows(4, [0, 1], [0.5, 0.25]), **fields)
    assert fine["final_loss_nonfinite"] == 0 and "test loss 0.3750 (mean" in table(fine)


def test_summarize_a_simulated_stream_takes_round_figures_at_the_last_evaluation() -> None:
    records = [{"kind": "round", "step": 4, "round": 1, "train_loss": 2.0},
               *eval_rows(8, [None], [0.7], None, round=[2]),
               {"kind": "round", "step": 8, "round": 2, "train_loss": 1.5,
                "consensus_distance": 0.0}]
    s = summarize(records)
    assert (s["final_step"], s["final_eval_nodes"], s["final_loss_mean"]) == (8, 1, 0.7)
    assert s["final_accuracy_mean"] is None and s["steps_to_90"] is None
    assert (s["final_train_loss_mean"], s["final_consensus_distance"]) == (1.5, 0.0)


def _sim(algo: str, **changes: Any) -> Simulation:
    return Simulation(SimConfig(algo=algo, nodes=8, rounds=2, sync_every=3, seed=4,
                                eval_samples=128, partition="dirichlet:0.5", progress=False,
                                **changes))


def test_simulator_writes_one_row_per_evaluated_node(tmp_path: Path) -> None:
    sim = _sim("gossip", topology="ring", eval_nodes=5)
    summary = drive(sim, out=tmp_path / "run", progress=False)
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert records == sorted_records(records)  # rows, then their round
    rounds = [r for r in records if r["kind"] == "round"]
    assert summary["records"] == rounds  # only the round records stay in memory
    alive = torch.ones(8, dtype=torch.bool)
    for r, rec in enumerate(rounds):
        rows = [x for x in records if x["kind"] == "eval" and x["step"] == rec["step"]]
        want = eval_sample(alive, 5, seed=4, round_index=r).nonzero().flatten().tolist()
        assert [x["node"] for x in rows] == want and rec["eval_nodes"] == 5
        assert {x["round"] for x in rows} == {rec["round"]}
        assert rec["accuracy_mean"] == pytest.approx(sum(x["accuracy"] for x in rows) / 5)
    # the last rows against every node evaluated afresh
    ref = sim.evaluate()
    last = [x for x in records if x["kind"] == "eval" and x["step"] == rounds[-1]["step"]]
    nodes = [x["node"] for x in last]
    assert [x["loss"] for x in last] == pytest.approx(ref["loss"][nodes].tolist(), rel=1e-6)
    assert [x["accuracy"] for x in last] == pytest.approx(ref["accuracy"][nodes].tolist())
    assert [x["bytes_total"] for x in last] == sim.comm.bytes_per_node[nodes].tolist()
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert written.keys() >= SHARED and written["final_eval_nodes"] == 5
    assert written["final_loss_mean"] == pytest.approx(ref["loss"][nodes].mean().item())
    assert "gossip on digits: 8 nodes, 2 rounds" in table(written)
    assert (tmp_path / "run" / "accuracy.png").stat().st_size > 0


def test_a_global_model_is_one_row() -> None:
    sim = _sim("fedavg")
    rec = sim.run_round(0)
    [row] = rec["eval_rows"]
    assert row["node"] is None and rec["eval_nodes"] == 8
    assert [row["loss"]] * 8 == pytest.approx(sim.evaluate()["loss"].tolist(), rel=1e-6)


# ----------------------------------------------------------------------------- both executors


def _train(comm: Any, fields: dict[str, Any]) -> Any:
    from launch.config import TrainConfig
    from launch.train import train

    return train(TrainConfig(**fields), comm)


@pytest.mark.slow
def test_real_and_simulated_run_directories_read_into_one_table(tmp_path: Path) -> None:
    pd = pytest.importorskip("pandas")
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from gossip.metrics import load_runs
    from simulations.run import main as sim_main

    real, sim = tmp_path / "real", tmp_path / "sim"
    task = "tests.user_task:make_task"
    run_ranks(_train, 2, {"task": task, "algo": "diloco", "steps": 20, "sync_every": 5,
                          "eval_every": 10, "tensorboard": True, "out": str(real)}, timeout=240)
    assert sim_main(["--task", task, "--algo", "noloco", "--nodes", "4", "--rounds", "2",
                     "--sync-every", "5", "--tensorboard", "--out", str(sim)]) == 0

    summaries = [json.loads((d / "summary.json").read_text()) for d in (real, sim)]
    for s in summaries:
        assert s.keys() >= SHARED and s["task"] == "blobs"
    per_rank = summaries[0]["per_rank"]  # each rank's own final record, gathered apart
    assert summaries[0]["final_loss_mean"] == pytest.approx(
        sum(r["final_loss"] for r in per_rank) / 2)

    df = load_runs([real, sim])
    assert list(df.columns) == list(LOAD_COLUMNS) and isinstance(df, pd.DataFrame)
    for run, executor, nodes, steps in ((real, "real", [0, 1, 0, 1], [10, 10, 20, 20]),
                                        (sim, "sim", [0, 1, 2, 3] * 2, [5] * 4 + [10] * 4)):
        part = df[df.run == str(run)]
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["kind"] == "eval"]
        assert set(part.executor) == {executor} and list(part.node) == nodes
        assert list(part.step) == steps and list(part.loss) == [r["loss"] for r in rows]
        assert list(part.accuracy) == [r["accuracy"] for r in rows]
        assert part.consensus_distance.notna().all()
        # TensorBoard holds the same scalars as metrics.jsonl
        acc = tb.EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        want = [r["loss"] for r in rows if r["node"] == 1]
        assert [e.value for e in acc.Scalars("eval/loss/node1")] == pytest.approx(want)
    assert "diloco on blobs: 2 ranks, 20 steps" in table(summaries[0])
