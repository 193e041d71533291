"""Experiment: collaborator selection on data with hidden groups (SPEC §6).

``dice experiment selection CONFIG --out DIR [--set key=value ...] [--seeds 0,1,2]``

The config is a run config whose data has hidden groups (``data.groups``: labels permuted, or
images rotated, per group) and per-node test splits, whose ``topology`` is the *pool* of
possible links (e.g. ``complete``), plus an ``experiment:`` mapping (:class:`SelectionConfig`).
Arms, each a full run of the one loop on the same seed and data:

- ``dice``: policy ``select`` on the pool (proximal influence, :mod:`~dice_influence.apps.selection`);
- ``pens``: policy ``pens`` on the pool (loss of a sender's model on the node's own data);
- ``static``: a random ``degree``-regular graph, uniform weights, no policy;
- ``oracle``: every node linked to exactly its true group (uniform weights; upper bound);
- ``local``: no links (lower bound).

Accuracy is each node's accuracy on its *own distribution*: the shared validation set (never
used by any policy) transformed by the node's group. ``metrics.json["selection"]``:
``ari_final``, ``ari_per_round`` (the ``dice`` arm's kept links vs the groups, adjusted Rand
index of the kept graph's components), ``arms[ARM]`` = ``acc_mean`` (mean over seeds of the
nodes' mean accuracy) and ``acc_worst`` (the worst seed's); more in ``per_seed``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .. import data as D
from .._util import atomic_savefig, atomic_write_text, csv_text, write_json
from ..apps.selection import group_ari, within_group_fraction
from ..config import ConfigError, RunConfig, dump_config
from ..gossip import node_losses, require_accuracy
from ._common import (
    SIGN,
    add_command,
    finish_run,
    mean_worst,
    parse_settings,
    register_report,
    run_arm,
    run_seeds,
)

ARMS = ("dice", "static", "pens", "oracle", "local")


class SelectionConfig(BaseModel):
    """The ``experiment:`` mapping of a selection config."""

    model_config = ConfigDict(extra="forbid")
    degree: int = Field(3, ge=1, description="neighbours kept (and the static graph's degree)")
    every: int = Field(3, ge=1, description="rounds between rewirings")
    candidates: int = Field(6, ge=0, description="sampled candidates per node and epoch")
    start: int = Field(0, ge=0)
    initial: Literal["none", "random"] = "none"
    reciprocity: float = Field(0.0, ge=0.0)
    score: Literal["link_exact", "link", "update"] = "link_exact"
    bar: float | None = None
    memory: float = Field(1.0, ge=0.0, le=1.0)
    pens_samples: int | None = Field(None, ge=1)
    ari_round: int = Field(50, ge=0, description="round at which the ARI target is read")
    arms: list[Literal[ARMS]] = list(ARMS)  # type: ignore[valid-type]
    plots: bool = True


def parse_experiment(cfg: RunConfig) -> SelectionConfig:
    """Validate the selection settings and what they need of the run config."""
    ex = parse_settings(SelectionConfig, cfg)
    if cfg.data.groups is None:
        raise ConfigError("data.groups must be set: selection needs hidden groups of nodes "
                          "(e.g. data.groups: {count: 4, transform: permute_labels})")
    if not cfg.data.test_samples_per_node:
        raise ConfigError("data.test_samples_per_node must be set: each node scores senders "
                          "on its own test split z'_k (e.g. 10)")
    n = cfg.topology.n
    if ex.degree >= n:
        raise ConfigError(f"experiment.degree={ex.degree} must be < topology.n={n}")
    if cfg.policy is not None:
        raise ConfigError("remove the top-level policy: section; the selection experiment sets "
                          "each arm's policy itself")
    if "static" in ex.arms:
        from ..topology import TopologyError, mixing_matrix

        try:
            mixing_matrix("random-regular", n, degree=ex.degree, seed=cfg.seed)
        except TopologyError as exc:
            raise ConfigError(f"experiment.degree={ex.degree}: the static arm's graph: {exc}") \
                from None
    return ex


def oracle_matrix(groups: np.ndarray) -> np.ndarray:
    """Every node linked to exactly its group (itself included), uniform weights."""
    g = np.asarray(groups)
    A = (g[:, None] == g[None, :]).astype(float)
    return A / A.sum(1, keepdims=True)


def arm_config(cfg: RunConfig, ex: SelectionConfig, arm: str, groups: np.ndarray) -> RunConfig:
    """The run config of one arm (module docstring)."""
    raw = cfg.model_dump(mode="json")
    raw["experiment"] = {}
    rew = {"degree": ex.degree, "every": ex.every, "candidates": ex.candidates,
           "start": ex.start, "initial": ex.initial}
    top = raw["topology"]
    if arm == "dice":
        raw["policy"] = {"kind": "select", **rew, "reciprocity": ex.reciprocity,
                         "score": ex.score, "bar": ex.bar, "memory": ex.memory}
        if not any(o.get("kind") == "proximal" for o in raw["observers"]):
            raw["observers"] = [*raw["observers"],
                                {"kind": "proximal", "readout": "pre", "history": False}]
    elif arm == "pens":
        raw["policy"] = {"kind": "pens", **rew, "samples": ex.pens_samples}
    elif arm == "static":
        raw["topology"] = {"name": "random-regular", "n": top["n"], "degree": ex.degree,
                           "weights": "uniform"}
    elif arm in ("oracle", "local"):  # oracle: its schedule is set on the problem (arm_problem)
        raw["topology"] = {"name": "isolated", "n": top["n"]}
    else:
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    from ..config import load_config

    return load_config(raw)


def arm_problem(acfg: RunConfig, arm: str, groups: np.ndarray) -> Any:
    """The problem of one arm; the oracle's block-diagonal graph (disconnected on purpose, which
    a config's ``topology.matrix`` refuses) is set as its schedule here."""
    import dataclasses

    from ..simulator import build_problem
    from ..topology import StaticSchedule

    p = build_problem(acfg)
    if arm == "oracle":
        p = dataclasses.replace(p, schedule=StaticSchedule(oracle_matrix(groups),
                                                           connectivity="ignore"), _mixers={})
    return p


