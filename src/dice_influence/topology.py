"""Communication graphs and mixing matrices for decentralized SGD.

Convention (SPEC §1): ``W[k, j]`` is the weight that **receiver** ``k`` puts on **sender** ``j``.
Rows sum to 1 (row-stochastic), entries are ``>= 0``; matrices are float64 arrays of shape
``(n, n)``. The out-neighbours of ``j`` are ``{k != j : W[k, j] > 0}``; the in-neighbours of ``k``
are ``{j != k : W[k, j] > 0}``. In graph form an edge ``j -> k`` (sender -> receiver) exists when
``W[k, j] > 0``.

Static graphs come from :func:`mixing_matrix`, :func:`from_networkx` or :func:`from_matrix`;
time-varying ones are :class:`Schedule` objects whose ``W(t)`` is a pure function of ``t`` and the
schedule's seed.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components, shortest_path

__all__ = [
    "TOPOLOGIES",
    "TIME_VARYING",
    "WEIGHTS",
    "TopologyError",
    "TopologyWarning",
    "Schedule",
    "StaticSchedule",
    "OnePeerExponential",
    "RandomMatching",
    "PermutedSchedule",
    "mixing_matrix",
    "from_networkx",
    "to_networkx",
    "validate_mixing",
    "from_matrix",
    "make_schedule",
    "describe",
    "reach_sets",
    "plot_topology",
]

TOPOLOGIES: tuple[str, ...] = (
    "ring",
    "exponential",
    "directed-ring",
    "star",
    "grid",
    "torus",
    "complete",
    "erdos-renyi",
    "random-regular",
    "watts-strogatz",
    "isolated",
)
"""Names accepted by :func:`mixing_matrix`."""

WEIGHTS: tuple[str, ...] = ("uniform", "metropolis")
"""Weight rules accepted by :func:`mixing_matrix` (``from_networkx`` also accepts ``"given"``)."""

TIME_VARYING: tuple[str | None, ...] = (None, "one-peer-exponential", "random-matching", "permuted")
"""Values accepted by ``make_schedule(time_varying=...)``."""

_DIRECTED = frozenset({"exponential", "directed-ring"})
_CONNECTIVITY = ("error", "warn", "ignore")
_CONVENTION = "W[k, j] is the weight receiver k puts on sender j"
_MAX_TRIES = 100


class TopologyError(ValueError):
    """A graph, mixing matrix or topology parameter is invalid (the message says how to fix it)."""


class TopologyWarning(UserWarning):
    """Emitted by ``validate_mixing(..., connectivity="warn")`` for a not strongly connected W."""


# --------------------------------------------------------------------------------------------
# small helpers


def _as_int(value: Any, what: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool):
        raise TopologyError(f"{what} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TopologyError(f"{what} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise TopologyError(f"{what} must be >= {minimum}, got {out}")
    return int(out)


def _norm_name(name: str) -> str:
    if not isinstance(name, str):
        raise TopologyError(f"topology name must be a string, got {name!r}")
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _check_weights(weights: str, allowed: Sequence[str]) -> str:
    if weights not in allowed:
        raise TopologyError(f"unknown weights {weights!r}; choose one of {list(allowed)}")
    return weights


def _support_from_edges(n: int, edges: Iterable[tuple[int, int]]) -> np.ndarray:
    """Symmetric boolean adjacency (no diagonal) of an undirected edge list."""
    a = np.zeros((n, n), dtype=bool)
    for u, v in edges:
        if u != v:
            a[u, v] = a[v, u] = True
    return a


def _weights_from_support(a: np.ndarray, weights: str) -> np.ndarray:
    """Mixing matrix from a boolean support ``a[k, j]`` (k receives from j, off-diagonal only)."""
    n = a.shape[0]
    a = a.copy()
    np.fill_diagonal(a, False)
    if weights == "uniform":
        w = a.astype(np.float64) + np.eye(n)
        return w / w.sum(axis=1, keepdims=True)
    if weights == "metropolis":
        if not np.array_equal(a, a.T):
            k, j = (int(x[0]) for x in np.nonzero(a != a.T))
            raise TopologyError(
                f"metropolis weights need an undirected graph, but W[{k}, {j}] > 0 while "
                f"W[{j}, {k}] == 0; use weights='uniform' for directed graphs"
            )
        deg = a.sum(axis=1).astype(np.float64)
        w = np.where(a, 1.0 / (1.0 + np.maximum(deg[:, None], deg[None, :])), 0.0)
        np.fill_diagonal(w, 1.0 - w.sum(axis=1))
        return w
    raise TopologyError(f"unknown weights {weights!r}; choose one of {list(WEIGHTS)}")


def _grid_shape(n: int) -> tuple[int, int]:
    r = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return r, n // r


def _grid_edges(n: int, wrap: bool) -> list[tuple[int, int]]:
    r, c = _grid_shape(n)
    edges = []
    for a in range(r):
        for b in range(c):
            i = a * c + b
            if b + 1 < c:
                edges.append((i, a * c + b + 1))
            elif wrap and c > 1:
                edges.append((i, a * c))
            if a + 1 < r:
                edges.append((i, (a + 1) * c + b))
            elif wrap and r > 1:
                edges.append((i, b))
    return edges


def _support(w: np.ndarray) -> np.ndarray:
    return w > 0


def _strong_components(w: np.ndarray) -> tuple[int, np.ndarray]:
    # csgraph edge a -> b when m[a, b] != 0; sender j -> receiver k when W[k, j] > 0, i.e. W.T.
    ncomp, labels = connected_components(
        csr_matrix(_support(w).T), directed=True, connection="strong"
    )
    return int(ncomp), labels


def _fmt(x: float) -> str:
    return f"{x:.10g}"


# --------------------------------------------------------------------------------------------
# validation


def validate_mixing(W: Any, *, tol: float = 1e-6, connectivity: str = "error") -> np.ndarray:
    """Check that ``W`` is a valid mixing matrix and return it as a float64 copy.

    Checks: 2-D square (n >= 1), finite, non-negative, every row sums to 1 within ``tol``, and
    (``connectivity`` in ``{"error", "warn", "ignore"}``) that the directed graph ``j -> k`` for
    ``W[k, j] > 0`` is strongly connected. Raises :class:`TopologyError`.
    """
    if connectivity not in _CONNECTIVITY:
        raise TopologyError(f"connectivity={connectivity!r} is not one of {list(_CONNECTIVITY)}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise TopologyError(f"tol must be a finite number >= 0, got {tol!r}")
    try:
        w = np.array(W, dtype=np.float64, copy=True)
    except (TypeError, ValueError) as exc:
        raise TopologyError(
            f"W could not be converted to a float array ({exc}); pass an (n, n) array where "
            f"{_CONVENTION}"
        ) from None
    if w.ndim != 2:
        raise TopologyError(f"W must be a 2-D (n, n) array, got shape {w.shape}; {_CONVENTION}")
    if w.shape[0] != w.shape[1]:
        raise TopologyError(
            f"W must be square (n, n), got shape {w.shape}; {_CONVENTION}, so both axes index "
            "the same n nodes"
        )
    if w.shape[0] == 0:
        raise TopologyError("W is empty (shape (0, 0)); a network needs at least one node")
    bad = ~np.isfinite(w)
    if bad.any():
        k, j = (int(x[0]) for x in np.nonzero(bad))
        raise TopologyError(
            f"W[{k}, {j}] is {w[k, j]} ({int(bad.sum())} non-finite entries); entries must be "
            "finite: replace NaN/inf before use"
        )
    neg = w < 0
    if neg.any():
        k, j = (int(x[0]) for x in np.nonzero(neg))
        raise TopologyError(
            f"W[{k}, {j}] = {_fmt(w[k, j])} is negative ({int(neg.sum())} negative entries); "
            f"entries must be >= 0: {_CONVENTION}; clip negatives to 0 and renormalise the row"
        )
    sums = w.sum(axis=1)
    off = np.abs(sums - 1.0) > tol
    if off.any():
        k = int(np.argmax(off))
        more = f"; {int(off.sum()) - 1} other rows are off too" if off.sum() > 1 else ""
        hint = ""
        if np.all(np.abs(w.sum(axis=0) - 1.0) <= tol):
            hint = "; its columns sum to 1, so this looks like the transpose: pass W.T"
        raise TopologyError(
            f"row {k} of W sums to {_fmt(sums[k])} (must be 1 within {tol:g}{more}): "
            f"{_CONVENTION}; normalise each row{hint}"
        )
    if connectivity != "ignore" and w.shape[0] > 1:
        ncomp, labels = _strong_components(w)
        if ncomp > 1:
            groups = [np.flatnonzero(labels == c).tolist() for c in range(min(ncomp, 3))]
            shown = ", ".join(str(g[:8]) + ("..." if len(g) > 8 else "") for g in groups)
            msg = (
                f"W is not strongly connected: the directed graph (edge j -> k when W[k, j] > 0) "
                f"has {ncomp} strongly connected components (e.g. {shown}), so some nodes' "
                "updates never reach others; add edges, or pass connectivity='warn' or 'ignore' "
                "to accept it"
            )
            if connectivity == "error":
                raise TopologyError(msg)
            warnings.warn(msg, TopologyWarning, stacklevel=2)
    return w


def from_matrix(W: Any, *, connectivity: str = "error") -> np.ndarray:
    """Validate a user-supplied mixing matrix (same as :func:`validate_mixing`)."""
    return validate_mixing(W, connectivity=connectivity)


# --------------------------------------------------------------------------------------------
# named topologies


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
        raise TopologyError(f"unknown topology {name!r}; valid names: {', '.join(TOPOLOGIES)}")
    n = _as_int(n, "n (number of nodes)", minimum=1)
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


# --------------------------------------------------------------------------------------------
# networkx conversion


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


# --------------------------------------------------------------------------------------------
# schedules


class Schedule:
    """A (possibly time-varying) sequence of mixing matrices ``W(0), W(1), ...``.

    ``W(t)`` is a pure function of ``t`` and the schedule's seed (any call order gives the same
    matrices) and returns a fresh float64 array. ``is_static`` is True when every round uses the
    same matrix; ``period`` is the smallest known period (None if aperiodic/unknown).
    """

    n: int
    is_static: bool
    period: int | None

    def __init__(self, n: int, *, is_static: bool, period: int | None) -> None:
        self.n = _as_int(n, "n (number of nodes)", minimum=1)
        self.is_static = bool(is_static)
        self.period = period

    def W(self, t: int) -> np.ndarray:
        """Mixing matrix used in gossip round ``t`` (``t >= 0``)."""
        return self._matrix(_as_int(t, "round t", minimum=0))

    def _matrix(self, t: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n})"


class StaticSchedule(Schedule):
    """The same matrix every round."""

    def __init__(self, W: Any, *, connectivity: str = "error") -> None:
        self._w = validate_mixing(W, connectivity=connectivity)
        super().__init__(self._w.shape[0], is_static=True, period=1)

    def _matrix(self, t: int) -> np.ndarray:
        return self._w.copy()


class OnePeerExponential(Schedule):
    """One-peer exponential graph (Ying et al. 2021).

    With ``tau = ceil(log2 n)``, at round ``t`` node i averages with the single sender
    ``(i + 2^(t mod tau)) % n``: ``W[i, i] = W[i, (i + 2^(t mod tau)) % n] = 1/2``. For n a power
    of two, the product over one period is exactly ``11^T / n``. ``n == 1`` gives the identity.
    """

    def __init__(self, n: int) -> None:
        n = _as_int(n, "n (number of nodes)", minimum=1)
        self.tau = (n - 1).bit_length()
        super().__init__(n, is_static=self.tau <= 1, period=max(self.tau, 1))

    def _matrix(self, t: int) -> np.ndarray:
        n = self.n
        if n == 1:
            return np.eye(1)
        off = 1 << (t % self.tau)
        w = np.zeros((n, n))
        i = np.arange(n)
        w[i, i] = 0.5
        w[i, (i + off) % n] = 0.5
        return w

    def __repr__(self) -> str:
        return f"OnePeerExponential(n={self.n})"


class RandomMatching(Schedule):
    """A uniformly random (near-)perfect matching each round; matched pairs average 1/2-1/2.

    Round ``t`` uses ``np.random.default_rng([seed, t])``; with odd n one node stays alone.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        n = _as_int(n, "n (number of nodes)", minimum=1)
        self.seed = _as_int(seed, "seed", minimum=0)
        super().__init__(n, is_static=n <= 2, period=1 if n <= 2 else None)

    def _matrix(self, t: int) -> np.ndarray:
        n = self.n
        perm = np.random.default_rng([self.seed, t]).permutation(n)
        w = np.eye(n)
        a, b = perm[0 : n - 1 : 2], perm[1:n:2]
        w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
        return w

    def __repr__(self) -> str:
        return f"RandomMatching(n={self.n}, seed={self.seed})"


