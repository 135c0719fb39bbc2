"""``gossip.attach``: a user's own model, optimizer and loop.

Real Gloo ranks (world sizes 2 and 4, one spawn each: every rank runs all scenarios and sends
back what it saw) against plain-torch references: the mean of the ranks' models, the same
algorithm driven by hand as ``launch.train`` drives it, an uninterrupted run for resume, rank
0's init for the broadcast. The footguns that need no peer run in-process.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import gossip
from gossip.algorithms import ChocoConfig, build_algorithm
from gossip.algorithms.noloco import group_table
from gossip.comm import StackedCommunicator
from gossip.flat import FlatParams
from tests.distributed import run_ranks

# one worker runs the module, so its module-scoped fixture runs once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("attach_ranks")

H = 3  # sync_every in the scenarios


def _model(seed: int, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(5, 6)]
    if bn:
        layers.append(nn.BatchNorm1d(6))
    layers += [nn.Tanh(), nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def _batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:
        x, y = _batch(rank, step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def _float_buffers(model: nn.Module) -> Tensor:
    return torch.cat([b.detach().flatten().clone() for b in model.buffers()
                      if b.is_floating_point()])


def _snapshot_after_each_step(model: nn.Module, opt: torch.optim.Optimizer,
                              seen: dict[str, Tensor]) -> None:
    """Record the model after each inner update and before the sync: a post-hook registered
    before attach's runs first."""
    def hook(*_: Any) -> None:
        seen["params"] = _flat(model)
        if any(b.is_floating_point() for b in model.buffers()):
            seen["buffers"] = _float_buffers(model)
    opt.register_step_post_hook(hook)


