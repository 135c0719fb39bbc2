"""Pure tensor math of gossip.ops against plain-torch references written out here."""

from __future__ import annotations

import pytest
import torch

from gossip.ops import (
    Segment,
    mix,
    noloco_update_,
    row_var_mean,
    segment_variances,
    variance_correct_,
    vc_segments,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_segment_end():
    assert Segment("w", 3, 5, (5,)).end == 8


@pytest.mark.parametrize("block", [1, 7, 1 << 18])
def test_row_var_mean_matches_torch_on_any_block_size(block):
    x = torch.randn(9, 13, generator=_gen(4), dtype=torch.float64)[:, 2:12] * 3 + 5
    var, mean = row_var_mean(x, block=block)
    torch.testing.assert_close(var, x.var(dim=-1, unbiased=False), rtol=1e-12, atol=0)
    torch.testing.assert_close(mean, x.mean(dim=-1), rtol=1e-12, atol=0)


def test_segment_variances_are_population_variances_over_each_slice():
    x = torch.randn(3, 20, generator=_gen(0), dtype=torch.float64)
    segs = [Segment("w", 4, 10, (2, 5)), Segment("v", 15, 5, (5,))]
    got = segment_variances(x, segs)
    assert got.shape == (3, 2)
    for j, seg in enumerate(segs):
        part = x[:, seg.offset:seg.end]
        ref = ((part - part.sum(-1, keepdim=True) / seg.numel) ** 2).sum(-1) / seg.numel
        torch.testing.assert_close(got[:, j], ref, rtol=1e-12, atol=1e-12)
    assert segment_variances(x, []).shape == (3, 0)


def test_mix_is_row_of_w_times_x_and_lost_weight_goes_to_self():
    g = _gen(2)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64)
    recv = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    self_w = torch.tensor([0.5, 0.2, 0.6], dtype=torch.float64)
    w = torch.tensor([[0.25, 0.25], [0.3, 0.5], [0.4, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [True, False]])
    got = mix(x, recv, self_w, w, mask)
    # slot by slot (what a stacked communicator hands over) gives the same bits
    assert torch.equal(mix(x, lambda k: recv[:, k].clone(), self_w, w, mask), got)
    ref0 = 0.5 * x[0] + 0.25 * recv[0, 0] + 0.25 * recv[0, 1]
    ref1 = (0.2 + 0.5) * x[1] + 0.3 * recv[1, 0]  # slot 1 lost: its weight goes to self
    ref2 = 0.6 * x[2] + 0.4 * recv[2, 0]
    torch.testing.assert_close(got, torch.stack([ref0, ref1, ref2]))


def _vc_reference(merged, received, mask, segs, eps, ratio):
    out = merged.clone()
    for i in range(merged.shape[0]):
        ks = [k for k in range(received.shape[1]) if mask[i, k]]
        if not ks:
            continue
        for s in segs:
            if not s.in_scope or s.numel < 2:
                continue
            a = merged[i, s.offset:s.end]
            target = sum(float(received[i, k, s.offset:s.end].var(unbiased=False))
                         for k in ks) / len(ks)
            mu = float(a.mean())
            v = float(((a - mu) ** 2).mean())
            scale = ((target + eps) / (v + eps)) ** 0.5
            scale = 1 + ratio * (scale - 1)
            out[i, s.offset:s.end] = mu + scale * (a - mu)
    return out


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_variance_correct_matches_reference(ratio):
    g = _gen(3)
    segs = [Segment("a.weight", 0, 12, (3, 4), True), Segment("a.bias", 12, 3, (3,), False),
            Segment("b.weight", 15, 8, (8,), True), Segment("c", 23, 1, (1,), True)]
    p = 24
    merged = torch.randn(3, p, generator=g, dtype=torch.float64) * 0.3
    received = torch.randn(3, 2, p, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    ref = _vc_reference(merged, received, mask, segs, 1e-8, ratio)
    rv = segment_variances(received.reshape(6, p), vc_segments(segs)).reshape(3, 2, -1)
    got = variance_correct_(merged.clone(), rv, mask, segs, eps=1e-8, ratio=ratio)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    # out of scope, single elements and rows with nothing received are untouched
    assert torch.equal(got[:, 12:15], merged[:, 12:15])
    assert torch.equal(got[:, 23], merged[:, 23])
    assert torch.equal(got[2], merged[2])
    if ratio == 1.0:
        for i, ks in ((0, [0, 1]), (1, [0])):
            for s in (segs[0], segs[2]):
                target = torch.stack([received[i, k, s.offset:s.end].var(unbiased=False)
                                      for k in ks]).mean()
                torch.testing.assert_close(got[i, s.offset:s.end].var(unbiased=False), target,
                                           rtol=1e-6, atol=0)
                torch.testing.assert_close(got[i, s.offset:s.end].mean(),
                                           merged[i, s.offset:s.end].mean())


@pytest.mark.parametrize("alpha,beta,gamma", [(0.5, 0.7, 0.7), (0.3, 0.7, 0.2), (0.0, 1.0, 1.0)])
def test_noloco_update_matches_equation(alpha, beta, gamma):
    g = _gen(4)
    delta = torch.randn(3, 7, generator=g, dtype=torch.float64)
    phi = torch.randn(3, 7, generator=g, dtype=torch.float64)
    theta_mean = torch.randn(3, 7, generator=g, dtype=torch.float64)
    phi_mean = torch.randn(3, 7, generator=g, dtype=torch.float64)
    # delta = a delta + b mean_G(theta - phi) - g (phi - mean_G(phi)); phi += delta
    ref_delta = alpha * delta + beta * (theta_mean - phi_mean) - gamma * (phi - phi_mean)
    ref_phi = phi + ref_delta
    d, p = delta.clone(), phi.clone()
    # theta_mean and phi_mean are scratch (overwritten): pass copies
    noloco_update_(d, p, theta_mean.clone(), phi_mean.clone(), alpha=alpha, beta=beta,
                   gamma=gamma)
    torch.testing.assert_close(d, ref_delta)
    torch.testing.assert_close(p, ref_phi)
    if gamma == beta:  # the folded form needs no phi_mean and gives the same result
        d2, p2 = delta.clone(), phi.clone()
        noloco_update_(d2, p2, theta_mean.clone(), None, alpha=alpha, beta=beta, gamma=gamma)
        torch.testing.assert_close(d2, ref_delta)
        torch.testing.assert_close(p2, ref_phi)
    else:
        with pytest.raises(ValueError, match="phi_mean is required"):
            noloco_update_(delta.clone(), phi.clone(), theta_mean, None, alpha=alpha, beta=beta,
                           gamma=gamma)


def test_scratch_reuses_one_tensor_per_shape_dtype_and_device():
    from gossip.scratch import Scratch

    pool = Scratch()
    a = pool.get((2, 3), torch.float32, "cpu")
    assert pool.get([2, 3], torch.float32, torch.device("cpu")) is a
    assert pool.like(torch.zeros(2, 3)) is a
    assert pool.get((2, 3), torch.float64, "cpu") is not a
    assert pool.get((3, 2), torch.float32, "cpu") is not a
