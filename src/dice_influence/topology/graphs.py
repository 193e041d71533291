"""Named topologies and networkx conversion: static mixing matrices."""

from __future__ import annotations

import math
from typing import Any

import networkx as nx
import numpy as np

from .._util import did_you_mean
from ._common import (
    _DIRECTED,
    _MAX_TRIES,
    MAX_NODES,
    TOPOLOGIES,
    WEIGHTS,
    TopologyError,
    _as_int,
    _check_weights,
    _grid_edges,
    _norm_name,
    _support_from_edges,
    _weights_from_support,
)
from .validate import validate_mixing


def mixing_matrix(
    name: str,
    n: int,
    *,
    weights: str = "uniform",
    seed: int = 0,
    p: float | None = None,
    degree: int | None = None,
    k: int | None = None,
) -> np.ndarray:
    """Mixing matrix of a named topology (see :data:`TOPOLOGIES`) on ``n`` nodes.

    ``weights``: ``"uniform"`` (row k puts ``1/|closed in-neighbourhood|`` on itself and each
    in-neighbour) or ``"metropolis"`` (undirected graphs only; ``1/(1+max(deg_k, deg_j))`` on edges,
    the rest on the diagonal; symmetric and doubly stochastic). ``seed`` drives the random graphs;
    ``p`` (erdos-renyi, watts-strogatz), ``degree`` (random-regular) and ``k`` (watts-strogatz)
    are ignored by topologies that do not use them. For ``n == 1`` every topology is ``[[1]]``.
    Directed topologies: ``"exponential"`` (receiver i takes from senders ``i + m mod n`` for
    ``m in {0, 1, 2, 4, ... < n}``, each ``1/|M|``) and ``"directed-ring"`` (receiver i takes
    1/2 from itself and 1/2 from sender ``i + 1``).
    """
    key = _norm_name(name)
    if key not in TOPOLOGIES:
        raise TopologyError(f"unknown topology {name!r}{did_you_mean(key, TOPOLOGIES)}; "
                            f"valid names: {', '.join(TOPOLOGIES)}")
    n = _as_int(n, "n (number of nodes)", minimum=1, maximum=MAX_NODES)
    _check_weights(weights, WEIGHTS)
    seed = _as_int(seed, "seed")
    if weights == "metropolis" and key in _DIRECTED:
        raise TopologyError(
            f"topology {key!r} is directed; metropolis weights need an undirected graph: "
            "use weights='uniform'"
        )
    if n == 1 or key == "isolated":
        return np.eye(n)

    if key == "ring":
        a = _support_from_edges(n, [(i, (i + 1) % n) for i in range(n)])
    elif key == "exponential":
        a = np.zeros((n, n), dtype=bool)
        offsets = [1 << e for e in range(n.bit_length()) if (1 << e) < n]
        for i in range(n):
            for m in offsets:
                a[i, (i + m) % n] = True
    elif key == "directed-ring":
        a = np.zeros((n, n), dtype=bool)
        for i in range(n):
            a[i, (i + 1) % n] = True
    elif key == "star":
        a = _support_from_edges(n, [(0, i) for i in range(1, n)])
    elif key in ("grid", "torus"):
        a = _support_from_edges(n, _grid_edges(n, wrap=key == "torus"))
    elif key == "complete":
        a = ~np.eye(n, dtype=bool)
    elif key == "erdos-renyi":
        a = _erdos_renyi(n, p, seed)
    elif key == "random-regular":
        a = _random_regular(n, 4 if degree is None else degree, seed)
    else:  # watts-strogatz
        a = _watts_strogatz(n, 4 if k is None else k, 0.1 if p is None else p, seed)
    return validate_mixing(_weights_from_support(a, weights))


def _check_prob(p: Any, what: str) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise TopologyError(f"{what} must be a probability in [0, 1], got {p!r}") from None
    if not 0.0 <= p <= 1.0:
        raise TopologyError(f"{what} must be a probability in [0, 1], got {p!r}")
    return p


def _erdos_renyi(n: int, p: float | None, seed: int) -> np.ndarray:
    p = min(1.0, 2.0 * math.log(n) / n) if p is None else _check_prob(p, "erdos-renyi p")
    if p == 0.0:
        raise TopologyError(f"erdos-renyi with p=0 is never connected for n={n}; use p > 0")
    for s in range(seed, seed + _MAX_TRIES):
        g = nx.gnp_random_graph(n, p, seed=s)
        if nx.is_connected(g):
            return _support_from_edges(n, g.edges())
    raise TopologyError(
        f"erdos-renyi G(n={n}, p={p:g}) was not connected for seeds {seed}..{seed + _MAX_TRIES - 1};"
        f" use a larger p (ln(n)/n = {math.log(n) / n:.3g} is the connectivity threshold)"
    )


