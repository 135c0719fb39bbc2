"""Compressed all-reduce and exchange: real Gloo ranks against the stacked communicator (the same
bits on the same inputs) and against plain-torch means with the codecs' error bounds."""

from __future__ import annotations

import math

import pytest
import torch

from gossip.comm import StackedCommunicator, compressed
from gossip.comm.compressed import exchange_compressed
from gossip.compress import Compressor, parse_codec
from tests.distributed import run_ranks

WORLD, P = 4, 1001
SPECS = ["bf16", "int8:64", "int8-sr:64", "fp8", "topk:0.1", "randk:0.25"]
WEIGHTS = torch.tensor([1.0, 3.0, 0.0, 2.0], dtype=torch.float64)  # node 2 takes no part


def _inputs() -> torch.Tensor:
    x = torch.randn(WORLD, P, generator=torch.Generator().manual_seed(0))
    x[2, 5] = float("nan")  # a node of weight 0 contributes nothing, even NaN
    return x


def _real(comm) -> dict:
    me = int(comm.nodes[0])
    out: dict = {}
    for spec in SPECS:
        comp = Compressor(parse_codec(spec), 1, P, error_feedback=True, seed=3)
        x = _inputs()[me : me + 1].clone()
        before = comm.traffic.bytes_sent
        for _ in range(2):  # the second call uses the residual and the next seed
            comm.all_reduce_mean_(x, WEIGHTS[me : me + 1], compressor=comp)
        assert comp.feedback is not None
        out[spec] = (x.clone(), comp.feedback.residual.clone(), comm.traffic.bytes_sent - before)
        # exchange around a ring: node i receives from i - 1 and i + 1
        ring = torch.tensor([[(i - 1) % WORLD, (i + 1) % WORLD] for i in range(WORLD)])
        ex = Compressor(parse_codec(spec), 1, P, seed=1)
        y = torch.randn(WORLD, P, generator=torch.Generator().manual_seed(9))[me : me + 1]
        sent, got = exchange_compressed(comm, y, ring, ex)
        out[spec + "/x"] = (sent.clone(), got.dense().clone())
    # the same all-reduces through Gloo's all_to_all / all_gather (the path taken under a monitor)
    compressed._point_to_point = lambda comm: False
    for spec in ("int8:64", "topk:0.1"):
        comp = Compressor(parse_codec(spec), 1, P, error_feedback=True, seed=3)
        x = _inputs()[me : me + 1].clone()
        for _ in range(2):
            comm.all_reduce_mean_(x, WEIGHTS[me : me + 1], compressor=comp)
        out[spec + "/collectives"] = x.clone()
    return out


def _stacked(spec: str) -> tuple[torch.Tensor, torch.Tensor, StackedCommunicator]:
    comm = StackedCommunicator(WORLD)
    comp = Compressor(parse_codec(spec), WORLD, P, error_feedback=True, seed=3)
    x = _inputs()
    for _ in range(2):
        comm.all_reduce_mean_(x, WEIGHTS, compressor=comp)
    assert comp.feedback is not None
    return x, comp.feedback.residual, comm


def test_real_ranks_and_stacked_agree_bit_for_bit() -> None:
    real = run_ranks(_real, WORLD, timeout=180.0)
    ring = torch.tensor([[(i - 1) % WORLD, (i + 1) % WORLD] for i in range(WORLD)])
    for spec in SPECS:
        x, residual, comm = _stacked(spec)
        codec = parse_codec(spec)
        if spec.startswith("topk"):  # all-gather of whole top-k rows: N - 1 payloads per call
            per_call, logged = (WORLD - 1) * codec.nbytes(P), codec.nbytes(P)
        else:  # reduce-scatter and all-gather: 2 (N - 1) encoded chunks per call
            wire = codec.nbytes(math.ceil(P / WORLD))
            per_call, logged = 2 * (WORLD - 1) * wire, WORLD * wire
        for rank in range(WORLD):
            got, res, nbytes = real[rank][spec]
            assert torch.equal(got[0], x[rank]), spec
            if spec + "/collectives" in real[rank]:  # point-to-point stages == collectives
                assert torch.equal(real[rank][spec + "/collectives"], got), spec
            assert torch.equal(res[0], residual[rank]), spec
            assert nbytes == 2 * per_call, spec  # 2 calls
        assert comm.traffic.bytes_sent == 2 * per_call * WORLD
        assert comm.events[0].nbytes == logged
        assert per_call < 2 * (WORLD - 1) / WORLD * 4 * P  # fewer bytes than fp32's ring
        # the compressed exchange: a stacked communicator delivers the same decoded slots
        stacked = StackedCommunicator(WORLD)
        y = torch.randn(WORLD, P, generator=torch.Generator().manual_seed(9))
        sent, got = exchange_compressed(stacked, y, ring, Compressor(parse_codec(spec), WORLD,
                                                                     P, seed=1))
        dense = got.dense()
        for rank in range(WORLD):
            r_sent, r_dense = real[rank][spec + "/x"]
            assert torch.equal(r_sent[0], sent[rank]), spec
            assert torch.equal(r_dense[0], dense[rank]), spec
            # slot k of node i is what its sender sent
            assert torch.equal(dense[rank, 0], sent[(rank - 1) % WORLD])
        assert stacked.traffic.bytes_sent == 2 * WORLD * parse_codec(spec).nbytes(P)


