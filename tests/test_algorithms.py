"""The algorithms on stacked nodes against references written out here (plain torch / numpy).

References never call the code under test: the pairing is re-derived from the NoLoCo reference
code's rule, the outer steps are the papers' recurrences, the mixing is ``W @ X``.
The same references pin the real-rank runs in ``tests/test_algorithms_dist.py``.
"""

from __future__ import annotations

import io
import math
import re
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from gossip.algorithms import (
    Choco,
    ChocoConfig,
    DiLoCo,
    DiLoCoConfig,
    FedAvg,
    FedAvgConfig,
    Gossip,
    GossipConfig,
    NoLoCo,
    NoLoCoConfig,
    make_config,
)
from gossip.comm import Communicator, Received, StackedCommunicator, Traffic
from gossip.flat import FlatParams
from gossip.topology import make_topology

# ----------------------------------------------------------------------------- helpers


def _comm_calls(comm: RecordingComm) -> Counter[str]:
    """The communication calls recorded (membership look-ups send no model bytes)."""
    return Counter({k: v for k, v in comm.calls.items() if k != "alive_nodes"})


class RecordingComm:
    """Wraps a real communicator and counts the calls an algorithm makes (it does not replace)."""

    def __init__(self, inner: Communicator) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    @property
    def nodes(self) -> Tensor:
        return self.inner.nodes

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def traffic(self) -> Traffic:
        return self.inner.traffic

    def all_reduce_mean_(self, x: Tensor, weight: Tensor | None = None) -> None:
        self.calls["all_reduce_mean_"] += 1
        self.inner.all_reduce_mean_(x, weight)

    def exchange(self, x: Tensor, peers: Tensor) -> tuple[Tensor, Tensor]:
        self.calls["exchange"] += 1
        return self.inner.exchange(x, peers)

    def exchange_slots(self, x: Tensor, peers: Tensor) -> Received:
        self.calls["exchange"] += 1
        return self.inner.exchange_slots(x, peers)

    def barrier(self) -> None:
        self.calls["barrier"] += 1
        self.inner.barrier()

    def alive_nodes(self, step: int) -> Tensor:
        self.calls["alive_nodes"] += 1
        return self.inner.alive_nodes(step)


def noise(node: int, t: int, p: int, scale: float = 0.1, dtype=torch.float32) -> Tensor:
    """What node ``node``'s inner training adds to its weights before outer step ``t`` [p]."""
    g = torch.Generator().manual_seed(7919 * node + 104729 * t + 17)
    return (scale * torch.randn(p, generator=g, dtype=torch.float64)).to(dtype)


def init_row(p: int, dtype=torch.float32) -> Tensor:
    g = torch.Generator().manual_seed(12345)
    return torch.randn(p, generator=g, dtype=torch.float64).to(dtype)


def stacked(x: Tensor) -> FlatParams:
    """N stacked models, one tensor ``w`` [N, P]."""
    return FlatParams.from_stacked({"w": x.clone()})


def ref_groups(n: int, group_size: int, step: int) -> list[set[int]]:
    """The NoLoCo reference code's grouping: ``default_rng(step + 1).permutation(n)`` dealt
    round-robin into ``n / group_size`` groups."""
    perm = np.random.default_rng(step + 1).permutation(n)
    n_groups = n // group_size
    return [set(perm[g::n_groups].tolist()) for g in range(n_groups)]


def heavy_ball_ref(phi: Tensor, delta: Tensor, theta: Tensor, alpha: float, beta: float
                   ) -> tuple[Tensor, Tensor]:
    """Heavy-ball DiLoCo (the NoLoCo paper's DiLoCo, all N nodes) on fp32 [P] / [N, P]:
    ``delta = alpha delta + beta mean(theta - phi)``; ``phi = phi + delta``.

    Every node holds the same phi, so mean(theta - phi) = mean(theta) - phi; the mean adds the
    nodes one at a time in node order and the scaled add is torch's ``add(alpha=)``, fixing the
    rounding so that the comparison can be bit for bit."""
    total = theta[0].clone()
    for row in theta[1:]:
        total = total + row
    mean_theta = total / theta.shape[0]
    delta = delta.mul(alpha).add(mean_theta - phi, alpha=beta)
    return phi + delta, delta


