"""DiLoCo's compressed all-reduce overlapped (gossip/comm/background.py), on real Gloo ranks:

- started, it returns before a peer has even posted, and its result, residual and byte count
  equal the blocking call's bit for bit (int8 with error feedback and weights, top-k, and the
  collectives path a monitor takes), with two in flight at once and the main thread using the
  main group meanwhile;
- a peer frozen (SIGSTOP) while it is in flight makes ``wait()`` raise CommTimeout within the
  timeout, never hang; under a PeerMonitor, a PeerFailure naming it after ``dead_after``;
- DiLoCo with int8, error feedback and overlap resumes bit-exactly from a state saved with the
  all-reduce in flight.
(A peer killed mid-run under the monitor: tests/test_overlap.py's dead-peer test, compressed.)
"""

from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gossip.algorithms import DiLoCo, DiLoCoConfig
from gossip.comm import CommError, CommTimeout
from gossip.comm.monitor import PeerMonitor
from gossip.compress import Compressor, parse_codec
from gossip.flat import FlatParams
from tests.distributed import run_ranks

P = 50
SPECS = ("int8:16", "topk:0.2")


def _inputs(rank: int, rnd: int, k: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rnd + 10 * k + rank)
    return torch.randn(1, P, generator=g)


def _bits(comm, collectives: bool) -> dict:
    from gossip.comm import compressed

    if collectives:  # Gloo's all_to_all / all_gather: the path taken under a monitor
        compressed._point_to_point = lambda comm: False
    me = comm.rank
    weight = torch.tensor([me + 1.0], dtype=torch.float64)
    out: dict = {}
    for spec in SPECS:
        # two buffers (as DiLoCo's fragments or pieces), each its own compressor
        blocking = [Compressor(parse_codec(spec), 1, P, error_feedback=True, seed=k)
                    for k in range(2)]
        overlapped = [Compressor(parse_codec(spec), 1, P, error_feedback=True, seed=k)
                      for k in range(2)]
        want, got, returned, waited = [], [], [], []
        before = comm.traffic.bytes_sent
        for rnd in range(3):
            for k in range(2):
                x = _inputs(me, rnd, k)
                comm.all_reduce_mean_(x, weight, compressor=blocking[k])
                want.append(x)
        sent_blocking = comm.traffic.bytes_sent - before
        before = comm.traffic.bytes_sent
        for rnd in range(3):
            if me == 1 and rnd == 2:
                time.sleep(1.0)  # rank 0's start must not wait for this rank
            xs = [_inputs(me, rnd, k) for k in range(2)]
            t0 = time.monotonic()
            pending = [comm.start_all_reduce_mean_(xs[k], weight, compressor=overlapped[k])
                       for k in range(2)]
            returned.append(time.monotonic() - t0)
            plain = torch.full((1, 8), float(me))  # the main group, while both are in flight
            b0 = comm.traffic.bytes_sent  # (the jobs' bytes are counted at wait())
            comm.all_reduce_mean_(plain)
            before += comm.traffic.bytes_sent - b0
            assert torch.equal(plain, torch.full((1, 8), (comm.world_size - 1) / 2))
            for p in pending:
                p.wait()
            waited.append(time.monotonic() - t0)
            got += xs
        out[spec] = {
            "equal": all(torch.equal(a, b) for a, b in zip(want, got, strict=True)),
            "residual": all(torch.equal(a.feedback.residual, b.feedback.residual)
                            for a, b in zip(blocking, overlapped, strict=True)),
            "seeds": [c.calls for c in overlapped] == [c.calls for c in blocking],
            "bytes": (sent_blocking, comm.traffic.bytes_sent - before),
            "returned": returned, "waited": waited,
        }
    return out


@pytest.mark.parametrize("world,collectives", [
    (2, False), pytest.param(4, False, marks=pytest.mark.slow),
    pytest.param(3, True, marks=pytest.mark.slow)])
def test_overlapped_compressed_all_reduce_is_the_blocking_one_in_flight(world, collectives):
    for rank, out in enumerate(run_ranks(_bits, world, collectives, timeout=180.0)):
        for spec, res in out.items():
            assert res["equal"] and res["residual"] and res["seeds"], (rank, spec, res)
            assert res["bytes"][0] == res["bytes"][1] > 0, (rank, spec, res)
            if rank == 0:  # round 3: rank 1 posted a second late; rank 0 did not wait for it
                assert res["returned"][2] < 0.5, (spec, res)
                assert res["waited"][2] > 0.8, (spec, res)  # start to result


def _stopped(store) -> int:
    """The victim's pid, once it is stopped (state T)."""
    pid = int(store.get("victim"))
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        time.sleep(0.01)
    return pid


