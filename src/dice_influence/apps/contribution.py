"""Node contribution, rewards and free riders as an observer of the one loop (docs/method.md §5–6).

Who helped the network, by how much, and who only took? For every node ``j``, per round and
cumulative (sign everywhere: influence = loss with the data − loss without it; **negative =
helpful**, positive = harmful; units: mean cross-entropy):

(a) **proximal outflow** ``a_j = Σ_t Σ_{k≠j} q_k W^t[k, j] G_kᵀ û_j^t`` — what the receivers
    ``k`` measure locally of ``j``'s sent updates ``û_j`` on their own test splits (``G_k`` =
    ``∇L(θ_k^t; z'_k)``, paper Def. 4); **reciprocity** ``R_j`` = outflow / inflow of the same
    ledger (Def. 5).
(b) **adjoint contribution** ``b_j = Σ_t λ_j^{tᵀ} û_j^t`` — the first-order (DICE-E) influence of
    everything ``j`` sent (all its batches: a batch removal under plain SGD is ``Δ = u``) on the
    read-out ``Σ_k q_k L(θ_k^{t1}; z')`` at the end of the window (``horizon: run``: the end of
    the run, the leave-one-node-out horizon). ``λ^t`` comes from **one reverse sweep per window**
    through the recorded rounds: gossip transposed, then the local step's Jacobian
    (``curvature``: ``exact`` = Hessian-vector products by automatic differentiation, ``none``
    = the identity, a Hessian-free ablation). With ``exclude_self`` the read-out of source ``j`` leaves out
    ``j``'s own test loss (one sweep per receiver: ``n×`` the sweep's cost).

Free riders (:func:`free_rider_flags`, a local rule): receiver ``k`` keeps, per in-neighbour
``j``, the alignment ``c_kj^t = cos(û_j^t, −G_k^t)`` of what ``j`` sent with its own descent
direction. An update that carries no data is zero or isotropic noise, whose cosine with any
fixed direction is ``N(0, 1/d)``; so ``k`` flags ``j`` when ``√d · rms_t(c_kj)`` stays below
``z`` (rule ``rms``; rule ``t``: the t-statistic of ``c_kj`` below ``z`` in magnitude, i.e. no
consistent sign), and a node is a free rider when more than ``quorum`` of its out-neighbours
flag it. Rewards: :func:`reward_split`.

In the simulator the observer sees every row; on a peer (``view`` = its own row plus what
arrived) it keeps its row of the ledger and its in-neighbours' alignment, and the adjoint (b)
is computed by the peers together in a reverse gossip sweep
(:mod:`dice_influence.distributed.sweep`, the same single-node pullback as here).
:func:`merge_ledgers` sums the peers' rows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..influence.proximal import dot_matrix
from ..loop import Observer, RoundView
from .proximal import ProximalObserver
from .reciprocity import node_reciprocity

SIGN = "influence = loss with the data - loss without it; negative = helpful, positive = harmful"
CURVATURES = ("exact", "none")
HORIZONS = ("run", "window", "off")


class ContributionObserver(Observer):
    """Contribution measures (a) and (b), reciprocity and free-rider statistics (module doc).

    ``problem``: the run's :class:`~dice_influence.problem.Problem` (needed for (b); ``None`` or
    a peer's local problem: (a) only). ``rounds``: the run's length (the ``run`` horizon)."""

    name = "contribution"

    def __init__(
        self,
        n: int,
        problem: Any = None,
        *,
        q: torch.Tensor | None = None,
        readout: str = "pre",
        every: int = 1,
        horizon: str = "run",
        window: int = 10,
        rounds: int | None = None,
        curvature: str = "exact",
        exclude_self: bool = False,
        adjoint_test: str = "shared",
        z: float = 3.0,
        quorum: float = 0.5,
        rule: str = "rms",
    ) -> None:
        if horizon not in HORIZONS:
            raise ValueError(f"horizon={horizon!r}: choose one of {', '.join(HORIZONS)}")
        if curvature not in CURVATURES:
            raise ValueError(f"curvature={curvature!r}: choose one of {', '.join(CURVATURES)}")
        if adjoint_test not in ("shared", "own"):
            raise ValueError(f"adjoint_test={adjoint_test!r}: choose shared or own")
        self.n = n
        self.problem = problem if hasattr(problem, "local_step") else None
        self.prox = ProximalObserver(n, q, readout=readout, every=every, history=False)
        self.q = self.prox.tracker.q
        self.horizon = horizon if self.problem is not None else "off"
        self.window = int(window)
        self.rounds = rounds
        self.curvature = curvature
        self.exclude_self, self.adjoint_test = bool(exclude_self), adjoint_test
        if rule not in ("rms", "t"):
            raise ValueError(f"rule={rule!r}: choose rms or t")
        self.z, self.quorum, self.rule = float(z), float(quorum), rule
        self.d = None if self.problem is None else int(self.problem.d)
        # z'_k of (a), read by the runtime (loop.readout_rows; the sweep (b) reads its own)
        self.test_set, self.test_batch, self.test_batch_order = "auto", None, "rotate"
        if self.horizon != "off":
            p = self.problem
            if p.aggregator is not None:
                raise ValueError("the adjoint contribution needs the W^t matmul; a robust "
                                 "aggregator is not linear (use horizon: off)")
            from ..influence.pullback import check_transposable

            check_transposable(p.opt, curvature)
        # (a): per-round outflow increments; free riders: alignment sums per edge [k, j]
        self.a_rounds: dict[int, np.ndarray] = {}
        self.align = np.zeros((3, n, n))  # count, sum, sum of squares
        self.edges = np.zeros((n, n), dtype=bool)
        self._edge_cache: tuple[bytes, np.ndarray] | None = None  # (W^t bytes, its edges)
        # (b): the window's recorded rounds and the per-round values after each sweep
        self._rec: dict[int, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}
        self._batches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # the loop's, kept
        self._start: int | None = None
        self.b_rounds: dict[int, np.ndarray] = {}
        self.windows: list[tuple[int, int]] = []
        self.seconds = {"online": 0.0, "sweep": 0.0, "sweep_cpu": 0.0}  # wall; CPU
        self.progress = False  # a bar over the reverse sweep's rounds (set by long callers)

    # ------------------------------------------------------------------ the loop's seams

    @property
    def every(self) -> int:
        """(a) is tracked every ``every``-th round (the test mini-batch rotates with it)."""
        return self.prox.every

    def active(self, t: int) -> bool:
        return self.horizon != "off" or self.prox.active(t)

    def before_gossip(self, view: RoundView) -> None:
        t0 = time.perf_counter()
        if self.prox.active(view.t):
            self.prox.before_gossip(view)
            self._alignment(view)
        if self.horizon != "off" and view.is_full:
            if self._start is None:
                self._start = view.t
            if view.batch is not None:  # the simulator's: fresh tensors, kept without a copy
                self._rec[view.t] = (view.theta, view.update(), None)
                self._batches[view.t] = view.batch  # the sweep reuses them (no re-gather)
            else:
                self._rec[view.t] = (view.theta.clone(), view.update().clone(), None)
        self.seconds["online"] += time.perf_counter() - t0

    def after_gossip(self, view: RoundView, W_used: np.ndarray) -> None:
        t0 = time.perf_counter()
        if self.prox.active(view.t):
            self.prox.after_gossip(view, W_used)
            self.a_rounds[view.t] = self.prox.last_actual.numpy().sum(0)  # diagonal is 0
        if view.t in self._rec:
            th, U, _ = self._rec[view.t]
            self._rec[view.t] = (th, U, np.array(W_used, dtype=np.float64))
            end = view.t + 1
            due = (self.horizon == "window" and end - self._start >= self.window) or (
                self.rounds is not None and end >= self.rounds)
            self.seconds["online"] += time.perf_counter() - t0
            if due:
                self.finish(view.theta_next)
            return
        self.seconds["online"] += time.perf_counter() - t0

    def _alignment(self, view: RoundView) -> None:
        """Per edge ``[k, j]``: ``cos(û_j, −G_k)`` (0 for a zero update), receivers' rows.

        The dots ``G_k · û_j`` are the proximal ledger's of this round when it reads ``pre``
        (the same numbers: computed once), else their own, on the edges only."""
        G, U = view.test_grad("pre"), view.update()
        self._d_seen = int(U.shape[1])
        rec, snd = view.receivers, view.senders
        key = np.asarray(view.W_nominal).tobytes()
        if self._edge_cache is None or self._edge_cache[0] != key or not view.is_full:
            W = view.block(view.W_nominal)
            self._edge_cache = (key, (W > 0) & (rec[:, None] != snd[None, :]))
        edge = self._edge_cache[1]
        S = self.prox.last_dots if self.prox.readout == "pre" else None
        if S is None:
            S = dot_matrix(G, U, edge if view.is_full else None)
        gn = np.sqrt(row_dots(G, G))  # float64 norms (one pass each, no float64 copies)
        un = np.sqrt(row_dots(U, U))
        with np.errstate(all="ignore"):
            C = -S.numpy() / np.maximum(gn[:, None] * un[None, :], 1e-300)
        C = np.where(np.isfinite(C) & (un[None, :] > 0) & edge, C, 0.0)
        if view.is_full:
            self.edges |= edge
            self.align[0] += edge
            self.align[1] += C
            self.align[2] += C * C
            return
        ix = np.ix_(rec, snd)
        self.edges[ix] |= edge
        for i, val in enumerate((edge.astype(np.float64), C, C * C)):
            self.align[i][ix] = self.align[i][ix] + val

    # ------------------------------------------------------------------ (b): the sweep

    def finish(self, theta_end: torch.Tensor) -> None:
        """Run the reverse sweep over the recorded window with the read-out at ``theta_end``
        (``θ^{t1}``, the parameters after the window's last round); called by the loop at the
        window's end, or by hand for a run that stopped early."""
        if not self._rec:
            return
        t0, c0 = time.perf_counter(), time.process_time()
        rounds = sorted(self._rec)
        from .._util import progress_bar

        with progress_bar(self.progress, len(rounds), "contribution: reverse sweep") as advance:
            vals = self._sweep(rounds, theta_end, advance)
        for t, v in zip(rounds, vals, strict=True):
            self.b_rounds[t] = v
        self.windows.append((rounds[0], rounds[-1] + 1))
        self._rec, self._batches, self._start = {}, {}, None
        self.seconds["sweep"] += time.perf_counter() - t0
        self.seconds["sweep_cpu"] += time.process_time() - c0

    def _readout_grad(self, theta: torch.Tensor) -> torch.Tensor:
        from .._mlp import grads

        x, y = self.problem.test_set(self.adjoint_test == "own")
        return grads(self.problem.fm, theta, x, y)

    def _sweep(self, rounds: list[int], theta_end: torch.Tensor,
               advance: Any = None) -> list[np.ndarray]:
        """Values ``λ_j^{tᵀ} û_j^t`` per round: (n,) or, with ``exclude_self``, (receiver, n).
        ``λ^t`` = cotangent on ``θ^{t+½}``: gossip transposed, then each local step pulled back
        by :func:`~dice_influence.influence.pullback.step_pullback` (optimizer-state cotangents
        carried under momentum) — the same function a real peer calls on its own row."""
        n = self.n
        G = self._readout_grad(theta_end).detach()
        q = self.q.to(G.dtype)
        if self.exclude_self:
            a = torch.zeros(n, n, G.shape[1], dtype=G.dtype)
            a[torch.arange(n), torch.arange(n)] = q[:, None] * G  # receiver r reads L_r
        else:
            a = q[:, None] * G
        a_st = torch.zeros_like(a) if self.problem.opt.stateful else None
        out: list[np.ndarray] = [np.zeros(0)] * len(rounds)
        WT: dict[bytes, torch.Tensor] = {}  # W^t transposed, once per distinct matrix
        rows = np.arange(math.prod(a.shape[:-1]))  # row_dots' pairs (lam row, U row % n)
        with torch.no_grad():
            for i in range(len(rounds) - 1, -1, -1):
                t = rounds[i]
                theta, U, W = self._rec[t]
                key = W.tobytes()
                if key not in WT:
                    WT[key] = torch.as_tensor(W.T.copy(), dtype=a.dtype)
                lam = torch.matmul(WT[key], a)
                out[i] = row_dots(lam, U, rows)
                if i > 0:
                    a, a_st = self._jt(t, theta, lam, a_st)
                if advance is not None:
                    advance()
        return out

    def _jt(self, t: int, theta: torch.Tensor, lam: torch.Tensor,
            lam_st: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(J_tᵀ λ, state cotangent)`` of round ``t``'s local step at ``θ^t`` (transforms
        included; for plain SGD ``J = I − η H``); ``λ`` may carry a leading receiver axis."""
        from ..influence.pullback import step_pullback

        a, a_st, _ = step_pullback(self.problem, theta, None, t, lam, lam_st,
                                   curvature=self.curvature, batch=self._batches.get(t))
        return a, a_st

    # ------------------------------------------------------------------ read-outs

    @property
    def proximal(self) -> np.ndarray:
        """``P[k, j]`` = cumulative proximal influence of sender ``j`` on receiver ``k``."""
        return self.prox.tracker.cum.numpy()

    def measures(self) -> dict[str, Any]:
        """Per node (axis ``node``): ``proximal_out`` (a), ``proximal_in``, ``reciprocity``,
        ``adjoint`` (b; None where not computed), free-rider statistics and flags."""
        rec = node_reciprocity(self.proximal)
        b = None
        if self.b_rounds:
            B = np.stack([self.b_rounds[t] for t in sorted(self.b_rounds)])
            if self.exclude_self:
                B = B.sum(1) - np.einsum("trr->tr", B)  # receivers other than the source
            b = B.sum(0)
        d = self.d or getattr(self, "_d_seen", None) or 1
        fr = free_rider_flags(self.align, self.edges, d=d, rule=self.rule, z=self.z,
                              quorum=self.quorum)
        return {"proximal_out": rec["outflow"], "proximal_in": rec["inflow"],
                "reciprocity": rec["R"], "adjoint": b, **fr}

    def summary(self) -> dict[str, Any]:
        m = self.measures()
        rounds_a = sorted(self.a_rounds)
        rounds_b = sorted(self.b_rounds)
        b_per_round = None
        if rounds_b:
            B = np.stack([self.b_rounds[t] for t in rounds_b])
            b_per_round = (B.sum(1) - np.einsum("trr->tr", B) if self.exclude_self else B)
        return {
            "sign": SIGN, "units": "test loss (mean cross-entropy)",
            "settings": {"readout": self.prox.readout, "every": self.prox.every,
                         "horizon": self.horizon, "window": self.window,
                         "curvature": self.curvature, "exclude_self": self.exclude_self,
                         "adjoint_test": self.adjoint_test, "rule": self.rule, "z": self.z,
                         "quorum": self.quorum},
            "axes": {"per_round": ["round", "node"], "P": ["receiver", "sender"],
                     "alignment_t": ["receiver", "sender"],
                     "alignment_rms": ["receiver", "sender"]},
            **{k: _plain(v) for k, v in m.items()},
            "rounds_proximal": rounds_a,
            "proximal_per_round": _plain(np.stack([self.a_rounds[t] for t in rounds_a]))
            if rounds_a else [],
            "rounds_adjoint": rounds_b, "adjoint_windows": self.windows,
            "adjoint_per_round": _plain(b_per_round) if b_per_round is not None else [],
            "P": _plain(self.proximal), "seconds": dict(self.seconds),
        }

    def state_dict(self) -> dict[str, Any]:
        """The ledger and free-rider sums (a window's recorded rounds are not checkpointed)."""
        rounds = sorted(self.a_rounds)
        return {"prox": self.prox.state_dict(), "align": self.align.copy(),
                "edges": self.edges.copy(), "a_rounds": np.array(rounds, dtype=np.int64),
                "a_values": np.stack([self.a_rounds[t] for t in rounds]) if rounds
                else np.zeros((0, self.n))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prox.load_state_dict(state["prox"])
        self.align = np.asarray(state["align"], dtype=np.float64).copy()
        self.edges = np.asarray(state["edges"], dtype=bool).copy()
        self.a_rounds = {int(t): np.asarray(v) for t, v in
                         zip(np.asarray(state["a_rounds"]).tolist(),
                             np.asarray(state["a_values"]), strict=True)}


def row_dots(lam: torch.Tensor, U: torch.Tensor, rows: np.ndarray | None = None) -> np.ndarray:
    """``Σ_c lam[..., j, c] U[j, c]`` in float64 (products and sum), shape ``lam.shape[:-1]``:
    the compiled edge kernel (no float64 copies of the operands), else torch. ``rows``:
    ``arange`` of ``lam``'s row count when the caller keeps one (a sweep, every round)."""
    from .._edge_kernel import edge_dots

    n, d = U.shape
    flat = lam.reshape(-1, d)
    if rows is None:
        rows = np.arange(flat.shape[0])
    v = edge_dots(flat.contiguous(), U.contiguous(), rows, rows % n if len(rows) > n else rows)
    if v is None:
        return (lam.double() * U.double()).sum(-1).numpy()
    return v.reshape(lam.shape[:-1]).numpy()


# ----------------------------------------------------------------------------- rules


def edge_t_statistic(align: np.ndarray) -> np.ndarray:
    """t-statistic ``mean / (sd / √m)`` of each edge's per-round alignment (``align`` =
    (count, sum, sum of squares), each (n, n)); 0 where a series is all zero, ±inf where it is
    constant and non-zero, NaN where there are fewer than 2 rounds."""
    m, s, s2 = align
    with np.errstate(all="ignore"):
        mean = s / m
        var = np.maximum(s2 - m * mean**2, 0.0) / (m - 1)
        t = mean / np.sqrt(var / m)
    t = np.where((var <= 1e-30) & (np.abs(mean) <= 1e-300), 0.0, t)
    return np.where(m >= 2, t, np.nan)


def free_rider_flags(align: np.ndarray, edges: np.ndarray, *, d: int, rule: str = "rms",
                     z: float = 3.0, quorum: float = 0.5) -> dict[str, Any]:
    """The local free-rider rule (module docstring). ``align`` = (count, sum, sum of squares)
    of each edge's per-round alignment ``cos(û_j, −G_k)`` (receiver, sender); ``d`` = number of
    parameters. Receiver ``k`` flags in-neighbour ``j`` when ``√d · rms(c_kj) < z`` (``rms``:
    indistinguishable from isotropic noise) or ``|t_kj| < z`` (``t``: no consistent sign); node
    ``j`` is a free rider when the flagging share of its out-neighbours exceeds ``quorum``. A
    harmful node sends signal, the wrong one, and is not a free rider. Returns per node
    ``free_rider_votes`` (share), ``free_rider`` (bool), and per edge ``alignment_t`` and
    ``alignment_rms`` (``√d · rms``)."""
    t = edge_t_statistic(align)
    m = align[0]
    with np.errstate(all="ignore"):
        rms = np.where(m > 0, np.sqrt(align[2] / np.maximum(m, 1)) * math.sqrt(d), np.nan)
    stat = np.abs(t) if rule == "t" else rms
    E = np.asarray(edges, dtype=bool) & ~np.isnan(stat)
    flag = E & (np.where(E, stat, np.inf) < z)
    outdeg = E.sum(0)
    share = np.where(outdeg > 0, flag.sum(0) / np.maximum(outdeg, 1), 0.0)
    return {"free_rider_votes": share, "free_rider": share > quorum, "alignment_t": t,
            "alignment_rms": rms}


def reciprocity_factor(outflow: np.ndarray, inflow: np.ndarray,
                       clip: tuple[float, float] = (0.5, 1.0)) -> np.ndarray:
    """``ρ_j = 2 g_j / (g_j + k_j)`` clipped to ``clip``, with ``g_j = max(−outflow_j, 0)`` the
    help node ``j`` gave and ``k_j = max(−inflow_j, 0)`` the help it took (proximal ledger;
    negative = helpful). When both flows are helpful ``ρ = 2R/(1+R)`` with ``R`` = outflow /
    inflow (docs/method.md §5): 1 for balanced give and take, 2 for a node that only gives, 0 for one
    that only takes; unlike ``R`` it stays finite when a node takes ~0. The default clip
    ``(½, 1)`` only penalizes net takers (at most halving their reward): how much help a node
    happens to receive depends on its neighbours, so it earns no bonus. ``ρ = 1`` when a node
    neither gave nor took."""
    g = np.maximum(-np.nan_to_num(np.asarray(outflow, dtype=np.float64)), 0.0)
    k = np.maximum(-np.nan_to_num(np.asarray(inflow, dtype=np.float64)), 0.0)
    tot = g + k
    with np.errstate(all="ignore"):
        rho = np.where(tot > 0, 2.0 * g / tot, 1.0)
    return np.clip(rho, *clip)


def reward_split(
    contribution: np.ndarray,
    outflow: np.ndarray | None = None,
    inflow: np.ndarray | None = None,
    *,
    budget: float = 1.0,
    excluded: np.ndarray | None = None,
    clip: tuple[float, float] = (0.5, 1.0),
) -> np.ndarray:
    """Split ``budget`` by measured helpful contribution, adjusted by reciprocity.

    ``h_j = max(−c_j, 0)`` (negative contribution = helpful; a harmful or zero contribution
    earns nothing), 0 where ``excluded`` (flagged free riders), times the reciprocity factor
    :func:`reciprocity_factor` of the proximal ledger's ``outflow`` / ``inflow`` (1 if not
    given): ``reward_j = budget · h_j ρ_j / Σ h ρ``, all zeros if nobody helped. Sums to
    ``budget`` whenever some node helped; attackers and free riders get 0 only because their
    *measured* contribution is harmful or zero, or the free-rider rule flagged them."""
    c = np.asarray(contribution, dtype=np.float64)
    h = np.where(np.isfinite(c), np.maximum(-c, 0.0), 0.0)
    if excluded is not None:
        h = np.where(np.asarray(excluded, dtype=bool), 0.0, h)
    rho = np.ones_like(h) if outflow is None or inflow is None else \
        reciprocity_factor(outflow, inflow, clip)
    w = h * rho
    total = w.sum()
    return budget * w / total if total > 0 else np.zeros_like(w)


# ----------------------------------------------------------------------------- peers


def merge_ledgers(rows: Sequence[Sequence[float] | np.ndarray]) -> dict[str, Any]:
    """Sum the peers' ledgers: peer ``k`` keeps row ``k`` of ``P`` (what each in-neighbour's
    updates did to its test loss). Returns ``P`` (receiver, sender) and, per node, the (a)
    measure ``proximal_out`` (Σ over receivers), ``proximal_in`` and ``reciprocity``."""
    P = np.asarray([np.asarray(r, dtype=np.float64) for r in rows])
    n = len(P)
    if P.shape != (n, n):
        raise ValueError(f"merge_ledgers needs one row of length {n} per peer, got {P.shape}")
    rec = node_reciprocity(P)
    return {"sign": SIGN, "axes": {"P": ["receiver", "sender"]}, "P": P.tolist(),
            "proximal_out": rec["outflow"].tolist(), "proximal_in": rec["inflow"].tolist(),
            "reciprocity": _plain(rec["R"])}


def write_ledger(out: str | Path, rows: Sequence[Sequence[float]]) -> dict[str, Any]:
    """:func:`merge_ledgers` of the peers' rows, written to ``out/contribution_ledger.json``."""
    from .._util import write_json

    led = merge_ledgers(rows)
    write_json(Path(out) / "contribution_ledger.json", led)
    return led


def _plain(v: Any) -> Any:
    """JSON-ready: arrays to lists, NaN/inf to None."""
    if isinstance(v, np.ndarray):
        if v.dtype == bool:
            return v.tolist()
        return [_plain(x) for x in v.tolist()] if v.ndim > 1 else \
            [None if not math.isfinite(x) else float(x) for x in v.astype(float).tolist()]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def from_settings(s: Any, ctx: Any) -> ContributionObserver:
    """Factory for ``observers: - kind: contribution`` (:mod:`dice_influence.plugins`)."""
    from .proximal import node_weight_vector

    p = ctx.problem
    rounds = s.rounds if s.rounds is not None else p.cfg.train.rounds
    obs = ContributionObserver(
        ctx.n, p, q=node_weight_vector(ctx.n, s.q), readout=s.readout, every=s.every,
        horizon=s.horizon, window=s.window, rounds=rounds, curvature=s.curvature,
        exclude_self=s.exclude_self, adjoint_test=s.adjoint_test, z=s.z,
        quorum=s.quorum, rule=s.free_rider_rule)
    obs.test_set, obs.test_batch = s.test_set, s.test_batch
    obs.test_batch_order = s.test_batch_order
    return obs
