"""Tests for gossip.topology against hand-built or closed-form references."""

from __future__ import annotations

import math
import re
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

from gossip.topology import (
    StaticTopology,
    check_doubly_stochastic,
    make_topology,
    metropolis_hastings,
    random_matching,
    spectral_gap,
    uniform_weights,
)

STATIC_SPECS = [
    "ring",
    "torus",
    "random-regular:3",
    "erdos-renyi:0.3",
    "small-world:4:0.2",
    "star",
    "complete",
]


def _j(n: int) -> torch.Tensor:
    return torch.full((n, n), 1.0 / n, dtype=torch.float64)


# ----------------------------------------------------------------------------- neighbours


def test_ring_neighbors() -> None:
    topo = make_topology("ring", 6)
    expected = [sorted({(i - 1) % 6, (i + 1) % 6}) for i in range(6)]
    assert topo.neighbors(0) == expected
    assert topo.neighbors(17) == expected
    assert not topo.time_varying
    assert topo.n == 6


def test_torus_neighbors_near_square_and_rows() -> None:
    # n=12 -> 3 rows x 4 cols, row-major node ids r*4 + c.
    topo = make_topology("torus", 12)
    rows, cols = 3, 4
    for i, nbrs in enumerate(topo.neighbors(0)):
        r, c = divmod(i, cols)
        ref = {
            ((r - 1) % rows) * cols + c,
            ((r + 1) % rows) * cols + c,
            r * cols + (c - 1) % cols,
            r * cols + (c + 1) % cols,
        }
        assert nbrs == sorted(ref)
    # Explicit rows: 4 x 3.
    topo = make_topology("torus:4", 12)
    assert topo.neighbors(0)[0] == sorted({3, 9, 1, 2})
    # n=16 is near-square 4x4.
    assert make_topology("torus", 16).neighbors(0)[5] == [1, 4, 6, 9]


def test_star_and_complete_neighbors() -> None:
    star = make_topology("star", 5)
    assert star.neighbors(0) == [[1, 2, 3, 4], [0], [0], [0], [0]]
    comp = make_topology("complete", 4)
    assert comp.neighbors(3) == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]


@pytest.mark.parametrize("spec", STATIC_SPECS)
def test_static_graphs_symmetric_and_step_invariant(spec: str) -> None:
    topo = make_topology(spec, 16, seed=3)
    nbrs = topo.neighbors(0)
    for i, row in enumerate(nbrs):
        assert row == sorted(row)
        assert i not in row
        for j in row:
            assert i in nbrs[j]
    w = topo.mixing_matrix()
    assert torch.equal(w, w.T)
    assert torch.equal(w, topo.mixing_matrix(5))
    assert topo.neighbors(9) == nbrs


def test_random_regular_degree() -> None:
    topo = make_topology("random-regular:5", 12, seed=1)
    assert all(len(row) == 5 for row in topo.neighbors(0))


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("spec", STATIC_SPECS)
def test_metropolis_doubly_stochastic(spec: str) -> None:
    w = make_topology(spec, 16, seed=7, weights="metropolis").mixing_matrix()
    assert w.dtype == torch.float64
    assert bool((w >= 0).all())
    check_doubly_stochastic(w)


def test_metropolis_matches_formula_on_path() -> None:
    # Path 0-1-2: degrees 1, 2, 1 -> off-diagonal 1/3, diagonals by complement.
    w = metropolis_hastings(nx.path_graph(3))
    ref = torch.tensor(
        [[2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 1 / 3, 2 / 3]], dtype=torch.float64
    )
    torch.testing.assert_close(w, ref)
    # Array input gives the same answer.
    torch.testing.assert_close(metropolis_hastings(nx.to_numpy_array(nx.path_graph(3))), ref)


