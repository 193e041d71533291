"""Experiment: malicious-neighbour detection and self-healing with online proximal influence.

``dice experiment anomaly CONFIG --out DIR [--set key=value ...] [--seeds 0,1,2]``

The config is a run config (data, topology, model, train) plus an ``experiment:`` mapping
validated by :class:`AnomalyConfig` (attacks, tracking, detection, defense, baseline, arms).
Arms, each a full training run on the same seed:

- ``no_attack``: clean data, plain gossip (the reference);
- ``no_attack_defended``: clean data with the DICE defence on (its cost when nobody attacks);
- ``attack``: attacks on, no defence; proximal influence is tracked and detection is *scored*
  here (nothing is pruned, so the measurement is not disturbed by the defence);
- ``attack_defended``: attacks on, honest nodes prune flagged neighbours;
- ``attack_baseline``: attacks on, robust aggregation baseline (ClippedGossip by default).

Writes ``metrics.json`` (``detection``, ``defense``; mean and worst over seeds), CSVs, plots
and a README. Sign convention: influence = loss with the data − loss without it; positive =
harmful.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .._util import atomic_write_text, write_json
from ..apps import anomaly as A
from ..apps import reciprocity as REC
from ..apps.defense import GuardOptions, GuardResult, guarded_train, honest_connected
from ..attacks import AttackPlan, AttackSpec, with_data_attacks
from ..config import ConfigError, RunConfig, dump_config, load_config
from ._common import check_attacks, parse_settings
from .anomaly_report import checks, legend, plots, readme, rich_tables, write_tables

ARMS = ("no_attack", "no_attack_defended", "attack", "attack_defended", "attack_baseline")


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TrackingConfig(_S):
    """Online proximal influence: record every ``every``-th round with read-out ``readout``."""

    every: int = Field(1, ge=1)
    readout: Literal["pre", "post", "midpoint"] = "pre"
    window: int = Field(10, ge=1)
    history: bool = True
    q: Literal["uniform", "one"] = "uniform"
    test_batch: int | None = Field(None, ge=1)
    test_batch_order: Literal["rotate", "first"] = "rotate"


class DetectionConfig(_S):
    """Local decision rule (see :mod:`dice_influence.apps.anomaly`) and the rounds scored."""

    rule: Literal["sign", "zscore", "sign_and_zscore", "sign_or_zscore"] = "sign"
    score: Literal["cumulative", "window"] = "cumulative"
    z_threshold: float = Field(3.0, gt=0)
    margin: float = 0.0
    from_round: int = Field(3, ge=1)
    to_round: int = Field(100, ge=1)


class DefenseConfig(_S):
    """Self-healing: check every ``check_every`` rounds from round index ``start``."""

    check_every: int = Field(1, ge=1)
    start: int = Field(1, ge=0)
    readmit: bool = True
    max_norm_ratio: float | None = Field(10.0, gt=1.0)
    repair: Literal["rescale", "diagonal"] = Field(
        "rescale", description="row repair after pruning; 'diagonal' only to reproduce the "
        "measurement that chose 'rescale' (docs/anomaly.md)")


class BaselineConfig(_S):
    """Robust aggregation baseline arm."""

    kind: Literal["clipped_gossip", "trimmed_mean"] = "clipped_gossip"
    delta: float = Field(0.2, ge=0.0, lt=1.0)
    trim: float = Field(0.2, ge=0.0, lt=0.5)


class AnomalyConfig(_S):
    """The ``experiment:`` mapping of an anomaly config."""

    attacks: list[AttackSpec] = Field(default_factory=list)
    tracking: TrackingConfig = TrackingConfig()
    detection: DetectionConfig = DetectionConfig()
    defense: DefenseConfig = DefenseConfig()
    baseline: BaselineConfig = BaselineConfig()
    arms: list[Literal[ARMS]] = list(ARMS)  # type: ignore[valid-type]
    focus_node: int | None = None
    plots: bool = True


def parse_experiment(cfg: RunConfig) -> AnomalyConfig:
    """Validate ``cfg.experiment``; raise :class:`ConfigError` naming the bad key."""
    ex = parse_settings(AnomalyConfig, cfg)
    n = cfg.topology.n
    check_attacks(ex.attacks, n)
    if ex.focus_node is not None and not 0 <= ex.focus_node < n:
        raise ConfigError(f"experiment.focus_node={ex.focus_node} out of range 0..{n - 1}")
    if not cfg.data.test_samples_per_node:
        raise ConfigError(
            "data.test_samples_per_node must be set: each node reads proximal "
            "influence on its own test split z'_k (e.g. 64)"
        )
    return _with_plugin_sections(cfg, ex)


def _with_plugin_sections(cfg: RunConfig, ex: AnomalyConfig) -> AnomalyConfig:
    """The run config's plug-in sections, where given, set the arms' plug-ins (the same keys
    as ``dice train`` / ``dice launch``): a ``proximal`` observer → tracking, a ``prune``
    policy → detection + defence of the defended arms, an aggregator → the baseline arm."""
    from ..plugins import parse

    upd: dict[str, Any] = {}
    prox = [parse("observer", o, f"observers.{i}") for i, o in enumerate(cfg.observers)]
    prox = [o for o in prox if o.kind == "proximal"]
    if prox:
        o = prox[0]
        upd["tracking"] = TrackingConfig(every=o.every, readout=o.readout, window=o.window,
                                         history=o.history, q=o.q, test_batch=o.test_batch,
                                         test_batch_order=o.test_batch_order)
    if cfg.policy is not None:
        pol = parse("policy", cfg.policy, "policy")
        if pol.kind != "prune":
            raise ConfigError(f"policy.kind={pol.kind!r}: the anomaly experiment's defended "
                              "arms use the prune policy")
        upd["detection"] = ex.detection.model_copy(update={
            "rule": pol.rule, "score": pol.score, "z_threshold": pol.z_threshold,
            "margin": pol.margin})
        upd["defense"] = ex.defense.model_copy(update={
            "check_every": pol.check_every, "start": pol.start, "readmit": pol.readmit,
            "max_norm_ratio": pol.max_norm_ratio})
    if cfg.aggregator is not None:
        agg = parse("aggregator", cfg.aggregator, "aggregator")
        upd["baseline"] = BaselineConfig(kind=agg.kind, **{k: v for k, v in agg.model_dump()
                                                          .items() if k != "kind"})
    return ex.model_copy(update=upd) if upd else ex


def _options(ex: AnomalyConfig, arm: str, eval_every: int) -> GuardOptions:
    tr, de, df, bl = ex.tracking, ex.detection, ex.defense, ex.baseline
    defense = {
        "no_attack_defended": "dice",
        "attack_defended": "dice",
        "attack_baseline": bl.kind,
    }.get(arm)
    track = arm in ("attack", "no_attack", "no_attack_defended", "attack_defended")
    return GuardOptions(
        track_every=tr.every if track else 0,
        readout=tr.readout,
        window=tr.window,
        history=tr.history,
        q=tr.q,
        defense=defense,
        rule=de.rule,
        z_threshold=de.z_threshold,
        margin=de.margin,
        score=de.score,
        check_every=df.check_every,
        start=df.start,
        readmit=df.readmit,
        max_norm_ratio=df.max_norm_ratio,
        repair=df.repair,
        clip_delta=bl.delta,
        trim=bl.trim,
        eval_every=eval_every,
        test_batch=tr.test_batch,
        test_batch_order=tr.test_batch_order,
    )


# ------------------------------------------------------------------------------------ one seed


def _defense_metrics(res: GuardResult, W0: np.ndarray, malicious: np.ndarray) -> dict[str, Any]:
    honest = ~malicious
    E = (W0 > 0) & ~np.eye(len(W0), dtype=bool)
    hh = E & honest[:, None] & honest[None, :]
    hm = E & honest[:, None] & malicious[None, :]
    pruned = res.blocked & E
    first_all = None
    if hm.any() and res.prune_log:
        got = np.zeros_like(hm)
        for t, k, j, s in res.prune_log:
            got[k, j] = s > 0
            if (got[hm]).all():
                first_all = t + 1
                break
    f = res.final
    return {
        "honest_acc_mean": f["honest_acc_mean"],
        "honest_acc_worst": f["honest_acc_worst"],
        "honest_edges_pruned": float(pruned[hh].mean()) if hh.any() else 0.0,
        "malicious_edges_pruned": float(pruned[hm].mean()) if hm.any() else None,
        "rounds_to_isolate": first_all,
        "honest_graph_connected": honest_connected(res.W_final, honest),
        "honest_params_finite": not res.nonfinite_honest,
    }


def run_seed(
    cfg: RunConfig, ex: AnomalyConfig, *, progress: bool = False, log: Any = None
) -> dict[str, Any]:
    """All arms of one seed; returns plain results plus the raw runs under ``"_runs"``."""
    from ..simulator import build_problem

    # the arms choose their own plug-ins (parse_experiment read the config's sections)
    cfg = cfg.model_copy(update={"observers": [], "policy": None, "aggregator": None})
    n = cfg.topology.n
    plan = AttackPlan.resolve(ex.attacks, n, cfg.seed)
    malicious = plan.mask
    clean = attacked = None
    out: dict[str, Any] = {"seed": cfg.seed, "malicious": plan.malicious, "arms": {}, "_runs": {}}
    W0 = None
    for arm in ex.arms:
        attack = arm.startswith("attack")
        if attack and attacked is None:
            attacked = build_problem(with_data_attacks(cfg, plan))
        if not attack and clean is None:
            clean = build_problem(cfg)
        problem = attacked if attack else clean
        W0 = problem.W(0)
        t0 = time.perf_counter()
        res = guarded_train(
            problem,
            plan if attack else None,
            _options(ex, arm, cfg.train.eval_every),
            malicious=malicious,
            progress=progress,
            label=f"seed {cfg.seed}, arm {arm}",
        )
        secs = time.perf_counter() - t0
        if log:
            log(
                f"  seed {cfg.seed} arm {arm}: honest acc {res.final['honest_acc_mean']:.4f} "
                f"({secs:.1f} s)"
            )
        m = _defense_metrics(res, W0, malicious)
        m["seconds"] = secs
        out["arms"][arm] = m
        out["_runs"][arm] = res
    if "attack" in out["_runs"]:
        # detection is scored where nothing is pruned (the `attack` arm), except for update
        # attacks, which wreck the undefended network (scores +inf or meaningless): those are
        # scored in the defended arm, whose tracker keeps scoring pruned senders with their
        # nominal weights
        arm = "attack"
        if plan.has_update_attacks and "attack_defended" in out["_runs"]:
            arm = "attack_defended"
        if log:
            log(f"  seed {cfg.seed}: scoring detection on arm {arm} (the rule at every round, "
                "AUROC, precision, recall)")
        out.update(_detection(out["_runs"][arm], ex, malicious))
        out["detection"]["scored_arm"] = arm
    out["W0"] = W0
    return out


def _detection(res: GuardResult, ex: AnomalyConfig, malicious: np.ndarray) -> dict[str, Any]:
    tk = res.tracker
    assert tk is not None
    de = ex.detection
    E = tk.seen.numpy()
    S = (tk.score if de.score == "cumulative" else tk.window_score).numpy()
    final = A.evaluate(S, E, malicious, rule=de.rule, z_threshold=de.z_threshold, margin=de.margin)
    series: list[dict[str, Any]] = []
    if tk.keep_history:
        series = A.over_rounds(
            tk.history(),
            tk.rounds,
            E,
            malicious,
            rule=de.rule,
            z_threshold=de.z_threshold,
            margin=de.margin,
            window=tk.window if de.score == "window" else None,
        )
    summ = A.summarize_rounds(series, from_round=de.from_round, to_round=de.to_round)
    rec = REC.node_reciprocity(tk.cum.numpy())
    det = {
        k: final[k]
        for k in (
            "auroc_edge",
            "auroc_node",
            "precision",
            "recall",
            "f1",
            "honest_edges_flagged",
            "node_precision",
            "node_recall",
        )
    }
    det.update({k: v for k, v in summ.items() if k != "checks"})
    det["caught"] = final["caught"]
    return {"detection": det, "series": series, "reciprocity": rec}


# ------------------------------------------------------------------------------------ aggregate

_WORST_MAX = (
    "rounds_to_90pct",
    "honest_edges_flagged",
    "max_honest_edges_flagged",
    "honest_edges_pruned",
    "rounds_to_isolate",
    "seconds",
)


def _agg(dicts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and worst over seeds of numeric / boolean entries (worst = max for counts of
    rounds and flagged honest edges, min otherwise; a missing round count is worst)."""
    mean: dict[str, Any] = {}
    worst: dict[str, Any] = {}
    for k in dicts[0]:
        vals = [d.get(k) for d in dicts]
        if all(isinstance(v, bool) for v in vals):
            mean[k] = float(np.mean(vals))
            worst[k] = all(vals)
        elif all(isinstance(v, int | float) and not isinstance(v, bool) or v is None for v in vals):
            if any(v is None for v in vals):
                nums = [v for v in vals if v is not None]
                mean[k] = float(np.mean(nums)) if nums else None
                worst[k] = None
                continue
            arr = np.asarray(vals, dtype=float)
            mean[k] = float(np.nanmean(arr)) if np.isfinite(arr).any() else None
            worst[k] = float(np.nanmax(arr) if k in _WORST_MAX else np.nanmin(arr))
    return mean, worst


