"""Benchmark: overhead of online proximal influence tracking (``dice bench proximal``).

Seconds per round of the guarded training loop (:func:`dice_influence.apps.defense.guarded_train`)
with tracking off (plain training), tracking every round and every 5th round (``pre`` read-out,
and ``post`` every round), on the anomaly-blog setting (50 nodes, Fashion-MNIST, MLP 784-64-10,
batch 32) by default. Ratios are against plain training in the same loop; the core simulator's
``run_rounds`` is timed too for reference. Evaluation is switched off while timing. Modes with
``test_batch`` read ``m`` of each receiver's test samples per tracked round (a quarter and a
half of its split): a rotating slice (``test_batch_order: rotate``, the default: each slice
for two tracked rounds, every sample equally often over the rounds) or, marked ``first``, always
the first ``m``. Their ``error_vs_full_test_set`` compares the cumulative proximal influence
after the timed rounds with the full split's (same training: tracking never changes it), and
``error_vs_full_test_set_by_rounds`` the same after ``error_rounds`` (default: the config's
whole run too; untimed runs). The modes marked ``(fast paths off)`` run with the observers'
fast paths switched off (:mod:`dice_influence.bench.fastpaths`): the cost before they existed,
in the same run.

The modes run alternately, ``repeats`` times after one warm-up each, and per mode the fastest
repeat counts (other jobs only add time; alternating spreads a changing load over every mode
alike). ``s_per_round`` / ``ratio`` are wall clock, ``cpu_s_per_round`` / ``cpu_ratio`` process
CPU time (what a loaded machine distorts least with one thread). Every mode runs with one
thread count, chosen once by the project's rule for the tracked workload
(:func:`dice_influence._threads.use_threads_for`) and recorded. ``loadavg`` is recorded before
and after (the machine may be shared). Numbers are written to JSON, never asserted.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .._util import write_json
from .fastpaths import fast_paths

DEFAULT_CONFIG = Path(__file__).resolve().parents[3] / "configs" / "anomaly-blog.yaml"


def score_error(P: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """How far cumulative proximal influence ``P`` (n, n) is from ``ref`` on the edges (the
    non-zero entries of ``ref``): relative error (Frobenius), Spearman and sign agreement."""
    from scipy.stats import spearmanr

    mask = ref != 0
    a, b = P[mask].double(), ref[mask].double()
    return {"edges": int(mask.sum()),
            "relative_error": float((a - b).norm() / b.norm()),
            "spearman": float(spearmanr(a.numpy(), b.numpy())[0]),
            "sign_agreement": float((a.sign() == b.sign()).double().mean())}


def bench_proximal(
    config: str | Path | None = None,
    *,
    rounds: int = 30,
    repeats: int = 5,
    out: str | Path | None = None,
    error_rounds: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Time each mode for ``rounds`` rounds (best of ``repeats``, alternated); write and return
    the JSON. ``error_rounds``: run lengths at which the ``test_batch`` modes' error is also
    measured (default: ``rounds`` and the config's ``train.rounds``)."""
    from ..apps.defense import GuardOptions, guarded_train
    from ..config import load_config
    from ..simulator import build_problem, run_rounds

    load0 = list(os.getloadavg())
    path = Path(config) if config is not None else DEFAULT_CONFIG
    full_run = load_config(path).train.rounds
    cfg = load_config(path, [f"train.rounds={rounds}", f"train.eval_every={10**6}"])
    if error_rounds is None:
        error_rounds = tuple(sorted({rounds, full_run}))
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
    m = cfg.data.test_samples_per_node
    for tb in sorted({max(1, m // 4), max(1, m // 2)}):
        if tb < m:
            for order, tag in (("rotate", ""), ("first", ", first")):
                modes[f"track every round, pre, test_batch {tb}{tag}"] = GuardOptions(
                    track_every=1, readout="pre", eval_every=0, test_batch=tb,
                    test_batch_order=order)
                modes[f"track every 5th round, pre, test_batch {tb}{tag}"] = GuardOptions(
                    track_every=5, readout="pre", eval_every=0, test_batch=tb,
                    test_batch_order=order)
    slow = {f"{name} (fast paths off)": modes[name] for name in
            ("track every round, pre", "track every 5th round, pre")}
    modes.update(slow)
    from .. import _threads

    # every mode (and the plain loop) runs with one count, decided once
    with _threads.pinned_for(problem, m) as threads:
        def runner(o: Any, fast: bool) -> Any:
            def run() -> Any:
                with fast_paths(fast):
                    return guarded_train(problem, None, o, rounds=rounds)
            return run

        def core() -> Any:
            return run_rounds(problem, theta, None, 0, rounds)

        runs = {name: runner(o, name not in slow) for name, o in modes.items()}
        runs["core simulator run_rounds"] = core
        wall = {name: float("inf") for name in runs}
        cpu = dict(wall)
        for fn in runs.values():  # warm-up: first calls of torch.func, numba compile
            fn()
        for _ in range(repeats):  # alternated: a changing load hits every mode alike
            for name, fn in runs.items():
                w0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[name] = min(wall[name], time.perf_counter() - w0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
        base = next(iter(modes))
        results = []
        full: dict[tuple[int, int], Any] = {}  # (every, rounds) -> the full split's P
        for name in runs:
            rec: dict[str, Any] = {
                "mode": name, "s_per_round": wall[name] / rounds,
                "ratio": wall[name] / wall[base], "cpu_s_per_round": cpu[name] / rounds,
                "cpu_ratio": cpu[name] / cpu[base]}
            opts = modes.get(name)
            if opts is not None and opts.track_every and opts.defense is None \
                    and opts.readout == "pre" and name not in slow:
                rec["test_batch_order"] = opts.test_batch_order if opts.test_batch else None
                by: dict[str, Any] = {}
                for R in sorted({rounds, *error_rounds}):
                    P = guarded_train(problem, None, opts, rounds=R).tracker.cum
                    if opts.test_batch is None:
                        full[opts.track_every, R] = P
                    else:
                        by[str(R)] = score_error(P, full[opts.track_every, R])
                if by:
                    rec["error_vs_full_test_set"] = by[str(rounds)]
                    rec["error_vs_full_test_set_by_rounds"] = by
            results.append(rec)
    doc = {
        "benchmark": "proximal",
        "command": "dice bench proximal --json benchmarks/bench-proximal.json",
        "error_rounds": list(error_rounds),
        "loadavg": {"before": load0, "after": list(os.getloadavg())},
        "config": str(path.relative_to(DEFAULT_CONFIG.parents[1]))
        if path.resolve().is_relative_to(DEFAULT_CONFIG.parents[1]) else str(path),
        "setting": f"n={cfg.topology.n}, {cfg.data.dataset}, model {cfg.model.name} "
        f"{cfg.model.hidden}, batch {cfg.train.batch_size}, per-node test split "
        f"{cfg.data.test_samples_per_node}, {rounds} rounds, best of {repeats} alternated",
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "results": results,
    }
    if out is not None:
        write_json(out, doc)
    return doc
