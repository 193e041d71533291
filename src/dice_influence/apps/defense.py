"""Self-healing decentralized training (SPEC §6): attacks, online proximal influence, pruning.

:func:`guarded_train` is Algorithm 1 (SPEC §2) composed from the core pieces, with three hooks:

1. **attacks** (:class:`~dice_influence.attacks.AttackPlan`): update-level attackers replace the
   update they send; data-level attackers are already in the problem's node data;
2. **tracking** (:class:`~dice_influence.influence.proximal.ProximalTracker`): every ``every``-th
   round each receiver ``k`` scores each in-neighbour ``j`` with ``q_k W[k, j] G_kᵀ u_j``
   (positive = harmful), ``G_k`` read on its own test split;
3. **defence**: ``"dice"`` — every ``check_every`` rounds each node applies a detection rule
   (:mod:`dice_influence.apps.anomaly`) to its own row and prunes flagged in-neighbours
   (:func:`prune`: ``W[k, j] = 0``, the weight moves to the diagonal, rows stay stochastic);
   it also refuses, for good, senders whose update norm exceeds ``max_norm_ratio`` × the median
   norm it sees (first-order influence calls a scaled-up helpful update "helpful");
   ``"clipped_gossip"`` — the robust-aggregation baseline of He, Karimireddy & Jaggi (2022)
   (:func:`clipped_gossip`); ``"trimmed_mean"`` — coordinate-wise trimmed mean over
   in-neighbours.

With no attack and no defence the loop is bit-for-bit the simulator's ``run_rounds`` (tested).
With the ``pre`` read-out a node decides before it mixes in the same round (it already has
``G_k = ∇L(θ_k^t)`` and the neighbours' updates); ``post``/``midpoint`` decisions take effect
from the next round. Non-finite senders never leak: pruned weights are exact zeros and the core
:class:`~dice_influence.gossip.Mixer` never multiplies a zero weight into a sender.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._util import progress_bar
from ..attacks import AttackPlan
from ..gossip import Mixer, loss_grads, node_grad_list, node_losses, param_views
from ..influence.proximal import ProximalTracker
from . import anomaly as A

DEFENSES = (None, "dice", "clipped_gossip", "trimmed_mean")


def prune(W: np.ndarray, blocked: np.ndarray) -> np.ndarray:
    """``W`` with ``W[k, j] = 0`` where ``blocked[k, j]`` (never the diagonal); the removed
    weight of each row moves to its diagonal, so rows stay stochastic and entries ≥ 0."""
    B = blocked.copy()
    np.fill_diagonal(B, False)
    out = np.where(B, 0.0, W)
    removed = (W - out).sum(1)
    out[np.diag_indices_from(out)] += removed
    return out


def honest_connected(W: np.ndarray, honest: np.ndarray) -> bool:
    """Whether the honest nodes' subgraph of ``W`` (edges ``W[k, j] > 0``) is strongly
    connected (every honest node reaches every other through honest nodes)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    idx = np.flatnonzero(honest)
    if len(idx) <= 1:
        return True
    sub = W[np.ix_(idx, idx)] > 0
    ncomp, _ = connected_components(csr_matrix(sub), directed=True, connection="strong")
    return bool(ncomp == 1)


# ----------------------------------------------------------------------------- baselines


