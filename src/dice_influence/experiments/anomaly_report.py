"""Files of ``dice experiment anomaly``: CSV tables, plots, Markdown tables and the README.

Sign convention: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._util import atomic_savefig, atomic_write_text, csv_text
from ..apps import anomaly as A
from ..config import RunConfig


def write_tables(per_seed: list[dict[str, Any]], out: Path) -> None:
    det_rows, edge_rows, acc_rows, rec_rows, arm_rows = [], [], [], [], []
    for r in per_seed:
        s = r["seed"]
        mal = set(r["malicious"])
        for row in r.get("series", []):
            det_rows.append({"seed": s, **row})
        runs = r["_runs"]
        for arm, res in runs.items():
            for e in res.evals:
                acc_rows.append({"seed": s, "arm": arm, **e})
            arm_rows.append({"seed": s, "arm": arm, **r["arms"][arm]})
        if "attack" in runs and runs["attack"].tracker is not None:
            tk = runs["attack"].tracker
            E = tk.seen.numpy()
            cum, score = tk.cum.numpy(), tk.score.numpy()
            N = A.normalized_scores(score, E)
            pruned = runs["attack_defended"].blocked if "attack_defended" in runs else None
            for k, j in zip(*np.nonzero(E), strict=True):
                edge_rows.append(
                    {
                        "seed": s,
                        "receiver": int(k),
                        "sender": int(j),
                        "receiver_malicious": int(k) in mal,
                        "sender_malicious": int(j) in mal,
                        "weight": float(r["W0"][k, j]),
                        "proximal_influence": float(cum[k, j]),
                        "normalized_score": float(N[k, j]),
                        "pruned_by_defense": None if pruned is None else bool(pruned[k, j]),
                    }
                )
            rec = r["reciprocity"]
            for j in range(len(rec["R"])):
                rec_rows.append(
                    {
                        "seed": s,
                        "node": j,
                        "malicious": j in mal,
                        "outflow": float(rec["outflow"][j]),
                        "inflow": float(rec["inflow"][j]),
                        "R": float(rec["R"][j]),
                    }
                )
    atomic_write_text(out / "detection_rounds.csv", csv_text(det_rows))
    atomic_write_text(out / "edges.csv", csv_text(edge_rows))
    atomic_write_text(out / "accuracy.csv", csv_text(acc_rows))
    atomic_write_text(out / "reciprocity.csv", csv_text(rec_rows))
    atomic_write_text(out / "defense.csv", csv_text(arm_rows))


def _focus_node(E: np.ndarray, malicious: np.ndarray, want: int | None) -> int:
    if want is not None:
        return want
    for k in range(len(E)):
        if not malicious[k] and (E[k] & malicious).any():
            return k
    return int(np.flatnonzero(~malicious)[0]) if (~malicious).any() else 0


def plots(r: dict[str, Any], ex: Any, out: Path) -> None:
    from matplotlib.figure import Figure

    runs = r["_runs"]
    mal = np.zeros(len(r["W0"]), dtype=bool)
    mal[r["malicious"]] = True
    if "attack" in runs and runs["attack"].tracker is not None and runs["attack"].tracker.rounds:
        tk = runs["attack"].tracker
        E = tk.seen.numpy()
        k = _focus_node(E, mal, ex.focus_node)
        H = tk.history("actual")
        rounds = np.asarray(tk.rounds) + 1
        fig = Figure(figsize=(9, 3.6), dpi=110)
        ax1, ax2 = fig.subplots(1, 2)
        for j in np.flatnonzero(E[k]):
            bad = bool(mal[j])
            kw = {"color": "tab:red", "lw": 2.0} if bad else {"lw": 1.0, "alpha": 0.8}
            lab = f"node {j}" + (" (attacker)" if bad else "")
            ax1.plot(rounds, H[:, k, j], label=lab, **kw)
            ax2.plot(rounds, np.cumsum(H[:, k, j]), label=lab, **kw)
        for ax, title in ((ax1, "per round"), (ax2, "cumulative")):
            ax.axhline(0, color="0.3", lw=0.6)
            ax.set_xlabel("round")
            ax.set_title(f"I_prox(j → {k}), {title}", fontsize=10)
            ax.grid(alpha=0.3)
        ax1.set_ylabel("proximal influence (+ = harmful)")
        ax2.legend(fontsize=7, loc="best")
        fig.tight_layout()
        atomic_savefig(fig, out / "fig4_neighbours.png")

        judged, bad = A.edge_sets(E, mal)
        N = A.normalized_scores(tk.score.numpy(), E)
        fig = Figure(figsize=(4.2, 4), dpi=110)
        ax = fig.add_subplot()
        if bad[judged].any() and (~bad[judged]).any():
            fpr, tpr = A.roc_curve(N[judged], bad[judged])
            auc = A.auroc(N[judged], bad[judged])
            ax.plot(fpr, tpr, label=f"edges (AUROC {auc:.3f})")
            ns = A.node_scores(tk.score.numpy(), judged)
            has = judged.sum(0) > 0
            fpr, tpr = A.roc_curve(ns[has], mal[has])
            ax.plot(fpr, tpr, ls="--", label=f"nodes (AUROC {A.auroc(ns[has], mal[has]):.3f})")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.6)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("ROC, cumulative proximal influence", fontsize=10)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        atomic_savefig(fig, out / "roc.png")

    fig = Figure(figsize=(6, 3.6), dpi=110)
    ax = fig.add_subplot()
    for i, (arm, res) in enumerate(runs.items()):
        rr = [e["round"] for e in res.evals]
        ax.plot(rr, [e["honest_acc_mean"] for e in res.evals], color=f"C{i}", label=arm)
        ax.plot(rr, [e["honest_acc_worst"] for e in res.evals], color=f"C{i}", ls=":", lw=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("honest test accuracy (— mean, ··· worst)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out / "accuracy.png")

    if "attack_defended" in runs:
        _plot_graph(r["W0"], runs["attack_defended"].blocked, mal, out / "graph_pruned.png")


def _plot_graph(W0: np.ndarray, blocked: np.ndarray, mal: np.ndarray, path: Path) -> None:
    from matplotlib.figure import Figure

    n = len(W0)
    ang = np.pi / 2 - 2 * np.pi * np.arange(n) / n
    pos = np.stack([np.cos(ang), np.sin(ang)], 1)
    fig = Figure(figsize=(6, 6), dpi=110)
    ax = fig.add_subplot()
    E = (W0 > 0) & ~np.eye(n, dtype=bool)
    for k, j in zip(*np.nonzero(E), strict=True):
        if k < j and E[j, k] and blocked[k, j] == blocked[j, k]:
            pr = blocked[k, j]
        elif not blocked[k, j]:
            if E[j, k] and not blocked[j, k]:
                continue  # drawn once as a kept undirected edge
            pr = False
        else:
            pr = True
        xs, ys = [pos[j, 0], pos[k, 0]], [pos[j, 1], pos[k, 1]]
        if pr:
            ax.plot(xs, ys, color="tab:red", lw=1.0, ls="--", alpha=0.8, zorder=1)
        else:
            ax.plot(xs, ys, color="0.6", lw=0.6, zorder=0)
    ax.scatter(pos[~mal, 0], pos[~mal, 1], s=60, c="tab:blue", zorder=2, label="honest")
    ax.scatter(pos[mal, 0], pos[mal, 1], s=90, c="tab:red", marker="X", zorder=2, label="attacker")
    for i in range(n):
        ax.annotate(str(i), tuple(pos[i] * 1.08), ha="center", va="center", fontsize=6)
    ax.plot([], [], color="tab:red", ls="--", label="pruned edge")
    ax.plot([], [], color="0.6", label="kept edge")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("graph after self-healing (attack + DICE defence)", fontsize=10)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    atomic_savefig(fig, path)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


DET_KEYS = (
    "auroc_edge",
    "auroc_node",
    "precision",
    "recall",
    "f1",
    "min_precision",
    "min_recall",
    "rounds_to_90pct",
    "honest_edges_flagged",
)
ARM_KEYS = (
    "honest_acc_mean",
    "honest_acc_worst",
    "honest_edges_pruned",
    "malicious_edges_pruned",
    "honest_graph_connected",
)


def markdown_tables(metrics: dict[str, Any]) -> str:
    """Detection and defence tables (mean and worst over seeds) as Markdown."""
    lines = []
    if "detection" in metrics:
        lines += ["| detection | " + " | ".join(DET_KEYS) + " |", "|---|" + "---|" * len(DET_KEYS)]
        for lab, d in (("mean", metrics["detection"]), ("worst", metrics["detection_worst"])):
            lines.append(f"| {lab} | " + " | ".join(_fmt(d.get(k)) for k in DET_KEYS) + " |")
        lines.append("")
    lines += [
        "| arm | " + " | ".join(f"{k} (mean / worst)" for k in ARM_KEYS) + " |",
        "|---|" + "---|" * len(ARM_KEYS),
    ]
    for arm, d in metrics["defense"].items():
        w = metrics["defense_worst"][arm]
        lines.append(
            f"| {arm} | "
            + " | ".join(f"{_fmt(d.get(k))} / {_fmt(w.get(k))}" for k in ARM_KEYS)
            + " |"
        )
    return "\n".join(lines) + "\n"


def readme(cfg: RunConfig, metrics: dict[str, Any]) -> str:
    return (
        "# dice experiment anomaly\n\n"
        f"- {cfg.topology.n} nodes, topology `{cfg.topology.name}`, data `{cfg.data.dataset}` "
        f"({cfg.data.partition}), {cfg.train.rounds} rounds, seeds {metrics['seeds']}\n"
        f"- attackers per seed: {metrics['malicious']}\n\n"
        + markdown_tables(metrics)
        + "\nWorst = min over seeds (max for rounds and flagged/pruned honest edges). "
        "Files: `metrics.json`, `detection_rounds.csv` (rule evaluated at every round), "
        "`edges.csv` (per-edge cumulative proximal influence), `accuracy.csv`, "
        "`reciprocity.csv`, `defense.csv`, `fig4_neighbours.png`, `roc.png`, `accuracy.png`, "
        "`graph_pruned.png`.\n\nSign convention: influence = loss with the data − loss without "
        "it; positive = harmful.\n"
    )
