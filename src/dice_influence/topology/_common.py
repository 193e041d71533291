"""Errors, constants and small helpers shared by the topology modules."""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

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
MAX_NODES = 4096
"""Largest ``n`` a named topology or schedule is built for: matrices are dense ``(n, n)`` float64
(128 MiB at 4096 nodes); the same bound as ``topology.n`` in a run config."""


class TopologyError(ValueError):
    """A graph, mixing matrix or topology parameter is invalid (the message says how to fix it)."""


class TopologyWarning(UserWarning):
    """Emitted by ``validate_mixing(..., connectivity="warn")`` for a not strongly connected W."""




def _as_int(value: Any, what: str, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    if isinstance(value, bool):
        raise TopologyError(f"{what} must be an integer, got {value!r}")
    try:
        out = operator.index(value)
    except TypeError:
        raise TopologyError(f"{what} must be an integer, got {value!r}") from None
    if minimum is not None and out < minimum:
        raise TopologyError(f"{what} must be >= {minimum}, got {out}")
    if maximum is not None and out > maximum:
        raise TopologyError(
            f"{what} must be <= {maximum}, got {out} (mixing matrices are dense (n, n) arrays: "
            f"{out} nodes would need {out * out * 8 / 2**30:.1f} GiB each)"
        )
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
