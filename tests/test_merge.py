"""gossip.merge: each rule against a closed form or a hand computation, the Fisher and BatchNorm
helpers against plain autograd, and the CLI end to end on a real simulation's --save-models
output and on a real launch.train checkpoint directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from gossip import merge
from gossip.flat import FlatParams
from gossip.merge.cli import MergeOptions, _Scorer
from gossip.tasks import Task, TaskData, get_task

torch.set_num_threads(1)


def states_of(*vectors: list[float]) -> list[dict[str, torch.Tensor]]:
    """States with a 4-vector ``w`` and a 2-vector ``b`` (flattened order: w then b)."""
    return [{"w": torch.tensor(v[:4], dtype=torch.float64),
             "b": torch.tensor(v[4:], dtype=torch.float64)} for v in vectors]


def flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state["w"], state["b"]])


# ----------------------------------------------------------------------------- pure rules


def test_uniform_soup_is_the_mean_and_weights_normalise() -> None:
    gen = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(3, 2, generator=gen), "n": torch.tensor(7)} for _ in range(5)]
    out = merge.average(states)
    torch.testing.assert_close(out["a"], sum(s["a"] for s in states) / 5)
    assert out["n"].item() == 7 and out["n"].dtype == torch.int64
    weighted = merge.average(states[:2], [1.0, 3.0])
    torch.testing.assert_close(weighted["a"], 0.25 * states[0]["a"] + 0.75 * states[1]["a"])


def test_fisher_with_equal_fishers_is_the_uniform_soup() -> None:
    gen = torch.Generator().manual_seed(1)
    states = [{"a": torch.randn(10, generator=gen)} for _ in range(4)]
    same = torch.rand(10, generator=gen)
    out = merge.fisher_average(states, [{"a": same}] * 4)
    torch.testing.assert_close(out["a"], merge.average(states)["a"])


def test_fisher_weights_closed_form() -> None:
    a, b = {"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([5.0, -4.0])}
    fa, fb = {"x": torch.tensor([1.0, 0.0])}, {"x": torch.tensor([3.0, 1.0])}
    out = merge.fisher_average([a, b], [fa, fb], eps=0.0)
    # coordinate 0: (1*1 + 3*5) / 4; coordinate 1: only b has Fisher mass
    torch.testing.assert_close(out["x"], torch.tensor([4.0, -4.0]))


def test_ties_matches_the_papers_steps_by_hand() -> None:
    base = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    taus = [[3.0, -1.0, 0.5, 2.0, -4.0, 0.1],
            [-2.0, 1.5, -0.2, 1.0, 0.9, 0.3],
            [1.0, -5.0, 0.4, -3.0, 0.2, 0.05]]
    (b,) = states_of(base)
    states = states_of(*[[x + y for x, y in zip(base, t, strict=True)] for t in taus])
    out = merge.ties(b, states, density=0.5)
    # trim (3 of 6 largest |tau| each): [3,0,0,2,-4,0], [-2,1.5,0,1,0,0], [1,-5,0,-3,0,0]
    # elect: sums [2,-3.5,0,0,-4,0] -> signs [+,-,0,0,-,0]; 0s take the majority sign (-)
    # disjoint mean: [(3+1)/2, -5, 0, -3, -4, 0]
    merged = torch.tensor([2.0, -5.0, 0.0, -3.0, -4.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(flat(out), flat(b) + merged)
    half = merge.ties(b, states, density=0.5, scale=0.5)
    torch.testing.assert_close(flat(half), flat(b) + 0.5 * merged)


def test_ties_with_full_density_and_agreeing_signs_is_the_mean() -> None:
    (b,) = states_of([0.0] * 6)
    states = states_of([1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 7, 8])
    torch.testing.assert_close(flat(merge.ties(b, states, density=1.0)),
                               flat(merge.average(states)))


def test_dare_drops_rescales_and_averages_by_hand() -> None:
    (b,) = states_of([1.0, -1.0, 0.0, 2.0, 0.5, 0.5])
    taus = torch.tensor([[3.0, -1.0, 0.5, 2.0, -4.0, 0.1],
                         [-2.0, 1.5, -0.2, 1.0, 0.9, 0.3],
                         [1.0, -5.0, 0.4, -3.0, 0.2, 0.05]], dtype=torch.float64)
    states = states_of(*(flat(b) + taus).tolist())
    masks = merge.dare_masks(3, 6, 0.5, seed=3)
    out = merge.dare(b, states, drop=0.5, seed=3)
    expected = flat(b) + (taus * masks * 2.0).mean(dim=0)
    torch.testing.assert_close(flat(out), expected)
    # p = 0 keeps everything: the uniform soup
    torch.testing.assert_close(flat(merge.dare(b, states, drop=0.0)),
                               flat(merge.average(states)))
    # the rescale makes DARE unbiased: over 20,000 independent copies of the 6 coordinates
    # (one call, one mask each) the merge averages to the uniform soup (std <= 1.8 / sqrt(2e4))
    copies = 20_000
    tiled = [{"x": flat(s).repeat(copies)} for s in states]
    out = merge.dare({"x": flat(b).repeat(copies)}, tiled, drop=0.5, seed=4)
    torch.testing.assert_close(out["x"].view(copies, 6).mean(0), flat(merge.average(states)),
                               atol=0.07, rtol=0)


def test_dare_masks_keep_one_minus_p() -> None:
    kept = merge.dare_masks(4, 100_000, 0.9, seed=0).double().mean(dim=1)
    # binomial std of the kept fraction: sqrt(0.09 / 1e5) ~ 1e-3
    assert torch.all((kept - 0.1).abs() < 5e-3), kept


def test_ema_last_k_and_lawa_closed_forms() -> None:
    gen = torch.Generator().manual_seed(2)
    series = [{"a": torch.randn(5, generator=gen, dtype=torch.float64)} for _ in range(7)]
    d = 0.8
    closed = d ** 6 * series[0]["a"] + sum(
        (1 - d) * d ** (7 - t) * series[t - 1]["a"] for t in range(2, 8))
    torch.testing.assert_close(merge.ema(series, d)["a"], closed)
    torch.testing.assert_close(merge.last_k(series, 3)["a"],
                               (series[4]["a"] + series[5]["a"] + series[6]["a"]) / 3)
    torch.testing.assert_close(merge.lawa(series, 3, every=2)["a"],
                               (series[2]["a"] + series[4]["a"] + series[6]["a"]) / 3)
    with pytest.raises(ValueError, match="needs 7 checkpoints, got 6"):
        merge.lawa(series[:6], 4, every=2)


def test_greedy_soup_adds_while_the_score_does_not_drop() -> None:
    states = [{"x": torch.tensor([v], dtype=torch.float64)} for v in (0.9, 1.15, 0.7, 4.0)]

    def score(s: dict[str, torch.Tensor]) -> float:
        return -float((s["x"] - 1.0) ** 2)

    soup, chosen = merge.greedy_soup(states, score)
    # order by score: 0.9, 1.15, 0.7, 4.0; {0.9, 1.15} -> 1.025 is better; 0.7 and 4.0 hurt
    assert chosen == [0, 1]
    torch.testing.assert_close(soup["x"], torch.tensor([1.025], dtype=torch.float64))


def test_mismatched_and_empty_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="empty list"):
        merge.average([])
    with pytest.raises(ValueError, match=r"tensor 'a' is \[3\] in model 1 but \[2\]"):
        merge.average([{"a": torch.zeros(2)}, {"a": torch.zeros(3)}])



def test_dtype_mismatch_bad_fishers_and_bad_arguments_are_refused_by_name() -> None:
    """Each used to pass silently or fail bare: a bf16 + fp32 merge came out in model 0's dtype
    (so the order decided it) and an int + float tensor of one name was averaged as floats; a
    Fisher naming a missing tensor raised KeyError, one of another shape a size mismatch, and a
    negative or NaN Fisher fell back to the plain mean silently; scale=nan gave NaN models;
    names=[missing] a KeyError."""
    a, b = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([3.0, 4.0])}
    with pytest.raises(ValueError, match=r"tensor 'w' is torch.bfloat16 in model 1 but "
                                         r"torch.float32 in model 0: cast"):
        merge.average([a, {"w": b["w"].bfloat16()}])
    with pytest.raises(ValueError, match=r"tensor 'n' is torch.int64 in model 1 but "
                                         r"torch.float32 in model 0"):
        merge.average([{"n": torch.tensor(3.0)}, {"n": torch.tensor(5)}])
    with pytest.raises(ValueError, match=r"Fisher 0 has tensors \['x'\] that the models"):
        merge.fisher_average([a, b], [{"x": torch.ones(2)}, {"x": torch.ones(2)}])
    with pytest.raises(ValueError, match=r"Fisher 1 of tensor 'w' is \[3\], the tensor is \[2\]"):
        merge.fisher_average([a, b], [{"w": torch.ones(2)}, {"w": torch.ones(3)}])
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="Fisher 1 of tensor 'w' has a negative or "
                                             "non-finite entry"):
            merge.fisher_average([a, b], [{"w": torch.ones(2)}, {"w": torch.tensor([1.0, bad])}])
    for rule in (merge.ties, merge.dare):
        with pytest.raises(ValueError, match="scale=nan is invalid"):
            rule(a, [a, b], scale=float("nan"))
        with pytest.raises(ValueError, match=r"names=\['zz'\] are not tensors"):
            rule(a, [a, b], names=["zz"])


def test_greedy_soup_ranks_a_nan_score_last() -> None:
    """A diverged ingredient (NaN score) used to scramble the ranking (Python sorts NaN keys
    arbitrarily): [nan, good] returned the NaN model alone."""
    states = [{"x": torch.tensor([v])} for v in (float("nan"), 1.0, 2.0)]

    def score(s: dict[str, torch.Tensor]) -> float:
        return -float((s["x"] - 1.0).abs())  # NaN for a soup holding the NaN model

    soup, chosen = merge.greedy_soup(states, score)
    assert chosen == [1]
    assert torch.equal(soup["x"], torch.tensor([1.0]))


# ----------------------------------------------------------------------------- models


def _toy_task(model_factory: object, kind: str = "classification") -> Task:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(64, 3, generator=gen)
    y = torch.randint(0, 4, (64,), generator=gen)
    data = TaskData(x, y, x[:16], y[:16], num_classes=4, kind=kind)
    return Task("toy", data, model_factory, default_lr=0.1, default_batch_size=8)  # type: ignore


def test_diagonal_fisher_matches_a_per_example_autograd_loop() -> None:
    task = _toy_task(lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)))
    model = task.make_model(0)
    x = task.data.x_train[:20]
    fisher = merge.diagonal_fisher(task, model, x, chunk=7)
    ref = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for xi in x:
        probs = torch.softmax(model(xi[None]), dim=-1)[0].detach()
        for c in range(4):
            model.zero_grad()
            torch.log_softmax(model(xi[None]), dim=-1)[0, c].backward()
            for n, p in model.named_parameters():
                ref[n] += probs[c].double() * p.grad.double() ** 2
    for n in ref:
        torch.testing.assert_close(fisher[n].double(), ref[n] / len(x), rtol=1e-4, atol=1e-7)


def test_recompute_bn_gives_the_cumulative_batch_statistics() -> None:
    task = _toy_task(lambda: nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)))
    model = task.make_model(0)
    with torch.no_grad():
        model[1].running_mean.fill_(9.0)
    x = task.data.x_train
    merge.recompute_bn(model, x, batch_size=16, batches=4, seed=0)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = [model[0](x[order[i * 16:(i + 1) * 16]]) for i in range(4)]
    torch.testing.assert_close(model[1].running_mean, torch.stack([b.mean(0) for b in h]).mean(0))
    torch.testing.assert_close(model[1].running_var,
                               torch.stack([b.var(0, unbiased=True) for b in h]).mean(0))
    assert not model.training and model[1].momentum == 0.1


# ----------------------------------------------------------------------------- CLI


def last_value(printed: str) -> tuple[str, float]:
    key, value = printed.strip().splitlines()[-1].split("=")
    return key, float(value)


@pytest.fixture(scope="module")
def sim_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from simulations.run import main as sim_main

    out = tmp_path_factory.mktemp("merge") / "sim"
    code = sim_main(["--algo", "noloco", "--nodes", "8", "--rounds", "4", "--sync-every", "10",
                     "--partition", "dirichlet:0.5", "--eval-every", "4", "--out", str(out),
                     "--save-models", "--init", "xavier"])
    assert code == 0
    return out


def test_cli_uniform_on_a_simulations_saved_models(sim_run: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    index = json.loads((sim_run / "models.json").read_text())
    assert (index["task"], index["init"], index["nodes"]) == ("digits", "xavier", list(range(8)))
    capsys.readouterr()
    assert merge.main([str(sim_run), "--method", "uniform", "--out",
                       str(tmp_path / "u.pt")]) == 0
    key, value = last_value(capsys.readouterr().out)
    # reference: the mean of the stacked rows in a hand-built MLP, scored by hand
    blob = torch.load(sim_run / "models.pt", weights_only=True)["params"]
    mean = {n: t.double().mean(0).float() for n, t in blob.items()}
    task = get_task("digits", seed=0)
    h = torch.relu(task.data.x_test @ mean["0.weight"].T + mean["0.bias"])
    acc = float(((h @ mean["2.weight"].T + mean["2.bias"]).argmax(1)
                 == task.data.y_test).double().mean())
    assert key == "accuracy" and value == pytest.approx(acc, abs=1e-6)
    saved = torch.load(tmp_path / "u.pt", weights_only=True)
    torch.testing.assert_close(saved["state"]["0.weight"], mean["0.weight"])
    # a merged file is an input too
    assert merge.main([str(tmp_path / "u.pt"), "--method", "uniform", "--out",
                       str(tmp_path / "again.pt")]) == 0
    assert last_value(capsys.readouterr().out)[1] == pytest.approx(value, abs=1e-9)


def test_greedy_soup_never_below_its_best_ingredient_on_held_out(sim_run: Path) -> None:
    models = merge.load_models([sim_run])
    opts = MergeOptions(method="greedy-soup", heldout_samples=512)
    result = merge.merge(models, opts)
    scorer = _Scorer(models.build_task(), opts, models.model_seed)
    best = max(scorer.score(i.state) for i in result.used)
    assert result.chosen and scorer.score(result.state) >= best


@pytest.mark.parametrize("method", ["greedy-soup", "fisher", "ties", "dare"])
def test_cli_other_soups_run(sim_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                             method: str) -> None:
    assert merge.main([str(sim_run), "--method", method, "--out", str(tmp_path / "m.pt"),
                       "--fisher-samples", "64"]) == 0
    key, value = last_value(capsys.readouterr().out)
    assert key == "accuracy" and 0.0 <= value <= 1.0


def test_cli_refuses_bad_input(sim_run: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "m.pt")

    def refused(*argv: str) -> str:
        assert merge.main([*argv, "--out", out]) == 2
        return capsys.readouterr().err

    assert "no inputs given" in refused("--method", "uniform")
    assert "method='soup' is invalid" in refused(str(sim_run), "--method", "soup")
    assert "needs checkpoints over time" in refused(str(sim_run), "--method", "ema")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert f"checkpoint file {foreign} is not a gossip checkpoint" in refused(
        str(foreign), "--method", "uniform")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    assert f"{text} is not a model file" in refused(str(text), "--method", "uniform")
    assert "does not exist" in refused(str(tmp_path / "nope"), "--method", "uniform")
    small = get_task("digits", hidden=32).make_model(0)
    wide = get_task("digits").make_model(0)
    for name, m in (("small.pt", small), ("wide.pt", wide)):
        torch.save({"kind": "gossip-merged-model", "task": "digits", "seed": 0,
                    "init": "default", "state": merge.state_of(m)}, tmp_path / name)
    assert "tensor '0.weight' is [128, 64] in model 1 but [32, 64]" in refused(
        str(tmp_path / "small.pt"), str(tmp_path / "wide.pt"), "--method", "uniform")
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "models.json").write_text((sim_run / "models.json").read_text())
    (copy / "models.pt").write_bytes((sim_run / "models.pt").read_bytes()[:-10])
    assert "does not match the SHA-256" in refused(str(copy), "--method", "uniform")
    # --out naming a directory (the run's own): refused before merging, not by the last rename
    assert merge.main([str(sim_run), "--method", "uniform", "--out", str(sim_run)]) == 2
    assert f"out={str(sim_run)!r} is a directory" in capsys.readouterr().err


def test_cli_prints_the_loss_for_tasks_without_accuracy(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    from simulations.run import main as sim_main

    run = tmp_path / "reg"
    assert sim_main(["--task", "synthetic", "--algo", "gossip", "--nodes", "4", "--rounds", "2",
                     "--sync-every", "5", "--out", str(run), "--save-models"]) == 0
    capsys.readouterr()
    assert merge.main([str(run), "--method", "fisher", "--out", str(tmp_path / "f.pt")]) == 0
    key, value = last_value(capsys.readouterr().out)
    saved = torch.load(tmp_path / "f.pt", weights_only=True)
    assert key == "loss" and value == pytest.approx(saved["metrics"]["loss"], abs=1e-6)
    task = get_task("synthetic", seed=0)
    w, b = saved["state"]["weight"], saved["state"]["bias"]
    mse = float(((task.data.x_test @ w.T + b - task.data.y_test) ** 2).mean())
    assert value == pytest.approx(mse, rel=1e-5)


def test_cli_merges_a_run_of_a_user_task_by_its_import_path(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from simulations.run import main as sim_main
    from tests.user_task import make_task

    run = tmp_path / "user"
    assert sim_main(["--task", "tests.user_task:make_task", "--algo", "gossip", "--nodes", "4",
                     "--rounds", "2", "--sync-every", "5", "--seed", "2", "--out", str(run),
                     "--save-models"]) == 0
    assert json.loads((run / "models.json").read_text())["task"] == "tests.user_task:make_task"
    capsys.readouterr()
    assert merge.main([str(run), "--method", "uniform", "--out", str(tmp_path / "u.pt")]) == 0
    key, value = last_value(capsys.readouterr().out)
    # reference: the mean of the 4 saved rows as the task's MLP, on the task built by hand
    blob = torch.load(run / "models.pt", weights_only=True)["params"]
    mean = {n: t.double().mean(0).float() for n, t in blob.items()}
    task = make_task(seed=2)
    h = torch.tanh(task.data.x_test @ mean["0.weight"].T + mean["0.bias"])
    acc = float(((h @ mean["2.weight"].T + mean["2.bias"]).argmax(1)
                 == task.data.y_test).double().mean())
    assert key == "accuracy" and value == pytest.approx(acc, abs=1e-6)


def test_save_models_needs_an_out_dir_and_one_process() -> None:
    from simulations.config import SimConfig

    with pytest.raises(ValueError, match="save_models=True"):
        SimConfig(save_models=True)
    with pytest.raises(ValueError, match="save_models=True"):
        SimConfig(save_models=True, out="x", actors=2)


@pytest.mark.slow
def test_cli_on_a_real_launch_train_checkpoint_dir(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    from tests.test_train import torchrun

    run = tmp_path / "run"
    # H = 7 and checkpoints every 10 steps: the two ranks' checkpointed models differ
    torchrun(run, "--algo", "fedavg", "--task", "digits", "--sync-every", "7", "--steps", "30",
             "--checkpoint-every", "10", "--eval-every", "10", "--partition", "dirichlet:0.5")
    task = get_task("digits", seed=0)

    def flat_of(step: int, rank: int) -> list[torch.Tensor]:
        path = run / "checkpoints" / f"step_{step}" / f"rank_{rank}.pt"
        return torch.load(path, weights_only=True)["params"]

    def accuracy(buffers: list[torch.Tensor]) -> float:
        model = task.make_model(0)
        params = FlatParams.from_module(model)
        with torch.no_grad():
            for dst, src in zip(params.buffers(), buffers, strict=True):
                dst.copy_(src)
            return float((model(task.data.x_test).argmax(1) == task.data.y_test).double().mean())

    assert not torch.equal(flat_of(30, 0)[0], flat_of(30, 1)[0])
    capsys.readouterr()
    assert merge.main([str(run), "--method", "uniform", "--out", str(tmp_path / "u.pt")]) == 0
    mean = [(a.double() + b.double()).div(2).float()
            for a, b in zip(flat_of(30, 0), flat_of(30, 1), strict=True)]
    assert last_value(capsys.readouterr().out)[1] == pytest.approx(accuracy(mean), abs=1e-6)

    d = 0.5
    assert merge.main([str(run), "--method", "ema", "--ema-decay", str(d), "--rank", "1",
                       "--out", str(tmp_path / "e.pt")]) == 0
    series = [flat_of(s, 1) for s in (10, 20, 30)]
    closed = [(d * d * a.double() + (1 - d) * d * b.double() + (1 - d) * c.double()).float()
              for a, b, c in zip(*series, strict=True)]
    assert last_value(capsys.readouterr().out)[1] == pytest.approx(accuracy(closed), abs=1e-6)

    assert merge.main([str(run), "--method", "last-k", "--k", "2", "--out",
                       str(tmp_path / "k.pt")]) == 0
    assert last_value(capsys.readouterr().out)[0] == "accuracy"
