"""FlatParams: parameters as views into flat [L, P] buffers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gossip.flat import FlatParams, default_vc_scope, scope_from_spec


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2), nn.LayerNorm(2))


def test_from_module_keeps_values_identity_and_order():
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = [id(p) for p in model.parameters()]
    flat = FlatParams.from_module(model)
    assert [id(p) for p in model.parameters()] == ids  # same Parameter objects
    assert flat.rows == 1
    assert flat.numel == sum(t.numel() for t in before.values())
    assert flat.nbytes_per_row == flat.numel * 4
    (g,) = flat.groups
    assert g.buffer.shape == (1, flat.numel) and g.buffer.is_contiguous()
    for seg, (name, ref) in zip(g.segments, before.items(), strict=True):
        assert seg.name == name and seg.shape == tuple(ref.shape)
        assert torch.equal(g.buffer[0, seg.offset:seg.end].view(seg.shape), ref)
    assert g.segments[-1].end == flat.numel
    assert list(flat.named_views()) == list(before)


def test_params_are_views_of_the_buffer_both_ways():
    model = _mlp()
    flat = FlatParams.from_module(model)
    buf = flat.groups[0].buffer
    buf.fill_(0.25)
    x = torch.randn(5, 4)
    assert all(bool((p == 0.25).all()) for p in model.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    seg = flat.groups[0].segments[0]
    assert bool((buf[0, seg.offset:seg.end] == 1.25).all())
    for p in model.parameters():
        assert p.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    model(x)  # still a working module


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizer_steps_keep_working_and_match_an_unflattened_copy(opt_name):
    model, ref = _mlp(1), _mlp(1)
    make = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            "adam": lambda ps: torch.optim.Adam(ps, lr=0.01)}[opt_name]
    opt = make(model.parameters())  # built before flattening: must keep working
    flat = FlatParams.from_module(model)
    opt_ref = make(ref.parameters())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(6, 4, generator=g)
        for m, o in ((model, opt), (ref, opt_ref)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    # the flat buffer saw the optimizer's updates
    assert torch.equal(flat.groups[0].buffer[0, : model[0].weight.numel()],
                       model[0].weight.detach().flatten())


def test_dtype_grouping_gives_one_buffer_per_dtype():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).double())
    flat = FlatParams.from_module(model)
    assert [g.buffer.dtype for g in flat.groups] == [torch.float32, torch.float64]
    assert [[s.name for s in g.segments] for g in flat.groups] == [["0.weight", "0.bias"],
                                                                   ["1.weight", "1.bias"]]
    assert flat.nbytes_per_row == 8 * 4 + 6 * 8
    assert model[1].weight.dtype == torch.float64
    assert [p.dtype for p in flat.params] == [p.dtype for p in model.parameters()]


def test_frozen_parameters_are_left_out():
    model = _mlp()
    model[0].bias.requires_grad_(False)
    flat = FlatParams.from_module(model)
    assert "0.bias" not in [s.name for s in flat.groups[0].segments]
    with pytest.raises(ValueError, match="no trainable parameters"):
        FlatParams.from_module(nn.Sequential(nn.Tanh()))


def test_vc_scope_default_and_specs():
    model = _mlp()
    flat = FlatParams.from_module(model)
    scoped = {s.name: s.in_scope for s in flat.groups[0].segments}
    assert scoped == {"0.weight": True, "0.bias": False, "2.weight": True, "2.bias": False,
                      "3.weight": False, "3.bias": False}  # LayerNorm is not rescaled
    assert default_vc_scope("w.weight", nn.Conv2d(1, 1, 1))
    assert not default_vc_scope("w.weight", None)
    for spec, expect in (("all", True), ("none", False)):
        f = FlatParams.from_module(_mlp(), scope_from_spec(spec))
        assert all(s.in_scope is expect for s in f.groups[0].segments)
    f = FlatParams.from_module(_mlp(), scope_from_spec("re:^2\\."))
    assert [s.name for s in f.groups[0].segments if s.in_scope] == ["2.weight", "2.bias"]
    with pytest.raises(ValueError, match=r"vc_scope.*'bogus'"):
        scope_from_spec("bogus")


def test_from_stacked_shapes_views_and_scope():
    base = _mlp()
    models = [_mlp(s) for s in range(5)]
    params, _ = torch.func.stack_module_state(models)
    params = {n: t.detach().clone() for n, t in params.items()}
    flat = FlatParams.from_stacked({n: t.clone() for n, t in params.items()}, module=base)
    assert flat.rows == 5
    (g,) = flat.groups
    assert g.buffer.shape == (5, sum(p.numel() for p in base.parameters()))
    views = flat.named_views()
    for name, p in views.items():
        assert isinstance(p, nn.Parameter)
        assert p.shape == params[name].shape
        assert torch.equal(p, params[name])
    seg = next(s for s in g.segments if s.name == "0.weight")
    assert seg.shape == (3, 4) and seg.in_scope
    assert not next(s for s in g.segments if s.name == "0.bias").in_scope
    g.buffer[2].zero_()  # row 2 of the buffer is node 2's model
    assert all(bool((p[2] == 0).all()) for p in views.values())
    assert all(torch.equal(p[1], params[n][1]) for n, p in views.items())
    # the stacked params drive functional_call under vmap
    x = torch.randn(3, 4)

    def f(p, x):
        return torch.func.functional_call(base, p, (x,))

    out = torch.vmap(f, in_dims=(0, None))(views, x)
    assert out.shape == (5, 3, 2)
    torch.testing.assert_close(out[1], models[1](x))
    # without a module nothing is in the default scope (owners unknown)
    flat2 = FlatParams.from_stacked(params)
    assert not any(s.in_scope for s in flat2.groups[0].segments)


def test_from_stacked_rejects_bad_input():
    with pytest.raises(ValueError, match="no tensors"):
        FlatParams.from_stacked({})
    with pytest.raises(ValueError, match=r"stacked\['b'\] has 3 rows, expected 2"):
        FlatParams.from_stacked({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})


def test_from_stacked_groups_dtypes():
    flat = FlatParams.from_stacked({"a": torch.zeros(4, 2),
                                    "b": torch.zeros(4, 3, dtype=torch.float64),
                                    "c": torch.ones(4, 1)})
    assert [(g.buffer.dtype, tuple(g.buffer.shape)) for g in flat.groups] == [
        (torch.float32, (4, 3)), (torch.float64, (4, 3))]
    # params and named views follow the mapping's order, not the dtype grouping
    assert [tuple(p.shape) for p in flat.params] == [(4, 2), (4, 3), (4, 1)]
    assert list(flat.named_views()) == ["a", "b", "c"]
    assert flat.named_views()["b"].dtype == torch.float64