def clipped_gossip(half: torch.Tensor, W: np.ndarray, delta: float = 0.2) -> torch.Tensor:
    """ClippedGossip (He, Karimireddy & Jaggi 2022): ``θ_k ← θ_k + Σ_j W[k, j]
    clip(θ_j − θ_k, τ_k)``, ``clip(v, τ) = v·min(1, τ/‖v‖)``.

    ``τ_k`` is chosen per receiver as in the paper's practical rule: the farthest neighbours
    holding at most ``delta`` of ``k``'s weight are clipped to the distance of the nearest of
    the rest. Non-finite differences are dropped (weight to self)."""
    n = half.shape[0]
    Wc = W.copy()
    np.fill_diagonal(Wc, 0.0)
    recv, send = np.nonzero(Wc > 0)
    if len(recv) == 0:
        return half.clone()
    r_t = torch.as_tensor(recv, device=half.device)
    s_t = torch.as_tensor(send, device=half.device)
    diff = half[s_t] - half[r_t]
    norms = diff.norm(dim=1)
    finite = torch.isfinite(norms)
    nn_ = np.where(finite.cpu().numpy(), norms.cpu().numpy().astype(np.float64), np.inf)
    w = Wc[recv, send]
    tau = np.zeros(len(recv))
    for k in range(n):
        sel = np.flatnonzero(recv == k)
        if len(sel) == 0:
            continue
        order = sel[np.argsort(-nn_[sel], kind="stable")]
        clipped = np.cumsum(w[order]) <= delta + 1e-12
        rest = order[~clipped]
        tk = float(nn_[rest].max()) if len(rest) else 0.0
        tau[sel] = tk if np.isfinite(tk) else 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        fac = np.where(np.isfinite(nn_) & (nn_ > 0), np.minimum(1.0, tau / nn_), 0.0)
    coef = torch.as_tensor(w * fac, dtype=half.dtype, device=half.device)
    diff = torch.where(finite[:, None], diff, torch.zeros_like(diff))
    out = half.clone()
    out.index_add_(0, r_t, coef[:, None] * diff)
    return out


def trimmed_mean(half: torch.Tensor, W: np.ndarray, trim: float = 0.2) -> torch.Tensor:
    """Coordinate-wise trimmed mean over each node's in-neighbours and itself (unweighted):
    drop the ``floor(trim·m)`` largest and smallest values of each coordinate (``m`` = number
    of values), average the rest. Non-finite values sort to the ends and are dropped first."""
    out = torch.empty_like(half)
    for k in range(half.shape[0]):
        js = np.flatnonzero(W[k] > 0)
        vals = half[torch.as_tensor(js, device=half.device)]
        vals = torch.nan_to_num(vals, nan=float("inf"))
        m = len(js)
        b = int(np.floor(trim * m))
        if b == 0 or m - 2 * b < 1:
            out[k] = vals.mean(0) if torch.isfinite(vals).all() else half[k]
            continue
        s, _ = torch.sort(vals, dim=0)
        out[k] = s[b : m - b].mean(0)
    return out


# ----------------------------------------------------------------------------- the loop


@dataclass
class GuardOptions:
    """Options of :func:`guarded_train`. ``track_every = 0`` turns tracking off."""

    track_every: int = 1
    readout: str = "pre"
    window: int = 10
    history: bool = True
    q: str = "uniform"  # "uniform" (1/n) or "one"
    defense: str | None = None
    rule: str = "sign"
    z_threshold: float = 3.0
    margin: float = 0.0
    score: str = "cumulative"  # or "window"
    check_every: int = 1
    start: int = 1  # first round (index) at which a node may prune
    readmit: bool = True
    max_norm_ratio: float | None = 10.0  # also flag ‖u_j‖ > ratio · median of k's view
    clip_delta: float = 0.2
    trim: float = 0.2
    eval_every: int = 10
    test_batch: int | None = None  # None: whole per-node test split


@dataclass
class GuardResult:
    """What one guarded run produced. ``tracker`` holds the proximal influence (positive =
    harmful); ``blocked[k, j]`` = ``k`` pruned ``j`` at the end; ``prune_log`` = (round, k, j,
    +1 prune / −1 re-admit); ``evals`` = honest accuracy on the common test set over rounds."""

    theta: torch.Tensor
    tracker: ProximalTracker | None
    blocked: np.ndarray
    W_final: np.ndarray
    malicious: np.ndarray
    evals: list[dict[str, Any]] = field(default_factory=list)
    prune_log: list[tuple[int, int, int, int]] = field(default_factory=list)
    nonfinite_honest: bool = False

    @property
    def final(self) -> dict[str, Any]:
        return self.evals[-1] if self.evals else {}


