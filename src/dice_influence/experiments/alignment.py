"""Alignment experiment: DICE-E against DICE-GT, with numbers (the paper only shows scatter plots).

Config: a run config whose ``experiment.alignment`` mapping holds :class:`AlignmentSettings`.
Output directory: ``metrics.json`` (``"results"``: one record per (hops, readout, curvature,
propagation) on the cumulative r-hop value; ``"hop_terms"``: the same metrics for each hop term
alone, hop 0 being the self term, since the cumulative value is dominated by the self and
first-hop terms), ``events.csv`` (every event, GT and every estimate), ``scatter.png`` (E vs GT
with y = x and the numbers), ``hops.png`` (per-hop terms: influence decaying with hops),
``train/`` (the run).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .._util import atomic_savefig, atomic_write_text, write_json
from ..config import ConfigError, RunConfig, data_label, model_label
from ..report import write_report

DEMO_ALIGNMENT: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "digits", "samples_per_node": 80, "validation_samples": 300},
    "topology": {"name": "ring", "n": 16},
    "model": {"name": "mlp", "hidden": [128, 64]},
    "train": {"rounds": 40, "batch_size": 16, "lr": 0.1, "dtype": "float64",
              "checkpoint_every": 5, "eval_every": 10},
    "experiment": {"alignment": {"events": 20, "hops": 2, "first_round": 0,
                                 "readouts": ["linear", "factual", "midpoint"],
                                 "curvature": [True]}},
}
"""The small digits alignment run of ``dice demo`` (configs/alignment-digits.yaml, smaller)."""


class AlignmentSettings(BaseModel):
    """``experiment.alignment`` keys."""

    model_config = ConfigDict(extra="forbid")
    events: int = Field(30, ge=2, description="number of removal events")
    unit: Literal["batch", "sample"] = "batch"
    hops: int = Field(3, ge=1, le=16)
    readouts: list[Literal["linear", "factual", "midpoint"]] = ["linear", "factual", "midpoint"]
    curvature: list[bool] = [True, False]
    propagation: list[Literal["factual", "midpoint"]] = Field(
        ["factual"], description="where each later step's Jacobian is taken (curvature on)")
    paths: Literal["exact", "paper"] = "exact"
    q: Literal["uniform", "one"] = "uniform"
    per_node_test: bool = False
    first_round: int | None = Field(None, ge=0, description="earliest event round")
    seed: int = 0
    batch_events: int | None = Field(
        None, ge=1, description="events replayed / pushed together in DICE-GT and DICE-E "
        "(default: 32 / 64): peak memory grows with it, not with the number of events; the "
        "values do not depend on it")


def settings_from(cfg: RunConfig) -> AlignmentSettings:
    raw = cfg.experiment.get("alignment", {}) or {}
    try:
        return AlignmentSettings.model_validate(raw)
    except ValidationError as err:
        msgs = [f"  experiment.alignment.{'.'.join(map(str, e['loc']))}: {e['msg']}"
                for e in err.errors()]
        raise ConfigError("invalid alignment settings:\n" + "\n".join(msgs)) from None


def alignment_metrics(est: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman, Kendall, sign agreement and median relative error of ``est`` vs
    ``gt`` (relative error ``|est − gt| / |gt|``)."""
    from scipy import stats

    ok = np.isfinite(est) & np.isfinite(gt)
    e, g = est[ok], gt[ok]
    if len(e) < 2 or np.std(e) == 0 or np.std(g) == 0:
        nan = float("nan")
        return {"pearson": nan, "spearman": nan, "kendall": nan,
                "sign_agreement": float(np.mean(np.sign(e) == np.sign(g))) if len(e) else nan,
                "median_rel_error": nan}
    rel = np.abs(e - g) / np.maximum(np.abs(g), 1e-300)
    return {
        "pearson": float(stats.pearsonr(e, g)[0]),
        "spearman": float(stats.spearmanr(e, g)[0]),
        "kendall": float(stats.kendalltau(e, g)[0]),
        "sign_agreement": float(np.mean(np.sign(e) == np.sign(g))),
        "median_rel_error": float(np.median(rel)),
    }


