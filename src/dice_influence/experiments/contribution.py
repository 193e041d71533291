"""Experiment: node contribution, rewards and free riders against leave-one-node-out and Shapley.

``dice experiment contribution CONFIG --out DIR [--set key=value ...] [--seeds 0,1,2]``

The config is a run config (data with per-node quality knobs, topology, model, train), with a
``contribution`` observer in ``observers:`` (added with defaults when missing) and an
``experiment:`` mapping validated by :class:`ContributionConfig` (attacks: free riders and
attackers; LOO, Shapley, reward and timing settings). Per seed:

1. **plain training** and **training with the contribution observer** (same seed, alternated
   ``timing.repeats`` times): the online overhead is their time ratio;
2. **leave-one-node-out**: ``n`` retrainings with one node's data weighted to zero (the node
   still relays), as one vectorized run with the factual network;
3. **Shapley** over nodes' data: stratified permutation sampling (``shapley.permutations``
   orders, truncation ``shapley.tolerance``), and exact Shapley when ``n ≤ 8``;
4. **rewards** (:func:`~dice_influence.apps.contribution.reward_split`) and the local
   **free-rider** rule, scored against the scenario's true roles.

Writes ``metrics.json`` (``contribution``: one record per node and seed; ``agreement`` (mean
over seeds) and ``agreement_worst``), ``contribution.csv``, plots and a README. Sign
everywhere: value = loss with the data − loss without it; negative = helpful.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .._util import atomic_write_text, csv_text, write_json
from ..apps.contribution import SIGN, reciprocity_factor, reward_split
from ..attacks import AttackPlan, AttackSpec, attack_transforms, with_data_attacks
from ..config import ConfigError, RunConfig, dump_config
from . import contribution_truth as truth
from ._common import (
    add_command,
    check_attacks,
    finish_run,
    mean_worst,
    parse_settings,
    register_report,
    run_seeds,
)

FREE_RIDER_KINDS = ("free_rider", "free_rider_noise")
SE_WIDEN = 1.2  # conservative: benchmarks/shapley-se.json measures 0.90 (0.47-1.47 per node)


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LooConfig(_S):
    """Leave-one-node-out ground truth."""

    enabled: bool = True


class ShapleyConfig(_S):
    """Shapley values over nodes' data (utility: mean test loss of all nodes at the end)."""

    permutations: int = Field(32, ge=0, description="sampled orders (0: skip); blocks of 2n")
    tolerance: float = Field(0.0, ge=0.0, description="TMC truncation (share of U(0)-U(N))")
    orderings: Literal["cyclic", "independent"] = Field(
        "cyclic", description="cyclic: the n cyclic shifts of one order and of its reverse per "
        "block of 2n (fewer retrainings, more accurate; its stratified standard error is "
        "widened by se_widen); independent: orders drawn independently (each with its "
        "reverse), standard error over those pairs (valid by construction)")
    se_widen: float = Field(SE_WIDEN, ge=1.0, allow_inf_nan=False,
                            description="factor on the cyclic design's stratified standard "
                            "error (benchmarks/shapley-se.json measures it)")
    exact: bool | None = Field(None, description="exact Shapley too (default: when n <= 8)")
    seed: int = Field(0, ge=0)


class RewardConfig(_S):
    """Reward split (docs/contribution.md)."""

    budget: float = Field(100.0, gt=0)
    clip: tuple[float, float] = Field(
        (0.5, 1.0), description="range of the reciprocity factor 2R/(1+R): the default only "
        "penalizes net takers")
    measure: Literal["adjoint", "proximal"] = Field(
        "adjoint", description="which contribution the reward follows")


