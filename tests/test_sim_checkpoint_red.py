"""Red team of the simulator's checkpoints (simulations/checkpoint.py): a real
``python -m simulations.run`` killed (SIGKILL) at awkward moments (while it writes a checkpoint,
a prune, the final models), Ctrl-C while the models are written, fields changed on resume, and
options the first tests did not cover; each compared against the run that never stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from gossip import checkpoint as ckpt
from simulations.config import SimConfig
from simulations.engine import Simulation
from simulations.run import main, run
from tests.test_sim_checkpoint import _rows, _summary

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
#: what may differ between a resumed run and the straight one: timings
ARGV = ["--algo", "gossip-vc", "--task", "digits", "--nodes", "8", "--rounds", "6",
        "--batch-size", "16", "--sync-every", "2", "--seed", "3", "--drop-prob", "0.1",
        "--save-models", "--threads", "1", "--no-progress"]
#: a child that runs simulations.run and SIGKILLs itself in the middle of writing the first
#: file whose path contains argv[1] (half of it written), as it removes the first directory
#: whose name starts with argv[2] (a prune), or as it marks the checkpoint of step argv[3]
#: (its file written); the rest of argv is simulations.run's
CHILD = """
import os, shutil, signal, sys
import torch
from gossip import checkpoint
what, doomed, marking = sys.argv[1], sys.argv[2], sys.argv[3]
save, rmtree, mark = torch.save, shutil.rmtree, checkpoint.write_latest
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def dying_save(obj, f, *a, **k):
    if what and hasattr(f, "fileno") and what in os.readlink(f"/proc/self/fd/{f.fileno()}"):
        f.write(b"half a file"); f.flush(); die()
    return save(obj, f, *a, **k)
def dying_rmtree(path, *a, **k):
    if doomed and os.path.basename(path).startswith(doomed):
        die()
    return rmtree(path, *a, **k)
def dying_mark(root, step, *a, **k):
    if marking and step == int(marking):
        die()
    return mark(root, step, *a, **k)
torch.save, shutil.rmtree, checkpoint.write_latest = dying_save, dying_rmtree, dying_mark
from simulations.run import main
sys.exit(main(sys.argv[4:]))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "simulations.run", *argv], env=_env(),
                          capture_output=True, text=True, timeout=120)


