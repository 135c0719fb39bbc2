"""CHOCO-SGD against the paper's update equations (Koloskova et al. 2019, Algorithm 1) with one
public copy per (node, neighbour), written in plain torch."""

from __future__ import annotations

import pytest
import torch

from gossip.algorithms import build_algorithm, make_config
from gossip.algorithms.choco import Choco, ChocoConfig
from gossip.comm import StackedCommunicator
from gossip.compress import Compressor, parse_codec
from gossip.flat import FlatParams
from gossip.topology import make_topology

N, P, STEPS = 6, 300, 6


def _noise(t: int) -> torch.Tensor:
    """The 'local step' between two gossip steps (any change of x will do for the equations)."""
    return torch.randn(N, P, generator=torch.Generator().manual_seed(100 + t)) * 0.1


def _start() -> torch.Tensor:
    return torch.randn(N, P, generator=torch.Generator().manual_seed(1))


def _choco(spec: str, gamma: float, topology: str = "erdos-renyi:0.5") -> tuple[Choco, FlatParams]:
    params = FlatParams.from_stacked({"w": _start().clone()})
    topo = make_topology(topology, N, seed=3)
    algo = build_algorithm("choco", make_config("choco", compress=spec, gamma=gamma,
                                                sync_every=1), params,
                           StackedCommunicator(N), topology=topo)
    assert isinstance(algo, Choco)
    return algo, params


def _paper(spec: str, gamma: float) -> torch.Tensor:
    """Algorithm 1 verbatim: node i holds x_hat[i][j] for j in its neighbourhood and itself."""
    topo = make_topology("erdos-renyi:0.5", N, seed=3)
    w = topo.mixing_matrix().to(torch.float32)
    codec = parse_codec(spec)

    def q_op(v: torch.Tensor) -> torch.Tensor:  # Q on one vector (deterministic codecs only)
        return codec.decode(codec.encode(v.unsqueeze(0)), P)[0]

    hood = [[j for j in range(N) if w[i, j] > 0] for i in range(N)]
    x = _start().clone()
    x_hat = [{j: torch.zeros(P) for j in hood[i]} for i in range(N)]
    for t in range(STEPS):
        x = x + _noise(t)  # x^{t+1/2}
        q = [q_op(x[i] - x_hat[i][i]) for i in range(N)]
        for i in range(N):
            for j in hood[i]:
                x_hat[i][j] = x_hat[i][j] + q[j]
        x = torch.stack([x[i] + gamma * sum(w[i, j] * (x_hat[i][j] - x_hat[i][i])
                                            for j in hood[i]) for i in range(N)])
    return x


def _run(algo: Choco, params: FlatParams, steps: range) -> None:
    buf = params.groups[0].buffer
    for t in steps:
        with torch.no_grad():
            buf.add_(_noise(t))
        algo.step(t + 1)


