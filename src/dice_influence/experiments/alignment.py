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
    from ..influence import estimate, ground_truth, sample_events
    from ..rundir import write_run_dir
    from ..simulator import train

    st = settings_from(cfg)
    out = Path(out)
    t_start = time.perf_counter()
    traj = train(cfg, progress=progress)
    t_train = time.perf_counter() - t_start
    write_run_dir(traj, out / "train", plots=True)
    lo = st.first_round if st.first_round is not None else traj.rounds_done // 2
    events = sample_events(traj, st.events, unit=st.unit, hops=st.hops, seed=st.seed,
                           rounds=(min(lo, traj.rounds_done - st.hops), traj.rounds_done))
    log(f"{len(events)} events ({st.unit} removal), hops 1..{st.hops}")
    gt = ground_truth(traj, events, hops=st.hops, q=st.q, per_node_test=st.per_node_test)
    ests = {}
    for ro in st.readouts:
        for cv in st.curvature:
            # without curvature J = I: the propagation point does not matter
            for pr in (st.propagation if cv else ["factual"]):
                ests[(ro, cv, pr)] = estimate(
                    traj, events, hops=st.hops, curvature=cv, readout=ro, propagation=pr,
                    paths=st.paths, q=st.q, per_node_test=st.per_node_test)
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
        "seconds": {"train": t_train, "gt": gt.seconds,
                    **{_key(*k): es.seconds for k, es in ests.items()},
                    "total": time.perf_counter() - t_start},
        "final_mean_acc": traj.final_metrics.get("mean_acc"),
        "final_mean_loss": traj.final_metrics.get("mean_loss"),
    }
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "events.csv", _events_csv(events, gt, ests, st.hops))
    write_json(out / "influence_gt.json", gt.to_dict())
    _scatter(out / "scatter.png", gt, ests, st.hops, results, cfg)
    _hop_plot(out / "hops.png", gt, ests)
    atomic_write_text(out / "README.md", _readme(metrics))
    metrics["seconds"]["total"] = time.perf_counter() - t_start
    write_json(out / "metrics.json", metrics)
    write_report(out, "alignment")
    return metrics


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

    keys = list(ests)
    fig = Figure(figsize=(3.4 * hops, 3.2 * len(keys)), dpi=100)
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
            ax.legend(loc="upper left", fontsize=6, frameon=False)
            m = lookup[(r, ro, cv, pr)]
            mid = ", mid-prop" if pr == "midpoint" else ""
            ax.set_title(f"{r}-hop, {ro}, {'curv' if cv else 'no curv'}{mid}\n"
                         f"pearson {m['pearson']:.4f}  spearman {m['spearman']:.3f}", fontsize=8)
            ax.set_xlabel("DICE-GT (positive = harmful)", fontsize=7)
            ax.set_ylabel("DICE-E", fontsize=7)
            ax.tick_params(labelsize=6)
            ax.ticklabel_format(style="sci", scilimits=(-2, 3), useMathText=True)
            ax.xaxis.get_offset_text().set_fontsize(6)
            ax.yaxis.get_offset_text().set_fontsize(6)
            ax.xaxis.set_major_locator(MaxNLocator(5))
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
    ax.legend(fontsize=7)
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
        " median rel. err | GT s/event | E s/event |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in metrics["results"]:
        lines.append(
            f"| {r['hops']} | {r['readout']} | {r['curvature']} | {r['propagation']} | "
            f"{r['pearson']:.4f} | "
            f"{r['spearman']:.4f} | {r['kendall']:.4f} | {r['sign_agreement']:.2f} | "
            f"{r['median_rel_error']:.4f} | {r['gt_s_per_event']:.4f} | {r['e_s_per_event']:.4f} |")
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
    from rich.table import Table

    t = Table(title=title, caption="GT s/ev, E s/ev: seconds per event, single measurement "
              "(all events timed once, divided by their number)")
    for c in ("hops", "readout", "curv", "prop", "pearson", "spearman", "kendall", "sign",
              "med rel err", "GT s/ev", "E s/ev"):
        t.add_column(c, justify="right")
    for r in metrics["results"]:
        t.add_row(str(r["hops"]), r["readout"], "yes" if r["curvature"] else "no",
                  r.get("propagation", "factual"),
                  f"{r['pearson']:.4f}", f"{r['spearman']:.4f}", f"{r['kendall']:.4f}",
                  f"{r['sign_agreement']:.2f}", f"{r['median_rel_error']:.4f}",
                  f"{r['gt_s_per_event']:.4f}", f"{r['e_s_per_event']:.4f}")
    console.print(t)


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    import typer

    from ..cli_support import DATA_DIR_HELP, SET_HELP, console, esc, friendly, load_run_config

    @experiment_app.command("alignment")
    @friendly
    def alignment_cmd(
        config: Path = typer.Argument(..., help="Run config with an experiment.alignment map."),
        out: Path = typer.Option(Path("runs/alignment"), "--out", "-o"),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
        data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    ) -> None:
        """DICE-E vs DICE-GT for r = 1..R hops: correlations, errors, costs, plots, report."""
        cfg = load_run_config(config, set_, data_dir)
        metrics = run_alignment(cfg, out, log=console.print)
        print_results(metrics, console)
        console.print(f"total {metrics['seconds']['total']:.1f} s; wrote [bold]"
                      f"{esc(out)}[/] (report: report.html)")
