"""Benchmark: cost of the contribution observer against plain training (``dice bench
contribution``).

For each config (default: the all-clean digits scenario the Spearman ≥ 0.95 target is graded on,
the Fashion-MNIST scenario, and the graded digits scenario over 200 rounds, the setting whose
sweep ``benchmarks/peer_sweep.py`` times on real peers), three arms run alternately on the same seed, ``repeats`` times
after a warm-up: plain training (the one loop, no plug-in), training with the config's
contribution observer (proximal ledger, free-rider alignment and the whole-run adjoint sweep),
and the same with the fast paths switched off (:mod:`dice_influence.bench.fastpaths`: the state
before they existed, up to the alignment now reading the ledger's dot products). Per arm the
fastest repeat counts (other jobs only add time).

Keys per config: ``online_overhead`` = CPU time (``process_time``) of training with the observer
/ plain training (what ``dice experiment contribution`` reports under the same name),
``online_overhead_wall`` the wall-clock ratio, ``sweep_over_training`` = the observer's reverse
sweep / plain training of the rounds it covers (the whole run), CPU time (``_wall``: wall
time), ``online_over_training`` = the observer's per-round work (test gradients, ledger,
alignment; wall) / plain training.
Every arm of a config runs with one thread count (``threads``), chosen once by the project's
rule for the observer's workload. ``loadavg`` is recorded before and after: the machine may be
shared. Nothing here asserts a time.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._util import write_json

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CONFIGS = ("configs/contribution-digits-clean.yaml", "configs/contribution-fmnist.yaml",
                   "configs/contribution-digits.yaml@train.rounds=200")
"""A config may carry overrides after ``@`` (comma-separated): the last entry is the setting of
``benchmarks/peer_sweep.py`` (16 nodes, 200 rounds), whose peers' sweep costs 2.33× training."""


def _setting(path: Path, sets: Sequence[str] = ()) -> tuple[Any, Any]:
    from ..config import load_config
    from ..experiments.contribution import (
        build_scenario,
        parse_experiment,
        with_contribution_observer,
    )

    cfg = with_contribution_observer(load_config(path, list(sets)))
    problem, _ = build_scenario(cfg, parse_experiment(cfg))
    return cfg, problem


def _arms(cfg: Any, problem: Any) -> dict[str, Callable[[], Any]]:
    from ..loop import Loop
    from ..plugins import build
    from .fastpaths import fast_paths

    theta0 = problem.init_theta()
    state0 = problem.opt.init_state(theta0)
    rounds = cfg.train.rounds

    def plain() -> None:
        Loop(problem).run(theta0, state0, 0, rounds)
        return None

    def measured(fast: bool) -> Callable[[], Any]:
        def run() -> Any:
            with fast_paths(fast):
                plugins = build(cfg, problem)
                Loop.from_plugins(problem, plugins).run(theta0, state0, 0, rounds)
            return plugins.find("contribution")

        return run

    return {"plain": plain, "observer": measured(True), "observer, fast paths off": measured(False)}


def bench_config(path: str | Path, *, repeats: int = 5, log: Callable[[str], None] | None = None
                 ) -> dict[str, Any]:
    """Time the three arms on one config (module docstring); returns its record."""
    spec, _, over = str(path).partition("@")
    sets = [x for x in over.split(",") if x]
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    cfg, problem = _setting(path, sets)
    arms = _arms(cfg, problem)
    from .. import _threads
    from ..loop import Loop

    wall: dict[str, list[float]] = {k: [] for k in arms}
    cpu: dict[str, list[float]] = {k: [] for k in arms}
    seconds: dict[str, dict[str, float]] = {}
    # one count for every arm (plain training too): the rule's, for the observer's workload
    with _threads.pinned_for(problem, Loop(problem, [])._test_rows()) as threads:
        for fn in arms.values():  # warm-up: first calls of torch.func and numba compile
            fn()
        for r in range(repeats):
            for name, fn in arms.items():
                w0, c0 = time.perf_counter(), time.process_time()
                obs = fn()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
                if obs is not None:
                    best = min(wall[name]) == wall[name][-1]
                    if best or name not in seconds:
                        seconds[name] = dict(obs.seconds)
            if log:
                log(f"  {path.name}: repeat {r + 1}/{repeats} done")
    base_w, base_c = min(wall["plain"]), min(cpu["plain"])
    out: dict[str, Any] = {
        "config": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "overrides": sets,
        "setting": f"n={problem.n}, {cfg.data.dataset}, model {cfg.model.name} "
                   f"{cfg.model.hidden}, d={problem.d}, batch {cfg.train.batch_size}, "
                   f"{cfg.train.rounds} rounds, best of {repeats}",
        "plain_seconds": base_w, "plain_cpu_seconds": base_c, "threads": threads, "arms": {},
    }
    for name in arms:
        if name == "plain":
            continue
        s = seconds[name]
        out["arms"][name] = {
            "seconds": min(wall[name]), "cpu_seconds": min(cpu[name]),
            "online_overhead": min(cpu[name]) / base_c,
            "online_overhead_wall": min(wall[name]) / base_w,
            "observer_seconds": s,
            "sweep_over_training": s["sweep_cpu"] / base_c,
            "sweep_over_training_wall": s["sweep"] / base_w,
            "online_over_training": s["online"] / base_w,
        }
    return out


def bench_contribution(configs: Sequence[str | Path] = DEFAULT_CONFIGS, *, repeats: int = 5,
                       out: str | Path | None = None,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run :func:`bench_config` on each config; write and return the JSON document."""
    load0 = list(os.getloadavg())
    results = [bench_config(c, repeats=repeats, log=log) for c in configs]
    doc = {
        "benchmark": "contribution",
        "command": "dice bench contribution --json benchmarks/bench-contribution.json",
        "loadavg": {"before": load0, "after": list(os.getloadavg())},
        "definitions": {
            "online_overhead": "CPU time with the contribution observer / plain training",
            "online_overhead_wall": "wall time with the observer / plain training",
            "sweep_over_training": "the observer's reverse sweep / plain training of the "
                                   "rounds it covers (the whole run), CPU time",
            "sweep_over_training_wall": "the same, wall time",
            "online_over_training": "the observer's per-round work (wall) / plain training",
        },
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "results": results,
    }
    if out is not None:
        write_json(out, doc)
    return doc
