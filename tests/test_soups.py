"""benchmarks/soups.py at tiny settings: one real run per algorithm, every merge scored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import soups


def test_soups_quick_prints_the_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert soups.main(["--quick", "--algos", "noloco,gossip-vc", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| algo | nodes | mean node | best node | uniform | greedy-soup |" in printed
    rows = json.loads((tmp_path / "soups.json").read_text())["rows"]
    assert [(r["algo"], r["base"]) for r in rows] == [("noloco", "init"), ("gossip-vc", "mean")]
    for r in rows:
        assert r["mean_node"] <= r["best_node"]
        assert all(0.0 <= r[m] <= 1.0 for m in soups.METHODS)
        assert (tmp_path / f"{r['algo']}_n8_s0" / "models.json").exists()
    for suffix in ("png", "svg"):
        assert (tmp_path / f"soups.{suffix}").stat().st_size > 0
