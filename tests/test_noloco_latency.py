"""NoLoCo's latency model (benchmarks/noloco_latency.py) on the simulator's network model against
the paper's closed forms: log2 n without jitter (Eq. 5) and Eq. 7 for the pair average."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from benchmarks import noloco_latency as lat


def test_without_jitter_the_ratio_is_log2_n() -> None:
    rows = lat.measure(lat.SIZES, [0.0], reps=2, seed=0)
    assert [r["n"] for r in rows] == [4, 16, 64, 256, 1024]
    for r in rows:
        assert r["allreduce_seconds"] == pytest.approx(2 * math.log2(r["n"]), abs=1e-12)
        assert r["pair_seconds"] == pytest.approx(2.0, abs=1e-12)
        assert r["ratio"] == pytest.approx(r["closed_form_no_jitter"], abs=1e-12)
        assert r["closed_form_no_jitter"] == math.log2(r["n"])


@pytest.mark.parametrize("ratio", [0.5, 1.5, 2.5])
def test_pair_average_with_jitter_matches_eq7(ratio: float) -> None:
    sigma = lat.sigma_for(ratio)
    assert math.sqrt(math.exp(sigma**2) - 1) == pytest.approx(ratio)
    times = lat.tree_allreduce_seconds(2, jitter=sigma, reps=40_000, seed=3)
    # two levels (up, down), each the max of two mean-one log-normal message times
    stderr = times.std() / math.sqrt(len(times))
    assert abs(times.mean() - 2 * lat.expected_max_of_two(sigma)) < 5 * stderr


def test_jitter_makes_the_tree_slower_relative_to_pairs() -> None:
    rows = lat.measure([4, 16, 64], [0.0, 1.0, 2.5], reps=200, seed=1)
    table = {(r["n"], r["jitter_std_over_mean"]): r["ratio"] for r in rows}
    for n in (4, 16, 64):
        assert table[(n, 0.0)] < table[(n, 1.0)] < table[(n, 2.5)]
    for j in (1.0, 2.5):
        assert table[(4, j)] < table[(16, j)] < table[(64, j)]
    assert table[(64, 2.5)] > 2 * math.log2(64)  # jitter at least doubles the gap at n = 64


def test_cli_quick_writes_table_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert lat.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "log2 n" in printed and "n=16" in printed
    for name in ("noloco_latency.png", "noloco_latency.svg", "noloco_latency.json"):
        assert (tmp_path / name).stat().st_size > 0
