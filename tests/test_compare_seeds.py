"""``python -m simulations.compare --seeds``: one comparison per seed, and mean +- std over the
seeds equal to numpy's on the per-seed summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from simulations import compare

torch.set_num_threads(1)  # small kernels: threads only add overhead (and xdist runs 2)


def test_compare_seeds_mean_std_is_numpys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = compare.main(["--algos", "fedavg,noloco", "--nodes", "4", "--rounds", "2",
                         "--seeds", "3,5", "--out", str(tmp_path)])
    assert code == 0
    printed = capsys.readouterr().out
    stats = json.loads((tmp_path / "comparison_seeds.json").read_text())
    assert stats["seeds"] == [3, 5]
    for algo in ("fedavg", "noloco"):
        per_seed = [json.loads((tmp_path / f"seed_{s}" / "comparison.json").read_text())[algo]
                    for s in (3, 5)]
        for key in ("final_accuracy_mean", "final_accuracy_min", "bytes_per_node",
                    "simulated_seconds"):
            values = np.array([s[key] for s in per_seed], dtype=np.float64)
            cell = stats["stats"][algo][key]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-12)
            assert cell["std"] == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-12)
        acc = stats["stats"][algo]["final_accuracy_mean"]
        assert f"{acc['mean']:.3f} +- {acc['std']:.3f}" in printed
    # the seeds really differ (data split, init, batches)
    accs = {json.loads((tmp_path / f"seed_{s}" / "comparison.json").read_text())["noloco"][
        "final_accuracy_mean"] for s in (3, 5)}
    assert len(accs) > 1
    for suffix in ("png", "svg"):
        assert (tmp_path / f"comparison.{suffix}").stat().st_size > 0
        assert (tmp_path / "seed_3" / f"comparison.{suffix}").stat().st_size > 0


def test_seed_stats_counts_only_seeds_that_reached_90() -> None:
    base = {"optimizer": "sgd", "lr": 0.05, "final_accuracy_min": 0.5, "bytes_per_node": 1.0,
            "simulated_seconds": 2.0, "sim_seconds_to_90": None, "wall_seconds_total": 1.0}
    runs = [{**base, "final_accuracy_mean": a, "rounds_to_90": r}
            for a, r in ((0.91, 10), (0.93, None), (0.95, 14))]
    row = compare.seed_stats({"fedavg": runs})["fedavg"]
    assert row["rounds_to_90"] == {"mean": 12.0, "std": pytest.approx(np.std([10, 14], ddof=1)),
                                   "n": 2}
    assert row["sim_seconds_to_90"] == {"mean": None, "std": None, "n": 0}
    assert row["final_accuracy_mean"]["mean"] == pytest.approx(0.93)
    assert "12.0 +- 2.8 [2/3]" in compare.format_seed_table({"fedavg": row})


def test_bad_seeds_are_refused(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    assert compare.main(["--seeds", "0,0", "--out", str(tmp_path)]) == 2
    assert "seeds='0,0' is invalid" in capsys.readouterr().err


def test_compare_runs_choco_compressed(tmp_path: Path) -> None:
    """CHOCO-SGD in a comparison, as its paper runs it (top-10 %): the bytes it sends a node are
    D-PSGD's on the same ring times the compressed message's share of a dense one."""
    from gossip.compress import parse_codec

    assert compare.main(["--algos", "dpsgd,choco", "--nodes", "4", "--rounds", "2",
                         "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "comparison.json").read_text())
    params = runs["choco"]["params_per_node"]
    share = parse_codec("topk:0.1").nbytes(params) / (4 * params)
    assert runs["choco"]["bytes_per_node"] == pytest.approx(
        runs["dpsgd"]["bytes_per_node"] * share, rel=1e-12)
    assert runs["choco"]["final_accuracy_mean"] > 0.1
