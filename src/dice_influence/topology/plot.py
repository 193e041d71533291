"""Drawing a mixing graph (PNG)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from ._common import TopologyError
from .graphs import to_networkx
from .validate import validate_mixing


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
