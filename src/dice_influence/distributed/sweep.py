"""The whole-run adjoint on real peers: a reverse gossip sweep (docs/method.md §4, "the sweep on
real peers"; docs/contribution.md, "Contribution measured by the network itself").

The transpose of one gossip round is gossip over the reversed edges: if node ``k`` computed
``θ_k^{t+1} = Σ_j W^t[k, j] θ_j^{t+½}``, then in the reverse sweep ``k`` sends
``W^t[k, j] λ_k^{t+1}`` back to each in-neighbour ``j`` it listened to, and ``j`` sums what its
out-neighbours send (its own self weight included) into ``μ_j^t``, the cotangent on its half step
``θ_j^{t+½}``. Node ``j`` then reads out, locally:

- its contribution in round ``t``: ``b_j^t = μ_j^{tᵀ} u_j^t`` (first-order influence of what it
  sent on the target; negative = helpful) — summed over rounds, the simulator's (b);
- every sample ``i`` of its batch: ``(1/B) c_gᵀ ∇ℓ_i`` (influence of removing that sample);

and pulls ``μ_j^t`` back through its own local step (:func:`~dice_influence.influence.pullback.
step_pullback`, the function the simulator's sweep calls: a ``vjp`` at its own ``θ_j^t`` and
batch, the Hessian term included, momentum / weight-decay state cotangents carried) to get
``λ_j^t``, which it sends on in round ``t − 1``. The ``W^t`` used is the one recorded in the
forward pass (time-varying schedules and policy-chosen rows included), over the same transport,
packet checks and loopback rules as forward gossip.

The target is each peer's gradient of its test loss at its final parameters, weighted by
``q_k``: on the shared validation set (the simulator's target) and, when the run has per-node
test splits, on each peer's own split (``targets: both``) — one sweep carries both.

Memory: a peer keeps ``θ`` and its optimizer state every ``c`` rounds
(``experiment.distributed.sweep.checkpoint_every``, default ``ceil(√T)``) and, during the sweep,
replays one segment of ``c`` rounds at a time over the network (every peer replays the same
segment, bit-identically, with the recorded ``W^t`` rows), so it holds ``O(T/c + c)``
parameter vectors; the last segment is kept from the forward pass.

Trust: nothing here is verified cryptographically; a peer that lies in the sweep changes other
peers' scores (docs/contribution.md, "Honesty"). ``max_norm_ratio`` bounds the incoming
messages. Privacy: the messages are gradients of other nodes' test losses.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._util import atomic_write_text, write_json
from ..config import ConfigError
from ..gossip import loss_grads, param_views
from ..loop import RoundView, local_step_

if TYPE_CHECKING:
    from .peer import Peer, PeerState

SIGN = "influence = loss with the data - loss without it; negative = helpful, positive = harmful"


def sweep_plan(peer: Peer) -> PeerSweep | None:
    """The peer's sweep, or None when the config asks for none (no contribution observer with
    a horizon, or ``experiment.distributed.sweep.enabled: false``)."""
    from ..plugins import parse

    cfg = peer.cfg
    raw = next((o for o in cfg.observers if o.get("kind") == "contribution"), None)
    sw = peer.s.sweep
    if raw is None or sw.enabled is False:
        if sw.enabled:
            raise ConfigError("experiment.distributed.sweep.enabled: the reverse sweep needs a "
                              "`observers: - kind: contribution` entry (its horizon, "
                              "curvature and target)")
        return None
    s = parse("observer", raw, "observers.contribution")
    if s.horizon == "off":
        if sw.enabled:
            raise ConfigError("experiment.distributed.sweep.enabled with the contribution "
                              "observer's horizon: off; set horizon: run or window")
        return None
    return PeerSweep(peer, s, sw)


class PeerSweep:
    """Recording during training, then the reverse sweep at each window's end (module doc)."""

    def __init__(self, peer: Peer, s: Any, sw: Any) -> None:
        from ..apps.proximal import node_weight_vector
        from ..influence.pullback import check_transposable

        lp = peer.lp
        self.peer, self.lp, self.k, self.n = peer, lp, peer.k, lp.n
        if s.exclude_self:
            raise ConfigError("observers.contribution.exclude_self runs one sweep per receiver "
                              "and only in the simulator; set it false for `dice launch`")
        if lp.aggregator is not None:
            raise ConfigError("the reverse sweep needs the W^t matmul; a robust aggregator is "
                              "not linear (remove aggregator: or the contribution observer)")
        check_transposable(lp.opt, s.curvature)
        self.horizon, self.window, self.curvature = s.horizon, int(s.window), s.curvature
        self.total = int(s.rounds or peer.cfg.train.rounds)
        self.c_setting = sw.checkpoint_every
        self.want_scores = bool(sw.scores)
        self.max_ratio = sw.max_norm_ratio
        self.lie = sw.lie
        self.ratio_max = 0.0  # max over incoming messages of ‖msg‖ / ‖W_nominal λ_own‖
        self.cos_min = 1.0  # min over incoming messages of cos(msg, λ_own)
        self.min_cos = sw.min_cosine
        self.q = float(node_weight_vector(self.n, s.q)[self.k])
        have_own = lp.own_test
        if s.adjoint_test == "own" and not have_own:
            raise ConfigError("observers.contribution.adjoint_test=own needs per-node test "
                              "splits on the peers (data.test_samples_per_node, test_set auto)")
        other = "own" if s.adjoint_test == "shared" else "shared"
        self.targets = [s.adjoint_test] + (
            [other] if sw.targets == "both" and (other == "shared" or have_own) else [])
        self.stateful = lp.opt.stateful
        self._shared_rows = torch.tensor([nm == "shared" for nm in self.targets])
        # recorded per round: (ins, outs, this peer's row of W_used)
        self.rec: dict[int, tuple[list[int], list[int], np.ndarray]] = {}
        self.ckpt: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.keep: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = {}
        self.t0: int | None = None
        self.b: dict[str, dict[int, float]] = {name: {} for name in self.targets}
        self.scores: dict[int, np.ndarray] = {}  # round -> (targets, B)
        self.windows: list[tuple[int, int]] = []
        self.events: list[dict[str, Any]] = []
        self.seconds = {"sweep": 0.0, "replay": 0.0, "pullback": 0.0, "exchange": 0.0,
                        "target": 0.0}
        self.vectors_peak = 0
        self.c_used: list[int] = []

    # ------------------------------------------------------------------ the window

    def window_end(self, t0: int) -> int:
        if self.horizon == "window":
            return min(t0 + self.window, self.total)
        return self.total

    def c_for(self, t0: int) -> int:
        T = self.window_end(t0) - t0
        return max(1, self.c_setting if self.c_setting is not None else math.ceil(math.sqrt(T)))

    def _last_segment_start(self, t0: int) -> int:
        t1, c = self.window_end(t0), self.c_for(t0)
        return t0 + ((t1 - 1 - t0) // c) * c

    def check_resume(self, t: int) -> None:
        """A resumed peer can sweep only windows that start at or after ``t``."""
        if t > 0 and (self.horizon == "run" or t % self.window) and t < self.total:
            raise ConfigError(
                f"resume at round {t}: the reverse sweep needs its window recorded from its "
                "first round (resume at a window boundary with horizon: window, or set "
                "experiment.distributed.sweep.enabled=false)")

    # ------------------------------------------------------------------ recording

    def before_round(self, st: PeerState) -> None:
        """Round ``st.t`` starts: open a window, keep a checkpoint every ``c`` rounds."""
        t = st.t
        if t >= self.total:
            return
        if self.t0 is None:
            self.t0 = t
        c = self.c_for(self.t0)
        if (t - self.t0) % c == 0 and t < self._last_segment_start(self.t0):
            self.ckpt[t] = (st.theta.clone(), None if st.opt_state is None
                            else st.opt_state.clone())
        self._count()

    def after_round(self, t: int, ins: list[int], outs: list[int], W_used: np.ndarray,
                    prev: torch.Tensor, state_prev: torch.Tensor | None,
                    u: torch.Tensor) -> None:
        """Round ``t`` done: record its edges and this peer's row of ``W_used``; keep the
        primal of the window's last segment (no replay needed there)."""
        if t >= self.total or self.t0 is None:
            return
        self.rec[t] = (list(ins), list(outs), np.array(W_used[self.k], dtype=np.float64))
        if t >= self._last_segment_start(self.t0):
            self.keep[t] = (prev.clone(), None if state_prev is None else state_prev.clone(),
                            u.clone())
        self._count()

    def due(self, t_next: int) -> bool:
        return self.t0 is not None and t_next >= self.window_end(self.t0)

    def _count(self) -> None:
        vec = sum(1 + (s is not None) for _, s in self.ckpt.values()) + \
            sum(2 + (s is not None) for _, s, _ in self.keep.values())
        self.vectors_peak = max(self.vectors_peak, vec)

    # ------------------------------------------------------------------ the sweep

    def _target(self, theta: torch.Tensor) -> torch.Tensor:
        lp = self.lp
        gs = []
        for name in self.targets:
            if name == "shared":
                x, y = lp.val_x, lp.val_y
            else:
                x, y = lp.test_x[None], lp.test_y[None]
            with torch.enable_grad():
                gs.append(loss_grads(lp.fm, theta, x, y)[1])
        return self.q * torch.stack(gs).detach()  # (targets, 1, d)

    def run(self, st: PeerState) -> None:
        """The reverse sweep over the window that ends at ``st.t`` (every peer calls it at the
        same round); read-outs kept in ``self.b`` / ``self.scores``."""
        t0, t1 = self.t0, st.t
        assert t0 is not None
        start = time.perf_counter()
        k, tp = self.k, self.peer.transport
        m = len(self.targets)
        c0 = time.perf_counter()
        a = self._target(st.theta)
        self.seconds["target"] += time.perf_counter() - c0
        a_st = torch.zeros_like(a) if self.stateful else None
        c = self.c_for(t0)
        self.c_used.append(c)
        last = self._last_segment_start(t0)
        starts = list(range(t0, last, c))
        segments = [(s, min(s + c, t1)) for s in starts] + [(last, t1)]
        for s0, s1 in reversed(segments):
            prim = self.keep if s0 == last else self._replay(s0, s1)
            for t in range(s1 - 1, s0 - 1, -1):
                ins, outs, row = self.rec[t]
                theta, state, u = prim[t]
                e0 = time.perf_counter()
                sends = {j: self._lie(t, (float(row[j]) * a[:, 0, :]).contiguous())
                         for j in ins}
                got = tp.exchange_adjoint(t, sends, outs, m)
                self.seconds["exchange"] += time.perf_counter() - e0
                mu = float(row[k]) * a
                for j in outs:
                    mu = mu + self._bounded(t, j, got[j], a)[:, None, :]
                for i, name in enumerate(self.targets):
                    self.b[name][t] = float((mu[i].double() * u.double()).sum())
                p0 = time.perf_counter()
                a, a_st, sc = _pullback(self.lp, theta, state, t, mu, a_st, k,
                                        self.curvature, t > t0, self.want_scores)
                self.seconds["pullback"] += time.perf_counter() - p0
                if sc is not None:
                    self.scores[t] = sc[:, 0, :].numpy()
            prim.clear()  # this segment is done: its primal and checkpoint are freed
            self.ckpt.pop(s0, None)
        self.windows.append((t0, t1))
        for t in range(t0, t1):
            self.rec.pop(t, None)
        self.ckpt.clear()
        self.keep.clear()
        self.t0 = None
        self.seconds["sweep"] += time.perf_counter() - start

    def _lie(self, t: int, msg: torch.Tensor) -> torch.Tensor:
        """The honesty drill (``sweep.lie``): this peer corrupts what it sends."""
        lie = self.lie
        if lie is None or lie.peer != self.k:
            return msg
        if lie.kind == "scale":
            return msg * lie.factor
        if lie.kind == "sign":
            return -msg
        gen = torch.Generator().manual_seed(1_000_003 * self.k + t)
        r = torch.randn(msg.shape, generator=gen, dtype=msg.dtype).to(msg.device)
        return r * (msg.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True).clamp_min(1e-300))

    def _bounded(self, t: int, j: int, msg: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """Checks on ``msg`` (targets, d) from out-neighbour ``j``, which carries
        ``W^t[j, k] λ_j``. Near consensus ``λ_j ≈ λ_k``, so the receiver compares it with its
        own ``W_nominal[j, k] λ_k``: the norm ratio and the cosine (their worst values are
        reported). Only the shared target is checked: with each node's own test split as the
        target, neighbours' cotangents differ by construction. A message whose ratio exceeds ``max_norm_ratio`` or whose cosine is below
        ``min_cosine`` is **replaced** by that estimate ``W_nominal[j, k] λ_k`` (clipping alone
        would let a liar's excess compound round after round) and logged."""
        w = float(self.lp.W(t)[j, self.k])
        if w <= 0:
            return msg
        ref = w * own.reshape(own.shape[0], -1)
        ref_norm = ref.norm(dim=1)
        norm = msg.norm(dim=1)
        ratio = norm / ref_norm.clamp_min(1e-300)
        cos = (msg * ref).sum(1) / (norm * ref_norm).clamp_min(1e-300)
        # only a shared target makes λ_j ≈ λ_k comparable; a zero message (an edge the
        # sender's policy pruned) carries nothing and is left alone
        shared = self._shared_rows & (norm > 0)
        if not bool(shared.any()):
            return msg
        ratio, cos = ratio.where(shared, torch.zeros_like(ratio)), \
            cos.where(shared, torch.ones_like(cos))
        self.ratio_max = max(self.ratio_max, float(ratio.max()))
        self.cos_min = min(self.cos_min, float(cos.min()))
        bad = torch.zeros_like(norm, dtype=torch.bool)
        if self.max_ratio is not None:
            bad |= ratio > self.max_ratio
        if self.min_cos is not None:
            bad |= cos < self.min_cos
        if bool(bad.any()):
            self.events.append({"round": t, "event": "adjoint_replaced", "peer": j,
                                "ratio": float(ratio.max()), "cosine": float(cos.min())})
            return torch.where(bad[:, None], ref, msg)
        return msg

    def _replay(self, s0: int, s1: int) -> dict[int, tuple]:
        """Rounds ``s0..s1-1`` again from the checkpoint at ``s0``, over the network with the
        recorded edges and rows (every peer replays the same segment): ``θ^t``, optimizer
        state and ``u^t`` of this peer for each round."""
        r0 = time.perf_counter()
        lp, k, tp = self.lp, self.k, self.peer.transport
        theta, state = self.ckpt[s0]
        theta = theta.clone()
        state = None if state is None else state.clone()
        out: dict[int, tuple] = {}
        for t in range(s0, s1):
            ins, outs, row = self.rec[t]
            x, y = lp.batch(t)
            half = theta.clone()
            st_next = None if state is None else state.clone()
            views = None if st_next is None else param_views(lp.fm, st_next)
            with torch.no_grad():
                prev, u = local_step_(lp.fm, lp.opt, half, views, x, y, lp.lr(t), t,
                                      transforms=lp.transforms, ids=[k], keep=True)
            out[t] = (prev, state, u)
            self._count_extra(len(out))
            if t + 1 < s1:  # the segment's last round needs no gossip: θ^{s1} is not used
                packet = tp.pack(t, half, u)
                bufs, work = tp.exchange_packets(t, packet, outs, ins)
                tp.wait(t, work)
                recv = {j: tp.unpack(bufs[j], j, t) for j in ins}
                senders = sorted([k, *ins])
                W = np.zeros((self.n, self.n))
                W[k] = row
                with torch.no_grad():
                    rows = torch.cat([half if j == k else recv[j][0] for j in senders])
                    view = RoundView(t, self.n, np.array([k]), np.array(senders), prev, rows,
                                     W, lr=lp.lr(t))
                    theta = self.peer.aggregator(view, W)
            state = st_next
        self.seconds["replay"] += time.perf_counter() - r0
        return out

    def _count_extra(self, held: int) -> None:
        vec = sum(1 + (s is not None) for _, s in self.ckpt.values()) + \
            held * (2 + self.stateful)
        self.vectors_peak = max(self.vectors_peak, vec)

    # ------------------------------------------------------------------ outputs

    def result(self, train_seconds: float, ledger: dict[str, Any]) -> dict[str, Any]:
        rounds = sorted(self.b[self.targets[0]])
        d = self.lp.d
        item = torch.empty((), dtype=self.lp.dtype).element_size()
        return {
            "peer": self.k, "sign": SIGN, "units": "test loss (mean cross-entropy)",
            "targets": self.targets, "primary": self.targets[0],
            "adjoint": float(sum(self.b[self.targets[0]].values())),
            "adjoint_by_target": {nm: float(sum(v.values())) for nm, v in self.b.items()},
            "rounds": rounds, "axes": {"per_round": ["round"]},
            "per_round": {nm: [v[t] for t in rounds] for nm, v in self.b.items()},
            "windows": self.windows, "horizon": self.horizon, "curvature": self.curvature,
            "checkpoint_every": self.c_used,
            "seconds": {"train": train_seconds, **self.seconds},
            "sweep_over_train": self.seconds["sweep"] / train_seconds
            if train_seconds > 0 else None,
            "memory": {"parameter_vectors_peak": self.vectors_peak, "d": d,
                       "sweep_bytes_peak": self.vectors_peak * d * item,
                       "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                       * 1024},
            "events": self.events, "incoming_norm_ratio_max": self.ratio_max,
            "incoming_cosine_min": self.cos_min,
            "ledger": ledger,
        }

    def write(self, out: Path, train_seconds: float, ledger: dict[str, Any]) -> dict[str, Any]:
        """``contribution.json`` and ``sample_scores.csv`` in the peer's folder."""
        res = self.result(train_seconds, ledger)
        write_json(out / "contribution.json", res)
        if self.want_scores:
            idx = self.lp.index
            lines = ["round,node,batch_position,dataset_index,"
                     + ",".join(f"score_{nm}" for nm in self.targets) + "\n"]
            for t in sorted(self.scores):
                sc = self.scores[t]
                pos = self.lp.batches.node_indices(self.k, t)
                for i in range(sc.shape[1]):
                    di = -1 if idx is None else int(idx[int(pos[i])])
                    lines.append(f"{t},{self.k},{i},{di},"
                                 + ",".join(repr(float(sc[g, i])) for g in range(len(sc)))
                                 + "\n")
            atomic_write_text(out / "sample_scores.csv", "".join(lines))
        return res


def _pullback(lp: Any, theta: torch.Tensor, state: torch.Tensor | None, t: int,
              mu: torch.Tensor, a_st: torch.Tensor | None, k: int, curvature: str,
              want_theta: bool, want_scores: bool):
    from ..influence.pullback import step_pullback

    if not want_theta and not want_scores:
        return None, None, None
    return step_pullback(lp, theta, state, t, mu, a_st, ids=[k], curvature=curvature,
                         want_theta=want_theta, want_scores=want_scores)


# ------------------------------------------------------------------------------ the launcher


def merge_contributions(out: Path, n: int, cfg: Any) -> dict[str, Any] | None:
    """The peers' ``contribution.json`` files merged into the summary ``dice train`` writes for
    the contribution observer (``observers.contribution``: ``adjoint`` one value per node,
    ``adjoint_per_round`` (round, node), the proximal ledger, reciprocity and free-rider flags),
    plus ``adjoint_by_target`` and each peer's sweep costs. None when a peer wrote none."""
    import json

    from ..apps.contribution import ContributionObserver
    from ..plugins import parse

    parts = []
    for k in range(n):
        f = Path(out) / f"peer-{k}" / "contribution.json"
        if not f.is_file():
            return None
        parts.append(json.loads(f.read_text()))
    raw = next((o for o in cfg.observers if o.get("kind") == "contribution"), None)
    s = parse("observer", raw, "observers.contribution")
    from ..apps.proximal import node_weight_vector

    obs = ContributionObserver(n, None, q=node_weight_vector(n, s.q), readout=s.readout,
                               every=s.every, window=s.window, z=s.z, quorum=s.quorum,
                               rule=s.free_rider_rule, curvature=s.curvature,
                               adjoint_test=s.adjoint_test)
    obs.horizon = s.horizon
    P = np.zeros((n, n))
    for k, part in enumerate(parts):
        led = part["ledger"]
        P[k] = led["P_row"]
        obs.align[:, k, :] = np.asarray(led["align"], dtype=np.float64)
        obs.edges[k] = np.asarray(led["edges"], dtype=bool)
        for t, row in led["a_rounds"].items():
            obs.a_rounds[int(t)] = obs.a_rounds.get(int(t), np.zeros(n)) + np.asarray(row)
    obs.prox.tracker.cum = torch.as_tensor(P)
    obs.d = int(parts[0]["memory"]["d"])
    rounds = parts[0]["rounds"]
    for i, t in enumerate(rounds):
        obs.b_rounds[t] = np.array([p["per_round"][p["primary"]][i] for p in parts])
    obs.windows = [tuple(w) for w in parts[0]["windows"]]
    obs.seconds = {"online": float(np.mean([p["seconds"]["train"] for p in parts])),
                   "sweep": float(np.mean([p["seconds"]["sweep"] for p in parts]))}
    summary = obs.summary()
    names = parts[0]["targets"]
    summary["adjoint_by_target"] = {nm: [p["adjoint_by_target"][nm] for p in parts]
                                    for nm in names}
    summary["adjoint_targets"] = names
    summary["sweep"] = {
        "runtime": "peers", "checkpoint_every": parts[0]["checkpoint_every"],
        "seconds_train": [p["seconds"]["train"] for p in parts],
        "seconds_sweep": [p["seconds"]["sweep"] for p in parts],
        "sweep_over_train": [p["sweep_over_train"] for p in parts],
        "parameter_vectors_peak": [p["memory"]["parameter_vectors_peak"] for p in parts],
        "max_rss_bytes": [p["memory"]["max_rss_bytes"] for p in parts],
        "events": [{"receiver": p["peer"], **e} for p in parts for e in p["events"]],
        "incoming_norm_ratio_max": [p["incoming_norm_ratio_max"] for p in parts],
        "incoming_cosine_min": [p["incoming_cosine_min"] for p in parts],
    }
    return summary


def peer_ledger(peer: Peer) -> dict[str, Any]:
    """What the launcher needs of this peer's contribution observer (its rows)."""
    obs = peer.plugins.find("contribution")
    k = peer.k
    if obs is None:
        return {"P_row": [0.0] * peer.n, "align": np.zeros((3, peer.n)).tolist(),
                "edges": [False] * peer.n, "a_rounds": {}}
    return {"P_row": obs.proximal[k].tolist(), "align": obs.align[:, k, :].tolist(),
            "edges": obs.edges[k].tolist(),
            "a_rounds": {str(t): v.tolist() for t, v in sorted(obs.a_rounds.items())}}