def own_distribution_sets(problem: Any, cfg: RunConfig,
                          groups: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-node evaluation sets ``(n, N, ...)``, ``(n, N)``: the shared validation set as each
    node's group sees it."""
    g = cfg.data.groups
    assert g is not None
    maps = D.group_label_maps(g.count, problem.dataset.num_classes, cfg.seed)
    per_group = [D.transform_group(problem.val_x, problem.val_y, gi, g.transform, maps)
                 for gi in range(g.count)]
    x = torch.stack([per_group[int(gk)][0] for gk in groups])
    y = torch.stack([per_group[int(gk)][1] for gk in groups])
    return x, y


def run_seed(cfg: RunConfig, ex: SelectionConfig, *, progress: bool = False,
             log: Any = None) -> dict[str, Any]:
    """Every arm of one seed."""
    from ..problem import build_groups

    groups = build_groups(cfg)
    assert groups is not None
    out: dict[str, Any] = {"seed": cfg.seed, "groups": groups.tolist(), "arms": {}, "ari": {},
                           "curves": {}}
    sets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def evaluate(p: Any, theta: torch.Tensor) -> dict[str, Any]:
        if "xy" not in sets:
            sets["xy"] = own_distribution_sets(p, cfg, groups)
        x, y = sets["xy"]
        with torch.no_grad():
            _, acc = node_losses(p.fm, theta, x.to(p.dtype), y)
        acc = torch.nan_to_num(require_accuracy(acc, 'experiment selection'), nan=0.0)
        acc = acc.double().cpu().numpy()
        return {"acc_mean": float(acc.mean()), "acc_worst_node": float(acc.min()),
                "acc": acc.tolist()}

    for arm in ex.arms:
        acfg = arm_config(cfg, ex, arm, groups)
        t0 = time.perf_counter()
        res = run_arm(acfg, evaluate=evaluate, eval_every=cfg.train.eval_every,
                      problem=arm_problem(acfg, arm, groups), progress=progress,
                      label=f"seed {cfg.seed} {arm}")
        secs = time.perf_counter() - t0
        fin = res["evals"][-1]
        out["arms"][arm] = {"acc_mean": fin["acc_mean"], "acc_worst_node": fin["acc_worst_node"],
                            "acc_per_node": fin["acc"], "seconds": secs}
        out["curves"][arm] = [{"round": e["round"], "acc_mean": e["acc_mean"]}
                              for e in res["evals"]]
        pol = res["plugins"].policy
        if pol is not None and hasattr(pol, "decisions"):
            out["ari"][arm] = [{"round": t, "ari": group_ari(N, groups),
                                "within_group": within_group_fraction(N, groups)}
                               for t, N in pol.decisions]
            out["arms"][arm]["final_neighbours"] = [np.flatnonzero(r).tolist()
                                                    for r in pol.neighbours]
        if log:
            extra = ""
            if arm in out["ari"]:
                extra = f", ARI {out['ari'][arm][-1]['ari']:.3f}"
            log(f"  seed {cfg.seed} arm {arm}: own-distribution acc "
                f"{fin['acc_mean']:.4f}{extra} ({secs:.1f} s)")
    return out


def _ari_at(series: list[dict[str, Any]], rnd: int) -> float | None:
    """ARI of the last decision at or before round ``rnd``."""
    vals = [e["ari"] for e in series if e["round"] <= rnd]
    return vals[-1] if vals else None


def summarize(per_seed: list[dict[str, Any]], ex: SelectionConfig) -> dict[str, Any]:
    """``metrics["selection"]`` (module docstring) from the per-seed results."""
    arms: dict[str, Any] = {}
    for arm in ex.arms:
        m, w = mean_worst([r["arms"][arm]["acc_mean"] for r in per_seed])
        nm, nw = mean_worst([r["arms"][arm]["acc_worst_node"] for r in per_seed])
        arms[arm] = {"acc_mean": m, "acc_worst": w, "worst_node_mean": nm, "worst_node_worst": nw}
    sel: dict[str, Any] = {"arms": arms}
    if "dice" in ex.arms:
        series = [r["ari"]["dice"] for r in per_seed]
        rounds = sorted({e["round"] for s in series for e in s})
        sel["ari_per_round"] = [
            {"round": t, "ari_mean": float(np.mean([_ari_at(s, t) for s in series])),
             "ari_worst": float(np.min([_ari_at(s, t) for s in series])),
             "within_group_mean": float(np.mean([[e for e in s if e["round"] <= t][-1]
                                                 ["within_group"] for s in series]))}
            for t in rounds]
        fin = [s[-1]["ari"] for s in series]
        sel["ari_final"], sel["ari_final_worst"] = mean_worst(fin)
        at = [_ari_at(s, ex.ari_round) for s in series]
        sel[f"ari_round_{ex.ari_round}"] = mean_worst(at)[0]
        sel[f"ari_round_{ex.ari_round}_worst"] = mean_worst(at)[1]
    if "pens" in ex.arms:
        fin = [r["ari"]["pens"][-1]["ari"] for r in per_seed]
        sel["pens_ari_final"], sel["pens_ari_final_worst"] = mean_worst(fin)
    for arm in ("dice", "pens"):  # first decision round from which ARI stays >= 0.9
        if arm in ex.arms:
            sel[f"{arm}_rounds_to_ari_0.9"] = [_settled(r["ari"][arm]) for r in per_seed]
    return sel


def _settled(series: list[dict[str, Any]], level: float = 0.9) -> int | None:
    """First decision round from which the ARI stays >= ``level`` (None: never)."""
    out = None
    for e in series:
        if e["ari"] >= level:
            out = e["round"] if out is None else out
        else:
            out = None
    return out


def run_experiment(cfg: RunConfig, out: str | Path, *, seeds: list[int] | None = None,
                   progress: bool = False, log: Any = None) -> dict[str, Any]:
    """Every arm for every seed; writes the run directory and returns ``metrics``."""
    ex = parse_experiment(cfg)
    out, seeds, per_seed = run_seeds(cfg, ex, run_seed, out, seeds, log, progress=progress)
    metrics = {
        "kind": "selection",
        "sign_convention": SIGN,
        "seeds": seeds,
        "n_nodes": cfg.topology.n,
        "groups": cfg.data.groups.model_dump(),  # type: ignore[union-attr]
        "accuracy": "each node's accuracy on the shared validation set transformed by its "
                    "group; acc_mean = mean over seeds of the nodes' mean, acc_worst = worst seed",
        "selection": summarize(per_seed, ex),
        "per_seed": [{k: v for k, v in r.items() if k != "curves"} for r in per_seed],
    }
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    _tables(per_seed, out)
    if ex.plots:
        _plots(per_seed, out)
    atomic_write_text(out / "README.md", readme(cfg, metrics))
    finish_run(out, "selection")
    return metrics


def _tables(per_seed: list[dict[str, Any]], out: Path) -> None:
    arm_rows, ari_rows, curve_rows = [], [], []
    for r in per_seed:
        for arm, a in r["arms"].items():
            arm_rows.append({"seed": r["seed"], "arm": arm, "acc_mean": a["acc_mean"],
                             "acc_worst_node": a["acc_worst_node"], "seconds": a["seconds"]})
        for arm, series in r["ari"].items():
            for e in series:
                ari_rows.append({"seed": r["seed"], "arm": arm, **e})
        for arm, series in r["curves"].items():
            for e in series:
                curve_rows.append({"seed": r["seed"], "arm": arm, **e})
    atomic_write_text(out / "arms.csv", csv_text(arm_rows))
    atomic_write_text(out / "ari.csv", csv_text(ari_rows))
    atomic_write_text(out / "accuracy.csv", csv_text(curve_rows))


def _plots(per_seed: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for arm in per_seed[0]["curves"]:
        rounds = [e["round"] for e in per_seed[0]["curves"][arm]]
        acc = np.mean([[e["acc_mean"] for e in r["curves"][arm]] for r in per_seed], axis=0)
        a1.plot(rounds, acc, label=arm)
    a1.set_xlabel("round")
    a1.set_ylabel("own-distribution accuracy")
    a1.set_title("mean over nodes and seeds", fontsize=9)
    a1.legend()
    for arm in per_seed[0]["ari"]:
        for i, r in enumerate(per_seed):
            s = r["ari"][arm]
            a2.plot([e["round"] for e in s], [e["ari"] for e in s],
                    color="C0" if arm == "dice" else "C2", alpha=0.7,
                    label=arm if i == 0 else None)
    a2.axhline(0.9, color="gray", ls="--", lw=0.8)
    a2.set_xlabel("round")
    a2.set_ylabel("ARI, kept links vs hidden groups")
    a2.set_title("one line per seed", fontsize=9)
    a2.set_ylim(-0.1, 1.05)
    a2.legend()
    fig.tight_layout()
    atomic_savefig(fig, out / "selection.png", dpi=120)
    plt.close(fig)
    r0 = per_seed[0]
    if "dice" in r0["arms"] and "final_neighbours" in r0["arms"]["dice"]:
        draw_kept_graph(r0["arms"]["dice"]["final_neighbours"], r0["groups"],
                        out / "kept_graph.png", title=f"kept links at the end (seed {r0['seed']})")


def draw_kept_graph(neighbours: list[list[int]], groups: list[int], path: Path,
                    title: str = "") -> None:
    """The kept links (arrows sender -> receiver), nodes coloured by their true group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import networkx as nx

    G = nx.DiGraph()
    G.add_nodes_from(range(len(groups)))
    G.add_edges_from((j, k) for k, js in enumerate(neighbours) for j in js)
    pos = nx.circular_layout(sorted(range(len(groups)), key=lambda k: (groups[k], k)))
    fig, ax = plt.subplots(figsize=(5, 5))
    nx.draw_networkx(G, pos, ax=ax, node_color=[groups[k] for k in G.nodes], cmap="tab10",
                     vmin=0, vmax=9, node_size=260, font_size=7, arrowsize=8, width=0.8)
    ax.set_title(title)
    ax.axis("off")
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def table(m: dict[str, Any]) -> str:
    """Markdown table of the arms and the ARI."""
    s = m["selection"]
    lines = ["| arm | own-distribution acc (mean over seeds) | worst seed |", "|---|---|---|"]
    for arm, a in s["arms"].items():
        lines.append(f"| {arm} | {a['acc_mean']:.4f} | {a['acc_worst']:.4f} |")
    if "ari_final" in s:
        lines.append("")
        lines.append(f"ARI (dice, kept links vs groups): final {s['ari_final']:.3f} "
                     f"(worst seed {s['ari_final_worst']:.3f})")
        for k in s:
            if k.startswith("ari_round_") and not k.endswith("worst"):
                lines.append(f"ARI by {k[len('ari_round_'):]} rounds: {s[k]:.3f} "
                             f"(worst seed {s[k + '_worst']:.3f})")
    return "\n".join(lines)


def readme(cfg: RunConfig, m: dict[str, Any]) -> str:
    return (f"# Collaborator selection on hidden groups\n\n{cfg.topology.n} nodes, "
            f"{m['groups']['count']} groups ({m['groups']['transform']}), seeds {m['seeds']}.\n"
            f"Accuracy: {m['accuracy']}.\n\n{table(m)}\n\nFiles: metrics.json, arms.csv, "
            "ari.csv, accuracy.csv, selection.png, kept_graph.png.\n")


register_report(
    "selection", "Collaborator selection",
    "Each node keeps the neighbours whose measured influence on its own test loss is most "
    "helpful (policy select) and rewires every few rounds; baselines: PENS-style selection, a "
    "static random graph of the same degree, the oracle graph of the true hidden groups and "
    "local training. Accuracy is each node's accuracy on its own group's distribution; ARI "
    "compares the kept links' components with the true groups (1 = recovered).",
    table, [("selection.png", "Left: mean per-node accuracy on its own distribution over the "
             "rounds, one line per arm. Right: adjusted Rand index of the kept links vs the "
             "true groups (1 = the groups recovered exactly)."),
            ("kept_graph.png", "The links each node kept at the end, coloured by true group: "
             "links inside a colour are right, links across colours are wrong.")])


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    """Add ``dice experiment selection``."""
    add_command(experiment_app, "selection",
                "Collaborator selection on hidden groups: DICE vs static, PENS, oracle, local.",
                run_experiment, table, parse_experiment)