def _killed(out: Path, *, writing: str = "", pruning: str = "", marking: str = "",
            extra: tuple[str, ...] = ()) -> None:
    """A real process of ARGV into ``out``, killed with SIGKILL where CHILD says."""
    done = subprocess.run([sys.executable, "-c", CHILD, writing, pruning, marking, *ARGV,
                           "--out", str(out), *extra], env=_env(), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == -9, done.stderr


def _models(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return torch.load(out / "models.pt", weights_only=True)


def _same(a: Path, b: Path) -> None:
    """Run directories ``a`` and ``b`` hold the same run: records, summary figures, models."""
    assert _rows(a) == _rows(b)
    assert _summary(a) == _summary(b)
    ma, mb = _models(a), _models(b)
    for part in ("params", "buffers"):
        assert ma[part].keys() == mb[part].keys()
        assert all(torch.equal(ma[part][k], mb[part][k]) for k in ma[part])


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "run"
    done = _cli(*ARGV, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


def _resumes_to(straight: Path, out: Path, *args: str) -> None:
    """``simulations.run ... --resume`` (``args``: the checkpoint flags) exits 0 with the run
    that never stopped."""
    done = _cli(*ARGV, "--out", str(out), *args, "--resume")
    assert done.returncode == 0, done.stderr
    _same(out, straight)


def _temporaries(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.endswith(".tmp") or p.name.startswith(".pruning"))


@pytest.mark.slow
def test_killed_while_it_writes_the_models_the_run_resumes_and_writes_them(
        tmp_path: Path, straight: Path) -> None:
    """The models were written after summary.json said "finished": a kill in between left a
    finished run without its models.pt, and --resume refused it ("holds a finished run")."""
    out = tmp_path / "run"
    ckpt_args = ("--checkpoint-every", "2")
    _killed(out, writing="/.models.pt.", extra=ckpt_args)
    assert not (out / "summary.json").exists()  # not "finished": the models are not there
    assert _temporaries(out)  # the half-written models.pt
    _resumes_to(straight, out, *ckpt_args)
    assert _temporaries(out) == []


def test_ctrl_c_while_the_models_are_written_is_an_interrupted_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, straight: Path) -> None:
    out = tmp_path / "run"
    cfg = SimConfig(algo="gossip-vc", task="digits", nodes=8, rounds=6, batch_size=16,
                    sync_every=2, seed=3, drop_prob=0.1, save_models=True, threads=1,
                    progress=False, out=str(out), checkpoint_every=2)
    with monkeypatch.context() as m:
        def interrupted(self: Simulation, where: Any) -> Any:
            raise KeyboardInterrupt
        m.setattr(Simulation, "save_models", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    run(SimConfig(**{**cfg.to_dict(), "resume": True}))
    _same(out, straight)


@pytest.mark.slow
def test_killed_while_it_writes_a_checkpoint_leaves_no_file_behind_a_resume(
        tmp_path: Path, straight: Path) -> None:
    """The half-written temporary of step 4's file (as large as every node's model) stayed
    beside the step 4 the resumed run wrote again, for good."""
    out = tmp_path / "run"
    ckpt_args = ("--checkpoint-every", "2")
    _killed(out, writing="/step_4/.rank_0.pt.", extra=ckpt_args)
    assert ckpt.read_latest(out)["step"] == 2
    assert _temporaries(out) != []
    _resumes_to(straight, out, *ckpt_args)
    assert _temporaries(out) == []
    assert sorted(p.name for p in (out / "checkpoints" / "step_4").iterdir()) == ["rank_0.pt"]


@pytest.mark.slow
def test_killed_while_it_prunes_leaves_no_directory_behind_a_resume(
        tmp_path: Path, straight: Path) -> None:
    """A prune killed after it renamed step 2 away: its leftover was removed only by the next
    prune, and the resumed run (from step 4 of 6) writes no further checkpoint."""
    out = tmp_path / "run"
    ckpt_args = ("--checkpoint-every", "2", "--keep-checkpoints", "1")
    _killed(out, pruning=".pruning_step_", extra=ckpt_args)
    assert ckpt.read_latest(out)["step"] == 4
    assert _temporaries(out) != []
    _resumes_to(straight, out, *ckpt_args)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_4"]


@pytest.mark.slow
def test_killed_before_it_marks_a_checkpoint_leaves_no_unmarked_one_behind_a_resume(
        tmp_path: Path, straight: Path) -> None:
    """Step 4's file written, the process killed before the marker: the resume (from step 2,
    now every 3 rounds, keeping 1) never rewrites step 4, and a prune never removes a step
    newer than the marked one, so the unmarked checkpoint stayed for good."""
    out = tmp_path / "run"
    _killed(out, marking="4", extra=("--checkpoint-every", "2"))
    assert ckpt.read_latest(out)["step"] == 2
    assert (out / "checkpoints" / "step_4" / "rank_0.pt").is_file()
    _resumes_to(straight, out, "--checkpoint-every", "3", "--keep-checkpoints", "1")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_3"]


def test_cpu_seconds_of_a_resumed_run_go_on_from_the_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """wall_seconds went on from the checkpoint's, cpu_seconds counted this process's rounds
    only (and the checkpoint did not hold them)."""
    out = _fedavg_died(tmp_path, monkeypatch)
    state = torch.load(ckpt.rank_file(out, 4, 0), weights_only=True)
    assert state["cpu_seconds"] > 0
    assert main(_resume_argv(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cpu_seconds"] > state["cpu_seconds"]
    assert summary["wall_seconds"] > state["wall_seconds"]


def _died(out: Path, monkeypatch: pytest.MonkeyPatch, cfg: SimConfig, at: int) -> None:
    """``cfg`` runs into ``out`` and dies (RuntimeError) as round ``at`` starts."""
    start = Simulation.start_round

    def dying(self: Simulation, index: int) -> Any:
        if index == at:
            raise RuntimeError("the process dies here")
        return start(self, index)
    with monkeypatch.context() as m:
        m.setattr(Simulation, "start_round", dying)
        with pytest.raises(RuntimeError):
            run(cfg)


def test_fewer_rounds_on_resume_is_refused_as_a_changed_field(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--rounds 4 resuming the checkpoint of round 4 of a run of 6 said "checkpoint ... is
    after round 4, not within rounds=4", not that rounds changed."""
    out = tmp_path / "run"
    cfg = SimConfig(algo="fedavg", task="digits", nodes=8, rounds=6, batch_size=16,
                    sync_every=3, seed=1, progress=False, out=str(out), checkpoint_every=2)
    _died(out, monkeypatch, cfg, 5)
    argv = ["--algo", "fedavg", "--task", "digits", "--nodes", "8", "--batch-size", "16",
            "--sync-every", "3", "--seed", "1", "--out", str(out), "--checkpoint-every", "2",
            "--resume"]
    assert main([*argv, "--rounds", "4"]) == 2
    assert "rounds: 6 -> 4" in capsys.readouterr().err
    assert main([*argv, "--rounds", "6"]) == 0


#: options the first tests did not cover: each resumes to the run that never stopped
OPTIONS = {
    "gossip-topk-error-feedback": {"algo": "gossip", "compress": "topk:0.1",
                                   "error_feedback": True},
    "dpsgd-time-varying-topology": {"algo": "dpsgd", "topology": "exponential"},
    "diloco-streaming-fragments": {"algo": "diloco", "fragments": 3, "overlap": True},
    "fedavg-star-sampling-deadline": {"algo": "fedavg", "client_fraction": 0.5,
                                      "allreduce": "star", "straggler_fraction": 0.5,
                                      "straggler_policy": "deadline"},
    "fedavg-local-epochs": {"algo": "fedavg", "sync_every": None, "local_epochs": 1},
    "choco-cosine-clipped": {"algo": "choco", "schedule": "cosine", "lr": 0.1,
                             "grad_clip": 1.0, "weight_decay": 1e-3},
    "noloco-overlap-int8-churn": {"algo": "noloco", "overlap": True, "compress": "int8",
                                  "churn_fraction": 0.5, "churn_rounds": 2},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_options_resume_bit_for_bit_with_a_sparser_evaluation(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Died after the checkpoint of round 3; evaluated every 4 rounds (more than the interval)."""
    kw = {"task": "digits", "nodes": 8, "rounds": 6, "batch_size": 16, "sync_every": 3,
          "partition": "dirichlet:0.5", "seed": 1, "progress": False, "save_models": True,
          "eval_every": 4, **OPTIONS[name]}
    straight, died = tmp_path / "straight", tmp_path / "died"
    run(SimConfig(out=str(straight), **kw))
    _died(died, monkeypatch, SimConfig(out=str(died), checkpoint_every=3, **kw), 5)
    run(SimConfig(out=str(died), checkpoint_every=3, resume=True, **kw))
    _same(died, straight)


def _resume_argv(out: Path) -> list[str]:
    return ["--algo", "fedavg", "--task", "digits", "--nodes", "8", "--rounds", "6",
            "--batch-size", "16", "--sync-every", "3", "--seed", "1", "--out", str(out),
            "--checkpoint-every", "2", "--resume"]


def _fedavg_died(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "run"
    _died(out, monkeypatch, SimConfig(algo="fedavg", task="digits", nodes=8, rounds=6,
                                      batch_size=16, sync_every=3, seed=1, progress=False,
                                      out=str(out), checkpoint_every=2), 5)
    return out


def test_a_resume_whose_records_before_the_checkpoint_are_gone_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """It went on, and its summary.json said rounds 2 and 48 node steps for a run of 6 rounds
    and 144 (the summary is made of the records before the checkpoint and after it)."""
    out = _fedavg_died(tmp_path, monkeypatch)
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    kept = [line for line in lines if json.loads(line).get("round") != 2]  # round 2's records
    metrics.write_text("".join(kept))
    assert main(_resume_argv(out)) == 2
    err = capsys.readouterr().err
    assert f"{metrics} lacks the records of rounds 2;" in err and "after round 4" in err
    assert metrics.read_text() == "".join(kept)  # refused touching nothing
    metrics.unlink()
    assert main(_resume_argv(out)) == 2
    assert f"{metrics} does not exist;" in capsys.readouterr().err
    assert not (out / "summary.json").exists()
    metrics.write_text("".join(lines))  # restored: it resumes
    assert main(_resume_argv(out)) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 6


def test_a_corrupted_summary_is_refused_naming_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """It said "error: Expecting value: line 1 column 1 (char 0)", naming no file."""
    out = _fedavg_died(tmp_path, monkeypatch)
    (out / "summary.json").write_text("")
    assert main(_resume_argv(out)) == 2
    assert f"holds a corrupted {out / 'summary.json'} (JSONDecodeError" in \
        capsys.readouterr().err


@pytest.mark.parametrize("every", [6, 7])
def test_a_checkpoint_interval_that_writes_none_is_refused(every: int) -> None:
    """--checkpoint-every 6 with --rounds 6 wrote no checkpoint, silently: a run that died in
    round 5 had nothing to resume ("holds a run without a checkpoint to resume from")."""
    with pytest.raises(ValueError, match=rf"^checkpoint_every={every} is invalid: expected 0 "
                                         r"or fewer than rounds=6"):
        SimConfig(algo="fedavg", nodes=4, rounds=6, out="x", checkpoint_every=every)
    assert SimConfig(algo="fedavg", nodes=4, rounds=6, out="x", checkpoint_every=5)


def test_the_progress_bar_of_a_resumed_run_counts_from_its_checkpoint(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """It started at 0/6 and ended at 2/6 for a run resumed after round 4 of 6."""
    out = _fedavg_died(tmp_path, monkeypatch)
    capsys.readouterr()
    assert main([*_resume_argv(out), "--progress"]) == 0
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    counts = [line.split("round")[0].split("|")[-1].strip() for line in bar if "round" in line]
    assert counts[0].startswith("4/6") and counts[-1].startswith("6/6"), counts


def test_the_line_ctrl_c_prints_names_the_checkpoints_round(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """It said "marked interrupted at round 5 of 6, ..., --resume continues from step 4": the
    simulator's checkpoint is after round 4 (its step 12)."""
    out = tmp_path / "run"
    start = Simulation.start_round

    def stopped(self: Simulation, index: int) -> Any:
        if index == 5:
            raise KeyboardInterrupt
        return start(self, index)
    monkeypatch.setattr(Simulation, "start_round", stopped)
    argv = _resume_argv(out)
    assert main(argv[:-1]) == 130  # without --resume
    err = capsys.readouterr().err
    assert "marked interrupted at round 5 of 6" in err
    assert err.rstrip().endswith("--resume continues from round 4)"), err


@pytest.mark.parametrize("field", ["checkpoint_every", "resume"])
def test_a_comparison_refuses_checkpoints(field: str, tmp_path: Path) -> None:
    """compare(checkpoint_every=1) wrote checkpoints in every algorithm's directory that no
    comparison could resume (it checks the directories without resume, and its CLI has no
    such flag); compare(resume=True) started afresh."""
    from simulations.compare import compare

    value = {"checkpoint_every": 1, "resume": True}[field]
    with pytest.raises(ValueError, match=f"^{field}={value!r} is invalid: a comparison does "
                                         "not checkpoint"):
        compare(["fedavg"], out=tmp_path / "cmp", nodes=4, rounds=2, progress=False,
                **{field: value})
    assert not (tmp_path / "cmp").exists()


def test_evaluation_fields_changed_on_resume_leave_batchnorm_and_dropout_bit_exact(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Node-wise models (gossip-vc, not one global model) with BatchNorm and dropout, resumed
    evaluating other rounds and another sample of nodes: the evaluation draws nothing from the
    RNG the dropout masks come from and leaves the running statistics alone."""
    import dataclasses

    from torch import nn

    from gossip.tasks import get_task

    task = dataclasses.replace(get_task("digits", seed=1), model_factory=lambda: nn.Sequential(
        nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)))
    kw = {"algo": "gossip-vc", "task": "digits", "nodes": 8, "rounds": 6, "batch_size": 16,
          "sync_every": 3, "seed": 1, "progress": False, "save_models": True}
    straight, died = tmp_path / "straight", tmp_path / "died"
    run(SimConfig(out=str(straight), **kw), task=task)
    start = Simulation.start_round

    def dying(self: Simulation, index: int) -> Any:
        if index == 5:
            raise RuntimeError("the process dies here")
        return start(self, index)
    with monkeypatch.context() as m:
        m.setattr(Simulation, "start_round", dying)
        with pytest.raises(RuntimeError):
            run(SimConfig(out=str(died), checkpoint_every=2, **kw), task=task)
    run(SimConfig(out=str(died), checkpoint_every=2, resume=True, eval_every=4, eval_nodes=3,
                  **kw), task=task)
    a, b = _models(straight), _models(died)
    for part in ("params", "buffers"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert "1.running_mean" in a["buffers"]


def test_a_resume_whose_marker_was_deleted_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """It said the run had no checkpoint to resume from, beside its step directories."""
    out = _fedavg_died(tmp_path, monkeypatch)
    marker = out / "checkpoints" / "latest"
    saved = marker.read_bytes()
    marker.unlink()
    assert main(_resume_argv(out)) == 2
    assert f"holds checkpoints (step_2, step_4) but no marker {marker}" in \
        capsys.readouterr().err
    marker.write_bytes(saved)
    assert main(_resume_argv(out)) == 0
