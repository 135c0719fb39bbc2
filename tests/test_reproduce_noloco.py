"""benchmarks/reproduce_noloco.py: the all-reduce arm is exactly data-parallel Adam (checked
against two replicas that average their gradients by hand), the weight std is the NoLoCo code's
``eval_weight_variance``, Eq. 4, and one tiny end-to-end run (1 seed, 2 arms)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks import reproduce_noloco as rn
from gossip.algorithms import DiLoCo
from gossip.batching import node_batch
from gossip.comm import StackedCommunicator
from gossip.run.build import make_shards, scheduled_lr
from tests.test_algorithms import heavy_ball_ref, init_row, noise, stacked

torch.set_num_threads(1)  # small kernels: threads only add overhead (and xdist runs 2)

TINY = ["--replicas", "4", "--steps", "8", "--warmup-steps", "2", "--h-diloco", "4",
        "--h-noloco", "2", "--eval-every", "4", "--max-chars", "20000", "--d-model", "16",
        "--n-layers", "1", "--no-latency"]


def test_weight_std_is_eval_weight_variance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 300))  # 8 replicas, 300 parameters each
    consensus = float(((x - x.mean(axis=0)) ** 2).sum(axis=1).mean())  # the engine's definition
    reference = math.sqrt(((x - x.mean(axis=0)) ** 2).sum() / (x.shape[1] * x.shape[0]))
    assert rn.weight_std(consensus, x.shape[1]) == pytest.approx(reference, rel=1e-12)


def test_diloco_hb_arm_is_the_papers_heavy_ball_diloco() -> None:
    """The arm's DiLoCo config (torch SGD lr 0.7, momentum 0.3, no Nesterov) takes the NoLoCo
    code's DiLoCo step ``delta = 0.3 delta + 0.7 mean(theta - phi); phi += delta``."""
    args = rn.parse_args([])
    cfg = rn.sim_config("diloco-hb", 0, args).algorithm_config()
    assert cfg.sync_every == 100
    n, p = 4, 30
    params = stacked(init_row(p).expand(n, p))
    alg = DiLoCo(cfg, params, StackedCommunicator(n))
    buf = params.groups[0].buffer
    phi, delta = init_row(p), torch.zeros(p)
    for outer in range(1, 4):
        theta = torch.stack([phi + noise(i, outer, p) for i in range(n)])
        buf.copy_(theta)
        alg.step(100 * outer)
        phi, delta = heavy_ball_ref(phi, delta, theta, 0.3, 0.7)
        torch.testing.assert_close(buf, phi.expand(n, p), rtol=0, atol=1e-6)


def test_eq4() -> None:
    assert rn.relative_ppl_difference(11.0, 10.0, 8.0) == pytest.approx(0.125)
    assert rn.relative_ppl_difference(10.0, 11.0, 8.0) == pytest.approx(-0.125)


def test_allreduce_arm_is_data_parallel_adam(tmp_path: Path) -> None:
    args = rn.parse_args([*TINY, "--out", str(tmp_path)])
    task = rn.scaled_task(args)
    rows = rn.run_allreduce(task, 0, args)
    # reference: one model per replica, gradients averaged by hand, clipped, Adam on each
    spec = rn.sim_config("diloco-hb", 0, args).resolved(task)
    shards = make_shards(spec, task, args.replicas)
    models = [task.make_model(0) for _ in range(args.replicas)]
    opts = [torch.optim.Adam(m.parameters(), lr=args.lr) for m in models]
    expected = []
    for step in range(args.steps):
        grads = []
        for i, (m, shard) in enumerate(zip(models, shards, strict=True)):
            idx = node_batch(shard, args.batch_size, seed=0, node=i, step=step)
            x, y = task.data.train_batch(torch.as_tensor(idx))
            m.zero_grad()
            task.loss(m(x), y).backward()
            grads.append([p.grad.clone() for p in m.parameters()])
        mean = [torch.stack(g).mean(dim=0) for g in zip(*grads, strict=True)]
        for m, opt in zip(models, opts, strict=True):
            for p, g in zip(m.parameters(), copy.deepcopy(mean), strict=True):
                p.grad = g
            nn.utils.clip_grad_norm_(list(m.parameters()), args.clip)
            opt.param_groups[0]["lr"] = scheduled_lr(spec, step, args.steps)
            opt.step()
        if (step + 1) % args.eval_every == 0:
            expected.append(math.exp(task.evaluate(models[0])["loss"]))
    assert [r["step"] for r in rows] == [4, 8]
    assert [r["ppl"] for r in rows] == pytest.approx(expected, rel=1e-4)
    for a, b in zip(models[0].parameters(), models[-1].parameters(), strict=True):
        assert torch.equal(a, b)  # the replicas stayed identical


def test_bad_arguments_name_the_field() -> None:
    with pytest.raises(SystemExit):
        rn.parse_args(["--eval-every", "30"])  # not a multiple of H = 100
    args = rn.parse_args([])
    args.arms = "allreduce,ddp"
    with pytest.raises(ValueError, match="arms='allreduce,ddp'"):
        rn.check_args(args)


@pytest.mark.slow
def test_tiny_run_prints_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert rn.main([*TINY, "--seeds", "0", "--arms", "allreduce,noloco",
                    "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "summary.json").read_text())
    for arm in ("allreduce", "noloco"):
        final = summary["final_ppl"][arm]
        assert final["std"] == 0.0 and final["mean"] == final["per_seed"][0]
        assert summary["runs"][f"{arm}/seed_0"][-1]["ppl"] == final["mean"]
        assert f"{final['mean']:.3f} +- 0.000" in printed
        assert 1.0 < final["mean"] < 100.0  # below the uniform guess over the vocabulary
    # NoLoCo with 4 replicas in pairs: the replicas differ after an outer step
    assert all(r["weight_std"] > 0 for r in summary["runs"]["noloco/seed_0"])
    assert [r["step"] for r in summary["runs"]["noloco/seed_0"]] == [2, 4, 6, 8]
    for name in ("perplexity", "fig3b_weight_std"):
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        assert (tmp_path / f"{name}.svg").stat().st_size > 0
    assert not (tmp_path / "fig3a_relative_ppl.png").exists()  # needs a DiLoCo arm