def _random_regular(n: int, degree: int, seed: int) -> np.ndarray:
    degree = _as_int(degree, "random-regular degree", minimum=0)
    if degree >= n:
        raise TopologyError(f"random-regular degree={degree} must be < n={n}; lower the degree")
    if (n * degree) % 2:
        raise TopologyError(
            f"random-regular needs n*degree even, got n={n}, degree={degree}; change one of them"
        )
    if degree < 2 and n > 2:
        raise TopologyError(
            f"a {degree}-regular graph on n={n} nodes is never connected; use degree >= 2"
        )
    for s in range(seed, seed + _MAX_TRIES):
        g = nx.random_regular_graph(degree, n, seed=s)
        if nx.is_connected(g):
            return _support_from_edges(n, g.edges())
    raise TopologyError(
        f"random-regular(n={n}, degree={degree}) was not connected for seeds "
        f"{seed}..{seed + _MAX_TRIES - 1}; use a larger degree"
    )


def _watts_strogatz(n: int, k: int, p: float, seed: int) -> np.ndarray:
    k = _as_int(k, "watts-strogatz k", minimum=0)
    p = _check_prob(p, "watts-strogatz p")
    if not 2 <= k < n:
        raise TopologyError(
            f"watts-strogatz needs 2 <= k < n (k = neighbours in the base ring), got k={k}, n={n}"
        )
    try:
        g = nx.connected_watts_strogatz_graph(n, k, p, tries=_MAX_TRIES, seed=seed)
    except nx.NetworkXError as exc:
        raise TopologyError(
            f"watts-strogatz(n={n}, k={k}, p={p:g}) failed: {exc}; use a larger k or smaller p"
        ) from None
    return _support_from_edges(n, g.edges())





def from_networkx(
    G: nx.Graph | nx.DiGraph, weights: str = "uniform", *, connectivity: str = "error"
) -> np.ndarray:
    """Mixing matrix of a networkx graph; node ``i`` of W is the i-th node in sorted order.

    For a DiGraph an edge ``u -> v`` means v receives from u (``W[v, u] > 0``); undirected edges
    go both ways. ``weights``: ``"uniform"``, ``"metropolis"`` (undirected support only) or
    ``"given"``: the edges' ``"weight"`` attributes are used as ``W[v, u]`` directly, self weights
    from self-loops (else the node attribute ``"self_weight"``, else 0); the result is validated.
    Self-loops are ignored by ``"uniform"`` and ``"metropolis"``.
    """
    _check_weights(weights, (*WEIGHTS, "given"))
    nodes = list(G.nodes)
    if not nodes:
        raise TopologyError("the graph has no nodes; a network needs at least one node")
    try:
        nodes = sorted(nodes)
    except TypeError:
        pass
    index = {v: i for i, v in enumerate(nodes)}
    n = len(nodes)
    directed = G.is_directed()
    if weights != "given":
        a = np.zeros((n, n), dtype=bool)
        for u, v in G.edges():
            a[index[v], index[u]] = True
            if not directed:
                a[index[u], index[v]] = True
        return validate_mixing(_weights_from_support(a, weights), connectivity=connectivity)

    w = np.zeros((n, n), dtype=np.float64)
    for u, v, x in G.edges(data="weight"):
        if x is None:
            raise TopologyError(
                f"weights='given' but edge {u!r} -> {v!r} has no 'weight' attribute; set "
                "G.edges[u, v]['weight'] (the weight receiver v puts on sender u) on every edge"
            )
        w[index[v], index[u]] += float(x)
        if not directed and u != v:
            w[index[u], index[v]] += float(x)
    for v, sw in G.nodes(data="self_weight"):
        if sw is not None and not G.has_edge(v, v):
            w[index[v], index[v]] = float(sw)
    return validate_mixing(w, connectivity=connectivity)


def to_networkx(W: Any) -> nx.DiGraph:
    """Directed graph of ``W``: edge ``j -> k`` (sender -> receiver) with ``weight = W[k, j]``.

    Only ``k != j`` with ``W[k, j] > 0`` become edges; the diagonal is stored as the node attribute
    ``"self_weight"`` (so ``from_networkx(to_networkx(W), "given")`` round-trips).
    """
    w = validate_mixing(W, connectivity="ignore")
    g = nx.DiGraph()
    for i in range(w.shape[0]):
        g.add_node(i, self_weight=float(w[i, i]))
    ks, js = np.nonzero(w > 0)
    g.add_weighted_edges_from(
        (int(j), int(k), float(w[k, j])) for k, j in zip(ks, js, strict=True) if k != j
    )
    return g
