"""Start-up of ``python -m simulations.run`` (issue 9): what it imports, the garbage collector
paused until the simulation is built, the digits data cached on disk. The CLI checks run the
module as ``-m`` does (``runpy`` as ``__main__``) in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gossip import tasks
from gossip.data import distinct

ROOT = Path(__file__).resolve().parents[1]

#: What a FedAvg digits run must not import before its first round (torch's compiler, plots,
#: Ray, pandas, sklearn, numpy's masked arrays, graphs).
NOT_AT_START = ("torch._dynamo", "matplotlib", "ray", "pandas", "sklearn", "numpy.ma",
                "networkx")


def _python(code: str, tmp_path: Path) -> dict:
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=240, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_importing_the_package_imports_neither_torch_nor_the_library(tmp_path: Path) -> None:
    # what lets ``python -m simulations.run`` pause the collector before torch is imported
    got = _python("import sys, json, simulations\n"
                  "print(json.dumps([m for m in ('torch', 'numpy', 'gossip') "
                  "if m in sys.modules]))", tmp_path)
    assert got == []


def test_the_cli_collects_nothing_before_the_build_and_imports_only_what_a_run_needs(
        tmp_path: Path) -> None:
    # the collections from torch's import to the freeze (imports, config, data, build) are
    # counted; then the CLI runs to its end (no --out: no plots) and exits through sys.exit
    code = (
        "import gc, json, runpy, sys\n"
        "seen = {'before_freeze': 0, 'after': 0}\n"
        "def count(phase, info):\n"
        "    if phase == 'start' and 'torch' in sys.modules:\n"
        "        seen['after' if gc.get_freeze_count() else 'before_freeze'] += 1\n"
        "gc.callbacks.append(count)\n"
        "sys.argv = ['simulations.run', '--algo', 'fedavg', '--task', 'digits', '--nodes', '200',"
        " '--partition', 'dirichlet:0.5', '--optimizer', 'sgd', '--local-epochs', '1',"
        " '--rounds', '2']\n"
        "try:\n"
        "    runpy.run_module('simulations.run', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    seen['exit'] = e.code\n"
        f"seen['imported'] = [m for m in {NOT_AT_START!r} if m in sys.modules]\n"
        "seen['enabled'] = gc.isenabled()\n"
        "seen['frozen'] = gc.get_freeze_count()\n"
        "print(json.dumps(seen))\n")
    got = _python(code, tmp_path)
    assert got["exit"] == 0
    assert got["before_freeze"] == 0  # importing torch alone runs hundreds of collections
    assert got["enabled"]  # collecting again for the rounds
    assert got["frozen"] > 100_000  # torch's and the build's objects, out of every collection
    assert got["imported"] == []


def test_a_library_import_of_the_runner_leaves_the_collector_alone(tmp_path: Path) -> None:
    got = _python("import gc, json\n"
                  "from simulations.run import run\n"
                  "from simulations.config import SimConfig\n"
                  "run(SimConfig(algo='fedavg', nodes=4, rounds=1))\n"
                  "print(json.dumps([gc.isenabled(), gc.get_freeze_count()]))", tmp_path)
    assert got == [True, 0]


# ----------------------------------------------------------------------------- digits cache


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    x, y = sklearn_datasets.load_digits(return_X_y=True)
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.int64)


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "gossip").glob("digits-*.npz"))


def test_digits_are_parsed_once_then_read_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref_x, ref_y = _sklearn_digits()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    parsed: list[str] = []
    parse = tasks._parse_csv_gz
    monkeypatch.setattr(tasks, "_parse_csv_gz", lambda p: parsed.append(p) or parse(p))
    for _ in range(2):
        x, y = tasks._load_digits_arrays()
        assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)
    assert len(parsed) == 1 and len(_cache_files(tmp_path)) == 1
    assert not list((tmp_path / "gossip").glob(".*.tmp"))  # the temporary file was renamed


def test_a_damaged_cache_is_parsed_again_and_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref_x, _ = _sklearn_digits()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tasks._load_digits_arrays()
    (cached,) = _cache_files(tmp_path)
    cached.write_bytes(cached.read_bytes()[:1000])  # truncated
    x, _ = tasks._load_digits_arrays()
    assert np.array_equal(x, ref_x)
    assert np.array_equal(np.load(cached)["table"][:, :-1], ref_x)


def test_a_foreign_file_in_the_cache_is_parsed_again_and_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a well-formed array that is not this source's table (another writer, another layout)
    ref_x, ref_y = _sklearn_digits()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    tasks._load_digits_arrays()
    (cached,) = _cache_files(tmp_path)
    for foreign in (np.zeros((3, 2)), {"table": np.zeros((3, 2)), "source": np.array("other")}):
        with open(cached, "wb") as handle:
            if isinstance(foreign, dict):
                np.savez(handle, **foreign)
            else:
                np.save(handle, foreign)
        x, y = tasks._load_digits_arrays()
        assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)


def test_an_unwritable_cache_only_costs_the_parse(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref_x, ref_y = _sklearn_digits()
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # $XDG_CACHE_HOME/gossip cannot exist
    x, y = tasks._load_digits_arrays()
    assert np.array_equal(x, ref_x) and np.array_equal(y, ref_y)


def test_distinct_is_numpys_unique() -> None:
    rng = np.random.default_rng(0)
    for values in (rng.integers(-5, 5, size=300), np.array([3]), np.array([], dtype=np.int64),
                   np.array([2.0, -1.0, 2.0])):
        assert np.array_equal(distinct(values), np.unique(values))


# ----------------------------------------------------------------------------- after the rounds


def test_log_axes_are_labelled_without_mathtext(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # mathtext labels (matplotlib's default on log axes) cost a pyparsing parse per figure
    mathtext = pytest.importorskip("matplotlib.mathtext")
    from gossip.plots import plot_run

    parsed: list[str] = []
    parse = mathtext.MathTextParser.parse
    monkeypatch.setattr(mathtext.MathTextParser, "parse",
                        lambda self, s, *a, **k: parsed.append(s) or parse(self, s, *a, **k))
    records = [{"step": s, "kind": "round", "train_loss": 3.0 / (s + 1),
                "consensus_distance": 10.0 ** (-s / 4)} for s in range(1, 30)]
    written = plot_run(records, tmp_path, title="t")
    assert [p.name for p in written] == ["loss.png", "consensus.png"]
    assert parsed == []