class ContributionConfig(_S):
    """The ``experiment:`` mapping of a contribution config."""

    attacks: list[AttackSpec] = Field(default_factory=list)
    ground_truth: Literal["data", "node"] = Field(
        "data", description="the leave-one-node-out that `loo` and spearman_loo use: data = "
        "the node's data weighted to zero while it still relays (the value of its data); "
        "node = the node taken out of the graph, rows repaired by the one rule (its data and "
        "its relay role). Both are computed and reported")
    loo: LooConfig = LooConfig()
    shapley: ShapleyConfig = ShapleyConfig()
    reward: RewardConfig = RewardConfig()
    timing_repeats: int = Field(3, ge=1, description="plain / measured runs, alternated")
    ablation: list[dict[str, Any]] = Field(
        default_factory=lambda: [{"curvature": "none"}, {"horizon": "window", "window": 10}],
        description="contribution-observer settings overriding the config's, each scored "
        "against LOO in one extra training run (spearman_loo_<key>_<value>)")
    max_nodes: int = Field(1024, ge=1, description="nodes per vectorized retraining run")
    plots: bool = True


def parse_experiment(cfg: RunConfig) -> ContributionConfig:
    """Validate ``cfg.experiment``; raise :class:`ConfigError` naming the bad key."""
    ex = parse_settings(ContributionConfig, cfg)
    n = cfg.topology.n
    check_attacks(ex.attacks, n)
    if cfg.train.weight_decay:
        raise ConfigError("train.weight_decay must be 0: the leave-one-node-out and Shapley "
                          "retrainings weight a node's data to zero by zeroing its update")
    if cfg.aggregator is not None:
        raise ConfigError("remove the aggregator: section: contribution needs the W^t matmul")
    if ex.shapley.exact and n > 12:
        raise ConfigError(f"experiment.shapley.exact needs n <= 12 (2^n retrainings); "
                          f"topology.n={n}")
    from ..plugins import parse

    for i, over in enumerate(ex.ablation):
        try:
            parse("observer", {**_observer_raw(cfg), **over, "kind": "contribution"},
                  f"experiment.ablation.{i}")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    lo, hi = ex.reward.clip
    if not 0 < lo <= 1 <= hi:
        raise ConfigError(f"experiment.reward.clip={list(ex.reward.clip)} must satisfy "
                          "0 < low <= 1 <= high")
    return ex


def _observer_raw(cfg: RunConfig) -> dict[str, Any]:
    return next((o for o in cfg.observers if o.get("kind") == "contribution"),
                {"kind": "contribution"})


def ablation_name(over: dict[str, Any]) -> str:
    """``{"curvature": "none"}`` → ``curvature_none``."""
    return "_".join(f"{k}_{v}" for k, v in over.items())


def _ablation(cfg: RunConfig, ex: ContributionConfig, problem: Any,
              progress: bool = False) -> dict[str, np.ndarray]:
    """Contribution (b) of each ablation variant, all observed in one extra training run
    (``progress``: a bar over its rounds)."""
    from .._util import progress_bar
    from ..loop import Loop
    from ..plugins import BuildContext, Plugins, parse

    if not ex.ablation:
        return {}
    from ..apps.contribution import from_settings

    ctx = BuildContext(n=problem.n, problem=problem, plugins=Plugins())
    obs = {ablation_name(o): from_settings(parse("observer", {**_observer_raw(cfg), **o,
                                                              "kind": "contribution"},
                                                 "ablation"), ctx) for o in ex.ablation}
    for o in obs.values():
        o.progress = progress  # its end-of-run sweeps announce themselves too
    theta = problem.init_theta()
    with progress_bar(progress, cfg.train.rounds, "ablation run") as advance:
        Loop(problem, list(obs.values())).run(theta, problem.opt.init_state(theta), 0,
                                              cfg.train.rounds, on_round=lambda *_: advance())
    return {k: o.measures()["adjoint"] for k, o in obs.items()}


