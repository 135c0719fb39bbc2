"""The variance-corrected merge as the simulator runs it in the vanishing-variance benchmark (64
nodes, random 8-regular graph, Xavier init), against Tian et al.'s equation written out here in
float64, and the benchmark's data sampling against the paper's (per-node label weights, every
batch a fresh draw from the whole training set)."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.reproduce_vanishing_variance import parse_args, rounds_to, sim_config
from gossip.ops import Segment, segment_variances, variance_correct_, vc_segments
from gossip.tasks import get_task
from simulations.engine import Simulation


def test_simulator_vc_merge_is_the_papers_equation_at_64_nodes() -> None:
    args = parse_args(["--rounds", "1"])
    cfg = sim_config("gossip-vc", 0, args)
    assert (cfg.nodes, cfg.topology, cfg.init) == (64, "random-regular:8", "xavier")
    sim = Simulation(cfg, task=get_task("digits", seed=0))
    # watch (not replace) the algorithm step that run_round calls: the models it merges are
    # the ones after the round's local SGD step
    seen: list[dict[str, torch.Tensor]] = []
    step = sim.algorithm.step

    def watched(*a, **kw):  # type: ignore[no-untyped-def]
        seen.append({k: v.detach().double().clone() for k, v in sim.model.params.items()})
        return step(*a, **kw)

    sim.algorithm.step = watched  # type: ignore[method-assign]
    sim.run_round(0)
    assert len(seen) == 1
    x = seen[0]
    after = {k: v.detach().double() for k, v in sim.model.params.items()}
    neighbours = sim.topology.neighbors(0)
    assert all(len(nb) == 8 for nb in neighbours)
    # the paper-era code's merge: beta = 0.5, no eps (ours: 1e-8, far below Var ~ 1e-2)
    beta, eps = 0.5, 0.0
    assert sim.algorithm.config.self_weight == beta and sim.algorithm.config.vc_eps <= 1e-8
    for name, xs in x.items():
        for i, nb in enumerate(neighbours):
            merged = beta * xs[i] + (1 - beta) * xs[nb].mean(dim=0)
            if name.endswith(".weight"):  # Var: population variance over the whole tensor
                target = float(torch.stack([xs[j].var(unbiased=False) for j in nb]).mean())
                mu = merged.mean()
                s = ((target + eps) / (float(merged.var(unbiased=False)) + eps)) ** 0.5
                merged = mu + s * (merged - mu)
                torch.testing.assert_close(after[name][i].var(unbiased=False),
                                           torch.tensor(target, dtype=torch.float64),
                                           rtol=1e-5, atol=0)
            torch.testing.assert_close(after[name][i], merged, rtol=1e-5, atol=1e-6)


def test_default_sampling_is_fresh_label_weighted_draws() -> None:
    """Each node draws rounds x batch samples, so no batch repeats one: the paper's 'every
    batch from the whole training set with the node's Dirichlet label weights'."""
    args = parse_args(["--rounds", "40"])
    cfg = sim_config("fedavg", 0, args)
    assert cfg.partition == "sample:dirichlet:0.5"
    assert cfg.shard_size == 40 * 16
    sim = Simulation(cfg, task=get_task("digits", seed=0))
    counts = sim.label_counts()
    assert counts is not None and counts.shape == (64, 10)
    assert (counts.sum(axis=1) == 640).all()
    # label-skewed nodes whose draws span the whole training set together
    assert np.median(counts.max(axis=1) / 640) > 0.3
    assert len(np.unique(np.concatenate(sim.shards))) > 0.99 * sim.task.data.num_train


def test_rounds_to_first_crossing_and_sustained() -> None:
    accs = [(0, 0.1), (1, 0.85), (2, 0.7), (3, 0.82), (4, 0.9)]
    recs = [{"round": r, "accuracy_mean": a} for r, a in accs] + [{"round": 5}]  # 5: no eval
    assert rounds_to(recs, [0.8, 0.5, 0.95]) == {"0.8": 1, "0.5": 1, "0.95": None}
    assert rounds_to(recs, [0.8, 0.5, 0.95], sustained=True) == {"0.8": 3, "0.5": 1,
                                                                 "0.95": None}


def test_vc_without_eps_leaves_a_constant_tensor_and_corrects_the_rest() -> None:
    """eps = 0 (the authors' C++ value) on a constant in-scope tensor (a zero-init bias when
    biases are in scope): Var(A) = 0 leaves nothing to rescale; it used to give NaN (0/0)."""
    segs = [Segment("a.weight", 0, 6, (2, 3), True), Segment("a.bias", 6, 2, (2,), True)]
    g = torch.Generator().manual_seed(0)
    merged = torch.randn(2, 8, generator=g, dtype=torch.float64)
    merged[:, 6:] = torch.tensor([[0.0], [0.25]], dtype=torch.float64)  # constant biases
    received = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    received[0, :, 6:] = 0.0  # row 0: target variance 0 too
    mask = torch.tensor([[True, True, True], [True, False, True]])
    rv = segment_variances(received.reshape(6, 8), vc_segments(segs)).reshape(2, 3, -1)
    got = variance_correct_(merged.clone(), rv, mask, segs, eps=0.0)
    assert torch.isfinite(got).all()
    assert torch.equal(got[:, 6:], merged[:, 6:])
    for i in range(2):  # the weights: Tian et al.'s equation, eps 0
        ks = mask[i].nonzero().flatten().tolist()
        a = merged[i, :6]
        target = torch.stack([received[i, k, :6].var(unbiased=False) for k in ks]).mean()
        ref = a.mean() + (target / a.var(unbiased=False)).sqrt() * (a - a.mean())
        torch.testing.assert_close(got[i, :6], ref, rtol=1e-12, atol=1e-12)