def _averaging(comm: Any, config: Any, buffers: str) -> dict[str, Any]:
    """2 syncs; the model just before the last one and just after it."""
    model = _model(0, bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pre: dict[str, Tensor] = {}
    _snapshot_after_each_step(model, opt, pre)
    with gossip.attach(model, opt, config, comm, buffers=buffers) as attached:
        _train(model, opt, comm.rank, range(1, 2 * H + 1))
    return {"pre": pre, "params": _flat(model), "buffers": _float_buffers(model),
            "bytes_sent": attached.bytes_sent, "last_step": attached.last_stats.step,
            "numel": (sum(p.numel() for p in model.parameters()),
                      sum(b.numel() for b in model.buffers() if b.is_floating_point()))}


def _start(comm: Any, config: Any, seed: int, shift: int = 0, frozen_shift: float = 0.0,
           **kw: Any) -> dict[str, Any]:
    """Attach a model seeded ``seed``, its BatchNorm statistics moved by ``shift`` and its
    frozen bias by ``frozen_shift``."""
    model = _start_model(seed, shift, frozen_shift)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        gossip.attach(model, opt, config, comm, **kw).close()
    except ValueError as e:
        return {"error": str(e)}
    got = model.state_dict()
    rank0s = _start_model(100, 0).state_dict()
    own = _start_model(seed, shift, frozen_shift).state_dict()
    return {"state_is_rank0s": all(torch.equal(got[k], v) for k, v in rank0s.items()),
            "state_is_own": all(torch.equal(got[k], v) for k, v in own.items())}


def _start_model(seed: int, shift: int, frozen_shift: float = 0.0) -> nn.Module:
    """BatchNorm statistics moved by ``shift``; the last layer's bias frozen (never averaged,
    so only the shared start makes it equal), moved by ``frozen_shift``."""
    model = _model(seed, bn=True)
    model[3].bias.requires_grad_(False)
    with torch.no_grad():
        model[1].running_mean.add_(shift)
        model[1].num_batches_tracked.add_(shift)  # an integer buffer
        model[3].bias.add_(frozen_shift)
    return model


def _attach_vs_hand(comm: Any, name: str, config: Any) -> dict[str, Any]:
    """The same run through attach and through the loop launch.train uses."""
    steps = range(1, 2 * H + 2)
    model = _model(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    with gossip.attach(model, opt, config, comm) as attached:
        _train(model, opt, comm.rank, steps)
    hand = _model(1)
    params = FlatParams.from_module(hand)
    hand_opt = torch.optim.Adam(params.params, lr=0.05)
    algo = build_algorithm(name, config, params, comm)
    for step in steps:
        x, y = _batch(comm.rank, step)
        loss = nn.functional.cross_entropy(hand(x), y)
        hand_opt.zero_grad(set_to_none=True)
        loss.backward()
        hand_opt.step()
        algo.step(step)
    return {"attach": _flat(model), "hand": _flat(hand), "unsynced": _unsynced(comm, steps),
            "last_step": attached.last_stats.step}


def _unsynced(comm: Any, steps: range) -> Tensor:
    model = _model(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _train(model, opt, comm.rank, steps)
    return _flat(model)


def _exit(comm: Any) -> dict[str, Any]:
    model = _model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gossip.attach(model, opt, gossip.FedAvgConfig(sync_every=2), comm) as attached:
        _train(model, opt, comm.rank, range(1, 3))
    synced = _flat(model)
    _train(model, opt, comm.rank, range(3, 5))  # step 4 would be a sync
    return {"synced": synced, "after": _flat(model), "step": attached.step,
            "attached": attached.attached}


def _resume(comm: Any, config: Any, **kw: Any) -> dict[str, Any]:
    """Steps 1..7 straight, against 1..4, save, a fresh model/optimizer/attach, load, 5..7."""
    def fresh(seed: int) -> tuple[nn.Module, torch.optim.Optimizer, gossip.Attached]:
        model = _model(seed, bn=True)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        return model, opt, gossip.attach(model, opt, config, comm, **kw)

    model, opt, attached = fresh(3)
    _train(model, opt, comm.rank, range(1, 8))
    straight = model.state_dict()
    model, opt, attached = fresh(3)
    _train(model, opt, comm.rank, range(1, 5))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "attached": attached.state_dict()}, buf)
    attached.close()
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    model, opt, attached = fresh(77)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    attached.load_state_dict(saved["attached"])
    _train(model, opt, comm.rank, range(5, 8))
    resumed = model.state_dict()
    return {"equal": all(torch.equal(straight[k], resumed[k]) for k in straight),
            "step": attached.step}


def _rank_main(comm: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    n = comm.world_size
    odd_seed = 100 + comm.rank % 2  # ranks 1, 3 start apart from ranks 0, 2
    out: dict[str, Any] = {
        "fedavg": _averaging(comm, gossip.FedAvgConfig(sync_every=H), "average"),
        "fedavg-local": _averaging(comm, gossip.FedAvgConfig(sync_every=H), "local"),
        "diloco": _averaging(comm, gossip.DiLoCoConfig(sync_every=H), "average"),
        "noloco": _averaging(comm, gossip.NoLoCoConfig(sync_every=H), "average"),
        "exit": _exit(comm),
    }
    for name, config in [("fedavg", gossip.FedAvgConfig(sync_every=H)),
                         ("diloco", gossip.DiLoCoConfig(sync_every=H)),
                         ("noloco", gossip.NoLoCoConfig(sync_every=H))]:
        out[f"start-{name}"] = _start(comm, config, 100 + comm.rank, shift=comm.rank,
                                      frozen_shift=float(comm.rank))
    ring = gossip.make_topology("ring", n)
    out["start-gossip-apart"] = _start(comm, gossip.GossipConfig(), odd_seed, topology=ring)
    out["start-gossip-same"] = _start(comm, gossip.GossipConfig(), 100, topology="ring")
    out["start-gossip-frozen-apart"] = _start(comm, gossip.GossipConfig(), 100, topology=ring,
                                              frozen_shift=float(comm.rank % 2))
    out["start-gossip-independent"] = _start(comm, gossip.GossipConfig(), odd_seed,
                                             topology=ring, init="independent")
    # odd ranks attach another config: their syncs would pair the wrong steps (or abort Gloo)
    odd = comm.rank % 2
    out["config-sync-every"] = _start(comm, gossip.FedAvgConfig(sync_every=H + odd), 100)
    out["config-algo"] = _start(comm, gossip.DiLoCoConfig(sync_every=H) if odd
                                else gossip.FedAvgConfig(sync_every=H), 100)
    out["config-topology"] = _start(comm, gossip.GossipConfig(), 100,
                                    topology="exponential" if odd else "ring")
    out["hand-noloco"] = _attach_vs_hand(comm, "noloco", gossip.NoLoCoConfig(sync_every=H,
                                                                            gamma=0.3))
    out["hand-diloco"] = _attach_vs_hand(comm, "diloco", gossip.DiLoCoConfig(sync_every=H))
    out["hand-diloco-int8"] = _attach_vs_hand(comm, "diloco", gossip.DiLoCoConfig(
        sync_every=H, compress="int8", error_feedback=True))
    out["resume-noloco"] = _resume(comm, gossip.NoLoCoConfig(sync_every=2, gamma=0.3))
    out["resume-diloco"] = _resume(comm, gossip.DiLoCoConfig(sync_every=2))
    out["resume-gossip"] = _resume(comm, gossip.GossipConfig(sync_every=2, merge="beta",
                                                             variance_correction=True),
                                   topology="ring", init="independent")
    # compressed: error-feedback residuals (parameters and buffers) and CHOCO's public copies
    out["resume-noloco-topk"] = _resume(comm, gossip.NoLoCoConfig(
        sync_every=2, gamma=0.3, compress="topk:0.3", error_feedback=True))
    out["resume-choco"] = _resume(comm, ChocoConfig(sync_every=2, compress="int8", gamma=0.8),
                                  topology="ring", init="independent")
    return out


@pytest.fixture(scope="module", params=[2, 4])
def ranks(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return run_ranks(_rank_main, request.param, timeout=600)


def _mean(tensors: list[Tensor]) -> Tensor:
    return torch.stack(tensors).mean(dim=0)


@pytest.mark.slow
def test_fedavg_ranks_end_bit_identical_at_the_mean(ranks):
    outs = [r["fedavg"] for r in ranks]
    for key in ("params", "buffers"):
        for o in outs[1:]:
            assert torch.equal(o[key], outs[0][key])  # bit-identical after the last sync
        # ... and equal to the plain mean of the models just before it
        torch.testing.assert_close(outs[0][key], _mean([o["pre"][key] for o in outs]),
                                   rtol=1e-6, atol=1e-7)
    # the models really differed before the sync
    assert not torch.equal(outs[0]["pre"]["params"], outs[1]["pre"]["params"])
    assert not torch.equal(outs[0]["pre"]["buffers"], outs[1]["pre"]["buffers"])
    assert outs[0]["last_step"] == 2 * H  # steps count from 1: the 2H-th step syncs


@pytest.mark.slow
def test_bytes_sent_is_two_ring_all_reduces_of_params_and_buffers(ranks):
    n = len(ranks)
    o = ranks[0]["fedavg"]
    params, buffers = o["numel"]
    per_sync = sum(4 * k * 2 * (n - 1) // n for k in (params, buffers))
    assert o["bytes_sent"] == 2 * per_sync
    o = ranks[0]["fedavg-local"]
    assert o["bytes_sent"] == 2 * (4 * params * 2 * (n - 1) // n)


@pytest.mark.slow
def test_buffers_local_are_left_alone_while_params_average(ranks):
    outs = [r["fedavg-local"] for r in ranks]
    for o in outs:
        assert torch.equal(o["buffers"], o["pre"]["buffers"])  # untouched by the sync
        assert torch.equal(o["params"], outs[0]["params"])
    assert not torch.equal(outs[0]["buffers"], outs[1]["buffers"])


@pytest.mark.slow
def test_diloco_buffers_are_the_mean(ranks):
    outs = [r["diloco"] for r in ranks]
    for o in outs:
        assert torch.equal(o["buffers"], outs[0]["buffers"])
    torch.testing.assert_close(outs[0]["buffers"], _mean([o["pre"]["buffers"] for o in outs]),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_noloco_buffers_are_the_mean_over_the_same_pair(ranks):
    n = len(ranks)
    others, _ = group_table(n, 2, 2 * H, 0)
    for i, r in enumerate(ranks):
        j = int(others[i, 0])
        want = _mean([r["noloco"]["pre"]["buffers"], ranks[j]["noloco"]["pre"]["buffers"]])
        torch.testing.assert_close(r["noloco"]["buffers"], want, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["fedavg", "diloco", "noloco"])
def test_differently_seeded_ranks_get_rank_0s_parameters_and_buffers(ranks, algo):
    for rank, r in enumerate(ranks):
        got = r[f"start-{algo}"]
        assert got["state_is_rank0s"], rank
        assert got["state_is_own"] == (rank == 0)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["config-sync-every", "config-algo", "config-topology"])
def test_ranks_that_attach_another_config_are_named_on_every_rank(ranks, case):
    odd = [r for r in range(len(ranks)) if r % 2]
    if case == "config-topology" and len(ranks) < 4:  # on 2 ranks both graphs are one edge
        odd = []
    for r in ranks:
        got = r[case]
        if not odd:
            assert "error" not in got
            continue
        assert f"ranks {odd} attach with another configuration than rank 0" in got["error"]


@pytest.mark.slow
def test_gossip_names_the_ranks_that_start_apart(ranks):
    n = len(ranks)
    odd = [r for r in range(n) if r % 2]
    for r in ranks:
        assert f"ranks {odd} start from a different model than rank 0" in \
            r["start-gossip-apart"]["error"]
        assert "error" not in r["start-gossip-same"]
        # the same trainable parameters and buffers, a frozen bias apart: still refused
        assert f"ranks {odd} start from a different model than rank 0" in \
            r["start-gossip-frozen-apart"]["error"]
        got = r["start-gossip-independent"]
        assert "error" not in got and got["state_is_own"]


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["noloco", "diloco", "diloco-int8"])
def test_attach_equals_the_algorithm_driven_by_hand(ranks, algo):
    for r in ranks:
        got = r[f"hand-{algo}"]
        assert torch.equal(got["attach"], got["hand"])
        assert got["last_step"] == 2 * H
        assert not torch.equal(got["attach"], got["unsynced"])  # the syncs did something


@pytest.mark.slow
def test_leaving_the_context_removes_the_hook(ranks):
    outs = [r["exit"] for r in ranks]
    for o in outs:
        assert torch.equal(o["synced"], outs[0]["synced"])
        assert o["step"] == 2 and not o["attached"]
    # step 4 was a sync step, but nothing synced: the ranks trained apart
    assert not torch.equal(outs[0]["after"], outs[1]["after"])


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["noloco", "diloco", "gossip", "noloco-topk", "choco"])
def test_state_dict_resumes_bit_exactly(ranks, algo):
    for r in ranks:
        assert r[f"resume-{algo}"] == {"equal": True, "step": 7}


# ----------------------------------------------------------------- in-process: no peer needed

def _solo(model: nn.Module, **kw: Any) -> tuple[torch.optim.Optimizer, gossip.Attached]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return opt, gossip.attach(model, opt, gossip.FedAvgConfig(sync_every=2),
                              StackedCommunicator(1), **kw)


def test_steps_count_from_one_and_sync_every_h():
    model = _model(0)
    opt, attached = _solo(model)
    _train(model, opt, 0, range(1, 2))
    assert attached.step == 1 and attached.last_stats is None
    _train(model, opt, 0, range(2, 4))
    assert attached.step == 3 and attached.last_stats.step == 2


@pytest.mark.parametrize("convert", ["last-layer", "buffer-moved"])
def test_converting_part_of_the_model_after_attach_raises_naming_the_tensor(convert):
    model = _model(0, bn=True)
    _, attached = _solo(model)
    if convert == "last-layer":
        model[3].to(torch.float64)
        name = "parameter '3.weight'"
    else:  # parameters untouched, the running statistics moved
        model[1].running_mean.data = model[1].running_mean.clone()
        name = "buffer '1.running_mean'"
    with pytest.raises(RuntimeError, match=name + " no longer views the flat buffer"):
        attached.check()


def test_model_double_after_attach_raises_at_the_next_sync_naming_the_parameter():
    model = _model(0, bn=True)
    opt, attached = _solo(model)
    _train(model, opt, 0, range(1, 2))
    model.double()
    name = "parameter '0.weight' no longer views the flat buffer"
    with pytest.raises(RuntimeError, match=name):
        attached.check()
    x, y = _batch(0, 2)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x.double()), y).backward()
    with pytest.raises(RuntimeError, match=name):
        opt.step()  # step 2 syncs: refused before it


def test_load_state_dict_assign_raises_naming_the_parameter():
    model = _model(0)
    _opt, attached = _solo(model)
    state = {k: v.clone() for k, v in _model(5).state_dict().items()}
    model.load_state_dict(state, assign=True)
    with pytest.raises(RuntimeError, match=r"parameter '0.weight' was replaced by a new tensor"):
        attached.check()
    model2 = _model(0)
    _, attached2 = _solo(model2)
    model2.load_state_dict(state)  # in place: fine
    attached2.check()
    assert torch.equal(attached2.params.groups[0].buffer[0, :30], state["0.weight"].flatten())


def test_a_parameter_added_after_attach_raises():
    model = _model(0)
    _, attached = _solo(model)
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(RuntimeError, match="parameter 'extra' is trainable but was not "
                                           "flattened"):
        attached.check()


def test_a_second_attach_is_refused_while_the_first_is_open():
    """Attaching again would re-flatten the parameters under the first Attached (whose check
    then blamed a model.double() that never happened) and run two algorithms per step."""
    model = _model(0)
    opt, first = _solo(model)
    other_opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for args in ((model, other_opt), (_model(1), opt)):
        with pytest.raises(ValueError, match=r"(model|optimizer) is already attached \(fedavg"):
            gossip.attach(*args, gossip.FedAvgConfig(sync_every=2), StackedCommunicator(1))
    first.check()  # untouched: the refusal flattened nothing
    _train(model, opt, 0, range(1, 3))
    assert first.step == 2 and first.last_stats is not None
    first.close()
    second = gossip.attach(model, opt, gossip.FedAvgConfig(sync_every=2), StackedCommunicator(1))
    _train(model, opt, 0, range(3, 5))
    assert (first.step, second.step) == (2, 2)


def test_a_tensor_added_to_the_optimizer_after_attach_raises_before_the_sync():
    model = _model(0)
    opt, attached = _solo(model)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    _train(model, opt, 0, range(1, 2))  # step 1 does not sync
    with pytest.raises(RuntimeError, match=r"optimizer.param_groups\[1\]\['params'\]\[0\] "
                                           r"\(shape \(3,\)\) is not a parameter of model"):
        _train(model, opt, 0, range(2, 3))
    assert attached.last_stats is None


def test_a_closed_attached_refuses_a_new_with_block():
    model = _model(0)
    opt, attached = _solo(model)
    with attached:
        _train(model, opt, 0, range(1, 3))
    with pytest.raises(RuntimeError, match="this Attached is closed"):
        attached.__enter__()  # a second with block: its steps would never sync


def test_optimizer_built_before_attach_keeps_training_the_flat_buffer():
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attached = gossip.attach(model, opt, gossip.FedAvgConfig(sync_every=5),
                             StackedCommunicator(1))
    before = attached.params.groups[0].buffer.clone()
    _train(model, opt, 0, range(1, 2))
    assert not torch.equal(attached.params.groups[0].buffer, before)
    assert torch.equal(attached.params.groups[0].buffer[0], _flat(model))


def test_bad_input_is_refused_before_any_work():
    model = _model(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    comm = StackedCommunicator(1)
    fed = gossip.FedAvgConfig()
    cases = [
        (dict(config={"sync_every": 2}), r"config must be one of \[.*FedAvgConfig.*\], got dict"),
        (dict(buffers="mean"), r"buffers must be one of \['average', 'local'\], got 'mean'"),
        (dict(init="random"), r"init must be one of .*got 'random'"),
        (dict(init="independent"), r"init='independent' is for gossip only: FedAvgConfig"),
        (dict(topology="ring"), r"topology is only used by gossip, not by FedAvgConfig"),
        (dict(config=gossip.GossipConfig()), r"topology is required for GossipConfig"),
        (dict(config=ChocoConfig()), r"topology is required for ChocoConfig"),
        (dict(optimizer=torch.optim.SGD(_model(0).parameters(), lr=0.1)),
         r"optimizer.param_groups\[0\]\['params'\]\[0\] \(shape \(6, 5\)\) is not a parameter"),
        (dict(comm=StackedCommunicator(2)), r"comm must hold one node per process.*got 2"),
        (dict(config=gossip.NoLoCoConfig()), r"group_size=2 must divide the number of nodes N=1"),
        (dict(config=gossip.GossipConfig(), topology=gossip.make_topology("ring", 3)),
         r"topology has n=3 nodes, the run has 1"),
        (dict(model="net"), r"model must be a torch.nn.Module, got str"),
    ]
    for change, message in cases:
        args = {"model": model, "optimizer": opt, "config": fed, "comm": comm, **change}
        kw = {k: args.pop(k) for k in ("buffers", "init", "topology") if k in args}
        buf = next(iter(model.parameters())).data_ptr()
        with pytest.raises(ValueError, match=message):
            gossip.attach(**args, **kw)
        assert next(iter(model.parameters())).data_ptr() == buf  # nothing flattened
    assert not opt._optimizer_step_post_hooks  # no hook left behind


def test_load_state_dict_refuses_another_algorithm():
    model = _model(0)
    _, attached = _solo(model)
    state = attached.state_dict()
    state["algo"] = "diloco"
    with pytest.raises(ValueError, match="state was saved by algo='diloco', this is "
                                         "algo='fedavg'"):
        attached.load_state_dict(state)


def test_the_public_api_is_exported():
    for name in ["attach", "Attached", "init_from_env", "FedAvg", "FedAvgConfig", "DiLoCo",
                 "DiLoCoConfig", "NoLoCo", "NoLoCoConfig", "Gossip", "GossipConfig",
                 "Choco", "ChocoConfig", "SyncStats", "Topology", "make_topology"]:
        assert name in gossip.__all__ and hasattr(gossip, name), name


def _overlapped_diloco_after_4_steps() -> tuple[nn.Module, gossip.Attached, list[Tensor]]:
    """One node, H = 2, overlap: after step 4 the outer step of the sync at 4 is in flight."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attached = gossip.attach(model, opt, gossip.DiLoCoConfig(sync_every=2, overlap=True),
                             StackedCommunicator(1))
    x = torch.randn(4, 8, 4)
    for s in range(4):
        loss = model(x[s]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, attached, [p.detach().clone() for p in model.parameters()]


def test_close_applies_the_outer_step_in_flight_and_an_error_exit_does_not() -> None:
    model, attached, before = _overlapped_diloco_after_4_steps()
    # the reference: the same algorithm state, flushed by hand
    ref_model, ref, _ = _overlapped_diloco_after_4_steps()
    ref.algorithm.flush()
    attached.close()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    model, attached, before = _overlapped_diloco_after_4_steps()
    with pytest.raises(RuntimeError, match="boom"), attached:
        raise RuntimeError("boom")
    for p, b in zip(model.parameters(), before, strict=True):  # nothing waited for, nothing moved
        assert torch.equal(p, b)
