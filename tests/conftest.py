"""Shared fixtures.

``ray_cluster``: one local Ray cluster on 127.0.0.1 per test session (under pytest-xdist, per
worker process), started only when a test asks for it and always shut down at the end. Tests that
use it are marked ``ray`` automatically (mark them explicitly too, for ``-m "not ray"``) and put
in the xdist group "ray", so ``pytest -n N --dist loadgroup`` runs them all in one worker and
starts one cluster.

Collection order: the ``slow`` tests first (stable otherwise). pytest-xdist hands tests out in
collection order, so the long multi-process runs start early and the tail of the run is short
unit tests that keep both workers busy, instead of one worker finishing a long end-to-end test
alone.

Groups need pytest < 9 (pinned in pyproject.toml): with pytest 9.2 and pytest-xdist 3.8,
``xdist_group`` has no effect (xdist renames ``item._nodeid``; pytest 9 builds ``nodeid`` from
``item._id``), so ``--dist loadgroup`` would schedule every test on its own, each worker could
start its own Ray cluster and a module fixture would run once per worker.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Before anything imports Ray: no usage reporting, and a loopback node address (Ray otherwise
# advertises the machine's routable IP even for a one-machine cluster).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

RAY_NUM_CPUS = 4  # logical CPUs: the tests start at most 4 actors of 1 CPU at once
RAY_OBJECT_STORE_BYTES = 150 * 2**20


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
            # with ``-n N --dist loadgroup`` all Ray tests share one xdist worker, one cluster
            item.add_marker(pytest.mark.xdist_group("ray"))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """The address of a local Ray cluster (GCS ``host:port``) that this session started."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():  # someone else's cluster: use it, leave it running
        yield ray.get_runtime_context().gcs_address
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # workers import the project (and test helpers) from the checkout, wherever they start
    path = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    os.environ["PYTHONPATH"] = path
    ray.init(address="local", num_cpus=RAY_NUM_CPUS, object_store_memory=RAY_OBJECT_STORE_BYTES,
             include_dashboard=False, log_to_driver=True)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
