"""DICE-E: first-order influence estimates by pushing a tangent through the rounds (SPEC §4).

With ``δ = θ − θ̃`` (factual minus counterfactual):

- at the event round only the source differs: ``δ_j^{t+½} = Δ = u_j^t − ũ_j^t`` (computed
  exactly: the difference of two local steps at the same ``θ_j^t``);
- gossip: ``δ^{s+1} = W^s δ^{s+½}``;
- later local steps: ``δ^{s+½} = J^s δ^s`` — the Jacobian of the functional local step
  (``I − η H`` for plain SGD; optimizer state included), applied with ``torch.func.jvp``
  (forward-over-reverse), batched over events with ``vmap``. ``curvature=False`` uses ``J = I``;
- read-out ``L(θ_k^s) − L(θ̃_k^s) ≈ ∇L(θ_k^s)ᵀ δ_k^s`` (``readout="linear"``; the self term
  uses ``∇L(θ_j^t)`` as in Prop. 1) or ``∇L(θ_k^s − δ_k^s/2)ᵀ δ_k^s`` (``"midpoint"``, exact
  for quadratic losses).

``paths="exact"`` (default) is the first-order expansion of DICE-GT (set-based reach, every
walk including self-loops). ``paths="paper"`` is the printed Theorem 1: walks over out-
neighbours without self-loops (``W`` with its diagonal removed), Hessians at the intermediate
nodes, summed over every walk end point.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import jvp

from ..gossip import Mixer, loss_grads, node_grads
from ..loop import run_rounds
from .common import Event, InfluenceResult, node_weights, reach_masks, validate_events
from .ground_truth import removal_weights

READOUTS = ("linear", "midpoint")
PATHS = ("exact", "paper")


def estimate(
    traj: Any,
    events: Sequence[Event],
    hops: int = 1,
    *,
    curvature: bool = True,
    readout: str = "linear",
    paths: str = "exact",
    q: str | Sequence[float] | None = "uniform",
    per_node_test: bool = False,
    batch_events: int = 64,
) -> InfluenceResult:
    """DICE-E of every event for ``r = 1..hops`` (positive = harmful).

    Cost: ``hops`` rounds of one Jacobian-vector product per node and event (linear in
    ``hops``), plus one test gradient per node and round (and per event for ``midpoint``)."""
    if readout not in READOUTS:
        raise ValueError(f"readout={readout!r}; choose one of {READOUTS}")
    if paths not in PATHS:
        raise ValueError(f"paths={paths!r}; choose one of {PATHS}")
    t0 = time.perf_counter()
    events = validate_events(traj, events, hops)
    p = traj.problem
    out = torch.zeros(len(events), hops + 1, p.n, dtype=torch.float64)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        groups[e.round].append(i)
    for t, idxs in sorted(groups.items()):
        theta_t, state_t = traj.params_at(t)
        for c in range(0, len(idxs), batch_events):
            chunk = idxs[c : c + batch_events]
            out[chunk] = _tangent_chunk(p, theta_t, state_t, t, [events[i] for i in chunk],
                                        hops, curvature, readout, paths, per_node_test)
    reach = reach_masks(traj, events, hops)
    if paths == "paper":
        reach[:, 1:, :] = True  # the printed theorem sums over every walk end point
    return InfluenceResult(
        method="DICE-E", events=list(events), hops=hops, per_node=out,
        q=node_weights(p.n, q), reach=reach,
        options={"curvature": curvature, "readout": readout, "paths": paths,
                 "q": q if isinstance(q, str) or q is None else list(q),
                 "per_node_test": per_node_test},
        seconds=time.perf_counter() - t0,
    )


def source_delta(p: Any, theta_t: torch.Tensor, state_t: torch.Tensor | None, t: int,
                 events: list[Event]):
    """``Δ`` (E, d) = factual minus counterfactual half step of each source, its optimizer
    state difference (or None), and the factual half steps of the sources (E, d). Both steps
    are computed exactly, in one batched call over the 2E source rows."""
    E = len(events)
    w, skip = removal_weights(events, p.n, p.cfg.train.batch_size, p.dtype, p.device)
    src = torch.tensor([e.node for e in events])
    ar = 1 + torch.arange(E)
    x, y = p.batch(t)
    rows = torch.cat([src, src])
    th = theta_t[rows]
    st = None if state_t is None else state_t[rows]
    with torch.no_grad():
        wts = torch.cat([torch.ones_like(w[ar, src]), w[ar, src]])
        g = node_grads(p.fm, th, x[rows], y[rows], wts)
        u, new_state = p.opt.update(th, st, g, p.lr(t))
        sk = torch.cat([torch.zeros(E, dtype=torch.bool), skip[ar, src]])[:, None]
        u = torch.where(sk, torch.zeros_like(u), u)
        half = th + u
        delta = half[:E] - half[E:]
        dstate = None
        if new_state is not None:
            new_state = torch.where(sk, st, new_state)
            dstate = new_state[:E] - new_state[E:]
    return delta, dstate, half[:E]


def _readout(p: Any, theta: torch.Tensor, delta: torch.Tensor, readout: str,
             per_node_test: bool) -> torch.Tensor:
    """``∇L(θ_k)ᵀ δ_ek`` (linear) or ``∇L(θ_k − δ_ek/2)ᵀ δ_ek`` (midpoint) → (E, n)."""
    x, y = p.test_set(per_node_test)
    E, n, d = delta.shape
    if readout == "linear":
        G = loss_grads(p.fm, theta, x, y)[1]
        return (delta * G).sum(-1).double()
    pts = (theta - 0.5 * delta).reshape(E * n, d)
    if per_node_test:
        x = x.repeat(E, *([1] * (x.ndim - 1)))
        y = y.repeat(E, 1)
    G = loss_grads(p.fm, pts, x, y)[1].reshape(E, n, d)
    return (delta * G).sum(-1).double()


def _step_jvp(p: Any, theta: torch.Tensor, state: torch.Tensor | None, t: int,
              dtheta: torch.Tensor, dstate: torch.Tensor | None):
    """Jacobian of the local step of round ``t`` at ``(θ, state)`` applied to a batch of
    tangents ``dtheta`` (E, n, d) (and ``dstate``): forward-over-reverse ``jvp``. The E events
    are folded into the node axis (the primal repeated), which keeps every matmul a plain
    batched one."""
    E, n, d = dtheta.shape
    x, y = p.batch(t)
    xr = x.repeat(E, *([1] * (x.ndim - 1)))
    yr = y.repeat(E, 1)
    lr = p.lr(t)
    th = theta.repeat(E, 1)
    tan = dtheta.reshape(E * n, d)
    if state is None:
        def step(v):
            u, _ = p.opt.update(v, None, node_grads(p.fm, v, xr, yr), lr)
            return v + u

        return jvp(step, (th,), (tan,))[1].reshape(E, n, d), None

    def step_s(v, st):
        u, ns = p.opt.update(v, st, node_grads(p.fm, v, xr, yr), lr)
        return v + u, ns

    _, (dt, ds) = jvp(step_s, (th, state.repeat(E, 1)), (tan, dstate.reshape(E * n, d)))
    return dt.reshape(E, n, d), ds.reshape(E, n, d)


def _tangent_chunk(p: Any, theta_t: torch.Tensor, state_t: torch.Tensor | None, t: int,
                   events: list[Event], hops: int, curvature: bool, readout: str, paths: str,
                   per_node_test: bool) -> torch.Tensor:
    E, n, d = len(events), p.n, p.d
    res = torch.zeros(E, hops + 1, n, dtype=torch.float64)
    src = torch.tensor([e.node for e in events])
    ar = torch.arange(E)
    delta, dstate_src, half_src = source_delta(p, theta_t, state_t, t, events)
    x, y = p.test_set(per_node_test)
    # self term (s = 0): gradient at θ_j^t (Prop. 1) or at the midpoint of the half steps
    xs, ys = (x[src], y[src]) if per_node_test else (x, y)
    at = theta_t[src] if readout == "linear" else half_src - 0.5 * delta
    with torch.no_grad():
        G = loss_grads(p.fm, at, xs, ys)[1]
        res[ar, 0, src] = (G * delta).sum(-1).double()
    dtheta = torch.zeros(E, n, d, dtype=p.dtype, device=p.device)
    dtheta[ar, src] = delta
    dstate = None
    if dstate_src is not None:
        dstate = torch.zeros_like(dtheta)
        dstate[ar, src] = dstate_src
    theta, state = theta_t, state_t
    for s in range(1, hops + 1):
        r = t + s - 1  # the round whose gossip brings the tangent to round t+s
        mix = p.mixer(r) if paths == "exact" else _off_diagonal(p, r)
        with torch.no_grad():
            dtheta = mix(dtheta)  # optimizer state is local: it is not gossiped
            theta, state = run_rounds(p, theta, state, r, r + 1)
            res[:, s, :] = _readout(p, theta, dtheta, readout, per_node_test)
        if s < hops:
            if curvature:
                dtheta, dstate = _step_jvp(p, theta, state, t + s, dtheta, dstate)
                dtheta = dtheta.detach()
                dstate = None if dstate is None else dstate.detach()
            # curvature=False: J = I (the Hessian-free ablation); the state tangent is kept
    return res


def _off_diagonal(p: Any, r: int) -> Mixer:
    W = p.W(r).copy()
    W[range(p.n), range(p.n)] = 0.0
    return Mixer(W, dtype=p.dtype, device=p.device)
