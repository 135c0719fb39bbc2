"""PeerMonitor on a real c10d store: heartbeats, reports, agreed membership, store load.

Several monitors share one store in this process (each with its own heartbeat thread), as the
ranks of a run share the rendezvous store; a monitor that is closed stops beating, as a killed
rank does. The kill of a real rank is tested in tests/test_dead_peer.py.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch.distributed as dist

from gossip.comm.monitor import _PREFIX, PeerMonitor

#: short enough for a quick test, long enough that a busy CI machine (2 cores, other tests
#: beside this one) does not stall a live monitor's thread past ``DEAD_AFTER``
INTERVAL, DEAD_AFTER = 0.1, 2.0


class CountingStore(dist.Store):
    """A store that counts the requests it serves (delegates to a HashStore)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = dist.HashStore()
        self.calls: Counter[str] = Counter()

    def set(self, key, value):
        self.calls["set"] += 1
        return self.inner.set(key, value)

    def get(self, key):
        self.calls["get"] += 1
        return self.inner.get(key)

    def add(self, key, value):
        self.calls["add"] += 1
        return self.inner.add(key, value)

    def check(self, keys):
        self.calls["check"] += 1
        return self.inner.check(keys)

    def multi_get(self, keys):
        self.calls["multi_get"] += 1
        return self.inner.multi_get(keys)

    def append(self, key, value):
        self.calls["append"] += 1
        return self.inner.append(key, value)

    def compare_set(self, key, expected, desired):
        self.calls["compare_set"] += 1
        return self.inner.compare_set(key, expected, desired)


def _monitors(store: dist.Store, n: int) -> list[PeerMonitor]:
    mons = [PeerMonitor(store, r, n, interval=INTERVAL, dead_after=DEAD_AFTER) for r in range(n)]
    for m in mons:
        m.arm()  # set up: judged by their heartbeats from now on
    return mons


def _wait_until(cond, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not met in time"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_silent_rank_is_found_dead_and_reports_spread():
    store = CountingStore()
    mons = _monitors(store, 4)
    try:
        time.sleep(3 * INTERVAL)
        assert all(m.dead() == frozenset() for m in mons)
        closed = time.monotonic()
        mons[2].close()  # rank 2 stops beating
        _wait_until(lambda: all(2 in m.dead() for i, m in enumerate(mons) if i != 2),
                    timeout=DEAD_AFTER + 10.0)
        # not before its heartbeats went stale (its last beat was at most one interval earlier)
        assert time.monotonic() - closed >= DEAD_AFTER - 2 * INTERVAL
        assert mons[0].dead() == mons[1].dead() == mons[3].dead() == frozenset({2})
        # a reported failure reaches the others without waiting for dead_after
        mons[0].report_dead(3, step=17)
        _wait_until(lambda: 3 in mons[1].dead(), timeout=DEAD_AFTER)
        # one agreed dead set per step, whoever asks first
        first = mons[1].agreed_dead(20)
        assert first == mons[0].agreed_dead(20) == frozenset({2, 3})
    finally:
        for m in mons:
            m.close()


@pytest.mark.parametrize("n", [4, 16])
def test_a_scan_costs_two_store_requests_whatever_the_world_size(n):
    store = CountingStore()
    for r in range(1, n):  # every peer has beaten once and is armed
        store.add(f"{_PREFIX}/hb/{r}", 1)
        store.set(f"{_PREFIX}/armed/{r}", "1")
    mon = PeerMonitor(store, 0, n, interval=INTERVAL, dead_after=DEAD_AFTER)
    mon.close()  # no background scans: count this rank's own
    mon._scan()  # the first scan checks that every peer has started and armed
    before = store.calls.copy()
    mon._scan()
    assert store.calls - before == Counter({"multi_get": 1, "add": 1})
    assert mon.dead() == frozenset()


def test_a_rank_never_counts_itself_dead():
    """Peers that gave up on rank 1 report it; rank 1 keeps itself alive, never writes itself
    into the agreed set, and so the set a live writer agrees on is never every rank."""
    store = CountingStore()
    mons = _monitors(store, 3)
    try:
        mons[0].report_dead(1, step=4)
        mons[2].report_dead(1, step=4)
        mons[1].report_dead(1, step=4)  # itself: ignored
        _wait_until(lambda: 1 in mons[2].dead())
        time.sleep(3 * INTERVAL)
        assert 1 not in mons[1].dead()
        # rank 1 writes first: the agreed set leaves rank 1 in (rank 1 is running it)
        assert mons[1].agreed_dead(step=10) == frozenset()
        # rank 0 writes first: rank 1 reads the agreed set with itself in it (to plan as its
        # peers do), yet never records itself as dead
        assert mons[0].agreed_dead(step=20) == frozenset({1})
        assert mons[1].agreed_dead(step=20) == frozenset({1})
        assert 1 not in mons[1].dead()
    finally:
        for m in mons:
            m.close()


def test_a_rank_still_setting_up_is_not_judged_by_its_heartbeat():
    """Before arm() (imports, data, models: a heartbeat thread can starve for seconds on a
    loaded machine) silence is no verdict; after it, silence for dead_after is."""
    store = CountingStore()
    mons = [PeerMonitor(store, r, 2, interval=INTERVAL, dead_after=DEAD_AFTER) for r in range(2)]
    try:
        mons[1].close()  # silent from the start, not armed
        time.sleep(DEAD_AFTER + 5 * INTERVAL)
        assert mons[0].dead() == frozenset()
        mons[1].arm()
        armed = time.monotonic()
        _wait_until(lambda: 1 in mons[0].dead(), timeout=DEAD_AFTER + 10.0)
        assert time.monotonic() - armed >= DEAD_AFTER - 2 * INTERVAL
    finally:
        mons[0].close()
