"""Fixed, seeded partitions of a dataset over nodes: iid, dirichlet(alpha), shards(k)."""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from .datasets import PARTITION_SCHEMES, DataError

# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------

_SCHEME_RE = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*([^()]*?)\s*\))?\s*$")


def _rng(*keys: int) -> np.random.Generator:
    if any(int(k) < 0 for k in keys):
        raise DataError(f"seeds must be non-negative integers, got {keys}")
    return np.random.default_rng([int(k) for k in keys])


def _parse_scheme(scheme: str, alpha: float, classes_per_node: int) -> tuple[str, float, int]:
    m = _SCHEME_RE.match(scheme.lower())
    if m is None or m.group(1) not in PARTITION_SCHEMES:
        raise DataError(
            f"unknown partition scheme {scheme!r}; use iid, dirichlet, dirichlet(ALPHA), shards or "
            "shards(CLASSES_PER_NODE)"
        )
    kind, arg = m.group(1), m.group(2)
    if arg:
        try:
            if kind == "dirichlet":
                alpha = float(arg)
            elif kind == "shards":
                classes_per_node = int(arg)
            else:
                raise ValueError
        except ValueError:
            raise DataError(
                f"bad parameter {arg!r} in scheme {scheme!r}; use dirichlet(0.5) or shards(2)"
            ) from None
    return kind, alpha, classes_per_node


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers >= 0 summing to ``total``, proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if w.sum() <= 0:
        w = np.ones_like(w)
    raw = total * w / w.sum()
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        out[np.argsort(-(raw - out), kind="stable")[:short]] += 1
    return out


def _partition_iid(n_labels: int, n_nodes: int, m: int, rng: np.random.Generator) -> list:
    perm = rng.permutation(n_labels)
    return [perm[k * m : (k + 1) * m] for k in range(n_nodes)]


