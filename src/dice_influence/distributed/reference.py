"""The simulator's answer to what the peers compute: final parameters, proximal influence, drops.

:func:`simulate` runs the one loop (:class:`~dice_influence.loop.Loop`) with exactly the plug-ins
the peers run (:func:`~dice_influence.distributed.settings.peer_plugin_config`): the same
observer objects, the same policy, the same row-repair rule. Used by the equivalence tests and
the benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..loop import Loop
from ..plugins import build
from ..problem import Problem, build_problem
from .settings import DistributedSettings, peer_plugin_config


@dataclass
class Reference:
    """Final ``theta`` (n, d), cumulative ``P`` (n, n) (``P[k, j]``: sender ``j`` on receiver
    ``k`` with the weights used; positive = harmful) and the drop events ``(round, receiver,
    sender)`` (re-admissions, if the policy allows them, in ``readmits``)."""

    theta: torch.Tensor
    P: np.ndarray
    drops: list[tuple[int, int, int]] = field(default_factory=list)
    readmits: list[tuple[int, int, int]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def simulate(
    cfg: RunConfig | Problem, settings: DistributedSettings | None = None, rounds: int | None = None
) -> Reference:
    """Simulator run of ``cfg`` with the peers' plug-ins (``settings`` is accepted for
    compatibility; the plug-ins come from the config)."""
    problem = cfg if isinstance(cfg, Problem) else build_problem(cfg)
    pcfg = peer_plugin_config(problem.cfg)
    plugins = build(pcfg, problem)
    loop = Loop.from_plugins(problem, plugins)
    theta = problem.init_theta()
    state = problem.opt.init_state(theta)
    total = problem.cfg.train.rounds if rounds is None else rounds
    theta, _ = loop.run(theta, state, 0, total)
    prox = plugins.find("proximal")
    log = getattr(plugins.policy, "prune_log", [])
    return Reference(
        theta=theta,
        P=prox.tracker.cum.numpy().copy(),
        drops=[(t, k, j) for t, k, j, s in log if s > 0],
        readmits=[(t, k, j) for t, k, j, s in log if s < 0],
    )
