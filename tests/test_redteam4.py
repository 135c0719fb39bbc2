"""Red-team cases of the day's changes (full disk, read-only run directories, the masked batch
draws, even chunks, merge of a real run's buffers), each found failing and then fixed or pinned.

The disk cases run on a real tmpfs in a private mount namespace (``unshare -m``), as
tests/test_disk_full.py does."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.batching import StackedBatches, node_batch
from tests.test_disk_full import ROOT, _can_mount, _env, run_in_namespace

needs_mount = pytest.mark.skipif(not _can_mount(), reason="needs unshare -m and mount (root)")


def _in_namespace(tmp_path: Path, setup: str, command: list[str]) -> dict[str, object]:
    """Run ``command`` after ``setup`` (shell lines mounting DISK = tmp_path/disk) in a private
    mount namespace; returns its exit code, stderr, and a copy of DISK/run as it was left once
    the process had exited (the tmpfs goes with the namespace)."""
    cmd = " ".join(shlex.quote(c) for c in command)
    kept = run_in_namespace(tmp_path, f"""
{setup}
{cmd} > KEPT/out 2> KEPT/err; echo $? > KEPT/rc
cp -r DISK/run KEPT/run 2>/dev/null || true
""", timeout=300)
    return {"rc": int((kept / "rc").read_text()), "err": (kept / "err").read_text(),
            "run": kept / "run"}


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize("size", ["8k", "12k"])
def test_a_full_disk_while_appending_records_leaves_what_the_report_says(
        tmp_path: Path, size: str) -> None:
    # config.json and the lock take a page each; metrics.jsonl fills the rest mid-line (12k) or
    # at its first append (8k). The buffered metrics file kept the unwritten tail and wrote it
    # at interpreter exit, after the lock's page was freed: the report said "0 records" and
    # the file then held 2 (8k); "11 records" with a 12th line completed after the report (12k)
    got = _in_namespace(
        tmp_path, "mount -t tmpfs -o size=" + size + " tmpfs DISK",
        [sys.executable, "-m", "simulations.run", "--nodes", "16", "--rounds", "20",
         "--no-progress", "--out", str(tmp_path / "disk" / "run")])
    err = str(got["err"])
    assert got["rc"] == 1, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    assert "error: No space left on device (writing into" in err
    said = re.search(r"stopped: kept \S+ \(unfinished, (\d+) records", err)
    assert said, err
    text = (Path(str(got["run"])) / "metrics.jsonl").read_bytes()
    assert text == b"" or text.endswith(b"\n")  # whole records only
    assert len(text.splitlines()) == int(said.group(1))


@needs_mount
def test_an_existing_run_directory_on_a_read_only_mount_is_refused_in_one_line(
        tmp_path: Path) -> None:
    # it said: a traceback ending in OSError: [Errno 30] Read-only file system: '.../.lock'
    got = _in_namespace(
        tmp_path, "mount -t tmpfs -o size=1m tmpfs DISK; mkdir DISK/run; "
                  "mount -o remount,ro DISK",
        [sys.executable, "-m", "simulations.run", "--nodes", "4", "--rounds", "2",
         "--no-progress", "--out", str(tmp_path / "disk" / "run")])
    err = str(got["err"])
    assert got["rc"] == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    out = str(tmp_path / "disk" / "run")
    assert f"error: out={out!r} is invalid: it is not writable" in err, err


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize("size", ["640k", "700k"])
def test_plots_that_do_not_fit_leave_no_half_written_image(tmp_path: Path, size: str) -> None:
    # models.pt (0.6 MB) fits, then the plots do not: 640k left a 0-byte accuracy.png behind
    # the line "plots not written" (a half-written file, which the user's viewer cannot open)
    got = _in_namespace(
        tmp_path, "mount -t tmpfs -o size=" + size + " tmpfs DISK",
        [sys.executable, "-m", "simulations.run", "--nodes", "16", "--rounds", "4",
         "--no-progress", "--save-models", "--out", str(tmp_path / "disk" / "run")])
    err = str(got["err"])
    assert got["rc"] == 0, err[-3000:]
    assert "plots not written: no space left on the device of" in err, err[-3000:]
    run = Path(str(got["run"]))
    assert (run / "summary.json").exists() and (run / "models.pt").exists()
    for png in run.glob("*.png"):  # each image there is whole: the PNG signature to IEND
        data = png.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82"), png
    assert not list(run.rglob("*.tmp"))


def _batches(tensor_path: bool = False) -> tuple[list[np.ndarray], list[int], StackedBatches]:
    rng = np.random.default_rng(0)
    shards = [rng.choice(1000, size=int(s), replace=False) for s in rng.integers(3, 15, 6)]
    nodes = list(range(10, 16))
    return shards, nodes, StackedBatches(shards, nodes, 4, seed=3, tensor_path=tensor_path)


@pytest.mark.parametrize("rows", [torch.tensor([True]), torch.tensor([0, 2]),
                                  torch.ones(6, dtype=torch.long), torch.ones(7, dtype=torch.bool)],
                         ids=["one-flag", "indices", "ints", "too-long"])
def test_batch_rows_that_are_not_one_flag_per_row_are_refused(rows: torch.Tensor) -> None:
    # [True] was taken as every row (numpy broadcast it); [0, 2] failed with numpy's
    # "operands could not be broadcast together with shapes (6,) (2,) (6,)"
    _, _, sb = _batches()
    with pytest.raises(ValueError, match=r"rows must be a bool tensor \[6\] \(one flag per row\)"):
        sb.batch(5, rows)


@pytest.mark.parametrize("tensor_path", [False, True])
def test_masked_draws_then_all_rows_give_node_batch(tensor_path: bool) -> None:
    # any mix of masks (none, all False, random) and uneven steps: the rows read are
    # node_batch's, the reference one node at a time
    shards, nodes, sb = _batches(tensor_path)
    rng = np.random.default_rng(1)
    step = np.zeros(6, dtype=np.int64)
    for _ in range(200):
        r = rng.random()
        mask = None if r < 0.2 else torch.from_numpy(rng.random(6) < (0 if r < 0.3 else 0.5))
        idx = sb.batch(torch.from_numpy(step.copy()), mask)
        for i in range(6):
            if mask is None or bool(mask[i]):
                ref = node_batch(shards[i], 4, seed=3, node=nodes[i], step=int(step[i]))
                assert np.array_equal(idx[i].numpy(), ref)
        step += (np.ones(6, bool) if mask is None else mask.numpy()) * rng.integers(1, 4, 6)


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize(("executor", "size"), [
    ("launch.train", "48k"), ("simulations.run", "400k"), ("simulations.run", "628k")],
    ids=["real-file", "sim-file", "sim-marker"])
def test_a_first_checkpoint_that_did_not_fit_is_not_taken_for_a_lost_marker(
        tmp_path: Path, executor: str, size: str) -> None:
    # the first checkpoint does not fit: its file (48k, 400k: the half-written file went, its
    # empty step directory stayed) or its marker (628k: rank_0.pt whole, `latest` not written);
    # --resume (after making room) said "holds checkpoints (step_10) but no marker .../latest,
    # the manifest --resume checks their files against: restore it, ..." (a marker that never
    # existed); the stop line had said "no checkpoint: --overwrite starts it again"
    out = tmp_path / "disk" / "run"
    if executor == "launch.train":
        command = [sys.executable, "-m", "launch.train", "--task", "digits", "--algo", "fedavg",
                   "--steps", "30", "--sync-every", "5", "--eval-every", "10",
                   "--checkpoint-every", "10", "--out", str(out)]
    else:
        command = [sys.executable, "-m", "simulations.run", "--nodes", "16", "--rounds", "6",
                   "--checkpoint-every", "2", "--no-progress", "--out", str(out)]
    cmd = " ".join(shlex.quote(c) for c in command)
    kept = tmp_path / "kept"
    got = _in_namespace(
        tmp_path, f"mount -t tmpfs -o size={size} tmpfs DISK; {cmd} 2> {kept}/first; "
                  "mount -o remount,size=64m DISK", [*command, "--resume"])
    first = (kept / "first").read_text()
    assert "no checkpoint: --overwrite starts it again" in first, first[-3000:]
    if size == "628k":
        assert "could not write latest" in first, first[-3000:]
    err = str(got["err"])
    assert got["rc"] == 2, err[-3000:]
    assert "but no marker" not in err and "Traceback" not in err, err[-3000:]
    assert f"out={str(out)!r} holds a run without a checkpoint to resume from" in err, err


_SAVE_WHILE_A_PEER_FREES = """
import sys, torch
from pathlib import Path
from gossip.metrics import atomic_write
disk = Path(sys.argv[1])
ballast = disk / "peer_rank_1.pt.tmp"
ballast.write_bytes(bytes(3 << 20))  # a peer's half-written checkpoint: 3 MiB
def write(f):
    try:
        torch.save({"w": torch.zeros(1 << 20)}, f)  # 4 MiB: does not fit
    finally:
        ballast.unlink()  # the peer's failed write is removed meanwhile: 3 MiB free again
