"""The algorithms on real Gloo ranks (world sizes 2, 4, 8) against the references of
``tests/test_algorithms.py`` and against the same run on a :class:`StackedCommunicator`
(the contract: one algorithm, same seeds, same parameters whether real or simulated).

Each world size spawns once; every rank runs all scenarios and sends back what it saw.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gossip.algorithms.noloco as noloco_module
from gossip.algorithms import (
    DiLoCo,
    DiLoCoConfig,
    FedAvg,
    FedAvgConfig,
    Gossip,
    GossipConfig,
    NoLoCo,
    NoLoCoConfig,
)
from gossip.algorithms.noloco import group_table
from gossip.comm import StackedCommunicator, TorchCommunicator
from gossip.flat import FlatParams
from gossip.topology import make_topology
from tests.distributed import run_ranks
from tests.test_algorithms import (
    RecordingComm,
    _comm_calls,
    heavy_ball_ref,
    init_row,
    nesterov_ref,
    noise,
    noloco_ref,
    ref_groups,
)

P = 7 * 5 + 5  # nn.Linear(7, 5)
FRACTION, FED_SEED = 0.5, 5
GAMMA = 0.3


def _counts(n: int) -> Tensor:
    return torch.arange(1, n + 1, dtype=torch.float64)


def _start(name: str, node: int) -> Tensor:
    """Node ``node``'s model before the first inner step [P]."""
    if name.startswith("gossip"):
        return noise(node, 0, P, 1.0)  # independent inits
    return init_row(P)  # one shared init


def _configs(n: int) -> dict[str, tuple[type, Any, int]]:
    """Scenario -> (class, config, outer steps).

    DiLoCo runs at world sizes 2 and 4 only: its stock torch.optim outer optimizer costs each
    process a one-time import of torch._dynamo (about a CPU-second), and its only collective, the
    all-reduce, is pinned at world size 8 in tests/test_comm.py."""
    scenarios: dict[str, tuple[type, Any, int]] = {
        "fedavg": (FedAvg, FedAvgConfig(sync_every=2, client_fraction=FRACTION, seed=FED_SEED), 3),
        "diloco": (DiLoCo, DiLoCoConfig(sync_every=3), 3),
        "noloco-all": (NoLoCo, NoLoCoConfig(sync_every=1, group_size=n), 4),
        "noloco-pairs": (NoLoCo, NoLoCoConfig(sync_every=2, gamma=GAMMA), 3),
        "noloco-mean": (NoLoCo, NoLoCoConfig(sync_every=1, alpha=0.0, beta=1.0, gamma=1.0), 2),
        "noloco-masked": (NoLoCo, NoLoCoConfig(sync_every=1, gamma=GAMMA), 2),
        "gossip-ring": (Gossip, GossipConfig(merge="mixing"), 3),
        "gossip-1pe": (Gossip, GossipConfig(merge="mixing", sync_every=2), 3),
        "gossip-vc": (Gossip, GossipConfig(merge="beta", variance_correction=True), 3),
    }
    if n > 4:
        del scenarios["diloco"]
    return scenarios


def _topology(name: str, n: int):
    return make_topology("one-peer-exponential" if name == "gossip-1pe" else "ring", n)


def _active(name: str, nodes: Tensor) -> Tensor | None:
    if name != "noloco-masked":
        return None
    return nodes != 1  # node 1 sits the outer steps out


def _build(name: str, params: FlatParams, comm) -> Any:
    cls, cfg, _ = _configs(comm.world_size)[name]
    if cls is FedAvg:
        return FedAvg(cfg, params, comm, weight=_counts(comm.world_size)[comm.nodes])
    if cls is Gossip:
        return Gossip(cfg, params, comm, _topology(name, comm.world_size))
    return cls(cfg, params, comm)


def _run(name: str, params: FlatParams, comm) -> dict:
    """Drive one scenario: before each outer step every node adds its inner-training noise.

    Works on a real rank (L = 1) and on stacked nodes (L = N) alike."""
    alg = _build(name, params, comm)
    _, cfg, outer_steps = _configs(comm.world_size)[name]
    buf = params.groups[0].buffer
    nodes = comm.nodes.tolist()
    active = _active(name, comm.nodes)
    bytes_before = comm.traffic.bytes_sent
    rec: dict = {key: [] for key in ("theta", "after", "phi", "delta", "phi_before",
                                     "delta_before", "sampled", "tables")}
    for outer in range(1, outer_steps + 1):
        for step in range((outer - 1) * cfg.sync_every + 1, outer * cfg.sync_every + 1):
            if step < outer * cfg.sync_every:
                assert alg.step(step, active) is None
        step = outer * cfg.sync_every
        buf.add_(torch.stack([noise(i, outer, P) for i in nodes]))
        if isinstance(alg, FedAvg):
            sampled = alg.sampled(outer - 1)
            rec["sampled"].append(sampled)
            idle = ~sampled[comm.nodes]
            buf[idle] = float("nan")  # must not reach anyone
        if isinstance(alg, NoLoCo):
            rec["tables"].append(group_table(comm.world_size, cfg.group_size, step, cfg.seed)[0])
            rec["phi_before"].append(alg.phi[0].clone())
            rec["delta_before"].append(alg.delta[0].clone())
        rec["theta"].append(buf.clone())
        stats = alg.step(step, active)
        assert stats is not None and stats.step == step
        rec["after"].append(buf.clone())
        if isinstance(alg, (NoLoCo, DiLoCo)):
            rec["phi"].append(alg.phi[0].detach().clone())
        if isinstance(alg, NoLoCo):
            rec["delta"].append(alg.delta[0].clone())
    rec["bytes"] = comm.traffic.bytes_sent - bytes_before
    return rec


