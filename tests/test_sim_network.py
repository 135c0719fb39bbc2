"""The time model (per-node clocks) and the fault schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gossip.comm.stacked import CommEvent
from simulations.faults import FaultSchedule
from simulations.network import (
    NetworkModel,
    SimClock,
    allreduce_seconds,
    ring_allreduce_seconds,
)

torch.set_num_threads(1)  # small kernels: threads only add overhead (and xdist runs 2)


def _allreduce(n: int, nbytes: int, alive: torch.Tensor | None = None) -> CommEvent:
    part = torch.ones(n, dtype=torch.bool) if alive is None else alive
    return CommEvent("all_reduce", nbytes, None, None, part)


def _exchange(table: list[list[int]], delivered: list[list[bool]] | None = None) -> CommEvent:
    t = torch.tensor(table)
    d = t >= 0 if delivered is None else torch.tensor(delivered)
    return CommEvent("exchange", 1000, t, d, None)


def test_ring_allreduce_formula() -> None:
    assert ring_allreduce_seconds(1, 1e6, 0.1, 1e6) == 0.0
    assert ring_allreduce_seconds(4, 4e6, 0.1, 1e6) == pytest.approx(2 * 3 * (0.1 + 1.0))
    hd = allreduce_seconds("halving-doubling", 8, 8e6, 0.1, 1e6)
    assert hd == pytest.approx(2 * 3 * 0.1 + 2 * 7 / 8 * 8.0)
    with pytest.raises(ValueError, match="allreduce"):
        allreduce_seconds("tree", 8, 1.0, 0.1, 1.0)


def test_star_allreduce_formula() -> None:
    # 4 clients upload 1 MB each through a 1 MB/s server link, then it sends 4 MB back
    assert allreduce_seconds("star", 4, 1e6, 0.1, 1e6) == pytest.approx(2 * 0.1 + 2 * 4.0)
    # a server 10x faster than a client: the clients' own links bound it
    assert allreduce_seconds("star", 4, 1e6, 0.1, 1e6, 1e7) == pytest.approx(2 * 0.1 + 2 * 1.0)
    assert allreduce_seconds("star", 1, 1e6, 0.1, 1e6) == pytest.approx(2 * 0.1 + 2 * 1.0)
    assert allreduce_seconds("star", 0, 1e6, 0.1, 1e6) == 0.0
    with pytest.raises(ValueError, match="server_bandwidth"):
        NetworkModel(allreduce="star", server_bandwidth=0.0)


def test_fedavg_round_with_a_server_takes_compute_plus_the_star() -> None:
    from simulations.config import SimConfig
    from simulations.engine import Simulation

    cfg = SimConfig(algo="fedavg", nodes=6, rounds=1, sync_every=2, partition="iid",
                    allreduce="star", server_bandwidth=2e6, latency=0.01, compute_time=0.5)
    sim = Simulation(cfg)
    rec = sim.run_round(0)
    nbytes = sim.model.flat.nbytes_per_row
    expected = 2 * 0.5 + 2 * 0.01 + 2 * max(6 * nbytes / 2e6, nbytes / cfg.bandwidth)
    assert rec["sim_seconds"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="server_bandwidth"):
        SimConfig(server_bandwidth=1e6)  # only with allreduce='star'


def test_synchronous_round_waits_for_the_slowest_node() -> None:
    clock = SimClock(NetworkModel(latency=0.1, bandwidth=1e6, compute_time=1.0), 4)
    clock.compute(0, torch.tensor([2, 2, 2, 2]), torch.tensor([1.0, 1.0, 3.0, 1.0]))
    clock.communicate(0, 0, _allreduce(4, 4_000_000), torch.ones(4, dtype=torch.bool))
    expected = 6.0 + ring_allreduce_seconds(4, 4e6, 0.1, 1e6)
    np.testing.assert_allclose(clock.t, expected)
    assert clock.now == pytest.approx(expected)


def test_down_nodes_skip_the_allreduce_and_catch_up() -> None:
    clock = SimClock(NetworkModel(latency=0.1, bandwidth=1e6, compute_time=1.0), 3)
    alive = torch.tensor([True, True, False])
    clock.compute(0, torch.tensor([1, 2, 0]), torch.ones(3))
    clock.communicate(0, 0, _allreduce(3, 1000, alive), alive)
    up = 2.0 + ring_allreduce_seconds(2, 1000, 0.1, 1e6)
    np.testing.assert_allclose(clock.t, [up, up, 0.0])
    clock.end_round(alive)
    np.testing.assert_allclose(clock.t, [up, up, up])


def test_exchange_waits_only_for_own_peers() -> None:
    # ring of 4: node i receives from i-1 and i+1; node 2 straggles.
    clock = SimClock(NetworkModel(latency=0.5, bandwidth=1000.0, compute_time=1.0), 4)
    clock.compute(0, torch.ones(4, dtype=torch.long), torch.tensor([1.0, 1.0, 5.0, 1.0]))
    table = [[3, 1], [0, 2], [1, 3], [2, 0]]
    clock.communicate(0, 0, _exchange(table), torch.ones(4, dtype=torch.bool))
    tx = 1000 / 1000.0  # one message
    # every node sends 2 messages (uplink shared): done at ready + 2 tx; arrival + latency
    send_done = np.array([1.0, 1.0, 5.0, 1.0]) + 2 * tx
    expected = [max(send_done[0], send_done[3] + 0.5, send_done[1] + 0.5),
                max(send_done[1], send_done[0] + 0.5, send_done[2] + 0.5),
                max(send_done[2], send_done[1] + 0.5, send_done[3] + 0.5),
                max(send_done[3], send_done[2] + 0.5, send_done[0] + 0.5)]
    np.testing.assert_allclose(clock.t, expected)
    assert clock.t[0] < clock.t[1]  # node 0 does not wait for the straggler two hops away


def test_exchange_ignores_down_peers_but_waits_for_lost_messages() -> None:
    clock = SimClock(NetworkModel(latency=0.5, bandwidth=1000.0, compute_time=1.0), 3)
    clock.t[:] = [0.0, 10.0, 20.0]
    alive = torch.tensor([True, True, False])
    # node 0 hears from 1 (lost on the way) and from 2 (down)
    clock.communicate(0, 0, _exchange([[1, 2], [-1, -1], [-1, -1]],
                                      [[False, False], [False, False], [False, False]]), alive)
    assert clock.t[0] == pytest.approx(10.0 + 1.0 + 0.5)  # waited for the lost message's timeout
    assert clock.t[1] == pytest.approx(11.0)  # its own send
    assert clock.t[2] == 20.0


def test_jitter_is_seeded_and_mean_one() -> None:
    a = NetworkModel(jitter=0.5, seed=3).noise((100_000,), 1, 2)
    b = NetworkModel(jitter=0.5, seed=3).noise((100_000,), 1, 2)
    assert np.array_equal(a, b)
    assert abs(a.mean() - 1.0) < 0.01
    assert np.all(NetworkModel().noise((5,), 1) == 1.0)


def test_fault_schedule_crashes_churn_and_stragglers() -> None:
    f = FaultSchedule(100, 20, seed=1, crash_fraction=0.1, crash_round=5, churn_fraction=0.2,
                      churn_rounds=3, straggler_fraction=0.25, straggler_slowdown=4.0)
    crashed = f.crash_at <= 20
    assert crashed.sum() == 10
    for r in range(5, 20):
        assert not bool(f.alive(r)[torch.from_numpy(crashed)].any())
    churned = f.churn.start <= 20
    assert churned.sum() == 20
    down_rounds = sum((~f.alive(r)).numpy() & churned & ~crashed for r in range(20))
    assert set(down_rounds[churned & ~crashed].tolist()) <= {0, 1, 2, 3}
    assert (down_rounds[churned & ~crashed] == 3).mean() > 0.5
    s = f.slowdown(7)
    assert int((s == 4.0).sum()) == 25 and int((s == 1.0).sum()) == 75
    assert torch.equal(s, FaultSchedule(100, 20, seed=1, straggler_fraction=0.25,
                                        straggler_slowdown=4.0).slowdown(7))
    assert not torch.equal(s, f.slowdown(8))


def test_fault_schedule_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="crash_fraction"):
        FaultSchedule(10, 5, seed=0, crash_fraction=1.5)
    with pytest.raises(ValueError, match="drop_prob"):
        FaultSchedule(10, 5, seed=0, drop_prob=1.0)
    with pytest.raises(ValueError, match="straggler_slowdown"):
        FaultSchedule(10, 5, seed=0, straggler_slowdown=0.5)
    with pytest.raises(ValueError, match=r"crash_round must be in \[0, rounds=5\) with "
                                         r"crash_fraction=0.5, got 5"):
        FaultSchedule(10, 5, seed=0, crash_fraction=0.5, crash_round=5)  # after the last round
    assert math.isfinite(FaultSchedule(10, 5, seed=0).slowdown(0).sum().item())
