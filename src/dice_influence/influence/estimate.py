"""DICE-E: first-order influence estimates by pushing a tangent through the rounds (docs/method.md §4).

With ``δ = θ − θ̃`` (factual minus counterfactual):

- at the event round only the source differs: ``δ_j^{t+½} = Δ = u_j^t − ũ_j^t`` (computed
  exactly: the difference of two local steps at the same ``θ_j^t``; a removed batch has every
  sample weight zero, momentum and weight decay still act);
- gossip: ``δ^{s+1} = W^s δ^{s+½}``;
- later local steps: ``δ^{s+½} = J^s δ^s`` — the Jacobian of the functional local step
  (``I − η H`` for plain SGD; optimizer state included), applied with ``torch.func.jvp``
  (forward-over-reverse), batched over events. ``propagation="factual"`` takes ``J`` at the
  factual point ``θ``; ``"midpoint"`` at ``θ − δ/2`` (the secant's midpoint rule: each step's
  error becomes third order instead of second; it matters for large perturbations).
  ``curvature=False`` uses ``J = I``;
- read-out ``L(θ_k^s) − L(θ̃_k^s)``:

  * ``"linear"`` (the paper's Prop. 1; alias ``"paper"``): ``∇L(θ_k^s)ᵀ δ_k^s``, the self term
    with ``∇L(θ_j^t)`` at the pre-step point;
  * ``"factual"``: every gradient at the factual point, the self term at ``θ_j^{t+½}``;
  * ``"midpoint"``: ``∇L(θ_k^s − δ_k^s/2)ᵀ δ_k^s`` (exact for quadratic losses).

  The first two are linear in ``Δ`` (so the adjoint can compute them for every sample at
  once); they differ only in the self term.

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

from .._util import progress_bar
from ..gossip import Mixer, functional_step, loss_grads, repeat_rows
from .common import (
    Event,
    InfluenceResult,
    factual_path,
    mix_each,
    node_weights,
    reach_masks,
    validate_events,
)
from .ground_truth import removal_weights

READOUTS = ("linear", "factual", "midpoint")
READOUT_ALIASES = {"paper": "linear"}
PROPAGATIONS = ("factual", "midpoint")
PATHS = ("exact", "paper")


def check_readout(readout: str, allowed: Sequence[str] = READOUTS) -> str:
    """The canonical read-out name (``"paper"`` → ``"linear"``); ValueError naming the choices."""
    name = READOUT_ALIASES.get(readout, readout)
    if name not in allowed:
        raise ValueError(f"readout={readout!r}; choose one of {tuple(allowed)}"
                         + (" ('paper' is an alias of 'linear')" if "linear" in allowed else ""))
    return name


def estimate(
    traj: Any,
    events: Sequence[Event],
    hops: int = 1,
    *,
    curvature: bool = True,
    readout: str = "linear",
    propagation: str = "factual",
    paths: str = "exact",
    q: str | Sequence[float] | None = "uniform",
    per_node_test: bool = False,
    batch_events: int = 64,
    progress: bool = False,
) -> InfluenceResult:
    """DICE-E of every event for ``r = 1..hops`` (positive = harmful).

    ``readout``: ``"linear"`` (paper, Prop. 1), ``"factual"`` or ``"midpoint"`` (see the module
    docstring); ``propagation``: ``"factual"`` or ``"midpoint"`` (where each later step's
    Jacobian is taken). Cost: ``hops`` rounds of one Jacobian-vector product per node and event
    (linear in ``hops``), one factual replay of the ``hops`` rounds per event round, and one
    test gradient per node and round (per event and node for ``readout="midpoint"``).
    ``batch_events`` events are pushed together: peak memory grows with it, not with the
    number of events; the values do not depend on it, to the bit."""
    readout = check_readout(readout)
    if propagation not in PROPAGATIONS:
        raise ValueError(f"propagation={propagation!r}; choose one of {PROPAGATIONS}")
    if paths not in PATHS:
        raise ValueError(f"paths={paths!r}; choose one of {PATHS}")
    t0 = time.perf_counter()
    events = validate_events(traj, events, hops)
    p = traj.problem
    out = torch.zeros(len(events), hops + 1, p.n, dtype=torch.float64)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(events):
        groups[e.round].append(i)
    chunks = sum(-(-len(v) // batch_events) for v in groups.values())
    with progress_bar(progress, chunks, "DICE-E") as advance:
        for t, idxs in sorted(groups.items()):
            path = _Factual(p, factual_path(traj, t, t + hops), t, per_node_test)
            for c in range(0, len(idxs), batch_events):
                chunk = idxs[c : c + batch_events]
                out[chunk] = _tangent_chunk(p, path, [events[i] for i in chunk], hops,
                                            curvature, readout, propagation, paths,
                                            per_node_test)
                advance()
    reach = reach_masks(traj, events, hops)
    if paths == "paper":
        reach[:, 1:, :] = True  # the printed theorem sums over every walk end point
    return InfluenceResult(
        method="DICE-E", events=list(events), hops=hops, per_node=out,
        q=node_weights(p.n, q), reach=reach,
        options={"curvature": curvature, "readout": readout, "propagation": propagation,
                 "paths": paths, "q": q if isinstance(q, str) or q is None else list(q),
                 "per_node_test": per_node_test},
        seconds=time.perf_counter() - t0,
    )


class _Factual:
    """The factual rounds ``t..t+hops`` of one event round, shared by every chunk of events:
    parameters, optimizer states and (for the linear read-outs) test gradients."""

    def __init__(self, p: Any, path: list, t: int, per_node_test: bool):
        self.t = t
        self.thetas = [th for th, _ in path]
        self.states = [st for _, st in path]
        self._p, self._pnt = p, per_node_test
        self._grads: dict[int, torch.Tensor] = {}

    def test_grad(self, s: int) -> torch.Tensor:
        """``∇L(θ_k^{t+s})`` of every node (n, d), computed once."""
        if s not in self._grads:
            x, y = self._p.test_set(self._pnt)
            with torch.no_grad():
                self._grads[s] = loss_grads(self._p.fm, self.thetas[s], x, y)[1]
        return self._grads[s]


def source_delta(p: Any, theta_t: torch.Tensor, state_t: torch.Tensor | None, t: int,
                 events: list[Event]):
    """``Δ`` (E, d) = factual minus counterfactual half step of each source, its optimizer
    state difference (or None), and the factual half steps of the sources (E, d). Both steps
    are computed exactly, in one batched call over the 2E source rows; a removed batch has all
    its sample weights zero (momentum and weight decay still act)."""
    E = len(events)
    w = removal_weights(events, p.n, p.cfg.train.batch_size, p.dtype, p.device)
    src = torch.tensor([e.node for e in events])
    ar = 1 + torch.arange(E)
    x, y = p.batch(t)
    rows = torch.cat([src, src])
    th = theta_t[rows]
    st = None if state_t is None else state_t[rows]
    with torch.no_grad():
        wts = torch.cat([torch.ones_like(w[ar, src]), w[ar, src]])
        half, new_state = functional_step(p.fm, p.opt, th, st, x[rows], y[rows], p.lr(t),
                                          w=wts, t=t, transforms=p.transforms,
                                          ids=rows.tolist())
        delta = half[:E] - half[E:]
        dstate = None if new_state is None else new_state[:E] - new_state[E:]
    return delta, dstate, half[:E]


def _readout(p: Any, path: _Factual, s: int, delta: torch.Tensor, readout: str,
             per_node_test: bool) -> torch.Tensor:
    """``∇L(θ_k)ᵀ δ_ek`` (linear, factual) or ``∇L(θ_k − δ_ek/2)ᵀ δ_ek`` (midpoint) → (E, n)."""
    E, n, d = delta.shape
    if readout != "midpoint":
        return (delta * path.test_grad(s)).sum(-1).double()
    x, y = p.test_set(per_node_test)
    pts = (path.thetas[s] - 0.5 * delta).reshape(E * n, d)
    if per_node_test:
        x = x.repeat(E, *([1] * (x.ndim - 1)))
        y = repeat_rows(y, E)
    G = loss_grads(p.fm, pts, x, y)[1].reshape(E, n, d)
    return (delta * G).sum(-1).double()


def _step_jvp(p: Any, theta: torch.Tensor, state: torch.Tensor | None, t: int,
              dtheta: torch.Tensor, dstate: torch.Tensor | None, midpoint: bool = False):
    """Jacobian of the local step of round ``t`` applied to a batch of tangents ``dtheta``
    (E, n, d) (and ``dstate``): forward-over-reverse ``jvp``, taken at ``(θ, state)`` or, with
    ``midpoint``, at ``(θ − δ/2, state − δstate/2)`` per event. The E events are folded into
    the node axis (the primal repeated), which keeps every matmul a plain batched one."""
    E, n, d = dtheta.shape
    x, y = p.batch(t)
    xr = x.repeat(E, *([1] * (x.ndim - 1)))
    yr = repeat_rows(y, E)
    lr = p.lr(t)
    tan = dtheta.reshape(E * n, d)
    th = (theta - 0.5 * dtheta).reshape(E * n, d) if midpoint else theta.repeat(E, 1)
    ids = list(range(n)) * E

    def step_s(v, st):
        return functional_step(p.fm, p.opt, v, st, xr, yr, lr, t=t, transforms=p.transforms,
                               ids=ids)

    if state is None:
        return jvp(lambda v: step_s(v, None)[0], (th,), (tan,))[1].reshape(E, n, d), None

    st = (state - 0.5 * dstate).reshape(E * n, d) if midpoint else state.repeat(E, 1)
    _, (dt, ds) = jvp(step_s, (th, st), (tan, dstate.reshape(E * n, d)))
    return dt.reshape(E, n, d), ds.reshape(E, n, d)


def _tangent_chunk(p: Any, path: _Factual, events: list[Event], hops: int, curvature: bool,
                   readout: str, propagation: str, paths: str,
                   per_node_test: bool) -> torch.Tensor:
    E, n, d = len(events), p.n, p.d
    t = path.t
    theta_t, state_t = path.thetas[0], path.states[0]
    res = torch.zeros(E, hops + 1, n, dtype=torch.float64)
    src = torch.tensor([e.node for e in events])
    ar = torch.arange(E)
    delta, dstate_src, half_src = source_delta(p, theta_t, state_t, t, events)
    x, y = p.test_set(per_node_test)
    # self term (s = 0): gradient at θ_j^t (paper, Prop. 1), at the factual half step θ_j^{t+½}
    # (factual) or at the midpoint of the two half steps
    xs, ys = (x[src], y[src]) if per_node_test else (x, y)
    at = {"linear": theta_t[src], "factual": half_src,
          "midpoint": half_src - 0.5 * delta}[readout]
    with torch.no_grad():
        G = loss_grads(p.fm, at, xs, ys)[1]
        res[ar, 0, src] = (G * delta).sum(-1).double()
    dtheta = torch.zeros(E, n, d, dtype=p.dtype, device=p.device)
    dtheta[ar, src] = delta
    dstate = None
    if dstate_src is not None:
        dstate = torch.zeros_like(dtheta)
        dstate[ar, src] = dstate_src
    for s in range(1, hops + 1):
        r = t + s - 1  # the round whose gossip brings the tangent to round t+s
        mix = p.mixer(r) if paths == "exact" else _off_diagonal(p, r)
        with torch.no_grad():
            dtheta = mix_each(mix, dtheta)  # optimizer state is local: it is not gossiped
            res[:, s, :] = _readout(p, path, s, dtheta, readout, per_node_test)
        if s < hops and curvature:
            dtheta, dstate = _step_jvp(p, path.thetas[s], path.states[s], t + s, dtheta,
                                       dstate, midpoint=propagation == "midpoint")
            dtheta = dtheta.detach()
            dstate = None if dstate is None else dstate.detach()
        # curvature=False: J = I (the Hessian-free ablation); the state tangent is kept
    return res


def _off_diagonal(p: Any, r: int) -> Mixer:
    W = p.W(r).copy()
    W[range(p.n), range(p.n)] = 0.0
    return Mixer(W, dtype=p.dtype, device=p.device)