def noloco_ref(phi: Tensor, delta: Tensor, theta: Tensor, groups: list[set[int]], alpha: float,
               beta: float, gamma: float) -> tuple[Tensor, Tensor]:
    """NoLoCo outer step for all N nodes in float64 (reference code's sign on beta):
    ``delta_i = a delta_i + b mean_G(theta - phi) - g (phi_i - mean_G(phi))``; ``phi += delta``."""
    phi, delta, theta = phi.double(), delta.double().clone(), theta.double()
    new_phi = phi.clone()
    for group in groups:
        idx = sorted(group)
        mean_step = (theta[idx] - phi[idx]).mean(dim=0)
        mean_phi = phi[idx].mean(dim=0)
        for i in idx:
            delta[i] = alpha * delta[i] + beta * mean_step - gamma * (phi[i] - mean_phi)
            new_phi[i] = phi[i] + delta[i]
    return new_phi, delta


def nesterov_ref(phi: Tensor, buf: Tensor | None, g: Tensor, lr: float, mu: float
                 ) -> tuple[Tensor, Tensor]:
    """PyTorch's SGD(nesterov=True) written out: b = g (first), then b = mu b + g;
    phi -= lr (g + mu b)."""
    buf = g.clone() if buf is None else mu * buf + g
    return phi - lr * (g + mu * buf), buf


def make_models(n: int, seed: int, fan_in: int = 256, fan_out: int = 128) -> list[nn.Module]:
    """Independently Xavier-initialized models (weights Xavier-uniform, biases uniform)."""
    models = []
    for i in range(n):
        torch.manual_seed(seed + i)
        m = nn.Sequential(nn.Linear(fan_in, fan_out), nn.Tanh(), nn.Linear(fan_out, 64))
        for layer in (m[0], m[2]):
            nn.init.xavier_uniform_(layer.weight)
        models.append(m)
    return models


def stacked_models(models: list[nn.Module], dtype=torch.float32) -> FlatParams:
    params, _ = torch.func.stack_module_state(models)
    return FlatParams.from_stacked({k: v.detach().to(dtype) for k, v in params.items()},
                                   module=models[0])


# ----------------------------------------------------------------------------- FedAvg


def test_fedavg_is_the_sample_weighted_mean_of_sampled_nodes():
    n, p, frac = 10, 33, 0.4
    counts = torch.tensor([5, 1, 7, 3, 2, 9, 4, 6, 8, 10], dtype=torch.float64)
    x0 = torch.stack([init_row(p, torch.float64) + noise(i, 0, p, 1.0, torch.float64)
                      for i in range(n)])
    params = stacked(x0)
    comm = StackedCommunicator(n)
    alg = FedAvg(FedAvgConfig(sync_every=3, client_fraction=frac, seed=5), params, comm,
                 weight=counts)
    buf = params.groups[0].buffer
    seen = []
    for step in range(1, 10):
        if step % 3:
            before = buf.clone()
            assert alg.step(step) is None
            assert torch.equal(buf, before)
            continue
        r = step // 3 - 1
        sampled = alg.sampled(r)
        assert sampled.dtype == torch.bool and int(sampled.sum()) == round(frac * n)
        assert torch.equal(sampled, alg.sampled(r))  # a pure function of (seed, round)
        seen.append(sampled)
        x = torch.stack([noise(i, step, p, 1.0, torch.float64) for i in range(n)])
        x[~sampled] = float("nan")  # the rest must contribute nothing
        buf.copy_(x)
        ref = (counts[sampled, None] * x[sampled]).sum(0) / counts[sampled].sum()
        stats = alg.step(step)
        assert stats is not None and stats.extra["participants"] == round(frac * n)
        for i in range(n):
            torch.testing.assert_close(buf[i], ref, rtol=1e-12, atol=1e-12)
    assert alg.rounds == 3
    assert not all(torch.equal(seen[0], s) for s in seen[1:])  # resampled every round
    # dropped clients (active False) contribute nothing either
    x = torch.stack([noise(i, 99, p, 1.0, torch.float64) for i in range(n)])
    active = torch.ones(n, dtype=torch.bool)
    active[[0, 3]] = False
    alg2 = FedAvg(FedAvgConfig(sync_every=1), stacked(x), StackedCommunicator(n), weight=counts)
    x_nan = x.clone()
    x_nan[~active] = float("nan")
    alg2.params.groups[0].buffer.copy_(x_nan)
    alg2.step(1, active=active)
    ref = (counts[active, None] * x[active]).sum(0) / counts[active].sum()
    torch.testing.assert_close(alg2.params.groups[0].buffer[1], ref, rtol=1e-12, atol=1e-12)
    for bad in (-counts, counts.where(torch.arange(n) != 2, float("nan")),
                counts.where(torch.arange(n) != 2, float("inf"))):
        with pytest.raises(ValueError, match="weight must be 10 finite non-negative"):
            FedAvg(FedAvgConfig(), stacked(x), StackedCommunicator(n), weight=bad)


