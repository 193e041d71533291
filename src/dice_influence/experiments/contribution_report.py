"""Plots, tables and the README of ``dice experiment contribution`` (a person reads them at a
glance): reward bars coloured by true quality, contribution vs leave-one-node-out, and the
reciprocity heatmap. Sign everywhere: negative = helpful."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._util import atomic_savefig
from ..config import data_label, model_label

ROLE_LABEL = {"honest": "", "duplicate": "dup", "free_rider": "FR", "attacker": "ATK"}
KEYS = ("spearman_loo", "spearman_loo_honest", "spearman_quality", "spearman_shapley",
        "spearman_loo_shapley", "spearman_loo_proximal", "first_order_ratio",
        "free_riders_last", "free_riders_last_among_helpful",
        "free_rider_precision", "free_rider_recall", "attacker_reward", "shapley_sampler_max_error", "online_overhead", "online_overhead_wall",
        "plain_seconds", "measured_seconds", "loo_seconds", "loo_over_plain",
        "shapley_seconds", "shapley_evaluations", "shapley_se_mean")


def _label(r: dict[str, Any]) -> str:
    tag = ROLE_LABEL[r["role"]]
    if r["role"] in ("honest", "duplicate"):
        tag = f"{tag} {round(100 * r['noise'])}% {r['size']:g}x".strip()
    return f"{r['node']}\n{tag}"


def _quality_colours(records: list[dict[str, Any]]) -> list[Any]:
    from matplotlib import colormaps

    q = np.array([np.nan if r["quality"] is None else r["quality"] for r in records])
    cmap = colormaps["viridis"]
    ok = np.isfinite(q)
    lo, hi = (q[ok].min(), q[ok].max()) if ok.any() else (0.0, 1.0)
    out = []
    for r, v in zip(records, q, strict=True):
        if r["role"] == "attacker":
            out.append("tab:red")
        elif r["role"] == "free_rider":
            out.append("0.6")
        else:
            out.append(cmap(0.5 if hi == lo else 0.15 + 0.85 * (v - lo) / (hi - lo)))
    return out


def plots(seed_result: dict[str, Any], out: Path, budget: float = 100.0) -> None:
    """``rewards.png``, ``contribution_vs_loo.png``, ``reciprocity.png`` for one seed."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    recs = seed_result["records"]
    seed = seed_result["seed"]
    n = len(recs)
    cols = _quality_colours(recs)
    labels = [_label(r) for r in recs]

    fig = Figure(figsize=(max(8, 0.8 * n), 4.4), dpi=110)
    ax = fig.add_subplot()
    ax.bar(range(n), [r["reward"] for r in recs], color=cols, edgecolor="k", lw=0.5)
    ax.set_xticks(range(n), [lb.replace("% ", "%\n") for lb in labels], fontsize=6.5)
    ax.set_ylabel(f"reward (budget {budget:g})")
    ax.set_title(f"Rewards by measured helpful contribution (seed {seed}); colour = true quality")
    ax.legend(handles=[Patch(color=colormaps_v(0.95), label="high quality (clean, more data)"),
                       Patch(color=colormaps_v(0.15), label="low quality (noisy, less data)"),
                       Patch(color="0.6", label="free rider"),
                       Patch(color="tab:red", label="attacker")], fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, out / "rewards.png")

    if recs[0]["loo"] is not None:
        fig = Figure(figsize=(5.5, 5), dpi=110)
        ax = fig.add_subplot()
        x = np.array([r["loo"] for r in recs])
        y = np.array([r["contribution"] for r in recs])
        ax.scatter(x, y, c=cols, edgecolor="k", s=45, zorder=3)
        for r, xi, yi in zip(recs, x, y, strict=True):
            ax.annotate(str(r["node"]), (xi, yi), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        lim = [min(x.min(), y.min()), max(x.max(), y.max())]
        ax.plot(lim, lim, color="0.5", ls="--", lw=1, label="y = x")
        ax.axhline(0, color="0.8", lw=0.8)
        ax.axvline(0, color="0.8", lw=0.8)
        sp = seed_result["agreement"].get("spearman_loo")
        ax.set_title(f"First-order contribution vs leave-one-node-out (seed {seed})\n"
                     f"Spearman {sp:.3f}; negative = helpful" if sp is not None else
                     f"Contribution vs leave-one-node-out (seed {seed})")
        ax.set_xlabel("leave-one-node-out: others' test loss with − without node")
        ax.set_ylabel("measured contribution (adjoint, first order)")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        atomic_savefig(fig, out / "contribution_vs_loo.png")

    summ = seed_result["summary"]
    P = np.array(summ["P"], dtype=float)
    np.fill_diagonal(P, np.nan)
    out_, in_ = np.array(summ["proximal_out"], float), np.array(summ["proximal_in"], float)
    Rj = [np.nan if v is None else v for v in summ["reciprocity"]]
    fig = Figure(figsize=(11, 5.5), dpi=110)
    ax, bx = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    lim = float(np.nanmax(np.abs(P))) or 1.0
    im = ax.imshow(P, cmap="RdBu_r", vmin=-lim, vmax=lim)
    short = [lb.replace("\n", " ") for lb in labels]
    ax.set_xticks(range(n), short, rotation=90, fontsize=6)
    ax.set_yticks(range(n), short, fontsize=6)
    ax.set_xlabel("sender j (gives)")
    ax.set_ylabel("receiver k (takes)")
    ax.set_title("Who helped whom: proximal ledger I(j→k)\nblue = helpful, red = harmful",
                 fontsize=10)
    cb = fig.colorbar(im, ax=ax, shrink=0.8)
    cb.set_label("cumulative proximal influence (test loss)")
    y = np.arange(n)
    bx.barh(y - 0.2, out_, height=0.4, color="tab:blue", label="outflow Σ_k I(j→k) (gives)")
    bx.barh(y + 0.2, in_, height=0.4, color="tab:orange", label="inflow Σ_l I(l→j) (takes)")
    for yi, r in zip(y, Rj, strict=True):
        bx.annotate("R –" if not np.isfinite(r) else f"R {r:.2f}", (0, yi), fontsize=6,
                    xytext=(4, -2), textcoords="offset points")
    bx.set_yticks(y, short, fontsize=6)
    bx.invert_yaxis()
    bx.axvline(0, color="0.3", lw=0.8)
    bx.set_xlabel("proximal influence (negative = helpful)")
    bx.set_title("Reciprocity R_j = outflow / inflow per node", fontsize=10)
    bx.legend(fontsize=7, loc="lower right")
    bx.grid(axis="x", alpha=0.3)
    fig.suptitle(f"Reciprocity (seed {seed})")
    fig.tight_layout()
    atomic_savefig(fig, out / "reciprocity.png")


def colormaps_v(x: float) -> Any:
    from matplotlib import colormaps

    return colormaps["viridis"](x)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown_table(metrics: dict[str, Any]) -> str:
    """Agreement with the truths and costs: mean and worst over seeds."""
    mean, worst = metrics["agreement"], metrics["agreement_worst"]
    lines = ["| metric | mean | worst |", "|---|---|---|"]
    extra = [k for k in mean if k.startswith("spearman_loo_") and k not in KEYS]
    for k in (*KEYS, *extra):
        if k in mean:
            lines.append(f"| {k} | {_fmt(mean[k])} | {_fmt(worst[k])} |")
    return "\n".join(lines)


def node_table(metrics: dict[str, Any], seed: int) -> str:
    rows = [r for r in metrics["contribution"] if r["seed"] == seed]
    head = ("| node | role | noise | size | contribution | LOO | Shapley ± se | reward | "
            "free rider |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sh = "–" if r["shapley"] is None else f"{r['shapley']:.4f} ± {r['shapley_se']:.4f}"
        lines.append(f"| {r['node']} | {r['role']} | {r['noise']:.0%} | {r['size']:g}x | "
                     f"{r['contribution']:.4f} | {_fmt(r['loo'])} | {sh} | "
                     f"{r['reward']:.2f} | {_fmt(r['free_rider_flag'])} |")
    return "\n".join(lines)


def readme(cfg: Any, metrics: dict[str, Any]) -> str:
    seeds = metrics["seeds"]
    return (
        "# Node contribution, rewards and free riders\n\n"
        f"- data `{data_label(cfg)}`, {metrics['n_nodes']} nodes, topology "
        f"`{cfg.topology.name}`, model `{model_label(cfg)}`, loss `{cfg.loss.kind}`, "
        f"{metrics['rounds']} rounds, seeds {seeds}\n"
        f"- sign: {metrics['sign_convention']}\n"
        f"- observer: {metrics['observer']['settings']}\n"
        f"- reward rule: {metrics['reward_rule']}\n\n"
        "## Agreement with the ground truths (mean and worst over seeds)\n\n"
        f"{markdown_table(metrics)}\n\n"
        f"## Nodes (seed {seeds[0]})\n\n{node_table(metrics, seeds[0])}\n\n"
        "Files: `metrics.json` (`contribution`: one record per node and seed; `agreement`, "
        "`agreement_worst`), `contribution.csv`, `ledger.json` (the observer's summary per "
        "seed: per-round values, proximal ledger P[k][j]), `rewards.png`, "
        "`contribution_vs_loo.png`, `reciprocity.png`. See docs/contribution.md.\n"
    )