def run_alignment(cfg: RunConfig, out: str | Path, *, progress: bool = True,
                  log: Any = print) -> dict[str, Any]:
    """Train, sample events, compute DICE-GT and every DICE-E variant, write the outputs."""
    from .._threads import decision as thread_decision
    from ..influence import estimate, ground_truth, sample_events
    from ..rundir import write_run_dir
    from ..simulator import train

    st = settings_from(cfg)
    out = Path(out)
    t_start = time.perf_counter()
    log(f"training: {cfg.train.rounds} rounds of {cfg.topology.n} nodes ({data_label(cfg)}, "
        f"{model_label(cfg)}, {cfg.topology.name} graph)")
    traj = train(cfg, progress=progress)
    t_train = time.perf_counter() - t_start
    write_run_dir(traj, out / "train", plots=True)
    lo = st.first_round if st.first_round is not None else traj.rounds_done // 2
    events = sample_events(traj, st.events, unit=st.unit, hops=st.hops, seed=st.seed,
                           rounds=(min(lo, traj.rounds_done - st.hops), traj.rounds_done))
    log(f"{len(events)} events ({st.unit} removal), hops 1..{st.hops}")
    # warm-up (one event, one hop): torch.func's one-time set-up is not charged to the first
    # variant timed, so every s/event below is the same measure (see TIMING)
    ground_truth(traj, events[:1], hops=1, q=st.q, per_node_test=st.per_node_test)
    estimate(traj, events[:1], hops=1, readout=st.readouts[0], q=st.q,
             per_node_test=st.per_node_test)
    # without curvature J = I: the propagation point does not matter
    variants = [(ro, cv, pr) for ro in st.readouts for cv in st.curvature
                for pr in (st.propagation if cv else ["factual"])]
    log(f"DICE-GT: exact counterfactual replay of {len(events)} events x {st.hops} hops "
        f"(about {len(events) * st.hops} rounds of {cfg.topology.n} nodes)")
    chunk = {} if st.batch_events is None else {"batch_events": st.batch_events}
    gt = ground_truth(traj, events, hops=st.hops, q=st.q, per_node_test=st.per_node_test,
                      progress=progress, **chunk)
    ests = {}
    for i, (ro, cv, pr) in enumerate(variants):
        left = len(variants) - i
        eta = (f", about {gt.seconds * left:.0f} s left" if not ests else
               f", about {sum(e.seconds for e in ests.values()) / len(ests) * left:.0f} s left")
        log(f"DICE-E {i + 1}/{len(variants)}: readout {ro}, curvature {'on' if cv else 'off'}"
            f", propagation {pr}{eta}")
        ests[(ro, cv, pr)] = estimate(
            traj, events, hops=st.hops, curvature=cv, readout=ro, propagation=pr,
            paths=st.paths, q=st.q, per_node_test=st.per_node_test, progress=progress,
            **chunk)
    results = []
    for r in range(1, st.hops + 1):
        g = gt.values(r).numpy()
        for (ro, cv, pr), es in ests.items():
            rec = {"hops": r, "readout": ro, "curvature": cv, "propagation": pr,
                   **alignment_metrics(es.values(r).numpy(), g),
                   "gt_s_per_event": gt.seconds / len(events),
                   "e_s_per_event": es.seconds / len(events)}
            results.append(rec)
    hop_terms = hop_term_metrics(gt, ests)
    metrics = {
        "kind": "alignment",
        "sign": "influence = loss with the data - loss without it; positive = harmful",
        "setting": {"dataset": data_label(cfg), "n": cfg.topology.n,
                    "topology": cfg.topology.name, "model": model_label(cfg),
                    "loss": cfg.loss.kind,
                    "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                    "rounds": cfg.train.rounds, "dtype": cfg.train.dtype,
                    "events": len(events), "unit": st.unit, "paths": st.paths},
        "results": results,
        "hop_terms": hop_terms,
        "timing": {"definition": TIMING.format(n=len(events), r=st.hops),
                   "events": len(events), "hops": st.hops,
                   "gt_s_per_event": gt.seconds / len(events),
                   "e_s_per_event": {_key(*k): es.seconds / len(events)
                                     for k, es in ests.items()}},
        "seconds": {"train": t_train, "gt": gt.seconds,
                    **{_key(*k): es.seconds for k, es in ests.items()},
                    "total": time.perf_counter() - t_start},
        "final_mean_acc": traj.final_metrics.get("mean_acc"),
        "final_mean_loss": traj.final_metrics.get("mean_loss"),
        "threads": thread_decision(),
    }
    write_json(out / "metrics.json", metrics)
    log("writing tables, plots and the report")
    atomic_write_text(out / "events.csv", _events_csv(events, gt, ests, st.hops))
    write_json(out / "influence_gt.json", gt.to_dict())
    log("  drawing scatter.png (DICE-E vs DICE-GT per event)")
    _scatter(out / "scatter.png", gt, ests, st.hops, results, cfg)
    log("  drawing hops.png (influence per hop)")
    _hop_plot(out / "hops.png", gt, ests)
    log("  writing README.md and report.html")
    atomic_write_text(out / "README.md", _readme(metrics))
    metrics["seconds"]["total"] = time.perf_counter() - t_start
    write_json(out / "metrics.json", metrics)
    write_report(out, "alignment")
    return metrics


