"""The cascade picture: one removal event's per-node influence on the graph, hop by hop.

Nodes sit on concentric rings by their hop distance from the source (the source in the centre);
one panel per hop ``s`` shows every node's influence at round ``t+s`` with a diverging colour map
centred at 0 (red = harmful, blue = helpful), shared by all panels.

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


def cascade_figure(
    W: Any,
    per_node: Any,
    source: int,
    *,
    reach: Any = None,
    round: int | None = None,
    title: str | None = None,
    scale: str = "symlog",
    max_cols: int = 5,
) -> Any:
    """Matplotlib figure of one event's cascade.

    ``W``: ``(n, n)`` mixing matrix (``W[k][j]`` = weight receiver ``k`` puts on sender ``j``);
    ``per_node``: ``(hops+1, n)`` influence at every node and hop, as ``per_node[e]`` of an
    :class:`~dice_influence.influence.InfluenceResult` (row 0: only the source's own step);
    ``reach``: the matching ``reach[e]`` (optional; else hop distances from ``W``);
    ``round``: the event's round, for the panel titles; ``scale``: ``"symlog"`` (every hop
    visible although influence fades) or ``"linear"``."""
    from matplotlib import colormaps
    from matplotlib.colors import Normalize, SymLogNorm
    from matplotlib.figure import Figure

    V = np.asarray(per_node, dtype=float)
    if V.ndim != 2:
        raise ValueError(f"per_node must be (hops+1, n), got shape {V.shape}")
    W = np.asarray(W, dtype=float)
    hops, n = V.shape[0] - 1, V.shape[1]
    if W.shape != (n, n):
        raise ValueError(f"W has shape {W.shape} but per_node has {n} nodes")
    if not 0 <= source < n:
        raise ValueError(f"source {source} out of range 0..{n - 1}")
    dist = hop_distances(W, source, reach)
    pos = concentric_layout(W, dist)
    shown = np.where(np.isfinite(V), V, 0.0)
    shown[0] = 0.0
    shown[0, source] = V[0, source] if np.isfinite(V[0, source]) else 0.0
    vmax = float(np.abs(shown).max()) or 1.0
    if scale == "symlog":
        norm: Any = SymLogNorm(linthresh=vmax * 1e-2, linscale=0.4, vmin=-vmax, vmax=vmax, base=10)
    elif scale == "linear":
        norm = Normalize(-vmax, vmax)
    else:
        raise ValueError(f"scale {scale!r}: use 'symlog' or 'linear'")
    cmap = colormaps[CMAP]

    panels = hops + 1
    cols = min(panels, max_cols)
    rows = -(-panels // cols)
    head_in = 0.75 if title else 0.45
    fig_h = 3.0 * rows + 0.75 + head_in
    fig = Figure(figsize=(2.9 * cols, fig_h), dpi=110)
    gs = fig.add_gridspec(rows + 1, cols, height_ratios=[*([1.0] * rows), 0.06], hspace=0.25,
                          wspace=0.04, left=0.02, right=0.98, top=1 - head_in / fig_h,
                          bottom=0.42 / fig_h)
    E = [(j, k) for k in range(n) for j in range(n) if W[k, j] > 0 and j != k]
    lim = float(np.abs(pos).max()) + 0.55
    for s in range(panels):
        ax = fig.add_subplot(gs[s // cols, s % cols])
        for j, k in E:  # dark: the edges the influence crossed in this round
            front = s > 0 and dist[k] == s and dist[j] == s - 1
            ax.plot(*pos[[j, k]].T, color="0.25" if front else "0.85",
                    lw=1.1 if front else 0.5, zorder=1)
        reached = (dist >= 0) & (dist <= s) if s else np.arange(n) == source
        vals = shown[s]
        colours = [cmap(norm(v)) if reached[k] else (1, 1, 1, 1) for k, v in enumerate(vals)]
        others = np.arange(n) != source
        ax.scatter(pos[others, 0], pos[others, 1], s=150, c=[colours[k] for k in
                   np.flatnonzero(others)], edgecolors=["0.2" if reached[k] else "0.7" for k in
                   np.flatnonzero(others)], linewidths=0.7, zorder=2)
        ax.scatter(*pos[source], s=480, marker="*", c=[colours[source]], edgecolors="k",
                   linewidths=1.2, zorder=3)
        for k in range(n):
            dark = reached[k] and abs(norm(vals[k]) - 0.5) > 0.35
            ax.text(pos[k, 0], pos[k, 1] - (0.02 if k == source else 0), str(k), ha="center",
                    va="center", fontsize=6.5, color="w" if dark else "0.1", zorder=4)
        when = "" if round is None else f", round {round + s}"
        head = "hop 0: the source's own step" if s == 0 else f"hop {s}{when}"
        tot = vals[reached].sum()
        ax.set_title(f"{head}\nsum over nodes {tot:+.2e}", fontsize=8.5)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.axis("off")
    bar = gs[rows, :].get_position(fig)
    width = min(bar.width, 7.0 / (2.9 * cols))
    cax = fig.add_axes((0.5 - width / 2, bar.y0, width, bar.height))
    from matplotlib.cm import ScalarMappable

    cb = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cb.set_label("influence at the node: test loss with the batch − without it "
                 "(+ = harmful, − = helpful)" + (", symmetric log scale" if scale == "symlog"
                                                  else ""), fontsize=8)
    cb.ax.tick_params(labelsize=7)
    if scale == "symlog":
        ticks = [-vmax, -vmax * 1e-1, 0.0, vmax * 1e-1, vmax]
        cb.set_ticks(ticks)
        cb.set_ticklabels([f"{t:.1e}" if t else "0" for t in ticks])
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_cascade(W: Any, per_node: Any, source: int, path: str | Path, **kw: Any) -> Path:
    """Draw :func:`cascade_figure` to the PNG ``path`` (written atomically); returns it."""
    from .._util import atomic_savefig

    fig = cascade_figure(W, per_node, source, **kw)
    path = Path(path)
    atomic_savefig(fig, path)
    return path


def event_cascade(result: Any, index: int, W: Any, path: str | Path,
                  title: str | None = None, **kw: Any) -> Path:
    """Cascade PNG of event ``index`` of an ``InfluenceResult`` (``per_node[index]``)."""
    e = result.events[index]
    return plot_cascade(W, np.asarray(result.per_node[index]), e.node, path,
                        reach=np.asarray(result.reach[index]), round=e.round, title=title, **kw)


def hop_sums(per_node: Any, reach: Any = None) -> list[float]:
    """Σ over nodes of the influence at each hop (row 0: the source's own step)."""
    V = np.asarray(per_node, dtype=float)
    out = [float(V[0].sum())]
    out += [float(V[s].sum()) for s in range(1, V.shape[0])]
    return out


__all__: Sequence[str] = ("cascade_figure", "concentric_layout", "event_cascade", "hop_distances",
                          "hop_sums", "plot_cascade")