def _class_pools(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    classes = np.unique(labels)
    return classes, [rng.permutation(np.flatnonzero(labels == c)) for c in classes]


def _partition_dirichlet_all(
    labels: np.ndarray, n_nodes: int, alpha: float, rng: np.random.Generator
) -> list:
    """Standard label skew: each class split over nodes by Dirichlet(alpha) proportions."""
    _, pools = _class_pools(labels, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for pool in pools:
        props = rng.dirichlet(np.full(n_nodes, alpha))
        counts = _largest_remainder(len(pool), props)
        for k, chunk in enumerate(np.split(pool, np.cumsum(counts)[:-1])):
            parts[k].append(chunk)
    out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    # Give every empty node one sample from the currently largest node.
    for k in range(n_nodes):
        if len(out[k]) == 0:
            big = int(np.argmax([len(p) for p in out]))
            out[k], out[big] = out[big][-1:], out[big][:-1]
    return out


def _partition_dirichlet_fixed(
    labels: np.ndarray, n_nodes: int, m: int, alpha: float, rng: np.random.Generator
) -> list:
    """Each node draws a class mix q ~ Dirichlet(alpha) and takes m samples accordingly."""
    _, pools = _class_pools(labels, rng)
    left = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros(len(pools), dtype=np.int64)
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * n_nodes
    for k in rng.permutation(n_nodes):
        q = rng.dirichlet(np.full(len(pools), alpha))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # tiny alpha underflow
            q = np.eye(len(pools))[rng.integers(len(pools))]
        take = np.zeros(len(pools), dtype=np.int64)
        need = m
        while need > 0:  # when a class pool runs out, spread the rest over the others
            avail = left - take
            w = np.where(avail > 0, q, 0.0)
            if w.sum() <= 0:
                w = (avail > 0).astype(np.float64)
            add = np.minimum(_largest_remainder(need, w), avail)
            take += add
            need -= int(add.sum())
        chunks = [pools[c][used[c] : used[c] + take[c]] for c in range(len(pools)) if take[c]]
        used += take
        left -= take
        parts[k] = np.concatenate(chunks)
    return parts


def _shard_flow(
    node_classes: list[list[int]], counts: np.ndarray, m: int, cap: int
) -> np.ndarray | None:
    """Integral max-flow: per-(node, class) counts, each <= ``cap``, giving every node m samples
    from its own classes within the class sizes ``counts``; None if infeasible."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    n_nodes, n_cls = len(node_classes), len(counts)
    src, sink = 0, n_nodes + n_cls + 1
    rows = [src] * n_nodes + [n_nodes + 1 + c for c in range(n_cls)]
    cols = list(range(1, n_nodes + 1)) + [sink] * n_cls
    caps = [m] * n_nodes + [int(v) for v in counts]
    for k, cl in enumerate(node_classes):
        rows += [k + 1] * len(cl)
        cols += [n_nodes + 1 + c for c in cl]
        caps += [cap] * len(cl)
    size = sink + 1
    graph = csr_array(
        (np.asarray(caps, dtype=np.int32), (np.asarray(rows), np.asarray(cols))), shape=(size, size)
    )
    res = maximum_flow(graph, src, sink)
    if res.flow_value < m * n_nodes:
        return None
    flow = res.flow.toarray() if hasattr(res.flow, "toarray") else np.asarray(res.flow)
    return np.clip(flow[1 : n_nodes + 1, n_nodes + 1 : sink], 0, None).astype(np.int64)


def _balanced_shard_alloc(
    node_classes: list[list[int]], counts: np.ndarray, m: int
) -> np.ndarray | None:
    """Feasible per-(node, class) counts minimising the largest count (most even), or None."""
    cpn = len(node_classes[0])
    alloc = _shard_flow(node_classes, counts, m, m)
    if alloc is None:
        return None
    lo, hi = -(-m // cpn), int(alloc.max())
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _shard_flow(node_classes, counts, m, mid)
        if trial is None:
            lo = mid + 1
        else:
            alloc, hi = trial, int(trial.max())
    return alloc


def _random_shard_layout(
    n_nodes: int, cpn: int, order: np.ndarray, rng: np.random.Generator
) -> list[list[int]] | None:
    """Deal n_nodes * cpn class slots (each class used equally often, +-1) to nodes at random,
    then swap slots until no node holds a class twice. None if repair fails."""
    n_cls = len(order)
    grid = order[np.arange(n_nodes * cpn) % n_cls].copy()
    rng.shuffle(grid)
    grid = grid.reshape(n_nodes, cpn)
    for _ in range(10 * n_nodes * cpn + 10):
        bad = [k for k in range(n_nodes) if len(set(grid[k].tolist())) < cpn]
        if not bad:
            return [[int(c) for c in row] for row in grid]
        k = bad[0]
        row = grid[k].tolist()
        j = next(i for i in range(cpn) if row[i] in row[:i])
        c = row[j]
        ok = [
            (k2, j2)
            for k2 in range(n_nodes)
            if k2 != k and c not in grid[k2]
            for j2 in range(cpn)
            if grid[k2, j2] not in grid[k]
        ]
        if not ok:
            return None
        k2, j2 = ok[int(rng.integers(len(ok)))]
        grid[k, j], grid[k2, j2] = grid[k2, j2], c
    return None


def _partition_shards(
    labels: np.ndarray, n_nodes: int, m: int, cpn: int, strict: bool, rng: np.random.Generator
) -> list:
    """Each node gets m samples from ``cpn`` distinct classes, as evenly split as possible.

    Which classes each node holds (its layout) is the first of these that works: node k takes
    classes ``perm[(k * cpn + j) % C]`` (tiling), ``perm[(k + j * n) % C]`` (circulant), three
    seeded random deals (class slots dealt evenly, distinct per node), then strides cpn - 1 and 1
    (``perm`` is a seeded class permutation, j < cpn). If none can give m samples per node: raise
    when ``strict`` (explicit samples_per_node), else use the largest equal size one allows.
    """
    classes, pools = _class_pools(labels, rng)
    n_cls = len(classes)
    if cpn > n_cls:
        raise DataError(
            f"classes_per_node={cpn} exceeds the {n_cls} classes present; use at most {n_cls}"
        )
    order = rng.permutation(n_cls)
    counts = np.array([len(p) for p in pools], dtype=np.int64)

    def layouts():  # lazily, most structured first
        def strided(s: int) -> list[list[int]]:
            return [[int(order[(k * s + j) % n_cls]) for j in range(cpn)] for k in range(n_nodes)]

        yield strided(cpn)
        yield [[int(order[(k + j * n_nodes) % n_cls]) for j in range(cpn)] for k in range(n_nodes)]
        for _ in range(3):
            yield _random_shard_layout(n_nodes, cpn, order, rng)
        yield strided(max(1, cpn - 1))
        yield strided(1)

    even = -(-m // cpn)
    tried: list[list[list[int]]] = []
    found = None
    for nc in layouts():  # prefer a layout allowing a perfectly even split
        if nc is None or any(len(set(row)) != cpn for row in nc):
            continue
        tried.append(nc)
        if (alloc := _shard_flow(nc, counts, m, even)) is not None:
            found = (nc, alloc)
            break
    if found is None:
        m_ok = m if strict else 0
        best = None
        for nc in tried:  # largest feasible equal size (m itself when strict)
            lo, hi = m_ok, m
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (
                    (mid, hi) if _shard_flow(nc, counts, mid, mid) is not None else (lo, mid - 1)
                )
            if lo >= max(m_ok, 1) and _shard_flow(nc, counts, lo, lo) is not None:
                if best is None or lo > best[0]:
                    best = (lo, nc)
                if lo == m:
                    break
        if best is not None:
            found = (best[1], _balanced_shard_alloc(best[1], counts, best[0]))
    if found is None:
        raise DataError(
            f"shards: cannot give each of {n_nodes} nodes {m} samples from only {cpn} classes "
            f"each (class sizes {counts.tolist()}); use a smaller samples_per_node or a larger "
            "classes_per_node"
        )
    node_classes, alloc = found
    used = np.zeros(n_cls, dtype=np.int64)
    parts = []
    for k in range(n_nodes):
        chunks = []
        for c in node_classes[k]:
            chunks.append(pools[c][used[c] : used[c] + alloc[k, c]])
            used[c] += alloc[k, c]
        parts.append(np.concatenate(chunks))
    return parts


def partition(
    labels: np.ndarray | torch.Tensor,
    n_nodes: int,
    *,
    scheme: str = "iid",
    samples_per_node: int | None = None,
    alpha: float = 1.0,
    classes_per_node: int = 2,
    seed: int = 0,
    sizes: list[int] | None = None,
) -> list[np.ndarray]:
    """Split dataset indices over ``n_nodes`` disjoint, fixed (no replacement) local sets.

    Schemes: "iid" (random), "dirichlet" / "dirichlet(ALPHA)" (label skew; smaller alpha = more
    skewed), "shards" / "shards(K)" (each node holds at most K = ``classes_per_node`` classes).
    ``samples_per_node=None`` splits everything evenly (floor ``N / n_nodes`` each), except plain
    dirichlet, which uses every sample and yields unequal sizes (each node gets >= 1 sample), and
    shards when class sizes cannot fill that many from few classes (then the largest equal size).
    ``sizes`` (iid only): node ``k`` holds ``sizes[k]`` samples (overrides samples_per_node).
    Returns one sorted int64 index array per node.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    kind, alpha, cpn = _parse_scheme(scheme, alpha, classes_per_node)
    if y.ndim > 1 or not np.issubdtype(y.dtype, np.integer):
        if kind != "iid":
            raise DataError(f"partition {scheme!r} splits by class, but the targets have shape "
                            f"{tuple(y.shape[1:])} and dtype {y.dtype}, not class ids; use iid, "
                            "explicit index lists, or give each node its own data")
        y = np.zeros(len(y), dtype=np.int64)  # iid: only the sample count matters
    y = y.reshape(-1).astype(np.int64)
    n_total = len(y)
    if int(n_nodes) != n_nodes or n_nodes < 1:
        raise DataError(f"n_nodes={n_nodes} must be a positive integer")
    n_nodes = int(n_nodes)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"dirichlet alpha={alpha} must be > 0 (e.g. 0.1 skewed, 100 near-iid)")
    if cpn < 1:
        raise DataError(f"classes_per_node={cpn} must be >= 1")
    if samples_per_node is not None:
        if samples_per_node < 1:
            raise DataError(f"samples_per_node={samples_per_node} must be >= 1")
        if samples_per_node * n_nodes > n_total:
            raise DataError(
                f"samples_per_node={samples_per_node} x n_nodes={n_nodes} = "
                f"{samples_per_node * n_nodes} exceeds the {n_total} samples available; use "
                f"samples_per_node <= {n_total // n_nodes} or fewer nodes"
            )
    elif n_total < n_nodes:
        raise DataError(f"{n_total} samples cannot cover n_nodes={n_nodes}; use fewer nodes")
    if sizes is not None:
        return _partition_sizes(n_total, int(n_nodes), kind, [int(s) for s in sizes], seed)
    rng = _rng(seed)
    m = samples_per_node if samples_per_node is not None else n_total // n_nodes
    if kind == "iid":
        parts = _partition_iid(n_total, n_nodes, m, rng)
    elif kind == "dirichlet":
        if samples_per_node is None:
            parts = _partition_dirichlet_all(y, n_nodes, alpha, rng)
        else:
            parts = _partition_dirichlet_fixed(y, n_nodes, m, alpha, rng)
    else:
        parts = _partition_shards(y, n_nodes, m, cpn, samples_per_node is not None, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _partition_sizes(n_total: int, n_nodes: int, kind: str, sizes: list[int],
                     seed: int) -> list[np.ndarray]:
    """iid partition with per-node sizes: consecutive slices of one seeded permutation."""
    if kind != "iid":
        raise DataError(f"per-node sizes need partition 'iid', got {kind!r}")
    if len(sizes) != n_nodes or min(sizes) < 1:
        raise DataError(f"sizes must hold {n_nodes} counts >= 1, got {sizes}")
    if sum(sizes) > n_total:
        raise DataError(f"per-node sizes sum to {sum(sizes)} but only {n_total} samples exist; "
                        "lower data.samples_per_node or data.size_multipliers")
    perm = _rng(seed).permutation(n_total)
    cuts = np.cumsum([0, *sizes])
    return [np.sort(perm[a:b]).astype(np.int64) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
