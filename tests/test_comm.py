"""Communicators against plain-torch references, over real Gloo groups and stacked.

Every rank of a real group runs all checks in one spawned function per world size (a spawn costs
seconds); the parent recomputes each input from its seed, the reference in float64, and the same
calls through a :class:`StackedCommunicator`.
"""

from __future__ import annotations

import io
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from gossip.comm import (
    CommError,
    CommTimeout,
    Communicator,
    DenseReceived,
    StackedCommunicator,
    TorchCommunicator,
    Traffic,
)
from gossip.compress import Compressor, parse_codec
from tests.distributed import run_ranks

FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INTS = [torch.int32, torch.int64]
SIZES = [1, 7, 257, 4097]
XSIZES = [1, 1031]
# absolute tolerance of a mean of standard-normal numbers, per dtype
ATOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 3e-2, torch.float16: 4e-3}
TABLES = ["ring", "pairs", "padded", "star", "nobody"]


def _data(kind: str, node: int, p: int, dtype: torch.dtype) -> torch.Tensor:
    """One node's input row [1, p]; the same on every process."""
    seed = sum(map(ord, f"{kind}{p}{dtype}")) * 1000 + node
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(1, p, generator=g, dtype=torch.float64).to(dtype)
    return torch.randint(-1000, 1000, (1, p), generator=g, dtype=dtype)


def _weight(node: int) -> float:
    return 0.0 if node == 1 else float(node + 1)  # node 1 does not take part


def _table(name: str, n: int) -> torch.Tensor:
    """A global peer table [N, K]: row i = the nodes whose models i receives (-1 = none)."""
    i = np.arange(n)
    if name == "ring":  # both neighbours (for N = 2 the same node twice)
        rows = np.stack([(i - 1) % n, (i + 1) % n], axis=1)
    elif name == "pairs":  # the partner in a seeded random perfect matching
        perm = np.random.default_rng(12).permutation(n)
        rows = np.empty((n, 1), dtype=np.int64)
        half = n // 2
        for k in range(half):
            a, b = perm[k], perm[k + half]
            rows[a, 0], rows[b, 0] = b, a
    elif name == "padded":  # even nodes hear from the next two nodes, odd nodes from nobody
        rows = np.full((n, 2), -1)
        rows[::2, 0] = (i[::2] + 1) % n
        if n > 2:
            rows[::2, 1] = (i[::2] + 2) % n
    elif name == "star":  # node 0 hears from everyone, nobody hears from anyone else
        rows = np.full((n, n - 1), -1)
        rows[0] = np.arange(1, n)
    elif name == "nobody":
        rows = np.full((n, 1), -1)
    else:
        raise AssertionError(name)
    return torch.as_tensor(rows, dtype=torch.long)


