"""Experiment: the influence cascade on the graph, its decay with hops, and power asymmetry.

``dice experiment cascade CONFIG --out DIR [--set key=value ...] [--seeds 0,1,2]``

For every graph of ``experiment.graphs`` (and ``experiment.asymmetric``) the run config is
trained on that graph, then every node's whole batch is removed at ``event_rounds`` consecutive
rounds after ``warmup`` and replayed exactly (DICE-GT, ``hops`` rounds on). From
``per_node[e, s, k]`` (axes event, hop, node; the loss change of node ``k`` at round ``t+s``;
positive = harmful):

- ``cascade``: one event (``picture``) drawn on its graph: nodes on circles by hop distance from
  the source, colour = influence (diverging, 0 = white), one panel per hop
  (:func:`dice_influence.report.cascade.plot_cascade`); its per-node and per-hop values are in
  ``metrics["cascade"]``;
- ``decay[graph]``: for ``s = 1..hops``, the mean over events of ``|hop_terms[e, s-1]|`` (the
  per-hop term: ``Σ_{k ∈ N^(s)(j)} q_k per_node[e, s, k]``, nodes first reached at hop ``s``)
  and of the per-node magnitude ``|per_node[e, s, k]|`` over ``k ∈ N^(s)(j)``; ``rate`` = the
  fitted per-hop factor of the per-node magnitude (``exp`` of the log-linear slope);
- ``asymmetry_spearman[graph]``: Spearman correlation over nodes of the out-weight
  ``Σ_k W[k, j]`` (column sum) with the outgoing influence
  ``Σ_{k ≠ j} q_k |per_node[e, hops, k]|`` (mean over ``j``'s events), on graphs whose
  out-weights differ (star, Erdős–Rényi with uniform weights, a designed ``hubs`` graph).
  The paper's ring and exponential graphs are circulant (every column sums to 1), so they have
  no out-weight spread to correlate.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .._util import atomic_savefig, atomic_write_text, csv_text, write_json
from ..config import ConfigError, RunConfig, dump_config, load_config
from ..report.cascade import hop_distances, plot_cascade
from ._common import SIGN, add_command, finish_run, parse_settings, register_report


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GraphSpec(_S):
    """A graph: a named topology (``dice topology`` lists them) or ``hubs`` (a designed
    directed graph: each node listens to itself and ``degree`` senders drawn with probability
    ∝ ``(rank + 1)^-zipf``, uniform weights, so a few nodes carry most out-weight)."""

    name: str
    label: str | None = None
    weights: str = "uniform"
    p: float | None = None
    degree: int | None = None
    k: int | None = None
    zipf: float = Field(1.2, gt=0.0)

    @property
    def key(self) -> str:
        return self.label or self.name


class Picture(_S):
    """Which event is drawn: graph label, source node, round offset after ``warmup``."""

    graph: str = "torus"
    node: int = 0
    offset: int = Field(0, ge=0)
    hops: int | None = Field(None, ge=1, description="panels (default: all hops)")


class CascadeConfig(_S):
    """The ``experiment:`` mapping of a cascade config."""

    graphs: list[GraphSpec] = Field(default_factory=lambda: [
        GraphSpec(name=g) for g in ("ring", "exponential", "torus", "star")]
        + [GraphSpec(name="erdos-renyi", p=0.25)])
    asymmetric: list[GraphSpec] = Field(default_factory=lambda: [
        GraphSpec(name="star"), GraphSpec(name="erdos-renyi", p=0.25),
        GraphSpec(name="hubs", degree=3)])
    warmup: int = Field(20, ge=0, description="rounds trained before the first event")
    event_rounds: int = Field(3, ge=1, description="consecutive event rounds per source")
    hops: int = Field(6, ge=1)
    picture: Picture = Picture()
    batch_events: int = Field(32, ge=1)
    plots: bool = True


def parse_experiment(cfg: RunConfig) -> CascadeConfig:
    ex = parse_settings(CascadeConfig, cfg)
    need = ex.warmup + ex.event_rounds - 1 + ex.hops
    if cfg.train.rounds < need:
        raise ConfigError(f"train.rounds={cfg.train.rounds} is too short: warmup + event_rounds "
                          f"- 1 + hops = {need}; set train.rounds >= {need}")
    for g in ex.graphs + ex.asymmetric:
        graph_matrix(g, cfg.topology.n, cfg.seed)
    labels = [g.key for g in ex.graphs + ex.asymmetric]
    if ex.picture.graph not in labels:
        raise ConfigError(f"experiment.picture.graph={ex.picture.graph!r} is none of the graphs "
                          f"{sorted(set(labels))}")
    if not 0 <= ex.picture.node < cfg.topology.n:
        raise ConfigError(f"experiment.picture.node={ex.picture.node} out of range "
                          f"0..{cfg.topology.n - 1}")
    if ex.picture.offset >= ex.event_rounds:
        raise ConfigError(f"experiment.picture.offset={ex.picture.offset} must be < "
                          f"event_rounds={ex.event_rounds}")
    return ex


def hubs_matrix(n: int, degree: int, zipf: float, seed: int) -> np.ndarray:
    """The designed asymmetric graph (:class:`GraphSpec`), strongly connected: node ``k`` also
    listens to ``k + 1 mod n`` so every node reaches every other."""
    rng = np.random.default_rng([seed, 0x4B5])
    pop = 1.0 / (np.arange(n) + 1.0) ** zipf
    perm = rng.permutation(n)  # which node gets which popularity
    p_node = np.empty(n)
    p_node[perm] = pop
    A = np.eye(n, dtype=bool)
    for k in range(n):
        A[k, (k + 1) % n] = True
        others = np.array([j for j in range(n) if j != k])
        pr = p_node[others] / p_node[others].sum()
        m = min(degree, len(others))
        A[k, rng.choice(others, size=m, replace=False, p=pr)] = True
    return A / A.sum(1, keepdims=True)


GRAPH_SEED_STRIDE = 1000  # random graphs of run seed s use seeds 1000 s, 1000 s + 1, ...


def graph_matrix(g: GraphSpec, n: int, seed: int) -> np.ndarray:
    """The mixing matrix of ``g`` (raises :class:`ConfigError` naming the graph). Random graphs
    draw from ``GRAPH_SEED_STRIDE * seed``: the topology module retries seed, seed + 1, ...
    until a graph is connected, so consecutive run seeds could otherwise share a graph."""
    from ..topology import TopologyError, mixing_matrix

    seed = GRAPH_SEED_STRIDE * int(seed)
    try:
        if g.name == "hubs":
            return hubs_matrix(n, 3 if g.degree is None else g.degree, g.zipf, seed)
        kw = {k: v for k, v in (("p", g.p), ("degree", g.degree), ("k", g.k)) if v is not None}
        return mixing_matrix(g.name, n, weights=g.weights, seed=seed, **kw)
    except TopologyError as exc:
        raise ConfigError(f"experiment graph {g.key!r}: {exc}") from None


def run_graph(cfg: RunConfig, ex: CascadeConfig, g: GraphSpec, *,
              progress: bool = False) -> dict[str, Any]:
    """Train on ``g`` and replay every node's batch removal at the event rounds (DICE-GT);
    ``progress``: bars over the training rounds and the replays."""
    from ..influence import Event, ground_truth
    from ..simulator import train

    W = graph_matrix(g, cfg.topology.n, cfg.seed)
    raw = cfg.model_dump(mode="json")
    raw["experiment"] = {}
    raw["topology"] = {"name": "matrix", "n": cfg.topology.n, "matrix": W.tolist()}
    gcfg = load_config(raw)
    t0 = time.perf_counter()
    traj = train(gcfg, rounds=ex.warmup + ex.event_rounds - 1 + ex.hops, progress=progress)
    events = [Event(j, ex.warmup + o) for o in range(ex.event_rounds)
              for j in range(cfg.topology.n)]
    gt = ground_truth(traj, events, hops=ex.hops, batch_events=ex.batch_events,
                      progress=progress)
    return {"W": W, "events": events, "gt": gt, "seconds": time.perf_counter() - t0}


def decay_of(run: dict[str, Any]) -> dict[str, Any]:
    """Per-hop magnitudes of one graph's events (module docstring)."""
    gt = run["gt"]
    H = gt.hops
    hop_abs = gt.hop_terms.abs().mean(0).tolist()
    reach = gt.reach[:, 1:, :]
    mag = gt.per_node[:, 1:, :].abs()
    per_node = []
    for s in range(H):
        m = reach[:, s, :]
        per_node.append(float(mag[:, s, :][m].mean()) if bool(m.any()) else None)
    xs = [s + 1 for s, v in enumerate(per_node) if v is not None and v > 0]
    ys = [math.log(per_node[s - 1]) for s in xs]
    rate = float(math.exp(np.polyfit(xs, ys, 1)[0])) if len(xs) >= 2 else None
    return {"hop_term_abs": hop_abs, "per_node_abs": per_node, "rate": rate,
            "hops_reached": len(xs)}


