"""Why ``test_batch_order: rotate`` reads each test slice for two consecutive tracked rounds
(``dice_influence.loop.ROTATE_HOLD``; docs/anomaly.md, test mini-batches).

configs/anomaly-blog.yaml (50 nodes, each node's own 64-sample test split), clean (seeds 0, 1)
and with its 5 label-flip attackers (seed 0): the cumulative proximal influence (nominal weights,
``pre``) with ``test_batch`` 16 / 32 against the whole split's on the same run, after 30 and 100
rounds, tracking every round and every 5th round, for ``first`` and for ``rotate`` holding each
slice 1, 2 or 4 tracked rounds. Relative error (Frobenius, on the edges) and Spearman. Also
the mean cosine between a node's consecutive updates ``u_k^t`` and ``u_k^{t+1}`` (clean, seed 0):
negative = the updates alternate in direction from one round to the next.

Run from the repository root (about 4 minutes on one core):
    python benchmarks/test_batch_hold.py   # writes benchmarks/test-batch-hold.json
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "test-batch-hold.json"
SCHEDULES = [("first", "first", 1), ("rotate, hold 1", "rotate", 1),
             ("rotate, hold 2 (default)", "rotate", 2), ("rotate, hold 4", "rotate", 4)]


def main() -> None:
    import dice_influence.loop as L
    from dice_influence._util import write_json
    from dice_influence.apps.defense import GuardOptions, guarded_train
    from dice_influence.attacks import AttackPlan, with_data_attacks
    from dice_influence.bench.proximal import score_error
    from dice_influence.config import load_config
    from dice_influence.experiments import anomaly as X
    from dice_influence.simulator import build_problem

    load0 = list(os.getloadavg())
    t_all = time.perf_counter()
    hold0 = L.ROTATE_HOLD
    results = []
    for setting, seed in (("clean", 0), ("clean", 1), ("label flip x5", 0)):
        cfg = load_config(ROOT / "configs" / "anomaly-blog.yaml", [f"seed={seed}"])
        plan = None
        if setting != "clean":
            ex = X.parse_experiment(cfg)
            plan = AttackPlan.resolve(ex.attacks, cfg.topology.n, seed)
            cfg = with_data_attacks(cfg.model_copy(update={"observers": [], "policy": None,
                                                           "aggregator": None}), plan)
        p = build_problem(cfg)
        for every in (1, 5):
            ref = {R: guarded_train(p, plan, GuardOptions(eval_every=0, track_every=every),
                                    rounds=R).tracker.score for R in (30, 100)}
            for m in (32, 16):
                for label, order, hold in SCHEDULES:
                    L.ROTATE_HOLD = hold
                    try:
                        err: dict[str, Any] = {}
                        for R in (30, 100):
                            o = GuardOptions(eval_every=0, track_every=every, test_batch=m,
                                             test_batch_order=order)
                            e = score_error(guarded_train(p, plan, o, rounds=R).tracker.score,
                                            ref[R])
                            err[str(R)] = {k: e[k] for k in ("relative_error", "spearman")}
                    finally:
                        L.ROTATE_HOLD = hold0
                    results.append({"setting": setting, "seed": seed, "every": every,
                                    "test_batch": m, "schedule": label, "error": err})
                    print(f"{setting}, seed {seed}, every {every}, test_batch {m}, {label}: "
                          + ", ".join(f"{R} rounds rel {v['relative_error']:.3f} "
                                      f"Spearman {v['spearman']:.3f}" for R, v in err.items()),
                          flush=True)
    cos = consecutive_update_cosine(build_problem(load_config(
        ROOT / "configs" / "anomaly-blog.yaml")), 100)
    print("mean cos(u_k^t, u_k^{t+1}) over nodes, by rounds:", cos)
    write_json(OUT, {
        "benchmark": "rotating test slices: rounds per slice",
        "command": "python benchmarks/test_batch_hold.py",
        "config": "configs/anomaly-blog.yaml",
        "loadavg": {"before": load0, "after": list(os.getloadavg())},
        "seconds": time.perf_counter() - t_all,
        "consecutive_update_cosine": cos,
        "results": results,
    })
    print(f"wrote {OUT}")


def consecutive_update_cosine(p: Any, rounds: int) -> dict[str, float]:
    """Mean over nodes of ``cos(u_k^t, u_k^{t+1})``, averaged over rounds 1-10, 10-30, 30-R."""
    import numpy as np
    import torch

    th, prev, cs = p.init_theta(), None, []
    for t in range(rounds):
        half, _ = p.local_step(th, None, t)
        U = half - th
        if prev is not None:
            cs.append(float(torch.nn.functional.cosine_similarity(U, prev, dim=1).mean()))
        prev = U
        th, _ = p.round(th, None, t)
    c = np.asarray(cs)
    return {"rounds 1-10": float(c[:10].mean()), "rounds 10-30": float(c[10:30].mean()),
            f"rounds 30-{rounds}": float(c[30:].mean())}


if __name__ == "__main__":
    main()
