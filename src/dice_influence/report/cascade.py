"""The cascade picture: one removal event's per-node influence on the graph, hop by hop.

A ring is drawn as a ring; other graphs put their nodes on concentric rings by hop distance from
the source (the source in the centre). One panel per hop ``s`` shows every node's influence at
round ``t+s`` with a diverging colour map centred at 0 (red = harmful, blue = helpful), by
default scaled per panel (each panel's largest |value| is printed in its title). The PNG carries
every node's value as hover targets for the report page.

Sign convention: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

CMAP = "RdBu_r"


def hop_distances(W: Any, source: int, reach: Any = None) -> np.ndarray:
    """Hop distance of every node from ``source`` (−1: not reached).

    From ``reach`` (``(hops+1, n)`` booleans, ``[s, k]``: ``k`` first reached at hop ``s``, as in
    :attr:`InfluenceResult.reach`) when given, else a breadth-first search along the edges of the
    mixing matrix ``W`` (``W[k][j] > 0``: ``j`` sends to ``k``)."""
    W = np.asarray(W, dtype=float)
    n = len(W)
    dist = np.full(n, -1, dtype=int)
    if reach is not None:
        R = np.asarray(reach, dtype=bool)
        for s in range(R.shape[0] - 1, -1, -1):
            dist[R[s]] = s
        dist[source] = 0
        return dist
    dist[source] = 0
    frontier = [source]
    s = 0
    while frontier:
        s += 1
        nxt = []
        for j in frontier:
            for k in np.flatnonzero(W[:, j] > 0):
                if dist[k] < 0:
                    dist[k] = s
                    nxt.append(int(k))
        frontier = nxt
    return dist


def concentric_layout(W: Any, dist: np.ndarray) -> np.ndarray:
    """``(n, 2)`` positions: ring ``r`` at radius ``r`` holds the nodes ``r`` hops from the
    source (unreached nodes on an outer ring); within a ring, nodes follow the mean angle of
    the nodes they hear from one ring in, so edges cross little."""
    W = np.asarray(W, dtype=float)
    n = len(dist)
    pos = np.zeros((n, 2))
    ang = np.zeros(n)
    outer = int(dist.max()) + 1 if (dist >= 0).any() else 1
    ring_of = np.where(dist < 0, outer, dist)
    for r in range(1, int(ring_of.max()) + 1):
        nodes = np.flatnonzero(ring_of == r)
        if len(nodes) == 0:
            continue
        pref = []
        for k in nodes:
            inner = [j for j in np.flatnonzero((W[k] > 0) | (W[:, k] > 0)) if ring_of[j] == r - 1]
            if r > 1 and inner:
                pref.append(float(np.angle(np.mean(np.exp(1j * ang[inner])))))
            else:
                pref.append(np.pi / 2 - 2 * np.pi * len(pref) / len(nodes))
        order = nodes[np.argsort(-np.asarray(pref))]
        even = np.pi / 2 - 2 * np.pi * np.arange(len(order)) / len(order)
        want = np.asarray(pref)[np.argsort(-np.asarray(pref))]
        shift = float(np.angle(np.mean(np.exp(1j * (want - even))))) if r > 1 else 0.0
        ang[order] = even + shift
        pos[order] = r * np.stack([np.cos(ang[order]), np.sin(ang[order])], 1)
    return pos


def cycle_order(W: Any) -> list[int] | None:
    """The nodes in cycle order when the graph (edges either way, self-loops ignored) is one
    cycle through all ``n >= 3`` nodes, i.e. a ring; else None."""
    A = np.asarray(W, dtype=float)
    n = len(A)
    U = (A > 0) | (A.T > 0)
    np.fill_diagonal(U, False)
    if n < 3 or not (U.sum(1) == 2).all():
        return None
    order, prev = [0], -1
    while len(order) < n:
        nxt = [int(k) for k in np.flatnonzero(U[order[-1]]) if k != prev]
        if not nxt or nxt[0] == 0:
            return None  # several cycles
        prev = order[-1]
        order.append(nxt[0])
    return order


def ring_layout(order: Sequence[int], source: int) -> np.ndarray:
    """``(n, 2)`` positions on the unit circle in cycle ``order``, ``source`` at the top."""
    n = len(order)
    pos = np.zeros((n, 2))
    start = list(order).index(source)
    for i in range(n):
        a = np.pi / 2 - 2 * np.pi * i / n
        pos[order[(start + i) % n]] = (np.cos(a), np.sin(a))
    return pos


def cascade_layout(W: Any, dist: np.ndarray, source: int, layout: str = "auto") -> np.ndarray:
    """Node positions by topology: ``"ring"`` (a cycle drawn as a circle), ``"concentric"``
    (rings by hop distance around the source) or ``"auto"`` (ring for a cycle graph, else
    concentric)."""
    if layout not in ("auto", "ring", "concentric"):
        raise ValueError(f"layout {layout!r}: use 'auto', 'ring' or 'concentric'")
    order = cycle_order(W) if layout in ("auto", "ring") else None
    if layout == "ring" and order is None:
        raise ValueError("layout 'ring' needs a graph that is one cycle through every node")
    return ring_layout(order, source) if order is not None else concentric_layout(W, dist)


def cascade_figure(
    W: Any,
    per_node: Any,
    source: int,
    *,
    reach: Any = None,
    round: int | None = None,
    title: str | None = None,
    scale: str = "panel",
    max_cols: int = 3,
    layout: str = "auto",
) -> Any:
    """Matplotlib figure of one event's cascade.

    ``W``: ``(n, n)`` mixing matrix (``W[k][j]`` = weight receiver ``k`` puts on sender ``j``);
    ``per_node``: ``(hops+1, n)`` influence at every node and hop, as ``per_node[e]`` of an
    :class:`~dice_influence.influence.InfluenceResult` (row 0: only the source's own step);
    ``reach``: the matching ``reach[e]`` (optional; else hop distances from ``W``);
    ``round``: the event's round, for the panel titles; ``scale``: ``"panel"`` (default: each
    panel's colours span ± its own largest |value|, printed in its title, so nodes stay
    distinguishable as the influence spreads thin), ``"symlog"`` or ``"linear"`` (one scale for
    all panels); ``layout``: see :func:`cascade_layout`. The figure's ``dice_hotspots``
    attribute holds every reached node's value as hover targets (see
    :func:`~dice_influence.report.core.hotspots_of`); :func:`plot_cascade` stores them in the PNG."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, SymLogNorm
    from matplotlib.figure import Figure

    from .core import hotspots_of

    V = np.asarray(per_node, dtype=float)
    if V.ndim != 2:
        raise ValueError(f"per_node must be (hops+1, n), got shape {V.shape}")
    W = np.asarray(W, dtype=float)
    hops, n = V.shape[0] - 1, V.shape[1]
    if W.shape != (n, n):
        raise ValueError(f"W has shape {W.shape} but per_node has {n} nodes")
    if not 0 <= source < n:
        raise ValueError(f"source {source} out of range 0..{n - 1}")
    if scale not in ("panel", "symlog", "linear"):
        raise ValueError(f"scale {scale!r}: use 'panel', 'symlog' or 'linear'")
    dist = hop_distances(W, source, reach)
    pos = cascade_layout(W, dist, source, layout)
    shown = np.where(np.isfinite(V), V, 0.0)
    shown[0] = 0.0
    shown[0, source] = V[0, source] if np.isfinite(V[0, source]) else 0.0
    vmax = float(np.abs(shown).max()) or 1.0

    def norm_of(s: int) -> Any:
        if scale == "panel":  # the source (often much larger) is clipped from hop 1 on
            sel = reached_at(s) & ((np.arange(n) != source) if s else True)
            m = float(np.abs(shown[s][sel]).max()) if sel.any() else 0.0
            return Normalize(-(m or 1.0), m or 1.0, clip=True)
        if scale == "symlog":
            return SymLogNorm(linthresh=vmax * 1e-2, linscale=0.4, vmin=-vmax, vmax=vmax,
                              base=10)
        return Normalize(-vmax, vmax)

    def reached_at(s: int) -> np.ndarray:
        return (dist >= 0) & (dist <= s) if s else np.arange(n) == source

    cmap = colormaps[CMAP]
    panels = hops + 1
    cols = min(panels, max_cols)
    rows = -(-panels // cols)
    head_in = 1.05 if title else 0.6
    fig_h = 3.3 * rows + 0.95 + head_in
    fig = Figure(figsize=(2.9 * cols, fig_h), dpi=110)
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[*([1.0] * rows), 0.06], hspace=0.32,
                          wspace=0.04, left=0.02, right=0.98, top=1 - head_in / fig_h,
                          bottom=0.62 / fig_h)
    E = sorted({(min(j, k), max(j, k)) for k in range(n) for j in range(n)
                if W[k, j] > 0 and j != k})  # drawn once per pair of nodes
    lim = float(np.abs(pos).max()) + 0.3 * max(1.0, float(np.abs(pos).max()) / 2)
    spots: list[dict[str, Any]] = []
    for s in range(panels):
        ax = fig.add_subplot(gs[s // cols, s % cols])
        for j, k in E:  # dark: the edges the influence crossed in this round
            front = s > 0 and {int(dist[j]), int(dist[k])} == {s - 1, s} and (
                W[k, j] > 0 if dist[k] == s else W[j, k] > 0)
            ax.plot(*pos[[j, k]].T, color="0.25" if front else "0.85",
                    lw=1.1 if front else 0.5, zorder=1)
        reached = reached_at(s)
        norm = norm_of(s)
        vals = shown[s]
        colours = [cmap(norm(v)) if reached[k] else (1, 1, 1, 1) for k, v in enumerate(vals)]
        others = np.arange(n) != source
        ax.scatter(pos[others, 0], pos[others, 1], s=210, c=[colours[k] for k in
                   np.flatnonzero(others)], edgecolors=["0.2" if reached[k] else "0.7" for k in
                   np.flatnonzero(others)], linewidths=0.7, zorder=2)
        ax.scatter(*pos[source], s=560, marker="*", c=[colours[source]], edgecolors="k",
                   linewidths=1.2, zorder=3)
        for k in range(n):
            dark = reached[k] and abs(norm(vals[k]) - 0.5) > 0.3
            ax.text(pos[k, 0], pos[k, 1] - (0.02 if k == source else 0), str(k), ha="center",
                    va="center", fontsize=7.5, color="w" if dark else "0.1", zorder=4)
        when = "" if round is None else f", round {round + s}"
        head = "hop 0: the source's own step" if s == 0 else f"hop {s}{when}"
        tot = vals[reached].sum()
        sub = f"sum {tot:+.2e}"
        if scale == "panel":
            sub += f"\ncolours ±{norm.vmax:.1e}"
            if s and abs(vals[source]) > norm.vmax * (1 + 1e-9):
                sub += ", source beyond"
        ax.set_title(f"{head}\n{sub}", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axis("off")
        labels = [f"node {k}, hop {s}{when}: " + (f"{vals[k]:+.3e}" if reached[k] else
                  "not reached yet") + (" (source)" if k == source else "") for k in range(n)]
        spots.append((ax, labels))
    bar = gs[rows, :].get_position(fig)
    width = min(bar.width, 7.0 / (2.9 * cols))
    cax = fig.add_axes((0.5 - width / 2, bar.y0, width, bar.height))
    from matplotlib.cm import ScalarMappable

    if scale == "panel":
        cb = fig.colorbar(ScalarMappable(norm=Normalize(-1, 1), cmap=cmap), cax=cax,
                          orientation="horizontal")
        cb.set_label("influence ÷ the panel's largest |influence| (scale in each title)\n"
                     "+ = harmful (red), − = helpful (blue)", fontsize=8.5)
        cb.set_ticks([-1, -0.5, 0, 0.5, 1])
    else:
        cb = fig.colorbar(ScalarMappable(norm=norm_of(0), cmap=cmap), cax=cax,
                          orientation="horizontal")
        cb.set_label("influence at the node: test loss with the batch − without it\n"
                     "(+ = harmful, − = helpful)" + (", symmetric log scale" if scale == "symlog"
                                                      else ""), fontsize=8.5)
        if scale == "symlog":
            ticks = [-vmax, -vmax * 1e-1, 0.0, vmax * 1e-1, vmax]
            cb.set_ticks(ticks)
            cb.set_ticklabels([f"{t:.1e}" if t else "0" for t in ticks])
    cb.ax.tick_params(labelsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.dice_hotspots = [h for ax, labels in spots  # type: ignore[attr-defined]
                         for h in hotspots_of(fig, pos, labels, ax, radius_pt=8.5)]
    return fig


def plot_cascade(W: Any, per_node: Any, source: int, path: str | Path, **kw: Any) -> Path:
    """Draw :func:`cascade_figure` to the PNG ``path`` (written atomically); returns it."""
    import json

    from .._util import atomic_savefig
    from .core import HOTSPOTS_KEY

    fig = cascade_figure(W, per_node, source, **kw)
    path = Path(path)
    meta = {HOTSPOTS_KEY: json.dumps(fig.dice_hotspots)} if path.suffix.lower() == ".png" else {}
    atomic_savefig(fig, path, metadata=meta or None)
    return path


def event_cascade(result: Any, index: int, W: Any, path: str | Path,
                  title: str | None = None, **kw: Any) -> Path:
    """Cascade PNG of event ``index`` of an ``InfluenceResult`` (``per_node[index]``)."""
    e = result.events[index]
    return plot_cascade(W, np.asarray(result.per_node[index]), e.node, path,
                        reach=np.asarray(result.reach[index]), round=e.round, title=title, **kw)


def trend(what: str, values: Sequence[float], axis: str = "hop") -> str:
    """One clause saying how ``values`` (one per hop, from hop 0) move, worded from the
    numbers: "fades", "grows" or "stays" (within a factor 2 of its first value)."""
    v = [float(x) for x in values]
    if not v:
        return f"{what}: no values"
    a, b = v[0], v[-1]
    lo, hi = min(v), max(v)
    span = f"{axis} 0 to {axis} {len(v) - 1}"
    if a == 0 or (a > 0) != (b > 0) and b != 0:
        return f"{what} goes from {a:+.2e} at {axis} 0 to {b:+.2e} at {axis} {len(v) - 1}"
    r = abs(b / a)
    if r < 0.5:
        return (f"{what} fades from {a:+.2e} to {b:+.2e} over {span} "
                f"({r:.0%} of its first value)")
    if r > 2:
        return f"{what} grows from {a:+.2e} to {b:+.2e} over {span} ({r:.1f}×)"
    return (f"{what} does not fade: it stays between {lo:+.2e} and {hi:+.2e} over {span}")


def fade_sentence(sums: Sequence[float], node_max: Sequence[float],
                  reached: Sequence[int] | None = None) -> str:
    """What fades and what does not, worded from one event's numbers per hop: ``sums`` (the
    influence summed over all nodes: the removal's total effect), ``node_max`` (the largest
    ``|influence|`` at one node) and ``reached`` (nodes reached so far, source included)."""
    spread = (f", as the influence spreads from 1 node to {reached[-1]}"
              if reached and reached[-1] > 1 else "")
    return (trend("The sum over all nodes", sums) + "; "
            + trend("the largest |influence| at a single node", node_max) + spread + ".")


def per_hop_summary(per_node: Any, reach: Any = None) -> dict[str, list[Any]]:
    """``sums``, ``node_max`` and ``reached`` per hop of one event's ``(hops+1, n)`` values."""
    V = np.asarray(per_node, dtype=float)
    V = np.where(np.isfinite(V), V, 0.0)
    out: dict[str, list[Any]] = {"sums": hop_sums(V),
                                 "node_max": [float(np.abs(V[s]).max()) for s in range(len(V))]}
    if reach is not None:
        R = np.asarray(reach, dtype=bool)
        out["reached"] = [int(R[: s + 1].any(0).sum()) for s in range(len(V))]
    return out


def hop_sums(per_node: Any, reach: Any = None) -> list[float]:
    """Σ over nodes of the influence at each hop (row 0: the source's own step)."""
    V = np.asarray(per_node, dtype=float)
    out = [float(V[0].sum())]
    out += [float(V[s].sum()) for s in range(1, V.shape[0])]
    return out


__all__: Sequence[str] = ("cascade_figure", "cascade_layout", "concentric_layout", "cycle_order", "event_cascade", "fade_sentence",
                          "hop_distances", "hop_sums", "per_hop_summary", "plot_cascade",
                          "trend")