def test_int8_all_reduce_within_the_quantization_bound_of_the_weighted_mean() -> None:
    block = 64
    x = _inputs()
    comm = StackedCommunicator(WORLD)
    out = x.clone()
    comm.all_reduce_mean_(out, WEIGHTS, compressor=Compressor(parse_codec(f"int8:{block}"),
                                                              WORLD, P))
    frac = WEIGHTS / WEIGHTS.sum()
    live = frac > 0
    ref = (frac[live, None] * x[live].double()).sum(0)
    # stage 1: each contribution off by at most half a step of its block; stage 2: the reduced
    # chunk off by half a step of its own block (chunks of ceil(P / N), blocks of 64 inside)
    c = math.ceil(P / WORLD)
    bound = torch.zeros(P, dtype=torch.float64)
    for start in range(0, WORLD * c, c):
        for b in range(start, min(start + c, P), block):
            end = min(b + block, start + c, P)
            s1 = sum(float(frac[i]) * float(x[i, b:end].abs().max()) / 127 / 2
                     for i in range(WORLD) if live[i])
            s2 = float(ref[b:end].abs().max()) / 127 / 2 + s1 / 127
            bound[b:end] = s1 + s2
    assert torch.isfinite(out).all()
    assert ((out[0].double() - ref).abs() <= bound * (1 + 1e-4) + 1e-6).all()
    assert torch.equal(out, out[0].expand_as(out))  # every node holds the same result
    # it is not exact: compression did change something
    assert not torch.allclose(out[0].double(), ref, atol=1e-6)


def test_randk_all_reduce_is_exact_on_the_shared_indices() -> None:
    x = _inputs()[[0, 1, 3]]
    comm = StackedCommunicator(3)
    out = x.clone()
    comm.all_reduce_mean_(out, None, compressor=Compressor(parse_codec("randk:0.5"), 3, P))
    kept = out[0] != 0
    ref = x.mean(0)
    torch.testing.assert_close(out[0][kept], ref[kept], atol=1e-6, rtol=1e-6)
    # each of the 3 chunks keeps ceil(0.5 c) entries at the same shared places
    c = math.ceil(P / 3)
    assert int(kept.sum()) >= 3 * math.ceil(0.5 * c) - 2  # the last chunk's padding may hold some


def test_simulator_counts_and_charges_compressed_bytes() -> None:
    from simulations.config import SimConfig
    from simulations.engine import Simulation
    from simulations.network import ring_allreduce_seconds

    n, steps = 4, 3
    seconds, sent = {}, {}
    for spec in ("none", "int8"):
        cfg = SimConfig(algo="diloco", nodes=n, rounds=1, sync_every=steps, compress=spec,
                        eval_every=99, progress=False)
        sim = Simulation(cfg)
        record = sim.run_round(0)
        width = sim.model.flat.numel
        seconds[spec] = record["sim_seconds"] - steps * cfg.compute_time
        sent[spec] = record["bytes_per_node"]
        if spec == "none":
            payload = 4 * width
            assert sent[spec] == 2 * (n - 1) / n * payload
        else:
            chunk = parse_codec(spec).nbytes(math.ceil(width / n))
            payload = n * chunk
            assert sent[spec] == 2 * (n - 1) * chunk  # what each node put on the wire
        assert seconds[spec] == pytest.approx(
            ring_allreduce_seconds(n, payload, cfg.latency, cfg.bandwidth))
    assert sent["int8"] < 0.3 * sent["none"]
    assert seconds["int8"] < seconds["none"]


def _shard(comm) -> torch.Tensor:
    """Two shards of two stacked nodes each, joined by the Gloo group (as Ray actors are)."""
    me = int(comm.nodes[0])
    shard = StackedCommunicator(WORLD, torch.arange(2 * me, 2 * me + 2), group=comm.group)
    x = _inputs()[2 * me : 2 * me + 2].clone()
    comp = Compressor(parse_codec("int8:64"), 2, P, error_feedback=True)
    for _ in range(2):
        shard.all_reduce_mean_(x, WEIGHTS[2 * me : 2 * me + 2], compressor=comp)
    return x


def test_sharded_stacked_all_reduce_matches_one_process() -> None:
    shards = run_ranks(_shard, 2, timeout=120.0)
    whole, _, _ = _stacked("int8:64")
    # the shards' partial sums are added in another order: equal up to fp32 rounding (and a
    # rare one-step flip where the re-encoded sum sits on a rounding boundary)
    got = torch.cat(shards)
    off = ~torch.isclose(got, whole, atol=1e-5, rtol=1e-5)
    assert off.float().mean() <= 1e-3 and (got - whole).abs().max() < 0.05


def test_topk_all_reduce_all_gathers_and_sums_every_nodes_topk() -> None:
    from simulations.network import NetworkModel, SimClock

    x = _inputs()
    comm = StackedCommunicator(WORLD)
    out = x.clone()
    codec = parse_codec("topk:0.1")
    comm.all_reduce_mean_(out, WEIGHTS, compressor=Compressor(codec, WORLD, P))
    frac = (WEIGHTS / WEIGHTS.sum()).to(torch.float32)
    ref = torch.zeros(P)
    for i in range(WORLD):
        if frac[i] > 0:  # plain torch: keep each node's 100 largest entries, weighted sum
            keep = x[i].abs().argsort(descending=True)[:101]
            ref[keep] += frac[i] * x[i, keep]
    torch.testing.assert_close(out[0], ref, atol=1e-6, rtol=1e-6)
    (event,) = comm.events
    assert event.op == "all_gather" and event.nbytes == codec.nbytes(P)
    assert comm.traffic.bytes_sent == WORLD * (WORLD - 1) * codec.nbytes(P)
    clock = SimClock(NetworkModel(latency=0.01, bandwidth=1e6), WORLD)
    clock.communicate(0, 0, event, torch.ones(WORLD, dtype=torch.bool))
    assert clock.now == pytest.approx((WORLD - 1) * (0.01 + codec.nbytes(P) / 1e6))
