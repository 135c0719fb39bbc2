"""Run directories: resolved config, metrics.jsonl, summary.json (atomic writes), plots.

Layout of a run directory::

    config.json     the resolved configuration
    metrics.jsonl   one JSON object per line, the schema of :mod:`gossip.records`
    summary.json    final figures
    *.png           plots
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["LOAD_COLUMNS", "RunWriter", "append_jsonl", "atomic_write", "atomic_write_text",
           "iter_jsonl", "load_runs", "read_jsonl", "to_jsonable", "truncate_jsonl"]


def to_jsonable(value: Any) -> Any:
    """Plain JSON types: tensors/arrays to lists, NaN/inf to None, dataclasses to dicts."""
    import dataclasses

    kind = type(value)  # plain types first: every record goes through here
    if kind is dict:
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if kind is float:
        return value if math.isfinite(value) else None
    if kind in (int, str, bool) or value is None:
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return to_jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync it, rename it over
    ``path`` and fsync the directory: a crash leaves the old file or the new one, never half.
    The file gets mode 0666 less the umask, like every file of a run directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mode 0666 less the umask, as open() gives metrics.jsonl (mkstemp would give 0600)
    tmp = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = no_space(path, e)  # read before the temporary goes: the disk is as it failed
        Path(tmp).unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    _fsync_dir(path.parent)


#: errnos of a write that found no room: the device is full, or the user's quota is
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NEARLY_FULL = 1 << 20  # bytes free under which a failed write is taken to be a full disk


def no_space(path: str | os.PathLike[str], error: BaseException) -> OSError | None:
    """The error to raise for a write of ``path`` that failed with ``error`` because its file
    system is full (None: another failure).
    Python's own writes say so (``ENOSPC``, ``EDQUOT``); ``torch.save``'s writer reports a
    position mismatch instead, with the OS's error as its context (read first: free space may
    be back by the time this looks, a peer's half-written file removed), and a failure while
    less than 1 MiB is free counts too."""
    path = Path(path)
    if _no_space_in(error) is None:
        if not isinstance(error, (OSError, RuntimeError)):
            return None
        try:
            if shutil.disk_usage(path.parent).free >= _NEARLY_FULL:
                return None
        except OSError:
            return None
    return OSError(errno.ENOSPC, f"no space left on the device of {path.parent}: could not "
                   f"write {path.name} (the file it would replace, if any, is intact)")


def _no_space_in(error: BaseException) -> OSError | None:
    """The full disk's OSError that ``error`` is, or that it was raised from or while handling
    (``torch.save`` raises "unexpected pos" while the OS's ENOSPC or EDQUOT is its context)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError) and e.errno in NO_SPACE:
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def no_space_message(error: OSError, where: str | os.PathLike[str] | None = None) -> str:
    """What a command prints of a full disk's ``error`` (see :data:`NO_SPACE`): its text and,
    for an error straight from the OS, the file it could not write (or, when the error does not
    name it, the directory ``where`` the command was writing)."""
    if error.filename and str(error.filename) not in str(error.strerror):
        return f"{error.strerror}: {error.filename}"
    if where is not None and "device of" not in str(error.strerror):
        return f"{error.strerror} (writing into {where})"
    return str(error.strerror)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """:func:`atomic_write` of a text."""
    atomic_write(path, lambda f: f.write(text.encode()))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a JSON-lines file.

    Every record is written with its newline, so a last line without one is a record still
    being written (by a live process) or cut short (by a killed one): it is skipped. A broken
    line anywhere else is corruption and raises.
    """
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """:func:`read_jsonl` one record at a time (a run's records need not fit in memory)."""
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                return
            if line.strip():
                yield json.loads(line)


def append_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Append ``records`` to ``path`` with one ``write`` call, so that a concurrent reader or a
    kill sees whole lines or, at worst, one unterminated tail that :func:`read_jsonl` skips."""
    data = "".join(json.dumps(to_jsonable(r)) + "\n" for r in records).encode()
    if not data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def truncate_jsonl(path: str | os.PathLike[str], step: int) -> None:
    """Drop the records past ``step`` (written after the checkpoint a run resumes from, by the
    process that then died) and any line cut short; atomic (a kill leaves the old file)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


class RunWriter:
    """Writes one run directory. With ``enabled=False`` (non-zero ranks) it writes nothing.

    ``tensorboard=True`` also writes every number of every record as a TensorBoard scalar
    under ``tensorboard/`` (tag ``kind/key``, plus ``/node<i>`` for a node's records; x = the
    record's ``step``); it needs the ``track`` extra. ``resumed_at``: the step of the checkpoint
    a resumed run starts from (implies ``append``); TensorBoard then hides the events that the
    run which died wrote after it (``SummaryWriter``'s ``purge_step``), as ``metrics.jsonl`` is
    cut back to it (:func:`truncate_jsonl`), so a curve shows each step once; a resumed run
    whose first part wrote no events starts them with the records ``metrics.jsonl`` kept.
    """

    def __init__(self, out_dir: str | os.PathLike[str], config: Mapping[str, Any] | Any,
                 *, enabled: bool = True, append: bool = False,
                 tensorboard: bool = False, resumed_at: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self._file = None
        self._tb: Any = None
        if not enabled:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            events = self.out_dir / "tensorboard"
            # a resume of a run that wrote no TensorBoard events: they start with its records
            backfill = resumed_at is not None and not any(events.glob("events.out.tfevents.*"))
            self._tb = SummaryWriter(str(events), purge_step=None
                                     if resumed_at is None else resumed_at + 1)
            metrics = self.out_dir / "metrics.jsonl"
            if backfill and metrics.exists():
                for record in iter_jsonl(metrics):  # (cut back to resumed_at by the caller)
                    self._scalars(record)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out_dir / "config.json",
                          json.dumps(to_jsonable(config), indent=2, sort_keys=True) + "\n")
        append = append or resumed_at is not None
        # unbuffered: a write that fails (a full disk) leaves nothing behind to be written at
        # close or exit, after the command has said what the file holds (see log_many)
        self._file = open(self.out_dir / "metrics.jsonl",  # noqa: SIM115
                          "ab" if append else "wb", buffering=0)

    def log(self, record: Mapping[str, Any]) -> None:
        self.log_many([record])

    def log_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append ``records`` with one write and one flush."""
        records = list(records)
        if self._file is not None and records:
            data = memoryview("".join(json.dumps(to_jsonable(r)) + "\n"
                                      for r in records).encode())
            fd = self._file.fileno()
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                while data:
                    data = data[os.write(fd, data):]
            except BaseException:  # a full disk, Ctrl-C: whole records only, none half-written
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, end)
                raise
        if self._tb is not None:
            for record in records:
                self._scalars(record)

    def _scalars(self, record: Mapping[str, Any]) -> None:
        prefix = str(record.get("kind", "round"))
        suffix = "" if record.get("node") is None else f"/node{record['node']}"
        for key, value in record.items():
            if key not in ("step", "node", "kind", "round") and isinstance(
                    value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(f"{prefix}/{key}{suffix}", value, record.get("step", 0))

    def summary(self, summary: Mapping[str, Any]) -> None:
        if self.enabled:
            atomic_write_text(self.out_dir / "summary.json",
                              json.dumps(to_jsonable(summary), indent=2, sort_keys=True) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The columns of :func:`load_runs`.
LOAD_COLUMNS = ("run", "executor", "algo", "task", "step", "node", "loss", "accuracy",
                "train_loss", "bytes_total", "consensus_distance")


def load_runs(paths: Iterable[str | os.PathLike[str]]) -> Any:
    """Read run directories, real (``launch.train``) and simulated (``simulations.run``) alike,
    into one ``pandas.DataFrame`` (needs the ``track`` extra): one row per ``eval`` record of
    :mod:`gossip.records` (one node at one evaluation; on a real run the node is the rank), with
    the columns :data:`LOAD_COLUMNS`: ``run`` (the directory), ``executor`` (``real`` |
    ``sim``), ``algo``, ``task``, then the row's own fields (None where a run has none, e.g. a
    simulated row's ``train_loss``) and the ``consensus_distance`` recorded at its step.
    """
    import pandas as pd

    rows: list[tuple[Any, ...]] = []
    for path in paths:
        run = Path(path)
        config = json.loads((run / "config.json").read_text())
        if "train" in config:  # launch.train's config.json
            executor, algo = "real", config["train"]["algo"]
            task = config.get("task", {}).get("name", config["train"]["task"])
        else:
            executor, algo, task = "sim", config["algo"], config.get("task_name", config["task"])
        evals: list[dict[str, Any]] = []
        distance: dict[int, Any] = {}
        for r in iter_jsonl(run / "metrics.jsonl"):
            if "kind" not in r or "test_loss" in r:  # a round aggregate or an old eval row
                raise ValueError(
                    f"{run / 'metrics.jsonl'} predates the record schema of gossip.records (a "
                    f"record {'without a kind' if 'kind' not in r else 'with test_loss'}): "
                    "load_runs reads the per-node eval rows that newer runs write; read this "
                    "file with gossip.metrics.read_jsonl, or rerun it")
            if r.get("kind") == "eval":
                evals.append(r)
            elif r.get("consensus_distance") is not None:
                distance[r["step"]] = r["consensus_distance"]
        head = (str(run), executor, algo, task)
        rows += [head + tuple(r.get(k) for k in LOAD_COLUMNS[4:-1])
                 + (distance.get(r["step"]),) for r in evals]
    return pd.DataFrame(rows, columns=list(LOAD_COLUMNS))
