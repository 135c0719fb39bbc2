"""Seeded communication topologies and mixing matrices for decentralized averaging.

A :class:`Topology` describes, for every outer step, which nodes each node receives from and the
mixing matrix ``W`` (``W[i, j]`` is the weight node ``i`` gives node ``j``'s model; rows sum to 1).
Everything here is pure: the same ``(spec, n, seed)`` always yields the same topology.
"""

from __future__ import annotations

import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # networkx costs ~0.3 s to import: loaded by the functions that build graphs
    import networkx as nx

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

AdjacencyLike = "nx.Graph | torch.Tensor | np.ndarray | Sequence[Sequence[float]]"

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


PeerTable = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Topology(ABC):
    """A (possibly time-varying) communication graph over ``n`` nodes with its mixing weights.

    The primary form is sparse, :meth:`peer_table` (``O(n K)``): the simulator merges thousands
    of nodes from it; the dense ``[n, n]`` :meth:`mixing_matrix` is derived for analysis.
    """

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
    def peer_table(self, step: int) -> PeerTable:
        """Padded per-node peer table at outer step ``step``.

        Returns ``(peers, weights, self_weight)``: ``peers`` is ``[n, K]`` int64, each row's
        in-neighbours in increasing order padded with -1; ``weights[i, k] = W[i, peers[i, k]]``
        (0 at pads) and ``self_weight[i] = W[i, i]`` (float64), where ``K`` is the maximum
        in-degree at that step. Callers must not modify the returned tensors.
        """

    def mixing_matrix(self, step: int = 0) -> torch.Tensor:
        """``[n, n]`` float64 mixing matrix used at outer step ``step``; rows sum to 1."""
        return _dense(self.peer_table(step))

    def neighbors(self, step: int) -> list[list[int]]:
        """Sorted in-neighbours (excluding self) of each node at outer step ``step``."""
        peers = self.peer_table(step)[0]
        return [[j for j in row if j >= 0] for row in peers.tolist()]

    def check_doubly_stochastic(self, step: int = 0, atol: float = 1e-9) -> None:
        """Raise ``ValueError`` unless ``W`` at ``step`` has rows and columns summing to 1."""
        peers, weights, self_weight = self.peer_table(step)
        cols = self_weight.clone()
        valid = peers >= 0
        cols.index_add_(0, peers[valid], weights[valid])
        try:
            _check_sums(self_weight + weights.sum(dim=1), cols, atol)
        except ValueError as e:
            raise ValueError(f"topology {self.spec!r} (n={self.n}): mixing weights are not "
                             f"doubly stochastic: {e}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, n={self.n})"


class StaticTopology(Topology):
    """A fixed graph: every step has the same neighbours and mixing weights."""

    def __init__(self, table: PeerTable, *, spec: str) -> None:
        peers, weights, self_weight = table
        super().__init__(peers.shape[0], time_varying=False, spec=spec)
        self._table = (peers, weights, self_weight)

    @classmethod
    def from_matrix(cls, w: torch.Tensor, *, spec: str) -> StaticTopology:
        """The topology whose mixing matrix is ``w`` (its off-diagonal support = the edges;
        ``w[i, j]`` is what node i takes from node j, so a directed graph is allowed).

        Raises ValueError for a non-finite or negative entry (naming it) and for a graph that
        is not strongly connected (some node never hears from some other, so the models never
        reach consensus), as :func:`make_topology` refuses disconnected graphs. Row and column
        sums are the algorithm's to check (D-PSGD and CHOCO need doubly stochastic weights).
        """
        import networkx as nx

        w = _as_square(w, "W")
        bad = ~torch.isfinite(w) | (w < 0)
        if bool(bad.any()):
            i, j = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"topology {spec!r}: W[{i}, {j}]={float(w[i, j])!r} is invalid: "
                             "mixing weights are finite and >= 0")
        graph = nx.from_numpy_array((w != 0).T.numpy().astype(np.int8), create_using=nx.DiGraph)
        if w.shape[0] >= 2 and not nx.is_strongly_connected(graph):
            parts = nx.number_strongly_connected_components(graph)
            raise ValueError(f"topology {spec!r} with n={w.shape[0]}: W's graph is not strongly "
                             f"connected ({parts} components): some nodes never hear from "
                             "others, so the models never reach consensus")
        off = w != 0
        off.fill_diagonal_(False)
        nbrs = [torch.nonzero(row).flatten().numpy() for row in off]
        return cls(_table(nbrs, lambda i, row: w[i, torch.from_numpy(row)].numpy(),
                          torch.diagonal(w).clone()), spec=spec)

    def peer_table(self, step: int) -> PeerTable:
        _check_step(step)
        return self._table