def asymmetry_of(run: dict[str, Any]) -> dict[str, Any]:
    """Spearman of out-weight vs outgoing influence over nodes (module docstring)."""
    from scipy.stats import spearmanr

    gt, W = run["gt"], run["W"]
    n = W.shape[0]
    src = np.array([e.node for e in run["events"]])
    others = torch.ones(len(src), n, dtype=torch.bool)
    others[torch.arange(len(src)), torch.as_tensor(src)] = False
    out_e = ((gt.per_node[:, gt.hops, :].abs() * gt.q) * others).sum(-1).numpy()
    outgoing = np.array([out_e[src == j].mean() for j in range(n)])
    out_w = W.sum(0)
    rho = None
    if np.ptp(out_w) > 1e-12 and np.ptp(outgoing) > 0:
        rho = float(spearmanr(out_w, outgoing).statistic)
    return {"spearman": rho, "out_weight": out_w.tolist(), "outgoing": outgoing.tolist()}


def picture_values(run: dict[str, Any], node: int, offset: int, warmup: int
                   ) -> dict[str, Any]:
    """The pictured event's per-node (hop x node) and per-hop values."""
    gt = run["gt"]
    i = next(i for i, e in enumerate(run["events"])
             if e.node == node and e.round == warmup + offset)
    return {"source": node, "round": warmup + offset, "axes": ["hop", "node"],
            "per_node": gt.per_node[i].tolist(), "per_hop": gt.hop_terms[i].tolist(),
            "self_term": float(gt.self_term[i]),
            "hop_distance": hop_distances(run["W"], node).tolist()}


