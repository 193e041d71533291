"""All-sample attribution by one reverse sweep (SPEC §4, "adjoint form").

For a fixed test set and read-out, the first-order map from a perturbation ``Δ`` of node ``j``'s
half step at round ``s`` to the read-out is linear, so it is a dot product ``λ_j^{sᵀ} Δ``.
Pulling the read-out's gradient back through the rounds (gossip transposed, ``vjp`` of the local
step) gives ``λ`` for every node and round of a window at once. Removing sample ``i`` changes the
batch gradient (factual minus counterfactual) by ``∇ℓ_i / B``; the optimizer maps that to
``(Δθ, Δstate)`` linearly, so every training sample's score is ``(1/B) c_jᵀ ∇ℓ_i(θ_j^s)`` with
``c`` the cotangent pulled back through the optimizer update —
all samples of all nodes from one forward-mode pass per round (a ``jvp`` of the per-sample
losses in direction ``c``).

Sign: score = test loss with the sample − without it; positive = harmful. Scores agree with
:func:`~dice_influence.influence.estimate.estimate` (linear read-out, curvature on) for
single-sample events.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap

from ..gossip import _param_views, loss_grads, node_grads
from ..topology import reach_sets
from .common import node_weights

READOUTS = ("horizon", "hops")


@dataclass
class Attribution:
    """Scores of every training sample used in a window of rounds.

    ``scores[s, k, i]``: influence of removing sample ``i`` (batch position) of node ``k`` at
    round ``rounds[s]`` on the read-out; positive = harmful. ``index[s, k, i]`` is the sample's
    dataset index (−1 if unknown). Axes: (round, node, sample)."""

    rounds: list[int]
    scores: torch.Tensor
    index: torch.Tensor
    readout: str
    hops: int | None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)

    def top(self, node: int, k: int = 10, *, harmful: bool = True) -> list[dict[str, Any]]:
        """The ``k`` most harmful (or, with ``harmful=False``, most helpful) samples that node
        ``node`` trained on in the window: opponents (positive) or proponents (negative)."""
        s = self.scores[:, node, :].reshape(-1)
        order = torch.argsort(s, descending=harmful)[:k]
        B = self.scores.shape[2]
        out = []
        for flat in order.tolist():
            r, i = divmod(flat, B)
            out.append({"round": self.rounds[r], "node": node, "batch_position": i,
                        "dataset_index": int(self.index[r, node, i]), "score": float(s[flat])})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"sign": "influence = loss with the sample - loss without it; positive = harmful",
                "readout": self.readout, "hops": self.hops, "rounds": self.rounds,
                "axes": ["round", "node", "sample"], "scores": self.scores.tolist(),
                "dataset_index": self.index.tolist(), "seconds": self.seconds,
                "options": self.options}


def attribute(
    traj: Any,
    window: tuple[int, int],
    *,
    readout: str = "horizon",
    hops: int = 1,
    q: str | Sequence[float] | None = "uniform",
    per_node_test: bool = False,
) -> Attribution:
    """Score every training sample of every node in rounds ``window = (t0, t1)``.

    ``readout="horizon"``: the test loss summed over all nodes (weights ``q``) at round ``t1``
    (for a source at round ``s`` this is DICE-E's horizon value with ``t1 − s`` hops).
    ``readout="hops"``: the set-based r-hop value (``r = hops``; self term plus the nodes first
    reached at ``s+1..s+r``), which needs the run to extend ``hops`` rounds past ``t1 − 1``;
    it takes one batched sweep per hop and source round, independent of the number of samples.
    """
    if readout not in READOUTS:
        raise ValueError(f"readout={readout!r}; choose one of {READOUTS}")
    t0, t1 = window
    last = t1 if readout == "horizon" else t1 - 1 + hops
    if not 0 <= t0 < t1 or last > traj.rounds_done:
        raise ValueError(f"window {window} with readout={readout!r} needs rounds {t0}..{last} "
                         f"recorded; the run has {traj.rounds_done}")
    start = time.perf_counter()
    p = traj.problem
    qv = node_weights(p.n, q).to(p.dtype)
    # factual parameters and optimizer states of every round needed, computed forward once
    # (recorded checkpoints are used as they are; rounds in between are recomputed)
    from ..loop import run_rounds

    thetas, states = {}, {}
    th, st = traj.params_at(t0)
    for r in range(t0, last + 1):
        if r in traj.checkpoints:
            th, st = traj.checkpoints[r]
        thetas[r], states[r] = th, st
        if r < last and r + 1 not in traj.checkpoints:
            th, st = run_rounds(p, th, st, r, r + 1)
    n, B = p.n, p.cfg.train.batch_size
    scores = torch.zeros(t1 - t0, n, B, dtype=torch.float64)
    index = torch.full((t1 - t0, n, B), -1, dtype=torch.int64)
    xt, yt = p.test_set(per_node_test)

    def test_grad(r: int) -> torch.Tensor:
        return loss_grads(p.fm, thetas[r], xt, yt)[1]

    if readout == "horizon":
        a_th = qv[:, None] * test_grad(t1)
        a_st = None if states[t1] is None else torch.zeros_like(a_th)
        for r in range(t1 - 1, t0 - 1, -1):
            lam_th = _mix_T(p, r, a_th)  # cotangent on θ^{r+½}; the state is not gossiped
            lam_st = a_st
            if states[r] is None:  # plain SGD: one fused forward-mode pass (J symmetric)
                scores[r - t0], a_th = _fused_sgd(p, thetas[r], r, lam_th)
                continue
            scores[r - t0] = _sample_scores(p, thetas[r], states[r], r, lam_th, lam_st)
            if r > t0:
                a_th, a_st = _step_vjp(p, thetas[r], states[r], r, lam_th, lam_st)
    else:
        for r in range(t0, t1):
            lam = _hop_cotangents(p, traj, thetas, states, r, hops, qv, test_grad)
            scores[r - t0] = _sample_scores(p, thetas[r], states[r], r, lam,
                                            None if states[r] is None else torch.zeros_like(lam))
    for r in range(t0, t1):
        pos = p.batches.indices(r)
        index[r - t0] = torch.gather(p.node_data.index, 1, pos.to(p.node_data.index.device))
    return Attribution(rounds=list(range(t0, t1)), scores=scores, index=index, readout=readout,
                       hops=hops if readout == "hops" else None,
                       seconds=time.perf_counter() - start,
                       options={"q": q if isinstance(q, str) or q is None else list(q),
                                "per_node_test": per_node_test})


def _mix_T(p: Any, r: int, a: torch.Tensor) -> torch.Tensor:
    """Transposed gossip: cotangent of ``θ^{r+½}`` from that of ``θ^{r+1}`` (leading dims ok)."""
    WT = torch.as_tensor(p.W(r).T.copy(), dtype=a.dtype, device=a.device)
    return torch.matmul(WT, a)


def _step_fn(p: Any, r: int):
    x, y = p.batch(r)
    lr = p.lr(r)

    def step(th, st):
        u, ns = p.opt.update(th, st, node_grads(p.fm, th, x, y), lr)
        return th + u, ns

    return step


def _step_vjp(p: Any, theta: torch.Tensor, state: torch.Tensor | None, r: int,
              a_th: torch.Tensor, a_st: torch.Tensor | None):
    """``Jᵀ`` of round ``r``'s local step applied to cotangents (leading batch dims allowed)."""
    step = _step_fn(p, r)
    if state is None:
        _, pull = vjp(lambda th: step(th, None)[0], theta)
        if a_th.ndim == 3:
            return vmap(lambda a: pull(a)[0])(a_th), None
        return pull(a_th)[0], None
    _, pull = vjp(step, theta, state)
    if a_th.ndim == 3:
        res = vmap(lambda a, b: pull((a, b)))(a_th, a_st)
    else:
        res = pull((a_th, a_st))
    return res[0], res[1]


def _hop_cotangents(p: Any, traj: Any, thetas: dict, states: dict, r: int, hops: int,
                    qv: torch.Tensor, test_grad: Any) -> torch.Tensor:
    """``λ_j^r`` for the set-based r-hop read-out of source ``j`` at round ``r`` (n, d):
    the self term plus, for each hop ``h``, a sweep of the read-out at the nodes of
    ``N^(h)(j)``, batched over the ``n`` sources."""
    n = p.n
    lam = torch.zeros_like(thetas[r])
    # self term: q_j ∇L(θ_j^r) (Prop. 1 evaluates the source's own term at θ_j^t)
    lam += qv[:, None] * test_grad(r)
    reach = [reach_sets(p.schedule, j, r, hops) for j in range(n)]
    for h in range(1, hops + 1):
        mask = torch.zeros(n, n, 1, dtype=thetas[r].dtype)
        for j in range(n):
            mask[j, reach[j][h - 1], 0] = 1.0
        a = mask * (qv[:, None] * test_grad(r + h))[None]  # (sources, nodes, d)
        a_st = None if states[r] is None else torch.zeros_like(a)
        for s in range(r + h - 1, r - 1, -1):
            a = _mix_T(p, s, a)
            if s > r:
                a, a_st = _step_vjp(p, thetas[s], states[s], s, a, a_st)
        lam += a[torch.arange(n), torch.arange(n)]
    return lam


def _fused_sgd(p: Any, theta: torch.Tensor, r: int, lam: torch.Tensor):
    """Plain SGD (no optimizer state): ``J = (1 − η·wd) I − η H`` is symmetric, so ``Jᵀ λ`` is a
    forward-over-reverse Hessian-vector product, and the same forward-mode pass yields every
    sample's directional derivative ``∇ℓ_iᵀ λ``. Returns (scores (n, B), ``Jᵀ λ`` (n, d))."""
    lr, wd = p.lr(r), p.opt.weight_decay
    x, y = p.batch(r)
    module = p.fm.module
    n = theta.shape[0]

    def node_fn(prm, xb, yb):
        def loss(pp):
            ls = torch.nn.functional.cross_entropy(functional_call(module, pp, (xb,)), yb,
                                                   reduction="none")
            return ls.mean(), ls

        return grad(loss, has_aux=True)(prm)

    def fused(prm, tan, xb, yb):
        return jvp(lambda pp: node_fn(pp, xb, yb), (prm,), (tan,))[1]

    with torch.no_grad():
        hv, dls = vmap(fused)(_param_views(p.fm, theta), _param_views(p.fm, lam.contiguous()),
                              x, y)
    Hl = torch.cat([hv[s.name].reshape(n, -1) for s in p.fm.slots], dim=1)
    scores = (-lr * dls / y.shape[1]).double()  # c = (∂u/∂g)ᵀ λ = −η λ
    return scores, (1.0 - lr * wd) * lam - lr * Hl


def _sample_scores(p: Any, theta: torch.Tensor, state: torch.Tensor | None, r: int,
                   lam_th: torch.Tensor, lam_st: torch.Tensor | None) -> torch.Tensor:
    """Scores ``(n, B)`` of removing each sample of round ``r``'s batches given cotangents on
    ``(θ^{r+½}, state^{r+1})``."""
    lr = p.lr(r)
    zero = torch.zeros_like(theta)
    # cotangent on the batch gradient g through the optimizer update (linear in g)
    if state is None:
        _, pull = vjp(lambda g: p.opt.update(theta, None, g, lr)[0], zero)
        c = pull(lam_th)[0]
    else:
        _, pull = vjp(lambda g: p.opt.update(theta, state, g, lr), zero)
        c = pull((lam_th, lam_st))[0]
    x, y = p.batch(r)
    module = p.fm.module
    params = _param_views(p.fm, theta)
    tangent = _param_views(p.fm, c.contiguous())

    def per_sample(prm, xb, yb):
        return torch.nn.functional.cross_entropy(functional_call(module, prm, (xb,)), yb,
                                                 reduction="none")

    def dd(prm, tan, xb, yb):
        return jvp(lambda pp: per_sample(pp, xb, yb), (prm,), (tan,))[1]

    with torch.no_grad():
        d = vmap(dd)(params, tangent, x, y)  # (n, B) = c_jᵀ ∇ℓ_i
    return (d / y.shape[1]).double()