def test_choco_full_copies_equal_the_two_tensor_form_over_many_steps() -> None:
    # without compression nothing rounds at a quantizer's boundary, so the paper's one copy per
    # (node, neighbour) and the kept x_hat_i, s_i agree over many steps
    algo, params = _choco("none", 0.3)
    _run(algo, params, range(STEPS))
    torch.testing.assert_close(params.groups[0].buffer, _paper("none", 0.3), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize(("spec", "gamma"), [("int8:32", 0.7), ("int8-sr", 0.6),
                                             ("topk:0.1", 0.2), ("randk:0.2", 0.3),
                                             ("fp8", 0.5), ("bf16", 0.9)])
def test_choco_step_matches_the_papers_equations_from_any_state(spec: str, gamma: float) -> None:
    # one step from a random state with consistent public copies: q is computed from the same
    # bits on both sides, so the equations are checked exactly (up to the sums' rounding)
    w = make_topology("erdos-renyi:0.5", N, seed=3).mixing_matrix().to(torch.float32)
    algo, params = _choco(spec, gamma)
    gen = torch.Generator().manual_seed(7)
    x, x_hat = torch.randn(N, P, generator=gen), torch.randn(N, P, generator=gen)
    state = algo.state_dict()
    state.update(x_hat=[x_hat.clone()], mixed=[w @ x_hat])
    if "compress" in state:
        state["compress"][0][0]["calls"] = 4  # any shared call count
    algo.load_state_dict(state)
    with torch.no_grad():
        params.groups[0].buffer.copy_(x)
    algo.step(1)
    # the paper: q_i = Q(x_i - x_hat_i) (the same seed every node's neighbours decode with)
    codec = parse_codec(spec)
    shared = Compressor(codec, N, P, seed=0)  # buffer 0 of seed 0, as the algorithm's
    shared.calls = 4
    seed = shared.next_seed()
    q = codec.decode(codec.encode(x - x_hat, seed=seed, rows=torch.arange(N)), P, seed=seed)
    hat = x_hat + q
    ref = torch.stack([x[i] + gamma * sum(w[i, j] * (hat[j] - hat[i]) for j in range(N))
                       for i in range(N)])
    torch.testing.assert_close(params.groups[0].buffer, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(algo.x_hat[0], hat, atol=0, rtol=0)
    assert not torch.equal(q, x - x_hat)  # Q did compress


def test_choco_none_gamma_one_is_dpsgd() -> None:
    algo, params = _choco("none", 1.0)
    w = make_topology("erdos-renyi:0.5", N, seed=3).mixing_matrix().to(torch.float32)
    x = _start().clone()
    for t in range(STEPS):
        x = w @ (x + _noise(t))
    _run(algo, params, range(STEPS))
    torch.testing.assert_close(params.groups[0].buffer, x, atol=1e-5, rtol=1e-5)


def test_choco_compressed_sends_fewer_bytes_and_still_reaches_consensus() -> None:
    algo, params = _choco("int8", 0.9)
    buf = params.groups[0].buffer
    mean = buf.mean(0).clone()
    spread0 = (buf - buf.mean(0)).norm()
    for t in range(60):
        algo.step(t + 1)
    assert (buf - buf.mean(0)).norm() < 1e-2 * spread0
    # the average is preserved up to the quantization noise (W doubly stochastic)
    torch.testing.assert_close(buf.mean(0), mean, atol=1e-2, rtol=0)
    degree = (make_topology("erdos-renyi:0.5", N, seed=3).mixing_matrix() > 0).sum() - N
    assert algo.comm.traffic.bytes_sent == 60 * int(degree) * parse_codec("int8").nbytes(P)


def test_choco_resumes_bit_exactly() -> None:
    a, pa = _choco("int8-sr:64", 0.5)
    _run(a, pa, range(3))
    saved, x_saved = a.state_dict(), pa.groups[0].buffer.clone()
    _run(a, pa, range(3, 6))
    b, pb = _choco("int8-sr:64", 0.5)
    with torch.no_grad():
        pb.groups[0].buffer.copy_(x_saved)
    b.load_state_dict(saved)
    _run(b, pb, range(3, 6))
    assert torch.equal(pa.groups[0].buffer, pb.groups[0].buffer)
    for key in ("x_hat", "mixed"):
        assert torch.equal(a.state_dict()[key][0], b.state_dict()[key][0])


def test_choco_config_and_topology_errors() -> None:
    with pytest.raises(ValueError, match="error_feedback"):
        ChocoConfig(compress="int8", error_feedback=True)
    with pytest.raises(ValueError, match="gamma"):
        ChocoConfig(gamma=0.0)
    # gamma > 1 used to be accepted and left consensus (a ring of 6: inf at gamma 2)
    for bad in (1.5, 2.0):
        with pytest.raises(ValueError, match=rf"gamma must be in \(0, 1\], got {bad}"):
            ChocoConfig(gamma=bad)
    ChocoConfig(gamma=1.0)
    with pytest.raises(ValueError, match="compress="):
        ChocoConfig(compress="int4")
    with pytest.raises(ValueError, match="time-varying"):
        _choco("none", 0.5, topology="one-peer-exponential")