class OnePeerExponentialTopology(Topology):
    """Directed one-peer exponential graph (Ying et al., 2021).

    At step ``t`` node ``i`` receives only from ``(i - 2**(t mod tau)) mod n`` with
    ``tau = ceil(log2 n)`` and ``W_t = (I + P_t) / 2``. For ``n`` a power of two the product of
    any ``tau`` consecutive matrices is exactly ``11^T / n``.
    """

    def __init__(self, n: int, *, spec: str = "one-peer-exponential") -> None:
        super().__init__(n, time_varying=True, spec=spec)
        self.tau = _ceil_log2(n)

    def peer_table(self, step: int) -> PeerTable:
        _check_step(step)
        shift = 2 ** (step % self.tau)
        peers = ((torch.arange(self.n) - shift) % self.n).unsqueeze(1)
        half = torch.full((self.n,), 0.5, dtype=torch.float64)
        return peers, half.unsqueeze(1), half


class MatchingTopology(Topology):
    """Time-varying random perfect matchings: ``W_t = (I + P_t) / 2`` for a seeded pairing."""

    def __init__(self, n: int, *, seed: int = 0, spec: str = "matching") -> None:
        if n % 2 != 0:
            raise ValueError(f"topology 'matching' requires an even n, got n={n}")
        super().__init__(n, time_varying=True, spec=spec)
        self.seed = seed

    def peer_table(self, step: int) -> PeerTable:
        _check_step(step)
        pairs = torch.tensor(random_matching(self.n, 2, step, self.seed), dtype=torch.int64)
        peers = torch.empty(self.n, dtype=torch.int64)
        peers[pairs[:, 0]] = pairs[:, 1]
        peers[pairs[:, 1]] = pairs[:, 0]
        half = torch.full((self.n,), 0.5, dtype=torch.float64)
        return peers.unsqueeze(1), half.unsqueeze(1), half


# ----------------------------------------------------------------------------- weights


def metropolis_hastings(adj: AdjacencyLike) -> torch.Tensor:
    """Metropolis-Hastings weights: ``W_ij = 1 / (1 + max(d_i, d_j))`` on edges, ``W_ii = 1 - sum``.

    ``adj`` is an undirected ``networkx`` graph on nodes ``0..n-1`` or a symmetric ``[n, n]``
    adjacency matrix (nonzero off-diagonal entries are edges; the diagonal is ignored). The result
    is symmetric, doubly stochastic and non-negative.
    """
    return _dense(_metropolis_table(_in_neighbors(adj, symmetric=True)))


def uniform_weights(adj: AdjacencyLike) -> torch.Tensor:
    """Uniform weights: ``W_ij = 1 / (d_i + 1)`` on each in-edge ``j -> i`` and on the diagonal.

    Row-stochastic; doubly stochastic only when every node has the same in- and out-degree
    (e.g. regular undirected graphs). ``adj[i, j]`` nonzero means node ``i`` receives from ``j``;
    a ``networkx.DiGraph`` edge ``(u, v)`` means ``v`` receives from ``u``.
    """
    return _dense(_uniform_table(_in_neighbors(adj)))


def _metropolis_table(nbrs: list[np.ndarray]) -> PeerTable:
    deg = np.array([len(row) for row in nbrs], dtype=np.float64)
    table = _table(nbrs, lambda i, row: 1.0 / (1.0 + np.maximum(deg[i], deg[row])),
                   torch.ones(len(nbrs), dtype=torch.float64))
    table[2].sub_(table[1].sum(dim=1))  # W_ii = 1 - sum of the row
    return table


def _uniform_table(nbrs: list[np.ndarray]) -> PeerTable:
    share = torch.tensor([1.0 / (len(row) + 1.0) for row in nbrs], dtype=torch.float64)
    return _table(nbrs, lambda i, row: np.full(len(row), float(share[i])), share)


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
    _check_sums(m.sum(dim=1), m.sum(dim=0), atol)


def _check_sums(rows: torch.Tensor, cols: torch.Tensor, atol: float) -> None:
    for sums, what in ((rows, "row"), (cols, "column")):
        err = (sums - 1.0).abs()
        worst = int(torch.argmax(err))
        if float(err[worst]) > atol:
            raise ValueError(f"W {what} {worst} sums to {float(sums[worst])!r}, expected 1 "
                             f"(atol={atol})")


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
    import networkx as nx

    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"topology {spec!r} needs n >= 2 nodes (one node has no neighbour to "
                         f"gossip with: run more ranks or nodes), got n={n!r}")
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
        return StaticTopology(_uniform_table(_exponential_in_neighbors(n)), spec=spec)
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
    import networkx as nx

    n = graph.number_of_nodes()
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise ValueError(f"topology {spec!r} with n={n} is disconnected ({parts} components)")
    nbrs = _in_neighbors(graph)
    table = _metropolis_table(nbrs) if weights == "metropolis" else _uniform_table(nbrs)
    return StaticTopology(table, spec=spec)


