"""Report sections of the runs this package writes itself: ``train``, ``alignment``,
``p2p`` (``dice launch``), ``demo`` and the demo's ``cascade-demo`` stage.

Sign convention: influence = loss with the data − loss without it; positive = harmful.
"""

from __future__ import annotations

from typing import Any

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
    return [Section(
        title="Training",
        text="Decentralized SGD: every round each node takes a local step on its own batch, "
             "then averages with its neighbours through the mixing matrix W." + _what_ran(m),
        stats=stats,
        tables=[Table(["node", "test acc", "test loss"], rows,
                      caption="per-node test accuracy and loss after the last round")]
        if 0 < len(rows) <= 32 else [],
        figures=[run.figure(
            "accuracy.png",
            "Test accuracy of every node (grey) over the rounds, their mean (blue) and the "
            "accuracy of the averaged model (orange, dashed). Grey lines hugging the mean show "
            "that gossip keeps the nodes in consensus.")],
    )]


@report_sections("alignment")
def alignment_sections(run: Run) -> list[Section]:
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
            if (r["readout"], bool(r["curvature"])) == best:
                stats.append(Stat(f"{r['hops']}-hop Pearson r, DICE-E vs GT",
                                  fmt(r["pearson"], 3),
                                  f"{best[0]} read-out{'' if best[1] else ', no curvature'}; "
                                  f"sign agreement {fmt(r['sign_agreement'], 2)}"))
    secs = m.get("seconds", {})
    if secs:
        stats.append(Stat("total time", f"{secs.get('total', float('nan')):.1f} s", SINGLE))
    rows = [[r["hops"], r["readout"], fmt(bool(r["curvature"])), fmt(r["pearson"]),
             fmt(r["spearman"]), fmt(r["kendall"]), fmt(r["sign_agreement"], 2),
             fmt(r["median_rel_error"]), fmt(r["gt_s_per_event"]), fmt(r["e_s_per_event"])]
            for r in res]
    cols = ["hops", "read-out", "curvature", "Pearson", "Spearman", "Kendall", "sign agreement",
            "median rel. error", "GT s/event", "E s/event"]
    text = (f"{s.get('events')} removal events ({s.get('unit')}) on {s.get('dataset')}, "
            f"{s.get('n')} nodes, {s.get('topology')} graph, {s.get('model')}, batch "
            f"{s.get('batch_size')}, lr {s.get('lr')}, {s.get('rounds')} rounds, "
            f"{s.get('dtype')}. DICE-GT replays training without the removed data (exact); "
            "DICE-E is the paper's first-order estimate. A value for r hops adds the source's own "
            "step and the influence on the nodes 1..r hops away.")
    return [Section(
        title="Influence: DICE-E against exact replay (DICE-GT)",
        text=text,
        stats=stats,
        tables=[Table(cols, rows, caption="Correlations of DICE-E with DICE-GT over the events; "
                      "relative error = |E − GT| / |GT|. Times per event: " + SINGLE + " (the "
                      "whole batch of events timed once, divided by their number).")],
        figures=[
            run.figure("scatter.png",
                       "One dot per removal event: x = DICE-GT (exact), y = DICE-E (estimate); "
                       "on the dashed line y = x they agree exactly. Right of zero = the removed "
                       "data was harmful."),
            run.figure("hops.png",
                       "Mean |influence term| at hop s: s = 0 is the source's own step, s = 1 "
                       "its neighbours, and so on. The cascade fades as it spreads."),
        ],
        notes=["All events with their GT and estimates: events.csv; per-node GT values: "
               "influence_gt.json (axes event, hop, node)."],
    )]


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
    return [Section(
        title="The influence cascade of one removal",
        text=f"Node {e.get('node')}'s batch at round {e.get('round')} is removed and training is "
             "replayed exactly (DICE-GT). Each panel is one round later: the colour of a node is "
             "its test loss with the batch minus without it. The influence starts at the source "
             "and spreads one hop per round of gossip.",
        stats=stats,
        tables=[Table(["hop", "round", "nodes reached", "sum of influence", "max |influence|"],
                      [[r["hop"], r["round"], r["nodes_reached"], f"{r['sum']:+.3e}",
                        f"{r['max_abs']:.3e}"] for r in m.get("per_hop", [])],
                      caption="per hop: nodes reached so far (source included), the sum and "
                              "the largest magnitude of their influence")],
        figures=[run.figure(
            "cascade.png",
            "Nodes placed on rings by their hop distance from the source (star, centre). "
            "Red = the removed batch hurt that node (positive influence), blue = it helped; the "
            "colour scale is symmetric about 0 and shared by all panels.")],
    )]
