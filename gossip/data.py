"""Non-IID data partitioners: pure, seeded functions from labels to per-node index arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "dirichlet",
    "iid",
    "label_distribution",
    "partition",
    "quantity_skew",
    "sampled_partition",
    "shards",
]



def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid: expected an integer >= {minimum}")
    return int(value)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise ValueError(f"alpha={alpha!r} is invalid: expected a positive finite number")
    value = float(alpha)
    if not np.isfinite(value) or value <= 0.0:
        raise ValueError(f"alpha={alpha!r} is invalid: expected a positive finite number")
    return value


def _check_enough(n: int, num_nodes: int) -> None:
    if n < num_nodes:
        raise ValueError(
            f"num_samples={n} is smaller than num_nodes={num_nodes}; every node needs a sample"
        )


def _as_labels(labels: torch.Tensor | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        array = labels.detach().cpu().numpy()
    else:
        array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(array.shape)}")
    integral = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)
    whole_floats = np.issubdtype(array.dtype, np.floating) and bool(
        np.all(array == np.round(array))
    )
    if array.size and not (integral or whole_floats):
        raise ValueError(f"labels must be integer class ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _sizes_from_proportions(total: int, proportions: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of ``total * proportions`` to integers summing to ``total``."""
    raw = proportions * total
    sizes = np.floor(raw).astype(np.int64)
    remainder = total - int(sizes.sum())
    if remainder > 0:
        order = np.argsort(-(raw - sizes), kind="stable")
        sizes[order[:remainder]] += 1
    return sizes


def _dirichlet_sample(rng: np.random.Generator, alpha: float, k: int) -> np.ndarray:
    p = rng.dirichlet(np.full(k, alpha))
    if not np.all(np.isfinite(p)) or p.sum() <= 0.0:  # extreme alpha underflow
        p = np.zeros(k)
        p[rng.integers(k)] = 1.0
    return p / p.sum()


def iid(n: int, num_nodes: int, seed: int = 0) -> list[np.ndarray]:
    """Shuffle ``range(n)`` and split it into ``num_nodes`` near-equal parts."""
    n = _check_int("n", n, 0)
    num_nodes = _check_int("num_nodes", num_nodes, 1)
    _check_enough(n, num_nodes)
    rng = np.random.default_rng(seed)
    return _finish(np.array_split(rng.permutation(n), num_nodes))


def dirichlet(
    labels: torch.Tensor | np.ndarray, num_nodes: int, alpha: float, seed: int = 0
) -> list[np.ndarray]:
    """Label skew (Hsu et al. 2019): each class is split across nodes by ``Dir(alpha)``.

    Nodes left empty are repaired by moving one sample from the currently largest node.
    """
    y = _as_labels(labels)
    num_nodes = _check_int("num_nodes", num_nodes, 1)
    alpha = _check_alpha(alpha)
    _check_enough(len(y), num_nodes)
    rng = np.random.default_rng(seed)
    buckets: list[list[np.ndarray]] = [[] for _ in range(num_nodes)]
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        sizes = _sizes_from_proportions(len(idx), _dirichlet_sample(rng, alpha, num_nodes))
        for node, chunk in enumerate(np.split(idx, np.cumsum(sizes)[:-1])):
            buckets[node].append(chunk)
    parts = [
        rng.permutation(np.concatenate(b)) if b else np.empty(0, dtype=np.int64) for b in buckets
    ]
    for node in range(num_nodes):
        if len(parts[node]) == 0:
            donor = int(np.argmax([len(p) for p in parts]))
            parts[node] = parts[donor][-1:]
            parts[donor] = parts[donor][:-1]
    return _finish(parts)


