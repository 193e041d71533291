"""The decentralized-SGD simulator: build a problem from a config and train it.

:func:`~dice_influence.problem.build_problem` turns a :class:`~dice_influence.config.RunConfig`
into a :class:`~dice_influence.problem.Problem`; :func:`train` runs Algorithm 1 (docs/method.md §2) and
returns a :class:`~dice_influence.trajectory.Trajectory` that replays any round bit-exactly.
This module is the public entry point; it re-exports the pieces users need.
"""

from __future__ import annotations

from .config import RunConfig
from .loop import run_rounds
from .problem import (
    Problem,
    build_corruptions,
    build_functional_model,
    build_optimizer,
    build_partition,
    build_problem,
    build_schedule,
    build_test_partition,
    build_validation,
    run_dtype,
    run_lr,
)
from .trajectory import Trajectory

__all__ = [
    "Problem", "Trajectory", "build_corruptions", "build_functional_model", "build_optimizer",
    "build_partition", "build_problem", "build_schedule", "build_test_partition",
    "build_validation", "run_dtype", "run_lr", "run_rounds", "train",
]


def train(cfg: RunConfig | Problem, *, progress: bool | None = None, rounds: int | None = None):
    """Run decentralized SGD for ``cfg.train.rounds`` rounds and record a Trajectory.
    ``progress``: a line while the data and model are built, then a bar over the rounds;
    default (None): only when stderr is a terminal."""
    import sys

    if progress is None:
        progress = sys.stderr.isatty()
    if progress and not isinstance(cfg, Problem):  # the data and model come before the bar
        from .config import data_label, model_label

        print(f"building the problem: {data_label(cfg)} data of {cfg.topology.n} nodes "
              f"({cfg.topology.name} graph), model {model_label(cfg)}", file=sys.stderr,
              flush=True)
    problem = cfg if isinstance(cfg, Problem) else build_problem(cfg)
    traj = Trajectory.start(problem)
    traj.run(rounds if rounds is not None else problem.cfg.train.rounds, progress=progress)
    return traj