def run_experiment(
    cfg: RunConfig,
    out: str | Path,
    *,
    seeds: list[int] | None = None,
    progress: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Run every arm for every seed, write the run directory, return ``metrics``."""
    ex = parse_experiment(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seeds if seeds else [cfg.seed]
    per_seed = []
    for s in seeds:
        c = cfg.model_copy(update={"seed": int(s)})
        if log:
            log(f"seed {s}:")
        per_seed.append(run_seed(c, ex, progress=progress, log=log))
    metrics: dict[str, Any] = {
        "sign_convention": "influence = loss with the data - loss without it; positive = harmful",
        "seeds": seeds,
        "n_nodes": cfg.topology.n,
        "attacks": [a.model_dump() for a in ex.attacks],
        "malicious": {str(r["seed"]): r["malicious"] for r in per_seed},
    }
    if all("detection" in r for r in per_seed):
        mean, worst = _agg([r["detection"] for r in per_seed])
        metrics["detection"] = mean
        metrics["detection_worst"] = worst
        metrics["detection_scored_arm"] = [r["detection"]["scored_arm"] for r in per_seed]
        metrics["detection_rule"] = {
            "rule": ex.detection.rule,
            "score": ex.detection.score,
            "readout": ex.tracking.readout,
        }
    metrics["defense"], metrics["defense_worst"] = {}, {}
    for arm in ex.arms:
        mean, worst = _agg([r["arms"][arm] for r in per_seed])
        metrics["defense"][arm] = mean
        metrics["defense_worst"][arm] = worst
    metrics["per_seed"] = [
        {
            "seed": r["seed"],
            "malicious": r["malicious"],
            "detection": r.get("detection"),
            "defense": r["arms"],
        }
        for r in per_seed
    ]
    from .._threads import decision

    metrics["threads"] = decision()
    write_json(out / "metrics.json", metrics)
    if log:
        log("writing tables, plots and the report")
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    write_tables(per_seed, out)
    if ex.plots:
        plots(per_seed[0], ex, out)
    atomic_write_text(out / "README.md", readme(cfg, metrics))
    return metrics


# ------------------------------------------------------------------------------------ demo


def demo_config() -> dict[str, Any]:
    """The small digits attack + defence used by ``dice demo`` (= configs/anomaly-digits.yaml)."""
    return {
        "seed": 0,
        "data": {
            "dataset": "digits",
            "samples_per_node": 80,
            "test_samples_per_node": 15,
            "validation_samples": 120,
        },
        "topology": {"name": "random-regular", "n": 16, "degree": 4, "weights": "metropolis"},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"rounds": 40, "batch_size": 16, "lr": 0.1, "eval_every": 10},
        "experiment": {
            "attacks": [{"kind": "label_flip", "count": 2}],
            "arms": ["no_attack", "attack", "attack_defended"],
        },
    }


def demo_anomaly(out: Path, console: Any) -> dict[str, Any]:
    """Small digits attack + defence (< 40 s on 2 cores): prints who was caught and the honest
    accuracy with and without the defence; writes the run directory (and its report) under
    ``out``."""
    from ..report import write_report

    cfg = load_config(demo_config())
    m = run_experiment(cfg, out, progress=True, log=console.print)
    write_report(out, "anomaly")
    det = m["detection"]
    caught = m["per_seed"][0]["detection"]["caught"]
    bad = m["malicious"][str(cfg.seed)]
    console.print(
        f"attackers: {bad}; caught by their neighbours: [bold]{caught}[/] "
        f"(edge AUROC {det['auroc_edge']:.3f}, precision {det['precision']:.2f}, "
        f"recall {det['recall']:.2f} at the last round)"
    )
    print_tables(m, cfg, console, detection=False)
    return m


def print_tables(m: dict[str, Any], cfg: RunConfig, console: Any, *, detection: bool = True
                 ) -> None:
    """The detection and defence tables as rich tables, with what the columns mean."""
    tables = rich_tables(m, checks(cfg))
    for t in tables if detection else tables[-1:]:
        console.print(t)
    if detection:
        console.print(legend(checks(cfg), len(m["seeds"])), style="dim")


# ------------------------------------------------------------------------------------ CLI


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    """Add ``dice experiment anomaly``."""
    import typer
    from rich.markup import escape

    from ..cli_support import (
        DATA_DIR_HELP,
        SET_HELP,
        console,
        fail,
        friendly,
        load_run_config,
        overwrite_option,
    )
    from ..folders import claim_folder, experiment_identity
    from ..report import write_report

    @experiment_app.command("anomaly")
    @friendly
    def anomaly_cmd(
        config: Path = typer.Argument(..., help="YAML config with an experiment: mapping."),
        out: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
        set_: list[str] = typer.Option(None, "--set", help=SET_HELP),
        data_dir: Path = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
        seeds: str = typer.Option(None, "--seeds", help="Comma-separated seeds, e.g. 0,1,2."),
        quiet: bool = typer.Option(False, "--quiet", "-q"),
        overwrite: bool = overwrite_option(),
    ) -> None:
        """Malicious-neighbour detection and self-healing with proximal influence."""
        cfg = load_run_config(config, set_, data_dir)
        parse_experiment(cfg)
        try:
            seed_list = [int(s) for s in seeds.split(",") if s.strip()] if seeds else None
        except ValueError:
            fail(f"--seeds {seeds!r}: give comma-separated integers, e.g. --seeds 0,1,2")
        claim_folder(out, "anomaly", experiment_identity("anomaly", cfg, seed_list),
                     overwrite=overwrite)
        m = run_experiment(
            cfg, out, seeds=seed_list, progress=not quiet, log=None if quiet else console.print
        )
        report = write_report(out, "anomaly")
        print_tables(m, cfg, console)
        console.print(f"run directory: [bold]{escape(str(out))}[/]; report: "
                      f"[bold]{escape(str(report))}[/]")
