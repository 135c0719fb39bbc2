"""Checkpoints of a simulated run: ``--checkpoint-every K`` writes them, ``--resume`` continues.

The format and its guarantees are a real run's (:mod:`gossip.checkpoint`): one file,
``checkpoints/step_<R>/rank_0.pt`` after round R, written atomically, then the ``latest`` marker
with the file's SHA-256 and the run's configuration; ``--keep-checkpoints`` prunes. The file
holds :meth:`simulations.engine.Simulation.state_dict` and the wall and CPU seconds the run had
taken. (``step`` counts rounds here, the simulator's unit.)

A resume (:func:`load`) continues bit for bit: the same models, records and figures as a run
that never stopped (tests/test_sim_checkpoint.py). It refuses, naming what differs, a marker or
file whose bytes changed, another algorithm, task or node count, a change of any field that
alters the trajectory (:func:`gossip.checkpoint.check_resume`, with the simulator's own
neutral fields: how it reports, evaluates and threads), and a run that has finished. The
records the dead process wrote after the checkpoint are dropped from ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gossip import checkpoint as ckpt
from simulations.config import SimConfig

if TYPE_CHECKING:
    from simulations.engine import Simulation

__all__ = ["NEUTRAL", "due", "load", "save", "sweep"]

#: Fields a resume may change besides :data:`gossip.checkpoint.NEUTRAL_FIELDS`: they change how
#: the run reports, evaluates and uses the machine, not its models.
NEUTRAL = frozenset({"progress", "threads", "save_models", "eval_nodes", "eval_samples",
                     "cuda_graphs", "address"})


def _meta(cfg: SimConfig) -> dict[str, Any]:
    return {"format": ckpt.FORMAT_VERSION, "kind": "simulation", "algo": cfg.algo,
            "task": cfg.task, "nodes": cfg.nodes}


def _config(cfg: SimConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in NEUTRAL}


def due(cfg: SimConfig, done: int) -> bool:
    """Whether a checkpoint is written after ``done`` rounds (not after the last)."""
    every = cfg.checkpoint_every
    return bool(every) and done % every == 0 and done < cfg.rounds


def save(sim: Simulation, done: int, wall_seconds: float, *, cpu_seconds: float = 0.0) -> Path:
    """Write the checkpoint of ``sim`` after ``done`` rounds into ``sim.cfg.out``, with the
    wall and CPU seconds the run's rounds had taken (a resumed run's go on from them)."""
    cfg = sim.cfg
    assert cfg.out is not None
    path = ckpt.rank_file(cfg.out, done, 0)
    state = {"meta": {**_meta(cfg), "rank": 0}, "step": done, "wall_seconds": wall_seconds,
             "cpu_seconds": cpu_seconds,
             **sim.state_dict()}
    ckpt.atomic_torch_save(state, path)
    ckpt.write_latest(cfg.out, done, {**_meta(cfg), "config": _config(cfg),
                                      "written": time.time()}, ranks=1)
    if cfg.keep_checkpoints:
        ckpt.prune(cfg.out, cfg.keep_checkpoints)
    return path


#: The temporary file :func:`gossip.metrics.atomic_write` writes beside ``<name>``.
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def sweep(out: str | Path) -> list[Path]:
    """Remove what a process killed while it wrote left in the run directory ``out``: the
    temporaries of atomic writes (a checkpoint's, the size of every node's model; models.pt's;
    the marker's), the step directories a killed prune had renamed ``.pruning_step_<s>`` and
    those newer than the marked checkpoint (the file written, the process killed before the
    marker: never read, and a prune never removes a directory newer than the marked one).
    Only while this process holds the directory (:class:`gossip.rundir.RunDir`): no writer
    is alive. Returns what was removed."""
    out = Path(out)
    base = ckpt.checkpoint_dir(out)
    found = [p for d in (out, base, *base.glob("step_*")) if d.is_dir()
             for p in d.iterdir() if _TEMPORARY.match(p.name) and p.is_file()]
    found += [p for p in base.glob(".pruning_step_*") if p.is_dir()]
    latest = ckpt.read_latest(out) if (base / "latest").is_file() else None
    if latest is not None:  # written by a process that died before it marked them
        found += [p for p in base.glob("step_*")
                  if p.is_dir() and p.name[5:].isdigit() and int(p.name[5:]) > int(latest["step"])]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def _check_records(metrics: Path, done: int) -> None:
    """ValueError unless ``metrics`` holds the ``round`` record of every round up to ``done``
    (the checkpoint's): the resumed run's summary is made of them (its rounds, node steps,
    rounds to 90 %), and without them it would be wrong and say nothing. Lines a kill cut
    short are skipped, as the resume drops them."""
    seen: set[int] = set()
    if metrics.exists():
        with open(metrics) as f:
            for line in f:
                if '"kind": "round"' not in line:  # eval rows (json.dumps' separators)
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("kind") == "round":
                    seen.add(record.get("round"))  # type: ignore[arg-type]
    missing = sorted(set(range(1, done + 1)) - seen)
    if missing:
        what = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        held = "does not exist" if not metrics.exists() else \
            f"lacks the records of rounds {what}"
        raise ValueError(f"{metrics} {held}; the checkpoint to resume is after round {done}, "
                         "and the resumed run's summary needs the record of every round up to "
                         "it: restore the file, or pass --overwrite to start the run again")


def load(cfg: SimConfig) -> dict[str, Any] | None:
    """The state to resume ``cfg`` from (None: start fresh, ``cfg.resume`` unset or no
    checkpoint in ``cfg.out``); ValueError naming what does not fit. Read before the rounds
    start; nothing is written here."""
    if not cfg.resume:
        return None
    assert cfg.out is not None
    out = Path(cfg.out)
    latest = ckpt.read_latest(out)
    if latest is None:
        return None
    marker = ckpt.checkpoint_dir(out) / "latest"
    summary = out / "summary.json"
    try:
        status = json.loads(summary.read_text()).get("status") if summary.exists() else None
    except (ValueError, AttributeError) as e:
        raise ValueError(f"out={str(out)!r} holds a corrupted {summary} ({type(e).__name__}: "
                         f"{e}): remove it to resume the run, or pass --overwrite to replace "
                         "it") from None
    if summary.exists() and status != "interrupted":
        raise ValueError(f"out={str(out)!r} holds a finished run ({summary}): nothing to "
                         "resume; pass --overwrite to replace it, or choose another --out")
    meta = _meta(cfg)
    differ = [k for k in ("kind", "algo", "task", "nodes") if latest.get(k) != meta[k]]
    if differ:
        theirs = ", ".join(f"{k}={latest.get(k)!r}" for k in differ)
        ours = ", ".join(f"{k}={meta[k]!r}" for k in differ)
        raise ValueError(f"checkpoint {marker} was written with {theirs}; this run has {ours}")
    # a changed field first: rounds=4 resuming the checkpoint of round 4 of a run of 6 is
    # "rounds: 6 -> 4", not a checkpoint outside the run
    ckpt.check_resume(latest.get("config", {}), _config(cfg), can_override=False)
    done = int(latest["step"])
    if not 0 < done < cfg.rounds:
        raise ValueError(f"checkpoint {marker} is after round {done}, not within rounds="
                         f"{cfg.rounds}")
    _check_records(out / "metrics.jsonl", done)
    path = ckpt.rank_file(out, done, 0)
    state = ckpt.load_rank_state(path, sha256=ckpt.expected_sha256(out, latest, path),
                                 expect={**meta, "rank": 0})
    return {**state, "path": str(path)}
