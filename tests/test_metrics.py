"""Run-directory records: JSON lines survive concurrent readers and killed writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gossip.metrics import append_jsonl, read_jsonl


def test_append_then_read_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"step": 1, "loss": 0.5}])
    append_jsonl(path, [])
    append_jsonl(path, [{"step": 2, "loss": float("nan")}, {"step": 3}])
    assert read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": None}, {"step": 3}]


def test_unterminated_tail_is_skipped_but_corruption_raises(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    # What a reader sees while a writer is mid-line, or after the writer was killed mid-line.
    path.write_text('{"step": 1}\n{"kind": "sync", "step": 250, "rank": 2, "loss": 0.183')
    assert read_jsonl(path) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(json.JSONDecodeError):
        read_jsonl(path)


def test_a_reader_never_sees_a_broken_record_from_a_live_writer(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; from gossip.metrics import append_jsonl\n"
         "for i in range(3000):\n"
         "    append_jsonl(sys.argv[1], [{'step': i, 'pad': 'x' * (i % 97)}] * 3)\n",
         str(path)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    seen = 0
    while writer.poll() is None:
        if path.exists():
            seen = max(seen, len(read_jsonl(path)))
        else:  # the writer is still importing: don't spin against it for the CPU
            time.sleep(0.01)
    assert writer.returncode == 0
    records = read_jsonl(path)
    assert len(records) == 9000 >= seen
    assert [r["step"] for r in records[::3]] == list(range(3000))


@pytest.mark.parametrize("legacy", [
    # the simulator's per-round aggregate before the one record schema
    {"round": 1, "step": 1, "accuracy_mean": 0.5, "loss_mean": 1.2},
    # a real rank's eval row before it
    {"kind": "eval", "step": 10, "rank": 0, "test_loss": 1.2, "test_accuracy": 0.5},
])
def test_load_runs_refuses_a_run_written_before_the_record_schema(tmp_path: Path, legacy) -> None:
    """An old run directory would otherwise give an empty table without a word."""
    pytest.importorskip("pandas")
    from gossip.metrics import load_runs

    (tmp_path / "config.json").write_text(json.dumps({"algo": "fedavg", "task": "digits"}))
    append_jsonl(tmp_path / "metrics.jsonl", [legacy])
    with pytest.raises(ValueError, match=r"metrics\.jsonl predates the record schema"):
        load_runs([tmp_path])
