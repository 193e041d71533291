"""Properties of a mixing matrix: spectral gap, out-weights, reach sets."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import shortest_path

from ._common import TopologyError, _as_int, _strong_components
from .schedules import Schedule, StaticSchedule
from .validate import validate_mixing


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
    """Nodes first reached by a perturbation of node ``j`` at round ``t`` (docs/method.md §3).

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