class PermutedSchedule(Schedule):
    """Relabel a base graph each round: ``W_t = P_t W P_t^T`` with a random permutation ``P_t``.

    ``P_t`` maps node i to ``perm[i]`` with ``perm = default_rng([seed, t]).permutation(n)``,
    so ``W_t[perm[k], perm[j]] = W[k, j]``.
    """

    def __init__(self, W: Any, seed: int = 0, *, connectivity: str = "error") -> None:
        self._w = validate_mixing(W, connectivity=connectivity)
        self.seed = _as_int(seed, "seed", minimum=0)
        n = self._w.shape[0]
        super().__init__(n, is_static=n == 1, period=1 if n == 1 else None)

    def _matrix(self, t: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, t]).permutation(self.n)
        w = np.empty_like(self._w)
        w[np.ix_(perm, perm)] = self._w
        return w

    def __repr__(self) -> str:
        return f"PermutedSchedule(n={self.n}, seed={self.seed})"


def make_schedule(
    name: str,
    n: int,
    *,
    weights: str = "uniform",
    seed: int = 0,
    time_varying: str | None = None,
    **kw: Any,
) -> Schedule:
    """Build a schedule: a static named topology, or a time-varying one.

    ``time_varying``: None (static :func:`mixing_matrix`), ``"one-peer-exponential"``,
    ``"random-matching"`` (both ignore ``name``, ``weights`` and ``kw``), or ``"permuted"``
    (the named topology relabelled randomly each round). ``kw`` may hold ``p``, ``degree``, ``k``.
    ``name`` may itself be ``"one-peer-exponential"`` or ``"random-matching"``.
    """
    unknown = set(kw) - {"p", "degree", "k"}
    if unknown:
        raise TopologyError(
            f"unknown topology parameters {sorted(unknown)}; allowed: 'p', 'degree', 'k'"
        )
    key = _norm_name(name)
    tv = None if time_varying is None else _norm_name(time_varying)
    if tv is None and key in ("one-peer-exponential", "random-matching"):
        tv = key
    if tv not in TIME_VARYING:
        raise TopologyError(
            f"unknown time_varying {time_varying!r}; choose one of {list(TIME_VARYING)}"
        )
    if tv == "one-peer-exponential":
        return OnePeerExponential(n)
    if tv == "random-matching":
        return RandomMatching(n, seed)
    w = mixing_matrix(key, n, weights=weights, seed=seed, **kw)
    conn = "ignore" if key == "isolated" else "error"
    if tv == "permuted":
        return PermutedSchedule(w, seed, connectivity=conn)
    return StaticSchedule(w, connectivity=conn)