try:
    atomic_write(disk / "rank_0.pt", write)
except BaseException as e:
    print(type(e).__name__, e)
"""


@needs_mount
def test_a_full_disk_is_named_even_when_room_is_made_before_it_is_looked_at(
        tmp_path: Path) -> None:
    # torch.save turns the OS's ENOSPC (or a quota's EDQUOT) into "RuntimeError: ... unexpected
    # pos"; no_space then guessed from the free space, which a peer rank's cleanup had already
    # given back: the error went out as that RuntimeError, a traceback
    disk = tmp_path / "disk"
    disk.mkdir()
    script = (f"mount -t tmpfs -o size=5m tmpfs {disk} && "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(_SAVE_WHILE_A_PEER_FREES)} {disk}")
    res = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith(f"OSError [Errno 28] no space left on the device of {disk}: "
                                 "could not write rank_0.pt"), res.stdout + res.stderr[-2000:]


@pytest.mark.parametrize(("every", "deaths"), [(2, [4, 4]), (2, [3, 5]), (3, [5, 5])],
                         ids=["same-ckpt", "then-later", "same-ckpt-3"])
def test_tensorboard_after_several_resumes_in_a_row_shows_each_step_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, every: int, deaths: list[int]) -> None:
    """The run dies as round index ``deaths[0]`` starts (0-based: a round past its last
    checkpoint written), its resume as round index ``deaths[1]`` starts, the next resume
    finishes: the TensorBoard curve is the straight run's, each step once (it holds)."""
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from simulations.run import run
    from tests.test_sim_checkpoint import _cfg, _rows, _stop_at

    straight, died = tmp_path / "straight", tmp_path / "died"
    run(_cfg("fedavg", straight))
    for i, r in enumerate(deaths):
        with monkeypatch.context() as m:
            _stop_at(m, r, RuntimeError)
            with pytest.raises(RuntimeError):
                run(_cfg("fedavg", died, checkpoint_every=every, tensorboard=True,
                         resume=i > 0))
    run(_cfg("fedavg", died, checkpoint_every=every, tensorboard=True, resume=True))
    acc = tb.EventAccumulator(str(died / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("round/train_loss")
    rounds = [r for r in _rows(straight) if r["kind"] == "round"]
    assert [e.step for e in events] == [r["step"] for r in rounds]
    assert [e.value for e in events] == pytest.approx([r["train_loss"] for r in rounds])


@pytest.mark.parametrize("cap", [4, 6, 12])
def test_fused_steps_in_even_chunks_equal_separate_models_masked_with_momentum(
        digits_task: object, monkeypatch: pytest.MonkeyPatch, cap: int) -> None:
    """13 rows under a cap of 4 (chunks 4+4+4+1), 6 (5+4+4 live rows, masked) or 12 (7+6,
    rows just above the cap): SGD with momentum and weight decay on random masks equals 13
    plain modules with their own torch.optim."""
    from simulations.training import LocalTrainer
    from tests.test_sim_training import _assert_rows_match, _masks, _reference, _stacked

    monkeypatch.setattr(LocalTrainer, "_chunk_rows", lambda self, batch: cap)
    n, kw = 13, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    masks = [torch.ones(n, dtype=torch.bool), *_masks(5, n)]
    refs, _ = _reference(digits_task, n, 6, masks, "sgd", **kw)
    model, trainer = _stacked(digits_task, n, 6, masks, "sgd", **kw)
    assert trainer.fused and trainer.fused_applies()
    _assert_rows_match(model, refs, atol=1e-6)


@pytest.fixture(scope="module")
def digits_task() -> object:
    from gossip.tasks import get_task

    return get_task("digits", seed=0)


@needs_mount
def test_a_disk_too_full_for_config_json_leaves_nothing_as_the_stop_line_says(
        tmp_path: Path) -> None:
    # one page: the lock's PID fills it. The stop line said "nothing was written", and the
    # run directory stayed, its .lock naming the dead process (never released)
    got = _in_namespace(
        tmp_path, "mount -t tmpfs -o size=4k tmpfs DISK",
        [sys.executable, "-m", "simulations.run", "--nodes", "4", "--rounds", "2",
         "--no-progress", "--out", str(tmp_path / "disk" / "run")])
    err = str(got["err"])
    assert got["rc"] == 1, err[-3000:]
    assert "could not write config.json" in err and "stopped: nothing was written" in err, err
    assert not Path(str(got["run"])).exists()  # the directory the run made is gone


@pytest.mark.slow
@needs_mount
@pytest.mark.parametrize("mount", ["size=4k", "ro"])
def test_gossip_merge_onto_a_full_or_read_only_disk_says_so_in_one_line(
        tmp_path: Path, mount: str) -> None:
    # a full disk: a traceback ending in OSError: [Errno 28] no space left on the device of
    # ...: could not write merged.pt; read-only: OSError: [Errno 30] after the whole merge
    run = tmp_path / "sim"
    made = subprocess.run([sys.executable, "-m", "simulations.run", "--nodes", "4", "--rounds",
                           "2", "--no-progress", "--save-models", "--out", str(run)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert made.returncode == 0, made.stderr[-3000:]
    disk = tmp_path / "disk"
    setup = ("mount -t tmpfs -o size=4k tmpfs DISK" if mount != "ro" else
             "mount -t tmpfs -o size=1m tmpfs DISK; mount -o remount,ro DISK")
    got = _in_namespace(tmp_path, setup,
                        [sys.executable, "-m", "gossip.merge", "--method", "uniform", "--out",
                         str(disk / "merged.pt"), str(run)])
    err = str(got["err"])
    assert "Traceback" not in err, err[-3000:]
    if mount == "ro":
        assert got["rc"] == 2 and err.startswith(
            f"error: out={str(disk / 'merged.pt')!r} is invalid: {disk} is not writable"), err
    else:
        assert got["rc"] == 1 and err.startswith(
            f"error: no space left on the device of {disk}: could not write merged.pt"), err


@pytest.mark.parametrize("first_tb", [False, True], ids=["tb-from-the-resume", "tb-throughout"])
def test_tensorboard_turned_on_at_a_resume_shows_the_whole_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first_tb: bool) -> None:
    """The run dies without --tensorboard; its resume has it: TensorBoard showed only the
    rounds after the checkpoint ([12, 15, 18] of [3, ..., 18]); now the whole curve, as the
    straight run's (the records metrics.jsonl kept are written first)."""
    tb = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from simulations.run import run
    from tests.test_sim_checkpoint import _cfg, _rows, _stop_at

    straight, died = tmp_path / "straight", tmp_path / "died"
    run(_cfg("fedavg", straight))
    with monkeypatch.context() as m:
        _stop_at(m, 5, RuntimeError)
        with pytest.raises(RuntimeError):
            run(_cfg("fedavg", died, checkpoint_every=3, tensorboard=first_tb))
    run(_cfg("fedavg", died, checkpoint_every=3, tensorboard=True, resume=True))
    acc = tb.EventAccumulator(str(died / "tensorboard"))
    acc.Reload()
    rounds = [r for r in _rows(straight) if r["kind"] == "round"]
    for tag, key in (("round/train_loss", "train_loss"), ("eval/accuracy", "accuracy")):
        events = acc.Scalars(tag)
        want = [r for r in _rows(straight) if key in r and r.get("node") is None
                and r["kind"] == tag.split("/")[0]]
        assert len(want) >= 2 and [e.step for e in events] == [r["step"] for r in want]
        assert [e.value for e in events] == pytest.approx([r[key] for r in want])
    assert len(rounds) == 6