def with_contribution_observer(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a ``contribution`` observer (default settings) when it has none."""
    if any(o.get("kind") == "contribution" for o in cfg.observers):
        return cfg
    return cfg.model_copy(update={"observers": [*cfg.observers, {"kind": "contribution"}]})


# ------------------------------------------------------------------------------------ roles


def scenario_roles(cfg: RunConfig, plan: AttackPlan) -> list[dict[str, Any]]:
    """Each node's true role from the config: ``noise`` (share of random labels), ``size``
    multiplier, ``duplicate_of``, ``role`` (``honest`` | ``duplicate`` | ``free_rider`` |
    ``attacker``). Honest and duplicate nodes train honestly on their own data."""
    n = cfg.topology.n
    dc = cfg.data
    noise = np.zeros(n)
    for c in dc.corruptions:
        if c.kind == "random_labels":
            noise[list(c.nodes)] += c.fraction
    size = np.ones(n) if dc.size_multipliers is None else np.asarray(dc.size_multipliers, float)
    free = {k for s, ks in zip(plan.specs, plan.nodes, strict=True) if s.kind in FREE_RIDER_KINDS
            for k in ks}
    bad = {k for s, ks in zip(plan.specs, plan.nodes, strict=True)
           if s.kind not in FREE_RIDER_KINDS for k in ks}
    bad |= {k for c in dc.corruptions if c.kind != "random_labels" for k in c.nodes}
    out = []
    for k in range(n):
        src = dc.duplicate_of.get(k)
        role = ("attacker" if k in bad else "free_rider" if k in free
                else "duplicate" if src is not None else "honest")
        q_src = src if src is not None else k
        out.append({"node": k, "role": role, "noise": float(noise[q_src]),
                    "size": float(size[q_src]), "duplicate_of": src})
    return out


def quality_score(roles: list[dict[str, Any]]) -> np.ndarray:
    """The true quality order of nodes that train honestly (NaN for the others): less label
    noise first, then more data (the scenario grades both together); a duplicate has its
    source's quality."""
    return np.array([(1.0 - r["noise"]) * 1000.0 + r["size"]
                     if r["role"] in ("honest", "duplicate") else np.nan for r in roles])


# ------------------------------------------------------------------------------------ one seed


def build_scenario(cfg: RunConfig, ex: ContributionConfig) -> tuple[Any, AttackPlan]:
    """The run's problem with data-level attacks and update-level transforms, and the plan."""
    from ..simulator import build_problem

    plan = AttackPlan.resolve(ex.attacks, cfg.topology.n, cfg.seed)
    problem = build_problem(with_data_attacks(cfg, plan))
    problem = dataclasses.replace(problem, transforms=problem.transforms
                                  + attack_transforms(plan))
    return problem, plan


def _timed_runs(cfg: RunConfig, problem: Any, repeats: int,
                log: Any = None) -> tuple[Any, dict[str, Any]]:
    """Plain training and training with the config's plug-ins, alternated ``repeats`` times on
    the same seed after a short warm-up of both (first calls of torch.func compile; ``log``: a
    line per repeat). Times are wall-clock and CPU (``process_time``: this process's threads
    only, so other jobs on a shared machine distort it less); the overhead is the ratio of the
    fastest CPU times. Returns the last measured run's contribution observer and the times."""
    from ..apps.contribution import ContributionObserver
    from ..loop import Loop
    from ..plugins import build

    rounds = cfg.train.rounds
    theta0 = problem.init_theta()
    state0 = problem.opt.init_state(theta0)
    warm = ContributionObserver(problem.n, problem, rounds=2)
    Loop(problem, [warm]).run(theta0, state0, 0, 2)
    wall: dict[str, list[float]] = {"plain": [], "measured": []}
    cpu: dict[str, list[float]] = {"plain": [], "measured": []}
    obs = None
    for i in range(repeats):
        if log is not None:
            log(f"    timing {i + 1}/{repeats}: plain, then with the observer")
        for arm in ("plain", "measured"):
            plugins = build(cfg, problem) if arm == "measured" else None
            loop = Loop(problem) if plugins is None else Loop.from_plugins(problem, plugins)
            w0, c0 = time.perf_counter(), time.process_time()
            theta, _ = loop.run(theta0, state0, 0, rounds)
            wall[arm].append(time.perf_counter() - w0)
            cpu[arm].append(time.process_time() - c0)
            if plugins is None:
                th_plain = theta
            else:
                th_meas, obs = theta, plugins.find("contribution")
    ratios = [m / p for m, p in zip(cpu["measured"], cpu["plain"], strict=True)]
    wall_ratios = [m / p for m, p in zip(wall["measured"], wall["plain"], strict=True)]
    return obs, {"plain_seconds": wall["plain"], "measured_seconds": wall["measured"],
                 "plain_cpu_seconds": cpu["plain"], "measured_cpu_seconds": cpu["measured"],
                 "ratios": ratios, "wall_ratios": wall_ratios,
                 "observer_seconds": dict(obs.seconds), "passive": bool(torch.equal(
                     th_plain, th_meas)), "final": problem.evaluate(th_plain)}


def _spearman(a: Any, b: Any) -> float | None:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, float), np.asarray(b, float)
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return None
    return float(spearmanr(a[ok], b[ok])[0])


