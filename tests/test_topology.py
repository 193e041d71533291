"""Tests for dice_influence.topology (convention: W[k, j] = weight receiver k puts on sender j)."""

from __future__ import annotations

import json
import warnings

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dice_influence.topology import (
    TOPOLOGIES,
    OnePeerExponential,
    PermutedSchedule,
    RandomMatching,
    Schedule,
    StaticSchedule,
    TopologyError,
    TopologyWarning,
    describe,
    from_matrix,
    from_networkx,
    make_schedule,
    mixing_matrix,
    plot_topology,
    reach_sets,
    to_networkx,
    validate_mixing,
)

SIZES = (1, 2, 3, 8, 16)


def _valid(name: str, n: int) -> bool:
    if name == "random-regular":
        return n == 1 or n > 4
    if name == "watts-strogatz":
        return n == 1 or n > 4
    return True


def _strongly_connected(w: np.ndarray) -> bool:
    return nx.is_strongly_connected(to_networkx(w))


def _distance_sets(w: np.ndarray, j: int, hops: int) -> list[list[int]]:
    dist = nx.single_source_shortest_path_length(to_networkx(w), j)
    return [sorted(k for k, d in dist.items() if d == s) for s in range(1, hops + 1)]


# ----------------------------------------------------------------------------- orientation


def test_exponential_orientation_receiver_takes_from_higher_index() -> None:
    w = mixing_matrix("exponential", 8)
    assert w[0, 1] > 0 and w[1, 0] == 0  # receiver 0 takes from sender 1, not vice versa
    assert w[0, 4] > 0 and w[4, 0] > 0  # offset 4 = -4 mod 8
    g = to_networkx(w)
    assert g.has_edge(1, 0) and not g.has_edge(0, 1)  # sender 1 -> receiver 0


def test_directed_ring_orientation() -> None:
    w = mixing_matrix("directed-ring", 5)
    for i in range(5):
        assert w[i, i] == 0.5 and w[i, (i + 1) % 5] == 0.5
    assert w[1, 0] == 0
    assert set(to_networkx(w).edges()) == {((i + 1) % 5, i) for i in range(5)}


def test_from_networkx_digraph_edge_u_to_v_means_v_receives() -> None:
    g = nx.DiGraph([(0, 1), (1, 2), (2, 0)])
    w = from_networkx(g)
    assert w[1, 0] == 0.5 and w[0, 1] == 0
    assert w[2, 1] == 0.5 and w[0, 2] == 0.5


