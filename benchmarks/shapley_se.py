"""Benchmark: are the Shapley sampler's standard errors calibrated on the network utility?

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/shapley_se.py --json benchmarks/shapley-se.json

Runs the permutation sampler of ``dice experiment contribution`` ``--replications`` times with
different sampler seeds on the same utility (configs/contribution-digits.yaml, seed 0: the
network's mean test loss after 100 rounds with a coalition's data), for both orderings designs,
and compares the spread of the estimates across replications (the true standard error of one
estimate) with the mean standard error each replication reports. Ratio > 1: the reported
errors are too small. Coalitions are memoised across replications (the same coalition trains
the same network).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/shapley-se.json")
    ap.add_argument("--config", default="configs/contribution-digits.yaml")
    ap.add_argument("--replications", type=int, default=8)
    ap.add_argument("--permutations", type=int, default=32)
    ap.add_argument("--orderings", default="cyclic", help="comma-separated designs")
    args = ap.parse_args()

    from dice_influence.config import load_config
    from dice_influence.experiments import contribution as X
    from dice_influence.experiments import contribution_truth as truth

    cfg = load_config(args.config)
    ex = X.parse_experiment(cfg)
    problem, _ = X.build_scenario(cfg, ex)
    base = truth.network_utility(problem, cfg.train.rounds)
    memo: dict[bytes, float] = {}

    def utility(keep: np.ndarray) -> np.ndarray:
        keep = np.asarray(keep, dtype=bool)
        todo = [k for k in keep if k.tobytes() not in memo]
        if todo:
            uniq = {k.tobytes(): k for k in todo}
            vals = base(np.array(list(uniq.values())))
            memo.update(zip(uniq, vals.tolist(), strict=True))
        return np.array([memo[k.tobytes()] for k in keep])

    load0 = os.getloadavg()
    t0 = time.perf_counter()
    out = {}
    n = problem.n
    for orderings in args.orderings.split(","):
        phis, ses, evals = [], [], []
        for r in range(args.replications):
            res = truth.shapley_permutations(utility, n, args.permutations, seed=1000 + r,
                                             orderings=orderings)
            phis.append(res["phi"])
            ses.append(res.get("se_raw", res["se"]))
            evals.append(res["evaluations"])
            print(orderings, r, flush=True)
        P, S = np.array(phis), np.array(ses)
        emp = P.std(0, ddof=1)
        ok = S.mean(0) > 0
        out[orderings] = {
            "empirical_sd_mean": float(emp[ok].mean()),
            "reported_se_mean": float(S.mean(0)[ok].mean()),
            "ratio_empirical_over_reported": float(emp[ok].mean() / S.mean(0)[ok].mean()),
            "ratio_per_node": (emp[ok] / S.mean(0)[ok]).tolist(),
            "evaluations_mean": float(np.mean(evals)),
        }
        print(orderings, out[orderings]["ratio_empirical_over_reported"], flush=True)
    res = {"benchmark": "shapley_se", "config": args.config, "seed": cfg.seed,
           "replications": args.replications, "permutations": args.permutations,
           "n": n, "results": out, "coalitions_trained": len(memo),
           "seconds": time.perf_counter() - t0,
           "note": "se for cyclic is the raw position-stratified error (before any widening)",
           "loadavg_before": load0, "loadavg_after": os.getloadavg(),
           "command": f"python benchmarks/shapley_se.py --json {args.json}"}
    Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