# --------------------------------------------------------------------------------------------
# analysis


def describe(W: Any) -> dict[str, Any]:
    """Plain-JSON summary of a mixing matrix.

    Keys: ``n``, ``W`` (rows), ``in_degree``/``out_degree`` (self excluded), ``self_weight``
    (diagonal), ``out_weight`` (column sums: how much a node's update weighs in the network, the
    paper's "influential nodes"), ``row_sums``, ``symmetric``, ``doubly_stochastic``,
    ``strongly_connected``, ``spectral_gap`` (``1 - |lambda_2|``; 1.0 for n = 1) and
    ``diameter`` (directed, None if not strongly connected).
    """
    w = validate_mixing(W, connectivity="ignore")
    n = w.shape[0]
    off = w > 0
    np.fill_diagonal(off, False)
    ncomp, _ = _strong_components(w)
    connected = ncomp == 1
    if n == 1:
        gap = 1.0
    else:
        mods = np.sort(np.abs(np.linalg.eigvals(w)))[::-1]
        gap = float(min(1.0, max(0.0, 1.0 - mods[1])))
    diameter: int | None = None
    if connected:
        dist = shortest_path(csr_matrix(off.T), directed=True, unweighted=True)
        diameter = int(dist.max())
    return {
        "n": int(n),
        "W": w.tolist(),
        "in_degree": off.sum(axis=1).astype(int).tolist(),
        "out_degree": off.sum(axis=0).astype(int).tolist(),
        "self_weight": np.diag(w).tolist(),
        "out_weight": w.sum(axis=0).tolist(),
        "row_sums": w.sum(axis=1).tolist(),
        "symmetric": bool(np.allclose(w, w.T, rtol=0.0, atol=1e-12)),
        "doubly_stochastic": bool(np.allclose(w.sum(axis=0), 1.0, rtol=0.0, atol=1e-6)),
        "strongly_connected": bool(connected),
        "spectral_gap": gap,
        "diameter": diameter,
    }


