"""Files of ``dice experiment anomaly``: CSV tables, plots, Markdown tables and the README.

Sign convention: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .._util import atomic_savefig, atomic_write_text, csv_text
from ..apps import anomaly as A
from ..config import RunConfig, data_label
from ..report import Run, Section, Stat, Table, fmt, report_sections


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
    from matplotlib.ticker import MaxNLocator

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
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
            ax.set_title(f"I_prox(j → {k}), {title}", fontsize=10)
            ax.grid(alpha=0.3)
        ax1.set_ylabel("proximal influence (+ = harmful)")
        ax2.set_ylabel("cumulative proximal influence")
        ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
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
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("honest test accuracy (— mean, ··· worst)")
    ax.set_title("honest nodes' test accuracy per arm", fontsize=10)
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
        return "yes" if v else "no"
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
BOOL_KEYS = ("honest_graph_connected", "honest_params_finite")
"""Yes/no per seed: "mean" over seeds is the fraction of seeds where it holds."""


def checks(cfg: RunConfig | None) -> tuple[int, int]:
    """Rounds over which ``min_precision`` / ``min_recall`` are taken (experiment.detection)."""
    det = (cfg.experiment.get("detection") or {}) if cfg is not None else {}
    last = cfg.train.rounds if cfg is not None else 100
    return int(det.get("from_round", 3)), min(int(det.get("to_round", 100)), last)


def det_headers(rounds: tuple[int, int]) -> dict[str, str]:
    a, b = rounds
    return {
        "auroc_edge": "edge AUROC",
        "auroc_node": "node AUROC",
        "precision": "precision (end)",
        "recall": "recall (end)",
        "f1": "F1 (end)",
        "min_precision": f"min precision (rounds {a}-{b})",
        "min_recall": f"min recall (rounds {a}-{b})",
        "rounds_to_90pct": "rounds to flag 90 %",
        "honest_edges_flagged": "honest edges flagged (end)",
    }


ARM_HEADERS = {
    "honest_acc_mean": "honest acc, mean node",
    "honest_acc_worst": "honest acc, worst node",
    "honest_edges_pruned": "honest edges pruned",
    "malicious_edges_pruned": "attacker edges pruned",
    "honest_graph_connected": "honest graph connected",
}


def legend(rounds: tuple[int, int], n_seeds: int) -> str:
    """What the detection columns mean (README, console and report)."""
    a, b = rounds
    over = f"mean / worst over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    return (
        f"Cells: {over} (worst = lowest accuracy, AUROC, precision, recall; highest pruned "
        "fraction and rounds). An edge is flagged when the receiver's detection rule marks the "
        "sender. precision/recall/F1 (end): flags at the last round, over attacker->honest "
        f"edges; min precision / min recall: the lowest value over every round from {a} to {b} "
        "(the rule re-applied each round), so min recall <= recall at the end. Rounds to flag "
        "90 %: first round with 90 % of attacker edges flagged ('-': not reached in some seed). "
        "'honest graph connected': seeds where it stays connected."
    )


def _pair(k: str, mean: Any, worst: Any, n_seeds: int) -> str:
    if k in BOOL_KEYS:
        if mean is None:
            return "-"
        held = round(float(mean) * n_seeds)
        return f"{'yes' if held == n_seeds else 'no'} ({held}/{n_seeds} seeds)"
    if n_seeds == 1:
        return _fmt(mean)
    return f"{_fmt(mean)} / {_fmt(worst)}"


def table_rows(metrics: dict[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    """Detection rows (mean, worst) and defence rows (one per arm), formatted alike."""
    n = len(metrics.get("seeds", [])) or 1
    det: list[list[str]] = []
    if "detection" in metrics:
        d, w = metrics["detection"], metrics["detection_worst"]
        det.append([_pair(k, d.get(k), w.get(k), n) for k in DET_KEYS])
    arms = []
    for arm, d in metrics["defense"].items():
        w = metrics["defense_worst"][arm]
        arms.append([arm] + [_pair(k, d.get(k), w.get(k), n) for k in ARM_KEYS])
    return det, arms


def markdown_tables(metrics: dict[str, Any], rounds: tuple[int, int] = (3, 100)) -> str:
    """Detection and defence tables (mean / worst over seeds) as Markdown."""
    heads = det_headers(rounds)
    det, arms = table_rows(metrics)
    lines = []
    if det:
        lines += ["| detection | " + " | ".join(heads[k] for k in DET_KEYS) + " |",
                  "|---|" + "---|" * len(DET_KEYS)]
        lines += [f"| {metrics.get('detection_rule', {}).get('rule', '')} rule | "
                  + " | ".join(r) + " |" for r in det]
        lines.append("")
    lines += ["| arm | " + " | ".join(ARM_HEADERS[k] for k in ARM_KEYS) + " |",
              "|---|" + "---|" * len(ARM_KEYS)]
    lines += ["| " + " | ".join(r) + " |" for r in arms]
    return "\n".join(lines) + "\n"


def rich_tables(metrics: dict[str, Any], rounds: tuple[int, int] = (3, 100)) -> list[Any]:
    """The same tables for the console (rich)."""
    from rich.table import Table

    n = len(metrics.get("seeds", [])) or 1
    over = f"mean / worst over {n} seeds" if n > 1 else "one seed"
    heads = det_headers(rounds)
    det, arms = table_rows(metrics)
    out = []
    if det:  # one row per measure
        d, w = metrics["detection"], metrics["detection_worst"]
        t = Table(title=f"detection, rule {metrics.get('detection_rule', {}).get('rule', '?')}")
        t.add_column("measure")
        t.add_column("mean over seeds" if n > 1 else "value", justify="right")
        if n > 1:
            t.add_column("worst seed", justify="right")
        for k in DET_KEYS:
            t.add_row(heads[k], _fmt(d.get(k)), *([_fmt(w.get(k))] if n > 1 else []))
        out.append(t)
    t = Table(title=f"defence: honest nodes per arm ({over})")
    t.add_column("arm")
    for k in ARM_KEYS:
        t.add_column(ARM_HEADERS[k], justify="right")
    for r in arms:
        t.add_row(*r)
    out.append(t)
    return out


def readme(cfg: RunConfig, metrics: dict[str, Any]) -> str:
    rounds = checks(cfg)
    return (
        "# dice experiment anomaly\n\n"
        f"- {cfg.topology.n} nodes, topology `{cfg.topology.name}`, data `{data_label(cfg)}` "
        f"({cfg.data.partition}), {cfg.train.rounds} rounds, seeds {metrics['seeds']}\n"
        f"- attackers per seed: {metrics['malicious']}\n\n"
        + markdown_tables(metrics, rounds)
        + "\n" + legend(rounds, len(metrics["seeds"])) + "\n\n"
        "Files: `metrics.json`, `detection_rounds.csv` (rule evaluated at every round), "
        "`edges.csv` (per-edge cumulative proximal influence), `accuracy.csv`, "
        "`reciprocity.csv`, `defense.csv`, `fig4_neighbours.png`, `roc.png`, `accuracy.png`, "
        "`graph_pruned.png`, `report.html` (everything on one page).\n\nSign convention: "
        "influence = loss with the data − loss without it; positive = harmful.\n"
    )


@report_sections("anomaly")
def report_sections_anomaly(run: Run) -> list[Section]:
    """The anomaly run's part of ``report.html``."""
    import yaml

    m = run.metrics
    raw = yaml.safe_load(run.config_text or "") or {}
    det_cfg = (raw.get("experiment") or {}).get("detection") or {}
    last = int((raw.get("train") or {}).get("rounds", 100))
    rounds = (int(det_cfg.get("from_round", 3)), min(int(det_cfg.get("to_round", 100)), last))
    n = len(m.get("seeds", [])) or 1
    det, arms = table_rows(m)
    heads = det_headers(rounds)
    d = m.get("detection") or {}
    dfn = m.get("defense", {})
    stats = []
    first = (m.get("per_seed") or [{}])[0]
    if first.get("malicious") is not None:
        caught = (first.get("detection") or {}).get("caught")
        stats.append(Stat(f"attackers (seed {first.get('seed')})", str(first["malicious"]),
                          f"caught by a neighbour: {caught}" if caught is not None else ""))
    if d:
        stats.append(Stat("edge AUROC", fmt(d.get("auroc_edge"), 3),
                          "cumulative proximal influence ranks attacker edges first = 1"))
        stats.append(Stat("recall / precision (end)",
                          f"{fmt(d.get('recall'), 2)} / {fmt(d.get('precision'), 2)}",
                          f"lowest recall over rounds {rounds[0]}-{rounds[1]}: "
                          f"{fmt(d.get('min_recall'), 2)}"))
    for arm, label in (("no_attack", "no attack"), ("attack", "attack, no defence"),
                       ("attack_defended", "attack + DICE defence")):
        if arm in dfn:
            stats.append(Stat(f"honest accuracy: {label}", fmt(dfn[arm]["honest_acc_mean"], 3),
                              f"worst honest node {fmt(dfn[arm]['honest_acc_worst'], 3)}"))
    over = f"mean / worst over {n} seeds" if n > 1 else "one seed"
    tables = []
    if det:  # one row per measure: readable however many columns
        dw = m.get("detection_worst", {})
        cols = ["detection", "mean over seeds", "worst seed"] if n > 1 else ["detection", "value"]
        rows = [[heads[k], fmt(d.get(k)), fmt(dw.get(k))] if n > 1 else [heads[k], fmt(d.get(k))]
                for k in DET_KEYS]
        arms_scored = ", ".join(sorted(set(m.get("detection_scored_arm") or [])))
        tables.append(Table(cols, rows, caption=f"detection rule "
                            f"{m.get('detection_rule', {}).get('rule', '?')}"
                            + (f", scored in arm {arms_scored}" if arms_scored else "")))
    tables.append(Table(["arm"] + [ARM_HEADERS[k] for k in ARM_KEYS], arms,
                        caption=f"defence, honest nodes ({over})"))
    return [Section(
        title="Malicious neighbours: detection and self-healing",
        text="Each honest node measures the proximal influence of every neighbour on its own "
             "test loss (positive = harmful) and flags neighbours whose score says harmful; "
             "with the defence on it stops listening to them. Arms: no_attack (reference), "
             "attack (detection scored, nothing pruned), attack_defended (flagged edges "
             "pruned), attack_baseline (robust aggregation).",
        stats=stats,
        tables=tables,
        figures=[
            run.figure("fig4_neighbours.png",
                       "Proximal influence of each neighbour on one honest node, per round "
                       "(left) and summed (right); the attacker (red) climbs above zero = "
                       "harmful, honest neighbours stay below (helpful)."),
            run.figure("roc.png",
                       "ROC of ranking edges (solid) and nodes (dashed) by cumulative proximal "
                       "influence; area 1 = every attacker ranked above every honest node."),
            run.figure("accuracy.png",
                       "Honest nodes' test accuracy per arm over rounds (solid: mean over "
                       "honest nodes, dotted: worst honest node)."),
            run.figure("graph_pruned.png",
                       "The graph after self-healing: dashed red edges were cut by the DICE "
                       "defence; crosses are attackers."),
        ],
        notes=[legend(rounds, n)],
    )]
