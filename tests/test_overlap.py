"""Overlapped outer steps and streaming fragments (DiLoCo, NoLoCo) against references written out
here in plain torch: the one-step-delayed update equations and the fragment schedule, on stacked
nodes and on real Gloo ranks; resume with an exchange in flight; the network model's overlap
charge; a peer killed while an async exchange is in flight."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import Tensor

from gossip.algorithms import DiLoCo, DiLoCoConfig, NoLoCo, NoLoCoConfig
from gossip.algorithms._streaming import due_fragment, fragment_pieces
from gossip.comm import CommError, StackedCommunicator
from gossip.comm.pending import Pending
from gossip.comm.stacked import CommEvent
from gossip.compress import parse_codec
from gossip.flat import FlatParams
from simulations.network import NetworkModel, SimClock
from tests.distributed import run_ranks
from tests.test_algorithms import init_row, nesterov_ref, noise, noloco_ref, ref_groups, stacked

N, P, H = 4, 40, 4
LR, MU = 0.7, 0.9


def _due(step: int, h: int, f: int) -> int | None:
    """The schedule written out: fragment k syncs at steps s >= 1 with s % h == k * h // f."""
    hits = [k for k in range(f) if step >= 1 and step % h == k * h // f]
    assert len(hits) <= 1
    return hits[0] if hits else None


def _cols(p: int, f: int, k: int) -> slice:
    return slice(p * k // f, p * (k + 1) // f)


def _inner(rows: Tensor, nodes: list[int], step: int) -> None:
    """Inner step ``step``: each node's row moves by its own noise."""
    for r, i in enumerate(nodes):
        rows[r] += noise(i, step, rows.shape[1], 0.05)


def diloco_ref(steps: int, f: int, overlap: bool, flush: bool = False) -> Tensor:
    """DiLoCo with F fragments and one-step-delayed outer steps, [N, P] fp32: at fragment k's
    sync, g = mean_i(phi - theta_i) over its columns; without overlap phi = Nesterov(phi, g);
    with overlap phi = Nesterov(phi, g of k's previous sync) (none at its first); theta = phi."""
    theta = init_row(P).expand(N, P).clone()
    phi = init_row(P).clone()
    buf: list[Tensor | None] = [None] * f
    flying: list[Tensor | None] = [None] * f
    for s in range(1, steps + 1):
        _inner(theta, list(range(N)), s)
        k = _due(s, H, f)
        if k is None:
            continue
        c = _cols(P, f, k)
        g = (phi[c] - theta[:, c]).mean(dim=0)
        if overlap:
            g, flying[k] = flying[k], g
        if g is not None:
            phi[c], buf[k] = nesterov_ref(phi[c], buf[k], g, LR, MU)
        theta[:, c] = phi[c]
    for k in range(f) if flush else ():  # the updates still in flight at the end
        if flying[k] is not None:
            c = _cols(P, f, k)
            phi[c], buf[k] = nesterov_ref(phi[c], buf[k], flying[k], LR, MU)
            theta[:, c] = phi[c]
    return theta


def noloco_ref_run(steps: int, f: int, overlap: bool, gamma: float, alpha: float = 0.5,
                   beta: float = 0.7) -> Tensor:
    """NoLoCo with F fragments, float64 [N, P]: without overlap the update of
    ``noloco_ref``; with overlap, the update computed from (theta_t, s_t = phi when segment t
    began) and sync t's groups is added to phi at the fragment's next sync; theta = phi."""
    theta = init_row(P).double().expand(N, P).clone()
    phi, delta = theta.clone(), torch.zeros(N, P, dtype=torch.float64)
    flying: list[tuple[Tensor, Tensor, list] | None] = [None] * f
    for s in range(1, steps + 1):
        for i in range(N):
            theta[i] += noise(i, s, P, 0.05).double()
        k = _due(s, H, f)
        if k is None:
            continue
        c = _cols(P, f, k)
        groups = ref_groups(N, 2, s)
        if not overlap:
            phi[:, c], delta[:, c] = noloco_ref(phi[:, c], delta[:, c], theta[:, c], groups,
                                                alpha, beta, gamma)
        else:
            now = (theta[:, c].clone(), phi[:, c].clone(), groups)
            if flying[k] is not None:
                th, start, g_prev = flying[k]
                _, delta[:, c] = noloco_ref(start, delta[:, c], th, g_prev, alpha, beta, gamma)
                phi[:, c] += delta[:, c]
            flying[k] = now
        theta[:, c] = phi[:, c]
    return theta


def _stacked_run(make, steps: int, *, stop: int | None = None, state: bytes | None = None
                 ) -> tuple[Tensor, object]:
    """Run an algorithm (``make(params, comm)``) on N stacked rows from ``init_row``; with
    ``state`` (bytes of (rows, algorithm state)) resume from it at step ``stop``."""
    first = 1
    x = init_row(P).expand(N, P).clone()
    if state is not None:
        x, _ = torch.load(io.BytesIO(state), weights_only=False)
        first = stop + 1
    params = stacked(x)
    alg = make(params, StackedCommunicator(N))
    if state is not None:
        alg.load_state_dict(torch.load(io.BytesIO(state), weights_only=False)[1])
    buf = params.groups[0].buffer
    for s in range(first, steps + 1):
        _inner(buf, list(range(N)), s)
        alg.step(s)
    return buf, alg


# ----------------------------------------------------------------------------- the schedule


def test_fragments_are_contiguous_and_staggered():
    bufs = [torch.zeros(1, 7), torch.zeros(1, 3), torch.zeros(1, 12)]  # T = 22 elements
    for f in (1, 2, 3, 5, 22):
        pieces = fragment_pieces(bufs, f)
        covered = []
        for k, frag in enumerate(pieces):
            flat = [sum((7, 3, 12)[:p.buffer]) + j for p in frag
                    for j in range(p.cols.start, p.cols.stop)]
            assert flat == list(range(22 * k // f, 22 * (k + 1) // f))  # one contiguous range
            covered += flat
        assert covered == list(range(22))
    with pytest.raises(ValueError, match=r"fragments.*23"):
        fragment_pieces(bufs, 23)
    for h, f in ((8, 1), (8, 4), (10, 3), (7, 7)):
        syncs = {k: [s for s in range(1, 5 * h + 1) if due_fragment(s, h, f) == k]
                 for k in range(f)}
        for s in range(1, 5 * h + 1):
            assert due_fragment(s, h, f) == _due(s, h, f)
        for k, at in syncs.items():
            assert at[0] == (k * h // f or h) and np.all(np.diff(at) == h)  # every H steps


def test_peak_bytes_per_sync_drop_by_f():
    peaks = {}
    for f in (1, 4):
        comm = StackedCommunicator(N)
        alg = DiLoCo(DiLoCoConfig(sync_every=8, fragments=f), stacked(torch.zeros(N, 400)), comm)
        sent = []
        for s in range(1, 17):
            before = comm.traffic.bytes_sent
            alg.step(s)
            sent.append(comm.traffic.bytes_sent - before)
        peaks[f] = max(sent)
        assert sum(sent) == 2 * sum(sent[:8])  # the same bytes per H, spread over F syncs
    assert peaks[1] == 4 * peaks[4]


# ----------------------------------------------------------------------------- the equations


@pytest.mark.parametrize("overlap,f", [(False, 1), (True, 1), (False, 2), (True, 3)])
def test_diloco_stacked_matches_delayed_fragment_reference(overlap, f):
    steps = 5 * H + 1
    got, _ = _stacked_run(lambda p, c: DiLoCo(DiLoCoConfig(sync_every=H, overlap=overlap,
                                                           fragments=f), p, c), steps)
    torch.testing.assert_close(got, diloco_ref(steps, f, overlap), rtol=1e-5, atol=1e-6)
    if overlap:  # not today's update: the delay changes the trajectory
        assert not torch.allclose(got, diloco_ref(steps, f, False), atol=1e-3)


@pytest.mark.parametrize("f", [1, 2])
def test_diloco_flush_applies_the_last_outer_step(f):
    """After the last step an overlapped run still has one outer step in flight per fragment:
    flush() applies it (what launch.train, the simulator and Attached's exit call)."""
    steps = 4 * H
    make = lambda p, c: DiLoCo(DiLoCoConfig(sync_every=H, overlap=True, fragments=f), p, c)  # noqa: E731
    got, alg = _stacked_run(make, steps)
    alg.flush()
    torch.testing.assert_close(got, diloco_ref(steps, f, True, flush=True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, diloco_ref(steps, f, True), atol=1e-4)  # it did land
    before = got.clone()
    alg.flush()  # nothing left in flight: a no-op
    assert torch.equal(got, before)


@pytest.mark.parametrize("overlap,f,gamma", [(True, 1, 0.7), (True, 2, 0.3), (False, 2, 0.7)])
def test_noloco_stacked_matches_delayed_fragment_reference(overlap, f, gamma):
    steps = 5 * H + 2
    got, _ = _stacked_run(lambda p, c: NoLoCo(NoLoCoConfig(sync_every=H, overlap=overlap,
                                                           fragments=f, gamma=gamma), p, c),
                          steps)
    want = noloco_ref_run(steps, f, overlap, gamma).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if overlap:
        assert not torch.allclose(got, noloco_ref_run(steps, f, False, gamma).float(), atol=1e-3)


# ----------------------------------------------------------------------------- resume


MAKERS = {
    "diloco": lambda p, c: DiLoCo(DiLoCoConfig(sync_every=H, overlap=True, fragments=2,
                                               compress="int8:16", error_feedback=True), p, c),
    "noloco": lambda p, c: NoLoCo(NoLoCoConfig(sync_every=H, overlap=True, fragments=2,
                                               gamma=0.3), p, c),
    "noloco-int8": lambda p, c: NoLoCo(NoLoCoConfig(sync_every=H, overlap=True,
                                                    compress="int8:16", error_feedback=True),
                                       p, c),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_with_an_exchange_in_flight_is_bit_exact(name):
    steps, stop = 6 * H, 3 * H + H // 2  # stop after fragment 1's sync: both in flight
    straight, _ = _stacked_run(MAKERS[name], steps)
    part, alg = _stacked_run(MAKERS[name], stop)
    saved = io.BytesIO()
    torch.save((part.clone(), alg.state_dict()), saved)
    resumed, _ = _stacked_run(MAKERS[name], steps, stop=stop, state=saved.getvalue())
    assert torch.equal(resumed, straight)


# ----------------------------------------------------------------------------- real ranks


def _scenarios() -> dict[str, object]:
    return {
        "diloco-f2": lambda p, c: DiLoCo(DiLoCoConfig(sync_every=H, overlap=True, fragments=2),
                                         p, c),
        **MAKERS,
    }


def _real(comm) -> dict[str, np.ndarray]:
    """Each scenario ends with its last exchange in flight (no flush) and a new algorithm on the
    same communicator: the dropped exchange must not disturb the next one's messages."""
    rank = int(comm.nodes[0])
    out = {}
    for name, make in _scenarios().items():
        x = init_row(P).unsqueeze(0).clone()
        params = FlatParams.from_stacked({"w": x})
        alg = make(params, comm)
        buf = params.groups[0].buffer
        for s in range(1, 5 * H + 1):
            _inner(buf, [rank], s)
            alg.step(s)
        out[name] = buf[0].numpy().copy()
    return out


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_real_gloo_ranks_match_the_stacked_run(world):
    global N
    real = run_ranks(_real, world, timeout=240.0)
    saved, N = N, world
    try:
        for name, make in _scenarios().items():
            want, _ = _stacked_run(make, 5 * H)
            for rank in range(world):
                torch.testing.assert_close(torch.from_numpy(real[rank][name]), want[rank],
                                           rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        N = saved


def _compressed_in_flight(comm) -> list[int]:
    """Bytes this rank has counted after each of three overlapped int8 NoLoCo syncs."""
    rank = int(comm.nodes[0])
    params = FlatParams.from_stacked({"w": init_row(P).unsqueeze(0).clone()})
    alg = MAKERS["noloco-int8"](params, comm)
    counted = []
    for s in range(1, 3 * H + 1):
        _inner(params.groups[0].buffer, [rank], s)
        alg.step(s)
        if s % H == 0:
            counted.append(comm.traffic.bytes_sent)
    return counted


def test_compressed_exchange_is_in_flight_until_the_next_sync():
    """A compressed NoLoCo exchange is posted at its sync and finished (counted) at the next:
    after sync 1 nothing is counted yet, after sync t the t - 1 earlier exchanges are."""
    wire = parse_codec("int8:16").nbytes(P)  # one message per sync, to the partner
    for counted in run_ranks(_compressed_in_flight, 2, timeout=120.0):
        assert counted == [0, wire, 2 * wire]


def test_a_failed_wait_fails_again():
    """A wait that raised raises again: a second wait (a save after the caller caught the first
    error) must not take the half-finished buffers as a result."""
    calls = []

    def finish() -> None:
        calls.append(1)
        raise CommError("peer gone", rank=0, step=7)
    pending = Pending(finish)
    for _ in range(2):
        with pytest.raises(CommError, match="peer gone"):
            pending.wait()
    assert calls == [1] and pending.completed


# ----------------------------------------------------------------------------- network model


def test_network_model_charges_only_what_outlasts_the_compute():
    model = NetworkModel(latency=0.0, bandwidth=1e6, compute_time=0.1)
    alive = torch.ones(4, dtype=torch.bool)
    steps, slow = torch.full((4,), 10), torch.ones(4)
    for nbytes in (1e5, 8e5):
        # ring all-reduce of B bytes over 4 nodes: 2 * 3 * B / (4 * 1e6) s: 0.15 s, 1.2 s
        clock, blocking = SimClock(model, 4), SimClock(model, 4)
        for r in range(3):
            for c in (clock, blocking):
                c.compute(r, steps, slow)  # 1 s
            ev = CommEvent("all_reduce", int(nbytes), None, None, alive)
            clock.communicate(r, 0, CommEvent("all_reduce", int(nbytes), None, None, alive,
                                              overlapped=True), alive)
            blocking.communicate(r, 0, ev, alive)
        dur = 2 * 3 * nbytes / (4 * 1e6)
        assert blocking.now == pytest.approx(3 * (1.0 + dur))
        # overlapped: the last sync's transfer is still in flight; earlier ones cost
        # max(0, dur - compute) each
        assert clock.now == pytest.approx(3 * 1.0 + 2 * max(0.0, dur - 1.0))


def test_simulator_runs_fragments_per_round_and_hides_overlapped_time():
    from simulations.config import SimConfig
    from simulations.engine import Simulation

    base = dict(algo="diloco", nodes=4, rounds=4, sync_every=4, batch_size=8, eval_every=99,
                latency=0.0, compute_time=1.0)  # 4 s of compute per H: more than any transfer
    runs = {}
    for name, extra in (("plain", {}), ("overlap", {"overlap": True}),
                        ("fragments", {"fragments": 2})):
        sim = Simulation(SimConfig(**base, **extra))
        runs[name] = (sim, [sim.run_round(r) for r in range(4)])
    plain, overlap = runs["plain"][1], runs["overlap"][1]
    transfer = plain[0]["round_sim_seconds"] - 4.0
    assert transfer > 0
    # hidden behind the next round's compute; the last is waited for by the final outer step
    assert [r["round_sim_seconds"] for r in overlap] == pytest.approx([4.0] * 3
                                                                      + [4.0 + transfer])
    assert plain[-1]["sim_seconds"] == pytest.approx(4 * (4.0 + transfer))
    sim, records = runs["fragments"]
    assert sim.steps_per_round == 2  # a round is H / F steps and syncs one fragment
    assert records[0]["bytes_per_node"] == pytest.approx(plain[0]["bytes_per_node"] / 2,
                                                         rel=0.01)
    with pytest.raises(ValueError, match="fragments=3 must divide sync_every=4"):
        Simulation(SimConfig(**base, fragments=3))


# ----------------------------------------------------------------------------- dead peer


@pytest.mark.slow
@pytest.mark.parametrize("algo,compress", [("noloco", []), ("diloco", []),
                                           ("diloco", ["--compress", "int8", "--error-feedback"])])
def test_peer_killed_with_an_async_exchange_in_flight(algo, compress, tmp_path):
    """As tests/test_dead_peer.py, with --overlap: NoLoCo's survivors leave the dead rank out
    and finish; DiLoCo's fail fast naming it (the in-flight all-reduce's wait is monitored; the
    compressed one runs on a worker thread, gossip/comm/background.py)."""
    from benchmarks.dead_peer import run_case

    # the delayed update needs about half the default outer step size (docs/guide/overlap.md)
    half = ["--noloco-beta", "0.35", "--noloco-gamma", "0.35"] if algo == "noloco" \
        else ["--outer-lr", "0.35"]
    res = run_case(algo, mode="kill", world=4, victim=2, steps=200, kill_at=40,
                   timeout=60.0, dead_after=10.0, out=tmp_path,
                   extra=["--overlap", *half, *compress])
    if algo == "diloco":
        assert sorted(res["exit_codes"]) == [0, 1, 3], res
        assert all(code == 3 for code in res["exit_codes"].values()), res
        assert res["seconds_to_return"] < 60.0, res
        assert res["errors_name_dead_rank"], res
        return
    assert res["exit_codes"] == {0: 0, 1: 0, 3: 0}, res
    assert res["dead"] == [2], res
    assert res["final_accuracy_mean"] > 0.8, res
