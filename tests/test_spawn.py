"""launch.spawn and launch.store: the environment each rank gets, exit statuses, the standalone
store serving a client, the torchrun warning, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from launch.spawn import exit_status, spawn, torchrun_store_warning
from launch.store import parse_address

ROOT = Path(__file__).resolve().parents[1]


def test_every_rank_gets_torchruns_environment_and_its_status(tmp_path: Path) -> None:
    codes = spawn([str(tmp_path), "0", "0", "kill", "0"], nproc=4, module="tests.spawn_child")
    assert codes == {0: 0, 1: 0, 2: -signal.SIGKILL, 3: 0}
    assert exit_status(codes) == 0  # the survivors finished
    envs = [json.loads((tmp_path / f"env_{r}.json").read_text()) for r in range(4)]
    for r, env in enumerate(envs):
        assert env["RANK"] == env["LOCAL_RANK"] == str(r)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == "4"
        assert env["MASTER_ADDR"] == "127.0.0.1" and env["OMP_NUM_THREADS"] is not None
    assert len({(e["MASTER_PORT"], e["GOSSIP_STORE_PREFIX"]) for e in envs}) == 1


def test_exit_status_is_the_survivors_worst() -> None:
    assert exit_status({0: 0, 1: 3, 2: -9}) == 3
    assert exit_status({0: -9, 1: -9}) == 1  # nobody survived
    assert exit_status({0: 0, 1: 0}) == 0


def test_a_slice_of_a_larger_world_joins_a_standalone_store(tmp_path: Path) -> None:
    store = subprocess.Popen([sys.executable, "-m", "launch.store", "--port", "0",
                              "--host", "127.0.0.1"], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE)
    try:
        assert store.stdout is not None
        line = store.stdout.readline()
        assert line.startswith("launch.store: serving on 127.0.0.1:"), line
        address = line.split()[-1]
        client = dist.TCPStore("127.0.0.1", parse_address(address)[1], is_master=False,
                               timeout=timedelta(seconds=30))
        client.set("k", "v")
        assert client.get("k") == b"v"
        codes = spawn([str(tmp_path), "9", "9", "0", "0"], nproc=2, store=address,
                      world_size=4, first_rank=2, run_id="run-a", module="tests.spawn_child")
        assert codes == {2: 0, 3: 0}
        env = json.loads((tmp_path / "env_3.json").read_text())
        assert (env["WORLD_SIZE"], env["LOCAL_RANK"], env["GOSSIP_STORE_PREFIX"]) == \
            ("4", "1", "run-a")
        assert f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}" == address
    finally:
        store.send_signal(signal.SIGTERM)
        assert store.wait(timeout=30) == 0


def test_bad_input_names_the_field() -> None:
    with pytest.raises(ValueError, match="store='nohost' is invalid"):
        parse_address("nohost")
    with pytest.raises(ValueError, match="nproc=0 is invalid"):
        spawn([], nproc=0)
    with pytest.raises(ValueError, match="first_rank=3 with nproc=2 is invalid"):
        spawn([], nproc=2, world_size=4, first_rank=3, store="h:1", run_id="x")
    with pytest.raises(ValueError, match="pass --store"):
        spawn([], nproc=2, world_size=4)
    bad = subprocess.run([sys.executable, "-m", "launch.spawn", "--nproc", "2", "--",
                          "--steps", "0"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert bad.returncode == 2 and "steps=0 is invalid" in bad.stderr, bad.stderr


def test_survive_failures_under_torchrun_warns_about_the_store() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "x"}
    warning = torchrun_store_warning(torchrun, survive=True)
    assert warning is not None and "launch.spawn" in warning and "rank 0" in warning
    assert torchrun_store_warning(torchrun, survive=False) is None
    assert torchrun_store_warning({**torchrun, "GOSSIP_STORE_PREFIX": "r"}, survive=True) is None
    assert torchrun_store_warning({}, survive=True) is None
