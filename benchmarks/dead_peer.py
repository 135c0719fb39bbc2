"""Kill a rank mid-run for real and measure how the survivors cope.

Starts W ``python -m launch.train --survive-failures`` processes (one per rank) around a
TCPStore that this driver hosts (``TORCHELASTIC_USE_AGENT_STORE=True``: the store outlives any
worker, as torchrun's agent store does), waits until the victim has passed ``--kill-at`` steps,
SIGKILLs it, and reports per algorithm:

- noloco / gossip family: seconds from the kill until a survivor noticed (its ``death`` record),
  whether all survivors finished, their mean final accuracy, and the deaths in ``summary.json``;
- fedavg / diloco: seconds from the kill until each survivor exited, their exit codes, and
  whether every survivor's error named the dead rank.

    python benchmarks/dead_peer.py --algos noloco,gossip-vc,fedavg,diloco
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.distributed as dist

from gossip.metrics import read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _victim_step(path: Path) -> int:
    if not path.exists():
        return 0
    return max((r["step"] for r in read_jsonl(path)), default=0)


def run_case(algo: str, *, world: int = 4, victim: int = 2, steps: int = 3000,
             kill_at: int = 600, timeout: float = 20.0, dead_after: float = 3.0,
             out: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """Run one algorithm, kill ``victim`` after step ``kill_at``, return the measurements."""
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=True,
                          timeout=timedelta(seconds=60), wait_for_workers=False)
    run_dir = out / algo
    argv = [sys.executable, "-m", "launch.train", "--algo", algo, "--task", "digits",
            "--steps", str(steps), "--sync-every", "10", "--eval-every", "100",
            "--out", str(run_dir), "--survive-failures", "--timeout", str(timeout),
            "--dead-after", str(dead_after), *(extra or [])]
    if algo in ("dpsgd", "gossip", "gossip-vc"):
        argv += ["--topology", "ring"]
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "0",
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        log = open(out / f"{algo}_rank{rank}.log", "wb")  # noqa: SIM115 - closed below
        logs.append(log)
        procs.append(subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=log))
    try:
        victim_file = run_dir / "ranks" / f"rank_{victim}.jsonl"
        deadline = time.monotonic() + 240
        while _victim_step(victim_file) < kill_at:
            if time.monotonic() > deadline or procs[victim].poll() is not None:
                raise RuntimeError(f"{algo}: rank {victim} never reached step {kill_at}")
            time.sleep(0.02)
        procs[victim].send_signal(signal.SIGKILL)
        t_kill = time.time()
        exits: dict[int, float] = {}
        codes: dict[int, int] = {}
        deadline = time.monotonic() + 240
        while len(exits) < world - 1 and time.monotonic() < deadline:
            for r, p in enumerate(procs):
                if r != victim and r not in exits and p.poll() is not None:
                    exits[r] = time.time() - t_kill
                    codes[r] = p.returncode
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
        del store
    result: dict[str, Any] = {"algo": algo, "world_size": world, "victim": victim,
                              "killed_after_step": kill_at, "exit_codes": codes,
                              "seconds_to_exit": {r: round(t, 2) for r, t in exits.items()}}
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        result["deaths"] = summary.get("deaths")
        result["survivors"] = summary.get("survivors")
        result["final_accuracy_mean"] = summary.get("final_accuracy_mean")
        if summary.get("deaths"):
            result["seconds_to_detect"] = round(summary["deaths"][0]["unix_time"] - t_kill, 2)
    logs_text = {r: (out / f"{algo}_rank{r}.log").read_text(errors="replace")
                 for r in exits}
    result["errors_name_dead_rank"] = all(
        f"[{victim}] died" in logs_text[r] for r in exits if codes.get(r))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="noloco,gossip-vc,fedavg,diloco")
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--victim", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--kill-at", type=int, default=600)
    ap.add_argument("--timeout", type=float, default=20.0)
    ap.add_argument("--dead-after", type=float, default=3.0)
    ap.add_argument("--out", default=None, help="run directories (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        for algo in args.algos.split(","):
            res = run_case(algo, world=args.world_size, victim=args.victim, steps=args.steps,
                           kill_at=args.kill_at, timeout=args.timeout,
                           dead_after=args.dead_after, out=out)
            print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
