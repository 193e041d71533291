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
:class:`~dice_influence.distributed.local.LocalProblem`). The adjoint sweep of a window
(:mod:`~dice_influence.influence.adjoint`) builds on this module too: it sits below every sweep
(the optimizer's written-out transpose, the forward-over-reverse pass and its hand-written form
for the built-in MLP live here).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from .._mlp import _slot_views
from .._mlp import act_derivs as _act_derivs
from .._mlp import cached_layers as _mlp_layers
from .._mlp import softmax as _softmax
from ..gossip import _param_views, repeat_rows

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
    out = lam
    for tr in reversed(active):  # written-out transposes (the built-in attacks), else vjp
        out = tr.transpose(t, list(ids), out) if hasattr(tr, "transpose") else None
        if out is None:
            break
    else:
        return out

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
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """``(J^t)ᵀ`` of round ``t``'s local step of the rows ``theta`` (m, d) (node ids ``ids``,
    default ``0..m-1``; ``p.batch(t)`` must return those rows' batches) applied to cotangents
    ``lam_th`` (…, m, d) on ``θ^{t+½}`` and ``lam_st`` (same shape, or None) on ``state^{t+1}``;
    leading batch dimensions (several targets) are allowed.

    ``curvature="none"`` drops the Hessian term (the Hessian-free ablation; the optimizer's own
    linear map, momentum and weight decay, is kept). ``batch``: the rows' round-``t`` batches
    ``(x, y)`` when the caller kept them (default: ``p.batch(t)``, gathered again). Returns ``(a_th, a_st, scores)``: the
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
            x, y = p.batch(t) if batch is None else batch
            if fold > 1:
                x, y = repeat_rows(x, fold), repeat_rows(y, fold)
            hc, dls = _hvp_and_sample_dots(p, th, c_g, x, y, need_h, want_scores)
    a_th = None
    if want_theta:  # hc is a fresh tensor: add in place
        a_th = (hc.add_(c_th) if hc is not None else c_th).reshape(*lead, m, d)
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


def _update_transpose(opt: Any, theta: torch.Tensor, state: torch.Tensor | None, lr: float,
                      lam_th: torch.Tensor, lam_st: torch.Tensor | None):
    """Cotangents on ``(θ, state, g)`` of the half step ``(θ + u, state')`` given cotangents on
    its outputs. The update is linear, so for the built-in :class:`~dice_influence.gossip.
    Optimizer` (SGD, heavy-ball or Nesterov momentum, weight decay) the transpose is written out;
    any other optimizer goes through ``vjp`` (exact only if its update is linear in ``g``)."""
    from ..gossip import Optimizer

    if type(opt) is not Optimizer:
        zero = torch.zeros_like(theta)
        if state is None:
            _, pull = vjp(lambda a, g: a + opt.update(a, None, g, lr)[0], theta, zero)
            c_th, c_g = pull(lam_th)
            return c_th, None, c_g
        _, pull = vjp(lambda a, b, g: _half(opt, a, b, g, lr), theta, state, zero)
        return pull((lam_th, lam_st if lam_st is not None else torch.zeros_like(lam_th)))
    wd, mu = opt.weight_decay, opt.momentum
    if not opt.stateful:  # θ' = θ − η (g + wd θ)
        c_g = -lr * lam_th
        c_st = None
    else:  # b' = μ b + g + wd θ;  θ' = θ − η (g + wd θ + μ b') (Nesterov) or θ − η b'
        c_step = -lr * lam_th
        c_buf = c_step * mu if opt.nesterov else c_step.clone()
        if lam_st is not None:
            c_buf = c_buf + lam_st
        c_g = c_buf + c_step if opt.nesterov else c_buf
        c_st = mu * c_buf
    c_th = lam_th + wd * c_g if wd else lam_th
    return c_th, c_st, c_g


def _half(opt: Any, theta: torch.Tensor, state: torch.Tensor | None, g: torch.Tensor,
          lr: float):
    u, ns = opt.update(theta, state, g, lr)
    return theta + u, ns


def _hvp_and_sample_dots(p: Any, theta: torch.Tensor, c: torch.Tensor, x: torch.Tensor,
                         y: torch.Tensor, want_hvp: bool, want_dots: bool = True):
    """Per node ``k``: ``H_k c_k`` (the batch loss's Hessian at ``θ_k``; only if ``want_hvp``)
    and ``∇ℓ_kiᵀ c_k`` for every sample ``i`` of its batch, vectorized over nodes.
    Returns ((n, d) or None, (n, B)); the MLP pass leaves the scores out (None) when asked
    for the product only (``want_hvp`` and not ``want_dots``)."""
    module = p.fm.module
    n = theta.shape[0]
    if FAST_MLP and p.fm.loss_name == "cross_entropy" and _mlp_layers(module) is not None:
        return _mlp_hvp_and_sample_dots(p, theta, c, x, y, want_hvp, want_dots)

    def per_sample(prm, xb, yb):
        return p.fm.loss_fn(functional_call(module, prm, (xb,)), yb)

    prm, tan = _param_views(p.fm, theta), _param_views(p.fm, c.contiguous())
    if not want_hvp:  # forward mode only: the directional derivative of every sample's loss
        def dd(pp, tt, xb, yb):
            return jvp(lambda q: per_sample(q, xb, yb), (pp,), (tt,))[1]

        return None, vmap(dd)(prm, tan, x, y)

    def node_fn(pp, xb, yb):
        def loss(q):
            ls = per_sample(q, xb, yb)
            return ls.mean(), ls

        return grad(loss, has_aux=True)(pp)

    def fused(pp, tt, xb, yb):
        return jvp(lambda q: node_fn(q, xb, yb), (pp,), (tt,))[1]

    hv, dls = vmap(fused)(prm, tan, x, y)
    return torch.cat([hv[s.name].reshape(n, -1) for s in p.fm.slots], dim=1), dls


FAST_MLP = True
"""Use the hand-written batched pass for the built-in MLP (same numbers as the generic
``torch.func`` pass up to rounding; tests compare the two)."""


def _mlp_hvp_and_sample_dots(p: Any, theta: torch.Tensor, c: torch.Tensor, x: torch.Tensor,
                             y: torch.Tensor, want_hvp: bool, want_dots: bool = True):
    """:func:`_hvp_and_sample_dots` for the MLP, written out with batched matmuls over nodes:
    one forward pass with its tangent (Pearlmutter's R-forward), the per-sample directional
    derivatives from the logits' tangent, then the backward pass of the mean batch loss with its
    tangent for ``H c`` (the input layer needs no input gradient)."""
    layers, act = _mlp_layers(p.fm.module)
    prm, tan = _slot_views(p.fm, theta), _slot_views(p.fm, c.contiguous())
    N, B = y.shape
    h = x.reshape(N, B, -1)
    dh = None
    L = len(layers)
    hs, dhs, zs, dzs, acts = [], [], [], [], []
    for i, (wn, bn) in enumerate(layers):
        W, V = prm[wn].transpose(1, 2), tan[wn].transpose(1, 2)
        z = torch.baddbmm(prm[bn].unsqueeze(1), h, W)
        dz = torch.baddbmm(tan[bn].unsqueeze(1), h, V)
        if dh is not None:
            dz = dz.baddbmm(dh, W)
        hs.append(h)
        dhs.append(dh)
        zs.append(z)
        dzs.append(dz)
        if i < L - 1:
            h = act(z)
            s1, s2 = _act_derivs(act, z, h)
            acts.append((s1, s2))
            dh = s1 * dz
    P = _softmax(z)[0]
    R = P.clone()
    yi = y.unsqueeze(-1)
    R.scatter_add_(-1, yi, torch.full(yi.shape, -1.0, dtype=P.dtype, device=P.device))
    dls = (R * dz).sum(-1) if want_dots or not want_hvp else None  # the samples' scores
    if not want_hvp:
        return None, dls
    G = R / B
    Pdz = P * dz
    dG = (Pdz - P * Pdz.sum(-1, keepdim=True)) / B
    flat = torch.empty(N, theta.shape[1], dtype=theta.dtype, device=theta.device)
    out = _slot_views(p.fm, flat)  # written in place: no concatenation (measured 30 % here)
    for i in range(L - 1, -1, -1):
        wn, bn = layers[i]
        dgW = torch.bmm(dG.transpose(1, 2), hs[i])
        if dhs[i] is not None:
            dgW = dgW.baddbmm(G.transpose(1, 2), dhs[i])
        out[wn].copy_(dgW)
        torch.sum(dG, 1, out=out[bn])
        if i > 0:
            W, V = prm[wn], tan[wn]
            Gh = torch.bmm(G, W)
            dGh = torch.bmm(dG, W).baddbmm(G, V)
            s1, s2 = acts[i - 1]
            G = Gh * s1
            dG = dGh * s1
            if s2 is not None:
                dG = dG + Gh * s2 * dzs[i - 1]
    return flat, dls