def _frozen(comm) -> dict:
    store = PeerMonitor.default_store()
    comp = Compressor(parse_codec("int8:16"), 1, P, error_feedback=True)
    x = _inputs(comm.rank, 0, 0)
    comm.start_all_reduce_mean_(x, compressor=comp).wait()  # the worker's group is up
    if comm.rank == 1:  # frozen with nothing posted, until rank 0 has given up on it
        store.set("victim", str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
        try:  # resumed: rank 0 closed the pair; this rank's own attempt fails too
            comm.start_all_reduce_mean_(x, compressor=comp).wait()
        except CommError as e:
            return {"error": str(e)}
        return {"error": ""}
    pid = _stopped(store)
    comm.step = 7
    t0 = time.monotonic()
    pending = comm.start_all_reduce_mean_(x, compressor=comp)
    returned = time.monotonic() - t0
    try:
        pending.wait()
        error = ""
    except CommTimeout as e:
        error = str(e)
    waited = time.monotonic() - t0
    os.kill(pid, signal.SIGCONT)
    return {"returned": returned, "waited": waited, "error": error}


def test_a_peer_frozen_with_the_compressed_all_reduce_in_flight_times_out():
    timeout = 4.0
    out, victim = run_ranks(_frozen, 2, timeout=120.0, comm_timeout=timeout)
    assert "rank 1" in victim["error"], victim  # resumed, it fails too (a CommError)
    assert out["returned"] < 1.0, out
    assert "rank 0" in out["error"] and "step 7" in out["error"], out
    assert timeout * 0.9 < out["waited"] < 4 * timeout, out


H = 4


def _diloco(comm, steps: int, stop: int | None = None) -> torch.Tensor:
    """DiLoCo int8 + error feedback + overlap, F = 2, for ``steps`` inner steps; with ``stop``,
    saved at ``stop`` (an all-reduce in flight), rebuilt from the saved bytes and resumed."""
    me = comm.rank

    def make(x: torch.Tensor) -> tuple[FlatParams, DiLoCo]:
        params = FlatParams.from_stacked({"w": x})
        cfg = DiLoCoConfig(sync_every=H, overlap=True, fragments=2, compress="int8:16",
                           error_feedback=True, outer_lr=0.5)
        return params, DiLoCo(cfg, params, comm)

    params, alg = make(torch.linspace(-1, 1, P).unsqueeze(0).clone())
    for s in range(1, steps + 1):
        buf = params.groups[0].buffer
        with torch.no_grad():  # a stand-in inner step, different on every rank
            buf.add_(torch.randn(1, P, generator=torch.Generator().manual_seed(100 * s + me)),
                     alpha=0.01)
        alg.step(s)
        if s == stop:
            saved = io.BytesIO()
            torch.save((buf.clone(), alg.state_dict()), saved)
            x, state = torch.load(io.BytesIO(saved.getvalue()), weights_only=False)
            params, alg = make(x)
            alg.load_state_dict(state)
    alg.flush()
    dist.barrier()
    return params.groups[0].buffer.clone()


def _resume(comm) -> tuple[torch.Tensor, torch.Tensor]:
    steps = 6 * H
    return _diloco(comm, steps), _diloco(comm, steps, stop=3 * H + H // 2)


def test_compressed_overlapped_diloco_resumes_bit_exactly():
    for straight, resumed in run_ranks(_resume, 2, timeout=180.0):
        assert torch.equal(straight, resumed)


def _frozen_monitored(comm) -> dict:
    store = PeerMonitor.default_store()
    comm.monitor = PeerMonitor(store, comm.rank, comm.world_size, interval=0.2, dead_after=2.0)
    comp = Compressor(parse_codec("int8:16"), 1, P, error_feedback=True)
    x = _inputs(comm.rank, 0, 0)
    comm.start_all_reduce_mean_(x, compressor=comp).wait()  # the worker's group is up
    if comm.rank == 2:  # frozen (heartbeat too) until the others have given up on it
        store.set("victim", str(os.getpid()))
        os.kill(os.getpid(), signal.SIGSTOP)
        comm.monitor.close()
        return {}
    pid = _stopped(store)
    comm.step = 9
    t0 = time.monotonic()
    pending = comm.start_all_reduce_mean_(x, compressor=comp)
    try:
        pending.wait()
        error = ""
    except CommError as e:
        error = f"{type(e).__name__}: {e}"
    waited = time.monotonic() - t0
    comm.monitor.close()
    if store.add("survivors", 1) == 2:
        os.kill(pid, signal.SIGCONT)
    return {"waited": waited, "error": error, "deaths": dict(comm.deaths)}


def test_a_frozen_peer_under_a_monitor_fails_the_in_flight_all_reduce_naming_it():
    """With a monitor the all-reduce runs Gloo's collectives, watched: the frozen peer is found
    dead after ``dead_after`` (2 s), long before the 60 s timeout."""
    for out in run_ranks(_frozen_monitored, 3, timeout=120.0, comm_timeout=60.0)[:2]:
        assert out["error"].startswith("PeerFailure") and "[2] died" in out["error"], out
        assert "step 9" in out["error"] and out["deaths"] == {2: 9}, out
        assert out["waited"] < 20.0, out
