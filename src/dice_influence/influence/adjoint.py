"""All-sample attribution by one reverse sweep (docs/method.md §4, "adjoint form").

For a fixed test set and a linear read-out, the first-order map from a perturbation ``Δ`` of
node ``j``'s half step at round ``s`` to the read-out is linear, so it is a dot product
``λ_j^{sᵀ} Δ``. Pulling the read-out's gradient back through the rounds (gossip transposed,
transposed Jacobian of each local step) gives ``λ`` for every node and round of a window at
once. Removing sample ``i`` changes the batch gradient (factual minus counterfactual) by
``∇ℓ_i / B``; the optimizer update is linear in the gradient, so every training sample's score
is ``(1/B) c_jᵀ ∇ℓ_i(θ_j^s)`` with ``c`` the cotangent pulled back through the update.

Each round of the sweep is one forward-over-reverse pass per node (``jvp`` of the batch
gradient in direction ``c``, vectorized over nodes): the batch loss's Hessian is symmetric, so
the same pass yields ``H c`` (for ``Jᵀ``, the optimizer state's cotangent included) and every
sample's directional derivative ``∇ℓ_iᵀ c`` (its score).

Sign: score = test loss with the sample − without it; positive = harmful. Scores agree with
:func:`~dice_influence.influence.estimate.estimate` (same read-out, curvature on, factual
propagation) for single-sample events.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from .._mlp import act_derivs as _act_derivs
from .._mlp import mlp_layers as _mlp_layers
from .._mlp import softmax as _softmax
from .._util import progress_bar
from ..gossip import _param_views, loss_grads, repeat_rows
from ..topology import reach_sets
from .common import check_replayable, factual_path, node_weights
from .estimate import check_readout

TARGETS = ("horizon", "hops")
READOUTS = ("factual", "linear")


@dataclass
class Attribution:
    """Scores of every training sample used in a window of rounds.

    ``scores[s, k, i]``: influence of removing sample ``i`` (batch position) of node ``k`` at
    round ``rounds[s]`` on the target; positive = harmful. ``index[s, k, i]`` is the sample's
    dataset index (−1 if unknown). Axes: (round, node, sample). ``target``: ``"horizon"`` or
    ``"hops"``; ``readout``: ``"factual"`` or ``"linear"`` (where the self term's gradient is
    taken)."""

    rounds: list[int]
    scores: torch.Tensor
    index: torch.Tensor
    target: str
    readout: str
    hops: int | None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def top(self, node: int, k: int = 10, *, harmful: bool = True) -> list[dict[str, Any]]:
        """Up to ``k`` samples node ``node`` trained on in the window, in the direction named:
        ``harmful=True`` (default) = :meth:`most_harmful`, ``harmful=False`` =
        :meth:`most_helpful`. Only samples of that sign are returned, so the list can be shorter
        than ``k`` (empty when no sample of the node is harmful)."""
        return self.most_harmful(node, k) if harmful else self.most_helpful(node, k)

    def most_harmful(self, node: int, k: int = 10) -> list[dict[str, Any]]:
        """Opponents: up to ``k`` samples of node ``node`` with score > 0 (removing them lowers
        the target loss), largest score first."""
        return self._ranked(node, k, harmful=True)

    def most_helpful(self, node: int, k: int = 10) -> list[dict[str, Any]]:
        """Proponents: up to ``k`` samples of node ``node`` with score < 0 (removing them raises
        the target loss), most negative first."""
        return self._ranked(node, k, harmful=False)

    def _ranked(self, node: int, k: int, *, harmful: bool) -> list[dict[str, Any]]:
        s = self.scores[:, node, :].reshape(-1)
        order = torch.argsort(s, descending=harmful)[:k]
        B = self.scores.shape[2]
        out = []
        for flat in order.tolist():
            v = float(s[flat])
            if (v <= 0) if harmful else (v >= 0):
                break  # sorted: every later sample has the other sign (or 0)
            r, i = divmod(flat, B)
            out.append({"round": self.rounds[r], "node": node, "batch_position": i,
                        "dataset_index": int(self.index[r, node, i]), "score": v,
                        "direction": "harmful" if harmful else "helpful"})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"sign": "influence = loss with the sample - loss without it; positive = harmful",
                "target": self.target, "readout": self.readout, "hops": self.hops,
                "rounds": self.rounds, "axes": ["round", "node", "sample"],
                "scores": self.scores.tolist(), "dataset_index": self.index.tolist(),
                "seconds": self.seconds, "options": self.options}


def attribute(
    traj: Any,
    window: tuple[int, int],
    *,
    target: str | None = None,
    hops: int = 1,
    readout: str = "factual",
    q: str | Sequence[float] | None = "uniform",
    per_node_test: bool = False,
    progress: bool = False,
) -> Attribution:
    """Score every training sample of every node in rounds ``window = (t0, t1)``.

    ``target="horizon"`` (default): the test loss summed over all nodes (weights ``q``) at
    round ``t1`` (for a source at round ``s`` this is DICE-E's horizon value with ``t1 − s``
    hops). ``target="hops"``: the set-based r-hop value (``r = hops``; self term plus the nodes
    first reached at ``s+1..s+r``), which needs the run to extend ``hops`` rounds past
    ``t1 − 1``; it takes one batched sweep per hop and source round, independent of the number
    of samples.

    ``readout="factual"`` (default; docs/method.md §4): every gradient at the factual point, the self
    term at ``θ_j^{s+½}``; ``"linear"`` (alias ``"paper"``): the paper's Prop. 1, self term at
    ``θ_j^s``. They differ only in the self term, so only for ``target="hops"``. The midpoint
    read-out is not linear in ``Δ`` and has no adjoint form: use ``estimate`` for it.
    (Old calls ``readout="horizon" | "hops"`` still work: they set ``target``.)
    """
    if readout in TARGETS:  # the pre-"target" spelling: attribute(traj, w, readout="hops")
        if target is not None and target != readout:
            raise ValueError(f"readout={readout!r} conflicts with target={target!r}; "
                             "pass target= for horizon/hops and readout= for factual/linear")
        warnings.warn(f"attribute(readout={readout!r}) is the old spelling of "
                      f"target={readout!r} (readout now picks factual/linear)", FutureWarning,
                      stacklevel=2)
        target, readout = readout, "factual"
    target = "horizon" if target is None else target
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; choose one of {TARGETS}")
    try:
        readout = check_readout(readout, READOUTS)
    except ValueError:
        raise ValueError(f"readout={readout!r}; attribute supports the linear read-outs "
                         f"{READOUTS} ('paper' = 'linear'); the midpoint read-out is not "
                         "linear: use estimate(..., readout='midpoint') for chosen events"
                         ) from None
    check_attributable(traj)
    t0, t1 = window
    last = t1 if target == "horizon" else t1 - 1 + hops
    if target == "hops" and hops < 1:
        raise ValueError(f"hops={hops}; target='hops' needs hops >= 1")
    if not 0 <= t0 < t1 or last > traj.rounds_done:
        raise ValueError(f"window {window} with target={target!r} needs rounds {t0}..{last} "
                         f"recorded; the run has {traj.rounds_done}")
    start = time.perf_counter()
    p = traj.problem
    qv = node_weights(p.n, q).to(p.dtype)
    # factual parameters and optimizer states of every round needed, computed forward once
    path = factual_path(traj, t0, last)
    thetas = {t0 + i: th for i, (th, _) in enumerate(path)}
    states = {t0 + i: st for i, (_, st) in enumerate(path)}
    n, B = p.n, p.cfg.train.batch_size
    scores = torch.zeros(t1 - t0, n, B, dtype=torch.float64)
    xt, yt = p.test_set(per_node_test)
    grads: dict[int, torch.Tensor] = {}

    def test_grad(r: int) -> torch.Tensor:
        if r not in grads:
            with torch.no_grad():
                grads[r] = loss_grads(p.fm, thetas[r], xt, yt)[1]
        return grads[r]

    with progress_bar(progress, t1 - t0, "attribution") as advance:
        if target == "horizon":
            a_th = qv[:, None] * test_grad(t1)
            a_st = None if states[t1] is None else torch.zeros_like(a_th)
            for r in range(t1 - 1, t0 - 1, -1):
                lam_th = _mix_T(p, r, a_th)  # cotangent on θ^{r+½}; the state is not gossiped
                sc, a_th, a_st = _pullback(p, thetas[r], states[r], r, lam_th, a_st,
                                           want_scores=True, want_theta=r > t0)
                scores[r - t0] = sc
                advance()
        else:
            for r in range(t0, t1):
                lam, lam_st = _hop_cotangents(p, thetas, states, r, hops, qv, test_grad,
                                              readout, per_node_test)
                scores[r - t0] = _pullback(p, thetas[r], states[r], r, lam, lam_st,
                                           want_scores=True, want_theta=False)[0]
                advance()
    index = _dataset_index(p, t0, t1)
    return Attribution(rounds=list(range(t0, t1)), scores=scores, index=index, target=target,
                       readout=readout, hops=hops if target == "hops" else None,
                       seconds=time.perf_counter() - start,
                       options={"q": q if isinstance(q, str) or q is None else list(q),
                                "per_node_test": per_node_test})


def _dataset_index(p: Any, t0: int, t1: int) -> torch.Tensor:
    idx = p.node_data.index
    return torch.stack([torch.gather(idx, 1, p.batches.indices(r).to(idx.device))
                        for r in range(t0, t1)]).to(torch.int64).cpu()


def check_attributable(traj: Any) -> None:
    """What the adjoint can attribute: a finite, replayable run without update-level attacks
    (:func:`~dice_influence.influence.common.check_replayable` with ``transforms=False``)."""
    check_replayable(traj, transforms=False)


_WT: dict[int, tuple[Any, torch.Tensor]] = {}


def _mix_T(p: Any, r: int, a: torch.Tensor) -> torch.Tensor:
    """Transposed gossip: cotangent of ``θ^{r+½}`` from that of ``θ^{r+1}`` (leading dims ok)."""
    m = p.mixer(r)
    hit = _WT.get(id(m))
    if hit is None or hit[0] is not m:
        if len(_WT) > 256:
            _WT.clear()
        hit = _WT[id(m)] = (m, m.W.T.contiguous())
    WT = hit[1]
    return torch.mm(WT, a) if a.ndim == 2 else torch.matmul(WT, a)


def _hop_cotangents(p: Any, thetas: dict, states: dict, r: int, hops: int, qv: torch.Tensor,
                    test_grad: Any, readout: str, per_node_test: bool):
    """Cotangents ``(λ_θ, λ_state)`` on ``(θ^{r+½}, state^{r+1})`` (n, d) for the set-based
    r-hop target of source ``j`` at round ``r``: the self term plus, for each hop ``h``, a sweep
    of the read-out at the nodes of ``N^(h)(j)``, batched over the ``n`` sources."""
    n = p.n
    if readout == "linear":  # Prop. 1: the self term's gradient at θ_j^r
        lam = qv[:, None] * test_grad(r)
    else:  # factual: at the factual half step θ_j^{r+½}
        half, _ = p.local_step(thetas[r], states[r], r)
        xt, yt = p.test_set(per_node_test)
        with torch.no_grad():
            lam = qv[:, None] * loss_grads(p.fm, half, xt, yt)[1]
    lam_st = None if states[r] is None else torch.zeros_like(lam)
    reach = [reach_sets(p.schedule, j, r, hops) for j in range(n)]
    diag = torch.arange(n)
    for h in range(1, hops + 1):
        mask = torch.zeros(n, n, 1, dtype=thetas[r].dtype, device=thetas[r].device)
        for j in range(n):
            mask[j, reach[j][h - 1], 0] = 1.0
        a = mask * (qv[:, None] * test_grad(r + h))[None]  # (sources, nodes, d)
        a_st = None if states[r] is None else torch.zeros_like(a)
        for s in range(r + h - 1, r - 1, -1):
            a = _mix_T(p, s, a)
            if s > r:
                _, a, a_st = _pullback(p, thetas[s], states[s], s, a, a_st,
                                       want_scores=False, want_theta=True)
        lam = lam + a[diag, diag]
        if a_st is not None:
            lam_st = lam_st + a_st[diag, diag]  # the optimizer-state path (time-varying W)
    return lam, lam_st


def _pullback(p: Any, theta: torch.Tensor, state: torch.Tensor | None, r: int,
              lam_th: torch.Tensor, lam_st: torch.Tensor | None, *, want_scores: bool,
              want_theta: bool):
    """Transpose of round ``r``'s local step ``(θ, state) ↦ (θ^{r+½}, state^{r+1})`` applied to
    cotangents ``lam_th`` (…, n, d) and ``lam_st`` (or None), leading batch dims allowed.

    The update is linear in ``(θ, state, g)`` (SGD, momentum, weight decay), so its transpose is
    exact and cheap; the batch gradient's Jacobian is the symmetric Hessian, so ``Hᵀ c = H c``
    is one forward-over-reverse pass, which also gives every sample's ``∇ℓ_iᵀ c``.

    Returns (scores (…, n, B) or None, cotangent on ``θ^r`` or None, on ``state^r`` or None)."""
    lead = lam_th.shape[:-2]
    n, d = theta.shape
    lr = p.lr(r)
    fold = math.prod(lead)
    th = theta if fold == 1 else theta.repeat(fold, 1)
    st = None if state is None else (state if fold == 1 else state.repeat(fold, 1))
    lt = lam_th.reshape(fold * n, d)
    ls = None if lam_st is None else lam_st.reshape(fold * n, d)
    with torch.no_grad():
        c_th, c_st, c_g = _update_transpose(p.opt, th, st, lr, lt, ls)
        x, y = p.batch(r)
        if fold > 1:
            x = x.repeat(fold, *([1] * (x.ndim - 1)))
            y = repeat_rows(y, fold)
        hc, dls = _hvp_and_sample_dots(p, th, c_g, x, y, want_theta)
    scores = None
    if want_scores:
        scores = (dls / y.shape[1]).double().reshape(*lead, n, -1)
    a_th = None
    if want_theta:
        a_th = (c_th + hc).reshape(*lead, n, d)
    a_st = None if c_st is None else c_st.reshape(*lead, n, d)
    return scores, a_th, a_st


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
    prm, tan = _param_views(p.fm, theta), _param_views(p.fm, c.contiguous())
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
    out = _param_views(p.fm, flat)  # written in place: no concatenation (measured 30 % here)
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