def reach_sets(schedule_or_W: Schedule | Any, j: int, t: int, hops: int) -> list[list[int]]:
    """Nodes first reached by a perturbation of node ``j`` at round ``t`` (SPEC §3).

    Element ``s - 1`` is ``N^(s)(j)``: the nodes ``k != j`` with
    ``(W^{t+s-1} ... W^t)[k, j] > 0`` but not for any smaller ``s``. Computed on the supports with
    boolean products (no underflow). For a static W this is shortest-path distance exactly ``s``
    from j along sender -> receiver edges. Accepts a :class:`Schedule` or a (static) matrix.
    """
    sched = (
        schedule_or_W
        if isinstance(schedule_or_W, Schedule)
        else StaticSchedule(schedule_or_W, connectivity="ignore")
    )
    n = sched.n
    j = _as_int(j, "source node j", minimum=0)
    if j >= n:
        raise TopologyError(f"source node j={j} is out of range for n={n} nodes")
    t = _as_int(t, "round t", minimum=0)
    hops = _as_int(hops, "hops", minimum=0)
    col = np.zeros(n, dtype=bool)  # support of column j of the running product
    col[j] = True
    seen = col.copy()
    out: list[list[int]] = []
    for s in range(1, hops + 1):
        support = sched.W(t + s - 1) > 0
        col = (support & col[None, :]).any(axis=1)
        new = col & ~seen
        seen |= col
        out.append(np.flatnonzero(new).tolist())
    return out