TIMING = ("seconds per event: the wall time of one call that computes all {n} events for hops "
          "1..{r} together (batched), divided by {n}; after a warm-up call; single measurement "
          "on a shared machine. The same for every row, whatever its hops.")
"""What ``gt_s_per_event`` / ``e_s_per_event`` measure (the demo and the experiment alike)."""


def readout_guide(metrics: dict[str, Any]) -> list[str]:
    """Which read-out to trust for what, worded from this run's numbers (the cumulative value at
    the largest hop count, curvature on, factual propagation where present)."""
    res = metrics.get("results", [])
    if not res:
        return []
    R = max(r["hops"] for r in res)
    pick: dict[str, dict[str, Any]] = {}
    for r in res:
        if r["hops"] == R and r["curvature"] and r.get("propagation", "factual") == "factual":
            pick.setdefault(r["readout"], r)
    for r in res:  # curvature off only: take what there is
        if r["hops"] == R:
            pick.setdefault(r["readout"], r)
    if not pick:
        return []
    s = metrics.get("setting", {})
    ok = {k: v for k, v in pick.items() if v["pearson"] == v["pearson"]}
    if not ok:
        return []
    best = max(ok, key=lambda k: ok[k]["pearson"])
    b = ok[best]
    what = ("whole batches" if s.get("unit") == "batch" else "single samples")
    lines = [f"Trust `{best}` for the values: Pearson {b['pearson']:.4f}, median relative error "
             f"{100 * b['median_rel_error']:.1f} % against exact replay at r = {R} hops."
             + (" The midpoint read-out evaluates the gradient halfway between the two "
                "trajectories, which removes the quadratic term of the loss change that the "
                "linear read-outs miss." if best == "midpoint" else "")]
    roles = {"factual": "linear in the removal, the read-out that scores every sample at once "
                        "(attribute):",
             "linear": "the paper's read-out (Prop. 1), gradient before the source's step:",
             "midpoint": "exact for a quadratic loss, one event at a time:"}
    for k, r in ok.items():
        if k == best:
            continue
        p, sp, rel = r["pearson"], r["spearman"], r["median_rel_error"]
        head = f"`{k}`, {roles.get(k, k)} Pearson {p:.4f}, Spearman {sp:.4f}"
        if p >= b["pearson"] - 0.01:
            lines.append(head + " - as good here.")
        elif sp >= p + 0.1:
            lines.append(head + f", median relative error {100 * rel:.0f} %: it ranks the "
                         f"events better than it measures them. Use it to rank {what} here, "
                         "not to quote amounts: "
                         + (f"removing a whole batch at lr {s.get('lr')} is a large step, "
                            "along which the loss is far from linear." if s.get("unit") == "batch"
                            else "for the largest removals the quadratic term of the loss "
                            "change is as large as the linear one."))
        else:
            lines.append(head + f", median relative error {100 * rel:.0f} %: less accurate "
                         f"than `{best}` on this setting.")
    lines.append("Read-outs, propagation and the known error sources: docs/method.md §4.")
    return lines


HOP_TERM_KEYS = ("pearson", "spearman", "sign_agreement", "median_rel_error")


def hop_term_metrics(gt: Any, ests: dict[tuple[str, bool, str], Any]) -> list[dict[str, Any]]:
    """Fidelity of each hop term alone (``hop`` 0 = the self term, ``s ≥ 1`` = the nodes first
    reached at ``t+s``): one record per (hop, readout, curvature, propagation)."""
    def terms(res: Any) -> np.ndarray:
        return np.concatenate([res.self_term.numpy()[:, None], res.hop_terms.numpy()], axis=1)

    g = terms(gt)
    out = []
    for s in range(g.shape[1]):
        for (ro, cv, pr), es in ests.items():
            m = alignment_metrics(terms(es)[:, s], g[:, s])
            out.append({"hop": s, "readout": ro, "curvature": cv, "propagation": pr,
                        **{k: m[k] for k in HOP_TERM_KEYS}})
    return out


def _key(ro: str, cv: bool, pr: str = "factual") -> str:
    return f"e_{ro}_{'curv' if cv else 'nocurv'}" + ("_midprop" if pr == "midpoint" else "")


