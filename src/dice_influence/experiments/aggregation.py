"""Experiment: influence-weighted aggregation vs uniform weights and robust aggregators.

``dice experiment aggregation CONFIG --out DIR [--set key=value ...] [--seeds 0,1,2]``

The config is a run config (the shared setting) plus an ``experiment:`` mapping
(:class:`AggregationConfig`) naming scenarios — each a set of attacks and config overrides, e.g.
``iid`` (nothing), ``attack`` (5 of 50 label flippers), ``noniid`` (``data.partition:
dirichlet(0.3)``), ``signflip`` (5 sign-flip attackers) — and the arms run in each:

- ``dice``: policy ``influence_weight`` (:mod:`~dice_influence.apps.weighting`);
- ``uniform``: the topology's weights, plain gossip;
- ``clipped_gossip``, ``trimmed_mean``: robust aggregators
  (:mod:`~dice_influence.apps.aggregators`).

Each arm is a configuration of the one loop (attack transforms of the problem, a policy or an
aggregator). Honest nodes' accuracy on the shared validation set at the end:
``metrics["aggregation"][SCENARIO][ARM]`` = ``honest_acc_mean`` (mean over honest nodes, then
over seeds) and ``honest_acc_worst`` (worst honest node, averaged over seeds); the worst seed of
each is in ``aggregation_worst_seed``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .._util import atomic_savefig, atomic_write_text, csv_text, write_json
from ..attacks import AttackPlan, AttackSpec, attack_transforms, with_data_attacks
from ..config import ConfigError, RunConfig, dump_config, load_config, parse_overrides
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

ARMS = ("dice", "uniform", "clipped_gossip", "trimmed_mean")


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScenarioConfig(_S):
    """One scenario: attacks and config overrides (dotted keys, as with ``--set``)."""

    attacks: list[AttackSpec] = Field(default_factory=list)
    set: dict[str, Any] = Field(default_factory=dict, description="e.g. data.partition: "
                                "dirichlet(0.3)")


class DiceWeighting(_S):
    """Settings of the ``dice`` arm's ``influence_weight`` policy."""

    temperature: float = Field(0.5, gt=0.0)
    score: Literal["cumulative", "window"] = "cumulative"
    start: int = Field(0, ge=0)
    readout: Literal["pre", "post", "midpoint"] = "pre"
    window: int = Field(10, ge=1)


class AggregationConfig(_S):
    """The ``experiment:`` mapping of an aggregation config."""

    scenarios: dict[str, ScenarioConfig] = Field(
        default_factory=lambda: {"iid": ScenarioConfig()})
    arms: list[Literal[ARMS]] = list(ARMS)  # type: ignore[valid-type]
    dice: DiceWeighting = DiceWeighting()
    clip_delta: float = Field(0.2, ge=0.0, lt=1.0)
    trim: float = Field(0.2, ge=0.0, lt=0.5)
    plots: bool = True


def parse_experiment(cfg: RunConfig) -> AggregationConfig:
    """Validate the settings (each scenario's overrides too) and what they need."""
    ex = parse_settings(AggregationConfig, cfg)
    if not cfg.data.test_samples_per_node:
        raise ConfigError("data.test_samples_per_node must be set: each node measures the "
                          "proximal influence of its neighbours on its own test split z'_k")
    if cfg.policy is not None or cfg.aggregator is not None:
        raise ConfigError("remove the top-level policy:/aggregator: sections; the aggregation "
                          "experiment sets each arm's own")
    for name in ex.scenarios:
        scenario_config(cfg, ex, name)
    return ex


def scenario_config(cfg: RunConfig, ex: AggregationConfig, name: str) -> RunConfig:
    """The run config of scenario ``name`` (its overrides applied)."""
    sc = ex.scenarios[name]
    raw = cfg.model_dump(mode="json")
    raw["experiment"] = {}
    pairs = [f"{k}={_yaml(v)}" for k, v in sc.set.items()]
    try:
        from ..config import _deep_merge

        raw = _deep_merge(raw, parse_overrides(pairs))
        out = load_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"experiment.scenarios.{name}.set: {exc}") from None
    n = out.topology.n
    for i, a in enumerate(sc.attacks):
        if a.count is not None and a.count > n:
            raise ConfigError(f"experiment.scenarios.{name}.attacks.{i}.count={a.count} exceeds "
                              f"topology.n={n}")
    return out


