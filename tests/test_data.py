"""Tests for the non-IID partitioners in gossip.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gossip.data import (
    dirichlet,
    iid,
    label_distribution,
    partition,
    quantity_skew,
    shards,
)
from gossip.plots import plot_label_distribution

NUM_CLASSES = 10
SPECS = ["iid", "dirichlet:0.1", "dirichlet:1.0", "dirichlet:0.01", "shards:2", "quantity:0.5"]


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    rng = np.random.default_rng(123)
    return rng.integers(0, NUM_CLASSES, size=2000)


def _check_valid(parts: list[np.ndarray], n: int, num_nodes: int) -> None:
    assert len(parts) == num_nodes
    for p in parts:
        assert p.dtype == np.int64
        assert p.ndim == 1
        assert len(p) >= 1
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
    allidx = np.concatenate(parts)
    assert len(allidx) == n  # disjoint ...
    assert np.array_equal(np.sort(allidx), np.arange(n))  # ... and covering


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("num_nodes", [1, 7, 50])
def test_partition_disjoint_cover_nonempty(labels: np.ndarray, spec: str, num_nodes: int) -> None:
    if spec.startswith("shards") and num_nodes * 2 < NUM_CLASSES:
        pytest.skip("fewer shards than classes is rejected")
    parts = partition(spec, labels, num_nodes, seed=3)
    _check_valid(parts, len(labels), num_nodes)


@pytest.mark.parametrize("spec", SPECS)
def test_partition_accepts_torch_labels(labels: np.ndarray, spec: str) -> None:
    a = partition(spec, labels, 9, seed=5)
    b = partition(spec, torch.from_numpy(labels), 9, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("spec", SPECS)
def test_partition_seeded_determinism(labels: np.ndarray, spec: str) -> None:
    a = partition(spec, labels, 16, seed=11)
    b = partition(spec, labels, 16, seed=11)
    c = partition(spec, labels, 16, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_without_labels() -> None:
    for spec in ("iid", "quantity:1.0"):
        parts = partition(spec, None, 6, num_samples=100, seed=0)
        _check_valid(parts, 100, 6)
    assert [len(p) for p in partition("iid", None, 3, num_samples=10)] == [4, 3, 3]


def test_individual_partitioners_match_partition(labels: np.ndarray) -> None:
    n = len(labels)
    pairs = [
        (iid(n, 8, 4), partition("iid", labels, 8, seed=4)),
        (dirichlet(labels, 8, 0.3, 4), partition("dirichlet:0.3", labels, 8, seed=4)),
        (shards(labels, 8, 3, 4), partition("shards:3", labels, 8, seed=4)),
        (quantity_skew(n, 8, 0.7, 4), partition("quantity:0.7", labels, 8, seed=4)),
    ]
    for direct, via_spec in pairs:
        assert all(np.array_equal(x, y) for x, y in zip(direct, via_spec, strict=True))


def _mean_max_class_fraction(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    counts = label_distribution(labels, parts, NUM_CLASSES)
    return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))


def test_dirichlet_small_alpha_more_skewed(labels: np.ndarray) -> None:
    skew = {
        alpha: np.mean(
            [
                _mean_max_class_fraction(labels, dirichlet(labels, 20, alpha, seed))
                for seed in range(3)
            ]
        )
        for alpha in (0.05, 1.0, 100.0)
    }
    assert skew[0.05] > skew[1.0] > skew[100.0]
    assert skew[0.05] > 0.6
    assert skew[100.0] < 0.2


def test_dirichlet_repairs_empty_nodes() -> None:
    y = np.repeat(np.arange(3), 4)  # 12 samples, 3 classes
    parts = dirichlet(y, 12, 0.01, seed=0)
    _check_valid(parts, 12, 12)
    assert all(len(p) == 1 for p in parts)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_at_most_k_classes(labels: np.ndarray, k: int) -> None:
    parts = shards(labels, 25, k, seed=1)
    _check_valid(parts, len(labels), 25)
    counts = label_distribution(labels, parts, NUM_CLASSES)
    classes_per_node = (counts > 0).sum(axis=1)
    assert classes_per_node.max() <= k
    sizes = np.array([len(p) for p in parts])
    assert sizes.max() <= 1.5 * sizes.min()  # shards are near equal in size


def test_shards_unbalanced_classes() -> None:
    y = np.array([0] * 500 + [1] * 30 + [2] * 5)
    parts = shards(y, 10, 2, seed=0)
    _check_valid(parts, len(y), 10)
    counts = label_distribution(y, parts, 3)
    assert ((counts > 0).sum(axis=1) <= 2).all()


def test_quantity_skew_sizes_vary() -> None:
    sizes = np.array([len(p) for p in quantity_skew(5000, 20, 0.3, seed=0)])
    assert sizes.min() >= 1
    assert sizes.max() > 3 * np.median(sizes)
    balanced = np.array([len(p) for p in quantity_skew(5000, 20, 1000.0, seed=0)])
    assert balanced.std() < sizes.std()


def test_quantity_skew_is_label_agnostic_iid_shuffle(labels: np.ndarray) -> None:
    parts = partition("quantity:0.5", labels, 5, seed=0)
    big = max(parts, key=len)
    fractions = np.bincount(labels[big], minlength=NUM_CLASSES) / len(big)
    assert fractions.max() < 0.2


def test_label_distribution_counts(labels: np.ndarray) -> None:
    parts = partition("dirichlet:0.5", labels, 7, seed=2)
    counts = label_distribution(torch.from_numpy(labels), parts, NUM_CLASSES)
    assert counts.shape == (7, NUM_CLASSES)
    assert counts.sum() == len(labels)
    assert np.array_equal(counts.sum(axis=0), np.bincount(labels, minlength=NUM_CLASSES))
    assert np.array_equal(counts.sum(axis=1), [len(p) for p in parts])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spec": "banana"}, "banana"),
        ({"spec": "dirichlet:-1"}, "dirichlet:-1"),
        ({"spec": "dirichlet:abc"}, "dirichlet:abc"),
        ({"spec": "dirichlet"}, "'dirichlet'"),
        ({"spec": "shards:1.5"}, "shards:1.5"),
        ({"spec": "iid:3"}, "iid:3"),
        ({"spec": "quantity:0"}, "quantity:0"),
        ({"num_nodes": 0}, "num_nodes.*0"),
        ({"num_nodes": 3000}, "num_samples=2000"),
        ({"spec": "shards:0"}, "k=0"),
        ({"spec": "shards:1", "num_nodes": 5}, "k=1"),  # 5 shards < 10 classes
        ({"spec": "shards:100", "num_nodes": 50}, "k=100"),  # more shards than samples
    ],
)
def test_partition_errors_name_the_value(
    labels: np.ndarray, kwargs: dict[str, object], match: str
) -> None:
    args: dict[str, object] = {"spec": "iid", "num_nodes": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        partition(args["spec"], labels, args["num_nodes"], seed=0)  # type: ignore[arg-type]


def test_partition_label_errors() -> None:
    with pytest.raises(ValueError, match="labels=None"):
        partition("dirichlet:0.5", None, 3, num_samples=10)
    with pytest.raises(ValueError, match="neither"):
        partition("iid", None, 3)
    with pytest.raises(ValueError, match="num_samples=5"):
        partition("iid", np.zeros(10, dtype=int), 3, num_samples=5)
    with pytest.raises(ValueError, match="num_samples=2"):
        partition("quantity:1.0", None, 3, num_samples=2)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet(np.zeros(10, dtype=int), 2, 0.0)
    with pytest.raises(ValueError, match=r"num_classes=3"):
        label_distribution(np.array([0, 5]), [np.array([0, 1])], 3)


def test_plot_writes_png(tmp_path: Path, labels: np.ndarray) -> None:
    parts = partition("dirichlet:0.3", labels, 12, seed=0)
    out = tmp_path / "dist.png"
    plot_label_distribution(label_distribution(labels, parts, NUM_CLASSES), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_many_nodes(tmp_path: Path) -> None:
    y = np.arange(1000) % 3
    parts = partition("iid", y, 250, seed=0)
    out = tmp_path / "many.png"
    plot_label_distribution(label_distribution(y, parts, 3), str(out))
    assert out.stat().st_size > 0