def _first_connected(spec: str, n: int, seed: int, sample: Callable[[int], nx.Graph]) -> nx.Graph:
    import networkx as nx

    for s in range(seed, seed + _MAX_RESAMPLES):
        graph = sample(s)
        if nx.is_connected(graph):
            return graph
    raise ValueError(
        f"topology {spec!r} with n={n} is disconnected for all {_MAX_RESAMPLES} samples "
        f"(seeds {seed}..{seed + _MAX_RESAMPLES - 1})"
    )


def _exponential_in_neighbors(n: int) -> list[np.ndarray]:
    """Directed static exponential graph: node ``i`` receives from ``(i - 2**k) mod n``."""
    shifts = 2 ** np.arange(_ceil_log2(n))
    return [np.sort((i - shifts) % n) for i in range(n)]


def _near_square_rows(n: int) -> int:
    rows = [r for r in range(3, math.isqrt(n) + 1) if n % r == 0 and n // r >= 3]
    if not rows:
        raise ValueError(f"torus needs n = R*C with R, C >= 3, got n={n}")
    return rows[-1]


def _torus(n: int, rows: int) -> nx.Graph:
    import networkx as nx

    if rows < 3 or n % rows != 0 or n // rows < 3:
        raise ValueError(f"torus needs R >= 3 dividing n with n/R >= 3, got R={rows} with n={n}")
    cols = n // rows
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.relabel_nodes(grid, {(r, c): r * cols + c for r, c in grid.nodes})


def _read_edge_list(path: str, n: int) -> nx.Graph:
    import networkx as nx

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


def _is_graph(adj: Any) -> bool:
    """Whether ``adj`` is a networkx graph (without importing networkx for other inputs)."""
    nx_mod = sys.modules.get("networkx")
    return nx_mod is not None and isinstance(adj, nx_mod.Graph)


def _in_neighbors(adj: AdjacencyLike, *, symmetric: bool = False) -> list[np.ndarray]:
    """Sorted in-neighbours of each node (``i`` receives from ``j``), self-loops dropped.

    A ``networkx`` graph is read edge by edge (no ``n x n`` matrix); a matrix ``adj[i, j]``
    nonzero means ``i`` receives from ``j``; ``symmetric`` requires an undirected graph."""
    if _is_graph(adj):
        n = adj.number_of_nodes()
        if set(adj.nodes) != set(range(n)):
            raise ValueError(f"adj graph nodes must be 0..{n - 1}, got {sorted(adj.nodes)!r}")
        if symmetric and adj.is_directed():
            raise ValueError("adj must be symmetric (undirected) for metropolis_hastings weights")
        source = adj.pred if adj.is_directed() else adj.adj
        return [np.array(sorted(j for j in source[i] if j != i), dtype=np.int64)
                for i in range(n)]
    t = adj.detach().cpu().numpy() if isinstance(adj, torch.Tensor) else np.asarray(adj)
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"adj must be a square matrix, got shape {tuple(t.shape)}")
    a = t != 0
    np.fill_diagonal(a, False)
    if symmetric and not np.array_equal(a, a.T):
        raise ValueError("adj must be symmetric (undirected) for metropolis_hastings weights")
    return [np.flatnonzero(row) for row in a]


def _table(nbrs: Sequence[np.ndarray], weight: Callable[[int, np.ndarray], np.ndarray],
           self_weight: torch.Tensor) -> PeerTable:
    """A peer table from sorted in-neighbour lists and ``weight(i, row)`` of each row."""
    n = len(nbrs)
    k = max((len(row) for row in nbrs), default=0)
    peers = np.full((n, k), -1, dtype=np.int64)
    weights = np.zeros((n, k), dtype=np.float64)
    for i, row in enumerate(nbrs):
        if len(row):
            peers[i, : len(row)] = row
            weights[i, : len(row)] = weight(i, row)
    return torch.from_numpy(peers), torch.from_numpy(weights), self_weight


def _dense(table: PeerTable) -> torch.Tensor:
    peers, weights, self_weight = table
    n = peers.shape[0]
    w = torch.diag(self_weight.to(torch.float64))
    valid = peers >= 0
    rows = torch.arange(n).unsqueeze(1).expand_as(peers)
    w.index_put_((rows[valid], peers[valid]), weights[valid], accumulate=True)
    return w


def _as_square(w: torch.Tensor, name: str) -> torch.Tensor:
    m = torch.as_tensor(w, dtype=torch.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(m.shape)}")
    return m


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
