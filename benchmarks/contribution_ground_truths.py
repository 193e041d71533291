"""Benchmark: which leave-one-node-out — data removal vs node removal — and how the measured
contributions agree with each (docs/contribution.md, "Ground truths").

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/contribution_ground_truths.py --json benchmarks/contribution-ground-truths.json

For each committed scenario (benchmarks/contribution-digits*/, seeds 0-2) it retrains the
node-removal leave-one-node-out (node taken out of the graph, rows repaired by the one rule;
one stacked run per seed) and the data-removal one (to check it against the committed values),
and scores the committed measures — (b) the adjoint contribution and (a) the proximal outflow —
against both. The scenario is rebuilt exactly as `dice experiment contribution` builds it
(attacks included), so the committed (b) belongs to the same runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

CONFIGS = ("contribution-digits", "contribution-digits-clean", "contribution-digits-8")


def rho(a, b) -> float:
    return float(spearmanr(np.asarray(a, float), np.asarray(b, float))[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/contribution-ground-truths.json")
    args = ap.parse_args()

    from dice_influence.config import load_config
    from dice_influence.experiments import contribution as X
    from dice_influence.experiments import contribution_truth as truth

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    out: dict = {}
    for name in CONFIGS:
        committed = json.loads(Path(f"benchmarks/{name}/metrics.json").read_text())
        per_seed = []
        for seed in committed["seeds"]:
            cfg = load_config(f"configs/{name}.yaml", [f"seed={seed}"])
            ex = X.parse_experiment(cfg)
            problem, _ = X.build_scenario(cfg, ex)
            recs = [r for r in committed["contribution"] if r["seed"] == seed]
            b = [r["adjoint"] for r in recs]
            a = [r["proximal_out"] for r in recs]
            data = truth.leave_one_out(problem, cfg.train.rounds, removal="data")
            node = truth.leave_one_out(problem, cfg.train.rounds, removal="node")
            committed_loo = np.array([r["loo"] for r in recs])
            roles = [r["role"] for r in recs]
            rec = {
                "seed": seed,
                "data_loo_matches_committed": float(np.abs(data["loo"] - committed_loo).max()),
                "spearman_b_vs_data": rho(b, data["loo"]),
                "spearman_b_vs_node": rho(b, node["loo"]),
                "spearman_a_vs_data": rho(a, data["loo"]),
                "spearman_a_vs_node": rho(a, node["loo"]),
                "spearman_data_vs_node": rho(data["loo"], node["loo"]),
                "loo_data": data["loo"].tolist(), "loo_node": node["loo"].tolist(),
                "roles": roles, "seconds_node": node["seconds"],
            }
            per_seed.append(rec)
            print(name, seed, json.dumps({k: v for k, v in rec.items()
                                          if not isinstance(v, list)}), flush=True)
        keys = [k for k in per_seed[0] if k.startswith("spearman")]
        out[name] = {"per_seed": per_seed,
                     "mean": {k: float(np.mean([r[k] for r in per_seed])) for k in keys},
                     "worst": {k: float(np.min([r[k] for r in per_seed])) for k in keys}}
    res = {"benchmark": "contribution_ground_truths", "results": out,
           "sign": "loss with - loss without; negative = helpful",
           "seconds": time.perf_counter() - t0, "loadavg_before": load0,
           "loadavg_after": os.getloadavg(),
           "command": f"python benchmarks/contribution_ground_truths.py --json {args.json}"}
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
