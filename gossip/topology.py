"""Seeded communication topologies and mixing matrices for decentralized averaging.

A :class:`Topology` describes, for every outer step, which nodes each node receives from and the
mixing matrix ``W`` (``W[i, j]`` is the weight node ``i`` gives node ``j``'s model; rows sum to 1).
Everything here is pure: the same ``(spec, n, seed)`` always yields the same topology.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import networkx as nx
import numpy as np
import torch

__all__ = [
    "KNOWN_TOPOLOGIES",
    "MatchingTopology",
    "OnePeerExponentialTopology",
    "StaticTopology",
    "Topology",
    "check_doubly_stochastic",
    "make_topology",
    "metropolis_hastings",
    "random_matching",
    "spectral_gap",
    "uniform_weights",
]

AdjacencyLike = nx.Graph | torch.Tensor | np.ndarray | Sequence[Sequence[float]]

KNOWN_TOPOLOGIES: tuple[str, ...] = (
    "ring",
    "torus",
    "random-regular:D",
    "erdos-renyi:P",
    "small-world:K:P",
    "star",
    "complete",
    "exponential",
    "one-peer-exponential",
    "matching",
    "file:PATH",
)
_WEIGHT_SCHEMES = ("metropolis", "uniform")
_MAX_RESAMPLES = 100


# ----------------------------------------------------------------------------- topologies


class Topology(ABC):
    """A (possibly time-varying) communication graph over ``n`` nodes with its mixing weights."""

    n: int
    time_varying: bool
    spec: str

    def __init__(self, n: int, *, time_varying: bool, spec: str) -> None:
        if n < 2:
            raise ValueError(f"n must be >= 2, got n={n}")
        self.n = n
        self.time_varying = time_varying
        self.spec = spec

    @abstractmethod
    def mixing_matrix(self, step: int = 0) -> torch.Tensor:
        """``[n, n]`` float64 mixing matrix used at outer step ``step``; rows sum to 1."""

    def neighbors(self, step: int) -> list[list[int]]:
        """Sorted in-neighbours (excluding self) of each node at outer step ``step``."""
        return _support(self.mixing_matrix(step))

    def peer_table(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded per-node peer table at ``step``.

        Returns ``(peers, weights, self_weight)``: ``peers`` is ``[n, K]`` int64 padded with -1,
        ``weights[i, k] = W[i, peers[i, k]]`` (0 at pads) and ``self_weight[i] = W[i, i]``, where
        ``K`` is the maximum in-degree at that step.
        """
        w = self.mixing_matrix(step)
        nbrs = _support(w)
        k = max((len(row) for row in nbrs), default=0)
        peers = torch.full((self.n, k), -1, dtype=torch.int64)
        weights = torch.zeros((self.n, k), dtype=torch.float64)
        for i, row in enumerate(nbrs):
            if row:
                idx = torch.tensor(row, dtype=torch.int64)
                peers[i, : len(row)] = idx
                weights[i, : len(row)] = w[i, idx]
        return peers, weights, torch.diagonal(w).clone()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, n={self.n})"


