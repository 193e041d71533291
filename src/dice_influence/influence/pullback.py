"""The pullback of one round's local step: the single piece of the reverse sweep that a node
computes on its own (docs/method.md §4, "the sweep on real peers").

Round ``t``'s local step of node ``j`` maps ``(θ_j^t, state_j^t)`` to ``(θ_j^{t+½},
state_j^{t+1})`` with ``θ^{t+½} = θ^t + T(u(θ^t, state^t, g(θ^t)))``, ``g`` the batch gradient,
``u`` the optimizer's update (linear in ``θ``, ``state`` and ``g``: SGD, heavy-ball or Nesterov
momentum, weight decay) and ``T`` the round's update transforms (attacks, free riders; affine in
``u``). Given cotangents ``λ`` on ``θ^{t+½}`` and ``λ_state`` on ``state^{t+1}``,
:func:`step_pullback` returns the cotangents on ``θ^t`` and ``state^t`` — the transposed
Jacobian ``(J^t)ᵀ``, Hessian term included (one forward-over-reverse pass; the batch loss's
Hessian is symmetric) — and, on request, every batch sample's score ``(1/B) c_gᵀ ∇ℓ_i``
(influence of removing sample ``i``; positive = harmful).

The simulator's whole-run sweep (:class:`~dice_influence.apps.contribution.ContributionObserver`,
all rows at once) and a real peer's sweep (:mod:`dice_influence.distributed.sweep`, its own row)
call the same function; ``p`` is anything with ``fm``, ``opt``, ``lr(t)``, ``batch(t)`` and
``transforms`` (a :class:`~dice_influence.problem.Problem` or a peer's
:class:`~dice_influence.distributed.local.LocalProblem`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import vjp

from ..gossip import repeat_rows
from .adjoint import _hvp_and_sample_dots, _update_transpose

CURVATURES = ("exact", "none")


def transform_transpose(transforms: Sequence[Any], t: int, ids: Sequence[int],
                        lam: torch.Tensor) -> torch.Tensor:
    """Cotangent on the honest update ``u`` from the cotangent ``lam`` (m, d) on the sent update
    ``T(u)`` of round ``t`` (rows = nodes ``ids``). Transforms are affine in ``u`` (scale, sign
    flip, replace by zero or noise: every built-in one), so the transpose is exact and taken at
    ``u = 0``. Without an active transform it is ``lam`` itself."""
    active = [tr for tr in transforms if tr.active(t)]
    if not active:
        return lam

    def f(u: torch.Tensor) -> torch.Tensor:
        for tr in active:
            u = tr.transform(t, list(ids), u)
        return u

    return vjp(f, torch.zeros_like(lam))[1](lam)[0]


def step_pullback(
    p: Any,
    theta: torch.Tensor,
    state: torch.Tensor | None,
    t: int,
    lam_th: torch.Tensor,
    lam_st: torch.Tensor | None,
    *,
    ids: Sequence[int] | None = None,
    curvature: str = "exact",
    want_theta: bool = True,
    want_scores: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(J^t)ᵀ`` of round ``t``'s local step of the rows ``theta`` (m, d) (node ids ``ids``,
    default ``0..m-1``; ``p.batch(t)`` must return those rows' batches) applied to cotangents
    ``lam_th`` (…, m, d) on ``θ^{t+½}`` and ``lam_st`` (same shape, or None) on ``state^{t+1}``;
    leading batch dimensions (several targets) are allowed.

    ``curvature="none"`` drops the Hessian term (the Hessian-free ablation; the optimizer's own
    linear map, momentum and weight decay, is kept). Returns ``(a_th, a_st, scores)``: the
    cotangents on ``θ^t`` and ``state^t`` (None when not wanted / stateless) and, with
    ``want_scores``, the samples' scores (…, m, B) in float64."""
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r}: choose one of {', '.join(CURVATURES)}")
    lead = lam_th.shape[:-2]
    m, d = theta.shape
    ids = list(range(m)) if ids is None else list(ids)
    fold = math.prod(lead)
    lr = p.lr(t)
    th = theta if fold == 1 else theta.repeat(fold, 1)
    st = None if state is None else (state if fold == 1 else state.repeat(fold, 1))
    lt = lam_th.reshape(fold * m, d)
    ls = None if lam_st is None else lam_st.reshape(fold * m, d)
    with torch.no_grad():
        lu = transform_transpose(getattr(p, "transforms", ()), t, ids * fold, lt)
        # the update's transpose with the cotangent that reaches u; θ's direct path keeps λ
        c_th, c_st, c_g = _update_transpose(p.opt, th, st, lr, lu, ls)
        if lu is not lt:
            c_th = c_th + (lt - lu)
        need_h = want_theta and curvature == "exact"
        hc = dls = None
        if need_h or want_scores:
            x, y = p.batch(t)
            if fold > 1:
                x, y = repeat_rows(x, fold), repeat_rows(y, fold)
            hc, dls = _hvp_and_sample_dots(p, th, c_g, x, y, need_h, want_scores)
    a_th = None
    if want_theta:
        a_th = (c_th + hc if hc is not None else c_th).reshape(*lead, m, d)
    a_st = None if c_st is None else c_st.reshape(*lead, m, d)
    scores = None
    if want_scores:
        scores = (dls / y.shape[1]).double().reshape(*lead, m, -1)
    return a_th, a_st, scores


def check_transposable(opt: Any, curvature: str) -> None:
    """Refuse an optimizer whose transpose needs its state's values (the sweeps keep only
    parameters): a stateful optimizer other than the built-in SGD/momentum/weight decay."""
    from ..gossip import Optimizer

    if type(opt) is not Optimizer and getattr(opt, "stateful", False) and curvature == "exact":
        raise ValueError(f"the reverse sweep supports the built-in optimizer (SGD, momentum, "
                         f"weight decay); {type(opt).__name__} is stateful and not linear in a "
                         "known way: use curvature: none or the built-in optimizer")