# --------------------------------------------------------------------------------------------
# plotting


def _layout(w: np.ndarray, layout: str) -> np.ndarray:
    n = w.shape[0]
    if layout == "circular":
        ang = np.pi / 2 - 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(ang), np.sin(ang)], axis=1)
    if layout == "spring":
        pos = nx.spring_layout(to_networkx(w).to_undirected(), seed=0)
        return np.array([pos[i] for i in range(n)], dtype=np.float64)
    raise TopologyError(f"unknown layout {layout!r}; choose 'circular' or 'spring'")


def plot_topology(
    W: Any,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    node_values: Sequence[float] | np.ndarray | None = None,
    highlight: int | Iterable[int] | None = None,
    layout: str = "circular",
) -> None:
    """Draw the directed graph of ``W`` and save it as a PNG at ``path``.

    Arrows point sender -> receiver (width ~ weight). Node size is proportional to
    ``out_weight`` (column sums) or to ``|node_values|``; with ``node_values`` nodes are also
    coloured by value (diverging, 0 = white). ``highlight`` nodes get a thick red outline.
    """
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch

    w = validate_mixing(W, connectivity="ignore")
    n = w.shape[0]
    pos = _layout(w, layout)
    if node_values is None:
        values = w.sum(axis=0)
    else:
        values = np.asarray(node_values, dtype=np.float64).reshape(-1)
        if values.shape != (n,) or not np.all(np.isfinite(values)):
            raise TopologyError(
                f"node_values must be {n} finite numbers (one per node), got shape {values.shape}"
            )
    mag = np.abs(values)
    sizes = 60.0 + 740.0 * mag / (mag.max() if mag.max() > 0 else 1.0)
    hl: set[int] = set()
    if highlight is not None:
        hl = {int(highlight)} if np.ndim(highlight) == 0 else {int(h) for h in highlight}
        if any(not 0 <= h < n for h in hl):
            raise TopologyError(f"highlight nodes {sorted(hl)} must be in 0..{n - 1}")

    fig = Figure(figsize=(6.4, 6.0), dpi=120)
    ax = fig.add_subplot()
    off = w.copy()
    np.fill_diagonal(off, 0.0)
    wmax = off.max() if off.max() > 0 else 1.0
    radius = np.sqrt(sizes) / 2.0 + 2.0  # marker radius in points
    for k, j in zip(*np.nonzero(off > 0), strict=True):
        rad = 0.15 if off[j, k] > 0 else 0.0
        ax.add_patch(
            FancyArrowPatch(
                tuple(pos[j]),
                tuple(pos[k]),
                arrowstyle="-|>",
                mutation_scale=9,
                connectionstyle=f"arc3,rad={rad}",
                shrinkA=float(radius[j]),
                shrinkB=float(radius[k]),
                linewidth=0.4 + 2.0 * off[k, j] / wmax,
                color="0.35",
                alpha=0.7,
                zorder=1,
            )
        )
    edgecolors = ["red" if i in hl else "black" for i in range(n)]
    linewidths = [2.5 if i in hl else 0.6 for i in range(n)]
    if node_values is None:
        ax.scatter(
            pos[:, 0],
            pos[:, 1],
            s=sizes,
            c="tab:blue",
            edgecolors=edgecolors,
            linewidths=linewidths,
            zorder=2,
        )
        caption = "node size ~ out-weight (column sum of W); arrows sender -> receiver"
    else:
        vmax = float(mag.max()) if mag.max() > 0 else 1.0
        sc = ax.scatter(
            pos[:, 0],
            pos[:, 1],
            s=sizes,
            c=values,
            cmap="coolwarm",
            norm=TwoSlopeNorm(vcenter=0.0, vmin=-vmax, vmax=vmax),
            edgecolors=edgecolors,
            linewidths=linewidths,
            zorder=2,
        )
        fig.colorbar(sc, ax=ax, shrink=0.8, label="node value")
        caption = "node size ~ |value|; arrows sender -> receiver"
    if n <= 64:
        for i in range(n):
            ax.annotate(
                str(i),
                tuple(pos[i]),
                ha="center",
                va="center",
                fontsize=8 if n <= 32 else 6,
                zorder=3,
            )
    ax.set_title(title if title is not None else f"mixing graph, n={n}")
    ax.text(0.5, -0.02, caption, transform=ax.transAxes, ha="center", va="top", fontsize=8)
    ax.set_aspect("equal")
    ax.margins(0.12)
    ax.axis("off")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight")