def test_uniform_weights_row_stochastic_star() -> None:
    w = uniform_weights(nx.star_graph(3))
    ref = torch.tensor(
        [[0.25] * 4, [0.5, 0.5, 0, 0], [0.5, 0, 0.5, 0], [0.5, 0, 0, 0.5]], dtype=torch.float64
    )
    torch.testing.assert_close(w, ref)
    with pytest.raises(ValueError, match="column 0"):
        check_doubly_stochastic(w)


def test_check_doubly_stochastic_rejects() -> None:
    with pytest.raises(ValueError, match=r"negative entry W\[0, 1\]"):
        check_doubly_stochastic(torch.tensor([[1.5, -0.5], [-0.5, 1.5]]))
    with pytest.raises(ValueError, match="row 1 sums to"):
        check_doubly_stochastic(torch.tensor([[1.0, 0.0], [0.0, 0.9]]))
    with pytest.raises(ValueError, match="square"):
        check_doubly_stochastic(torch.ones(2, 3))
    check_doubly_stochastic(_j(5))


# ----------------------------------------------------------------------------- spectral gap


@pytest.mark.parametrize("n", [5, 8, 11])
def test_ring_metropolis_gap_closed_form(n: int) -> None:
    w = make_topology("ring", n).mixing_matrix()
    ref_w = (torch.eye(n) + torch.roll(torch.eye(n), 1, 0) + torch.roll(torch.eye(n), -1, 0)) / 3
    torch.testing.assert_close(w, ref_w.double())
    lam = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(1, n)]
    assert spectral_gap(w) == pytest.approx(1 - max(abs(x) for x in lam), abs=1e-12)


def test_complete_uniform_gap_one() -> None:
    w = make_topology("complete", 9, weights="uniform").mixing_matrix()
    torch.testing.assert_close(w, _j(9))
    assert spectral_gap(w) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("n", [16, 32])
def test_static_exponential_gap(n: int) -> None:
    tau = math.ceil(math.log2(n))
    topo = make_topology("exponential", n, weights="metropolis")  # own weights, arg ignored
    w = topo.mixing_matrix()
    check_doubly_stochastic(w)
    # Node i receives from i - 2^k (mod n), weight 1/(tau+1) each, self included.
    for i, row in enumerate(topo.neighbors(0)):
        assert row == sorted({(i - 2**k) % n for k in range(tau)})
    torch.testing.assert_close(torch.diagonal(w), torch.full((n,), 1 / (tau + 1)).double())
    assert spectral_gap(w) == pytest.approx(2 / (1 + tau), abs=1e-10)


def test_spectral_gap_symmetric_matches_eigenvalues() -> None:
    w = make_topology("erdos-renyi:0.4", 12, seed=2).mixing_matrix()
    ev = np.sort(np.linalg.eigvalsh(w.numpy()))
    assert spectral_gap(w) == pytest.approx(1 - max(abs(ev[0]), abs(ev[-2])), abs=1e-10)


# ----------------------------------------------------------------------------- time-varying


@pytest.mark.parametrize("start", [0, 3])
def test_one_peer_exponential_exact_average(start: int) -> None:
    n, tau = 16, 4
    topo = make_topology("one-peer-exponential", n)
    assert topo.time_varying
    prod = torch.eye(n, dtype=torch.float64)
    for t in range(start, start + tau):
        w = topo.mixing_matrix(t)
        check_doubly_stochastic(w)
        assert topo.neighbors(t) == [[(i - 2 ** (t % tau)) % n] for i in range(n)]
        prod = w @ prod
    torch.testing.assert_close(prod, _j(n), atol=1e-14, rtol=0)


def test_random_matching_reference_example() -> None:
    assert np.random.default_rng(51).permutation(8).tolist() == [3, 1, 0, 6, 5, 2, 7, 4]
    assert random_matching(8, 2, 50) == [[3, 5], [1, 2], [0, 7], [4, 6]]
    groups = random_matching(12, 4, 9, seed=5)
    assert sorted(x for g in groups for x in g) == list(range(12))
    assert all(len(g) == 4 for g in groups)