def run_seed(cfg: RunConfig, ex: ContributionConfig, *, log: Any = None,
             progress: bool = False) -> dict[str, Any]:
    """Everything for one seed; returns per-node records, agreement metrics and raw arrays."""
    cfg = with_contribution_observer(cfg)
    problem, plan = build_scenario(cfg, ex)
    n, rounds = problem.n, cfg.train.rounds
    say = log or (lambda *_: None)
    say(f"  seed {cfg.seed}: timing {rounds} rounds of {n} nodes, plain and with the "
        f"contribution observer, alternated {ex.timing_repeats} times")
    obs, timing = _timed_runs(cfg, problem, ex.timing_repeats, log=say)
    say(f"  seed {cfg.seed}: training {min(timing['plain_seconds']):.3f} s plain, "
        f"{min(timing['measured_seconds']):.3f} s measured (fastest of {ex.timing_repeats})")
    m = obs.measures()
    roles = scenario_roles(cfg, plan)
    if ex.ablation:
        say(f"  seed {cfg.seed}: ablation: {len(ex.ablation)} observer variants "
            f"({', '.join(ablation_name(o) for o in ex.ablation)}) in one more training run")
    ablation = _ablation(cfg, ex, problem, progress=progress)
    if ex.loo.enabled:
        say(f"  seed {cfg.seed}: leave-one-node-out: {len(truth.REMOVALS)} x {n} retrainings "
            f"of {rounds} rounds ({', '.join(truth.REMOVALS)} removal)")
    loos = {rm: truth.leave_one_out(problem, rounds, max_nodes=ex.max_nodes,
                                    progress=progress, removal=rm)
            for rm in truth.REMOVALS} if ex.loo.enabled else {}
    loo = loos.get(ex.ground_truth)
    for rm, lo in loos.items():
        say(f"  seed {cfg.seed}: leave-one-node-out ({rm} removal) {lo['retrainings']} "
            f"retrainings, {lo['seconds']:.1f} s wall ({lo['cpu_seconds']:.1f} s CPU)")
    sh, exact = None, None
    if ex.shapley.permutations > 0 or ex.shapley.exact:
        util = truth.network_utility(problem, rounds, max_nodes=ex.max_nodes, progress=progress)
        if ex.shapley.permutations > 0:
            t0, c0 = time.perf_counter(), time.process_time()
            sh = truth.shapley_permutations(util, n, ex.shapley.permutations,
                                            seed=ex.shapley.seed + cfg.seed,
                                            tolerance=ex.shapley.tolerance,
                                            orderings=ex.shapley.orderings,
                                            se_widen=ex.shapley.se_widen)
            sh["seconds"] = time.perf_counter() - t0
            sh["cpu_seconds"] = time.process_time() - c0
            say(f"  seed {cfg.seed}: Shapley {sh['evaluations']} retrainings, "
                f"{sh['seconds']:.1f} s wall ({sh['cpu_seconds']:.1f} s CPU)")
        if ex.shapley.exact or (ex.shapley.exact is None and n <= 8):
            t0 = time.perf_counter()
            exact = {"phi": truth.shapley_exact(util, n), "seconds": 0.0}
            exact["seconds"] = time.perf_counter() - t0
    measure = m["adjoint"] if ex.reward.measure == "adjoint" and m["adjoint"] is not None \
        else m["proximal_out"]
    fr = np.asarray(m["free_rider"], dtype=bool)
    reward = reward_split(measure, m["proximal_out"], m["proximal_in"], budget=ex.reward.budget,
                          excluded=fr, clip=tuple(ex.reward.clip))
    rho = reciprocity_factor(m["proximal_out"], m["proximal_in"], tuple(ex.reward.clip))
    records = []
    quality = quality_score(roles)
    for k in range(n):
        rec = {**roles[k], "quality": None if math.isnan(quality[k]) else float(quality[k]),
               "contribution": float(measure[k]),
               "proximal_out": float(m["proximal_out"][k]),
               "proximal_in": float(m["proximal_in"][k]),
               "reciprocity": _f(m["reciprocity"][k]),
               "adjoint": None if m["adjoint"] is None else float(m["adjoint"][k]),
               "loo": None if loo is None else float(loo["loo"][k]),
               "loo_data": float(loos["data"]["loo"][k]) if loos else None,
               "loo_node": float(loos["node"]["loo"][k]) if loos else None,
               "loo_all": None if loo is None else float(loo["loo_all"][k]),
               "loo_acc": None if loo is None else float(loo["loo_acc"][k]),
               "shapley": None if sh is None else float(sh["phi"][k]),
               "shapley_se": None if sh is None else float(sh["se"][k]),
               "shapley_exact": None if exact is None else float(exact["phi"][k]),
               "reciprocity_factor": float(rho[k]),
               "reward": float(reward[k]), "free_rider_flag": bool(fr[k]),
               "free_rider_votes": float(m["free_rider_votes"][k]),
               "harmful_flag": bool(measure[k] > 0)}
        records.append(rec)
    agreement = _agreement(records, measure, loo, sh, exact, timing, obs, ex.reward.budget)
    if loo is not None:
        for name, vals in ablation.items():
            agreement[f"spearman_loo_{name}"] = _spearman(vals, loo["loo"])
        for rm, lo in loos.items():  # agreement with both ground truths, and between them
            agreement[f"spearman_loo_{rm}"] = _spearman(measure, lo["loo"])
            agreement[f"spearman_loo_{rm}_proximal"] = _spearman(m["proximal_out"], lo["loo"])
        agreement["spearman_loo_data_vs_node"] = _spearman(loos["data"]["loo"],
                                                           loos["node"]["loo"])
    return {"seed": cfg.seed, "records": records, "agreement": agreement, "timing": timing,
            "shapley": None if sh is None else {k: v for k, v in sh.items() if k != "phi"},
            "loo": None if loo is None else {"seconds": loo["seconds"],
                                             "cpu_seconds": loo["cpu_seconds"],
                                             "retrainings": loo["retrainings"],
                                             "networks_per_run": loo["networks_per_run"],
                                             "ground_truth": ex.ground_truth,
                                             "seconds_by_removal": {
                                                 rm: lo["seconds"] for rm, lo in loos.items()}},
            "summary": obs.summary()}


