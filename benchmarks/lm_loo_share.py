"""Is the first-order node contribution the slope of leave-one-node-out at share 0?

Trains a config's run once with its ``contribution`` observer (the adjoint contribution
``b_j``: first-order effect of removing all of node ``j``'s data on the mean test loss of all
nodes' models), then replays the run exactly with a share ``s`` of node ``j``'s data weight
removed in every round (``influence.wholerun.replay_without``, denominator kept: ``s = 1`` is
the contribution experiment's ``data`` removal) and reads the same target. Writes, per node and
share, ``delta = L(with) - L(share s removed)`` (positive = harmful) over all nodes' models
(``all``) and over the other nodes' models (``others``, the experiment's ``loo``), and
``slope = delta / s``: as ``s -> 0`` it tends to ``b_j`` when the run is smooth.

    python benchmarks/lm_loo_share.py configs/lm-fortunes.yaml --seed 0 --nodes 3,1,8 \\
        --shares 0.02,0.05,0.25,0.5,1 --chunk 15 --json benchmarks/lm-loo-share-fortunes-s0.json
    python benchmarks/lm_loo_share.py configs/lm-english.yaml --seed 0 --nodes 3,2 \\
        --shares 0.02,0.25,0.5,1 --chunk 8 --json benchmarks/lm-loo-share-english-s0.json

(peak resident memory 7.5 / 8.1 GB for these two; ``--chunk 4`` (the default) batches fewer
replays at a time for less.)
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from dice_influence._util import write_json
from dice_influence.config import load_config
from dice_influence.influence.ground_truth import test_losses
from dice_influence.influence.wholerun import replay_without
from dice_influence.simulator import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nodes", default="3")
    ap.add_argument("--shares", default="0.02,0.05,0.25,0.5,1")
    ap.add_argument("--set", action="append", default=[], help="config override key=value")
    ap.add_argument("--chunk", type=int, default=4,
                    help="replays batched per pass (8: about 8 GB resident on the LM)")
    ap.add_argument("--json", required=True)
    a = ap.parse_args()
    cfg = load_config(a.config, [f"seed={a.seed}", *a.set])
    t0 = time.perf_counter()
    traj = train(cfg)
    obs = traj.plugins.find("contribution")
    b = np.asarray(obs.measures()["adjoint"], dtype=float)
    t_train = time.perf_counter() - t0
    p = traj.problem
    n, m = p.n, p.node_data.max_size
    nodes = [int(k) for k in a.nodes.split(",")]
    shares = [float(s) for s in a.shares.split(",")]
    cases = [(k, s) for k in nodes for s in shares]
    remove = torch.zeros(len(cases), n, m, dtype=p.dtype)
    for i, (k, s) in enumerate(cases):
        remove[i, k, : int(p.node_data.sizes[k])] = s
    t1 = time.perf_counter()
    parts = replay_without(traj, remove, lambda th: test_losses(p, th, False).double(),
                           chunk=a.chunk, progress=True, label="share replays")
    t_replay = time.perf_counter() - t1
    rows = []
    for part in parts:
        L0 = part[0]
        rows += [L0 - Li for Li in part[1:]]
    out = {"config": a.config, "seed": a.seed, "overrides": a.set, "dtype": str(p.dtype),
           "sign": "delta = target with the data - target with share s of it removed; "
                   "positive = harmful",
           "adjoint_contribution": {str(k): float(b[k]) for k in range(n)},
           "factual_mean_test_loss": float(parts[0][0].mean()),
           "nodes": {}, "train_seconds": t_train, "replay_seconds": t_replay,
           "replays": len(cases), "loadavg": os.getloadavg()}
    for (k, s), d in zip(cases, rows, strict=True):
        others = np.delete(np.arange(n), k)
        rec = out["nodes"].setdefault(str(k), {"adjoint": float(b[k]), "shares": []})
        d_all, d_oth = float(d.mean()), float(d[others].mean())
        rec["shares"].append({"share": s, "delta_all": d_all, "delta_others": d_oth,
                              "slope_all": d_all / s, "slope_others": d_oth / s,
                              "slope_over_adjoint": d_all / s / float(b[k])})
        print(f"node {k:2d} share {s:5.2f}: delta_all {d_all:+.6f} slope {d_all / s:+.6f} "
              f"(adjoint {b[k]:+.6f}, ratio {d_all / s / b[k]:.3f}); others {d_oth:+.6f}",
              flush=True)
    write_json(a.json, out)


if __name__ == "__main__":
    main()
