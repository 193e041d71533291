"""Benchmark: the reverse sweep on real peers — time against training and memory per peer.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/peer_sweep.py --json benchmarks/bench-peer-sweep.json

16 peers x 200 rounds of configs/contribution-digits.yaml (one process per peer on loopback,
gloo), with the default checkpoint interval c = ceil(sqrt(T)) and with every round kept
(c = T: no replay), and the simulator's sweep/training ratio of the same config in the same
run. Per peer: training wall time (the sweep's taken out), sweep wall time (segment replay
over the network + pullbacks + reverse messages), their ratio, the sweep's peak number of
parameter vectors held, and the process's peak RSS. The machine is shared with other jobs:
os.getloadavg() is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def peer_stats(out: Path, n: int) -> dict:
    parts = [json.loads((out / f"peer-{k}" / "contribution.json").read_text()) for k in range(n)]
    train = np.array([p["seconds"]["train"] for p in parts])
    sweep = np.array([p["seconds"]["sweep"] for p in parts])
    ratio = sweep / train
    return {
        "checkpoint_every": parts[0]["checkpoint_every"],
        "train_seconds": {"mean": float(train.mean()), "max": float(train.max())},
        "sweep_seconds": {"mean": float(sweep.mean()), "max": float(sweep.max())},
        "sweep_over_train": {"mean": float(ratio.mean()), "max": float(ratio.max()),
                             "of_means": float(sweep.mean() / train.mean())},
        "sweep_parts_seconds_mean": {key: float(np.mean([p["seconds"][key] for p in parts]))
                                     for key in ("replay", "pullback", "exchange", "target")},
        "parameter_vectors_peak": int(max(p["memory"]["parameter_vectors_peak"]
                                          for p in parts)),
        "sweep_bytes_peak": int(max(p["memory"]["sweep_bytes_peak"] for p in parts)),
        "max_rss_mib": {"mean": float(np.mean([p["memory"]["max_rss_bytes"] for p in parts])
                                      / 2**20),
                        "max": float(max(p["memory"]["max_rss_bytes"] for p in parts) / 2**20)},
        "d": parts[0]["memory"]["d"],
        "adjoint": [p["adjoint"] for p in parts],
    }


def simulator_ratio(cfg) -> dict:
    """The simulator's sweep against plain training of the same config (one process)."""
    from dice_influence.loop import Loop
    from dice_influence.plugins import build
    from dice_influence.simulator import build_problem

    p = build_problem(cfg)
    theta = p.init_theta()
    st = p.opt.init_state(theta)
    Loop(p).run(theta, st, 0, 2)
    t0 = time.perf_counter()
    Loop(p).run(theta, st, 0, cfg.train.rounds)
    plain = time.perf_counter() - t0
    plugins = build(cfg, p)
    t0 = time.perf_counter()
    Loop.from_plugins(p, plugins).run(theta, st, 0, cfg.train.rounds)
    measured = time.perf_counter() - t0
    obs = plugins.find("contribution")
    return {"plain_seconds": plain, "measured_seconds": measured,
            "sweep_seconds": obs.seconds["sweep"],
            "sweep_over_plain_training": obs.seconds["sweep"] / plain}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="benchmarks/bench-peer-sweep.json")
    ap.add_argument("--config", default="configs/contribution-digits.yaml")
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--peers", type=int, default=16)
    args = ap.parse_args()

    from dice_influence.config import load_config
    from dice_influence.distributed import launch

    load_before = os.getloadavg()
    runs = {}
    base = load_config(args.config, [f"train.rounds={args.rounds}",
                                      f"topology.n={args.peers}"])
    for name, c, targets in (("default_c", None, "primary"), ("keep_all", args.rounds, "primary"),
                             ("default_c_both_targets", None, "both")):
        sets = [f"train.rounds={args.rounds}", f"topology.n={args.peers}",
                f"experiment.distributed.sweep.targets={targets}"]
        if c is not None:
            sets.append(f"experiment.distributed.sweep.checkpoint_every={c}")
        cfg = load_config(args.config, sets)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            res = launch(cfg, args.peers, Path(tmp) / "p2p", wall_timeout=3000)
            wall = time.perf_counter() - t0
            if not res.ok:
                raise SystemExit(f"launch failed: {res.errors}")
            runs[name] = {"launch_wall_seconds": wall, **peer_stats(Path(tmp) / "p2p",
                                                                   args.peers)}
        print(name, json.dumps({k: v for k, v in runs[name].items() if k != "adjoint"}))
    a, b = np.array(runs["default_c"]["adjoint"]), np.array(runs["keep_all"]["adjoint"])
    sim = simulator_ratio(base)
    out = {
        "benchmark": "peer_sweep",
        "command": f"python benchmarks/peer_sweep.py --json {args.json}",
        "config": args.config, "peers": args.peers, "rounds": args.rounds,
        "targets": "primary = the shared validation set (the simulator's target); both = also "
                   "each peer's own test split, carried in the same sweep",
        "runs": runs,
        "replay_vs_keep_all_max_rel_diff": float(np.abs(a - b).max() / np.abs(b).max()),
        "simulator": sim,
        "target": "sweep <= 2.5x the training rounds it covers",
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "note": "2-core machine shared with other jobs (see loadavg): "
                            "16 peer processes share 2 cores"},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "runs"}, indent=1))


if __name__ == "__main__":
    main()
