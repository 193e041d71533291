"""Self-healing decentralized training (docs/method.md §6): detect harmful neighbours, prune, heal.

Built on the one loop (:mod:`dice_influence.loop`):

- :class:`PrunePolicy` — every ``check_every`` rounds each node applies a detection rule
  (:mod:`dice_influence.apps.anomaly`) to its own row of proximal influence (read from a
  :class:`~dice_influence.apps.proximal.ProximalObserver`) and removes flagged in-neighbours
  from ``W^t`` (:func:`repair_rows`: THE rule, the same in the simulator and on peers). It also
  refuses senders whose update norm exceeds ``max_norm_ratio`` × the median norm it sees
  (first-order influence calls a positively scaled-up helpful update "helpful");
- robust aggregation baselines (:mod:`dice_influence.apps.aggregators`);
- :func:`guarded_train` — the anomaly experiment's arms as configurations of that loop: attacks
  (transforms of the problem), tracking (observer), defence (policy or aggregator).

With the ``pre`` read-out a node decides before it mixes in the same round (it already has
``G_k = ∇L(θ_k^t)`` and the neighbours' updates); ``post``/``midpoint`` scores reach the
policy in the next round. Non-finite senders never leak: pruned weights are exact zeros and the
core :class:`~dice_influence.gossip.Mixer` never multiplies a zero weight into a sender.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .._util import progress_bar
from ..attacks import AttackPlan, attack_transforms
from ..gossip import node_losses, require_accuracy
from ..loop import Loop, Policy, RoundView
from . import anomaly as A
from .aggregators import ClippedGossip, TrimmedMean
from .proximal import ProximalObserver, node_weight_vector

DEFENSES = (None, "dice", "clipped_gossip", "trimmed_mean")
REPAIR_RULES = ("rescale", "diagonal")


def repair_rows(W: np.ndarray, blocked: np.ndarray, rule: str = "rescale") -> np.ndarray:
    """THE rule that repairs rows after edges are removed (docs/method.md §6; both runtimes call it).

    ``W[k, j] = 0`` where ``blocked[k, j]`` (never the diagonal), then each row that lost
    weight is made stochastic again. ``rule="rescale"`` (the default, chosen by measurement —
    docs/anomaly.md): the row is divided by what it kept, ``W'[k, j] = W[k, j] / Σ_{kept}
    W[k, ·]`` (a row left with nothing keeps only itself); ``"diagonal"``: the removed weight
    moves to ``W[k, k]`` (kept only for that measurement). Entries stay ≥ 0."""
    if rule not in REPAIR_RULES:
        raise ValueError(f"repair rule {rule!r}: choose one of {REPAIR_RULES}")
    B = np.asarray(blocked, dtype=bool).copy()
    np.fill_diagonal(B, False)
    if not B.any():
        return W
    out = np.where(B, 0.0, W)
    if rule == "diagonal":
        out[np.diag_indices_from(out)] += (W - out).sum(1)
        return out
    for k in np.flatnonzero((B & (W > 0)).any(1)):
        s = out[k].sum()
        if s > 0:
            out[k] = out[k] / s
        else:
            out[k] = 0.0
            out[k, k] = 1.0
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


# ----------------------------------------------------------------------------- the policy


class PrunePolicy(Policy):
    """Detection + self-healing, decided by each receiver on its own row (module docstring).

    State: ``blocked[k, j]`` (k currently refuses j), ``norm_blocked`` (refused for good for an
    oversized update), ``prune_log`` = (round, k, j, +1 prune / −1 re-admit). With
    ``readmit=False`` a prune is final: :meth:`final` tells a peer runtime it may stop
    listening to that sender."""

    name = "prune"

    def __init__(
        self,
        n: int,
        proximal: ProximalObserver,
        *,
        rule: str = "sign",
        z_threshold: float = 3.0,
        margin: float = 0.0,
        score: str = "cumulative",
        check_every: int = 1,
        start: int = 1,
        readmit: bool = True,
        max_norm_ratio: float | None = 10.0,
        repair: str = "rescale",
    ) -> None:
        if rule not in A.RULES:
            raise ValueError(f"unknown detection rule {rule!r}; choose one of {A.RULES}")
        if score not in ("cumulative", "window"):
            raise ValueError(f"score={score!r}: choose 'cumulative' or 'window'")
        self.n = n
        self.proximal = proximal
        self.rule, self.z_threshold, self.margin, self.score = rule, z_threshold, margin, score
        self.check_every, self.start, self.readmit = max(1, check_every), start, readmit
        self.max_norm_ratio = max_norm_ratio
        self.repair = repair
        self.blocked = np.zeros((n, n), dtype=bool)
        self.norm_blocked = np.zeros((n, n), dtype=bool)
        self.prune_log: list[tuple[int, int, int, int]] = []
        self._seen_round: int | None = None

    def active(self, t: int) -> bool:
        return bool(self.blocked.any()) or self.proximal.active(t)

    def final(self) -> np.ndarray:
        """Edges pruned for good (``readmit=False``): ``final[k, j]``."""
        return self.blocked if not self.readmit else np.zeros_like(self.blocked)

    def _norm_check(self, view: RoundView) -> None:
        norms = view.update().norm(dim=1).double().cpu().numpy()
        norms = np.where(np.isfinite(norms), norms, np.inf)
        R, S = view.receivers, view.senders
        self_mask = R[:, None] == S[None, :]
        mask = ((view.block(view.W_nominal) > 0) | self_mask) & ~view.block(self.final())
        M = np.where(mask & ~np.isinf(norms)[None, :], norms[None, :], np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(M, axis=1)
        big = norms[None, :] > self.max_norm_ratio * np.nan_to_num(med, nan=0.0)[:, None]
        self.norm_blocked[np.ix_(R, S)] |= big & mask & ~self_mask

    def _flags(self, rows: np.ndarray) -> np.ndarray:
        tk = self.proximal.tracker
        S = (tk.score if self.score == "cumulative" else tk.window_score).numpy()
        E = tk.seen.numpy()
        F = A.flags(S, E, self.rule, self.z_threshold, self.margin) | self.norm_blocked
        keep = np.zeros(self.n, dtype=bool)
        keep[rows] = True
        return F & keep[:, None], E & keep[:, None]

    def decide(self, view: RoundView) -> np.ndarray:
        t = view.t
        fresh = self.proximal.last_round is not None and self.proximal.last_round != self._seen_round
        if self.max_norm_ratio is not None and self.proximal.active(t):
            self._norm_check(view)
        if fresh and t >= self.start and t % self.check_every == 0:
            self._seen_round = self.proximal.last_round
            F, E = self._flags(view.receivers)
            rows = np.zeros(self.n, dtype=bool)
            rows[view.receivers] = True
            new = F & ~self.blocked
            for k, j in zip(*np.nonzero(new), strict=True):
                self.prune_log.append((t, int(k), int(j), 1))
            if self.readmit:
                back = self.blocked & ~F & E
                for k, j in zip(*np.nonzero(back), strict=True):
                    self.prune_log.append((t, int(k), int(j), -1))
                upd = F | (self.blocked & ~E)
                self.blocked = np.where(rows[:, None], upd, self.blocked)
            else:
                self.blocked |= F
        if not self.blocked.any():
            return view.W_nominal
        return repair_rows(view.W_nominal, self.blocked, self.repair)

    def summary(self) -> dict[str, Any]:
        """Edges pruned at the end (``[receiver, sender]``) and every prune / re-admission."""
        return {"rule": self.rule, "repair": self.repair,
                "pruned": [[int(k), int(j)] for k, j in zip(*np.nonzero(self.blocked),
                                                            strict=True)],
                "log": [{"round": t, "receiver": k, "sender": j,
                         "event": "pruned" if s > 0 else "readmitted"}
                        for t, k, j, s in self.prune_log]}

    def state_dict(self) -> dict[str, Any]:
        return {"blocked": self.blocked.copy(), "norm_blocked": self.norm_blocked.copy(),
                "prune_log": [list(e) for e in self.prune_log], "seen_round": self._seen_round}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.blocked = np.asarray(state["blocked"], dtype=bool).copy()
        self.norm_blocked = np.asarray(state["norm_blocked"], dtype=bool).copy()
        self.prune_log = [tuple(int(v) for v in e) for e in state["prune_log"]]
        self._seen_round = state.get("seen_round")


def from_settings(s: Any, ctx: Any) -> PrunePolicy:
    """Factory for ``policy: kind: prune``; reads the run's proximal observer (adding one with
    default settings when the config has none)."""
    obs = ctx.plugins.find("proximal")
    if obs is None:
        obs = ProximalObserver(ctx.n, node_weight_vector(ctx.n, "uniform"))
        ctx.plugins.observers.append(obs)
    return PrunePolicy(ctx.n, obs, rule=s.rule, z_threshold=s.z_threshold, margin=s.margin,
                       score=s.score, check_every=s.check_every, start=s.start,
                       readmit=s.readmit, max_norm_ratio=s.max_norm_ratio)


# ----------------------------------------------------------------------------- the arms


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
    test_batch_order: str = "rotate"  # or "first" (loop.readout_rows)
    repair: str = "rescale"


@dataclass
class GuardResult:
    """What one guarded run produced. ``tracker`` holds the proximal influence (positive =
    harmful); ``blocked[k, j]`` = ``k`` pruned ``j`` at the end; ``prune_log`` = (round, k, j,
    +1 prune / −1 re-admit); ``evals`` = honest accuracy on the common test set over rounds;
    ``W_used`` = the rounds whose ``W^t`` the policy changed."""

    theta: torch.Tensor
    tracker: Any
    blocked: np.ndarray
    W_final: np.ndarray
    malicious: np.ndarray
    evals: list[dict[str, Any]] = field(default_factory=list)
    prune_log: list[tuple[int, int, int, int]] = field(default_factory=list)
    nonfinite_honest: bool = False
    W_used: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        return self.evals[-1] if self.evals else {}


def _eval(problem: Any, theta: torch.Tensor, honest: np.ndarray, t: int) -> dict[str, Any]:
    with torch.no_grad():
        idx = torch.as_tensor(np.flatnonzero(honest), device=theta.device)
        loss, acc = node_losses(problem.fm, theta[idx], problem.val_x, problem.val_y)
    acc = torch.nan_to_num(require_accuracy(acc, 'the defense report'), nan=0.0)
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
    label: str = "guarded training",
) -> GuardResult:
    """Train ``problem`` under ``plan`` with optional tracking and defence: a configuration of
    the one loop (attack transforms, a proximal observer, a prune policy or a robust
    aggregator). ``problem`` must already contain the data-level attacks (build it from
    :func:`dice_influence.attacks.with_data_attacks`). ``malicious`` (n,) bool overrides which
    nodes count as attackers for the honest-accuracy read-out (default: the plan's)."""
    opts = opts or GuardOptions()
    if opts.defense not in DEFENSES:
        raise ValueError(f"defense {opts.defense!r}: choose one of {DEFENSES}")
    n = problem.n
    R = problem.cfg.train.rounds if rounds is None else rounds
    if malicious is None:
        malicious = plan.mask if plan is not None else np.zeros(n, dtype=bool)
    honest = ~np.asarray(malicious, dtype=bool)
    aggregator = {"clipped_gossip": lambda: ClippedGossip(opts.clip_delta),
                  "trimmed_mean": lambda: TrimmedMean(opts.trim)}.get(opts.defense or "")
    run_problem = dataclasses.replace(
        problem, transforms=problem.transforms + attack_transforms(plan),
        aggregator=aggregator() if aggregator else problem.aggregator)
    observers, policy = [], None
    tracker = None
    if opts.track_every > 0 or opts.defense == "dice":
        obs = ProximalObserver(n, node_weight_vector(n, opts.q), readout=opts.readout,
                               every=max(1, opts.track_every), window=opts.window,
                               history=opts.history)
        observers.append(obs)
        tracker = obs.tracker
        if opts.defense == "dice":
            policy = PrunePolicy(n, obs, rule=opts.rule, z_threshold=opts.z_threshold,
                                 margin=opts.margin, score=opts.score,
                                 check_every=opts.check_every, start=opts.start,
                                 readmit=opts.readmit, max_norm_ratio=opts.max_norm_ratio,
                                 repair=opts.repair)
    loop = Loop(run_problem, observers, policy, test_batch=opts.test_batch,
                test_batch_order=opts.test_batch_order)
    theta = run_problem.init_theta()
    state = run_problem.opt.init_state(theta)
    evals = [_eval(run_problem, theta, honest, 0)] if opts.eval_every > 0 else []
    with progress_bar(progress, R, label) as advance:
        def on_round(t: int, th: torch.Tensor, st: torch.Tensor | None) -> None:
            if opts.eval_every > 0 and (t % opts.eval_every == 0 or t == R):
                evals.append(_eval(run_problem, th, honest, t))
            advance()

        theta, _ = loop.run(theta, state, 0, R, on_round=on_round)
    blocked = policy.blocked.copy() if policy is not None else np.zeros((n, n), dtype=bool)
    W_final = loop.recorded.get(R - 1, problem.W(max(R - 1, 0)))
    idx = torch.as_tensor(np.flatnonzero(honest))
    return GuardResult(
        theta=theta, tracker=tracker, blocked=blocked, W_final=W_final,
        malicious=np.asarray(malicious, dtype=bool), evals=evals,
        prune_log=list(policy.prune_log) if policy is not None else [],
        nonfinite_honest=not bool(torch.isfinite(theta[idx]).all()),
        W_used=dict(loop.recorded),
    )