def _events_csv(events, gt, ests, hops) -> str:
    buf = io.StringIO()
    cols = ["event", "node", "round", "unit", "samples", "hops", "gt"] + [
        _key(*k) for k in ests]
    w = csv.writer(buf)
    w.writerow(cols)
    for r in range(0, hops + 1):
        g = gt.values(r).tolist()
        es = {k: v.values(r).tolist() for k, v in ests.items()}
        for i, e in enumerate(events):
            w.writerow([i, e.node, e.round, e.unit,
                        "" if e.samples is None else " ".join(map(str, e.samples)), r,
                        repr(g[i])] + [repr(es[k][i]) for k in ests])
    return buf.getvalue()


def _scatter(path: Path, gt, ests, hops: int, results, cfg: RunConfig) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from ..report import fmt

    keys = list(ests)
    fig = Figure(figsize=(3.4 * hops, 3.3 * len(keys)), dpi=100)
    axes = fig.subplots(len(keys), hops, squeeze=False)
    lookup = {(r["hops"], r["readout"], r["curvature"], r["propagation"]): r for r in results}
    for a, (ro, cv, pr) in enumerate(keys):
        for r in range(1, hops + 1):
            ax = axes[a][r - 1]
            g = gt.values(r).numpy()
            e = ests[(ro, cv, pr)].values(r).numpy()
            ax.scatter(g, e, s=12, alpha=0.8)
            lo, hi = float(min(g.min(), e.min())), float(max(g.max(), e.max()))
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x (E = GT)")
            ax.legend(loc="upper left", fontsize=7.5, frameon=False)
            m = lookup[(r, ro, cv, pr)]
            mid = ", mid-prop" if pr == "midpoint" else ""
            ax.set_title(f"{r}-hop, {ro}, {'curv' if cv else 'no curv'}{mid}\n"
                         f"pearson {fmt(m['pearson'])}  spearman {fmt(m['spearman'], 3)}",
                         fontsize=9)
            ax.set_xlabel("DICE-GT (positive = harmful)", fontsize=8.5)
            ax.set_ylabel("DICE-E", fontsize=8.5)
            ax.tick_params(labelsize=8)
            ax.ticklabel_format(style="sci", scilimits=(-2, 3), useMathText=True)
            ax.xaxis.get_offset_text().set_fontsize(8)
            ax.yaxis.get_offset_text().set_fontsize(8)
            ax.xaxis.set_major_locator(MaxNLocator(4))
    fig.suptitle(f"{data_label(cfg)}, {cfg.topology.n} nodes {cfg.topology.name}, "
                 f"{model_label(cfg)}, batch {cfg.train.batch_size}, lr {cfg.train.lr}", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, path)


def _hop_plot(path: Path, gt, ests) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.5), dpi=110)
    ax = fig.add_subplot()
    hops = np.arange(0, gt.hops + 1)

    def mags(res):
        terms = np.concatenate([res.self_term.numpy()[:, None], res.hop_terms.numpy()], axis=1)
        return np.abs(terms).mean(0)

    ax.semilogy(hops, mags(gt), "o-", color="k", label="DICE-GT")
    for (ro, cv, pr), es in ests.items():
        mid = ", mid-prop" if pr == "midpoint" else ""
        ax.semilogy(hops, mags(es), ".--", label=f"DICE-E {ro}{'' if cv else ', no curv'}{mid}")
    ax.set_xticks(hops)
    ax.set_xlabel("hop s (0 = the source's own step)")
    ax.set_ylabel("mean |term at hop s|")
    ax.set_title("influence cascade: per-hop terms")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)


