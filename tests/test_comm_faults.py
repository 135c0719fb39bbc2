"""Point-to-point exchanges under faults, on real Gloo ranks (issue 11, cases 1 and the order).

- A peer that stops heart-beating and never sends: the exchange waits for the monitor's verdict
  (``dead_after``), not the full ``timeout``; the peer is reported dead, its slot did not arrive,
  the other slots did, and no rank ever counts itself dead.
- The exchange posts its receives before its sends (measured on shaped links: sends first
  serialized the two directions, 2.65 s against 1.48 s).
- An exchange started and dropped without a wait (an algorithm thrown away with its outer
  exchange in flight) does not take the next exchange's messages: Gloo withdraws a receive whose
  work object is garbage-collected, and the next receive from that peer then timed out (the CI
  failure of test_overlap's real-rank case, which left one NoLoCo exchange in flight per scenario).
"""

from __future__ import annotations

import gc
import time

import pytest
import torch
import torch.distributed as dist

from gossip.comm.monitor import PeerMonitor
from tests.distributed import run_ranks

TIMEOUT, DEAD_AFTER = 90.0, 3.0


def _frozen_peer(comm):
    comm.timeout = TIMEOUT
    comm.monitor = PeerMonitor(PeerMonitor.default_store(), comm.rank, comm.world_size,
                               interval=0.2, dead_after=DEAD_AFTER)
    store = PeerMonitor.default_store()
    if comm.rank == 2:  # set up, then frozen: no heartbeat, no messages, until the others end
        comm.monitor.arm()
        comm.monitor.close()
        while store.add("test/done", 0) < 2:
            time.sleep(0.05)
        return None
    comm.step = 5
    x = torch.full((1, 64), float(comm.rank))
    peers = torch.tensor([[1, 2], [0, 2], [0, 1]])  # everyone hears from both others
    t0 = time.monotonic()
    received, arrived = comm.exchange(x, peers)
    seconds = time.monotonic() - t0
    other = 1 - comm.rank
    out = {"seconds": seconds, "arrived": arrived.tolist(), "from_other": float(received[0, 0, 0]),
           "deaths": dict(comm.deaths), "dead": sorted(comm.monitor.dead()),
           "failure": comm.failures.get(2, "")}
    # the next exchange leaves the dead peer out at once
    t0 = time.monotonic()
    received, arrived = comm.exchange(x, peers)
    out["second_seconds"] = time.monotonic() - t0
    out["second_arrived"] = arrived.tolist()
    assert float(received[0, 0, 0]) == other
    comm.monitor.close()
    store.add("test/done", 1)
    return out


def test_a_frozen_peer_costs_dead_after_not_the_timeout():
    outs = run_ranks(_frozen_peer, 3, timeout=240, comm_timeout=TIMEOUT)
    for rank, out in enumerate(outs[:2]):
        assert out["seconds"] < TIMEOUT / 3, out  # the verdict, not the 90 s timeout
        assert out["arrived"] == [[True, False]], out
        assert out["from_other"] == float(1 - rank)
        assert out["deaths"] == {2: 5} and out["dead"] == [2], out  # never itself
        assert "rank 2 died" in out["failure"], out
        assert out["second_seconds"] < 5 and out["second_arrived"] == [[True, False]], out


def _order(comm):
    """Spy on batch_isend_irecv (the real one still runs) to see the order of the ops."""
    seen = []
    real = dist.batch_isend_irecv

    def spy(ops):
        seen.extend("recv" if op.op in (dist.irecv,) else "send" for op in ops)
        return real(ops)

    dist.batch_isend_irecv = spy
    try:
        x = torch.full((1, 8), float(comm.rank))
        peers = torch.tensor([[1, 2], [0, 2], [0, 1]])
        received, _ = comm.exchange(x, peers)
    finally:
        dist.batch_isend_irecv = real
    return seen, received[0, :, 0].tolist()


def test_exchange_posts_receives_before_sends():
    outs = run_ranks(_order, 3, timeout=240)
    for rank, (seen, got) in enumerate(outs):
        assert seen == ["recv", "recv", "send", "send"], seen
        assert got == [float(j) for j in range(3) if j != rank]


def _dropped_then_next(comm, late: int, monitored: bool):
    comm.timeout = 20.0
    if monitored:
        comm.monitor = PeerMonitor(PeerMonitor.default_store(), comm.rank, comm.world_size,
                                   interval=0.2, dead_after=10.0)
    peers = torch.tensor([[1], [0]])
    if comm.rank == late:  # the peer has dropped its receive before this message comes
        time.sleep(1.0)
    dropped = comm.start_exchange(torch.full((1, 1000), float(comm.rank)), peers,
                                  received=torch.empty(1, 1, 1000))
    del dropped
    gc.collect()
    wire = torch.full((1, 50), 7 + comm.rank, dtype=torch.uint8)
    got, arrived = comm.exchange(wire, peers)
    if comm.monitor is not None:
        comm.monitor.close()
    return got[0, 0].tolist(), bool(arrived.all())


@pytest.mark.parametrize("monitored", [False, True], ids=["plain", "monitored"])
@pytest.mark.parametrize("late", [0, 1])
def test_an_exchange_dropped_in_flight_does_not_take_the_next_ones_message(late, monitored):
    outs = run_ranks(_dropped_then_next, 2, late, monitored, timeout=120)
    for rank, (got, arrived) in enumerate(outs):
        assert arrived and got == [7 + (1 - rank)] * 50