def _yaml(v: Any) -> str:
    import yaml

    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def arm_config(scfg: RunConfig, ex: AggregationConfig, arm: str) -> RunConfig:
    """The plug-in sections of one arm on the scenario's config."""
    raw = scfg.model_dump(mode="json")
    if arm == "dice":
        d = ex.dice
        raw["observers"] = [{"kind": "proximal", "readout": d.readout, "window": d.window,
                             "history": False}]
        raw["policy"] = {"kind": "influence_weight", "temperature": d.temperature,
                         "score": d.score, "start": d.start}
    elif arm == "clipped_gossip":
        raw["aggregator"] = {"kind": "clipped_gossip", "delta": ex.clip_delta}
    elif arm == "trimmed_mean":
        raw["aggregator"] = {"kind": "trimmed_mean", "trim": ex.trim}
    elif arm != "uniform":
        raise ValueError(f"unknown arm {arm!r}; choose one of {ARMS}")
    return load_config(raw)


def run_seed(cfg: RunConfig, ex: AggregationConfig, *, progress: bool = False,
             log: Any = None) -> dict[str, Any]:
    """Every scenario and arm of one seed."""
    from ..simulator import build_problem

    out: dict[str, Any] = {"seed": cfg.seed, "scenarios": {}}
    for name, sc in ex.scenarios.items():
        scfg = scenario_config(cfg, ex, name)
        plan = AttackPlan.resolve(sc.attacks, scfg.topology.n, cfg.seed)
        honest = ~plan.mask
        hidx = torch.as_tensor(np.flatnonzero(honest))
        res_sc: dict[str, Any] = {"malicious": plan.malicious, "arms": {}}

        evaluate = _honest_accuracy(hidx)

        for arm in ex.arms:
            acfg = with_data_attacks(arm_config(scfg, ex, arm), plan)
            p = build_problem(acfg)
            p = dataclasses.replace(p, transforms=p.transforms + attack_transforms(plan))
            t0 = time.perf_counter()
            r = run_arm(acfg, evaluate=evaluate, eval_every=acfg.train.eval_every, problem=p,
                        progress=progress, label=f"seed {cfg.seed} {name} {arm}")
            secs = time.perf_counter() - t0
            fin = r["evals"][-1]
            res_sc["arms"][arm] = {**{k: v for k, v in fin.items() if k != "round"},
                                   "honest_params_finite":
                                   bool(torch.isfinite(r["theta"][hidx]).all()),
                                   "seconds": secs,
                                   "curve": [{"round": e["round"],
                                              "honest_acc_mean": e["honest_acc_mean"]}
                                             for e in r["evals"]]}
            if arm == "dice":
                res_sc["arms"][arm]["weights"] = _weight_shares(r["W_used"], plan.mask,
                                                                acfg.train.rounds)
            if log:
                log(f"  seed {cfg.seed} {name} {arm}: honest acc {fin['honest_acc_mean']:.4f} "
                    f"(worst node {fin['honest_acc_worst']:.4f}, {secs:.1f} s)")
        out["scenarios"][name] = res_sc
    return out


def _honest_accuracy(hidx: torch.Tensor) -> Any:
    def evaluate(p: Any, theta: torch.Tensor) -> dict[str, Any]:
        with torch.no_grad():
            _, acc = node_losses(p.fm, theta[hidx], p.val_x, p.val_y)
        acc = torch.nan_to_num(require_accuracy(acc, 'experiment aggregation'), nan=0.0).double()
        return {"honest_acc_mean": float(acc.mean()), "honest_acc_worst": float(acc.min())}
    return evaluate


def _weight_shares(W_used: dict[int, np.ndarray], malicious: np.ndarray,
                   rounds: int) -> dict[str, Any]:
    """Mean weight honest receivers put on attackers, and on themselves, in the last round."""
    if not W_used:
        return {}
    W = W_used[max(W_used)]
    honest = ~malicious
    out = {"self_weight_honest": float(np.diag(W)[honest].mean())}
    if malicious.any():
        out["weight_on_attackers"] = float(W[np.ix_(honest, malicious)].sum(1).mean())
    return out