def _f(v: Any) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _agreement(records: list[dict[str, Any]], c: np.ndarray, loo: Any, sh: Any, exact: Any,
               timing: dict[str, Any], obs: Any, budget: float) -> dict[str, Any]:
    role = np.array([r["role"] for r in records])
    honest = np.isin(role, ("honest", "duplicate"))
    behaving = role != "attacker"
    free = role == "free_rider"
    q = np.array([np.nan if r["quality"] is None else r["quality"] for r in records])
    flags = np.array([r["free_rider_flag"] for r in records])
    reward = np.array([r["reward"] for r in records])
    out: dict[str, Any] = {}
    if loo is not None:
        L = loo["loo"]
        out["spearman_loo"] = _spearman(c, L)
        out["spearman_loo_honest"] = _spearman(c[honest], L[honest])
        ref = loo["loo_all"] if not obs.exclude_self else L
        out["first_order_ratio"] = float(np.sum(c * ref) / np.sum(ref * ref))
        out["spearman_loo_proximal"] = _spearman(
            [r["proximal_out"] for r in records], L)
    out["spearman_quality"] = _spearman(-c[honest], q[honest])
    if sh is not None:
        out["spearman_shapley"] = _spearman(c, sh["phi"])
        if loo is not None:
            out["spearman_loo_shapley"] = _spearman(loo["loo"], sh["phi"])
        out["shapley_se_mean"] = float(np.mean(sh["se"]))
    if exact is not None and sh is not None:
        out["shapley_sampler_max_error"] = float(np.max(np.abs(sh["phi"] - exact["phi"])))
    out["free_riders_last"] = out["free_riders_last_among_helpful"] = None
    if free.any() and (behaving & ~free).any():
        others = behaving & ~free
        out["free_riders_last"] = bool(c[free].min() > c[others].max())
        if loo is not None:  # ... below every honest-behaving node the truth calls helpful
            helpful = others & (loo["loo"] < 0)
            out["free_riders_last_among_helpful"] = bool(c[free].min() > c[helpful].max()) \
                if helpful.any() else None
    tp = int((flags & free).sum())
    out["free_rider_precision"] = tp / int(flags.sum()) if flags.any() else (
        None if not free.any() else 0.0)
    out["free_rider_recall"] = tp / int(free.sum()) if free.any() else None
    out["attacker_reward"] = float(reward[role == "attacker"].sum() / budget) \
        if (role == "attacker").any() else None
    # other jobs only ever add time: the fastest of the alternated repeats is the estimate.
    # Every *_seconds is wall time (CPU times: *_cpu_seconds); loo_over_plain is wall / wall;
    # online_overhead is the CPU ratio, online_overhead_wall the wall ratio
    plain_cpu, meas_cpu = min(timing["plain_cpu_seconds"]), min(timing["measured_cpu_seconds"])
    plain, meas = min(timing["plain_seconds"]), min(timing["measured_seconds"])
    out["online_overhead"] = float(meas_cpu / plain_cpu)  # CPU: steadier on a shared machine
    out["online_overhead_wall"] = float(meas / plain)
    out["plain_seconds"], out["measured_seconds"] = float(plain), float(meas)
    out["plain_cpu_seconds"], out["measured_cpu_seconds"] = float(plain_cpu), float(meas_cpu)
    out["sweep_share"] = float(timing["observer_seconds"]["sweep"] / max(meas, 1e-9))
    if loo is not None:
        out["loo_seconds"] = float(loo["seconds"])
        out["loo_cpu_seconds"] = float(loo["cpu_seconds"])
        out["loo_over_plain"] = float(loo["seconds"] / plain)
    if sh is not None:
        out["shapley_seconds"] = float(sh["seconds"])
        out["shapley_cpu_seconds"] = float(sh["cpu_seconds"])
        out["shapley_evaluations"] = int(sh["evaluations"])
    return out