def _rank_checks(comm: TorchCommunicator) -> bytes:
    torch.manual_seed(0)
    # NoLoCo's real-rank update runs in column blocks: make P = 40 span three of them, so the
    # bit-for-bit checks below also hold the blocked update to the whole-buffer references
    noloco_module.BLOCK = 16
    results = {}
    for name in _configs(comm.world_size):
        model = nn.Linear(7, 5)
        params = FlatParams.from_module(model)
        assert params.groups[0].buffer.shape == (1, P)
        params.groups[0].buffer.copy_(_start(name, comm.rank))
        recorder = RecordingComm(comm)
        rec = _run(name, params, recorder)
        rec["calls"] = dict(_comm_calls(recorder))
        # the model's parameters are views of the buffer the algorithm wrote
        assert torch.equal(model.weight.detach().flatten(), params.groups[0].buffer[0, :35])
        results[name] = rec
    blob = io.BytesIO()
    torch.save(results, blob)
    return blob.getvalue()


def _stacked_run(name: str, n: int) -> dict:
    rows = torch.stack([_start(name, i) for i in range(n)])
    # the same layout and variance-correction scope as nn.Linear(7, 5) on a real rank
    params = FlatParams.from_stacked({"weight": rows[:, :35].reshape(n, 5, 7),
                                      "bias": rows[:, 35:]}, module=nn.Linear(7, 5))
    recorder = RecordingComm(StackedCommunicator(n))
    rec = _run(name, params, recorder)
    rec["calls"] = dict(_comm_calls(recorder))
    return rec


def _cat(outs: list[dict], name: str, key: str) -> list[Tensor]:
    """Per outer step, the N ranks' rows stacked [N, P]."""
    steps = len(outs[0][name][key])
    return [torch.cat([o[name][key][t] for o in outs]) for t in range(steps)]


