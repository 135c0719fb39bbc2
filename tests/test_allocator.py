"""gossip.reuse_freed_memory: a freed model-sized tensor's pages are reused, not faulted in again.

Each case runs in a fresh interpreter (the setting is process-wide) and counts the minor page
faults of allocating and filling a 64 MiB tensor after equal ones were freed. The fewest faults
of five such tensors is what counts: the kernel may fault a resident page again on its own (NUMA
balancing's hinting faults unmap a process's pages now and then), but a tensor whose pages are
fresh from ``mmap`` faults every page in every time. The child also says where the tensor lay (in
the ``brk`` heap or not), so a failure explains itself.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from gossip.allocator import reuse_freed_memory

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource
from gossip.allocator import reuse_freed_memory
applied = reuse_freed_memory()
import torch
def heap():
    with open("/proc/self/maps") as f:
        for line in f:
            if line.rstrip().endswith("[heap]"):
                lo, hi = line.split()[0].split("-")
                return int(lo, 16), int(hi, 16)
    return 0, 0
def faults_of_new_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 * 2**20)  # 64 MiB of fp32
    t.fill_(1.0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    lo, hi = heap()
    where = "brk heap" if lo <= t.data_ptr() < hi else "outside the brk heap"
    del t
    return after - before, where
for _ in range(3):  # the first ones fault their pages in; then the heap has its steady shape
    faults_of_new_tensor()
got = [faults_of_new_tensor() for _ in range(5)]
print(json.dumps({"applied": applied, "faults": min(f for f, _ in got), "runs": got}))
"""

PAGES = 64 * 2**20 // 4096  # 4 KiB pages in 64 MiB


def run_child(**env: str) -> dict[str, object]:
    full = {k: v for k, v in os.environ.items()
            if k not in ("GOSSIP_REUSE_MEMORY", "MALLOC_MMAP_THRESHOLD_")}
    full.update(env, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", _CHILD], env=full, check=True,
                         capture_output=True, text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="needs glibc malloc")


@glibc
def test_freed_pages_are_reused() -> None:
    got = run_child()
    assert got["applied"] is True
    assert got["faults"] < PAGES // 10, got  # reused: next to no fresh pages


@glibc
def test_glibc_default_faults_every_new_tensor_in() -> None:
    """The reference: without the setting the same tensor faults in (nearly) every page."""
    got = run_child(GOSSIP_REUSE_MEMORY="0")
    assert got["applied"] is False
    assert got["faults"] > PAGES // 2, got


@glibc
def test_users_own_malloc_variables_win() -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONPATH": str(ROOT)}
    env.pop("GOSSIP_REUSE_MEMORY", None)
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('a', "
            "sys.argv[1]); a = importlib.util.module_from_spec(spec); "
            "spec.loader.exec_module(a); print(a.reuse_freed_memory())")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "gossip" / "allocator.py")],
                         env=env, check=True, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False"


def test_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 1, got 0"):
        reuse_freed_memory(0)