def _eval(problem: Any, theta: torch.Tensor, honest: np.ndarray, t: int) -> dict[str, Any]:
    with torch.no_grad():
        idx = torch.as_tensor(np.flatnonzero(honest), device=theta.device)
        loss, acc = node_losses(problem.fm, theta[idx], problem.val_x, problem.val_y)
    acc = torch.nan_to_num(acc, nan=0.0)
    return {
        "round": t,
        "honest_acc_mean": float(acc.mean()),
        "honest_acc_worst": float(acc.min()),
        "honest_loss_mean": float(loss.mean()),
        "honest_finite": bool(torch.isfinite(theta[idx]).all()),
    }


def guarded_train(
    problem: Any,
    plan: AttackPlan | None = None,
    opts: GuardOptions | None = None,
    *,
    rounds: int | None = None,
    malicious: np.ndarray | None = None,
    progress: bool = False,
) -> GuardResult:
    """Train ``problem`` under ``plan`` with optional tracking and defence (module docstring).

    ``problem`` must already contain the data-level attacks (build it from
    :func:`dice_influence.attacks.with_data_attacks`). ``malicious`` (n,) bool overrides which
    nodes count as attackers for the honest-accuracy read-out (default: the plan's)."""
    opts = opts or GuardOptions()
    if opts.defense not in DEFENSES:
        raise ValueError(f"defense {opts.defense!r}: choose one of {DEFENSES}")
    n, fm = problem.n, problem.fm
    R = problem.cfg.train.rounds if rounds is None else rounds
    if malicious is None:
        malicious = plan.mask if plan is not None else np.zeros(n, dtype=bool)
    malicious = np.asarray(malicious, dtype=bool)
    honest = ~malicious
    update_attack = plan is not None and plan.has_update_attacks
    tracking = opts.track_every > 0 or opts.defense == "dice"
    every = max(1, opts.track_every) if tracking else 0
    tracker = None
    test_x = test_y = None
    if tracking:
        q = (
            torch.full((n,), 1.0 / n, dtype=torch.float64)
            if opts.q == "uniform"
            else torch.ones(n, dtype=torch.float64)
        )
        tracker = ProximalTracker(
            n, q, readout=opts.readout, window=opts.window, history=opts.history
        )
        test_x, test_y = problem.test_set(per_node=True)
        if opts.test_batch is not None and opts.test_batch < test_y.shape[1]:
            test_x, test_y = test_x[:, : opts.test_batch], test_y[:, : opts.test_batch]

    def test_grad(th: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            return loss_grads(fm, th, test_x, test_y)[1]

    blocked = np.zeros((n, n), dtype=bool)
    prune_log: list[tuple[int, int, int, int]] = []
    theta = problem.init_theta().clone()
    state = problem.opt.init_state(theta)
    state_views = None if state is None else param_views(fm, state)
    spare = torch.empty_like(theta)
    eval_every = opts.eval_every  # <= 0: no evaluation at all (benchmarks)
    evals = [_eval(problem, theta, honest, 0)] if eval_every > 0 else []
    mixers: dict[Any, Mixer] = {}
    G_next: torch.Tensor | None = None  # ∇L(θ^{t}) computed at the end of round t-1
    W_used = problem.W(0)

    def mixer_for(W: np.ndarray, key: Any) -> Mixer:
        m = mixers.get(key)
        if m is None:
            if len(mixers) > 64:
                mixers.clear()
            m = mixers[key] = Mixer(W, dtype=problem.dtype, device=problem.device)
        return m

    def mix(W: np.ndarray, key: Any, th: torch.Tensor, out: torch.Tensor) -> None:
        # the core Mixer: dense or CSR by sparsity; zero weights never touch a sender
        mixer_for(W, key)(th, out=out)

    norm_blocked = np.zeros((n, n), dtype=bool)

    def norm_check(U: torch.Tensor, W_nom: np.ndarray) -> None:
        # First-order influence calls a positively scaled-up update "helpful"; a node also
        # refuses updates far larger than those it sees (sticky: a malformed sender).
        if opts.max_norm_ratio is None:
            return
        norms = U.norm(dim=1).double().cpu().numpy()
        norms = np.where(np.isfinite(norms), norms, np.inf)
        view = (W_nom > 0) | np.eye(n, dtype=bool)
        M = np.where(view, norms[None, :], np.nan)
        M = np.where(np.isinf(M), np.nan, M)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(M, axis=1)
        big = norms[None, :] > opts.max_norm_ratio * np.nan_to_num(med, nan=0.0)[:, None]
        norm_blocked[...] |= big & view & ~np.eye(n, dtype=bool)

    def decide(t: int) -> None:
        assert tracker is not None
        S = (tracker.score if opts.score == "cumulative" else tracker.window_score).numpy()
        E = tracker.seen.numpy()
        F = A.flags(S, E, opts.rule, opts.z_threshold, opts.margin) | norm_blocked
        new = F & ~blocked
        for k, j in zip(*np.nonzero(new), strict=True):
            prune_log.append((t, int(k), int(j), 1))
        if opts.readmit:
            back = blocked & ~F & E
            for k, j in zip(*np.nonzero(back), strict=True):
                prune_log.append((t, int(k), int(j), -1))
            blocked[...] = F | (blocked & ~E)
        else:
            blocked[...] |= F

    with torch.no_grad(), progress_bar(progress, R, "guarded training") as advance:
        for t in range(R):
            track = tracking and t % every == 0
            need_u = track or update_attack
            prev = theta.clone() if need_u else None
            x, y = problem.batch(t)
            with torch.enable_grad():
                g = node_grad_list(fm, theta, x, y)
            problem.opt.update_(param_views(fm, theta), state_views, g, problem.lr(t))
            U = None
            if need_u:
                U = theta - prev
                if update_attack:
                    rows = plan.apply_updates(U, t)
                    if rows:
                        ridx = torch.as_tensor(rows, device=theta.device)
                        theta[ridx] = prev[ridx] + U[ridx]
            W_nom = problem.W(t)
            static = problem.schedule.is_static
            G_pre = None
            if track and opts.readout in ("pre", "midpoint"):
                G_pre = G_next if G_next is not None else test_grad(prev)
            G_next = None
            W_t = prune(W_nom, blocked) if blocked.any() else W_nom
            if opts.defense == "dice" and U is not None:
                norm_check(U, W_nom)
            if track and opts.readout == "pre":
                tracker.record(t, G_pre, U, W_t, W_nom)
                if opts.defense == "dice" and t >= opts.start and t % opts.check_every == 0:
                    decide(t)
                    W_t = prune(W_nom, blocked) if blocked.any() else W_nom
            # gossip
            if opts.defense == "clipped_gossip":
                theta = clipped_gossip(theta, W_t, opts.clip_delta)
            elif opts.defense == "trimmed_mean":
                theta = trimmed_mean(theta, W_t, opts.trim)
            else:
                if blocked.any():
                    key = ("pruned", t if not static else 0, blocked.tobytes())
                else:
                    key = t if not static else 0
                mix(W_t, key, theta, spare)
                theta, spare = spare, theta
            W_used = W_t
            if track and opts.readout in ("post", "midpoint"):
                G_post = test_grad(theta)
                G = G_post if opts.readout == "post" else 0.5 * (G_pre + G_post)
                tracker.record(t, G, U, W_t, W_nom)
                if (t + 1) % every == 0:
                    G_next = G_post
                if opts.defense == "dice" and t >= opts.start and t % opts.check_every == 0:
                    decide(t)
            if eval_every > 0 and ((t + 1) % eval_every == 0 or t + 1 == R):
                evals.append(_eval(problem, theta, honest, t + 1))
            advance()
    honest_idx = torch.as_tensor(np.flatnonzero(honest))
    return GuardResult(
        theta=theta,
        tracker=tracker,
        blocked=blocked.copy(),
        W_final=prune(problem.W(max(R - 1, 0)), blocked) if blocked.any() else W_used,
        malicious=malicious,
        evals=evals,
        prune_log=prune_log,
        nonfinite_honest=not bool(torch.isfinite(theta[honest_idx]).all()),
    )