def _check(outs: list[dict], n: int) -> None:
    stacked = {name: _stacked_run(name, n) for name in _configs(n)}

    # -- FedAvg: sample-weighted mean of the sampled nodes; sampling identical on every rank
    counts = _counts(n)
    for t, theta in enumerate(_cat(outs, "fedavg", "theta")):
        sampled = outs[0]["fedavg"]["sampled"][t]
        assert all(torch.equal(o["fedavg"]["sampled"][t], sampled) for o in outs)
        assert int(sampled.sum()) == max(1, round(FRACTION * n))
        ref = (counts[sampled, None] * theta[sampled].double()).sum(0) / counts[sampled].sum()
        after = _cat(outs, "fedavg", "after")[t]
        for i in range(n):
            torch.testing.assert_close(after[i].double(), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(stacked["fedavg"]["after"][t], after, rtol=0, atol=1e-6)
    assert all(o["fedavg"]["calls"] == {"all_reduce_mean_": 3} for o in outs)

    # -- DiLoCo: phi_1 = phi_0 - 1.33 g, then PyTorch's Nesterov recurrence
    phi, b = init_row(P).double(), None
    diloco = list(zip(_cat(outs, "diloco", "theta"), _cat(outs, "diloco", "after"),
                      strict=True)) if "diloco" in stacked else []
    assert diloco or n > 4
    for t, (theta, after) in enumerate(diloco):
        g = (phi.float() - theta).double().mean(0)
        if t == 0:
            torch.testing.assert_close(after[0].double(), phi - 1.33 * g, rtol=0, atol=1e-6)
        phi, b = nesterov_ref(phi, b, g, 0.7, 0.9)
        for i in range(n):
            torch.testing.assert_close(after[i].double(), phi, rtol=0, atol=1e-5)
            assert torch.equal(after[i], after[0])
        torch.testing.assert_close(stacked["diloco"]["after"][t], after, rtol=0, atol=1e-6)

    # -- NoLoCo over all N nodes: heavy-ball DiLoCo bit for bit, no collective call
    _, cfg, _ = _configs(n)["noloco-all"]
    phi, delta = init_row(P), torch.zeros(P)
    for t, theta in enumerate(_cat(outs, "noloco-all", "theta")):
        phi, delta = heavy_ball_ref(phi, delta, theta, cfg.alpha, cfg.beta)
        for i, o in enumerate(outs):
            assert torch.equal(o["noloco-all"]["phi"][t][0], phi), (t, i)
            assert torch.equal(o["noloco-all"]["delta"][t][0], delta), (t, i)
            assert torch.equal(o["noloco-all"]["after"][t][0], phi), (t, i)
        assert torch.equal(stacked["noloco-all"]["phi"][t], phi.expand(n, P))
    for name in ("noloco-all", "noloco-pairs", "noloco-mean", "noloco-masked"):
        steps = len(outs[0][name]["theta"])
        per_step = 2 if name in ("noloco-pairs", "noloco-masked") else 1  # gamma != beta: phi too
        for o in outs:
            assert o[name]["calls"] == {"exchange": steps * per_step}, (name, o[name]["calls"])
        # every rank derived the same groups, and they are the reference code's
        for t in range(steps):
            table = outs[0][name]["tables"][t]
            assert all(torch.equal(o[name]["tables"][t], table) for o in outs)
            group_size = _configs(n)[name][1].group_size
            step = (t + 1) * _configs(n)[name][1].sync_every
            for group in ref_groups(n, group_size, step):
                for i in group:
                    assert set(table[i].tolist()) - {-1} == group - {i}
        # simulated and real agree bit for bit
        for key in ("phi", "delta", "after"):
            for t in range(steps):
                assert torch.equal(stacked[name][key][t], torch.cat(
                    [o[name][key][t] for o in outs])), (name, key, t)
        assert stacked[name]["bytes"] == sum(o[name]["bytes"] for o in outs)

    # -- NoLoCo with pairs and gamma != beta: the equation; n = 2 with a = 0, b = g = 1: pair mean
    for name, (alpha, beta, gamma) in (("noloco-pairs", (0.5, 0.7, GAMMA)),
                                       ("noloco-mean", (0.0, 1.0, 1.0))):
        step_every = _configs(n)[name][1].sync_every
        thetas = _cat(outs, name, "theta")
        for t, theta in enumerate(thetas):
            phi0 = torch.cat([o[name]["phi_before"][t] for o in outs])
            delta0 = torch.cat([o[name]["delta_before"][t] for o in outs])
            groups = ref_groups(n, 2, (t + 1) * step_every)
            phi_ref, delta_ref = noloco_ref(phi0, delta0, theta, groups, alpha, beta, gamma)
            phi_got = torch.cat([o[name]["phi"][t] for o in outs])
            torch.testing.assert_close(phi_got.double(), phi_ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.cat([o[name]["delta"][t] for o in outs]).double(),
                                       delta_ref, rtol=0, atol=1e-6)
            if name == "noloco-mean":
                for group in groups:
                    idx = sorted(group)
                    for i in idx:
                        torch.testing.assert_close(phi_got[i].double(),
                                                   theta[idx].double().mean(0), rtol=0,
                                                   atol=1e-6)
        # bytes: theta (and phi when gamma != beta) to the partner, P fp32 each
        per_step = 2 if gamma != beta else 1
        for o in outs:
            assert o[name]["bytes"] == len(thetas) * per_step * P * 4

    # -- masked rows: node 1 keeps theta, phi and delta bit for bit
    masked = outs[1]["noloco-masked"]
    for t in range(len(masked["theta"])):
        assert torch.equal(masked["after"][t], masked["theta"][t])
        assert torch.equal(masked["phi"][t], masked["phi_before"][t])
        assert torch.equal(masked["delta"][t], masked["delta_before"][t])
    for i, o in enumerate(outs):  # the others did move
        if i != 1:
            assert not torch.equal(o["noloco-masked"]["after"][0], o["noloco-masked"]["theta"][0])

    # -- D-PSGD: X <- W_t X, real and stacked
    for name in ("gossip-ring", "gossip-1pe"):
        topo = _topology(name, n)
        for t, (theta, after) in enumerate(zip(_cat(outs, name, "theta"),
                                               _cat(outs, name, "after"), strict=True)):
            ref = topo.mixing_matrix(t) @ theta.double()
            torch.testing.assert_close(after.double(), ref, rtol=0, atol=1e-6)
            torch.testing.assert_close(stacked[name]["after"][t], after, rtol=0, atol=1e-6)
        assert all(o[name]["calls"] == {"exchange": 3} for o in outs)
    # -- variance-corrected gossip: same on real ranks and stacked
    for t, after in enumerate(_cat(outs, "gossip-vc", "after")):
        torch.testing.assert_close(stacked["gossip-vc"]["after"][t], after, rtol=1e-6,
                                   atol=1e-6)


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_algorithms_on_real_ranks(world_size):
    blobs = run_ranks(_rank_checks, world_size, timeout=300)
    outs = [torch.load(io.BytesIO(b), weights_only=False) for b in blobs]
    _check(outs, world_size)


def test_recording_comm_counts_and_delegates():
    inner = StackedCommunicator(2)
    rec = RecordingComm(inner)
    x = torch.ones(2, 3)
    rec.all_reduce_mean_(x)
    rec.exchange(x, torch.tensor([[1], [0]]))
    rec.barrier()
    assert rec.calls == Counter({"all_reduce_mean_": 1, "exchange": 1, "barrier": 1})
    assert rec.traffic is inner.traffic and inner.traffic.bytes_sent > 0
    assert rec.world_size == 2 and torch.equal(rec.nodes, inner.nodes)
