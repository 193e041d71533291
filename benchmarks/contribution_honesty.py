"""Benchmark: honesty of the contribution measure under strategic peers (docs/contribution.md,
"Honesty under strategic peers").

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/contribution_honesty.py --json benchmarks/contribution-honesty.json

Part 1 (simulator, the one loop): free riders that *misreport* their update, on
configs/contribution-digits.yaml (seed 0), each replacing node 13 (the scenario's plain free
rider) in turn —
  - ``copy``: sends a neighbour's half step as its own, plus small noise (σ 0.0015);
  - ``stale``: trains only every 10th round and re-sends that update, scaled by 0.5;
  - ``zero`` (the scenario's free rider, for reference).
Per variant: the node's measured contribution (b), its leave-one-node-out (data and node
removal), whether the local free-rider rule flags it, and its reward share.

Part 2 (real peers, ``dice launch``): one peer lies in the reverse sweep (the
``experiment.distributed.sweep.lie`` drill: ×10, sign flip, random of the same norm), node 0 (the
best node) as the liar; per lie: every node's contribution against the honest sweep (largest
relative change, Spearman of the rankings, the liar's own change), the rewards that move, and
whether the norm bound on incoming adjoints (``max_norm_ratio``) would see it (the largest
ratio its neighbours observe vs the honest maximum); ×10 is rerun with the bound on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONFIG = "configs/contribution-digits.yaml"


# ------------------------------------------------------------------------------ part 1


class Holder:
    theta: torch.Tensor | None = None


def misreport_transforms(problem: Any, node: int, kind: str, holder: Holder):
    from dice_influence.loop import Observer, Transform

    class Track(Observer):  # keeps θ^{t+1} for the next round's transform (read-only)
        name = "track"

        def after_gossip(self, view, W_used):
            holder.theta = view.theta_next.clone()

    class Misreport(Transform):
        name = f"misreport_{kind}"

        def __init__(self) -> None:
            self.store: dict[int, torch.Tensor] = {}  # the rounds it trained in

        def apply(self, t, ids, U):
            rows = [i for i, k in enumerate(ids) if int(k) == node]
            if not rows:
                return []
            r = rows[0]
            if kind == "copy":
                W = problem.W(t)
                nb = next(j for j in np.flatnonzero(W[node] > 0) if j != node)
                theta = holder.theta if holder.theta is not None and t > 0 else \
                    problem.init_theta()
                gen = torch.Generator().manual_seed(7919 * t + node)
                noise = torch.randn(U.shape[1], generator=gen, dtype=U.dtype)
                pos = [i for i, k in enumerate(ids) if int(k) == nb][0]
                U[r] = theta[nb] - theta[node] + U[pos] + 0.0015 * noise
            elif kind == "stale":
                t0 = t - t % 10
                if t == t0:
                    self.store.setdefault(t0, U[r].detach().clone())
                    U[r] = 0.5 * U[r]  # the round it trains: its (scaled) fresh update
                else:
                    U[r] = 0.5 * self.store[t0]
            return [r]

    return Misreport(), Track()


def part1(cfg: Any, node: int = 13) -> dict[str, Any]:
    from dice_influence.apps.contribution import ContributionObserver, reward_split
    from dice_influence.experiments import contribution as X
    from dice_influence.loop import Loop

    ex = X.parse_experiment(cfg)
    ex = ex.model_copy(update={"attacks": [a for a in ex.attacks if node not in (a.nodes or [])]})
    base, _ = X.build_scenario(cfg, ex)
    out = {}
    losses: dict[str, np.ndarray] = {}
    for kind in ("zero", "copy", "stale"):
        holder = Holder()
        if kind == "zero":
            from dice_influence.attacks import AttackPlan, AttackSpec, attack_transforms

            plan = AttackPlan.resolve([AttackSpec(kind="free_rider", nodes=[node])], base.n,
                                      cfg.seed)
            extra, track = attack_transforms(plan), []
        else:
            tr, tk = misreport_transforms(base, node, kind, holder)
            extra, track = (tr,), [tk]
        p = dataclasses.replace(base, transforms=base.transforms + tuple(extra), _mixers={})
        obs = ContributionObserver(p.n, p, rounds=cfg.train.rounds)
        theta = p.init_theta()
        holder.theta = None
        final, _ = Loop(p, [*track, obs]).run(theta, p.opt.init_state(theta), 0,
                                              cfg.train.rounds)
        m = obs.measures()
        losses[kind] = np.asarray(p.evaluate(final)["loss"])
        others = np.arange(p.n) != node
        # the value of its data (LOO, data removal): with its data weighted to zero the stale
        # rider sends zeros (= the zero free rider) and the copier still copies (= itself)
        if kind == "stale":
            loo_node = float(losses[kind][others].mean() - losses["zero"][others].mean())
        else:
            loo_node = 0.0
        fr = np.asarray(m["free_rider"], dtype=bool)
        reward = reward_split(m["adjoint"], m["proximal_out"], m["proximal_in"], budget=1.0,
                              excluded=fr)
        helpful = np.sort(-np.asarray(m["adjoint"]))[::-1]
        out[kind] = {
            "contribution": float(m["adjoint"][node]),
            "contribution_rank_from_most_helpful": int(
                (np.asarray(m["adjoint"]) < m["adjoint"][node]).sum()),
            "median_helpful_contribution": float(-np.median(helpful[helpful > 0])),
            "free_rider_flag": bool(fr[node]),
            "free_rider_votes": float(m["free_rider_votes"][node]),
            "alignment_rms_in": [None if not np.isfinite(v) else float(v)
                                 for v in np.asarray(m["alignment_rms"])[:, node]
                                 if np.isfinite(v)],
            "reward_share": float(reward[node]),
            "loo_data": loo_node,
        }
        print("part1", kind, json.dumps(out[kind]), flush=True)
    return out


# ------------------------------------------------------------------------------ part 2


def launch_once(rounds: int, lie: dict | None, bound: float | None,
                min_cosine: float | None = None) -> dict[str, Any]:
    from dice_influence.config import load_config
    from dice_influence.distributed import launch

    sets = [f"train.rounds={rounds}", "experiment.distributed.timeout_s=120"]
    if lie is not None:
        sets += [f"experiment.distributed.sweep.lie.{k}={v}" for k, v in lie.items()]
    sets.append(f"experiment.distributed.sweep.max_norm_ratio={bound if bound else 'null'}")
    sets.append("experiment.distributed.sweep.min_cosine="
                f"{min_cosine if min_cosine is not None else 'null'}")
    cfg = load_config(CONFIG, sets)
    with tempfile.TemporaryDirectory() as tmp:
        res = launch(cfg, cfg.topology.n, Path(tmp) / "p2p", wall_timeout=3000)
        if not res.ok:
            raise SystemExit(f"launch failed: {res.errors}")
        m = json.loads((Path(tmp) / "p2p" / "metrics.json").read_text())
    return m["observers"]["contribution"]


def part2(rounds: int, defended: tuple[float, float] | None = None) -> dict[str, Any]:
    from scipy.stats import spearmanr

    from dice_influence.apps.contribution import reward_split
    from dice_influence.config import load_config
    from dice_influence.simulator import build_problem

    W = np.asarray(build_problem(load_config(CONFIG)).W(0))
    liar = 0
    neighbours = [k for k in range(W.shape[0]) if W[liar, k] > 0 and k != liar]
    honest = launch_once(rounds, None, None)
    h = np.asarray(honest["adjoint"])
    hr = reward_split(h, honest["proximal_out"], honest["proximal_in"], budget=1.0,
                      excluded=np.asarray(honest["free_rider"], bool))
    out: dict[str, Any] = {"liar": liar, "liar_reads_from": neighbours,
                           "honest": {"adjoint": h.tolist(), "reward": hr.tolist(),
                                      "incoming_norm_ratio_max":
                                      honest["sweep"]["incoming_norm_ratio_max"]}}
    out["honest"]["incoming_cosine_min"] = honest["sweep"].get("incoming_cosine_min")
    lies = (("scale10", {"peer": liar, "kind": "scale", "factor": 10}),
            ("sign", {"peer": liar, "kind": "sign"}),
            ("random", {"peer": liar, "kind": "random"}))
    if defended is not None:
        out["defence"] = {"max_norm_ratio": defended[0], "min_cosine": defended[1]}
        hd = launch_once(rounds, None, *defended)
        out["honest_defended"] = {
            "max_rel_change": float(np.abs(np.asarray(hd["adjoint"]) - h).max()
                                    / np.abs(h).max()),
            "replaced_messages": len(hd["sweep"]["events"])}
        print("part2 honest_defended", json.dumps(out["honest_defended"]), flush=True)
    for name, lie in lies:
        g = launch_once(rounds, lie, *(defended or (None, None)))
        a = np.asarray(g["adjoint"])
        r = reward_split(a, g["proximal_out"], g["proximal_in"], budget=1.0,
                         excluded=np.asarray(g["free_rider"], bool))
        rel = np.abs(a - h) / np.abs(h).max()
        ratios = g["sweep"]["incoming_norm_ratio_max"]
        out[name] = {
            "adjoint": a.tolist(), "reward": r.tolist(),
            "max_rel_change_others": float(np.delete(rel, liar).max()),
            "liar_change": float(a[liar] - h[liar]),
            "spearman_vs_honest": float(spearmanr(a, h)[0]),
            "reward_moved": float(np.abs(r - hr).sum() / 2),
            "liar_reward": [float(hr[liar]), float(r[liar])],
            "incoming_norm_ratio_max": ratios,
            "max_ratio_at_liars_neighbours": float(max(ratios[k] for k in range(len(ratios))
                                                       if W[k, liar] > 0 and k != liar)),
            "replaced_messages": len(g["sweep"]["events"]),
            "min_cosine_at_liars_neighbours": float(min(
                g["sweep"].get("incoming_cosine_min", [1.0] * len(ratios))[k]
                for k in range(len(ratios)) if W[k, liar] > 0 and k != liar)),
        }
        print("part2", name, json.dumps({k: v for k, v in out[name].items()
                                         if k not in ("adjoint", "reward",
                                                      "incoming_norm_ratio_max")}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/contribution-honesty.json")
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--defended", default=None,
                    help="RATIO,COSINE: rerun the lies with these sweep defences on")
    ap.add_argument("--merge", action="store_true",
                    help="update the simulator part of an existing --json, keep the rest")
    args = ap.parse_args()
    from dice_influence.config import load_config

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    res: dict[str, Any] = {"benchmark": "contribution_honesty", "config": CONFIG,
                           "sign": "influence = loss with the data - loss without it; "
                                   "negative = helpful",
                           "command": f"python benchmarks/contribution_honesty.py --json "
                                      f"{args.json}"}
    if args.merge and Path(args.json).is_file():
        res = {**json.loads(Path(args.json).read_text()), **res}
    if not args.skip_sim:
        res["misreporting_free_riders"] = part1(load_config(CONFIG))
    if not args.skip_peers:
        res["lying_in_the_sweep"] = part2(args.rounds)
    if args.defended:
        ratio, cos = (float(v) for v in args.defended.split(","))
        res["lying_in_the_sweep_defended"] = part2(args.rounds, (ratio, cos))
    res["seconds"] = time.perf_counter() - t0
    res["loadavg_before"], res["loadavg_after"] = load0, os.getloadavg()
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
