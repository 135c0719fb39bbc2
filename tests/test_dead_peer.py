"""A rank is SIGKILLed or frozen (SIGSTOP) mid-run: real processes under ``launch.spawn``, real
Gloo, the store in the spawn's process.

NoLoCo and the gossip family: the survivors leave the dead rank out and finish, the launch
returns, and summary.json names the dead rank (and only it). That holds for rank 0 too, whose
death used to end a torchrun run for everyone. FedAvg and DiLoCo: every survivor fails fast (well
within the timeout) with an error naming the dead rank.

Each case costs a launch of real ranks (seconds of ``import torch`` each), so every algorithm
and every mode runs, but not every pair: the mode decides only how the communicator learns of
the death (a closed connection, or a heartbeat silent for ``dead_after``), the algorithm only what
it does with the verdict (the same ``arrived`` mask, the same agreed dead set, the same failed
collective), so the cases cross them:

- NoLoCo: killed at rank 0 (the store's old host), frozen at 8 ranks;
- gossip killed, gossip with variance correction frozen (one class, the same exchange and
  ``arrived`` mask; the correction only re-weights what arrived);
- FedAvg killed, DiLoCo frozen (both fail in the same ``comm.all_reduce_mean_``).
"""

from __future__ import annotations

import pytest

from benchmarks.dead_peer import run_case

pytestmark = pytest.mark.slow

#: generous for a loaded 2-core machine: a heartbeat thread starved past dead_after would be
#: declared dead
TIMEOUT, DEAD_AFTER = 60.0, 10.0
STEPS, KILL_AT = 200, 40


def _check_survivors_finished(res, world, victim):
    live = [r for r in range(world) if r != victim]
    assert res["exit_codes"] == {r: 0 for r in live}, res
    assert res["status"] == 0, res
    assert res["survivors"] == live, res
    assert res["dead"] == [victim], res
    assert 0 <= res["seconds_to_detect"] < DEAD_AFTER + TIMEOUT, res
    assert res["final_accuracy_mean"] > 0.8, res  # they kept training together


@pytest.mark.parametrize(("algo", "mode"), [("gossip", "kill"), ("gossip-vc", "freeze")])
def test_decentralized_survivors_finish_without_the_dead_rank(algo, mode, tmp_path):
    res = run_case(algo, mode=mode, world=4, victim=2, steps=STEPS, kill_at=KILL_AT,
                   timeout=TIMEOUT, dead_after=DEAD_AFTER, out=tmp_path)
    _check_survivors_finished(res, 4, 2)


def test_rank_0_killed_the_store_lives_on(tmp_path):
    res = run_case("noloco", mode="kill", world=4, victim=0, steps=STEPS, kill_at=KILL_AT,
                   timeout=TIMEOUT, dead_after=DEAD_AFTER, out=tmp_path)
    _check_survivors_finished(res, 4, 0)


def test_eight_ranks_one_frozen(tmp_path):
    res = run_case("noloco", mode="freeze", world=8, victim=5, steps=STEPS, kill_at=KILL_AT,
                   timeout=TIMEOUT, dead_after=DEAD_AFTER, out=tmp_path)
    _check_survivors_finished(res, 8, 5)


@pytest.mark.parametrize(("algo", "mode"), [("fedavg", "kill"), ("diloco", "freeze")])
def test_all_reduce_survivors_fail_fast_naming_the_dead_rank(algo, mode, tmp_path):
    res = run_case(algo, mode=mode, world=4, victim=2, steps=STEPS, kill_at=KILL_AT,
                   timeout=TIMEOUT, dead_after=DEAD_AFTER, out=tmp_path)
    assert sorted(res["exit_codes"]) == [0, 1, 3], res
    assert all(code == 3 for code in res["exit_codes"].values()), res
    assert res["seconds_to_return"] < TIMEOUT, res
    assert res["errors_name_dead_rank"], res