def test_matching_topology_uses_random_matching() -> None:
    n = 8
    topo = make_topology("matching", n, seed=0)
    assert topo.time_varying
    for step in (0, 1, 50):
        w = topo.mixing_matrix(step)
        check_doubly_stochastic(w)
        ref = 0.5 * torch.eye(n, dtype=torch.float64)
        for a, b in random_matching(n, 2, step, 0):
            ref[a, b] = ref[b, a] = 0.5
        torch.testing.assert_close(w, ref)
    assert topo.neighbors(50) == [[7], [2], [1], [5], [6], [3], [4], [0]]


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize(
    "spec", ["random-regular:3", "erdos-renyi:0.3", "small-world:4:0.3", "matching"]
)
def test_seeded_determinism(spec: str) -> None:
    a = make_topology(spec, 16, seed=11)
    b = make_topology(spec, 16, seed=11)
    c = make_topology(spec, 16, seed=12)
    assert torch.equal(a.mixing_matrix(4), b.mixing_matrix(4))
    assert any(not torch.equal(a.mixing_matrix(s), c.mixing_matrix(s)) for s in range(4))


# ----------------------------------------------------------------------------- peer table


@pytest.mark.parametrize(
    ("spec", "weights"),
    [
        ("star", "metropolis"),
        ("star", "uniform"),
        ("erdos-renyi:0.3", "metropolis"),
        ("exponential", "metropolis"),
        ("one-peer-exponential", "metropolis"),
        ("matching", "metropolis"),
    ],
)
def test_peer_table_consistent_with_mixing_matrix(spec: str, weights: str) -> None:
    topo = make_topology(spec, 10 if spec != "one-peer-exponential" else 9, weights=weights)
    for step in (0, 2):
        w = topo.mixing_matrix(step)
        peers, pw, self_w = topo.peer_table(step)
        nbrs = topo.neighbors(step)
        assert peers.dtype == torch.int64
        assert pw.dtype == self_w.dtype == torch.float64
        assert peers.shape == pw.shape == (topo.n, max(len(r) for r in nbrs))
        rebuilt = torch.diag(self_w)
        for i in range(topo.n):
            valid = peers[i] >= 0
            assert peers[i][valid].tolist() == nbrs[i]
            assert bool((peers[i][~valid] == -1).all())
            assert bool((pw[i][~valid] == 0).all())
            rebuilt[i, peers[i][valid]] = pw[i][valid]
        torch.testing.assert_close(rebuilt, w, atol=0, rtol=0)


# ----------------------------------------------------------------------------- file + errors


def test_file_topology(tmp_path: Path) -> None:
    path = tmp_path / "g.txt"
    path.write_text("# a 4-cycle\n0 1\n1 2  # inline\n\n2 3\n3 0\n")
    topo = make_topology(f"file:{path}", 4)
    assert topo.neighbors(0) == make_topology("ring", 4).neighbors(0)
    with pytest.raises(ValueError, match="expected n=5"):
        make_topology(f"file:{path}", 5)


def test_file_disconnected(tmp_path: Path) -> None:
    path = tmp_path / "split.txt"
    path.write_text("0 1\n2 3\n")
    with pytest.raises(ValueError, match=r"topology 'file:.*split\.txt' with n=4 is disconnected"):
        make_topology(f"file:{path}", 4)


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=r"unknown topology 'hypercube'.*known:.*ring"):
        make_topology("hypercube", 8)
    with pytest.raises(ValueError, match="D=3"):
        make_topology("random-regular:3", 7)  # n*D odd
    with pytest.raises(ValueError, match="D=8"):
        make_topology("random-regular:8", 8)  # D >= n
    with pytest.raises(ValueError, match="n=7"):
        make_topology("matching", 7)
    with pytest.raises(ValueError, match="n=1"):
        make_topology("ring", 1)
    with pytest.raises(ValueError, match="n=10"):
        make_topology("torus", 10)
    with pytest.raises(ValueError, match="weights='sym'"):
        make_topology("ring", 4, weights="sym")
    with pytest.raises(ValueError, match="P='x'"):
        make_topology("erdos-renyi:x", 4)
    with pytest.raises(ValueError, match="is disconnected"):
        make_topology("erdos-renyi:0.0", 6)
    with pytest.raises(ValueError, match="group_size=3 does not divide n=8"):
        random_matching(8, 3, 0)


