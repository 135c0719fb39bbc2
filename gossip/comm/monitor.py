"""Who is still alive: heartbeats and an agreed membership over the rendezvous store.

Each rank's daemon thread bumps a counter ``hb/<rank>`` in the c10d store every ``interval``
seconds and reads every peer's counter with one ``multi_get``; a rank whose counter has not moved
for ``dead_after`` seconds, or that a peer reported (appended to one ``dead`` list, announced by
the counter ``dead_count``), is dead. A scan costs two store requests whatever the world size, so
the store serves O(N) requests per interval, not O(N^2).

For algorithms that re-plan around dead peers (NoLoCo pairings, gossip neighbourhoods),
:meth:`PeerMonitor.agreed_dead` makes every rank use the same dead set at an outer step without
a collective: the first rank to reach the step writes its view with the store's atomic
``compare_set``, and everyone reads that one value back.

The store must outlive any worker: ``launch.spawn`` hosts it in its own process (or joins a
standalone ``launch.store``), ``launch.ray_launch`` in the driver; under torchrun it is the agent's
(it survives a worker's death, not the loss of rank 0's agent); with plain env:// initialisation
rank 0 hosts it, so rank 0's death ends the run.

A rank never counts itself dead (it ignores reports about itself), so the membership it plans
with always holds it and is never empty. A live rank's heartbeat needs its thread to run: on an
overloaded machine keep ``dead_after`` well above the longest stall (seconds).
"""

from __future__ import annotations

import threading
import time

import torch.distributed as dist

__all__ = ["PeerMonitor"]

_PREFIX = "gossip/monitor"


class PeerMonitor:
    """Heartbeats and failure reports of all ranks, read from a c10d store.

    Args:
        store: the rendezvous store (shared by all ranks).
        rank: this rank.
        world_size: number of ranks.
        interval: seconds between heartbeats.
        dead_after: seconds without a heartbeat before a rank counts as dead.
    """

    def __init__(self, store: dist.Store, rank: int, world_size: int, *,
                 interval: float = 0.5, dead_after: float = 3.0) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        if dead_after <= interval:
            raise ValueError(f"dead_after ({dead_after}) must exceed interval ({interval})")
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.interval = interval
        self.dead_after = dead_after
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[int, float]] = {}  # rank -> (counter, when it last moved)
        self._dead: dict[int, float] = {}  # rank -> monotonic time we learned it
        self._all_started = False
        self._armed: set[int] = set()  # peers that called arm(): judged by their heartbeat
        self._reports: set[int] = set()
        self._reports_read = 0
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="gossip-heartbeat", daemon=True)
        self._thread.start()

    def _key(self, kind: str, rank: int | str) -> str:
        return f"{_PREFIX}/{kind}/{rank}"

    @staticmethod
    def heartbeat_key(rank: int) -> str:
        """The key of ``rank``'s heartbeat counter in the process group's store (a launcher that
        hosts the store reads it to tell a frozen rank from a working one)."""
        return f"{_PREFIX}/hb/{rank}"

    def _beat(self) -> None:
        self.store.add(self._key("hb", self.rank), 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._beat()
                self._scan()
            except Exception:  # a store hiccup: beat again next time (only close() stops us)
                continue

    def _counters(self, peers: list[int]) -> list[int]:
        """The peers' heartbeat counters: one ``multi_get`` once every peer has beaten (a get
        of a key nobody wrote yet would wait for it), one ``add(key, 0)`` per peer before."""
        keys = [self._key("hb", r) for r in peers]
        if not self._all_started:
            self._all_started = self.store.check(keys)
        if self._all_started:
            return [int(v) for v in self.store.multi_get(keys)]
        return [self.store.add(k, 0) for k in keys]

    def _reported(self) -> set[int]:
        """Ranks that a peer reported dead (read again only when the report count moved)."""
        count = self.store.add(self._key("dead_count", "all"), 0)
        if count != self._reports_read:
            text = self.store.get(self._key("dead", "all")).decode()
            self._reports = {int(item.split(":")[0]) for item in text.split(",") if item}
            self._reports_read = count
        return self._reports

    def _scan(self) -> None:
        now = time.monotonic()
        peers = [r for r in range(self.world_size) if r != self.rank and r not in self._dead]
        if not peers:
            return
        counters = self._counters(peers)
        reported = self._reported()
        for r in peers:
            if r not in self._armed and self.store.check([self._key("armed", r)]):
                self._armed.add(r)
                self._seen.pop(r, None)  # its silence counts from now
        with self._lock:
            for r, counter in zip(peers, counters, strict=True):
                last = self._seen.get(r)
                if last is None or counter != last[0]:
                    self._seen[r] = (counter, now)
                elif now - last[1] > self.dead_after and r in self._armed:
                    self._dead[r] = now
                if r in reported:
                    self._dead.setdefault(r, now)

    def arm(self) -> None:
        """Say that this rank is set up and about to communicate: from now on its peers judge it
        by its heartbeat. Start-up (imports, data, models) can starve a heartbeat thread for
        seconds on a loaded machine; a rank that dies then is still caught by the timeout or a
        closed connection."""
        self.store.set(self._key("armed", self.rank), "1")

    def report_dead(self, rank: int, step: int) -> None:
        """Tell every rank that ``rank`` failed (e.g. its connection closed) at ``step``.

        A rank never reports itself: it is running this call."""
        if rank == self.rank:
            return
        with self._lock:
            self._dead.setdefault(rank, time.monotonic())
        self.store.append(self._key("dead", "all"), f"{rank}:{step},")
        self.store.add(self._key("dead_count", "all"), 1)

    def dead(self) -> frozenset[int]:
        """Ranks this rank knows to be dead (its own detection plus reports)."""
        with self._lock:
            return frozenset(self._dead)

    def wait_for_verdict(self, ranks: tuple[int, ...], timeout: float) -> frozenset[int]:
        """Watch ``ranks`` for up to ``timeout`` s; return those found dead (empty: all alive)."""
        deadline = time.monotonic() + min(timeout, self.dead_after + 2 * self.interval)
        while time.monotonic() < deadline:
            self._scan()
            found = self.dead() & set(ranks)
            if found:
                return found
            time.sleep(self.interval / 2)
        return frozenset()

    def agreed_dead(self, step: int) -> frozenset[int]:
        """The dead set every rank uses at outer step ``step`` (first writer wins).

        The writer leaves itself out, so the agreed set never holds every rank. It may hold this
        rank (peers that gave up on it): the set is used as agreed, so that every rank plans the
        same groups, but this rank never records itself as dead."""
        mine = ",".join(str(r) for r in sorted(self.dead() - {self.rank}))
        value = self.store.compare_set(self._key("members", step), "", mine or "-")
        text = value.decode() if isinstance(value, bytes) else str(value)
        agreed = frozenset(int(r) for r in text.split(",") if r and r != "-")
        with self._lock:
            now = time.monotonic()
            for r in agreed - {self.rank}:
                self._dead.setdefault(r, now)
        return agreed

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval)

    @staticmethod
    def default_store() -> dist.Store:
        """The store of the default process group."""
        return dist.distributed_c10d._get_default_store()

