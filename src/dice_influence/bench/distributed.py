"""``dice bench distributed``: real local peers against the simulator at the same ``n``.

For each ``n`` it launches ``n`` peers on loopback (one process each, gloo) and measures their
training loop (rounds per second of the network = rounds / slowest peer's loop time; process
start-up and rendezvous are reported separately), then times the vectorized simulator on the
same config in this process, and reports the bytes each peer sends per round. Numbers go to JSON;
nothing is asserted. The simulator is timed with 1 thread and with torch's default and the
faster is reported (on a busy machine OpenMP threads that spin can make the default 50x slower).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .._util import write_json


def bench_config(n: int, rounds: int) -> Any:
    from ..config import load_config

    return load_config(
        {
            "seed": 0,
            "data": {
                "dataset": "digits",
                "samples_per_node": 80,
                "test_samples_per_node": 15,
                "validation_samples": 100,
            },
            "topology": {"name": "exponential", "n": n},
            "model": {"name": "mlp", "hidden": [32]},
            "train": {"rounds": rounds, "batch_size": 16, "lr": 0.1, "eval_every": 10_000},
            "experiment": {"distributed": {"timeout_s": 120, "record_rounds": False}},
        }
    )


def _simulator_rate(cfg: Any, rounds: int) -> tuple[float, float]:
    """Rounds/s of the simulator's training loop, and of the simulator with the proximal
    matrix tracked the same way the peers track it (:func:`distributed.reference.simulate`)."""
    from ..distributed.reference import simulate
    from ..simulator import build_problem, run_rounds

    problem = build_problem(cfg)
    theta = problem.init_theta()
    state = problem.opt.init_state(theta)
    run_rounds(problem, theta, state, 0, 2)  # warm-up
    t0 = time.perf_counter()
    run_rounds(problem, theta, state, 0, rounds)
    plain = rounds / (time.perf_counter() - t0)
    simulate(problem, rounds=2)
    t0 = time.perf_counter()
    simulate(problem, rounds=rounds)
    tracked = rounds / (time.perf_counter() - t0)
    return plain, tracked


def bench_distributed(
    ns: list[int], *, rounds: int = 30, out: Any = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Measure each ``n`` in ``ns``; write and return the JSON document."""
    from ..distributed.launch import launch

    results = []
    for n in ns:
        cfg = bench_config(n, rounds)
        log(f"bench distributed: {n} peers ...")
        with tempfile.TemporaryDirectory(prefix="dice-bench-") as tmp:
            t0 = time.perf_counter()
            res = launch(cfg, n, tmp, wall_timeout=600)
            wall = time.perf_counter() - t0
        if not res.ok:
            raise RuntimeError(f"benchmark launch with {n} peers failed: {res.errors}")
        ms = [m for m in res.metrics if m is not None]
        loop = max(m["seconds"] for m in ms)
        rates = {}
        default_threads = torch.get_num_threads()
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            try:
                rates[threads] = _simulator_rate(cfg, rounds)
            finally:
                torch.set_num_threads(default_threads)
        best = max(rates, key=lambda th: rates[th][0])
        results.append(
            {
                "n": n,
                "rounds": rounds,
                "d": ms[0]["d"],
                "p2p_rounds_per_s": rounds / loop,
                "p2p_peer_rounds_per_s_mean": float(np.mean([m["rounds_per_s"] for m in ms])),
                "p2p_wall_s_including_startup": wall,
                "simulator_rounds_per_s": rates[best][0],
                "simulator_with_proximal_rounds_per_s": rates[best][1],
                "simulator_threads": best,
                "simulator_rounds_per_s_by_threads": {str(k): v[0] for k, v in rates.items()},
                "bytes_sent_per_peer_per_round": float(
                    np.mean([m["bytes_sent_per_round"] for m in ms])
                ),
                "packet_bytes": ms[0]["packet_bytes"],
            }
        )
    doc = {
        "benchmark": "distributed",
        "setting": "digits, MLP 64-32-10, batch 16, exponential graph, gloo on loopback, "
        "one process per peer (1 thread each), proximal influence tracked (pre)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "results": results,
    }
    if out is not None:
        write_json(out, doc)
    return doc