def _readme(metrics: dict[str, Any]) -> str:
    s = metrics["setting"]
    lines = [
        "# DICE alignment: DICE-E vs DICE-GT\n",
        f"{s['dataset']}, {s['n']} nodes, {s['topology']}, {s['model']}, batch {s['batch_size']}, "
        f"lr {s['lr']}, {s['events']} {s['unit']} removals, {s['dtype']}.\n",
        "Sign: influence = loss with the data − loss without it; positive = harmful.\n",
        "Cumulative r-hop value:\n",
        "| hops | readout | curvature | propagation | pearson | spearman | kendall | sign agr. |"
        " median rel. err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in metrics["results"]:
        lines.append(
            f"| {r['hops']} | {r['readout']} | {r['curvature']} | {r['propagation']} | "
            f"{r['pearson']:.4f} | "
            f"{r['spearman']:.4f} | {r['kendall']:.4f} | {r['sign_agreement']:.2f} | "
            f"{r['median_rel_error']:.4f} |")
    guide = readout_guide(metrics)
    if guide:
        lines += ["\nWhich read-out to trust, from these numbers:\n", *[f"- {g}" for g in guide]]
    lines += ["\nCost per event:\n", "| method | s/event |", "|---|---|",
              *[f"| {n} | {v:.4f} |" for n, v in timing_rows(metrics)],
              "", timing_caption(metrics)]
    lines += ["\nEach hop term alone (hop 0 = the self term):\n",
              "| hop | readout | curvature | propagation | pearson | spearman | sign agr. |"
              " median rel. err |",
              "|---|---|---|---|---|---|---|---|"]
    for r in metrics.get("hop_terms", []):
        lines.append(
            f"| {r['hop']} | {r['readout']} | {r['curvature']} | {r['propagation']} | "
            f"{r['pearson']:.4f} | {r['spearman']:.4f} | {r['sign_agreement']:.2f} | "
            f"{r['median_rel_error']:.4f} |")
    lines.append("\nPlots: `scatter.png`, `hops.png`; all events: `events.csv`.\n")
    return "\n".join(lines)


def print_results(metrics: dict[str, Any], console: Any, title: str = "alignment") -> None:
    """The results table, which read-out to trust, and the per-event costs (one measure:
    :data:`TIMING`)."""
    from rich.table import Table

    from ..report import fmt

    t = Table(title=title)
    for c in ("hops", "readout", "curv", "prop", "pearson", "spearman", "kendall", "sign",
              "med rel err"):
        t.add_column(c, justify="right")
    for r in metrics["results"]:
        t.add_row(str(r["hops"]), r["readout"], "yes" if r["curvature"] else "no",
                  r.get("propagation", "factual"),
                  fmt(r["pearson"]), fmt(r["spearman"]), fmt(r["kendall"]),
                  fmt(r["sign_agreement"], 2), fmt(r["median_rel_error"]))
    console.print(t)
    for line in readout_guide(metrics):
        console.print("  " + line, markup=False, highlight=False)
    tm = timing_rows(metrics)
    if tm:
        c = Table(title="cost per event")
        c.add_column("method")
        c.add_column("s/event", justify="right")
        for name, v in tm:
            c.add_row(name, f"{v:.4f}")
        console.print(c)
        console.print("  " + timing_caption(metrics), markup=False, highlight=False)


def timing_rows(metrics: dict[str, Any]) -> list[tuple[str, float]]:
    """``(method, seconds per event)``: DICE-GT, then every DICE-E variant (:data:`TIMING`)."""
    res = metrics.get("results", [])
    if not res:
        return []
    rows = [("DICE-GT (exact replay)", float(res[0]["gt_s_per_event"]))]
    seen = set()
    for r in res:
        k = (r["readout"], bool(r["curvature"]), r.get("propagation", "factual"))
        if k in seen:
            continue
        seen.add(k)
        rows.append((f"DICE-E {k[0]}" + ("" if k[1] else ", no curvature")
                     + (", midpoint propagation" if k[2] == "midpoint" else ""),
                     float(r["e_s_per_event"])))
    return rows


def timing_caption(metrics: dict[str, Any]) -> str:
    t = metrics.get("timing")
    if t:
        return t["definition"]
    res = metrics.get("results", [])
    n = metrics.get("setting", {}).get("events", "N")
    r = max((x["hops"] for x in res), default="R")
    return TIMING.format(n=n, r=r).replace("; after a warm-up call", "")  # older runs: none


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    import typer

    from ..cli_support import (
        DATA_DIR_HELP,
        SET_HELP,
        console,
        esc,
        friendly,
        load_run_config,
        overwrite_option,
    )
    from ..folders import claim_folder, experiment_identity

    @experiment_app.command("alignment")
    @friendly
    def alignment_cmd(
        config: Path = typer.Argument(..., help="Run config with an experiment.alignment map."),
        out: Path = typer.Option(Path("runs/alignment"), "--out", "-o"),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
        data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """DICE-E vs DICE-GT for r = 1..R hops: correlations, errors, costs, plots, report."""
        cfg = load_run_config(config, set_, data_dir)
        claim_folder(out, "alignment", experiment_identity("alignment", cfg),
                     overwrite=overwrite)
        metrics = run_alignment(cfg, out, log=console.print)
        print_results(metrics, console)
        console.print(f"total {metrics['seconds']['total']:.1f} s; wrote [bold]"
                      f"{esc(out)}[/] (report: report.html)")