def run_experiment(cfg: RunConfig, out: str | Path, *, seeds: list[int] | None = None,
                   progress: bool = False, log: Any = None) -> dict[str, Any]:
    """Every graph for every seed; writes the run directory and returns ``metrics``."""
    ex = parse_experiment(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seeds if seeds else [cfg.seed]
    specs: dict[str, GraphSpec] = {}
    for g in ex.graphs + ex.asymmetric:
        specs.setdefault(g.key, g)
    decay_keys = [g.key for g in ex.graphs]
    asym_keys = [g.key for g in ex.asymmetric]
    decays: dict[str, list[dict[str, Any]]] = {k: [] for k in decay_keys}
    asyms: dict[str, list[dict[str, Any]]] = {k: [] for k in asym_keys}
    picture = None
    for s in seeds:
        scfg = cfg.model_copy(update={"seed": int(s)})
        for i, (key, g) in enumerate(specs.items()):
            if log:
                log(f"seed {s} graph {key} ({i + 1}/{len(specs)}): training "
                    f"{ex.warmup + ex.event_rounds - 1 + ex.hops} rounds, then DICE-GT of "
                    f"{ex.event_rounds * cfg.topology.n} batch removals x {ex.hops} hops")
            run = run_graph(scfg, ex, g, progress=progress)
            if log:
                log(f"  seed {s} graph {key}: {len(run['events'])} events x {ex.hops} hops "
                    f"({run['seconds']:.1f} s)")
            if key in decays:
                decays[key].append(decay_of(run))
            if key in asyms:
                asyms[key].append(asymmetry_of(run))
            if picture is None and key == ex.picture.graph:
                picture = {"graph": key, "seed": int(s), "W": run["W"],
                           **picture_values(run, ex.picture.node, ex.picture.offset,
                                            ex.warmup)}
    assert picture is not None
    decay = {k: _mean_decay(v) for k, v in decays.items()}
    asym = {}
    for k, v in asyms.items():
        vals = [a["spearman"] for a in v]
        fin = [x for x in vals if x is not None]
        asym[k] = {"mean": float(np.mean(fin)) if fin else None,
                   "worst": float(np.min(fin)) if fin else None, "per_seed": vals}
    cascade = {k: v for k, v in picture.items() if k != "W"}
    metrics = {
        "kind": "cascade",
        "sign_convention": SIGN,
        "seeds": seeds,
        "n_nodes": cfg.topology.n,
        "hops": ex.hops,
        "cascade": cascade,
        "decay": decay,
        "asymmetry_spearman": asym,
        "asymmetry_definition": "Spearman over nodes of the column sum of W with the mean over "
                                "the node's batch removals of sum_{k != j} q_k "
                                "|per_node[e, hops, k]|",
        "per_seed": {"decay": decays, "asymmetry": asyms},
    }
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    _tables(metrics, out)
    if ex.plots:
        H = ex.picture.hops if ex.picture.hops is not None else ex.hops
        plot_cascade(picture["W"], np.asarray(picture["per_node"])[:H + 1], picture["source"],
                     out / "cascade.png", round=picture["round"],
                     title=f"{picture['graph']}: node {picture['source']}'s batch at round "
                           f"{picture['round']} (seed {picture['seed']})")
        _plot_decay(decay, out / "decay.png")
        _plot_asymmetry(asyms, out / "asymmetry.png")
    atomic_write_text(out / "README.md", "# Influence cascade on the graph\n\n"
                      f"{cfg.topology.n} nodes, seeds {seeds}, {ex.hops} hops. {SIGN}.\n\n"
                      f"{table(metrics)}\n\nFiles: cascade.png, decay.png, asymmetry.png, "
                      "cascade.csv, decay.csv, asymmetry.csv, metrics.json.\n")
    finish_run(out, "cascade")
    return metrics


def _mean_decay(v: list[dict[str, Any]]) -> dict[str, Any]:
    H = len(v[0]["hop_term_abs"])

    def mean(key: str, s: int) -> float | None:
        xs = [d[key][s] for d in v if d[key][s] is not None]
        return float(np.mean(xs)) if xs else None

    rates = [d["rate"] for d in v if d["rate"] is not None]
    return {"hop_term_abs": [mean("hop_term_abs", s) for s in range(H)],
            "per_node_abs": [mean("per_node_abs", s) for s in range(H)],
            "rate": float(np.mean(rates)) if rates else None,
            "rate_worst": float(np.max(rates)) if rates else None,
            "hops_reached": int(max(d["hops_reached"] for d in v))}


def _tables(m: dict[str, Any], out: Path) -> None:
    c = m["cascade"]
    rows = [{"hop": s, "node": k, "hop_distance": c["hop_distance"][k], "influence": v}
            for s, row in enumerate(c["per_node"]) for k, v in enumerate(row)]
    atomic_write_text(out / "cascade.csv", csv_text(rows))
    rows = [{"graph": g, "hop": s + 1, "hop_term_abs": d["hop_term_abs"][s],
             "per_node_abs": d["per_node_abs"][s]} for g, d in m["decay"].items()
            for s in range(len(d["hop_term_abs"]))]
    atomic_write_text(out / "decay.csv", csv_text(rows))
    rows = []
    for g, runs in m["per_seed"]["asymmetry"].items():
        for i, a in enumerate(runs):
            rows += [{"graph": g, "seed": m["seeds"][i], "node": j, "out_weight": w,
                      "outgoing_influence": o}
                     for j, (w, o) in enumerate(zip(a["out_weight"], a["outgoing"],
                                                    strict=True))]
    atomic_write_text(out / "asymmetry.csv", csv_text(rows))


def _plot_decay(decay: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for g, d in decay.items():
        hs = [s + 1 for s, v in enumerate(d["per_node_abs"]) if v]
        a1.semilogy(hs, [d["per_node_abs"][s - 1] for s in hs], "o-", label=g)
        hs2 = [s + 1 for s, v in enumerate(d["hop_term_abs"]) if v]
        a2.semilogy(hs2, [d["hop_term_abs"][s - 1] for s in hs2], "o-", label=g)
    a1.set_xlabel("hop s")
    a1.set_ylabel("mean |influence| per node first reached at hop s")
    a2.set_xlabel("hop s")
    a2.set_ylabel("mean |per-hop term|")
    a1.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def _plot_asymmetry(asyms: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(asyms), figsize=(4 * len(asyms), 3.6), squeeze=False)
    for ax, (g, runs) in zip(axes[0], asyms.items(), strict=True):
        for i, a in enumerate(runs):
            ax.scatter(a["out_weight"], a["outgoing"], s=18, alpha=0.7, label=f"seed {i}")
        rho = [a["spearman"] for a in runs]
        ax.set_title(f"{g}: Spearman " + ", ".join("-" if r is None else f"{r:.2f}"
                                                   for r in rho), fontsize=9)
        ax.set_xlabel("out-weight (column sum of W)")
        ax.set_yscale("log")
    axes[0][0].set_ylabel("outgoing |influence| at the horizon")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(m: dict[str, Any]) -> str:
    lines = ["| graph | per-node |influence| at hops 1..H | per-hop factor |", "|---|---|---|"]
    for g, d in m["decay"].items():
        vals = " ".join("-" if v is None else f"{v:.2e}" for v in d["per_node_abs"])
        rate = "-" if d["rate"] is None else f"{d['rate']:.3f}"
        lines.append(f"| {g} | {vals} | {rate} |")
    lines += ["", "| graph | Spearman(out-weight, outgoing influence) mean | worst seed |",
              "|---|---|---|"]
    for g, a in m["asymmetry_spearman"].items():
        lines.append(f"| {g} | {_num(a['mean'])} | {_num(a['worst'])} |")
    return "\n".join(lines)


register_report(
    "cascade", "The influence cascade on the graph",
    "One removed batch's exact influence (DICE-GT) on every node, hop by hop; how fast the "
    "per-node influence decays with hop distance on five graphs; and whether nodes with more "
    "out-weight (column sum of W) have more outgoing influence (Spearman over nodes).",
    table, [("cascade.png", "One event: the source is the star; a ring graph is drawn as a "
             "ring, other graphs put the nodes on circles by hop distance around the source. "
             "Colour = the node's test-loss change with − without the batch at each hop (red = "
             "harmful, blue = helpful, white = not reached yet), scaled per panel (the scale is "
             "in each panel's title). Hover a node for its value."),
            ("decay.png", "Mean |influence| of the nodes first reached at hop s (left) and of "
             "the per-hop term (right), log scale: straight lines = geometric decay."),
            ("asymmetry.png", "One dot per node: out-weight vs outgoing influence at the "
             "horizon; a rising cloud = more out-weight, more power.")])


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    """Add ``dice experiment cascade``."""
    add_command(experiment_app, "cascade",
                "One event's cascade on the graph, decay with hops, power asymmetry.",
                run_experiment, table, parse_experiment)