# ----------------------------------------------------------------------------- DiLoCo


def test_diloco_first_step_is_minus_1_33_g_then_nesterov():
    n, p = 4, 50
    phi0 = init_row(p)
    params = stacked(phi0.expand(n, p))
    alg = DiLoCo(DiLoCoConfig(sync_every=2), params, StackedCommunicator(n))
    buf = params.groups[0].buffer
    phi, b = phi0.double(), None
    for outer in range(1, 4):
        theta = torch.stack([phi.float() + noise(i, outer, p) for i in range(n)])
        buf.copy_(theta)
        assert alg.step(2 * outer - 1) is None
        alg.step(2 * outer)
        g = (phi.float().expand(n, p) - theta).double().mean(dim=0)  # old minus new
        if outer == 1:
            phi_1 = phi - 1.33 * g  # 0.7 * (1 + 0.9)
            torch.testing.assert_close(buf[0].double(), phi_1, rtol=0, atol=1e-6)
        phi, b = nesterov_ref(phi, b, g, 0.7, 0.9)
        for i in range(n):  # every node restarts from the new phi
            torch.testing.assert_close(buf[i].double(), phi, rtol=0, atol=1e-5)
            assert torch.equal(buf[i], buf[0])


def test_diloco_plain_sgd_outer_step_with_lr_1_is_fedavg():
    n, p = 3, 20
    params = stacked(init_row(p).expand(n, p))
    alg = DiLoCo(DiLoCoConfig(sync_every=1, outer_lr=1.0, outer_momentum=0.0, nesterov=False),
                 params, StackedCommunicator(n))
    theta = torch.stack([init_row(p) + noise(i, 1, p) for i in range(n)])
    params.groups[0].buffer.copy_(theta)
    alg.step(1)
    torch.testing.assert_close(params.groups[0].buffer, theta.mean(0).expand(n, p),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- NoLoCo


def _run_noloco_stacked(cfg: NoLoCoConfig, n: int, p: int, steps: int,
                        active: Tensor | None = None):
    params = stacked(init_row(p).expand(n, p))
    comm = RecordingComm(StackedCommunicator(n))
    alg = NoLoCo(cfg, params, comm)
    buf = params.groups[0].buffer
    history = []
    for outer in range(1, steps + 1):
        buf.add_(torch.stack([noise(i, outer, p) for i in range(n)]))
        theta = buf.clone()
        before = (alg.phi[0].clone(), alg.delta[0].clone())
        alg.step(outer * cfg.sync_every, active=active)
        history.append((theta, before, (alg.phi[0].clone(), alg.delta[0].clone()), buf.clone()))
    return alg, comm, history


@pytest.mark.parametrize("n", [2, 4, 8])
def test_noloco_with_group_of_all_nodes_is_heavy_ball_diloco_bit_for_bit(n):
    p, alpha, beta = 37, 0.5, 0.7
    cfg = NoLoCoConfig(sync_every=1, alpha=alpha, beta=beta, gamma=beta, group_size=n)
    _, _, history = _run_noloco_stacked(cfg, n, p, steps=4)
    phi, delta = init_row(p), torch.zeros(p)
    for theta, _, (phi_got, delta_got), buf in history:
        literal = delta.double() * alpha + beta * (theta.double() - phi.double()).mean(0)
        phi, delta = heavy_ball_ref(phi, delta, theta, alpha, beta)
        for i in range(n):
            assert torch.equal(phi_got[i], phi) and torch.equal(delta_got[i], delta)
            assert torch.equal(buf[i], phi)
        torch.testing.assert_close(delta.double(), literal, rtol=0, atol=1e-6)


def test_noloco_pairs_with_alpha_0_beta_gamma_1_is_the_pair_mean():
    n, p = 8, 21
    cfg = NoLoCoConfig(sync_every=5, alpha=0.0, beta=1.0, gamma=1.0, group_size=2)
    _, _, history = _run_noloco_stacked(cfg, n, p, steps=3)
    for outer, (theta, _, (phi, _), buf) in enumerate(history, start=1):
        for a, b in (sorted(g) for g in ref_groups(n, 2, outer * 5)):
            mean = (theta[a].double() + theta[b].double()) / 2
            torch.testing.assert_close(phi[a].double(), mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(phi[b].double(), mean, rtol=0, atol=1e-6)
        assert torch.equal(buf, phi)


@pytest.mark.parametrize("group_size", [2, 4])
def test_noloco_gamma_not_beta_matches_the_equation_and_exchanges_two_buffers(group_size):
    n, p, alpha, beta, gamma = 8, 19, 0.5, 0.7, 0.3
    cfg = NoLoCoConfig(sync_every=1, alpha=alpha, beta=beta, gamma=gamma, group_size=group_size)
    _, comm, history = _run_noloco_stacked(cfg, n, p, steps=4)
    for outer, (theta, (phi, delta), (phi_got, delta_got), _) in enumerate(history, start=1):
        groups = ref_groups(n, group_size, outer)
        phi_ref, delta_ref = noloco_ref(phi, delta, theta, groups, alpha, beta, gamma)
        torch.testing.assert_close(delta_got.double(), delta_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(phi_got.double(), phi_ref, rtol=0, atol=1e-6)
    # theta and phi travel: two exchanges per buffer and outer step, nothing collective
    assert _comm_calls(comm) == Counter({"exchange": 8})
    per_msg = p * 4
    assert comm.traffic.bytes_sent == 4 * 2 * n * (group_size - 1) * per_msg
    # with gamma == beta only theta travels
    tied = NoLoCoConfig(sync_every=1, alpha=alpha, beta=beta, gamma=beta, group_size=group_size)
    _, comm, history = _run_noloco_stacked(tied, n, p, steps=2)
    assert _comm_calls(comm) == Counter({"exchange": 2})
    for outer, (theta, (phi, delta), (phi_got, delta_got), _) in enumerate(history, start=1):
        ref = noloco_ref(phi, delta, theta, ref_groups(n, group_size, outer), alpha, beta, beta)
        torch.testing.assert_close(phi_got.double(), ref[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(delta_got.double(), ref[1], rtol=0, atol=1e-6)


def test_noloco_quadratic_toy_node_mean_converges_to_the_minimizer():
    """The NoLoCo paper's toy: node i minimizes L_i = 1/2 (theta - c_i)^T A (theta - c_i) with
    inner SGD (lr omega); the minimizer of sum_i L_i is mean(c). With beta > alpha the distance of
    the node-mean of phi to mean(c) shrinks by more than 100x, and the nodes stay within a
    bounded spread (they disagree by O(omega), they do not drift apart)."""
    n, p, h, omega, outer_steps = 16, 10, 10, 0.1, 60
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.linspace(0.5, 2.0, p, dtype=torch.float64)) @ q.T
    c = 3.0 * torch.randn(n, p, generator=g, dtype=torch.float64)
    optimum = c.mean(0)
    phi0 = optimum + 20.0
    params = stacked(phi0.expand(n, p))
    cfg = NoLoCoConfig(sync_every=h, alpha=0.5, beta=0.7, gamma=0.7, group_size=2)
    alg = NoLoCo(cfg, params, StackedCommunicator(n))
    (w,) = params.params
    opt = torch.optim.SGD([w], lr=omega)  # N independent SGDs (element-wise rule)
    start = float((phi0 - optimum).norm())
    for step in range(1, outer_steps * h + 1):
        w.grad = (w.detach() - c) @ a
        opt.step()
        alg.step(step)
    phi = alg.phi[0].double()
    assert float((phi.mean(0) - optimum).norm()) < start / 100
    spread = float(((phi - phi.mean(0)) ** 2).sum(1).mean().sqrt())
    assert spread < float(((c - optimum) ** 2).sum(1).mean().sqrt())


def test_noloco_requires_group_size_to_divide_n():
    params = stacked(torch.zeros(6, 3))
    with pytest.raises(ValueError, match="group_size=4 must divide the number of nodes N=6"):
        NoLoCo(NoLoCoConfig(group_size=4), params, StackedCommunicator(6))


def test_noloco_missing_partner_averages_over_who_arrived():
    n, p = 4, 5
    params = stacked(init_row(p).expand(n, p))
    comm = StackedCommunicator(n)
    cfg = NoLoCoConfig(sync_every=1, alpha=0.0, beta=1.0, gamma=1.0)
    alg = NoLoCo(cfg, params, comm)
    theta = torch.stack([init_row(p) + noise(i, 1, p) for i in range(n)])
    params.groups[0].buffer.copy_(theta)
    alive = torch.tensor([True, True, True, False])
    comm.set_faults(alive=alive)
    alg.step(1)
    partner = {a: b for g in ref_groups(n, 2, 1) for a, b in [sorted(g), sorted(g)[::-1]]}
    for i in range(3):
        j = partner[i]
        expect = theta[i] if j == 3 else (theta[i] + theta[j]) / 2
        torch.testing.assert_close(alg.phi[0][i], expect, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- gossip / D-PSGD


@pytest.mark.parametrize("spec", ["ring", "star", "erdos-renyi:0.4", "one-peer-exponential",
                                  "matching"])
def test_dpsgd_equals_w_times_x(spec):
    n, p, rounds = 8, 13, 4
    topo = make_topology(spec, n, seed=3)
    x = torch.stack([noise(i, 0, p, 1.0, torch.float64) for i in range(n)])
    params = stacked(x)
    alg = Gossip(GossipConfig(sync_every=2, merge="mixing"), params, StackedCommunicator(n), topo)
    ref = x.clone()
    for t in range(rounds):
        assert alg.step(2 * t + 1) is None
        alg.step(2 * t + 2)
        ref = topo.mixing_matrix(t) @ ref
        torch.testing.assert_close(params.groups[0].buffer, ref, rtol=0, atol=1e-12)
    assert alg.merges == rounds


def test_dpsgd_consensus_contracts_by_rho_squared_per_round():
    n, p = 8, 40
    topo = make_topology("ring", n)
    w = topo.mixing_matrix(0)
    assert torch.equal(w, w.T)
    eig = torch.linalg.eigvalsh(w)  # ascending; the top one is 1
    rho = float(max(abs(eig[0]), abs(eig[-2])))
    assert 0 < rho < 1
    x = torch.stack([noise(i, 0, p, 1.0, torch.float64) for i in range(n)])
    params = stacked(x)
    alg = Gossip(GossipConfig(merge="mixing"), params, StackedCommunicator(n), topo)
    buf = params.groups[0].buffer
    mean0 = x.mean(0)

    def dist2(y: Tensor) -> float:
        return float(((y - y.mean(0)) ** 2).sum())

    d0 = prev = dist2(x)
    for t in range(1, 31):
        alg.step(t)
        d = dist2(buf)
        assert d <= rho**2 * prev * (1 + 1e-9)
        assert math.sqrt(d) <= rho**t * math.sqrt(d0) * (1 + 1e-9)
        torch.testing.assert_close(buf.mean(0), mean0, rtol=0, atol=1e-12)  # W doubly stochastic
        prev = d
    assert d < 1e-3 * d0


# ----------------------------------------------------------------------------- variance correction


def _merge_once(models, cfg: GossipConfig, spec: str = "complete"):
    n = len(models)
    params = stacked_models(models)
    before = {k: v.detach().clone() for k, v in params.named_views().items()}
    alg = Gossip(cfg, params, StackedCommunicator(n), make_topology(spec, n))
    alg.step(1)
    return before, {k: v.detach().clone() for k, v in params.named_views().items()}


@pytest.mark.parametrize("k", [4, 8])
def test_variance_correction_keeps_the_variance_of_xavier_models(k):
    beta = 0.5
    models = make_models(k + 1, seed=100)  # complete graph: each node receives K models
    before, plain = _merge_once(models, GossipConfig(merge="beta", self_weight=beta))
    _, vc = _merge_once(models, GossipConfig(merge="beta", self_weight=beta,
                                              variance_correction=True))
    for name in ("0.weight", "2.weight"):
        var = before[name].flatten(1).var(dim=1, unbiased=False)  # [N]
        for i in range(k + 1):
            target = (var.sum() - var[i]) / k  # mean over the received models (self excluded)
            got = vc[name][i].var(unbiased=False)
            assert abs(float(got / target) - 1) < 1e-4, (name, i)
            shrink = float(plain[name][i].var(unbiased=False) / target)
            assert shrink == pytest.approx(beta**2 + (1 - beta) ** 2 / k, rel=0.06)
            # the mean of each tensor is kept
            torch.testing.assert_close(vc[name][i].mean(), plain[name][i].mean(),
                                       rtol=0, atol=1e-7)
    for name in ("0.bias", "2.bias"):  # biases are averaged, not rescaled
        assert torch.equal(vc[name], plain[name])
        mean_recv = (before[name].sum(0, keepdim=True) - before[name]) / k
        torch.testing.assert_close(plain[name], beta * before[name] + (1 - beta) * mean_recv)


def test_variance_correction_changes_nothing_when_everyone_is_the_same():
    models = make_models(1, seed=7) * 5
    before, vc = _merge_once(models, GossipConfig(merge="beta", variance_correction=True))
    for name in before:
        torch.testing.assert_close(vc[name], before[name], rtol=1e-6, atol=1e-7)
    # one received model, equal to self: bit for bit unchanged
    before, vc = _merge_once(make_models(1, seed=7) * 4,
                             GossipConfig(merge="beta", variance_correction=True), "matching")
    for name in before:
        assert torch.equal(vc[name], before[name])


def test_beta_merge_with_nothing_received_keeps_the_model():
    models = make_models(4, seed=1)
    params = stacked_models(models)
    comm = StackedCommunicator(4)
    comm.set_faults(drop_prob=0.999999)
    buf0 = params.groups[0].buffer.clone()
    alg = Gossip(GossipConfig(merge="beta", variance_correction=True), params, comm,
                 make_topology("ring", 4))
    alg.step(1)
    assert torch.equal(params.groups[0].buffer, buf0)


# ----------------------------------------------------------------------------- masked rows


def test_masked_rows_keep_params_and_state_noloco():
    n, p = 8, 11
    active = torch.tensor([True, False, True, True, False, True, True, True])
    cfg = NoLoCoConfig(sync_every=1, gamma=0.4, group_size=2)
    _, _, history = _run_noloco_stacked(cfg, n, p, steps=3, active=active)
    for theta, (phi, delta), (phi_got, delta_got), buf in history:
        for i in range(n):
            if active[i]:
                assert not torch.equal(buf[i], theta[i])
                assert torch.equal(buf[i], phi_got[i])
            else:
                assert torch.equal(buf[i], theta[i])
                assert torch.equal(phi_got[i], phi[i]) and torch.equal(delta_got[i], delta[i])


@pytest.mark.parametrize("cfg", [GossipConfig(merge="mixing"),
                                 GossipConfig(merge="beta", variance_correction=True)])
def test_masked_rows_keep_params_gossip(cfg):
    n = 6
    params = stacked_models(make_models(n, seed=3))
    alg = Gossip(cfg, params, StackedCommunicator(n), make_topology("ring", n))
    active = torch.tensor([True, False, True, False, True, True])
    buf = params.groups[0].buffer
    for t in range(1, 4):
        before = buf.clone()
        alg.step(t, active=active)
        assert torch.equal(buf[~active], before[~active])
        assert not torch.equal(buf[active], before[active])


# ----------------------------------------------------------------------------- config checks


CONFIG_CASES = [
    (FedAvgConfig, "sync_every", 0), (FedAvgConfig, "sync_every", 2.5),
    (FedAvgConfig, "sync_every", True), (FedAvgConfig, "client_fraction", 0.0),
    (FedAvgConfig, "client_fraction", 1.5), (FedAvgConfig, "client_fraction", float("nan")),
    (FedAvgConfig, "seed", -1), (FedAvgConfig, "seed", 1.5),
    (DiLoCoConfig, "sync_every", -3), (DiLoCoConfig, "outer_lr", 0.0),
    (DiLoCoConfig, "outer_lr", float("inf")), (DiLoCoConfig, "outer_lr", "0.7"),
    (DiLoCoConfig, "outer_momentum", 1.2), (DiLoCoConfig, "outer_momentum", -0.1),
    (DiLoCoConfig, "nesterov", "yes"),
    (NoLoCoConfig, "sync_every", 0), (NoLoCoConfig, "alpha", -0.5), (NoLoCoConfig, "alpha", 1.5),
    (NoLoCoConfig, "beta", 0.0), (NoLoCoConfig, "beta", float("nan")),
    (NoLoCoConfig, "gamma", -0.1), (NoLoCoConfig, "gamma", float("inf")),
    (NoLoCoConfig, "group_size", 1), (NoLoCoConfig, "group_size", 2.0),
    (NoLoCoConfig, "seed", -2), (NoLoCoConfig, "seed", "0"),
    (GossipConfig, "sync_every", 0), (GossipConfig, "merge", "mean"),
    (GossipConfig, "self_weight", 1.1), (GossipConfig, "self_weight", -0.1),
    (GossipConfig, "variance_correction", 1), (GossipConfig, "vc_eps", -1e-8),
    (GossipConfig, "vc_ratio", 1.5), (GossipConfig, "vc_ratio", -0.5),
    *[(cls, "compress", value) for cls in (FedAvgConfig, DiLoCoConfig, NoLoCoConfig,
                                           GossipConfig, ChocoConfig)
      for value in ("int4", "topk:2", "")],
    *[(cls, "error_feedback", "yes") for cls in (FedAvgConfig, DiLoCoConfig, NoLoCoConfig,
                                                 GossipConfig, ChocoConfig)],
    (ChocoConfig, "sync_every", 0), (ChocoConfig, "gamma", 0.0), (ChocoConfig, "seed", -1),
    *[(cls, field, value) for cls in (DiLoCoConfig, NoLoCoConfig)
      for field, value in (("overlap", 1), ("fragments", 0), ("fragments", 2.0),
                           ("fragments", 1000))],
]


@pytest.mark.parametrize("config_cls,field,value", CONFIG_CASES,
                         ids=[f"{c.__name__}-{f}-{v!r}" for c, f, v in CONFIG_CASES])
def test_invalid_config_raises_naming_field_and_value(config_cls, field, value):
    with pytest.raises(ValueError, match=rf"{field}\b.*{re.escape(repr(value))}"):
        config_cls(**{field: value})


def test_every_config_field_has_an_invalid_case():
    import dataclasses

    for cls in (FedAvgConfig, DiLoCoConfig, NoLoCoConfig, GossipConfig, ChocoConfig):
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == {f for c, f, _ in CONFIG_CASES if c is cls}, cls.__name__


def test_cross_field_config_checks():
    with pytest.raises(ValueError, match="nesterov=True needs outer_momentum > 0, got "
                                         "outer_momentum=0"):
        DiLoCoConfig(outer_momentum=0.0)
    with pytest.raises(ValueError, match="variance_correction=True needs merge='beta', got "
                                         "merge='mixing'"):
        GossipConfig(merge="mixing", variance_correction=True)
    with pytest.raises(ValueError, match="topology has n=4 nodes, the run has 6"):
        Gossip(GossipConfig(), stacked(torch.zeros(6, 2)), StackedCommunicator(6),
               make_topology("ring", 4))
    # valid edge values pass
    NoLoCoConfig(alpha=0.0, gamma=0.0, group_size=3)
    DiLoCoConfig(outer_momentum=0.0, nesterov=False)
    FedAvgConfig(client_fraction=1.0, seed=0)
    GossipConfig(self_weight=0.0, vc_ratio=0.0, vc_eps=0.0)


# ----------------------------------------------------------------------------- state_dict


def _build(name: str, x: Tensor, compress: str = "none") -> Any:
    n = x.shape[0]
    params = stacked(x)
    comm = StackedCommunicator(n)
    cz = {"compress": compress, "error_feedback": compress != "none"}
    if name == "fedavg":
        return FedAvg(FedAvgConfig(sync_every=1, client_fraction=0.5, seed=3, **cz), params,
                      comm, weight=torch.arange(1, n + 1, dtype=torch.float64))
    if name == "diloco":
        return DiLoCo(DiLoCoConfig(sync_every=1, **cz), params, comm)
    if name == "noloco":
        return NoLoCo(NoLoCoConfig(sync_every=1, gamma=0.3, **cz), params, comm)
    if name == "choco":
        return Choco(ChocoConfig(sync_every=1, compress=compress), params, comm,
                     make_topology("ring", n))
    cfg = GossipConfig(merge="beta", variance_correction=True, **cz)
    return Gossip(cfg, params, comm, make_topology("one-peer-exponential", n))


def _advance(alg: Any, steps: range) -> list[Tensor]:
    buf = alg.params.groups[0].buffer
    out = []
    for t in steps:
        n, p = buf.shape
        buf.add_(torch.stack([noise(i, t, p) for i in range(n)]))
        alg.step(t)
        out.append(buf.clone())
    return out


def test_make_config_refuses_a_field_that_contradicts_the_algorithm() -> None:
    """make_config("gossip-vc", variance_correction=False) used to return variance correction
    on, and make_config("dpsgd", merge="beta") the mixing merge: the preset won silently."""
    with pytest.raises(ValueError, match="variance_correction=False contradicts "
                                         "algo='gossip-vc', which sets variance_correction=True"):
        make_config("gossip-vc", variance_correction=False)
    with pytest.raises(ValueError, match="merge='beta' contradicts algo='dpsgd'"):
        make_config("dpsgd", merge="beta")
    assert make_config("gossip", merge="beta", self_weight=0.3).self_weight == 0.3
    assert make_config("dpsgd", merge=None).merge == "mixing"  # None: the default


NAMES = ("fedavg", "diloco", "noloco", "gossip", "choco")


@pytest.mark.parametrize("name", NAMES)
def test_step_counts_from_one_and_step_zero_is_refused(name):
    """A sync "before any step" (step 0) used to sync in FedAvg and CHOCO (FedAvg sampling
    round -1), pass silently in DiLoCo/NoLoCo and fail in gossip blaming a topology step -1."""
    x = init_row(5).expand(4, 5).clone()
    alg = _build(name, x)
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match=rf"step must be an integer >= 1 .*step={bad!r}"):
            alg.step(bad)
    assert torch.equal(alg.params.groups[0].buffer, x)
    alg.step(1)  # the first inner step is fine


def test_load_state_dict_names_what_differs():
    """Loading another algorithm's state, or one from another model shape or with another
    compression / error-feedback / overlap setting, used to raise KeyError or a bare size
    mismatch, or (compressed state into an uncompressed algorithm) load silently."""
    x = init_row(6).expand(4, 6).clone()
    states = {n: _build(n, x, "int8:4" if n != "choco" else "none").state_dict() for n in NAMES}
    for saver in NAMES:
        for loader in NAMES:
            if loader != saver:
                with pytest.raises(ValueError, match=rf"saved by algorithm '{saver}', this is "
                                                     rf"'{loader}'"):
                    _build(loader, x, "int8:4" if loader != "choco" else "none"
                           ).load_state_dict(states[saver])
    wide = init_row(7).expand(4, 7).clone()
    for name, key in (("diloco", "phi"), ("noloco", "phi"), ("choco", "x_hat")):
        with pytest.raises(ValueError, match=rf"state\['{key}'\]\[0\] has shape \(4, 6\), "
                                             rf"this {name} has \(4, 7\)"):
            _build(name, wide).load_state_dict(_build(name, x).state_dict())
    with pytest.raises(ValueError, match=r"residual of shape \(4, 6\), .* is \(4, 7\)"):
        _build("fedavg", wide, "int8:4").load_state_dict(states["fedavg"])
    with pytest.raises(ValueError, match="saved with compression, this gossip has compress=none"):
        _build("gossip", x).load_state_dict(states["gossip"])
    with pytest.raises(ValueError, match="saved without compression, this noloco has compress="):
        _build("noloco", x, "int8:4").load_state_dict(_build("noloco", x).state_dict())
    no_ef = DiLoCo(DiLoCoConfig(sync_every=1, compress="int8:4"), stacked(x),
                   StackedCommunicator(4))
    with pytest.raises(ValueError, match="saved with error_feedback=True, this diloco has "
                                         "error_feedback=False"):
        no_ef.load_state_dict(states["diloco"])
    overlapped = DiLoCo(DiLoCoConfig(sync_every=1, overlap=True), stacked(x),
                        StackedCommunicator(4))
    with pytest.raises(ValueError, match="saved with overlap=False, this diloco has overlap=True"):
        overlapped.load_state_dict(_build("diloco", x).state_dict())


@pytest.mark.parametrize(("name", "compress"), [
    ("fedavg", "none"), ("diloco", "none"), ("noloco", "none"), ("gossip", "none"),
    # compressed, with error feedback (the residuals and the per-call seeds resume too)
    ("fedavg", "int8-sr:4"), ("diloco", "randk:0.3"), ("noloco", "topk:0.2"),
    ("gossip", "int8:4"), ("choco", "none"), ("choco", "randk:0.5")])
def test_state_dict_round_trip_continues_bit_for_bit(name, compress):
    n, p = 8, 17
    x0 = torch.stack([init_row(p) + noise(i, 0, p) for i in range(n)]) \
        if name in ("gossip", "choco") else init_row(p).expand(n, p)
    alg = _build(name, x0, compress)
    _advance(alg, range(1, 4))
    state = alg.state_dict()
    theta = alg.params.groups[0].buffer.clone()
    expect = _advance(alg, range(4, 8))  # the original goes on: the saved state must not change
    blob = io.BytesIO()
    torch.save(state, blob)
    for loaded in (state, torch.load(io.BytesIO(blob.getvalue()), weights_only=False)):
        fresh = _build(name, theta, compress)
        fresh.load_state_dict(loaded)
        got = _advance(fresh, range(4, 8))
        for a, b in zip(got, expect, strict=True):
            assert torch.equal(a, b)
