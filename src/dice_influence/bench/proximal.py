"""Benchmark: overhead of online proximal influence tracking (``dice bench proximal``).

Seconds per round of the guarded training loop (:func:`dice_influence.apps.defense.guarded_train`)
with tracking off (plain training), tracking every round and every 5th round (``pre`` read-out,
and ``post`` every round), on the anomaly-blog setting (50 nodes, Fashion-MNIST, MLP 784-64-10,
batch 32) by default. Ratios are against plain training in the same loop; the core simulator's
``run_rounds`` is timed too for reference. Evaluation is switched off while timing. Numbers are
written to JSON, never asserted.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .._util import write_json

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "anomaly-blog.yaml"


def _time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench_proximal(
    config: str | Path | None = None,
    *,
    rounds: int = 30,
    repeats: int = 3,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Time each mode for ``rounds`` rounds (best of ``repeats``); write and return the JSON."""
    from ..apps.defense import GuardOptions, guarded_train
    from ..config import load_config
    from ..simulator import build_problem, run_rounds

    path = Path(config) if config is not None else DEFAULT_CONFIG
    cfg = load_config(path, [f"train.rounds={rounds}", f"train.eval_every={10**6}"])
    problem = build_problem(cfg)
    theta = problem.init_theta()
    modes = {
        "plain (guarded loop, no tracking)": GuardOptions(track_every=0, eval_every=0),
        "track every round, pre": GuardOptions(track_every=1, readout="pre", eval_every=0),
        "track every 5th round, pre": GuardOptions(track_every=5, readout="pre", eval_every=0),
        "track every round, post": GuardOptions(track_every=1, readout="post", eval_every=0),
        "track every 5th round, post": GuardOptions(track_every=5, readout="post", eval_every=0),
        "track every round + defence": GuardOptions(track_every=1, defense="dice", eval_every=0),
    }
    results = []
    core = _time(lambda: run_rounds(problem, theta, None, 0, rounds), repeats) / rounds
    base = None
    for name, opts in modes.items():
        s = _time(lambda o=opts: guarded_train(problem, None, o, rounds=rounds), repeats) / rounds
        base = base or s
        results.append({"mode": name, "s_per_round": s, "ratio": s / base})
    results.append({"mode": "core simulator run_rounds", "s_per_round": core, "ratio": core / base})
    doc = {
        "benchmark": "proximal",
        "config": str(path),
        "setting": f"n={cfg.topology.n}, {cfg.data.dataset}, model {cfg.model.name} "
        f"{cfg.model.hidden}, batch {cfg.train.batch_size}, per-node test split "
        f"{cfg.data.test_samples_per_node}, {rounds} rounds, best of {repeats}",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "results": results,
    }
    if out is not None:
        write_json(out, doc)
    return doc
