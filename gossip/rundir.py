"""One run owns its run directory: a lock for the run's life, no silent mixing of two runs.

Used by the real launcher (rank 0) and the simulator alike::

    with RunDir(out, resume=cfg.resume, overwrite=cfg.overwrite) as run_dir:
        ...                                   # write config.json, metrics.jsonl, checkpoints
        run_dir.write_summary(summary)         # only at a successful end ("status": "finished")
    # on Ctrl-C / SIGTERM instead: run_dir.write_interrupted(last_step)

- :meth:`RunDir.acquire` takes an advisory ``fcntl`` lock on ``<out>/.lock`` (held until
  :meth:`release` or the process dies) and writes the holder's PID in it: a second run into the
  same directory is refused naming that PID.
- A fresh run into a directory that holds another run (its config, metrics, summary,
  checkpoints or per-rank records) is refused unless ``overwrite``, which removes those files
  first (and nothing else). ``resume`` continues the run there; with nothing to resume from
  (no checkpoint) and another run's files there, it is refused too. An executor that cannot
  resume (the simulator) leaves ``resume`` at None, and its refusals do not suggest it.
- Every file is written with the same mode: 0666 less the umask (see
  :func:`gossip.metrics.atomic_write`).

Every refusal is a ValueError naming the directory, raised before anything is written.
:func:`interrupted_report` is the one line a command prints on Ctrl-C: what it kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from gossip.metrics import atomic_write_text, iter_jsonl, to_jsonable

__all__ = ["LOCK_NAME", "RUN_FILES", "RunDir", "check_creatable", "interrupt_on_signal",
           "interrupted_report", "run_files"]

LOCK_NAME = ".lock"
#: What a run writes in its directory (plots are ``*.png``); ``--overwrite`` removes these only.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints", "ranks")


def run_files(path: str | os.PathLike[str]) -> list[Path]:
    """The files and folders of a run in ``path`` (sorted; empty when it holds none)."""
    root = Path(path)
    if not root.is_dir():
        return []
    found = [root / name for name in RUN_FILES if (root / name).exists()]
    return sorted(found + list(root.glob("*.png")))


class RunDir:
    """The run directory ``path`` of one run (see the module doc).

    Args:
        path: the directory (created if missing).
        resume: the run continues the one in ``path`` (from its checkpoints); None (the
            default): the executor cannot resume (the simulator), so a refusal does not
            suggest ``--resume``.
        overwrite: the run replaces the one in ``path`` (its files are removed at acquire).
    """

    def __init__(self, path: str | os.PathLike[str], *, resume: bool | None = None,
                 overwrite: bool = False) -> None:
        if resume and overwrite:
            raise ValueError("resume=True and overwrite=True exclude each other: continue the "
                             f"run in {path} or replace it, not both")
        self.path = Path(path)
        self.resume = bool(resume)
        self.resumable = resume is not None
        self.overwrite = overwrite
        self._fd: int | None = None
        #: the highest directory acquire created (release may take it away), else None
        self._created: Path | None = None

    # ------------------------------------------------------------------ ownership

    def check(self) -> None:
        """The refusals :meth:`acquire` would give for what the directory holds (a file in its
        place, another run's files), creating and locking nothing: for a caller to check
        before work that takes long (a simulation's build), then :meth:`acquire`."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"out={str(self.path)!r} is invalid: it is a file, expected a "
                             "directory")
        if self.path.is_dir():
            self._check()
            if not os.access(self.path, os.W_OK | os.X_OK):  # (a read-only mount: EROFS)
                raise ValueError(f"out={str(self.path)!r} is invalid: it is not writable, "
                                 "expected a directory the run can write in")
            return
        check_creatable(self.path)

    def acquire(self) -> RunDir:
        """Lock the directory and check what it holds; ValueError (nothing written) if refused."""
        if self._fd is not None:
            return self
        self.check()  # (again below, under the lock)
        created = None
        if not self.path.exists():
            created = self.path.absolute()
            while not created.parent.exists():
                created = created.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # (a place check() cannot see: a read-only file system, /proc)
            raise ValueError(f"out={str(self.path)!r} is invalid: cannot create it "
                             f"({e.strerror})") from None
        lock = self.path / LOCK_NAME
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"out={str(self.path)!r} is in use by another run (PID {holder}): "
                             "wait for it to end or choose another --out") from None
        try:
            self._check()
        except BaseException:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._created = created
        if self.overwrite:
            for item in run_files(self.path):
                if item.is_dir():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        return self

    def _check(self) -> None:
        found = run_files(self.path)
        if not found or self.overwrite:
            return
        names = ", ".join(p.name for p in found)
        if not self.resume:
            what = "a finished run" if (self.path / "summary.json").exists() else "another run"
            advice = "--resume to continue it, " if self.resumable else ""
            raise ValueError(f"out={str(self.path)!r} holds {what} ({names}): pass {advice}"
                             "--overwrite to replace it, or choose another --out")
        marker = self.path / "checkpoints" / "latest"
        # (an empty step directory is a checkpoint that was never written: a full disk)
        steps = [] if marker.exists() else sorted(
            (p.name for p in marker.parent.glob("step_*") if not p.is_dir() or any(
                p.iterdir())), key=lambda n: (len(n), n))
        if steps:  # the marker deleted or lost: say so, not "without a checkpoint"
            raise ValueError(f"out={str(self.path)!r} holds checkpoints ({', '.join(steps)}) "
                             f"but no marker {marker}, the manifest --resume checks their "
                             "files against: restore it, or pass --overwrite to replace the "
                             "run, or choose another --out")
        if not marker.exists():
            raise ValueError(f"out={str(self.path)!r} holds a run without a checkpoint to "
                             f"resume from ({names}): pass --overwrite to replace it, or choose "
                             "another --out")

    def release(self) -> None:
        """Give the directory up (the lock file stays, empty). A directory that :meth:`acquire`
        created and that holds nothing but the lock (a run refused before it wrote anything: a
        bad optimizer argument, a task that cannot be imported) is removed, so a refused run
        without ``--out`` leaves no empty ``runs/<UTC time>``."""
        if self._fd is None:
            return
        if self._created is not None and [p.name for p in self.path.iterdir()] == [LOCK_NAME]:
            try:  # (another process may have put something there meanwhile: then it stays)
                (self.path / LOCK_NAME).unlink()  # still locked: no other run holds it
                self.path.rmdir()
                for parent in self.path.absolute().parents:  # the parents acquire made
                    if not parent.is_relative_to(self._created) or any(parent.iterdir()):
                        break
                    parent.rmdir()
            except OSError:
                pass
        os.ftruncate(self._fd, 0)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDir:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ the end of a run

    def _write_json(self, name: str, value: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / name,
                          json.dumps(to_jsonable(value), indent=2, sort_keys=True) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """summary.json of a run that ended well (``"status": "finished"``)."""
        self._write_json("summary.json", {**summary, "status": "finished"})

    def write_interrupted(self, last_step: int, **extra: Any) -> None:
        """summary.json of a run stopped by Ctrl-C or SIGTERM after ``last_step``."""
        self._write_json("summary.json", {**extra, "status": "interrupted",
                                          "last_step": int(last_step)})


def check_creatable(path: str | os.PathLike[str]) -> None:
    """Refuse (``ValueError`` naming ``out``) a ``path`` to be created whose nearest existing
    ancestor is a file or a directory this process cannot write in (a read-only mount): else
    the ``mkdir`` or the write fails with an OSError that names no flag, after the work."""
    path = Path(path)
    parent = next((q for q in path.absolute().parents if q.exists()), Path("/"))
    if not parent.is_dir():
        raise ValueError(f"out={str(path)!r} is invalid: {parent} is a file, expected a "
                         "directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"out={str(path)!r} is invalid: {parent} is not writable, expected a "
                         "directory this process can write in")


def interrupt_on_signal(signum: int, _frame: object) -> None:
    """A signal handler (for SIGTERM: a scheduler's or a timeout's ``kill``) that ends a run like
    Ctrl-C: ``summary.json`` says interrupted and the command names what it kept."""
    raise KeyboardInterrupt(f"signal {signum}")


def interrupted_report(paths: Iterable[str | os.PathLike[str]], *,
                       reason: str = "interrupted") -> str:
    """The one line a command prints when Ctrl-C (or ``reason``: a full disk) stopped it: each
    run directory it kept, with its status (``summary.json``), the records in its
    ``metrics.jsonl`` and the checkpoint a ``--resume`` would continue from; "nothing was
    written" when there is none."""
    parts = []
    for path in paths:
        root = Path(path)
        if not (root / "summary.json").exists() and not (root / "metrics.jsonl").exists():
            continue
        try:
            summary = json.loads((root / "summary.json").read_text())
        except (OSError, ValueError):
            summary = {}
        status = summary.get("status", "unfinished")
        if status == "interrupted":
            unit = "step" if "steps" in summary else "round"
            total = summary.get("steps", summary.get("rounds"))
            status = f"marked interrupted at {unit} {summary.get('last_step')} of {total}"
        metrics = root / "metrics.jsonl"
        records = sum(1 for _ in iter_jsonl(metrics)) if metrics.exists() else 0
        latest = root / "checkpoints" / "latest"
        resume = "" if status == "finished" else ", no checkpoint: --overwrite starts it again"
        if latest.exists():
            try:
                marker = json.loads(latest.read_text())
                # the simulator's checkpoints count rounds (simulations.checkpoint)
                unit = "round" if marker.get("kind") == "simulation" else "step"
                resume = f", --resume continues from {unit} {marker['step']}"
            except (OSError, ValueError, KeyError):
                resume = ""
        parts.append(f"{root} ({status}, {records} records{resume})")
    if not parts:
        return f"{reason}: nothing was written"
    return f"{reason}: kept " + "; ".join(parts)
