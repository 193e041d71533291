"""The training loop: composes the round over t (SPEC §2).

:func:`run_rounds` is the fast in-place loop that trains and replays factual rounds, so replays
are bit-identical to training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .gossip import node_grad_list, param_views
from .problem import Problem


def run_rounds(
    problem: Problem,
    theta: torch.Tensor,
    state: torch.Tensor | None,
    start: int,
    stop: int,
    *,
    on_round: Callable[[int, torch.Tensor, torch.Tensor | None], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fast in-place training from round ``start`` to ``stop`` (exclusive); ``theta`` and
    ``state`` are consumed. ``on_round(t+1, theta, state)`` is called after each round.

    This is the one code path for training and for replaying factual rounds, so replays are
    bit-identical to training."""
    fm = problem.fm
    theta = theta.clone()
    state = None if state is None else state.clone()
    state_views = None if state is None else param_views(fm, state)
    spare = torch.empty_like(theta)
    with torch.no_grad():
        for t in range(start, stop):
            x, y = problem.batch(t)
            with torch.enable_grad():
                g = node_grad_list(fm, theta, x, y)
            problem.opt.update_(param_views(fm, theta), state_views, g, problem.lr(t))
            problem.mixer(t)(theta, out=spare)
            theta, spare = spare, theta
            if on_round is not None:
                on_round(t + 1, theta, state)
    return theta, state