def shards(
    labels: torch.Tensor | np.ndarray, num_nodes: int, k: int, seed: int = 0
) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al. 2017): each node gets ``k`` single-class shards.

    Samples are grouped by label and cut into ``num_nodes * k`` shards that never straddle a
    class boundary (shards per class proportional to class size), then dealt out at random,
    so every node sees at most ``k`` classes.
    """
    y = _as_labels(labels)
    num_nodes = _check_int("num_nodes", num_nodes, 1)
    k = _check_int("k", k, 1)
    _check_enough(len(y), num_nodes)
    classes, counts = np.unique(y, return_counts=True)
    total = num_nodes * k
    if total < len(classes):
        raise ValueError(
            f"k={k} with num_nodes={num_nodes} gives {total} shards, fewer than the "
            f"{len(classes)} classes; use a larger k"
        )
    if total > len(y):
        raise ValueError(
            f"k={k} with num_nodes={num_nodes} gives {total} shards, more than the {len(y)} samples"
        )
    # One shard per class, then hand out the rest to the class with the largest shard size.
    per_class = np.ones(len(classes), dtype=np.int64)
    for _ in range(total - len(classes)):
        load = np.where(per_class < counts, counts / per_class, -1.0)
        per_class[int(np.argmax(load))] += 1
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    for c, m in zip(classes, per_class, strict=True):
        pieces.extend(np.array_split(rng.permutation(np.flatnonzero(y == c)), int(m)))
    order = rng.permutation(total)
    return _finish(
        [np.concatenate([pieces[j] for j in order[i * k : (i + 1) * k]]) for i in range(num_nodes)]
    )


def quantity_skew(n: int, num_nodes: int, alpha: float, seed: int = 0) -> list[np.ndarray]:
    """Quantity skew: iid-shuffled samples, node sizes ``1 + Dir(alpha)`` share of the rest."""
    n = _check_int("n", n, 0)
    num_nodes = _check_int("num_nodes", num_nodes, 1)
    alpha = _check_alpha(alpha)
    _check_enough(n, num_nodes)
    rng = np.random.default_rng(seed)
    proportions = _dirichlet_sample(rng, alpha, num_nodes)
    sizes = 1 + _sizes_from_proportions(n - num_nodes, proportions)
    return _finish(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def _parse_spec(spec: str) -> tuple[str, str | None]:
    if not isinstance(spec, str):
        raise ValueError(f"spec={spec!r} is invalid: expected a string")
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    return kind, (arg.strip() if sep else None)


def partition(
    spec: str,
    labels: torch.Tensor | np.ndarray | None,
    num_nodes: int,
    *,
    num_samples: int | None = None,
    seed: int = 0,
) -> list[np.ndarray]:
    """Partition samples across nodes according to ``spec``.

    ``spec`` is one of ``"iid"``, ``"dirichlet:ALPHA"``, ``"shards:K"`` or ``"quantity:ALPHA"``.
    Returns one sorted int64 index array per node; the arrays are disjoint, cover all samples
    and are all non-empty. ``labels`` may be None for ``iid``/``quantity`` if ``num_samples``
    is given.
    """
    kind, arg = _parse_spec(spec)
    if kind not in ("iid", "dirichlet", "shards", "quantity"):
        raise ValueError(
            f"unknown spec={spec!r}; expected 'iid', 'dirichlet:ALPHA', 'shards:K' or "
            "'quantity:ALPHA'"
        )
    if kind == "iid" and arg is not None:
        raise ValueError(f"spec={spec!r}: 'iid' takes no parameter")
    if kind != "iid" and not arg:
        raise ValueError(f"spec={spec!r}: '{kind}' needs a parameter, e.g. '{kind}:0.5'")

    y = None if labels is None else _as_labels(labels)
    if num_samples is not None:
        num_samples = _check_int("num_samples", num_samples, 0)
        if y is not None and num_samples != len(y):
            raise ValueError(f"num_samples={num_samples} does not match len(labels)={len(y)}")
    if y is not None:
        n = len(y)
    elif num_samples is not None:
        n = num_samples
    else:
        raise ValueError(f"spec={spec!r} needs labels or num_samples, got neither")

    if kind == "iid":
        return iid(n, num_nodes, seed)
    if kind == "shards":
        try:
            k = int(arg)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"spec={spec!r}: K must be an integer") from None
        if y is None:
            raise ValueError(f"spec={spec!r} needs labels, got labels=None")
        return shards(y, num_nodes, k, seed)
    try:
        alpha = float(arg)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"spec={spec!r}: ALPHA must be a number") from None
    if not np.isfinite(alpha) or alpha <= 0.0:
        raise ValueError(f"spec={spec!r}: ALPHA must be positive and finite")
    if kind == "quantity":
        return quantity_skew(n, num_nodes, alpha, seed)
    if y is None:
        raise ValueError(f"spec={spec!r} needs labels, got labels=None")
    return dirichlet(y, num_nodes, alpha, seed)


_SAMPLE = 0x5A3

def sampled_partition(spec: str, labels: torch.Tensor | None, n: int, size: int, *,
                      num_samples: int, seed: int) -> list[np.ndarray]:
    """Each node draws its own shard of ``size`` samples from the whole training set.

    ``spec`` is ``iid`` (uniform, without replacement within a node) or ``dirichlet:ALPHA``
    (the node's class proportions ~ Dir(ALPHA), then samples uniform within each drawn class;
    Tian et al.'s non-IID sampling). Node i's draw depends on ``(seed, i)`` only, so shards
    overlap across nodes and any number of nodes works.
    """
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        out = []
        for i in range(n):
            rng = np.random.default_rng([seed, _SAMPLE, i])
            out.append(np.sort(rng.choice(num_samples, size=size,
                                          replace=size > num_samples)))
        return out
    if kind != "dirichlet" or not arg:
        raise ValueError(f"expected 'sample:iid' or 'sample:dirichlet:ALPHA', got "
                         f"'sample:{spec}'")
    alpha = float(arg)
    if labels is None:
        raise ValueError("sample:dirichlet needs class labels (a classification task)")
    y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    classes = np.unique(y)
    members = [np.flatnonzero(y == c) for c in classes]
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, _SAMPLE, i])
        p = rng.dirichlet(np.full(len(classes), alpha))
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # alpha so small it underflows
            p = np.eye(len(classes))[rng.integers(0, len(classes))]
        drawn = rng.choice(len(classes), size=size, p=p)
        picks = [members[c][rng.integers(0, len(members[c]))] for c in drawn]
        out.append(np.sort(np.asarray(picks, dtype=np.int64)))
    return out



def label_distribution(
    labels: torch.Tensor | np.ndarray, parts: Sequence[np.ndarray], num_classes: int
) -> np.ndarray:
    """Per-node class counts, shape ``[num_nodes, num_classes]`` (int64)."""
    y = _as_labels(labels)
    num_classes = _check_int("num_classes", num_classes, 1)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got range "
            f"[{int(y.min())}, {int(y.max())}]"
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for node, part in enumerate(parts):
        counts[node] = np.bincount(y[np.asarray(part, dtype=np.int64)], minlength=num_classes)
    return counts