def summarize(per_seed: list[dict[str, Any]], ex: AggregationConfig
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(aggregation, aggregation_worst_seed)`` (module docstring)."""
    agg: dict[str, Any] = {}
    worst: dict[str, Any] = {}
    for name in ex.scenarios:
        agg[name], worst[name] = {}, {}
        for arm in ex.arms:
            runs = [r["scenarios"][name]["arms"][arm] for r in per_seed]
            m1, w1 = mean_worst([a["honest_acc_mean"] for a in runs])
            m2, w2 = mean_worst([a["honest_acc_worst"] for a in runs])
            agg[name][arm] = {"honest_acc_mean": m1, "honest_acc_worst": m2,
                              "honest_params_finite": all(a["honest_params_finite"]
                                                          for a in runs)}
            worst[name][arm] = {"honest_acc_mean": w1, "honest_acc_worst": w2}
    return agg, worst


def run_experiment(cfg: RunConfig, out: str | Path, *, seeds: list[int] | None = None,
                   progress: bool = False, log: Any = None) -> dict[str, Any]:
    """Every scenario, arm and seed; writes the run directory and returns ``metrics``."""
    ex = parse_experiment(cfg)
    out, seeds, per_seed = run_seeds(cfg, ex, run_seed, out, seeds, log, progress=progress)
    agg, worst = summarize(per_seed, ex)
    metrics = {
        "kind": "aggregation",
        "sign_convention": SIGN,
        "seeds": seeds,
        "n_nodes": cfg.topology.n,
        "rule": "W[k,j] ∝ W_nom[k,j]·2σ(−z_kj/τ) (self weight kept before normalising), z = "
                "proximal influence / median |influence| of k's neighbours",
        "temperature": ex.dice.temperature,
        "scenarios": {k: v.model_dump() for k, v in ex.scenarios.items()},
        "aggregation": agg,
        "aggregation_worst_seed": worst,
        "per_seed": [{"seed": r["seed"], "scenarios": {
            name: {"malicious": sc["malicious"],
                   "arms": {arm: {k: v for k, v in a.items() if k != "curve"}
                            for arm, a in sc["arms"].items()}}
            for name, sc in r["scenarios"].items()}} for r in per_seed],
    }
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    rows, curves = [], []
    for r in per_seed:
        for name, sc in r["scenarios"].items():
            for arm, a in sc["arms"].items():
                rows.append({"seed": r["seed"], "scenario": name, "arm": arm,
                             "honest_acc_mean": a["honest_acc_mean"],
                             "honest_acc_worst": a["honest_acc_worst"],
                             "seconds": a["seconds"]})
                curves += [{"seed": r["seed"], "scenario": name, "arm": arm, **e}
                           for e in a["curve"]]
    atomic_write_text(out / "arms.csv", csv_text(rows))
    atomic_write_text(out / "accuracy.csv", csv_text(curves))
    if ex.plots:
        _plot(per_seed, ex, out)
    atomic_write_text(out / "README.md", f"# Influence-weighted aggregation\n\n"
                      f"{cfg.topology.n} nodes, seeds {seeds}. {metrics['rule']}; "
                      f"temperature {ex.dice.temperature}.\n\n{table(metrics)}\n")
    finish_run(out, "aggregation")
    return metrics


def _plot(per_seed: list[dict[str, Any]], ex: AggregationConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ex.scenarios)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for arm in ex.arms:
            curves = [r["scenarios"][name]["arms"][arm]["curve"] for r in per_seed]
            rounds = [e["round"] for e in curves[0]]
            acc = np.mean([[e["honest_acc_mean"] for e in c] for c in curves], axis=0)
            ax.plot(rounds, acc, label=arm)
        ax.set_title(name)
        ax.set_xlabel("round")
    axes[0][0].set_ylabel("honest nodes' accuracy (mean over seeds)")
    axes[0][0].legend()
    fig.tight_layout()
    atomic_savefig(fig, out / "aggregation.png", dpi=120)
    plt.close(fig)


def table(m: dict[str, Any]) -> str:
    """Markdown table: scenario x arm, honest accuracy mean (worst node)."""
    agg = m["aggregation"]
    arms = list(next(iter(agg.values())))
    lines = ["| scenario | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for name, row in agg.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{row[a]['honest_acc_mean']:.4f} ({row[a]['honest_acc_worst']:.4f})" for a in arms)
            + " |")
    lines.append("")
    lines.append("honest nodes' accuracy: mean over honest nodes (worst honest node), each "
                 "averaged over seeds")
    return "\n".join(lines)


register_report(
    "aggregation", "Influence-weighted aggregation",
    "Each node reweights its neighbours by their measured proximal influence on it (helpful "
    "up, harmful down, rows stochastic; one temperature knob), compared with uniform weights, "
    "ClippedGossip and the trimmed mean on four scenarios. Numbers: honest nodes' test "
    "accuracy, mean over honest nodes (worst honest node), mean over seeds.",
    table, [("aggregation.png", "Honest nodes' mean test accuracy over the rounds, one panel "
             "per scenario, one line per aggregation rule (higher is better).")])


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    """Add ``dice experiment aggregation``."""
    add_command(experiment_app, "aggregation",
                "Influence-weighted aggregation vs uniform, ClippedGossip, trimmed mean.",
                run_experiment, table, parse_experiment)
