"""Cross-cutting failures a hostile user found (the red team's cases), pinned on real ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.distributed import run_ranks


def _train_own_flags(comm: Any, out: str) -> Any:
    """launch.train on this rank with flags that differ on odd ranks, as ``launch.spawn`` on
    two machines does when each machine gets its own command line."""
    from launch.config import TrainConfig
    from launch.rank import RunError
    from launch.train import train

    odd = comm.rank % 2
    cfg = TrainConfig(algo="fedavg", steps=6, sync_every=2 + odd, lr=0.1 if odd else None,
                      timeout=30 + odd, out=out)  # the timeout is a rank's own
    try:
        train(cfg, comm)
    except RunError as e:
        return str(e)
    return None


@pytest.mark.slow
def test_ranks_started_with_different_flags_are_refused_before_any_work(tmp_path: Path
                                                                         ) -> None:
    # they used to train, pair rank 0's sync at step 2 with rank 1's at step 3, and die when
    # Gloo saw a message of the wrong size (SIGABRT on rank 0)
    out = tmp_path / "run"
    errors = run_ranks(_train_own_flags, 2, str(out), timeout=120, comm_timeout=30)
    want = ("the ranks were started with different flags (lr: rank 0 has None, ranks [1] "
            "differ; sync_every: rank 0 has 2, ranks [1] differ)")
    assert all(e is not None and e.startswith(want) for e in errors), errors
    assert not out.exists()  # refused before rank 0 took the directory
