"""Run directories: everything a training run leaves behind, readable by a person.

Layout: ``config.yaml``, ``metrics.json``, ``nodes.csv`` (per-node final test loss/accuracy),
``history.csv`` (evaluation over rounds), ``final.safetensors`` (final stacked parameters),
``trajectory.json`` + ``checkpoints.safetensors`` (exact replay), ``accuracy.png`` and
``README.md``. Every file is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._util import atomic_savefig, atomic_write_text, csv_text, save_tensors, write_json
from .config import dump_config
from .trajectory import Trajectory


def write_run_dir(traj: Trajectory, out: str | Path, *, extra: dict[str, Any] | None = None,
                  plots: bool = True) -> Path:
    """Write the run directory for ``traj`` into ``out`` and return its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p = traj.problem
    final = traj.final_metrics
    atomic_write_text(out / "config.yaml", dump_config(p.cfg))
    metrics = {
        "kind": "train",  # the report's section provider (dice_influence.report)
        "rounds": traj.rounds_done,
        "n_nodes": p.n,
        "n_params": p.d,
        "final": {k: v for k, v in final.items() if k not in ("loss", "acc")},
        "per_node": {"test_loss": final.get("loss"), "test_acc": final.get("acc")},
        "history": [{k: v for k, v in h.items() if k not in ("loss", "acc")}
                    for h in traj.history],
        **_plugin_summaries(traj),
        **(extra or {}),
    }
    write_json(out / "metrics.json", metrics)
    rows = [{"node": k, "train_samples": int(p.node_data.sizes[k]),
             "test_loss": final["loss"][k], "test_acc": final["acc"][k]} for k in range(p.n)]
    atomic_write_text(out / "nodes.csv", csv_text(rows))
    hist = [{"round": h["round"], "mean_acc": h["mean_acc"], "mean_loss": h["mean_loss"],
             "min_acc": min(h["acc"]), "avg_model_acc": h["avg_model_acc"],
             "consensus_distance": h["consensus_distance"]} for h in traj.history]
    atomic_write_text(out / "history.csv", csv_text(hist))
    save_tensors(out / "final.safetensors", {"theta": traj.theta.contiguous().cpu()},
                 metadata={"layout": "theta[k] = flat parameters of node k"})
    traj.save(out)
    if plots and traj.history:
        plot_history(traj, out / "accuracy.png")
    atomic_write_text(out / "README.md", _readme(traj, metrics))
    return out


def _plugin_summaries(traj: Trajectory) -> dict[str, Any]:
    """``"observers"`` / ``"policy"``: what each plug-in of the run measured or decided, and
    ``"W_used_rounds"``: the rounds whose mixing matrix a policy chose (replayed exactly)."""
    pl = traj.plugins
    if pl is None or (not pl.observers and pl.policy is None):
        return {}
    out: dict[str, Any] = {
        "observers": {o.name: o.summary() for o in pl.observers},
        "W_used_rounds": sorted(traj.W_used),
    }
    if pl.policy is not None:
        out["policy"] = {pl.policy.name: pl.policy.summary()}
    return out


def plot_history(traj: Trajectory, path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=110)
    ax = fig.add_subplot()
    rounds = [h["round"] for h in traj.history]
    accs = [h["acc"] for h in traj.history]
    for k in range(traj.problem.n):
        ax.plot(rounds, [a[k] for a in accs], color="0.75", lw=0.7)
    ax.plot(rounds, [h["mean_acc"] for h in traj.history], color="C0", lw=2, label="mean node")
    ax.plot(rounds, [h["avg_model_acc"] for h in traj.history], color="C1", lw=1.5, ls="--",
            label="averaged model")
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{traj.problem.cfg.data.dataset}: {traj.problem.n} nodes, "
                 f"{traj.problem.cfg.topology.name}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_savefig(fig, path)


def _readme(traj: Trajectory, metrics: dict[str, Any]) -> str:
    cfg = traj.problem.cfg
    f = metrics["final"]
    return (
        f"# dice-influence run\n\n"
        f"- data: `{cfg.data.dataset}` ({cfg.data.partition}), {traj.problem.n} nodes, "
        f"topology `{cfg.topology.name}`"
        f"{' (time-varying: ' + cfg.topology.time_varying + ')' if cfg.topology.time_varying else ''}\n"
        f"- model: `{cfg.model.name}` ({traj.problem.d} parameters), {traj.rounds_done} rounds, "
        f"batch {cfg.train.batch_size}, lr {cfg.train.lr}\n"
        f"- final mean node test accuracy: {f.get('mean_acc', float('nan')):.4f}; "
        f"averaged model: {f.get('avg_model_acc', float('nan')):.4f}; "
        f"consensus distance: {f.get('consensus_distance', float('nan')):.3g}\n\n"
        "Files: `config.yaml` (re-run with `dice train config.yaml`), `metrics.json`, "
        "`nodes.csv`, `history.csv`, `final.safetensors`, `trajectory.json` + "
        "`checkpoints.safetensors` (exact replay), `accuracy.png`.\n\n"
        "Sign convention for every influence value in this project: influence = loss with the "
        "data − loss without it; positive = harmful.\n"
    )
