"""The simulator's answer to what the peers compute: final parameters and proximal influence.

:func:`simulate` runs the vectorized simulator (:mod:`dice_influence.simulator`) and, alongside,
the proximal-influence matrix ``P`` (SPEC §5, via
:func:`dice_influence.influence.proximal.proximal_matrix`) with the same read-out, test sets,
``q`` and detection rule as the peers. Without drops its parameters are those of
:func:`dice_influence.simulator.run_rounds`; with detection on, dropped edges are removed from
``W^t`` and rows renormalised exactly as the peers do. Used by the equivalence tests and the
benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import RunConfig
from ..influence.proximal import proximal_matrix
from ..problem import Problem, build_problem
from .settings import DistributedSettings, distributed_settings


@dataclass
class Reference:
    """Final ``theta`` (n, d), cumulative ``P`` (n, n) (``P[k, j]``: sender ``j`` on receiver
    ``k``; positive = harmful) and the drop events ``(round, receiver, sender)``."""

    theta: torch.Tensor
    P: np.ndarray
    drops: list[tuple[int, int, int]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def effective_W(W: np.ndarray, dropped: np.ndarray) -> np.ndarray:
    """``W`` without dropped edges (``dropped[k, j]``), rows that lost weight renormalised; a row
    left with no weight at all keeps only its own parameters."""
    We = np.where(dropped, 0.0, W)
    lost = (np.where(dropped, W, 0.0) > 0).any(1)
    for k in np.flatnonzero(lost):
        s = We[k].sum()
        if s > 0:
            We[k] = We[k] / s
        else:
            We[k] = 0.0
            We[k, k] = 1.0
    return We


def simulate(
    cfg: RunConfig | Problem, settings: DistributedSettings | None = None, rounds: int | None = None
) -> Reference:
    """Simulator run of ``cfg`` with the peers' proximal influence and detection rule."""
    problem = cfg if isinstance(cfg, Problem) else build_problem(cfg)
    s = settings or distributed_settings(problem.cfg)
    n = problem.n
    own = s.test_set == "own" or (s.test_set == "auto" and problem.node_test is not None)
    q = torch.full((n,), 1.0 / n if s.q == "uniform" else 1.0, dtype=problem.dtype)
    theta = problem.init_theta()
    state = problem.opt.init_state(theta)
    P = np.zeros((n, n))
    dropped = np.zeros((n, n), dtype=bool)
    drops: list[tuple[int, int, int]] = []
    det = s.detection
    total = problem.cfg.train.rounds if rounds is None else rounds
    for t in range(total):
        W = effective_W(problem.W(t), dropped)
        Wt = torch.as_tensor(W, dtype=problem.dtype)
        with torch.no_grad():
            half, new_state = problem.local_step(theta, state, t)
            U = half - theta
            G = problem.test_loss_grads(theta, per_node=own)[1] if s.readout == "pre" else None
            new = Wt @ half if dropped.any() else problem.mixer(t)(half)
            if G is None:
                G = problem.test_loss_grads(new, per_node=own)[1]
            Pt = proximal_matrix(G, Wt, U, q)
        P += Pt.double().numpy()
        if det.enabled and t + 1 >= det.warmup:
            flag = (W > 0) & ~np.eye(n, dtype=bool) & (P > det.threshold) & ~dropped
            for k, j in zip(*np.nonzero(flag), strict=True):
                drops.append((t, int(k), int(j)))
            dropped |= flag
        theta, state = new, new_state
    return Reference(theta=theta, P=P, drops=drops)