class StaticTopology(Topology):
    """A fixed graph: every step has the same neighbours and mixing matrix."""

    def __init__(self, w: torch.Tensor, *, spec: str) -> None:
        w = _as_square(w, "W")
        super().__init__(w.shape[0], time_varying=False, spec=spec)
        self._w = w
        self._neighbors = _support(w)
        self._table: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def mixing_matrix(self, step: int = 0) -> torch.Tensor:
        _check_step(step)
        return self._w.clone()

    def peer_table(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Built once (the same every step); callers must not modify the returned tensors."""
        _check_step(step)
        if self._table is None:
            self._table = super().peer_table(0)
        return self._table

    def neighbors(self, step: int) -> list[list[int]]:
        _check_step(step)
        return [list(row) for row in self._neighbors]


class OnePeerExponentialTopology(Topology):
    """Directed one-peer exponential graph (Ying et al., 2021).

    At step ``t`` node ``i`` receives only from ``(i - 2**(t mod tau)) mod n`` with
    ``tau = ceil(log2 n)`` and ``W_t = (I + P_t) / 2``. For ``n`` a power of two the product of
    any ``tau`` consecutive matrices is exactly ``11^T / n``.
    """

    def __init__(self, n: int, *, spec: str = "one-peer-exponential") -> None:
        super().__init__(n, time_varying=True, spec=spec)
        self.tau = _ceil_log2(n)

    def mixing_matrix(self, step: int = 0) -> torch.Tensor:
        _check_step(step)
        shift = 2 ** (step % self.tau)
        w = 0.5 * torch.eye(self.n, dtype=torch.float64)
        rows = torch.arange(self.n)
        w[rows, (rows - shift) % self.n] += 0.5
        return w


class MatchingTopology(Topology):
    """Time-varying random perfect matchings: ``W_t = (I + P_t) / 2`` for a seeded pairing."""

    def __init__(self, n: int, *, seed: int = 0, spec: str = "matching") -> None:
        if n % 2 != 0:
            raise ValueError(f"topology 'matching' requires an even n, got n={n}")
        super().__init__(n, time_varying=True, spec=spec)
        self.seed = seed

    def mixing_matrix(self, step: int = 0) -> torch.Tensor:
        _check_step(step)
        w = 0.5 * torch.eye(self.n, dtype=torch.float64)
        for a, b in random_matching(self.n, 2, step, self.seed):
            w[a, b] = 0.5
            w[b, a] = 0.5
        return w


# ----------------------------------------------------------------------------- weights


def metropolis_hastings(adj: AdjacencyLike) -> torch.Tensor:
    """Metropolis-Hastings weights: ``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``W_ii = 1 - sum``.

    ``adj`` is an undirected ``networkx`` graph on nodes ``0..n-1`` or a symmetric ``[n, n]``
    adjacency matrix (nonzero off-diagonal entries are edges; the diagonal is ignored). The result
    is symmetric, doubly stochastic and non-negative.
    """
    a = _adjacency(adj)
    if not np.array_equal(a, a.T):
        raise ValueError("adj must be symmetric (undirected) for metropolis_hastings weights")
    deg = a.sum(axis=1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(axis=1))
    return torch.from_numpy(w)


def uniform_weights(adj: AdjacencyLike) -> torch.Tensor:
    """Uniform weights: ``W_ij = 1 / (d_i + 1)`` on each in-edge ``j -> i`` and on the diagonal.

    Row-stochastic; doubly stochastic only when every node has the same in- and out-degree
    (e.g. regular undirected graphs). ``adj[i, j]`` nonzero means node ``i`` receives from ``j``;
    a ``networkx.DiGraph`` edge ``(u, v)`` means ``v`` receives from ``u``.
    """
    a = _adjacency(adj)
    deg = a.sum(axis=1)
    w = np.where(a, 1.0, 0.0)
    np.fill_diagonal(w, 1.0)
    return torch.from_numpy(w / (deg[:, None] + 1.0))


def spectral_gap(w: torch.Tensor) -> float:
    """``1 - ||W - 11^T/n||_2``.

    For a symmetric doubly stochastic ``W`` this equals ``1 - max(|lambda_2|, |lambda_n|)``; for a
    non-symmetric doubly stochastic ``W`` it is one minus the second largest singular value.
    """
    m = _as_square(w, "W")
    n = m.shape[0]
    return float(1.0 - torch.linalg.matrix_norm(m - 1.0 / n, ord=2))


def check_doubly_stochastic(w: torch.Tensor, atol: float = 1e-9) -> None:
    """Raise ``ValueError`` unless ``W`` is non-negative with rows and columns summing to 1."""
    m = _as_square(w, "W")
    if m.numel() == 0:
        raise ValueError("W must be non-empty")
    min_entry = float(m.min())
    if min_entry < -atol:
        i, j = divmod(int(torch.argmin(m)), m.shape[1])
        raise ValueError(f"W has a negative entry W[{i}, {j}]={min_entry:.3g}")
    for axis, what in ((1, "row"), (0, "column")):
        err = (m.sum(dim=axis) - 1.0).abs()
        worst = int(torch.argmax(err))
        if float(err[worst]) > atol:
            total = float(m.sum(dim=axis)[worst])
            raise ValueError(f"W {what} {worst} sums to {total!r}, expected 1 (atol={atol})")


# ----------------------------------------------------------------------------- matchings


def random_matching(n: int, group_size: int, step: int, seed: int = 0) -> list[list[int]]:
    """Seeded random partition of ``range(n)`` into ``n // group_size`` groups.

    Follows the NoLoCo reference code: ``perm = default_rng(step + 1 + seed * 1_000_003)
    .permutation(n)`` (so ``seed=0`` reproduces ``default_rng(step + 1)``), dealt round-robin so
    element ``k`` of ``perm`` joins group ``k % (n // group_size)``. Each group is sorted.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got n={n}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got group_size={group_size}")
    if n % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide n={n}")
    _check_step(step)
    perm = np.random.default_rng(step + 1 + seed * 1_000_003).permutation(n)
    n_groups = n // group_size
    groups: list[list[int]] = [[] for _ in range(n_groups)]
    for k, node in enumerate(perm.tolist()):
        groups[k % n_groups].append(int(node))
    return [sorted(g) for g in groups]


# ----------------------------------------------------------------------------- factory


def make_topology(spec: str, n: int, *, seed: int = 0, weights: str = "metropolis") -> Topology:
    """Build a topology from a spec string such as ``"ring"`` or ``"erdos-renyi:0.3"``.

    Static graphs use ``weights`` (``"metropolis"`` or ``"uniform"``); ``exponential``,
    ``one-peer-exponential`` and ``matching`` define their own weights. Random graphs are drawn
    with ``seed`` (resampling with ``seed + 1, ...`` until connected where noted).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, got n={n!r}")
    if weights not in _WEIGHT_SCHEMES:
        raise ValueError(f"weights must be one of {_WEIGHT_SCHEMES}, got weights={weights!r}")
    spec = spec.strip()
    name, _, rest = spec.partition(":")
    args = rest.split(":") if rest else []

    if name == "file":
        if not rest:
            raise ValueError(f"topology spec must be 'file:PATH', got {spec!r}")
        return _static(_read_edge_list(rest, n), spec, weights)
    if name == "one-peer-exponential":
        _expect_args(spec, name, args, 0)
        return OnePeerExponentialTopology(n, spec=spec)
    if name == "matching":
        _expect_args(spec, name, args, 0)
        return MatchingTopology(n, seed=seed, spec=spec)
    if name == "exponential":
        _expect_args(spec, name, args, 0)
        return StaticTopology(uniform_weights(_exponential_adjacency(n)), spec=spec)
    if name == "ring":
        _expect_args(spec, name, args, 0)
        return _static(nx.cycle_graph(n), spec, weights)
    if name == "star":
        _expect_args(spec, name, args, 0)
        return _static(nx.star_graph(n - 1), spec, weights)
    if name == "complete":
        _expect_args(spec, name, args, 0)
        return _static(nx.complete_graph(n), spec, weights)
    if name == "torus":
        if len(args) > 1:
            raise ValueError(f"topology spec must be 'torus' or 'torus:R', got {spec!r}")
        rows = _parse_int(args[0], "R", spec) if args else _near_square_rows(n)
        return _static(_torus(n, rows), spec, weights)
    if name == "random-regular":
        _expect_args(spec, name, args, 1, "random-regular:D")
        d = _parse_int(args[0], "D", spec)
        if d < 1 or d >= n:
            raise ValueError(f"random-regular needs 1 <= D < n, got D={d} with n={n}")
        if (n * d) % 2 != 0:
            raise ValueError(f"random-regular needs n*D even, got D={d} with n={n}")
        graph = _first_connected(spec, n, seed, lambda s: nx.random_regular_graph(d, n, seed=s))
        return _static(graph, spec, weights)
    if name == "erdos-renyi":
        _expect_args(spec, name, args, 1, "erdos-renyi:P")
        p = _parse_float(args[0], "P", spec)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"erdos-renyi needs 0 <= P <= 1, got P={p}")
        graph = _first_connected(spec, n, seed, lambda s: nx.gnp_random_graph(n, p, seed=s))
        return _static(graph, spec, weights)
    if name == "small-world":
        _expect_args(spec, name, args, 2, "small-world:K:P")
        k = _parse_int(args[0], "K", spec)
        p = _parse_float(args[1], "P", spec)
        if k < 2 or k >= n:
            raise ValueError(f"small-world needs 2 <= K < n, got K={k} with n={n}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"small-world needs 0 <= P <= 1, got P={p}")
        try:
            graph = nx.connected_watts_strogatz_graph(n, k, p, tries=_MAX_RESAMPLES, seed=seed)
        except nx.NetworkXError as exc:
            raise ValueError(
                f"topology {spec!r} with n={n} is disconnected after {_MAX_RESAMPLES} samples"
            ) from exc
        return _static(graph, spec, weights)
    raise ValueError(
        f"unknown topology {spec!r} (name {name!r}); known: {', '.join(KNOWN_TOPOLOGIES)}"
    )


# ----------------------------------------------------------------------------- helpers


def _static(graph: nx.Graph, spec: str, weights: str) -> StaticTopology:
    n = graph.number_of_nodes()
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise ValueError(f"topology {spec!r} with n={n} is disconnected ({parts} components)")
    w = metropolis_hastings(graph) if weights == "metropolis" else uniform_weights(graph)
    return StaticTopology(w, spec=spec)


def _first_connected(spec: str, n: int, seed: int, sample: Callable[[int], nx.Graph]) -> nx.Graph:
    for s in range(seed, seed + _MAX_RESAMPLES):
        graph = sample(s)
        if nx.is_connected(graph):
            return graph
    raise ValueError(
        f"topology {spec!r} with n={n} is disconnected for all {_MAX_RESAMPLES} samples "
        f"(seeds {seed}..{seed + _MAX_RESAMPLES - 1})"
    )


def _exponential_adjacency(n: int) -> np.ndarray:
    """Directed static exponential graph: node ``i`` receives from ``(i - 2**k) mod n``."""
    a = np.zeros((n, n), dtype=bool)
    rows = np.arange(n)
    for k in range(_ceil_log2(n)):
        a[rows, (rows - 2**k) % n] = True
    return a


def _near_square_rows(n: int) -> int:
    rows = [r for r in range(3, math.isqrt(n) + 1) if n % r == 0 and n // r >= 3]
    if not rows:
        raise ValueError(f"torus needs n = R*C with R, C >= 3, got n={n}")
    return rows[-1]


def _torus(n: int, rows: int) -> nx.Graph:
    if rows < 3 or n % rows != 0 or n // rows < 3:
        raise ValueError(f"torus needs R >= 3 dividing n with n/R >= 3, got R={rows} with n={n}")
    cols = n // rows
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})


def _read_edge_list(path: str, n: int) -> nx.Graph:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"topology file PATH={path!r} does not exist")
    graph = nx.Graph()
    for lineno, raw in enumerate(p.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        try:
            u, v = (int(x) for x in fields)
        except ValueError:
            raise ValueError(
                f"{path}:{lineno}: expected 'u v' with integer nodes, got {raw!r}"
            ) from None
        for node in (u, v):
            if not 0 <= node < n:
                raise ValueError(f"{path}:{lineno}: node {node} outside 0..{n - 1} (n={n})")
        if u == v:
            raise ValueError(f"{path}:{lineno}: self-loop on node {u}")
        graph.add_edge(u, v)
    if graph.number_of_nodes() != n:
        raise ValueError(
            f"topology file {path!r} has {graph.number_of_nodes()} nodes, expected n={n}"
        )
    return graph


def _adjacency(adj: AdjacencyLike) -> np.ndarray:
    """Boolean ``[n, n]`` matrix, ``a[i, j]`` = node ``i`` receives from ``j``; no self-loops."""
    if isinstance(adj, nx.Graph):
        n = adj.number_of_nodes()
        if set(adj.nodes) != set(range(n)):
            raise ValueError(f"adj graph nodes must be 0..{n - 1}, got {sorted(adj.nodes)!r}")
        a = nx.to_numpy_array(adj, nodelist=range(n), weight=None) != 0
        if adj.is_directed():
            a = a.T  # networkx row u has u's out-edges; we index by receiver
    else:
        t = adj.detach().cpu().numpy() if isinstance(adj, torch.Tensor) else np.asarray(adj)
        if t.ndim != 2 or t.shape[0] != t.shape[1]:
            raise ValueError(f"adj must be a square matrix, got shape {tuple(t.shape)}")
        a = t != 0
    a = a.copy()
    np.fill_diagonal(a, False)
    return a


def _as_square(w: torch.Tensor, name: str) -> torch.Tensor:
    m = torch.as_tensor(w, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(m.shape)}")
    return m


def _support(w: torch.Tensor) -> list[list[int]]:
    off = w != 0
    off.fill_diagonal_(False)
    return [torch.nonzero(row).flatten().tolist() for row in off]


def _check_step(step: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got step={step}")


def _ceil_log2(n: int) -> int:
    return max(1, (n - 1).bit_length())


def _expect_args(spec: str, name: str, args: list[str], count: int, form: str = "") -> None:
    if len(args) != count:
        raise ValueError(f"topology spec must be {form or name!r}, got {spec!r}")


def _parse_int(text: str, field: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{field} in {spec!r} must be an integer, got {field}={text!r}") from None


def _parse_float(text: str, field: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{field} in {spec!r} must be a number, got {field}={text!r}") from None
