"""Report sections of the runs this package writes itself: ``train``, ``alignment``,
``p2p`` (``dice launch``), ``demo`` and the demo's ``cascade-demo`` stage.

Sign convention: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

from typing import Any

from .cascade import trend
from .core import Figure, Run, Section, Stat, Table, fmt, report_sections

SINGLE = "single measurement"


def _what_ran(m: dict) -> str:
    """" What ran: model class, parameters, loss, data" (from metrics.json's ``run``)."""
    run = m.get("run")
    if not isinstance(run, dict):
        return ""
    mo, da = run.get("model") or {}, run.get("data") or {}
    where = {"python": f" from {mo.get('factory')}", "api": " passed to from_torch",
             "builtin": f" (built-in {mo.get('name')})"}.get(mo.get("kind"), "")
    return (f" What ran: {mo.get('class')}{where}, {mo.get('n_params')} parameters; loss "
            f"{run.get('loss')}; data {da.get('source')}: {da.get('train_samples')} training "
            f"samples, x {tuple(da.get('x') or ())} {da.get('x_dtype')}, y "
            f"{tuple(da.get('y') or ())} {da.get('y_dtype')}, {da.get('test_samples')} test "
            "samples.")


@report_sections("train")
def train_sections(run: Run) -> list[Section]:
    m = run.metrics
    f = m.get("final", {})
    per = m.get("per_node", {})
    acc, loss = per.get("test_acc") or [], per.get("test_loss") or []
    stats = [
        Stat("mean node test accuracy", fmt(f.get("mean_acc"), 3), f"after round {m.get('rounds')}"),
        Stat("averaged model accuracy", fmt(f.get("avg_model_acc"), 3),
             "accuracy of the mean of all nodes' parameters"),
        Stat("worst node accuracy", fmt(min(acc), 3) if acc else "–"),
        Stat("consensus distance", fmt(f.get("consensus_distance"), 3),
             "mean squared distance of the nodes to their average"),
        Stat("nodes × parameters", f"{m.get('n_nodes')} × {m.get('n_params')}"),
    ]
    rows = [[k, fmt(acc[k], 3) if k < len(acc) else "–", fmt(lo, 3)]
            for k, lo in enumerate(loss)]
    hist = _node_history(run)
    figures: list[Figure | None] = []
    claims: list[str] = []
    if hist is not None:
        figures.append(Figure(caption=training_caption(hist), png=_training_png(hist, run),
                              title="training: test loss and accuracy of every node"))
        claims.append("accuracy.png")  # the same curves, accuracy only
        stats.insert(1, Stat("evaluated rounds", str(len(hist["round"])),
                             f"every {_step(hist['round'])} rounds" if len(hist["round"]) > 2
                             else ""))
    else:
        figures.append(run.figure(
            "accuracy.png",
            ("Test accuracy" if acc else "Test loss") + " of every node (grey) over the "
            "rounds, their mean (blue) and the averaged model's (orange, dashed)."))
    return [Section(
        title="Training",
        text="Decentralized SGD: every round each node takes a local step on its own batch, "
             "then averages with its neighbours through the mixing matrix W." + _what_ran(m),
        stats=stats,
        tables=[Table(["node", "test acc", "test loss"], rows,
                      caption="per-node test accuracy and loss after the last round")]
        if 0 < len(rows) <= 32 else [],
        figures=figures,
        claims=claims,
    )]


def _step(rounds: list[int]) -> int:
    d = [b - a for a, b in zip(rounds, rounds[1:], strict=False)]
    return max(set(d), key=d.count) if d else 0


def _node_history(run: Run) -> dict[str, Any] | None:
    """Per-node test loss and accuracy at every evaluated round (from ``trajectory.json``):
    ``{"round": [..], "acc": (rounds, n), "loss": (rounds, n), "avg_acc": [..]}``, or None."""
    import numpy as np

    tj = run.json("trajectory.json")
    h = tj.get("history") if isinstance(tj, dict) else None
    if not h:
        return None
    try:
        rounds = [int(x["round"]) for x in h]
        acc = np.asarray([x["acc"] for x in h], dtype=float)
        loss = np.asarray([x["loss"] for x in h], dtype=float)
        avg = [x.get("avg_model_acc") for x in h]
    except (KeyError, TypeError, ValueError):
        return None
    if acc.ndim != 2 or acc.shape != loss.shape or len(rounds) < 2:
        return None
    return {"round": rounds, "acc": acc, "loss": loss, "avg_acc": avg}


CONSENSUS_SPREAD = 0.05
"""Nodes whose test accuracies span at most this much are called in agreement."""


def training_caption(hist: dict[str, Any]) -> str:
    """What the training plot shows, with the per-node spread worded from the numbers."""
    import numpy as np

    acc, rounds = hist["acc"], hist["round"]
    spread = acc.max(1) - acc.min(1)
    last = len(rounds) - 1
    later = np.arange(1, len(rounds))  # round 0: identical initial models
    worst = int(later[np.argmax(spread[1:])]) if len(later) else last
    def span(i: int) -> str:
        return (f"{acc[i].min():.2f}–{acc[i].max():.2f} (spread {spread[i]:.2f}) at round "
                f"{rounds[i]}")
    text = ("Left: test loss, right: test accuracy of every node (thin grey lines) at each of "
            f"the {len(rounds)} evaluated rounds, the band from the worst to the best node, the "
            "mean over nodes (blue) and the averaged model (orange, dashed). ")
    if spread[last] <= CONSENSUS_SPREAD:
        text += f"At the end the nodes agree: accuracies span {span(last)}."
    else:
        text += (f"The nodes do not agree: accuracies span {span(last)}; gossip has not "
                 "brought them to consensus.")
    if worst != last and spread[worst] > max(CONSENSUS_SPREAD, spread[last] + 0.02):
        text += f" The widest spread was {span(worst)}."
    return text


def _training_png(hist: dict[str, Any], run: Run) -> bytes:
    import io

    from matplotlib.figure import Figure as MplFigure
    from matplotlib.ticker import MaxNLocator

    r = hist["round"]
    fig = MplFigure(figsize=(9.2, 3.6), dpi=110)
    for i, (key, label) in enumerate((("loss", "test loss"), ("acc", "test accuracy"))):
        ax = fig.add_subplot(1, 2, i + 1)
        Y = hist[key]
        ax.fill_between(r, Y.min(1), Y.max(1), color="C0", alpha=0.15, lw=0,
                        label="worst to best node")
        for k in range(Y.shape[1]):
            ax.plot(r, Y[:, k], color="0.6", lw=0.6, alpha=0.8)
        ax.plot(r, Y.mean(1), color="C0", lw=2, label="mean node", marker="o" if len(r) <= 12
                else None, ms=3)
        if key == "acc" and all(a is not None for a in hist["avg_acc"]):
            ax.plot(r, hist["avg_acc"], color="C1", lw=1.5, ls="--", label="averaged model")
        ax.set_xlabel("round", fontsize=10)
        ax.set_ylabel(label, fontsize=10)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right" if key == "loss" else "lower right", fontsize=9)
    m = run.metrics
    fig.suptitle(f"{m.get('n_nodes')} nodes: every node's test loss and accuracy", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@report_sections("alignment")
def alignment_sections(run: Run) -> list[Section]:
    from ..experiments.alignment import readout_guide, timing_caption, timing_rows

    m = run.metrics
    s = m.get("setting", {})
    res = m.get("results", [])
    stats = []
    variants: dict[tuple[str, bool], list[float]] = {}
    for r in res:
        variants.setdefault((r["readout"], bool(r["curvature"])), []).append(r["pearson"])
    if variants:  # headline: the variant that agrees best with GT over all hops
        best = max(variants, key=lambda v: sum(x for x in variants[v] if x == x))
        for r in res:
            if (r["readout"], bool(r["curvature"])) == best and \
                    r.get("propagation", "factual") == "factual":
                stats.append(Stat(f"{r['hops']}-hop Pearson r, DICE-E vs GT",
                                  fmt(r["pearson"]),  # as in the table: 0.9998, not 1.000
                                  f"{best[0]} read-out{'' if best[1] else ', no curvature'}; "
                                  f"sign agreement {fmt(r['sign_agreement'], 2)}"))
    secs = m.get("seconds", {})
    if secs:
        stats.append(Stat("total time", f"{secs.get('total', float('nan')):.1f} s", SINGLE))
    rows = [[r["hops"], r["readout"], fmt(bool(r["curvature"])),
             r.get("propagation", "factual"), fmt(r["pearson"]),
             fmt(r["spearman"]), fmt(r["kendall"]), fmt(r["sign_agreement"], 2),
             fmt(r["median_rel_error"])]
            for r in res]
    cols = ["hops", "read-out", "curvature", "propagation", "Pearson", "Spearman", "Kendall",
            "sign agreement", "median rel. error"]
    text = (f"{s.get('events')} removal events ({s.get('unit')}) on {s.get('dataset')}, "
            f"{s.get('n')} nodes, {s.get('topology')} graph, {s.get('model')}, batch "
            f"{s.get('batch_size')}, lr {s.get('lr')}, {s.get('rounds')} rounds, "
            f"{s.get('dtype')}. DICE-GT replays training without the removed data (exact); "
            "DICE-E is the paper's first-order estimate. A value for r hops adds the source's own "
            "step and the influence on the nodes 1..r hops away.")
    guide = [g.replace("`", "") for g in readout_guide(m)]
    tables = [Table(cols, rows, caption="Correlations of DICE-E with DICE-GT over the events; "
                    "relative error = |E − GT| / |GT|.")]
    tm = timing_rows(m)
    if tm:
        tables.append(Table(["method", "s/event"], [[n, f"{v:.4f}"] for n, v in tm],
                            caption=timing_caption(m)))
    return [Section(
        title="Influence: DICE-E against exact replay (DICE-GT)",
        text=text,
        stats=stats,
        tables=tables,
        figures=[
            run.figure("scatter.png",
                       "One dot per removal event: x = DICE-GT (exact), y = DICE-E (estimate); "
                       "on the dashed line y = x they agree exactly. Right of zero = the removed "
                       "data was harmful."),
            run.figure("hops.png", _hops_caption(run)),
        ],
        highlights=["Which read-out to trust, from these numbers:", *guide] if guide else [],
        notes=["All events with their GT and estimates: events.csv; per-node GT values: "
               "influence_gt.json (axes event, hop, node)."],
    )]


def _hops_caption(run: Run) -> str:
    """Caption of hops.png worded from the per-hop GT magnitudes (fades or not)."""
    base = ("Mean |influence term| at hop s: s = 0 is the source's own step, s = 1 its "
            "neighbours, and so on.")
    gt = run.json("influence_gt.json") or {}
    try:
        import numpy as np

        self_t = np.asarray(gt.get("self_term"), dtype=float)  # (event,)
        r_hop = np.asarray(gt.get("r_hop"), dtype=float)  # (event, hops)
        if self_t.ndim != 1 or r_hop.ndim != 2 or r_hop.shape[1] < 1:
            return base
        terms = np.diff(np.concatenate([self_t[:, None], r_hop], 1), axis=1)
        mags = np.abs(np.concatenate([self_t[:, None], terms], 1)).mean(0)
    except (TypeError, ValueError):
        return base
    return base + " DICE-GT: " + trend("the mean |term|", mags.tolist(), "hop") + "."


@report_sections("p2p")
def p2p_sections(run: Run) -> list[Section]:
    s = run.json("summary.json") or {}
    n = s.get("n", 0)
    status = s.get("status", [])
    stats = [
        Stat("peers", str(n), f"{sum(1 for x in status if x == 'ok')} finished ok"),
        Stat("mean final test accuracy", fmt(s.get("mean_final_acc"), 3)),
        Stat("wall time", f"{s.get('seconds', float('nan')):.1f} s", SINGLE),
        Stat("bytes sent per peer per round", fmt(s.get("bytes_sent_per_peer_per_round"), 0)),
    ]
    rows = []
    for k, st in enumerate(status):
        pm = run.json(f"peer-{k}/metrics.json") or {}
        fin = pm.get("final") or {}
        dropped = [e.get("peer") for e in pm.get("events", []) if e.get("event") == "dropped"]
        rows.append([k, st, pm.get("rounds_done", "–"), fmt(fin.get("acc"), 3),
                     fmt(pm.get("steady_rounds_per_s"), 1),
                     fmt(pm.get("bytes_sent_per_round"), 0) if pm else "–",
                     ", ".join(map(str, dropped)) or "–"])
    figs: list[Figure | None] = []
    P = s.get("proximal")
    if P:
        figs.append(Figure(caption="Proximal influence P[k][j] of sender j on receiver k, summed "
                           "over the run (red = harmful, blue = helpful, white = no edge or 0).",
                           png=_matrix_png(P), title="proximal influence"))
    notes = [str(e) for e in s.get("errors", [])]
    return [Section(title="Peers", text="One process per node, gossiping over torch.distributed "
                    "on loopback; each peer measures its in-neighbours' proximal influence.",
                    stats=stats,
                    tables=[Table(["peer", "status", "rounds", "test acc", "rounds/s",
                                   "bytes sent/round", "dropped"], rows,
                                  caption="rounds/s after the first round, " + SINGLE)]
                    if rows else [],
                    figures=figs, notes=notes)]


def _matrix_png(P: Any) -> bytes:
    import io

    import numpy as np
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure as MplFigure

    A = np.asarray(P, dtype=float)
    v = float(np.nanmax(np.abs(A))) or 1.0
    fig = MplFigure(figsize=(4.6, 3.8), dpi=100)
    ax = fig.add_subplot()
    im = ax.imshow(A, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -v, v))
    ax.set_xlabel("sender j")
    ax.set_ylabel("receiver k")
    ax.set_title("proximal influence P[k][j] (+ = harmful)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.85)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@report_sections("demo")
def demo_sections(run: Run) -> list[Section]:
    m = run.metrics
    stages = m.get("stages", [])
    rows = [[st["name"], st["dir"], f"{st['seconds']:.1f}"] for st in stages]
    return [Section(
        title="What the demo did",
        text="End to end on the embedded digits data: train 16 nodes, measure one removal's "
             "influence cascade, check DICE-E against exact replay, then catch label-flipping "
             "neighbours. Each stage's run directory has its own report; all are shown below.",
        stats=[Stat("total time", f"{m.get('seconds', float('nan')):.1f} s", SINGLE)],
        tables=[Table(["stage", "directory", "seconds"], rows,
                      caption="wall time per stage, " + SINGLE)] if rows else [],
        notes=list(m.get("next", [])),
    )]


@report_sections("cascade-demo")
def cascade_demo_sections(run: Run) -> list[Section]:
    from .cascade import fade_sentence

    m = run.metrics
    e = m.get("event", {})
    hop_sum = m.get("hop_sums", [])
    per_hop = m.get("per_hop", [])
    stats = [Stat("source node", str(e.get("node")), f"its whole batch removed at round "
                  f"{e.get('round')}"),
             Stat("influence on its own step", fmt(hop_sum[0], 3) if hop_sum else "–",
                  "negative = the batch helped it"),
             Stat(f"Σ influence after {m.get('hops')} hops", fmt(hop_sum[-1], 3) if hop_sum
                  else "–", f"over {per_hop[-1]['nodes_reached']} nodes reached" if per_hop
                  else "")]
    fades = (fade_sentence([r["sum"] for r in per_hop], [r["max_abs"] for r in per_hop],
                           [r["nodes_reached"] for r in per_hop]) if per_hop else "")
    return [Section(
        title="The influence cascade of one removal",
        text=f"Node {e.get('node')}'s batch at round {e.get('round')} is removed and training is "
             "replayed exactly (DICE-GT). Each panel is one round later: the colour of a node is "
             "its test loss with the batch minus without it. The influence starts at the source "
             "and spreads one hop per round of gossip. " + fades,
        stats=stats,
        tables=[Table(["hop", "round", "nodes reached", "sum of influence", "max |influence|"],
                      [[r["hop"], r["round"], r["nodes_reached"], f"{r['sum']:+.3e}",
                        f"{r['max_abs']:.3e}"] for r in m.get("per_hop", [])],
                      caption="per hop: nodes reached so far (source included), the sum and "
                              "the largest magnitude of their influence")],
        figures=[run.figure(
            "cascade.png",
            "The source is the star; a ring graph is drawn as a ring, other graphs put the nodes "
            "on circles by hop distance around the source. Red = the removed batch hurt that "
            "node (positive influence), blue = it helped, white = not reached yet. Each panel "
            "has its own colour scale, symmetric about 0 (± the value in its title), so that "
            "nodes stay distinguishable as the influence spreads thin; from hop 1 on the scale "
            "is set by the other nodes and a larger source is shown at the end of the scale "
            "(\"source beyond\"). Hover a node for its value.")],
    )]
