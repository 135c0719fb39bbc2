"""The ``init`` task option: Xavier-uniform weights and zero biases, in the Task API and both
CLIs' configs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gossip.tasks import get_task, xavier_init
from launch.config import TrainConfig
from simulations.config import SimConfig, from_args
from simulations.engine import Simulation


def test_xavier_digits_weights_have_the_glorot_variance_and_zero_biases() -> None:
    model = get_task("digits", init="xavier").make_model(3)
    for layer in (model[0], model[2]):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        w = layer.weight.detach().double()
        assert float(w.abs().max()) <= bound
        # U(-a, a) has variance a^2 / 3 = 2 / (fan_in + fan_out): 1.04e-2 and 1.45e-2 here
        assert float(w.var()) == pytest.approx(2.0 / (fan_in + fan_out), rel=0.05)
        assert torch.count_nonzero(layer.bias) == 0
    default = get_task("digits").make_model(3)
    assert torch.count_nonzero(default[0].bias) > 0  # PyTorch's default init: random biases


def test_xavier_is_seeded_and_leaves_other_layers_alone() -> None:
    task = get_task("digits", init="xavier")
    assert torch.equal(task.make_model(5)[0].weight, task.make_model(5)[0].weight)
    assert not torch.equal(task.make_model(5)[0].weight, task.make_model(6)[0].weight)
    model = nn.Sequential(nn.Embedding(4, 3), nn.LayerNorm(3), nn.Conv1d(3, 2, 1))
    emb = model[0].weight.detach().clone()
    xavier_init(model)
    assert torch.equal(model[0].weight, emb) and torch.equal(model[1].weight, torch.ones(3))
    assert torch.count_nonzero(model[2].bias) == 0


def test_init_is_a_flag_of_both_clis_and_bad_values_are_named() -> None:
    assert from_args(["--init", "xavier"]).init == "xavier"
    assert TrainConfig(init="xavier").init == "xavier"
    for cls in (SimConfig, TrainConfig):
        with pytest.raises(ValueError, match="init='he'"):
            cls(init="he")
    with pytest.raises(ValueError, match="init='he'"):
        get_task("digits", init="he")


def test_the_simulator_starts_from_the_chosen_init() -> None:
    sim = Simulation(SimConfig(algo="gossip", nodes=4, rounds=1, init="xavier"))
    bias = sim.model.params["0.bias"]
    assert torch.count_nonzero(bias) == 0
    ref = get_task("digits", init="xavier").make_model(2)[0].weight  # node 2: seed + 2
    assert torch.equal(sim.model.params["0.weight"][2], ref)
