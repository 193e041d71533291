"""DICE-GT: influence by exact counterfactual replay (docs/method.md §3, paper Defs. 2–3).

For an event (node ``j``, round ``t``, samples ``S``), round ``t`` is replayed with the weights
of ``S`` in ``j``'s batch loss set to zero (denominator kept). Removing the whole batch zeroes
every weight: the batch contributes no gradient, but momentum built from earlier rounds and
weight decay still act (under plain SGD that is "``j`` skips its update"). Every later round is
replayed identically. The factual network is replayed in the same batched computation as the
counterfactuals, so nodes the removal never reaches give exactly zero (identical inputs in
different rows of one batched computation can still differ in the last bit after mixing).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from .._util import progress_bar
from ..gossip import functional_step, node_losses, repeat_rows
from .common import (
    Event,
    InfluenceResult,
    mix_each,
    node_weights,
    reach_masks,
    validate_events,
)


def removal_weights(events: Sequence[Event], n: int, batch_size: int, dtype: torch.dtype,
                    device: torch.device) -> torch.Tensor:
    """Per-sample loss weights ``(1+E, n, B)``: row 0 is factual (all ones), row ``1+i`` has
    event ``i``'s samples at zero (the whole batch of its node for ``samples=None``)."""
    w = torch.ones(len(events) + 1, n, batch_size, dtype=dtype, device=device)
    for i, e in enumerate(events, start=1):
        if e.samples is None:
            w[i, e.node] = 0.0
        else:
            w[i, e.node, list(e.samples)] = 0.0
    return w


def batched_local_step(problem: Any, theta: torch.Tensor, state: torch.Tensor | None, t: int,
                       w: torch.Tensor | None = None):
    """Local step of ``R`` stacked copies of the network (pure): ``theta`` ``(R, n, d)``,
    optimizer ``state`` ``(R, n, d)`` or None, per-sample loss weights ``w`` ``(R, n, B)``
    (None = all ones). Returns ``θ^{t+½}`` and the new state, both ``(R, n, d)``."""
    R, n, d = theta.shape
    x, y = problem.batch(t)
    xr = x.repeat(R, *([1] * (x.ndim - 1)))
    yr = repeat_rows(y, R)
    st = None if state is None else state.reshape(R * n, d)
    half, new_state = functional_step(
        problem.fm, problem.opt, theta.reshape(R * n, d), st, xr, yr, problem.lr(t),
        w=None if w is None else w.reshape(R * n, -1), t=t, transforms=problem.transforms,
        ids=list(range(n)) * R)
    return half.reshape(R, n, d), None if new_state is None else new_state.reshape(R, n, d)


def test_losses(problem: Any, theta: torch.Tensor, per_node_test: bool) -> torch.Tensor:
    """Test loss of every node of ``R`` stacked networks ``(R, n, d)`` → ``(R, n)``."""
    R, n, d = theta.shape
    x, y = problem.test_set(per_node_test)
    if per_node_test:
        x = x.repeat(R, *([1] * (x.ndim - 1)))
        y = repeat_rows(y, R)
    with torch.no_grad():
        loss, _ = node_losses(problem.fm, theta.reshape(R * n, d), x, y)
    return loss.reshape(R, n)


def ground_truth(
    traj: Any,
    events: Sequence[Event],
    hops: int = 1,
    *,
    q: str | Sequence[float] | None = "uniform",
    per_node_test: bool = False,
    batch_events: int = 32,
    progress: bool = False,
) -> InfluenceResult:
    """DICE-GT of every event for ``r = 1..hops`` (and the horizon at ``t+hops``).

    Returns an :class:`InfluenceResult` (positive = harmful) whose ``per_node[e, s, k]`` is
    ``L(θ_k^{t+s}) − L(θ̃_k^{t+s})`` (``s = 0``: the source's half step). ``batch_events``
    counterfactual networks are replayed together (peak memory grows with it, not with the
    number of events; the values do not depend on it, to the bit)."""
    t0 = time.perf_counter()
    events = validate_events(traj, events, hops)
    p = traj.problem
    out = torch.zeros(len(events), hops + 1, p.n, dtype=torch.float64)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        groups[e.round].append(i)
    chunks = sum(-(-len(v) // batch_events) for v in groups.values())
    with progress_bar(progress, chunks, "DICE-GT") as advance:
        for t, idxs in sorted(groups.items()):
            theta_t, state_t = traj.params_at(t)
            for c in range(0, len(idxs), batch_events):
                chunk = idxs[c : c + batch_events]
                out[chunk] = _replay_chunk(p, theta_t, state_t, t, [events[i] for i in chunk],
                                           hops, per_node_test)
                advance()
    return InfluenceResult(
        method="DICE-GT", events=list(events), hops=hops, per_node=out,
        q=node_weights(p.n, q), reach=reach_masks(traj, events, hops),
        options={"q": q if isinstance(q, str) or q is None else list(q),
                 "per_node_test": per_node_test},
        seconds=time.perf_counter() - t0,
    )


def _replay_chunk(p: Any, theta_t: torch.Tensor, state_t: torch.Tensor | None, t: int,
                  events: list[Event], hops: int, per_node_test: bool) -> torch.Tensor:
    R = len(events) + 1
    res = torch.zeros(len(events), hops + 1, p.n, dtype=torch.float64)
    w = removal_weights(events, p.n, p.cfg.train.batch_size, p.dtype, p.device)
    theta = theta_t.expand(R, *theta_t.shape).clone()
    state = None if state_t is None else state_t.expand(R, *state_t.shape).clone()
    with torch.no_grad():
        half, state = batched_local_step(p, theta, state, t, w)
        lh = test_losses(p, half, per_node_test).double()
        src = torch.tensor([e.node for e in events])
        res[torch.arange(len(events)), 0, src] = lh[0, src] - lh[1 + torch.arange(len(events)), src]
        theta = mix_each(p.mixer(t), half)
        for s in range(1, hops + 1):
            ls = test_losses(p, theta, per_node_test).double()
            res[:, s, :] = ls[0] - ls[1:]
            if s < hops:
                half, state = batched_local_step(p, theta, state, t + s)
                theta = mix_each(p.mixer(t + s), half)
    return res
