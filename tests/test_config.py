"""TrainConfig: validation names field and value, flags map 1:1 to fields, TOML files load."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from gossip import configs
from gossip.algorithms import ALGORITHMS
from gossip.configs import field_flag
from gossip.run.spec import ALGO_FIELDS, FLAG_FIELDS, NOT_FLAGS, applicable_fields
from gossip.tasks import get_task
from launch.config import TrainConfig, build_parser, from_args


@pytest.mark.parametrize(("fields", "name", "value"), [
    ({"algo": "sgp"}, "algo", "'sgp'"),
    ({"task": "mnist"}, "task", "'mnist'"),
    ({"steps": 0}, "steps", "0"),
    ({"steps": -3}, "steps", "-3"),
    ({"steps": 2.5}, "steps", "2.5"),
    ({"seed": -1}, "seed", "-1"),
    ({"seed": 2**64 + 5}, "seed", str(2**64 + 5)),  # overflowed int64 deep in the run
    ({"lr": 0.0}, "lr", "0.0"),
    ({"batch_size": 0}, "batch_size", "0"),
    ({"optimizer": "lion"}, "optimizer", "'lion'"),
    ({"partition": "zipf:2"}, "partition", "'zipf:2'"),
    ({"partition": "dirichlet:-1"}, "partition", "'dirichlet:-1'"),
    ({"algo": "gossip", "topology": "hypercube"}, "topology", "'hypercube'"),
    ({"algo": "gossip", "topology": "random-regular"}, "topology", "'random-regular'"),
    ({"backend": "mpi"}, "backend", "'mpi'"),
    ({"device": "tpu"}, "device", "'tpu'"),
    ({"timeout": 0}, "timeout", "0"),
    ({"eval_every": 0}, "eval_every", "0"),
    ({"checkpoint_every": -1}, "checkpoint_every", "-1"),
    ({"grad_clip": -1.0}, "grad_clip", "-1.0"),
    ({"sync_every": 0}, "sync_every", "0"),
    ({"algo": "noloco", "noloco_alpha": 1.5}, "alpha", "1.5"),
    ({"algo": "fedavg", "client_fraction": 0.0}, "client_fraction", "0.0"),
    ({"algo": "gossip-vc", "vc_scope": "bogus"}, "vc_scope", "'bogus'"),
    # a field of another algorithm is an error, not silently ignored
    ({"algo": "fedavg", "outer_lr": 0.5}, "outer_lr", "0.5"),
    ({"algo": "fedavg", "topology": "ring"}, "topology", "'ring'"),
    ({"algo": "gossip", "vc_ratio": 0.5}, "vc_ratio", "0.5"),
    # refused before any process group forms (they were a traceback on rank 0 / ignored)
    ({"resume": True, "overwrite": True}, "overwrite", "True"),
    ({"resume_override": "seed"}, "resume_override", "'seed'"),
])
def test_invalid_values_name_field_and_value(fields: dict[str, Any], name: str,
                                             value: str) -> None:
    with pytest.raises(ValueError) as info:
        TrainConfig(**fields)
    msg = str(info.value)
    assert name in msg and value.strip("'") in msg, msg


def test_sim_crash_round_past_the_last_round_is_refused_by_the_config() -> None:
    # no node would crash; the fault schedule refuses it too, but only once the run is built
    from simulations.config import SimConfig

    with pytest.raises(ValueError, match=r"crash_round.*5.*\[0, rounds=2\)"):
        SimConfig(algo="fedavg", nodes=4, rounds=2, crash_fraction=0.5, crash_round=5)
    SimConfig(algo="fedavg", nodes=4, rounds=2, crash_round=5)  # no crash asked: nothing to miss
    SimConfig(algo="fedavg", nodes=4, rounds=2, crash_fraction=0.5, crash_round=1)


def test_frozen_and_keyword_only() -> None:
    cfg = TrainConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 5  # type: ignore[misc]
    with pytest.raises(TypeError):
        TrainConfig("fedavg")  # type: ignore[misc]


def test_every_field_is_a_flag_and_back() -> None:
    parser = build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    for f in dataclasses.fields(TrainConfig):
        assert field_flag(f.name) in flags
    assert field_flag("sync_every") == "--sync-every"
    argv = ["--algo", "diloco", "--task", "charlm", "--steps", "7", "--sync-every", "3",
            "--outer-lr", "0.5", "--outer-momentum", "0.8", "--no-nesterov", "--lr", "0.01",
            "--optimizer", "adam", "--batch-size", "8", "--seed", "3", "--grad-clip", "1",
            "--partition", "quantity:0.5", "--timeout", "9", "--eval-every", "2",
            "--checkpoint-every", "4", "--resume", "--backend", "gloo", "--device", "cpu",
            "--out", "runs/t", "--weight-decay", "0"]
    cfg = from_args(argv)
    assert cfg == TrainConfig(
        algo="diloco", task="charlm", steps=7, sync_every=3, outer_lr=0.5, outer_momentum=0.8,
        nesterov=False, lr=0.01, optimizer="adam", batch_size=8, seed=3, grad_clip=1.0,
        partition="quantity:0.5", timeout=9.0, eval_every=2, checkpoint_every=4, resume=True,
        backend="gloo", device="cpu", out="runs/t", weight_decay=0.0)
    assert from_args([]) == TrainConfig()


def test_algorithm_fields_have_flags_and_reach_the_algorithm_config() -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    for _, config_cls, _ in ALGORITHMS.values():
        for f in dataclasses.fields(config_cls):
            flag = {v: k for k, v in FLAG_FIELDS.items()}.get(f.name, f.name)
            assert flag in names or f.name in NOT_FLAGS, f.name
    assert names >= ALGO_FIELDS
    cfg = from_args(["--algo", "noloco", "--noloco-alpha", "0.3", "--noloco-beta", "0.6",
                     "--noloco-gamma", "0.4",
                     "--group-size", "4", "--sync-every", "20", "--seed", "5"])
    algo_cfg = cfg.algorithm_config()
    assert (algo_cfg.alpha, algo_cfg.beta, algo_cfg.gamma, algo_cfg.group_size,
            algo_cfg.sync_every, algo_cfg.seed) == (0.3, 0.6, 0.4, 4, 20, 5)
    vc = from_args(["--algo", "gossip-vc", "--gossip-beta", "0.3", "--vc-eps", "1e-6",
                    "--vc-ratio", "0.5", "--topology", "random-regular:4"]).algorithm_config()
    assert (vc.merge, vc.variance_correction, vc.self_weight, vc.vc_eps, vc.vc_ratio) == \
        ("beta", True, 0.3, 1e-6, 0.5)
    assert from_args(["--algo", "fedavg"]).algorithm_config().sync_every == 10  # its default


def test_applicable_fields() -> None:
    assert applicable_fields("fedavg") == {"sync_every", "client_fraction", "compress",
                                           "error_feedback"}
    assert {"topology", "topology_weights", "choco_gamma", "compress"} <= \
        applicable_fields("choco")
    assert {"topology", "topology_weights"} <= applicable_fields("dpsgd")
    assert "vc_scope" in applicable_fields("gossip-vc")
    assert "vc_scope" not in applicable_fields("gossip")


def test_compress_flags_reach_the_algorithm_config() -> None:
    cfg = from_args(["--algo", "diloco", "--compress", "int8", "--error-feedback"])
    algo_cfg = cfg.algorithm_config()
    assert (algo_cfg.compress, algo_cfg.error_feedback) == ("int8", True)
    with pytest.raises(ValueError, match="compress='int3'"):
        from_args(["--algo", "diloco", "--compress", "int3"])
    with pytest.raises(ValueError, match="error_feedback"):
        from_args(["--algo", "noloco", "--error-feedback"])  # nothing to feed back


@pytest.mark.parametrize(("algo", "optimizer", "lr", "sync_every"), [
    ("fedavg", "sgd", 0.2, 10),
    ("diloco", "adamw", 3e-3, 50),
    ("noloco", "adam", 3e-3, 50),
    ("gossip-vc", "sgd", 0.2, 1),
])
def test_resolved_defaults(algo: str, optimizer: str, lr: float, sync_every: int) -> None:
    task = get_task("digits")
    cfg = TrainConfig(algo=algo).resolved(task, 4)
    assert (cfg.optimizer, cfg.lr, cfg.sync_every) == (optimizer, lr, sync_every)
    assert cfg.batch_size == task.default_batch_size
    assert cfg.eval_every == (sync_every if 10 <= sync_every <= 50 else 50)
    assert (cfg.topology == "ring") == (algo == "gossip-vc")
    assert TrainConfig(algo=algo, lr=0.01).resolved(task, 4).lr == 0.01  # explicit value wins
    charlm = TrainConfig(algo="diloco", task="charlm").resolved(get_task("charlm"), 4)
    assert (charlm.optimizer, charlm.lr) == ("adamw", 3e-3)


def test_toml_file_loads_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('algo = "gossip-vc"\nsync-every = 4\ntopology = "random-regular:4"\n'
                    'lr = 0.1\nsteps = 50\nresume = true\n')
    assert configs.load_toml(TrainConfig, path)["sync_every"] == 4
    cfg = from_args(["--config", str(path), "--steps", "60", "--topology", "ring"])
    assert (cfg.algo, cfg.sync_every, cfg.topology, cfg.lr, cfg.steps, cfg.resume) == \
        ("gossip-vc", 4, "ring", 0.1, 60, True)
    assert TrainConfig.from_toml(path, steps=70).steps == 70


def test_toml_errors_name_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('algo = "fedavg"\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match="learning_rate") as info:
        from_args(["--config", str(path)])
    assert str(path) in str(info.value)
    path.write_text("steps = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        configs.load_toml(TrainConfig, path)
    path.write_text('steps = "many"\n')
    with pytest.raises(ValueError, match="steps='many'"):
        from_args(["--config", str(path)])
    with pytest.raises(ValueError, match="no such file"):
        configs.load_toml(TrainConfig, tmp_path / "missing.toml")


def test_cli_type_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        from_args(["--steps", "many"])
    assert info.value.code == 2
    assert "--steps" in capsys.readouterr().err