# ------------------------------------------------------------------------------------ aggregate

_WORST_MAX = ("attacker_reward", "online_overhead", "online_overhead_wall", "plain_seconds",
              "measured_seconds", "plain_cpu_seconds", "measured_cpu_seconds", "loo_seconds",
              "loo_cpu_seconds", "loo_over_plain", "shapley_seconds", "shapley_cpu_seconds",
              "shapley_evaluations", "shapley_se_mean", "shapley_sampler_max_error")


def aggregate(per_seed: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Mean and worst over seeds of every agreement entry (worst = max for costs, errors and
    the attacker's reward, min otherwise; booleans: share true / all true; None if missing)."""
    mean: dict[str, Any] = {}
    worst: dict[str, Any] = {}
    for k in per_seed[0]["agreement"]:
        vals = [r["agreement"].get(k) for r in per_seed]
        if any(v is None for v in vals):
            mean[k] = worst[k] = None
        elif all(isinstance(v, bool) for v in vals):
            mean[k], worst[k] = float(np.mean(vals)), all(vals)
        else:
            mean[k], worst[k] = mean_worst(vals, "max" if k in _WORST_MAX else "min")
    return mean, worst


def run_experiment(cfg: RunConfig, out: str | Path, *, seeds: list[int] | None = None,
                   progress: bool = False, log: Any = None) -> dict[str, Any]:
    """Every seed; write the run directory (with ``report.html``); return ``metrics``.
    ``progress``: bars over the leave-one-node-out and Shapley retrainings."""
    from .contribution_report import plots, readme

    ex = parse_experiment(cfg)
    out, seeds, per_seed = run_seeds(cfg, ex, run_seed, out, seeds, log, progress=progress)
    mean, worst = aggregate(per_seed)
    metrics: dict[str, Any] = {
        "kind": "contribution",
        "sign_convention": SIGN,
        "seeds": seeds,
        "n_nodes": cfg.topology.n,
        "rounds": cfg.train.rounds,
        "contribution": [{"seed": r["seed"], **rec} for r in per_seed for rec in r["records"]],
        "agreement": mean,
        "agreement_worst": worst,
        "per_seed": [{"seed": r["seed"], "agreement": r["agreement"], "timing": r["timing"],
                      "loo": r["loo"], "shapley": r["shapley"]} for r in per_seed],
        "observer": {k: per_seed[0]["summary"][k] for k in ("settings", "sign", "units")},
        "reward_rule": {"budget": ex.reward.budget, "clip": list(ex.reward.clip),
                        "measure": ex.reward.measure},
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "ledger.json", {str(r["seed"]): r["summary"] for r in per_seed})
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    atomic_write_text(out / "contribution.csv", csv_text(metrics["contribution"]))
    if ex.plots:
        plots(per_seed[0], out, ex.reward.budget)
    atomic_write_text(out / "README.md", readme(cfg, metrics))
    finish_run(out, "contribution")
    return metrics


# ------------------------------------------------------------------------------------ CLI


def _tables(m: dict[str, Any]) -> str:
    from .contribution_report import markdown_table, node_table

    return markdown_table(m) + "\n\n" + node_table(m, m["seeds"][0])


register_report(
    "contribution", "Node contribution, rewards and free riders",
    "Each node's contribution is measured from the training run itself: (a) the proximal "
    "influence its updates had on its receivers, (b) the first-order influence (DICE-E, one "
    "reverse sweep) of all its data on the network's test loss at the end of the run. They are "
    "checked against leave-one-node-out retraining and Shapley values over nodes' data; "
    "rewards split a budget by measured helpful contribution, adjusted by reciprocity. "
    "Negative = helpful. The second table is the first seed's nodes.",
    _tables,
    [("rewards.png", "Reward per node, bars coloured by the node's true data quality (role "
      "and label noise); free riders and the attacker should get nothing."),
     ("contribution_vs_loo.png", "One dot per node: measured contribution (b) against "
      "leave-one-node-out truth; a rising line = the measurement ranks nodes like the truth "
      "(negative = helpful)."),
     ("reciprocity.png", "The proximal-influence ledger P[k][j]: what sender j's updates did "
      "to receiver k's test loss (blue = helpful, red = harmful), and each node's reciprocity "
      "(outflow / inflow).")])


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    """Add ``dice experiment contribution``."""
    from .contribution_report import console_tables

    add_command(experiment_app, "contribution",
                "Node contribution, rewards and free riders against LOO and Shapley truth.",
                run_experiment, console_tables, parse_experiment)
