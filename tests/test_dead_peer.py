"""A rank is SIGKILLed mid-run (real processes, real Gloo, a store that outlives workers).

NoLoCo and gossip: the survivors notice within the timeout, leave the dead rank out and finish;
summary.json records who died and when. FedAvg and DiLoCo: every survivor fails fast (well
within the timeout) with an error naming the dead rank.
"""

from __future__ import annotations

import pytest

from benchmarks.dead_peer import run_case

pytestmark = pytest.mark.slow

TIMEOUT = 30.0


@pytest.mark.parametrize("algo", ["noloco", "gossip-vc"])
def test_decentralized_survivors_finish_without_the_dead_rank(algo, tmp_path):
    res = run_case(algo, world=4, victim=2, steps=1500, kill_at=300, timeout=TIMEOUT,
                   dead_after=3.0, out=tmp_path)
    assert res["exit_codes"] == {0: 0, 1: 0, 3: 0}, res
    assert res["survivors"] == [0, 1, 3], res
    [death] = res["deaths"]
    assert death["rank"] == 2 and death["step"] > 300, res
    assert 0 <= res["seconds_to_detect"] < TIMEOUT, res
    assert res["final_accuracy_mean"] > 0.85, res  # they kept training together


@pytest.mark.parametrize("algo", ["fedavg", "diloco"])
def test_all_reduce_survivors_fail_fast_naming_the_dead_rank(algo, tmp_path):
    res = run_case(algo, world=4, victim=2, steps=1500, kill_at=300, timeout=TIMEOUT,
                   dead_after=3.0, out=tmp_path)
    assert sorted(res["exit_codes"]) == [0, 1, 3], res
    assert all(code == 3 for code in res["exit_codes"].values()), res
    assert max(res["seconds_to_exit"].values()) < TIMEOUT, res
    assert res["errors_name_dead_rank"], res
