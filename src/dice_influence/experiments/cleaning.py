"""Experiment: find the bad data anywhere in the network (whole-run sample attribution).

``dice experiment cleaning CONFIG --out DIR [--set key=value ...] [--seeds 0,1,2]``

For every scenario of ``experiment.scenarios`` (corruptions added to the run config's data:
labels flipped on some nodes, everywhere, or one node's images drowned in noise) and every seed,
the run is trained once and every training sample of every node is ranked by harmfulness by
five methods on the same run:

- ``dice``: whole-run DICE-E (:func:`~dice_influence.influence.attribute_run`): one reverse
  sweep, target = all nodes' mean test loss at the end, summed over the sample's draws;
- ``loss``: the sample's loss (with the label it was trained on) under its node's final model;
- ``self_influence``: TracIn's self term, ``Σ_c η ‖∇ℓ_i(θ_k^c)‖²`` over the run's checkpoints
  ``c`` (the local term only: no gossip, no test set);
- ``random``: a seeded random ranking;
- ``window``: the one-hop window attribution (``attribute(target="hops", hops=1)``, the paper's
  Prop. 1 value of every draw) summed over the sample's draws.

Detection: AUROC and precision@k (k = the number of corrupted samples) for the corrupted
samples. Fidelity: whole-run DICE-GT by exact replay (the sample removed from every round that
drew it) against ``dice`` for ``fidelity_samples`` random samples: Pearson, Spearman, sign
agreement. Retraining: the top-k (k = 1 %, 5 %, 10 % of the network's samples) of each method
removed and the run retrained (the exact replay machinery, batched: same initialisation and
batches, each batch's loss averaged over the samples it keeps) and the test accuracy and test
loss (mean over nodes, on test samples outside the validation set the target reads) compared
with the run trained on clean data; ``fraction_recovered = (after − corrupted) / (clean −
corrupted)`` of the seed means, for accuracy and (``loss_fraction_recovered``) for loss.
Sign: score = test loss with the sample − without it; positive = harmful.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .._util import atomic_write_text, write_json
from ..config import ConfigError, CorruptionConfig, RunConfig, dump_config
from ._common import SIGN, add_command, finish_run, mean_worst, parse_settings
from .cleaning_report import METHODS, _f, _plot_samples, _write_scores, table


class _S(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Scenario(_S):
    """One corruption scenario: its name and the corruptions added to ``data.corruptions``."""

    name: str
    corruptions: list[CorruptionConfig]


def _default_scenarios() -> list[Scenario]:
    return [
        Scenario(name="flip-4-nodes", corruptions=[CorruptionConfig(
            kind="label_flip", nodes=[0, 1, 2, 3], fraction=0.1)]),
        Scenario(name="flip-everywhere", corruptions=[CorruptionConfig(
            kind="label_flip", nodes=list(range(16)), fraction=0.05)]),
        Scenario(name="noisy-node", corruptions=[CorruptionConfig(
            kind="gaussian_noise", nodes=[0], fraction=0.5, sigma=3.0)]),
        # targeted poisoning: half of every node's 3s labelled 8 (only changed labels count)
        Scenario(name="poison-3-as-8", corruptions=[CorruptionConfig(
            kind="label_flip", nodes=list(range(16)), fraction=0.5,
            permutation=[0, 1, 2, 8, 4, 5, 6, 7, 8, 9])]),
        # injected poison: mislabelled copies (8) of the same 3s added, the clean data kept
        Scenario(name="inject-3-as-8", corruptions=[CorruptionConfig(
            kind="inject_flip", nodes=list(range(16)), fraction=0.5,
            permutation=[0, 1, 2, 8, 4, 5, 6, 7, 8, 9])]),
    ]


class CleaningConfig(_S):
    """The ``experiment:`` mapping of a cleaning config."""

    scenarios: list[Scenario] = Field(default_factory=_default_scenarios)
    only: list[str] | None = Field(
        None, description="run only the scenarios of these names (each keeps its place in "
                          "scenarios for fidelity_scenarios); default: all")
    fidelity_samples: int = Field(30, ge=0, description="samples replayed exactly (0: skip)")
    fidelity_scenarios: int = Field(1, ge=0, description="first N scenarios get the check")
    removal_fractions: list[float] = [0.01, 0.05, 0.10]
    baselines_retrained_at: list[float] | None = Field(
        None, description="fractions at which the baselines' top-k are retrained too "
                          "(default: every removal fraction; dice always at every one)")
    window: int = Field(10, ge=1, description="rounds per window of the window baseline")
    batch_replays: int = Field(32, ge=1, description="exact replays run together")
    images: int = Field(8, ge=1, le=32, description="samples pictured per direction")
    lowest_corrupted: int = Field(
        10, ge=1, description="the corrupted samples dice scores lowest, replayed exactly "
                              "(in the scenarios with the fidelity check)")


def parse_experiment(cfg: RunConfig) -> CleaningConfig:
    ex = parse_settings(CleaningConfig, cfg)
    if not ex.scenarios:
        raise ConfigError("experiment.scenarios is empty; give at least one scenario")
    names = [s.name for s in ex.scenarios]
    if len(set(names)) != len(names):
        raise ConfigError(f"experiment.scenarios: names must differ, got {names}")
    unknown = [s for s in ex.only or [] if s not in names]
    if unknown or ex.only == []:
        raise ConfigError(f"experiment.only: {unknown or '[]'} names no scenario; choose among "
                          f"{names}")
    for s in ex.scenarios:
        for c in s.corruptions:
            bad = [k for k in c.nodes if not 0 <= k < cfg.topology.n]
            if bad:
                raise ConfigError(f"experiment.scenarios[{s.name}]: node ids {bad} out of range "
                                  f"0..{cfg.topology.n - 1}")
    for f in ex.removal_fractions:
        if not 0 < f < 1:
            raise ConfigError(f"experiment.removal_fractions: {f} must be in (0, 1)")
    extra = [f for f in ex.baselines_retrained_at or [] if f not in ex.removal_fractions]
    if extra:
        raise ConfigError(f"experiment.baselines_retrained_at: {extra} are not among "
                          f"removal_fractions {ex.removal_fractions}")
    return ex


# ------------------------------------------------------------------------------ baselines


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` flags (ties count half);
    None when one class is empty."""
    from scipy.stats import rankdata

    pos = np.asarray(positive, dtype=bool)
    npos, nneg = int(pos.sum()), int((~pos).sum())
    if npos == 0 or nneg == 0:
        return None
    r = rankdata(scores)
    return float((r[pos].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def precision_at(scores: np.ndarray, positive: np.ndarray, k: int) -> float | None:
    """Fraction of corrupted samples among the ``k`` highest scores (stable order)."""
    if k <= 0:
        return None
    top = np.argsort(-scores, kind="stable")[:k]
    return float(np.asarray(positive, dtype=bool)[top].mean())


def loss_scores(p: Any, theta: torch.Tensor, node: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Each sample's loss (label as trained) under its node's model ``theta`` (n, d)."""
    from torch.func import functional_call, vmap

    from ..gossip import _param_views

    nd = p.node_data

    def f(prm, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(p.fm.module, prm, (xb,)), yb,
                                                 reduction="none")

    with torch.no_grad():
        ls = vmap(f)(_param_views(p.fm, theta), nd.x, nd.y)
    return ls.double().cpu().numpy()[node, pos]


def self_influence_scores(traj: Any, node: np.ndarray, pos: np.ndarray,
                          chunk: int = 16) -> np.ndarray:
    """TracIn self-influence ``Σ_c η_c ‖∇ℓ_i(θ_k^c)‖²`` over the run's checkpoints ``c < T``."""
    from torch.func import functional_call, grad, vmap

    from ..gossip import _param_views

    p = traj.problem
    nd = p.node_data
    module = p.fm.module

    def one(prm, xb, yb):
        return torch.nn.functional.cross_entropy(
            functional_call(module, prm, (xb[None],)), yb[None])

    def sqnorm(prm, xb, yb):
        g = grad(one)(prm, xb, yb)
        return sum((v ** 2).sum() for v in g.values())

    per_node = vmap(vmap(sqnorm, in_dims=(None, 0, 0)), in_dims=(0, 0, 0))
    total = torch.zeros(nd.y.shape, dtype=torch.float64)
    cks = sorted(c for c in traj.checkpoints if c < traj.rounds_done)
    with torch.no_grad():
        for c in cks:
            prm = _param_views(p.fm, traj.checkpoints[c][0])
            for a in range(0, nd.max_size, chunk):
                s = per_node(prm, nd.x[:, a : a + chunk], nd.y[:, a : a + chunk])
                total[:, a : a + chunk] += traj.lr(c) * s.double().cpu()
    return total.numpy()[node, pos]


def window_scores(traj: Any, window: int, node: np.ndarray, pos: np.ndarray,
                  progress: bool = False) -> np.ndarray:
    """One-hop window attribution of every draw (``attribute(target="hops", hops=1)``,
    windows of ``window`` rounds), summed over each sample's draws (``progress``: a bar over
    the windows)."""
    from .._util import progress_bar
    from ..influence.adjoint import attribute

    p = traj.problem
    n, m = p.n, p.node_data.max_size
    total = torch.zeros(n * m, dtype=torch.float64)
    base = (torch.arange(n) * m)[:, None]
    T = traj.rounds_done
    starts = range(0, T - 1, window)
    with progress_bar(progress, len(starts), "window attribution") as advance:
        for t0 in starts:
            t1 = min(t0 + window, T - 1)
            a = attribute(traj, (t0, t1), target="hops", hops=1)
            for i, r in enumerate(a.rounds):
                flat = (base + p.batches.indices(r)).reshape(-1)
                total.index_add_(0, flat, a.scores[i].reshape(-1))
            advance()
    return total.reshape(n, m).numpy()[node, pos]


# ------------------------------------------------------------------------------ one run


def _scenario_cfg(cfg: RunConfig, sc: Scenario | None) -> RunConfig:
    raw = cfg.model_dump(mode="json")
    raw["experiment"] = {}
    raw["data"]["corruptions"] = [] if sc is None else [c.model_dump(mode="json")
                                                        for c in sc.corruptions]
    from ..config import load_config

    return load_config(raw)


def _eval_set(p: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Test samples outside the validation set that the target reads (the validation set
    itself when the test split has no others)."""
    ds = p.dataset
    nval = p.val_y.shape[0]
    if ds.y_test.shape[0] > nval:
        return (ds.x_test[nval:].to(device=p.device, dtype=p.dtype), ds.y_test[nval:].to(p.device),
                f"test samples {nval}..{ds.y_test.shape[0] - 1} (not read by the target)")
    return p.val_x, p.val_y, "the validation set (the test split has no other samples)"


def _accuracy(p: Any, thetas: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean test accuracy and mean test loss over nodes of stacked networks ``(R, n, d)``
    -> ``(R, 2)`` (column 0 accuracy, column 1 cross-entropy)."""
    from ..gossip import node_losses

    R, n, d = thetas.shape
    with torch.no_grad():
        loss, acc = node_losses(p.fm, thetas.reshape(R * n, d), x, y)
    return torch.stack([acc.reshape(R, n).double().mean(1),
                        loss.reshape(R, n).double().mean(1)], 1)


def run_scenario(cfg: RunConfig, ex: CleaningConfig, sc: Scenario, *, fidelity: bool,
                 clean: tuple[float, float], log: Any = None, progress: bool = False) -> dict[str, Any]:
    """Train ``cfg`` with ``sc``'s corruptions; rank, check fidelity, retrain (module doc)."""
    from scipy import stats

    from ..influence import attribute_run, whole_run_ground_truth
    from ..influence.wholerun import replay_without
    from ..simulator import train

    say = log or (lambda _m: None)
    scfg = _scenario_cfg(cfg, sc)
    t = time.perf_counter()
    traj = train(scfg, progress=progress)
    t_train = time.perf_counter() - t
    p = traj.problem
    t = time.perf_counter()
    dice = attribute_run(traj, progress=progress)
    t_sweep = time.perf_counter() - t
    node, pos, bad = dice.node, dice.position, dice.corrupted
    theta_T = traj.params_at(traj.rounds_done)[0]
    say("    baselines: per-sample loss at the end, self-influence over the run ...")
    scores = {"dice": dice.score, "loss": loss_scores(p, theta_T, node, pos),
              "self_influence": self_influence_scores(traj, node, pos),
              "random": np.random.default_rng([cfg.seed, 0xC1EA]).random(len(dice))}
    say(f"    baselines: one-hop window attribution, windows of {ex.window} rounds ...")
    scores["window"] = window_scores(traj, ex.window, node, pos, progress=progress)
    kk = int(bad.sum())
    detection = {m: {"auroc": auroc(s, bad), "precision_at_k": precision_at(s, bad, kk)}
                 for m, s in scores.items()}
    say(f"    {sc.name}: trained {t_train:.1f} s, sweep {t_sweep:.1f} s; AUROC "
        + ", ".join(f"{m} {_f(d['auroc'])}" for m, d in detection.items()))
    fid = None
    if fidelity and ex.fidelity_samples:
        rng = np.random.default_rng([cfg.seed, 0xF1D])
        pick = rng.choice(np.flatnonzero(dice.rounds_used > 0),
                          min(ex.fidelity_samples, int((dice.rounds_used > 0).sum())),
                          replace=False)
        gt = whole_run_ground_truth(traj, [(int(node[i]), int(pos[i])) for i in pick],
                                    chunk=ex.batch_replays, progress=progress)
        est = dice.score[pick]
        fid = {"pearson": float(stats.pearsonr(est, gt)[0]),
               "spearman": float(stats.spearmanr(est, gt)[0]),
               "sign_agreement": float(np.mean(np.sign(est) == np.sign(gt))),
               "samples": [{"node": int(node[i]), "position": int(pos[i]), "dice": float(e),
                            "gt": float(g)} for i, e, g in zip(pick, est, gt, strict=True)]}
        say(f"    fidelity vs exact replay ({len(pick)} samples): Pearson "
            f"{fid['pearson']:.3f}, Spearman {fid['spearman']:.3f}, sign "
            f"{fid['sign_agreement']:.2f}")
    # the corrupted samples dice ranks as least harmful, replayed exactly: are they missed by
    # the estimate, or is their removal truly no help to the test loss?
    lowest = None
    drawn_bad = np.flatnonzero(bad & (dice.rounds_used > 0))
    if fidelity and ex.fidelity_samples and len(drawn_bad):
        low = drawn_bad[np.argsort(dice.score[drawn_bad], kind="stable")[:ex.lowest_corrupted]]
        gt_low = whole_run_ground_truth(traj, [(int(node[i]), int(pos[i])) for i in low],
                                        chunk=ex.batch_replays, progress=progress)
        lowest = {"samples": len(low), "dice": dice.score[low].tolist(), "gt": gt_low.tolist(),
                  "dice_helpful_fraction": float(np.mean(dice.score[low] < 0)),
                  "gt_helpful_fraction": float(np.mean(gt_low < 0))}
        say(f"    the {len(low)} corrupted samples dice scores lowest: exact replay finds "
            f"{np.mean(gt_low < 0):.0%} of them helpful (dice: "
            f"{np.mean(dice.score[low] < 0):.0%})")
    # retraining without the top-k of each method (and without exactly the corrupted ones)
    N, n, m = len(dice), p.n, p.node_data.max_size
    masks, keys = [], []
    for f in ex.removal_fractions:
        k = max(1, int(round(f * N)))
        for meth, s in scores.items():
            if meth != "dice" and not _baseline_at(ex, f):
                continue
            top = np.argsort(-s, kind="stable")[:k]
            mk = torch.zeros(n, m, dtype=torch.bool)
            mk[node[top], pos[top]] = True
            masks.append(mk)
            keys.append((f, meth))
    oracle = torch.zeros(n, m, dtype=torch.bool)
    oracle[node[bad], pos[bad]] = True
    masks.append(oracle)
    xe, ye, _ = _eval_set(p)
    res = torch.cat(replay_without(traj, torch.stack(masks), lambda th: _accuracy(p, th, xe, ye),
                                   chunk=len(masks), progress=progress, label="retraining",
                                   renormalize=True))
    clean_a, clean_l = clean
    corr_a, corr_l = (float(v) for v in res[0])
    after = {key: (float(a), float(lo)) for key, (a, lo) in zip(keys, res[1:-1], strict=True)}

    def rec(a: float, clean_v: float, corr_v: float) -> float | None:
        lost = clean_v - corr_v
        return (a - corr_v) / lost if abs(lost) > 1e-12 else None

    def row(a: tuple[float, float] | None) -> dict[str, float | None]:
        if a is None:
            return {"after_removal": None, "fraction_recovered": None,
                    "after_removal_loss": None, "loss_fraction_recovered": None}
        return {"after_removal": a[0], "fraction_recovered": rec(a[0], clean_a, corr_a),
                "after_removal_loss": a[1], "loss_fraction_recovered": rec(a[1], clean_l, corr_l)}

    retrain = {}
    for f in ex.removal_fractions:
        retrain[_pct(f)] = {"k": max(1, int(round(f * N))), "clean": clean_a,
                            "corrupted": corr_a, "clean_loss": clean_l, "corrupted_loss": corr_l,
                            **row(after[(f, "dice")]),
                            "by_method": {meth: row(after.get((f, meth))) for meth in scores}}
    return {"detection": detection, "fidelity": fid, "retrain": retrain,
            "oracle_removal": row((float(res[-1][0]), float(res[-1][1]))),
            "corrupted_samples": kk, "samples": N, "corrupted_scored_lowest": lowest,
            "timing": {"training_seconds": t_train, "sweep_seconds": t_sweep,
                       "sweep_ratio_to_training": t_sweep / t_train,
                       "memory": dice.memory},
            "_scores": dice, "_all": scores, "_problem": p}


def _baseline_at(ex: CleaningConfig, f: float) -> bool:
    return ex.baselines_retrained_at is None or f in ex.baselines_retrained_at


def _pct(f: float) -> str:
    return f"{100 * f:g}%"


# ------------------------------------------------------------------------------ the experiment


def run_experiment(cfg: RunConfig, out: str | Path, *, seeds: list[int] | None = None,
                   progress: bool = False, log: Any = None) -> dict[str, Any]:
    """Every scenario for every seed; writes the run directory and returns ``metrics``."""
    from ..simulator import train

    ex = parse_experiment(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = seeds if seeds else [cfg.seed]
    todo = [(i, sc) for i, sc in enumerate(ex.scenarios) if ex.only is None or sc.name in ex.only]
    runs: dict[str, list[dict[str, Any]]] = {sc.name: [] for _, sc in todo}
    started = time.perf_counter()
    for s in seeds:
        scfg = cfg.model_copy(update={"seed": int(s)})
        if log:
            log(f"seed {s}: training on clean data")
        clean = train(_scenario_cfg(scfg, None), progress=progress)
        xe, ye, eval_what = _eval_set(clean.problem)
        clean_al = tuple(float(v) for v in _accuracy(clean.problem, clean.theta[None], xe, ye)[0])
        del clean
        for i, sc in todo:
            r = run_scenario(scfg, ex, sc, fidelity=i < ex.fidelity_scenarios,
                             clean=clean_al, log=log, progress=progress)
            if s == seeds[0]:
                _write_scores(out, sc.name, r)
                _plot_samples(r, out / f"samples-{sc.name}.png", ex.images,
                              f"{sc.name}, seed {s}")
            for key in ("_scores", "_all", "_problem"):
                r.pop(key)
            runs[sc.name].append(r)
    scen = {name: _summarize(rs, ex) for name, rs in runs.items()}
    primary = todo[0][1].name
    P = scen[primary]
    metrics = {
        "kind": "cleaning",
        "sign_convention": SIGN,
        "seeds": seeds,
        "n_nodes": cfg.topology.n,
        "rounds": cfg.train.rounds,
        "scenario": primary,
        "detection": P["detection"],
        "fidelity": P["fidelity"],
        "retrain": P["retrain"],
        "worst": {"detection": P["detection_worst"], "fidelity": P["fidelity_worst"],
                  "retrain": P["retrain_worst"]},
        "scenarios": scen,
        "definitions": {
            "detection": "AUROC of each method's harmfulness score for the corrupted samples; "
                         "precision_at_k: corrupted fraction of the k highest scores, k = the "
                         "number of corrupted samples; mean over seeds ('worst': min)",
            "fidelity": "whole-run DICE-GT by exact replay (the sample removed from every "
                        "round that drew it) vs the dice score, over random drawn samples; "
                        "mean over seeds ('worst': min)",
            "retrain": "mean test accuracy over nodes on " + eval_what + "; after_removal: "
                       "the dice top-k removed from every round and the run retrained (same "
                       "initialisation and batches, each batch's loss averaged over the samples "
                       "it keeps, so the step size does not shrink with the data removed); "
                       "fraction_recovered = (after - corrupted) / (clean - corrupted) of "
                       "the seed means (per seed in per_seed; 'worst': the worst seed's); "
                       "*_loss: the same for the mean test cross-entropy on that set "
                       "(loss_fraction_recovered: share of the loss increase undone); "
                       "oracle_removal: exactly the corrupted samples removed",
        },
        "seconds": time.perf_counter() - started,
        "per_seed": runs,
    }
    write_json(out / "metrics.json", metrics)
    atomic_write_text(out / "config.yaml", dump_config(cfg))
    atomic_write_text(out / "README.md", "# Find the bad data: whole-run sample attribution\n\n"
                      f"{cfg.topology.n} nodes, {cfg.train.rounds} rounds, seeds {seeds}. "
                      f"{SIGN}.\n\n{table(metrics)}\n\nFiles: metrics.json, scores-*.csv "
                      "(every sample, every method, first seed), samples-*.png.\n")
    finish_run(out, "cleaning")
    return metrics


def _summarize(rs: list[dict[str, Any]], ex: CleaningConfig) -> dict[str, Any]:
    def mw(vals: list[Any], worst: str = "min") -> tuple[float | None, float | None]:
        v = [x for x in vals if x is not None]
        return mean_worst(v, worst) if v else (None, None)

    det, det_w = {}, {}
    for m in METHODS:
        det[m], det_w[m] = {}, {}
        for key in ("auroc", "precision_at_k"):
            det[m][key], det_w[m][key] = mw([r["detection"][m][key] for r in rs])
    fids = [r["fidelity"] for r in rs if r["fidelity"] is not None]
    fid = fid_w = None
    if fids:
        fid, fid_w = {}, {}
        for key in ("pearson", "spearman", "sign_agreement"):
            fid[key], fid_w[key] = mw([f[key] for f in fids])
    def pooled(rows: list[dict[str, Any]], after: str, clean: str, corr: str) -> float | None:
        """Recovery of the seed means: (mean after - mean corrupted) / (mean clean - mean
        corrupted); steadier than the mean of per-seed ratios when the loss is small."""
        v = [x for x in rows if x[after] is not None]
        if not v:
            return None
        lost = np.mean([x[clean] for x in v]) - np.mean([x[corr] for x in v])
        got = np.mean([x[after] for x in v]) - np.mean([x[corr] for x in v])
        return float(got / lost) if abs(lost) > 1e-12 else None

    def summary(rows: list[dict[str, Any]], ref: list[dict[str, Any]]) -> dict[str, Any]:
        both = [{**r, **x} for r, x in zip(ref, rows, strict=True)]
        return {"after_removal": mw([x["after_removal"] for x in rows])[0],
                "fraction_recovered": pooled(both, "after_removal", "clean", "corrupted"),
                "after_removal_loss": mw([x["after_removal_loss"] for x in rows])[0],
                "loss_fraction_recovered": pooled(both, "after_removal_loss", "clean_loss",
                                                  "corrupted_loss")}

    ret, ret_w = {}, {}
    for f in ex.removal_fractions:
        k = _pct(f)
        rows = [r["retrain"][k] for r in rs]
        ref = [{key: x[key] for key in ("clean", "corrupted", "clean_loss", "corrupted_loss")}
               for x in rows]
        ret[k] = {"k": rows[0]["k"]}
        for key in ("clean", "corrupted", "clean_loss", "corrupted_loss"):
            ret[k][key] = mw([x[key] for x in rows])[0]
        ret[k].update(summary(rows, ref))
        ret[k]["by_method"] = {m: summary([x["by_method"][m] for x in rows], ref)
                               for m in METHODS}
        ret_w[k] = {"fraction_recovered": mw([x["fraction_recovered"] for x in rows])[1],
                    "loss_fraction_recovered": mw([x["loss_fraction_recovered"]
                                                   for x in rows])[1],
                    "after_removal": mw([x["after_removal"] for x in rows])[1]}
    orc = summary([r["oracle_removal"] for r in rs],
                  [{key: r["retrain"][_pct(ex.removal_fractions[0])][key]
                    for key in ("clean", "corrupted", "clean_loss", "corrupted_loss")}
                   for r in rs])
    tim = {key: mw([r["timing"][key] for r in rs], "max")
           for key in ("training_seconds", "sweep_seconds", "sweep_ratio_to_training")}
    return {"detection": det, "detection_worst": det_w, "fidelity": fid, "fidelity_worst": fid_w,
            "retrain": ret, "retrain_worst": ret_w, "oracle_removal": orc,
            "corrupted_samples": [r["corrupted_samples"] for r in rs],
            "samples": rs[0]["samples"],
            "corrupted_scored_lowest": _lowest_summary(rs),
            "timing": {k: {"mean": v[0], "worst": v[1]} for k, v in tim.items()}}


def _lowest_summary(rs: list[dict[str, Any]]) -> dict[str, Any] | None:
    low = [r["corrupted_scored_lowest"] for r in rs if r.get("corrupted_scored_lowest")]
    if not low:
        return None
    gt = np.concatenate([x["gt"] for x in low])
    dc = np.concatenate([x["dice"] for x in low])
    return {"samples": int(len(gt)), "gt_helpful_fraction": float(np.mean(gt < 0)),
            "dice_helpful_fraction": float(np.mean(dc < 0)),
            "pearson": float(np.corrcoef(dc, gt)[0, 1]) if len(gt) > 2 else None}


def register(app: Any, experiment_app: Any, bench_app: Any) -> None:
    """Add ``dice experiment cleaning``."""
    add_command(experiment_app, "cleaning",
                "Find the bad data: whole-run sample attribution vs baselines.",
                run_experiment, table, parse_experiment)
