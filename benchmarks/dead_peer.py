"""Kill or freeze a rank mid-run for real and measure how the survivors cope.

Starts W ``launch.train --survive-failures`` ranks with ``launch.spawn`` (which hosts the store in
its own process, so any rank, rank 0 included, may die), waits until the victim has passed
``--kill-at`` steps, then SIGKILLs it (``kill``) or SIGSTOPs it (``freeze``: the process stays,
silent), and reports per algorithm and mode:

- ``seconds_to_detect``: from the signal to the first survivor's ``death`` record of the victim;
- ``seconds_to_return``: from the signal until ``launch.spawn`` returned (every survivor finished
  or failed, the frozen rank killed after ``--dead-after`` s of silence);
- ``exit_codes`` of the survivors and the spawn's own ``status``;
- for noloco and the gossip family: ``survivors`` and the ranks ``summary.json`` names ``dead``,
  their mean final accuracy; fedavg and diloco survivors fail fast (exit 3) naming the dead rank.

    python benchmarks/dead_peer.py --algos noloco,gossip,gossip-vc,fedavg,diloco --modes kill,freeze
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gossip.metrics import read_jsonl
from launch.spawn import exit_status, spawn

SIGNALS = {"kill": signal.SIGKILL, "freeze": signal.SIGSTOP}


def _victim_step(path: Path) -> int:
    if not path.exists():
        return 0
    return max((r["step"] for r in read_jsonl(path)), default=0)


def run_case(algo: str, *, mode: str = "kill", world: int = 4, victim: int = 2,
             steps: int = 3000, kill_at: int = 600, timeout: float = 20.0,
             dead_after: float = 3.0, out: Path, extra: list[str] | None = None
             ) -> dict[str, Any]:
    """Run one algorithm under launch.spawn, signal ``victim`` after step ``kill_at``."""
    if mode not in SIGNALS:
        raise ValueError(f"mode={mode!r} is invalid: expected one of {sorted(SIGNALS)}")
    run_dir = out / f"{algo}_{mode}"
    argv = ["--algo", algo, "--task", "digits", "--steps", str(steps), "--sync-every", "10",
            "--eval-every", "50", "--out", str(run_dir), "--survive-failures",
            "--timeout", str(timeout), "--dead-after", str(dead_after), *(extra or [])]
    if algo in ("dpsgd", "gossip", "gossip-vc"):
        argv += ["--topology", "ring"]
    started: dict[str, Any] = {}
    signalled = threading.Event()

    def watch() -> None:
        victim_file = run_dir / "ranks" / f"rank_{victim}.jsonl"
        while "procs" not in started or _victim_step(victim_file) < kill_at:
            if "procs" in started and started["procs"][victim].poll() is not None:
                return  # it ended before the kill: reported below
            time.sleep(0.02)
        started["procs"][victim].send_signal(SIGNALS[mode])
        started["t"] = time.time()
        signalled.set()

    threading.Thread(target=watch, daemon=True).start()
    codes = spawn(argv, nproc=world, dead_after=dead_after, log_dir=out / f"{algo}_{mode}_logs",
                  on_start=lambda procs: started.update(procs=procs))
    t_end = time.time()
    if not signalled.is_set():
        raise RuntimeError(f"{algo}: rank {victim} never reached step {kill_at}: exit codes "
                           f"{codes}")
    t_signal = started["t"]
    survivors = {r: c for r, c in codes.items() if r != victim}
    result: dict[str, Any] = {"algo": algo, "mode": mode, "world_size": world,
                              "victim": victim, "signalled_after_step": kill_at,
                              "exit_codes": survivors, "status": exit_status(codes),
                              "seconds_to_return": round(t_end - t_signal, 2)}
    deaths = [r for path in (run_dir / "ranks").glob("rank_*.jsonl") for r in read_jsonl(path)
              if r["kind"] == "death" and r["node"] == victim]
    if deaths:
        result["seconds_to_detect"] = round(min(r["unix_time"] for r in deaths) - t_signal, 2)
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        result["dead"] = [d["rank"] for d in summary.get("deaths", [])]
        result["survivors"] = summary.get("survivors")
        result["final_accuracy_mean"] = summary.get("final_accuracy_mean")
    logs = out / f"{algo}_{mode}_logs"
    result["errors_name_dead_rank"] = all(
        f"[{victim}] died" in (logs / f"rank_{r}.log").read_text(errors="replace")
        for r, c in survivors.items() if c)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algos", default="noloco,gossip,gossip-vc,fedavg,diloco")
    ap.add_argument("--modes", default="kill,freeze")
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
            for mode in args.modes.split(","):
                res = run_case(algo, mode=mode, world=args.world_size, victim=args.victim,
                               steps=args.steps, kill_at=args.kill_at, timeout=args.timeout,
                               dead_after=args.dead_after, out=out)
                print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
