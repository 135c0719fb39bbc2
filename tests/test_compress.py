"""Compressors against closed forms and plain-torch references (gossip.compress)."""

from __future__ import annotations

import math

import pytest
import torch

from gossip.compress import Codec, Compressor, ErrorFeedback, parse_codec

ALL = ["none", "bf16", "fp16", "int8", "int8-sr:64", "fp8:128", "topk:0.05", "randk:0.1"]


def _x(m: int = 4, p: int = 1000, seed: int = 0) -> torch.Tensor:
    return torch.randn(m, p, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("spec", ALL)
def test_wire_width_is_the_byte_count_and_zero_bytes_decode_to_zero(spec: str) -> None:
    codec = parse_codec(spec)
    for p in (1, 7, 1000, 1001):
        wire = codec.encode(_x(3, p), seed=1)
        assert wire.dtype == torch.uint8 and wire.shape == (3, codec.nbytes(p))
        assert codec.nbytes(p) % 4 == 0
        assert (codec.decode(torch.zeros_like(wire), p) == 0).all()


def test_byte_counts_closed_forms() -> None:
    p = 1000
    assert parse_codec("none").nbytes(p) == 4000
    assert parse_codec("bf16").nbytes(p) == parse_codec("fp16").nbytes(p) == 2000
    assert parse_codec("int8").nbytes(p) == p + 4 * math.ceil(p / 256)  # 1016
    assert parse_codec("fp8:100").nbytes(p) == p + 40
    assert parse_codec("topk:0.01").nbytes(p) == 10 * (4 + 4)  # int32 index + fp32 value
    assert parse_codec("randk:0.01").nbytes(p) == 10 * 4  # values only
    assert parse_codec("int8").nbytes(1) == 8  # 1 + 4, padded to 4


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_casts_equal_torch(dtype: str) -> None:
    x = _x()
    ref = x.to(torch.bfloat16 if dtype == "bf16" else torch.float16).to(torch.float32)
    codec = parse_codec(dtype)
    assert torch.equal(codec.decode(codec.encode(x), x.shape[1]), ref)


def test_int8_error_at_most_half_a_step_per_element() -> None:
    x, block = _x(p=1000), 64
    codec = parse_codec(f"int8:{block}")
    y = codec.decode(codec.encode(x), 1000)
    for b in range(0, 1000, block):
        part = x[:, b : b + block]
        scale = part.abs().amax(dim=1, keepdim=True) / 127
        err = (y[:, b : b + block] - part).abs()
        assert (err <= scale / 2 * (1 + 1e-5)).all()
        # the reconstruction is on the grid: an integer multiple of the block's scale
        q = y[:, b : b + block] / scale
        torch.testing.assert_close(q, q.round(), atol=1e-3, rtol=0)


def test_int8_zero_block_and_absmax_exact() -> None:
    x = torch.zeros(1, 512)
    x[0, 300] = -5.0
    codec = parse_codec("int8")
    y = codec.decode(codec.encode(x), 512)
    assert torch.equal(y, x)  # zeros stay zeros, the absmax element is exact


def test_int8_stochastic_rounding_is_unbiased_and_on_neighbouring_steps() -> None:
    x = _x(1, 200)
    codec = parse_codec("int8-sr:200")
    scale = x.abs().max() / 127
    ys = torch.stack([codec.decode(codec.encode(x, seed=s), 200) for s in range(400)])
    lo, hi = torch.floor(x / scale) * scale, torch.ceil(x / scale) * scale
    assert ((ys >= lo - 1e-5) & (ys <= hi + 1e-5)).all()
    # mean of 400 draws: standard error <= scale / (2 sqrt(400)) = scale / 40
    assert (ys.mean(0) - x).abs().max() < scale / 40 * 5
    # the same seed and row id give the same bits, whatever the batch shape
    big = torch.cat([torch.zeros(2, 200), x])
    rows = torch.tensor([5, 6, 9])
    alone = codec.encode(x, seed=3, rows=torch.tensor([9]))
    assert torch.equal(codec.encode(big, seed=3, rows=rows)[2:], alone)


def test_fp8_equals_torch_e4m3_with_block_scales() -> None:
    x, block = _x(p=300), 128
    codec = parse_codec(f"fp8:{block}")
    y = codec.decode(codec.encode(x), 300)
    for b in range(0, 300, block):
        part = x[:, b : b + block]
        scale = part.abs().amax(dim=1, keepdim=True) / 448
        ref = (part / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
        torch.testing.assert_close(y[:, b : b + block], ref, atol=0, rtol=1e-6)


def test_topk_keeps_exactly_the_k_largest() -> None:
    x = _x(3, 1000)
    codec = parse_codec("topk:0.05")
    y = codec.decode(codec.encode(x), 1000)
    k = 50
    for row in range(3):
        top = set(x[row].abs().argsort(descending=True)[:k].tolist())
        kept = set(y[row].nonzero().flatten().tolist())
        assert kept == top
        assert torch.equal(y[row, list(top)], x[row, list(top)])


def test_randk_indices_shared_by_seed_values_only_on_the_wire() -> None:
    x = _x(2, 1000)
    a, b = parse_codec("randk:0.1"), Codec("randk", ratio=0.1)  # as two ranks would
    ya = a.decode(a.encode(x, seed=7), 1000, seed=7)
    yb = b.decode(b.encode(x, seed=7), 1000, seed=7)
    assert torch.equal(ya, yb)
    idx = ya[0].nonzero().flatten()
    assert len(idx) == 100 and torch.equal(ya[1].nonzero().flatten(), idx)  # same for all rows
    assert torch.equal(ya[:, idx], x[:, idx])
    other = a.decode(a.encode(x, seed=8), 1000, seed=8)
    assert not torch.equal(other[0].nonzero().flatten(), idx)


@pytest.mark.parametrize("spec", ["int8", "fp8", "topk:0.02", "randk:0.02", "bf16"])
def test_error_feedback_sent_plus_residual_is_sum_of_inputs(spec: str) -> None:
    comp = Compressor(parse_codec(spec), 2, 500, error_feedback=True)
    total_in, total_sent = torch.zeros(2, 500, dtype=torch.float64), torch.zeros(2, 500,
                                                                                   dtype=torch.float64)
    for t in range(20):
        x = _x(2, 500, seed=t)
        v = comp.begin(x)
        seed = comp.next_seed()
        sent = comp.codec.decode(comp.codec.encode(v, seed=seed), 500, seed=seed)
        comp.end(v, sent)
        total_in += x.double()
        total_sent += sent.double()
    assert comp.feedback is not None
    torch.testing.assert_close(total_sent + comp.feedback.residual.double(), total_in,
                               atol=1e-4, rtol=0)
    if spec.startswith(("topk", "randk")):  # lossy enough that the residual is far from zero
        assert comp.feedback.residual.abs().max() > 1


def test_error_feedback_rows_that_send_nothing_keep_their_residual() -> None:
    ef = ErrorFeedback(2, 3)
    ef.residual.fill_(1.0)
    v = torch.full((2, 3), 5.0)
    ef.update(v, torch.full((2, 3), 4.5), rows=torch.tensor([True, False]))
    assert torch.equal(ef.residual, torch.tensor([[0.5] * 3, [1.0] * 3]))


def test_compressor_state_resumes_bit_exactly() -> None:
    def run(comp: Compressor, steps: range) -> list[torch.Tensor]:
        out = []
        for t in steps:
            v = comp.begin(_x(2, 300, seed=t))
            seed = comp.next_seed()
            sent = comp.codec.decode(comp.codec.encode(v, seed=seed), 300, seed=seed)
            comp.end(v, sent)
            out.append(sent)
        return out

    codec = parse_codec("randk:0.1")
    a = Compressor(codec, 2, 300, error_feedback=True, seed=4)
    run(a, range(3))
    saved = a.state_dict()
    tail = run(a, range(3, 6))
    b = Compressor(codec, 2, 300, error_feedback=True, seed=4)
    b.load_state_dict(saved)
    for x, y in zip(tail, run(b, range(3, 6)), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("spec", ["int9", "int8:0", "int8:x", "topk", "topk:0", "topk:1.5",
                                  "randk:abc", "bf16:2", ""])
def test_bad_specs_name_the_field(spec: str) -> None:
    with pytest.raises(ValueError, match="compress="):
        parse_codec(spec)


def test_error_feedback_needs_a_lossy_codec() -> None:
    with pytest.raises(ValueError, match="error_feedback"):
        Compressor(parse_codec("none"), 1, 4, error_feedback=True)


@pytest.mark.parametrize("spec", ALL)
def test_empty_rows_and_zero_rows_encode_to_nothing(spec: str) -> None:
    """Width 0 used to raise a bare view/reshape error (topk: 'k out of range', randk an
    AssertionError); zero rows the same."""
    codec = parse_codec(spec)
    for m, p in ((3, 0), (0, 5), (0, 0)):
        wire = codec.encode(torch.zeros(m, p))
        assert wire.shape == (m, codec.nbytes(p)) and wire.dtype == torch.uint8
        assert torch.equal(codec.decode(wire, p), torch.zeros(m, p))
    assert codec.nbytes(0) == 0


@pytest.mark.parametrize("spec", ALL)
def test_non_finite_entries_stay_non_finite_and_spoil_nothing_else(spec: str) -> None:
    """int8 (and int8-sr, fp8) used to decode a whole block NaN for one inf in it. Now each
    finite entry decodes exactly as it does in the same block without the bad entries (set to
    0), and each inf/NaN decodes non-finite: itself where the format has it, else NaN."""
    x = _x(3, 300, seed=5)
    bad = {(0, 7): math.inf, (0, 200): -math.inf, (1, 8): math.nan, (2, 299): math.inf}
    dirty = x.clone()
    clean = x.clone()
    for (i, j), v in bad.items():
        dirty[i, j] = v
        clean[i, j] = 0.0
    codec = parse_codec(spec)
    got = codec.decode(codec.encode(dirty, seed=3), 300, seed=3)
    want = codec.decode(codec.encode(clean, seed=3), 300, seed=3)
    kept = torch.ones_like(x, dtype=torch.bool)
    for (i, j), v in bad.items():
        kept[i, j] = False
        if spec.startswith(("int8", "fp8")):
            assert math.isnan(got[i, j])
        elif not spec.startswith(("topk", "randk")) or got[i, j] != 0:  # topk keeps them all
            assert got[i, j].item() == v or (math.isnan(v) and math.isnan(got[i, j]))
    if spec.startswith("topk"):  # the non-finite entries took 4 of the k slots
        return
    assert torch.equal(got[kept], want[kept])


@pytest.mark.parametrize("spec", ["int8", "int8-sr:64", "fp8:128"])
def test_the_accelerator_path_gives_the_cpu_bits(spec: str, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    """On a GPU the codec never reads a flag off the device (that would wait for it): it always
    takes the non-finite-safe path. Forced here on the CPU, it must give the same wire bytes and
    the same decoded values, for finite and for non-finite input."""
    import gossip.compress as compress

    codec = parse_codec(spec)
    for width in (300, 512):
        x = _x(3, width, seed=2)
        dirty = x.clone()
        dirty[0, 5], dirty[2, width - 1] = math.inf, math.nan
        for data in (x, dirty):
            wire = codec.encode(data, seed=4)
            out = codec.decode(wire, width, seed=4)
            with monkeypatch.context() as m:
                m.setattr(compress, "_cheap_to_read", lambda device: False)
                wire_acc = codec.encode(data, seed=4)
                out_acc = codec.decode(wire_acc, width, seed=4)
            assert torch.equal(wire, wire_acc)
            assert torch.equal(out.isnan(), out_acc.isnan())
            assert torch.equal(out.nan_to_num(0.0), out_acc.nan_to_num(0.0))