# ----------------------------------------------------------------------------- sparse form


def test_large_graphs_are_built_without_a_dense_matrix() -> None:
    # a dense float64 W at n = 20000 would be 3.2 GB; the peer tables are O(n K)
    topo = make_topology("random-regular:8", 20_000, seed=1)
    peers, weights, self_weight = topo.peer_table(0)
    assert peers.shape == (20_000, 8) and bool((peers >= 0).all())
    torch.testing.assert_close(weights, torch.full((20_000, 8), 1 / 9, dtype=torch.float64))
    torch.testing.assert_close(self_weight, torch.full((20_000,), 1 / 9, dtype=torch.float64))
    topo.check_doubly_stochastic()
    assert make_topology("matching", 20_000).peer_table(5)[0].shape == (20_000, 1)


@pytest.mark.parametrize("spec", ["ring", "star", "erdos-renyi:0.4", "exponential"])
def test_peer_table_is_the_uniform_closed_form_and_round_trips(spec: str) -> None:
    topo = make_topology(spec, 10, seed=3, weights="uniform")
    peers, weights, self_weight = topo.peer_table(0)
    for i in range(10):
        row = [int(j) for j in peers[i] if j >= 0]
        assert row == sorted(row) == topo.neighbors(0)[i] and i not in row
        share = 1 / (len(row) + 1)  # W_ij = 1 / (d_i + 1) on each in-edge and on the diagonal
        assert weights[i, : len(row)].tolist() == pytest.approx([share] * len(row))
        assert bool((weights[i, len(row):] == 0).all())
        assert float(self_weight[i]) == pytest.approx(share)
    w = topo.mixing_matrix()
    again = StaticTopology.from_matrix(w, spec="custom")
    assert all(torch.equal(a, b) for a, b in zip(again.peer_table(0), topo.peer_table(0),
                                                 strict=True))


def test_topology_check_doubly_stochastic_names_the_topology() -> None:
    make_topology("star", 5).check_doubly_stochastic()  # metropolis: fine
    with pytest.raises(ValueError, match=r"topology 'star' \(n=5\).*column 0 sums to 2\.2"):
        make_topology("star", 5, weights="uniform").check_doubly_stochastic()



def test_from_matrix_refuses_bad_weights_and_disconnected_graphs() -> None:
    """A disconnected, a NaN and a negative W used to be accepted: D-PSGD and CHOCO then ran
    without ever reaching consensus, or spread NaN (make_topology refuses such graphs)."""
    pair = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    two_pairs = torch.block_diag(pair, pair)
    with pytest.raises(ValueError, match=r"'two' with n=4: W's graph is not strongly connected "
                                         r"\(2 components\)"):
        StaticTopology.from_matrix(two_pairs, spec="two")
    with pytest.raises(ValueError, match=r"not strongly connected \(4 components\)"):
        StaticTopology.from_matrix(torch.eye(4), spec="none")
    for bad, where in ((float("nan"), "W[0, 1]=nan"), (-0.5, "W[0, 1]=-0.5"),
                       (float("inf"), "W[0, 1]=inf")):
        w = pair.clone()
        w[0, 1] = bad
        with pytest.raises(ValueError, match=rf"topology 'w': {re.escape(where)} is invalid"):
            StaticTopology.from_matrix(w, spec="w")
    # a directed cycle, (I + P) / 2: strongly connected and doubly stochastic, so accepted
    cycle = (torch.eye(4) + torch.roll(torch.eye(4), 1, 0)) / 2
    StaticTopology.from_matrix(cycle, spec="cycle").check_doubly_stochastic()