def _pack(obj: object) -> bytes:
    """Tensors through torch.save bytes: the harness's queue would otherwise share their storage
    through file descriptors that vanish when the rank's process exits."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(data: bytes) -> object:
    return torch.load(io.BytesIO(data), weights_only=False)


def _ar_cases():
    for dtype in FLOATS:
        for p in SIZES:
            yield dtype, p


def _x_cases():
    for name in TABLES:
        for dtype in FLOATS + INTS:
            for p in XSIZES if dtype == torch.float32 else [XSIZES[-1]]:
                yield name, dtype, p


def _comm_checks(comm: TorchCommunicator) -> dict:
    """Every collective and exchange case on one real rank; results go back to the parent."""
    me, n = int(comm.nodes[0]), comm.world_size
    out: dict = {"nodes": comm.nodes.clone(), "world": n, "errors": {}}
    assert isinstance(comm, Communicator)
    for dtype, p in _ar_cases():
        x = _data("mean", me, p, dtype)
        before = comm.traffic.bytes_sent
        comm.all_reduce_mean_(x)
        out["mean", dtype, p] = (x, comm.traffic.bytes_sent - before)
        x = _data("wmean", me, p, dtype)
        if _weight(me) == 0:
            x.fill_(float("nan"))  # a non-participant's model must not leak into the mean
        before = comm.traffic.bytes_sent
        comm.all_reduce_mean_(x, torch.tensor([_weight(me)], dtype=torch.float64))
        out["wmean", dtype, p] = (x, comm.traffic.bytes_sent - before)
    for name, dtype, p in _x_cases():
        x = _data("x", me, p, dtype)
        before = (comm.traffic.bytes_sent, comm.traffic.messages)
        received, arrived = comm.exchange(x, _table(name, n))
        # copy: the communicator may reuse its receive buffer in the next exchange
        out["x", name, dtype, p] = (received.clone(), arrived.clone(),
                                    comm.traffic.bytes_sent - before[0],
                                    comm.traffic.messages - before[1])
    # bad inputs fail the same way on every rank, before anything is sent
    bad_tables = {"self": torch.arange(n).unsqueeze(1), "range": torch.full((n, 1), n),
                  "shape": torch.full((n + 1, 1), -1)}
    for key, table in bad_tables.items():
        try:
            comm.exchange(torch.zeros(1, 3), table)
        except ValueError as e:
            out["errors"][key] = str(e)
    try:
        comm.all_reduce_mean_(torch.ones(1, 3, dtype=torch.int64))
    except ValueError as e:
        out["errors"]["int"] = str(e)
    try:
        comm.all_reduce_mean_(torch.ones(1, 3), torch.zeros(1))
    except CommError as e:
        out["errors"]["zero"] = str(e)
    try:  # one rank's NaN weight: every rank refuses (the total is NaN everywhere)
        comm.all_reduce_mean_(torch.ones(1, 3),
                              torch.tensor([math.nan if comm.rank == 0 else 1.0]))
    except CommError as e:
        out["errors"]["nan"] = str(e)
    try:  # the last rank's negative weight: every rank refuses (the count is summed)
        last = comm.rank == comm.world_size - 1
        comm.all_reduce_mean_(torch.ones(1, 3), torch.tensor([-1.0 if last else 2.0]))
    except CommError as e:
        out["errors"]["negative"] = str(e)
    comm.barrier()
    out["traffic"] = (comm.traffic.bytes_sent, comm.traffic.messages, dict(comm.traffic.by_op))
    return _pack(out)


def _check_world(outs: list[dict], n: int) -> None:
    assert [int(o["nodes"][0]) for o in outs] == list(range(n))
    assert all(o["world"] == n for o in outs)
    total = {"all_reduce": 0, "exchange": 0}
    stacked = StackedCommunicator(n)
    for dtype, p in _ar_cases():
        nbytes = p * torch.empty((), dtype=dtype).element_size()
        ring_bytes = 2 * (n - 1) * nbytes // n
        # plain mean
        xs = torch.cat([_data("mean", r, p, dtype) for r in range(n)])
        ref = xs.double().mean(dim=0)
        sx = xs.clone()
        stacked.all_reduce_mean_(sx)
        for r, o in enumerate(outs):
            got, sent = o["mean", dtype, p]
            assert got.dtype == dtype and got.shape == (1, p)
            torch.testing.assert_close(got[0].double(), ref, atol=ATOL[dtype], rtol=0)
            torch.testing.assert_close(sx[r].double(), got[0].double(), atol=ATOL[dtype], rtol=0)
            assert sent == ring_bytes
            total["all_reduce"] += sent
        # weighted mean; node 1 has weight 0 and holds NaN
        w = torch.tensor([_weight(r) for r in range(n)], dtype=torch.float64)
        xs = torch.cat([_data("wmean", r, p, dtype) for r in range(n)])
        xs[1] = float("nan")
        keep = w > 0
        ref = (w[keep, None] * xs[keep].double()).sum(0) / w.sum()
        sx = xs.clone()
        stacked.all_reduce_mean_(sx, w)
        for r, o in enumerate(outs):
            got, sent = o["wmean", dtype, p]
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(got[0].double(), ref, atol=ATOL[dtype], rtol=0)
            torch.testing.assert_close(sx[r].double(), got[0].double(), atol=ATOL[dtype], rtol=0)
            assert sent == ring_bytes
            total["all_reduce"] += sent
    for name, dtype, p in _x_cases():
        table = _table(name, n)
        xs = torch.cat([_data("x", r, p, dtype) for r in range(n)])
        nbytes = p * xs.element_size()
        before = stacked.traffic.bytes_sent
        s_recv, s_arr = stacked.exchange(xs, table)
        assert stacked.traffic.bytes_sent - before == int((table >= 0).sum()) * nbytes
        for r, o in enumerate(outs):
            received, arrived, sent, messages = o["x", name, dtype, p]
            k = table.shape[1]
            assert received.shape == (1, k, p) and received.dtype == dtype
            assert torch.equal(arrived[0], table[r] >= 0)
            for slot in range(k):
                src = int(table[r, slot])
                expect = xs[src] if src >= 0 else torch.zeros(p, dtype=dtype)
                assert torch.equal(received[0, slot], expect), (name, dtype, r, slot)
            # one message per slot of any row that lists r
            listed = int((table == r).sum())
            assert (sent, messages) == (listed * nbytes, listed)
            total["exchange"] += sent
            assert torch.equal(s_recv[r], received[0]) and torch.equal(s_arr[r], arrived[0])
    for o in outs:
        errors = o["errors"]
        assert "lists the node itself" in errors["self"]
        assert f"is not -1 or a node id in [0, {n})" in errors["range"]
        assert f"peers must have shape [N={n}, K]" in errors["shape"]
        assert "floating-point" in errors["int"] and "torch.int64" in errors["int"]
        assert "all weights are zero" in errors["zero"]
        assert "not finite (total nan, 0 negative)" in errors["nan"]
        assert "1 negative" in errors["negative"]
    # the running totals add up: per op, and the stacked communicator's all-node total
    assert sum(o["traffic"][2].get("exchange", 0) for o in outs) == total["exchange"]
    assert sum(o["traffic"][2].get("all_reduce", 0) for o in outs) == total["all_reduce"]
    assert sum(o["traffic"][0] for o in outs) == sum(total.values())
    assert stacked.traffic.bytes_sent == sum(total.values())
    assert stacked.traffic.by_op == total
    assert stacked.traffic.messages == sum(o["traffic"][1] for o in outs)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_torch_communicator_matches_references_and_stacked(world_size):
    outs = run_ranks(_comm_checks, world_size, timeout=240)
    _check_world([_unpack(o) for o in outs], world_size)


def _timeouts(comm: TorchCommunicator, flag: str) -> object:
    """Rank 1 never posts its send nor reaches the barrier; rank 0 must time out, not hang."""
    comm.timeout = 2.0
    comm.step = 7
    if comm.rank == 1:
        deadline = time.monotonic() + 60
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.05)
        return None
    results = []
    for what in ("exchange", "barrier"):
        t0 = time.monotonic()
        try:
            if what == "exchange":
                comm.exchange(torch.ones(1, 3), torch.tensor([[1], [-1]]))
            else:
                comm.barrier()
            results.append((what, None, None, None, None, time.monotonic() - t0))
        except CommTimeout as e:
            results.append((what, str(e), e.rank, e.peers, e.step, time.monotonic() - t0))
    Path(flag).touch()
    return results


def test_timeout_raises_comm_timeout_naming_rank_peer_and_step(tmp_path):
    t0 = time.monotonic()
    outs = run_ranks(_timeouts, 2, str(tmp_path / "done"), timeout=60)
    assert time.monotonic() - t0 < 40
    for what, msg, rank, peers, step, seconds in outs[0]:
        assert msg is not None, f"{what} did not time out"
        assert (rank, tuple(peers), step) == (0, (1,), 7)
        assert msg.startswith("rank 0, peers [1], step 7:")
        assert seconds < 15, (what, seconds)
    # the exchange waited for its 2 s timeout; Gloo then closes the pair, so the barrier after it
    # fails at once (still as a CommTimeout that names rank, peers and step)
    assert outs[0][0][0] == "exchange" and outs[0][0][5] > 1.5
    assert "Timed out" in outs[0][0][1]
    assert outs[1] is None


# ----------------------------------------------------------------------------- stacked only


def test_stacked_weighted_means_follow_every_change_of_weights_and_faults():
    """A sync reuses the last one's shares only when its weights and its nodes up are the same:
    a sequence of syncs against the weighted mean in float64, recomputed each time."""
    n, p = 5, 7
    comm = StackedCommunicator(n)
    gen = torch.Generator().manual_seed(0)
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    down = torch.ones(n, dtype=torch.bool)
    down[3] = False
    steps = [(weights, None), (weights, None), (weights, down), (weights, None),
             (weights * torch.tensor([1.0, 0, 1, 1, 1]), None), (None, None), (None, down)]
    for w, alive in steps:
        comm.set_faults(alive=alive)
        x = torch.randn(n, p, generator=gen)
        eff = (torch.ones(n) if w is None else w).double() * (
            torch.ones(n) if alive is None else alive.double())
        want = (eff[:, None] * x.double()).sum(0) / eff.sum()
        weights_before = None if w is None else w.clone()
        comm.all_reduce_mean_(x, w)
        torch.testing.assert_close(x.double(), want.expand(n, p), rtol=0, atol=1e-6)
        if w is not None:
            assert torch.equal(w, weights_before)  # the caller's weights are not touched


def test_stacked_faults_drops_and_events():
    n, p = 6, 5
    comm = StackedCommunicator(n, seed=3)
    xs = torch.arange(n * p, dtype=torch.float32).view(n, p)
    table = _table("ring", n)
    alive = torch.ones(n, dtype=torch.bool)
    alive[2] = False
    comm.set_faults(alive=alive)
    received, arrived = comm.exchange(xs, table)
    for i in range(n):
        for k in range(2):
            src = int(table[i, k])
            ok = i != 2 and src != 2
            assert bool(arrived[i, k]) == ok
            assert torch.equal(received[i, k], xs[src] if ok else torch.zeros(p))
    # a dead node neither sends nor pays
    assert comm.bytes_per_node[2] == 0
    assert comm.traffic.bytes_sent == (2 * n - 4) * p * 4
    event = comm.events[-1]
    assert event.op == "exchange" and torch.equal(event.delivered, arrived)
    # all-reduce over the alive nodes only; the dead row takes the result too (it pulls the
    # global model when it returns) but contributes nothing
    x = xs.clone()
    x[2] = float("nan")
    comm.all_reduce_mean_(x)
    ref = xs[alive].double().mean(0)
    for i in range(n):
        torch.testing.assert_close(x[i].double(), ref, rtol=0, atol=1e-5)
    # drops: seeded, and dropped slots hold zeros
    comm.set_faults(drop_prob=0.5)
    r1, a1 = comm.exchange(xs, table)
    again = StackedCommunicator(n, seed=3)
    again.set_faults(alive=alive)
    again.exchange(xs, table)
    again.set_faults(drop_prob=0.5)
    r2, a2 = again.exchange(xs, table)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    assert 0 < int(a1.sum()) < a1.numel()
    assert bool((r1[~a1] == 0).all())
    with pytest.raises(ValueError, match="drop_prob"):
        comm.set_faults(drop_prob=1.0)
    with pytest.raises(ValueError, match="every participating weight is zero"):
        comm.all_reduce_mean_(xs.clone(), torch.zeros(n))
    for bad in (math.nan, math.inf):  # a NaN/inf weight would spread into every row
        weights = torch.ones(n)
        weights[1] = bad
        before = xs.clone()
        for comp in (None, Compressor(parse_codec("int8"), n, xs.shape[1])):
            with pytest.raises(ValueError, match=f"not finite \\(their sum: {bad}, 0 negative"):
                comm.all_reduce_mean_(xs, weights, compressor=comp)
            assert torch.equal(xs, before)
    weights = torch.ones(n)
    weights[1] = -1.0  # a negative weight was taken: a mean over [2, -1, 0] gave 2.0
    before = xs.clone()
    for comp in (None, Compressor(parse_codec("int8"), n, xs.shape[1])):
        with pytest.raises(ValueError, match=r"negative or not finite .* 1 negative"):
            comm.all_reduce_mean_(xs, weights, compressor=comp)
        assert torch.equal(xs, before)
    with pytest.raises(ValueError, match="world_size"):
        StackedCommunicator(0)


def test_stacked_exchange_read_slot_by_slot_equals_the_dense_exchange():
    n, p = 7, 11
    xs = torch.randn(n, p, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    table = torch.tensor([[(i + d) % n for d in (1, 3, 5)] for i in range(n)])
    table[4, 2] = -1  # padding
    alive = torch.ones(n, dtype=torch.bool)
    alive[1] = False
    dense, lazy = StackedCommunicator(n, seed=5), StackedCommunicator(n, seed=5)
    for comm in (dense, lazy):
        comm.set_faults(alive=alive, drop_prob=0.3)
    received, arrived = dense.exchange(xs, table)
    received = received.clone()
    got = lazy.exchange_slots(xs, table)
    assert torch.equal(got.arrived, arrived) and got.num_slots == 3
    assert 0 < int(arrived.sum()) < n * 3 - 1  # some dropped, some delivered
    for k in range(3):  # slot k: the sender's row where it arrived, zeros elsewhere
        ref = torch.stack([xs[int(table[i, k])] if arrived[i, k] else torch.zeros(p)
                           for i in range(n)])
        assert torch.equal(got.slot(k), ref)
        assert torch.equal(received[:, k], ref)

    def stats(t: torch.Tensor) -> torch.Tensor:
        return torch.stack([t.sum(-1), t.var(-1, unbiased=False)], dim=-1)

    ref = stats(received.reshape(n * 3, p)).view(n, 3, 2).masked_fill(~arrived.unsqueeze(-1), 0)
    assert torch.equal(got.sender_stats(stats), ref)
    assert torch.equal(DenseReceived(received, arrived).sender_stats(stats), ref)
    # both communicators counted the same traffic and logged the same event
    assert dense.traffic == lazy.traffic
    assert torch.equal(dense.bytes_per_node, lazy.bytes_per_node)


def _sharded_exchange(comm: TorchCommunicator, n: int, tables: dict) -> dict:
    """One shard of n stacked nodes per rank: exchange over each table, slot by slot."""
    shards, me = comm.world_size, comm.rank
    size = n // shards
    nodes = torch.arange(me * size, (me + 1) * size)
    stacked = StackedCommunicator(n, nodes, group=dist.group.WORLD, seed=4)
    stacked.set_faults(drop_prob=0.25)
    xs = torch.arange(n * 3, dtype=torch.float32).view(n, 3)[nodes]
    out = {}
    for name, table in tables.items():
        before = stacked.rows_fetched
        got = stacked.exchange_slots(xs, table)
        out[name] = ([got.slot(k).clone() for k in range(got.num_slots)], got.arrived.clone(),
                     stacked.rows_fetched - before)
    return out


def test_sharded_exchange_moves_only_the_rows_each_shard_reads():
    n, shards = 12, 4
    ring = _table("ring", n)
    tables = {"ring": ring, "random": torch.stack([torch.randperm(n)[:3] for _ in range(n)])}
    tables["random"][tables["random"] == torch.arange(n).unsqueeze(1)] = -1  # no self
    outs = run_ranks(_sharded_exchange, shards, n, tables)
    whole = StackedCommunicator(n, seed=4)
    whole.set_faults(drop_prob=0.25)
    xs = torch.arange(n * 3, dtype=torch.float32).view(n, 3)
    for name, table in tables.items():
        ref = whole.exchange_slots(xs, table)
        slots = [torch.cat([o[name][0][k] for o in outs]) for k in range(ref.num_slots)]
        assert torch.equal(torch.cat([o[name][1] for o in outs]), ref.arrived)
        for k in range(ref.num_slots):
            assert torch.equal(slots[k], ref.slot(k)), (name, k)
        # a shard fetches each foreign sender its delivered slots read, once
        for r, o in enumerate(outs):
            mine = range(3 * r, 3 * r + 3)
            senders = {int(table[i, k]) for i in mine for k in range(table.shape[1])
                       if ref.arrived[i, k] and int(table[i, k]) not in mine}
            assert o[name][2] == len(senders), (name, r)
    # on a ring a shard reads at most its two boundary neighbours, not all N rows
    assert all(o["ring"][2] <= 2 for o in outs)


def test_traffic_add():
    t = Traffic()
    t.add("a", 10)
    t.add("b", 3, messages=2)
    t.add("a", 1)
    assert (t.bytes_sent, t.messages, t.by_op) == (14, 4, {"a": 11, "b": 3})


def test_torch_communicator_rejects_bad_timeout():
    with pytest.raises(ValueError, match="timeout must be > 0 seconds, got 0"):
        TorchCommunicator(timeout=0)