def test_from_networkx_sorts_nodes_and_handles_undirected() -> None:
    g = nx.Graph([("c", "a"), ("a", "b")])  # a=0, b=1, c=2: path b - a - c
    w = from_networkx(g)
    np.testing.assert_allclose(w[0], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(w[1], [0.5, 0.5, 0])
    np.testing.assert_allclose(from_networkx(g, "metropolis"), from_networkx(g, "metropolis").T)


@pytest.mark.parametrize("name", ["exponential", "directed-ring", "star", "erdos-renyi"])
def test_to_networkx_round_trip(name: str) -> None:
    w = mixing_matrix(name, 8)
    g = to_networkx(w)
    for j, k, d in g.edges(data=True):
        assert d["weight"] == w[k, j] and k != j
    np.testing.assert_array_equal(from_networkx(g, "given"), w)
    assert np.array_equal(from_networkx(g, "uniform") > 0, w > 0)


def test_from_networkx_given_weights_with_self_loops() -> None:
    g = nx.DiGraph()
    g.add_weighted_edges_from([(0, 0, 0.25), (1, 0, 0.75), (1, 1, 0.4), (0, 1, 0.6)])
    np.testing.assert_allclose(from_networkx(g, "given"), [[0.25, 0.75], [0.6, 0.4]])
    g.remove_edge(0, 0)
    with pytest.raises(TopologyError, match="row 0"):
        from_networkx(g, "given")
    h = nx.DiGraph([(0, 1)])
    with pytest.raises(TopologyError, match="weight"):
        from_networkx(h, "given")


# ----------------------------------------------------------------------------- named topologies


@pytest.mark.parametrize("name", TOPOLOGIES)
@pytest.mark.parametrize("n", SIZES)
def test_every_topology_is_valid(name: str, n: int) -> None:
    if not _valid(name, n):
        with pytest.raises(TopologyError):
            mixing_matrix(name, n)
        return
    w = mixing_matrix(name, n, seed=3)
    assert w.dtype == np.float64 and w.shape == (n, n)
    assert (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    if name == "isolated":
        np.testing.assert_array_equal(w, np.eye(n))
    else:
        assert _strongly_connected(w)
    np.testing.assert_array_equal(w, mixing_matrix(name, n, seed=3))  # deterministic


@pytest.mark.parametrize(
    "name", [t for t in TOPOLOGIES if t not in ("exponential", "directed-ring")]
)
@pytest.mark.parametrize("n", (2, 3, 8, 16))
def test_metropolis_symmetric_doubly_stochastic(name: str, n: int) -> None:
    if not _valid(name, n):
        return
    w = mixing_matrix(name, n, weights="metropolis")
    np.testing.assert_allclose(w, w.T, atol=1e-15)
    np.testing.assert_allclose(w.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert (w >= 0).all()
    assert np.array_equal(w > 0, mixing_matrix(name, n) > 0)


def test_metropolis_rejected_for_directed() -> None:
    with pytest.raises(TopologyError, match="directed"):
        mixing_matrix("exponential", 8, weights="metropolis")
    with pytest.raises(TopologyError, match="W\\[1, 0\\]"):
        from_networkx(nx.DiGraph([(0, 1), (1, 2), (2, 0)]), "metropolis")


def test_ring_uniform_weights() -> None:
    w = mixing_matrix("ring", 8)
    for i in range(8):
        for j in (i - 1, i, i + 1):
            assert w[i, j % 8] == pytest.approx(1 / 3)
    assert np.count_nonzero(w) == 24
    np.testing.assert_array_equal(mixing_matrix("ring", 1), [[1.0]])
    np.testing.assert_array_equal(mixing_matrix("ring", 2), np.full((2, 2), 0.5))


def test_exponential_n16_offsets() -> None:
    w = mixing_matrix("exponential", 16)
    for i in range(16):
        nz = {(j - i) % 16 for j in np.flatnonzero(w[i])}
        assert nz == {0, 1, 2, 4, 8}
        assert all(w[i, (i + m) % 16] == pytest.approx(0.2) for m in nz)


def test_grid_torus_star_complete_shapes() -> None:
    grid, torus = mixing_matrix("grid", 12), mixing_matrix("torus", 12)  # 3 x 4
    assert sorted((grid > 0).sum(axis=1) - 1) == [2] * 4 + [3] * 6 + [4] * 2
    assert ((torus > 0).sum(axis=1) - 1 == 4).all()
    star = mixing_matrix("star", 5)
    assert star[0] == pytest.approx(np.full(5, 0.2))
    assert star[3, 0] == 0.5 and star[3, 3] == 0.5 and star[3, 1] == 0
    np.testing.assert_allclose(mixing_matrix("complete", 4), np.full((4, 4), 0.25))


def test_random_graph_parameters() -> None:
    a = mixing_matrix("erdos-renyi", 16, seed=1)
    b = mixing_matrix("erdos-renyi", 16, seed=2, p=0.5)
    assert not np.array_equal(a > 0, b > 0)
    rr = mixing_matrix("random-regular", 10, degree=3)
    assert ((rr > 0).sum(axis=1) == 4).all()
    ws = mixing_matrix("watts-strogatz", 12, k=4, p=0.0)
    for i in range(12):
        assert {(j - i) % 12 for j in np.flatnonzero(ws[i])} == {0, 1, 2, 10, 11}
    with pytest.raises(TopologyError, match="even"):
        mixing_matrix("random-regular", 9, degree=3)
    with pytest.raises(TopologyError, match="degree=8 must be < n=8"):
        mixing_matrix("random-regular", 8, degree=8)
    with pytest.raises(TopologyError, match="p="):
        mixing_matrix("erdos-renyi", 16, p=1e-6)
    with pytest.raises(TopologyError, match="probability"):
        mixing_matrix("erdos-renyi", 16, p=1.5)


def test_unknown_name_and_bad_args() -> None:
    with pytest.raises(TopologyError, match="valid names: ring, exponential"):
        mixing_matrix("hypercube", 8)
    with pytest.raises(TopologyError, match="weights"):
        mixing_matrix("ring", 8, weights="max-degree")
    with pytest.raises(TopologyError, match="n"):
        mixing_matrix("ring", 0)
    np.testing.assert_array_equal(mixing_matrix("Erdos_Renyi", 8), mixing_matrix("erdos-renyi", 8))


# ----------------------------------------------------------------------------- validation


def test_validation_errors_name_the_problem() -> None:
    with pytest.raises(TopologyError, match=r"2-D"):
        validate_mixing(np.ones(3))
    with pytest.raises(TopologyError, match=r"square.*\(2, 3\)"):
        validate_mixing(np.ones((2, 3)) / 3)
    w = np.full((3, 3), 1 / 3)
    w[2, 1] = np.nan
    with pytest.raises(TopologyError, match=r"W\[2, 1\] is nan"):
        validate_mixing(w)
    w = np.array([[1.0, 0.0], [-0.1, 1.1]])
    with pytest.raises(TopologyError, match=r"W\[1, 0\] = -0.1 is negative"):
        validate_mixing(w)
    w = np.full((4, 4), 0.25)
    w[3] = [0.2, 0.2, 0.2, 0.2]
    with pytest.raises(TopologyError) as info:
        validate_mixing(w)
    msg = str(info.value)
    assert "row 3 of W sums to 0.8 (must be 1 within 1e-06)" in msg
    assert "receiver k" in msg and "normalise" in msg


def test_validation_hints_transpose() -> None:
    w = mixing_matrix("star", 4)
    with pytest.raises(TopologyError, match="W.T"):
        validate_mixing(w.T)


def test_connectivity_modes() -> None:
    w = np.eye(3)
    with pytest.raises(TopologyError, match="not strongly connected"):
        validate_mixing(w)
    with pytest.warns(TopologyWarning, match="not strongly connected"):
        validate_mixing(w, connectivity="warn")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = from_matrix(w, connectivity="ignore")
    np.testing.assert_array_equal(out, w)
    # weakly but not strongly connected: 0 -> 1 only
    with pytest.raises(TopologyError, match="2 strongly connected components"):
        validate_mixing([[1.0, 0.0], [0.5, 0.5]])
    with pytest.raises(TopologyError, match="connectivity"):
        validate_mixing(np.eye(2), connectivity="maybe")


def test_validate_returns_float64_copy() -> None:
    src = [[0.5, 0.5], [0.5, 0.5]]
    w = validate_mixing(src)
    assert w.dtype == np.float64
    w[0, 0] = 9
    arr = np.full((2, 2), 0.5)
    assert validate_mixing(arr) is not arr


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7), st.integers(0, 2**31 - 1))
def test_random_row_stochastic_accepted(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w = rng.random((n, n)) + 0.01
    w /= w.sum(axis=1, keepdims=True)
    np.testing.assert_array_equal(validate_mixing(w), w)


# ----------------------------------------------------------------------------- schedules


def _schedules() -> list[Schedule]:
    return [
        StaticSchedule(mixing_matrix("ring", 8)),
        OnePeerExponential(8),
        OnePeerExponential(6),
        RandomMatching(8, seed=1),
        RandomMatching(7, seed=1),
        PermutedSchedule(mixing_matrix("exponential", 8), seed=2),
        make_schedule("torus", 9, time_varying="permuted", weights="metropolis"),
    ]


@pytest.mark.parametrize("sched", _schedules(), ids=repr)
def test_schedule_deterministic_and_row_stochastic(sched: Schedule) -> None:
    a = sched.W(5)
    mats = [sched.W(t) for t in (9, 3, 5, 0)]
    np.testing.assert_array_equal(a, sched.W(5))
    np.testing.assert_array_equal(a, mats[2])
    a[0, 0] = 123.0  # returned arrays are fresh copies
    assert sched.W(5)[0, 0] != 123.0
    for t in range(12):
        w = validate_mixing(sched.W(t), connectivity="ignore")
        assert w.shape == (sched.n, sched.n)
    with pytest.raises(TopologyError):
        sched.W(-1)


def test_one_peer_exponential_exact_n8() -> None:
    s = OnePeerExponential(8)
    assert s.period == 3 and not s.is_static
    for t, off in [(0, 1), (1, 2), (2, 4), (3, 1), (7, 2)]:
        expected = np.zeros((8, 8))
        for i in range(8):
            expected[i, i] = 0.5
            expected[i, (i + off) % 8] = 0.5
        np.testing.assert_array_equal(s.W(t), expected)
    np.testing.assert_allclose(s.W(2) @ s.W(1) @ s.W(0), np.full((8, 8), 1 / 8))
    np.testing.assert_array_equal(OnePeerExponential(1).W(4), [[1.0]])


def test_random_matching_structure_and_seed() -> None:
    s = RandomMatching(7, seed=4)
    for t in range(5):
        w = s.W(t)
        np.testing.assert_array_equal(w, w.T)
        diag = np.diag(w)
        assert sorted(diag.tolist()) == [0.5] * 6 + [1.0]
    assert not np.array_equal(RandomMatching(8, 0).W(0), RandomMatching(8, 1).W(0))
    assert any(not np.array_equal(s.W(0), s.W(t)) for t in range(1, 5))


def test_permuted_is_relabelling() -> None:
    base = mixing_matrix("exponential", 8)
    s = PermutedSchedule(base, seed=0)
    w = s.W(3)
    perm = np.random.default_rng([0, 3]).permutation(8)
    p = np.zeros((8, 8))
    p[perm, np.arange(8)] = 1.0
    np.testing.assert_array_equal(w, p @ base @ p.T)


def test_make_schedule_variants() -> None:
    s = make_schedule("ring", 8)
    assert isinstance(s, StaticSchedule) and s.is_static and s.period == 1
    np.testing.assert_array_equal(s.W(7), mixing_matrix("ring", 8))
    assert isinstance(
        make_schedule("exponential", 8, time_varying="one-peer-exponential"), OnePeerExponential
    )
    assert isinstance(make_schedule("ring", 8, time_varying="random-matching"), RandomMatching)
    assert isinstance(make_schedule("one-peer-exponential", 8), OnePeerExponential)
    np.testing.assert_array_equal(make_schedule("isolated", 4).W(0), np.eye(4))
    rr = make_schedule("random-regular", 10, degree=3, seed=5)
    np.testing.assert_array_equal(rr.W(0), mixing_matrix("random-regular", 10, degree=3, seed=5))
    with pytest.raises(TopologyError, match="time_varying"):
        make_schedule("ring", 8, time_varying="shuffle")
    with pytest.raises(TopologyError, match="unknown topology parameters"):
        make_schedule("ring", 8, q=0.3)


# ----------------------------------------------------------------------------- reach sets


@pytest.mark.parametrize("name", ["ring", "exponential", "directed-ring", "star", "grid"])
def test_reach_sets_static_equal_shortest_paths(name: str) -> None:
    w = mixing_matrix(name, 16)
    for j in (0, 5):
        assert reach_sets(w, j, t=3, hops=10) == _distance_sets(w, j, 10)
        assert reach_sets(StaticSchedule(w), j, t=0, hops=10) == _distance_sets(w, j, 10)


def test_reach_sets_ring_and_exponential_by_hand() -> None:
    assert reach_sets(mixing_matrix("ring", 8), 0, 0, 5) == [[1, 7], [2, 6], [3, 5], [4], []]
    # exponential: receiver i takes from i+1, i+2, i+4, so sender 0 reaches 7, 6, 4 first
    assert reach_sets(mixing_matrix("exponential", 8), 0, 0, 3) == [[4, 6, 7], [2, 3, 5], [1]]
    assert reach_sets(np.eye(3), 1, 0, 2) == [[], []]
    assert reach_sets(mixing_matrix("ring", 4), 0, 0, 0) == []


def test_reach_sets_time_varying_by_hand() -> None:
    s = OnePeerExponential(8)  # round t: receiver i takes from sender i + 2^(t mod 3)
    assert reach_sets(s, 0, 0, 4) == [[7], [5, 6], [1, 2, 3, 4], []]
    assert reach_sets(s, 0, 1, 3) == [[6], [2, 4], [1, 3, 5, 7]]
    with pytest.raises(TopologyError, match="out of range"):
        reach_sets(s, 8, 0, 1)


def test_reach_sets_no_self_loop_revisit() -> None:
    # directed 3-cycle with no self weights: node 0 -> 1 -> 2 -> 0 (W[k, j] > 0 for j -> k)
    w = np.array([[0, 0, 1.0], [1.0, 0, 0], [0, 1.0, 0]])
    assert reach_sets(w, 0, 0, 4) == [[1], [2], [], []]


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 9), st.floats(0.1, 0.9), st.integers(0, 1000))
def test_reach_sets_random_digraph(n: int, p: float, seed: int) -> None:
    g = nx.gnp_random_graph(n, p, seed=seed, directed=True)
    w = from_networkx(g, connectivity="ignore")
    hops = n + 1
    for j in range(n):
        assert reach_sets(w, j, 0, hops) == _distance_sets(w, j, hops)


