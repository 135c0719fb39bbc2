"""Checkpoints: atomic writes, corrupted files, mismatched runs (unit and real Gloo ranks)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gossip import checkpoint as ckpt
from gossip.flat import FlatParams
from gossip.rundir import LOCK_NAME
from tests.distributed import run_ranks


def _state(world_size: int = 4, algo: str = "fedavg", rank: int = 0) -> dict[str, Any]:
    model = nn.Linear(3, 2)
    params = FlatParams.from_module(model)
    opt = torch.optim.Adam(params.params, lr=1e-3)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    return {
        "meta": {"format": ckpt.FORMAT_VERSION, "algo": algo, "task": "digits",
                 "world_size": world_size, "rank": rank},
        "step": 7,
        "params": ckpt.params_state(params),
        "optimizer": opt.state_dict(),
        "algorithm": {"rounds": 3},
        "data": {"epoch": 1, "offset": 2},
        "rng": ckpt.capture_rng(),
        "launcher": {},
    }


def _files(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: content hash and mtime (to prove nothing was touched)."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


# ----------------------------------------------------------------------------- unit


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    path = ckpt.rank_file(tmp_path, 7, 0)
    state = _state()
    ckpt.atomic_torch_save(state, path)
    assert path == tmp_path / "checkpoints" / "step_7" / "rank_0.pt"
    loaded = ckpt.load_rank_state(path, expect=state["meta"])
    assert loaded["step"] == 7 and loaded["algorithm"] == {"rounds": 3}
    assert all(torch.equal(a, b) for a, b in zip(loaded["params"], state["params"], strict=True))
    model = nn.Linear(3, 2)
    params = FlatParams.from_module(model)
    ckpt.restore_params(params, loaded["params"])
    assert torch.equal(next(params.buffers()), state["params"][0])


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    ckpt.atomic_torch_save({"v": torch.tensor([1.0])}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises
        ckpt.atomic_torch_save({"v": lambda: 0}, path)  # not picklable: fails mid-write
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]  # no temporary file left


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_file_raises_value_error_naming_it(tmp_path: Path, damage: str) -> None:
    path = ckpt.rank_file(tmp_path, 7, 0)
    ckpt.atomic_torch_save(_state(), path)
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00junk" * 50,
                      "empty": b""}[damage])
    with pytest.raises(ValueError, match="truncated or corrupted") as info:
        ckpt.load_rank_state(path)
    assert str(path) in str(info.value)


def test_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist") as info:
        ckpt.load_rank_state(tmp_path / "nope.pt")
    assert "nope.pt" in str(info.value)
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a gossip checkpoint"):
        ckpt.load_rank_state(path)


@pytest.mark.parametrize(("key", "saved", "wanted"), [
    ("world_size", 4, 2),
    ("algo", "fedavg", "diloco"),
])
def test_mismatch_names_both_values(tmp_path: Path, key: str, saved: Any, wanted: Any) -> None:
    path = tmp_path / "rank_0.pt"
    ckpt.atomic_torch_save(_state(**{key: saved}), path)
    with pytest.raises(ValueError) as info:
        ckpt.load_rank_state(path, expect={key: wanted})
    msg = str(info.value)
    assert f"{key}={saved!r}" in msg and f"{key}={wanted!r}" in msg and str(path) in msg


def test_restore_params_checks_shapes() -> None:
    params = FlatParams.from_module(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="buffer 0"):
        ckpt.restore_params(params, [torch.zeros(1, 5)])
    with pytest.raises(ValueError, match="2 parameter buffers, the model has 1"):
        ckpt.restore_params(params, [torch.zeros(1, 8), torch.zeros(1, 8)])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_latest_marker_is_the_manifest(tmp_path: Path) -> None:
    assert ckpt.read_latest(tmp_path) is None
    for r in range(2):
        ckpt.atomic_torch_save(_state(2, rank=r), ckpt.rank_file(tmp_path, 10, r))
    ckpt.write_latest(tmp_path, 10, {"algo": "fedavg", "world_size": 2}, ranks=2)
    # a later checkpoint that only some ranks wrote is not marked
    ckpt.atomic_torch_save(_state(), ckpt.rank_file(tmp_path, 20, 0))
    files = {f"step_10/rank_{r}.pt": _sha(ckpt.rank_file(tmp_path, 10, r)) for r in range(2)}
    assert ckpt.read_latest(tmp_path) == {"step": 10, "algo": "fedavg", "world_size": 2,
                                          "files": files}
    (tmp_path / "checkpoints" / "latest").write_text("{half")
    with pytest.raises(ValueError, match="latest"):
        ckpt.read_latest(tmp_path)
    (tmp_path / "checkpoints" / "latest").write_text('{"step": 10}')  # no manifest
    with pytest.raises(ValueError, match="no manifest"):
        ckpt.read_latest(tmp_path)


def test_one_flipped_payload_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = ckpt.rank_file(tmp_path, 10, 0)
    ckpt.atomic_torch_save(_state(1), path)
    ckpt.write_latest(tmp_path, 10, {"world_size": 1}, ranks=1)
    latest = ckpt.read_latest(tmp_path)
    assert latest is not None
    digest = ckpt.expected_sha256(tmp_path, latest, path)
    ckpt.load_rank_state(path, sha256=digest)  # intact: loads
    data = bytearray(path.read_bytes())
    i = data.index(b"data/0") + 200  # inside the first tensor's storage, size unchanged
    data[i] ^= 0x01
    path.write_bytes(bytes(data))
    torch.load(path, weights_only=True)  # the bug: torch itself loads it without a word
    with pytest.raises(ValueError, match="SHA-256") as info:
        ckpt.load_rank_state(path, sha256=digest)
    assert str(path) in str(info.value) and digest in str(info.value)
    with pytest.raises(ValueError, match="not in the manifest"):
        ckpt.expected_sha256(tmp_path, latest, ckpt.rank_file(tmp_path, 10, 1))


_OLD = {"seed": 0, "lr": 0.001, "partition": "iid", "algo": "noloco", "beta": 0.7,
        "batch_size": 32, "world_size": 4, "steps": 100, "out": "runs/a", "timeout": 300.0}


def test_check_resume_refuses_trajectory_changes_listing_old_and_new() -> None:
    new = {**_OLD, "seed": 1, "lr": 0.01, "world_size": 2, "beta": 0.9}
    with pytest.raises(ValueError) as info:
        ckpt.check_resume(_OLD, new)
    msg = str(info.value)
    for part in ("seed: 0 -> 1", "lr: 0.001 -> 0.01", "world_size: 4 -> 2", "beta: 0.7 -> 0.9",
                 "--resume-override"):
        assert part in msg, msg
    # only the overridden ones pass; the others are still refused
    with pytest.raises(ValueError) as info:
        ckpt.check_resume(_OLD, new, ["lr"])
    assert "lr:" not in str(info.value) and "seed: 0 -> 1" in str(info.value)


def test_check_resume_accepts_neutral_and_overridden_changes() -> None:
    longer = {**_OLD, "steps": 400, "out": "runs/b", "timeout": 60.0}
    assert ckpt.check_resume(_OLD, longer) == []
    changes = ckpt.check_resume(_OLD, {**longer, "lr": 0.01, "partition": "dirichlet:0.5"},
                                ["lr", "partition"])
    assert changes == [{"field": "lr", "old": 0.001, "new": 0.01},
                       {"field": "partition", "old": "iid", "new": "dirichlet:0.5"}]
    with pytest.raises(ValueError, match=r"resume_override.*'sed'"):
        ckpt.check_resume(_OLD, _OLD, ["sed"])


# ----------------------------------------------------------------------------- real ranks


def _train(comm: Any, fields: dict[str, Any]) -> Any:
    from launch.config import TrainConfig
    from launch.train import train

    return train(TrainConfig(**fields), comm)


def _failure(world_size: int, fields: dict[str, Any]) -> str:
    with pytest.raises(AssertionError) as info:
        run_ranks(_train, world_size, fields, timeout=180)
    return str(info.value)


@pytest.mark.slow
def test_failed_resumes_name_the_problem_and_touch_nothing(tmp_path: Path) -> None:
    base = {"algo": "fedavg", "task": "digits", "steps": 4, "sync_every": 2, "eval_every": 2,
            "checkpoint_every": 2, "out": str(tmp_path)}
    summary = run_ranks(_train, 1, base, timeout=180)[0]
    assert summary["steps"] == 4 and ckpt.read_latest(tmp_path)["step"] == 4
    before = _files(tmp_path)

    msg = _failure(2, {**base, "algo": "diloco", "steps": 6, "resume": True})
    assert "world_size=1" in msg and "world_size=2" in msg
    assert "algo='fedavg'" in msg and "algo='diloco'" in msg
    msg = _failure(1, {**base, "steps": 6})  # not --resume: refuses to mix two runs
    assert "--resume" in msg
    assert _files(tmp_path) == before

    path = ckpt.rank_file(tmp_path, 4, 0)
    path.write_bytes(path.read_bytes()[:100])
    before = _files(tmp_path)
    msg = _failure(1, {**base, "steps": 6, "resume": True})
    assert str(path) in msg and "corrupted" in msg  # the manifest catches it first
    assert _files(tmp_path) == before


@pytest.mark.slow
def test_resume_checks_bytes_and_trajectory_and_records_overrides(tmp_path: Path) -> None:
    base = {"algo": "fedavg", "task": "digits", "steps": 4, "sync_every": 2, "eval_every": 2,
            "checkpoint_every": 2, "out": str(tmp_path)}
    run_ranks(_train, 1, base, timeout=180)
    path = ckpt.rank_file(tmp_path, 4, 0)
    intact = path.read_bytes()
    data = bytearray(intact)
    data[data.index(b"data/0") + 200] ^= 0x01  # one payload byte, size unchanged
    path.write_bytes(bytes(data))
    before = _files(tmp_path)
    msg = _failure(1, {**base, "steps": 6, "resume": True})
    assert str(path) in msg and "SHA-256" in msg
    assert _files(tmp_path) == before
    path.write_bytes(intact)

    before = _files(tmp_path)
    msg = _failure(1, {**base, "steps": 6, "resume": True, "seed": 3, "lr": 0.5})
    assert "seed: 0 -> 3" in msg and "lr:" in msg and "--resume-override" in msg
    assert _files(tmp_path) == before

    run_ranks(_train, 1, {**base, "steps": 6, "resume": True, "seed": 3,
                          "resume_override": "seed"}, timeout=180)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["resume_changes"] == [{"field": "seed", "old": 0, "new": 3, "step": 4}]
    assert config["train"]["seed"] == 3

    # an override of a field that shapes the algorithm's saved state: named, not a bare KeyError
    before = _files(tmp_path)
    msg = _failure(1, {**base, "steps": 8, "resume": True, "seed": 3, "compress": "int8",
                       "resume_override": "compress"})
    assert str(ckpt.rank_file(tmp_path, 6, 0)) in msg
    assert "state was saved without compression, this fedavg has compress='int8'" in msg
    assert "compress: None -> 'int8' alter the state the algorithm saved" in msg
    assert _files(tmp_path) == before


@pytest.mark.slow
def test_a_resumed_real_run_shows_each_step_once_in_tensorboard(tmp_path: Path) -> None:
    """Steps 5-6 were recorded past the checkpoint of step 4 (the run died before its
    checkpoint of step 6 was marked: emulated by taking that checkpoint back); resumed from it
    to step 8, the TensorBoard scalars hold every step once, as metrics.jsonl does."""
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    base = {"algo": "fedavg", "task": "digits", "steps": 6, "sync_every": 2, "eval_every": 2,
            "checkpoint_every": 2, "tensorboard": True, "out": str(tmp_path)}
    run_ranks(_train, 2, base, timeout=180)
    latest = ckpt.read_latest(tmp_path)
    assert latest is not None and latest["step"] == 6
    for rank in range(2):
        ckpt.rank_file(tmp_path, 6, rank).unlink()
    meta = {k: v for k, v in latest.items() if k not in ("step", "files")}
    ckpt.write_latest(tmp_path, 4, meta, ranks=2)
    run_ranks(_train, 2, {**base, "steps": 8, "resume": True}, timeout=180)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    acc = tb.EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    for kind, key, node in (("eval", "loss", 1), ("sync", "train_loss", 0)):
        want = [r for r in rows if r["kind"] == kind and r.get("node") == node]
        assert [r["step"] for r in want] == [2, 4, 6, 8]  # metrics.jsonl: once each
        events = acc.Scalars(f"{kind}/{key}/node{node}")
        assert [e.step for e in events] == [2, 4, 6, 8]
        assert [e.value for e in events] == pytest.approx([r[key] for r in want])
