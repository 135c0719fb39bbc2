"""Non-IID data partitioners: pure, seeded functions from labels to per-node index arrays."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "class_entropy",
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


def distinct(values: np.ndarray) -> np.ndarray:
    """The sorted distinct values of a 1-D array: ``np.unique(values)`` without its check for
    masked arrays, which imports ``numpy.ma`` (~25 ms of a run's start-up)."""
    ordered = np.sort(values)
    if ordered.size == 0:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


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
    samples, owners = [], []  # every class's samples and the node each goes to, class by class
    for c in distinct(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        sizes = _sizes_from_proportions(len(idx), _dirichlet_sample(rng, alpha, num_nodes))
        samples.append(idx)
        owners.append(np.repeat(np.arange(num_nodes), sizes))
    flat = np.concatenate(samples)
    order = np.argsort(np.concatenate(owners), kind="stable")  # by node, classes in order
    lengths = np.bincount(np.concatenate(owners), minlength=num_nodes)
    per_node = np.split(flat[order], np.cumsum(lengths)[:-1])
    parts = [rng.permutation(b) if len(b) else np.empty(0, dtype=np.int64) for b in per_node]
    for node in np.flatnonzero(lengths == 0).tolist():  # in node order, as the repair was
        donor = int(np.argmax(lengths))
        parts[node] = parts[donor][-1:]
        parts[donor] = parts[donor][:-1]
        lengths[node], lengths[donor] = 1, lengths[donor] - 1
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

#: Nodes drawn together by :func:`sampled_partition` (one generator per block of node ids).
_SAMPLE_BLOCK = 1024


def sampled_partition(spec: str, labels: torch.Tensor | None, n: int, size: int, *,
                      num_samples: int, seed: int) -> list[np.ndarray]:
    """Each node draws its own shard of ``size`` samples from the whole training set.

    ``spec`` is ``iid`` (uniform, without replacement within a node) or ``dirichlet:ALPHA``
    (the node's class proportions ~ Dir(ALPHA), then samples uniform within each drawn class;
    Tian et al.'s non-IID sampling). The nodes are drawn in blocks of :data:`_SAMPLE_BLOCK`
    ids, each from its own generator ``(seed, block)`` and always whole, so node i's draw
    depends on ``(seed, i)`` only: shards overlap across nodes, any number of nodes works, and
    no Python loop runs per node.
    """
    kind, _, arg = spec.partition(":")
    if kind == "iid" and not arg:
        draw = _iid_block
    elif kind != "dirichlet" or not arg:
        raise ValueError(f"expected 'sample:iid' or 'sample:dirichlet:ALPHA', got "
                         f"'sample:{spec}'")
    else:
        alpha = float(arg)
        if labels is None:
            raise ValueError("sample:dirichlet needs class labels (a classification task)")
        y = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        order = np.argsort(y, kind="stable")
        _, counts = np.unique(y, return_counts=True)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

        def draw(rng: np.random.Generator, rows: int, size: int, num_samples: int
                 ) -> np.ndarray:
            return _dirichlet_block(rng, rows, size, alpha, order, counts, starts)
    blocks = [draw(np.random.default_rng([seed, _SAMPLE, b]), _SAMPLE_BLOCK, size,
                   num_samples) for b in range(-(-n // _SAMPLE_BLOCK))]
    return list(np.sort(np.concatenate(blocks)[:n], axis=1))


def _iid_block(rng: np.random.Generator, rows: int, size: int, num_samples: int
               ) -> np.ndarray:
    if size > num_samples:  # more samples than the set holds: with replacement
        return rng.integers(0, num_samples, size=(rows, size))
    step = max(1, (1 << 22) // num_samples)  # random keys of at most ~4M floats at a time
    parts = [np.argpartition(rng.random((min(step, rows - r0), num_samples)), size - 1,
                             axis=1)[:, :size] for r0 in range(0, rows, step)]
    return np.concatenate(parts).astype(np.int64)


def _dirichlet_block(rng: np.random.Generator, rows: int, size: int, alpha: float,
                     order: np.ndarray, counts: np.ndarray, starts: np.ndarray) -> np.ndarray:
    k = len(counts)
    p = rng.dirichlet(np.full(k, alpha), size=rows)
    one_class = rng.integers(0, k, size=rows)
    bad = ~np.isfinite(p).all(axis=1) | ~(p.sum(axis=1) > 0)  # alpha so small it underflows
    p[bad] = np.eye(k)[one_class[bad]]
    cdf = np.cumsum(p, axis=1)
    cdf[:, -1] = np.inf
    # each row's class draws by inverse CDF, all rows at once: row r's CDF shifted by 2r
    shift = 2.0 * np.arange(rows)[:, None]
    drawn = np.searchsorted((np.minimum(cdf, 1.5) + shift).ravel(),
                            (rng.random((rows, size)) + shift).ravel(), side="right")
    classes = np.minimum(drawn.reshape(rows, size) - k * np.arange(rows)[:, None], k - 1)
    within = (rng.random((rows, size)) * counts[classes]).astype(np.int64)
    return order[starts[classes] + np.minimum(within, counts[classes] - 1)].astype(np.int64)


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
    if not len(parts):
        return np.zeros((0, num_classes), dtype=np.int64)
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
    node = np.repeat(np.arange(len(parts), dtype=np.int64), sizes)
    cells = np.bincount(node * num_classes + y[flat], minlength=len(parts) * num_classes)
    return cells.reshape(len(parts), num_classes)


def class_entropy(counts: np.ndarray) -> np.ndarray:
    """Entropy in bits of each node's class distribution: ``counts`` [nodes, classes] -> [nodes]
    (0 for a node with one class, log2(classes) for a balanced one)."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=1) + 0.0