# ----------------------------------------------------------------------------- describe / plot


def test_describe_keys_and_values() -> None:
    d = describe(mixing_matrix("star", 5))
    json.dumps(d)
    assert set(d) == {
        "n",
        "W",
        "in_degree",
        "out_degree",
        "self_weight",
        "out_weight",
        "row_sums",
        "symmetric",
        "doubly_stochastic",
        "strongly_connected",
        "spectral_gap",
        "diameter",
    }
    assert d["n"] == 5 and d["in_degree"] == [4, 1, 1, 1, 1] and d["out_degree"] == [4, 1, 1, 1, 1]
    assert d["out_weight"][0] == pytest.approx(0.2 + 4 * 0.5)
    assert not d["doubly_stochastic"] and not d["symmetric"] and d["strongly_connected"]
    assert d["diameter"] == 2
    e = describe(mixing_matrix("exponential", 8))
    assert e["in_degree"] == [3] * 8 and e["doubly_stochastic"] and not e["symmetric"]


def test_describe_spectral_gap() -> None:
    assert describe(mixing_matrix("complete", 8))["spectral_gap"] == pytest.approx(1.0)
    iso = describe(mixing_matrix("isolated", 4))
    assert iso["spectral_gap"] == pytest.approx(0.0)
    assert iso["diameter"] is None and not iso["strongly_connected"]
    one = describe([[1.0]])
    assert one["spectral_gap"] == 1.0 and one["diameter"] == 0
    ring = describe(mixing_matrix("ring", 8))
    assert ring["spectral_gap"] == pytest.approx(1 - (1 + 2 * np.cos(2 * np.pi / 8)) / 3)
    assert ring["symmetric"] and ring["doubly_stochastic"] and ring["diameter"] == 4


def test_plot_topology_writes_png(tmp_path) -> None:
    path = tmp_path / "sub" / "graph.png"
    plot_topology(mixing_matrix("exponential", 8), path, title="exp", highlight=[0, 3])
    assert path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p2 = tmp_path / "vals.png"
    plot_topology(mixing_matrix("ring", 6), p2, node_values=[-1, 0, 2, 0.5, -0.3, 1], highlight=2)
    assert p2.stat().st_size > 1000
    with pytest.raises(TopologyError, match="node_values"):
        plot_topology(mixing_matrix("ring", 6), tmp_path / "x.png", node_values=[1, 2])
