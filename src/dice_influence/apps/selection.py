"""Collaborator selection as policies of the one loop (docs/method.md §6): whom each node learns from.

Every ``every`` rounds each node ``k`` scores its current in-neighbours ``N_k`` and a few
candidates ``C_k`` drawn by a seeded peer sampler, keeps the best ``degree`` of them and rewires
its row of ``W^t``. Two scores:

- :class:`SelectPolicy` (DICE): the proximal influence of each scored sender on ``k`` over the
  last epoch, ``Σ_t q_k G_k^t · u_j^t`` (per unit of mixing weight; read from a
  :class:`~dice_influence.apps.proximal.ProximalObserver`, positive = harmful), optionally plus
  ``reciprocity`` × what ``j`` measured of ``k`` (mutual benefit). Lower is better; with
  ``only_helpful`` a sender whose score is > 0 is never kept.
- :class:`PensPolicy` (PENS-style baseline, Onoszko et al. 2021): the loss of each scored
  sender's current model ``θ_j^{t+½}`` on ``k``'s own training data. Lower is better.

The pool and the rows. A node can only use senders whose half steps reach it: the nominal
graph (``topology``: ``W_nominal``) is the pool of possible links — the peer-sampling
service's view — and the policy keeps a subset of it. Row ``k`` of ``W^t`` is the nominal row
with every pool sender outside ``N_k`` removed and the row repaired by THE one rule
(:func:`~dice_influence.apps.defense.repair_rows`: rescale what the row kept; with a uniform
complete pool that is ``1/(|N_k| + 1)`` on ``k`` and each kept neighbour). Rows stay stochastic,
entries ≥ 0, and the loop records every ``W^t`` so influence replays on the rewired graph.

On real peers every pool neighbour's packet arrives every round (the transport sends along
``W_nominal``); the policy only uses those of ``N_k ∪ C_k``. A real peer-sampling service would
contact only the candidates: the simulator and the peers compute the same numbers, the peers
spend the pool's bandwidth. ``reciprocity > 0`` needs what the senders measured of ``k``, which
peers do not exchange: it runs in the simulator only (a peer raises a clear error).

Determinism: the sampler's draws depend only on ``(seed, node, epoch)``; ties in a score break
by node id.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..loop import Policy, RoundView
from .defense import repair_rows

_PURPOSE = 0x5E1EC7  # the sampler's stream, apart from data, batches and init


class PeerSampler:
    """Seeded peer-sampling service over a pool of possible links.

    ``pool[k, j]``: ``k`` may listen to ``j`` (``j != k``). :meth:`initial` and
    :meth:`candidates` draw uniformly without replacement from ``k``'s pool, from
    ``numpy.random.default_rng([seed, purpose, k, epoch])``: a pure function of (seed, node,
    epoch), whatever order nodes or runtimes ask in."""

    def __init__(self, seed: int, pool: np.ndarray) -> None:
        if seed < 0:
            raise ValueError(f"peer sampler seed={seed} must be >= 0")
        self.seed = int(seed)
        self.pool = np.asarray(pool, dtype=bool).copy()
        np.fill_diagonal(self.pool, False)

    def _rng(self, k: int, epoch: int, what: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, _PURPOSE, what, int(k), int(epoch)])

    def initial(self, k: int, count: int) -> np.ndarray:
        """``count`` first neighbours of ``k`` (all of its pool when it has fewer), sorted."""
        ids = np.flatnonzero(self.pool[k])
        if len(ids) <= count:
            return ids
        return np.sort(self._rng(k, 0, 0).choice(ids, size=count, replace=False))

    def candidates(self, k: int, epoch: int, count: int, exclude: np.ndarray) -> np.ndarray:
        """``count`` pool members of ``k`` outside ``exclude`` (bool (n,)) for ``epoch``."""
        ids = np.flatnonzero(self.pool[k] & ~np.asarray(exclude, dtype=bool))
        if len(ids) <= count:
            return ids
        return np.sort(self._rng(k, epoch, 1).choice(ids, size=count, replace=False))


class RewirePolicy(Policy):
    """Shared machinery of selection policies (module docstring); subclasses give
    :meth:`scores`. State (n, n) bool: ``neighbours[k, j]`` (k keeps j now) and ``candidates``
    (the current epoch's probes); ``decisions`` = every decision's kept sets (round, rows)."""

    name = "rewire"

    def __init__(self, n: int, seed: int, *, degree: int = 3, every: int = 3,
                 candidates: int = 6, start: int = 0, initial: str = "none") -> None:
        if initial not in ("none", "random"):
            raise ValueError(f"selection initial={initial!r}: choose 'none' (start alone, "
                             "probe candidates) or 'random' (degree random pool members)")
        if degree < 1:
            raise ValueError(f"selection degree={degree} must be >= 1")
        if every < 1:
            raise ValueError(f"selection every={every} must be >= 1 (rounds between rewirings)")
        if candidates < 0:
            raise ValueError(f"selection candidates={candidates} must be >= 0")
        self.n, self.seed = n, int(seed)
        self.degree, self.every, self.n_candidates = int(degree), int(every), int(candidates)
        self.start, self.initial = int(start), initial
        self.neighbours = np.zeros((n, n), dtype=bool)
        self.candidates = np.zeros((n, n), dtype=bool)
        self.ready = np.zeros(n, dtype=bool)  # rows initialised by this runtime
        self.epoch = 0
        self.sampler: PeerSampler | None = None
        self.decisions: list[tuple[int, np.ndarray]] = []
        self.rewires = 0
        self._W: tuple[bytes, bytes, np.ndarray] | None = None

    # -------------------------------------------------------------------- subclasses
    def scores(self, view: RoundView, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Scores ``(len(rows), n)`` of the senders in ``mask`` (``N_k ∪ C_k`` of each row);
        lower = better; NaN / +inf = never keep."""
        raise NotImplementedError

    def keep(self, row: np.ndarray, k: int) -> np.ndarray:
        """Which scored senders ``k`` keeps: the ``degree`` lowest finite scores (ties by id)."""
        ok = np.flatnonzero(np.isfinite(row))
        order = ok[np.lexsort((ok, row[ok]))]
        return order[: self.degree]

    # -------------------------------------------------------------------- the policy
    def active(self, t: int) -> bool:
        return True

    def _init_rows(self, view: RoundView) -> None:
        if self.sampler is None:
            self.sampler = PeerSampler(self.seed, view.W_nominal > 0)
        for k in view.receivers:
            if self.ready[k]:
                continue
            self.neighbours[k] = False
            if self.initial == "random":
                self.neighbours[k, self.sampler.initial(int(k), self.degree)] = True
            self._draw(int(k))
            self.ready[k] = True
        if not self.decisions:
            self.decisions.append((view.t, self.neighbours.copy()))

    def _draw(self, k: int) -> None:
        assert self.sampler is not None
        ex = self.neighbours[k].copy()
        ex[k] = True
        self.candidates[k] = False
        self.candidates[k, self.sampler.candidates(k, self.epoch, self.n_candidates, ex)] = True

    def is_decision_round(self, t: int) -> bool:
        return t > 0 and t >= self.start and t % self.every == 0

    def observe(self, view: RoundView) -> None:
        """Called every round before a decision (subclasses accumulate what they need)."""

    def decide(self, view: RoundView) -> np.ndarray:
        self._init_rows(view)
        rows = view.receivers
        self.observe(view)
        if self.is_decision_round(view.t):
            mask = (self.neighbours | self.candidates)[rows]
            S = self.scores(view, rows, mask)
            S = np.where(mask, S, np.nan)
            self.epoch += 1
            for i, k in enumerate(rows):
                kept = self.keep(S[i], int(k))
                new = np.zeros(self.n, dtype=bool)
                new[kept] = True
                self.rewires += int((new != self.neighbours[k]).sum())
                self.neighbours[k] = new
                self._draw(int(k))
            self.decisions.append((view.t, self.neighbours.copy()))
        return self.matrix(view.W_nominal)

    def matrix(self, W_nominal: np.ndarray) -> np.ndarray:
        """``W^t``: the nominal rows without the pool senders a node does not keep (rows
        repaired by :func:`~dice_influence.apps.defense.repair_rows`)."""
        key = (W_nominal.tobytes(), self.neighbours.tobytes())
        if self._W is None or self._W[:2] != key:
            blocked = (W_nominal > 0) & ~self.neighbours
            np.fill_diagonal(blocked, False)
            self._W = (*key, repair_rows(W_nominal, blocked))
        return self._W[2].copy()  # one array per round: the loop records each round's W^t

    # -------------------------------------------------------------------- records
    def summary(self) -> dict[str, Any]:
        """The kept in-neighbours of every node at the end and at each decision round."""
        return {"degree": self.degree, "every": self.every, "candidates": self.n_candidates,
                "initial": self.initial,
                "rewired_edges": self.rewires,
                "neighbours": [np.flatnonzero(r).tolist() for r in self.neighbours],
                "decisions": [{"round": t, "neighbours": [np.flatnonzero(r).tolist()
                                                          for r in N]}
                              for t, N in self.decisions]}

    def state_dict(self) -> dict[str, Any]:
        return {"neighbours": self.neighbours.copy(), "candidates": self.candidates.copy(),
                "ready": self.ready.copy(), "epoch": self.epoch, "rewires": self.rewires,
                "decision_rounds": [t for t, _ in self.decisions],
                "decision_sets": np.stack([N for _, N in self.decisions])
                if self.decisions else np.zeros((0, self.n, self.n), dtype=bool)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.neighbours = np.asarray(state["neighbours"], dtype=bool).copy()
        self.candidates = np.asarray(state["candidates"], dtype=bool).copy()
        self.ready = np.asarray(state["ready"], dtype=bool).copy()
        self.epoch = int(state["epoch"])
        self.rewires = int(state["rewires"])
        sets = np.asarray(state["decision_sets"], dtype=bool)
        self.decisions = [(int(t), sets[i].copy())
                          for i, t in enumerate(state["decision_rounds"])]
        self._W = None


SCORES = ("link_exact", "link", "update")
DEFAULT_BAR = {"link_exact": 1.0, "link": 1.0, "update": -0.5}


class SelectPolicy(RewirePolicy):
    """DICE collaborator selection (module docstring): every epoch, keep the probed senders
    whose measured influence on this node is most helpful.

    ``score`` (per round, per unit of mixing weight; positive = harmful; averaged over the
    rounds a pair was probed, earlier epochs decayed by ``memory``):

    - ``"link"``: ``q_k G_k · (θ_j^{t+½} − θ_k^{t+½})`` — the first-order change of ``k``'s test
      loss from listening to ``j`` instead of keeping that weight on itself: the proximal
      influence of everything ``j`` sends (its model, i.e. its own and its neighbours' data
      cascaded so far), computed from the half step that arrived;
    - ``"update"``: ``q_k G_k · u_j`` — the proximal influence of ``j``'s update (paper Def. 4),
      read from the :class:`~dice_influence.apps.proximal.ProximalObserver`.

    ``G_k`` = ``∇L(θ_k^t; z'_k)`` on ``k``'s own test split. A sender is kept only if its score
    is ≤ ``bar`` × ``|o_k|``, ``o_k`` = ``q_k G_k · u_k`` (the node's own update on its own test
    loss, the yardstick): ``bar = +1`` for ``link`` (mixing ``j`` in may cost at most what the
    node's own step gains), ``-0.5`` for ``update`` (``j``'s update must help at least half as
    much as the node's own). Of those, the ``degree`` lowest scores are kept. ``reciprocity``
    adds that multiple of what ``j`` measured of ``k`` (simulator only)."""

    name = "select"

    def __init__(self, n: int, seed: int, proximal: Any, *, degree: int = 3, every: int = 3,
                 candidates: int = 6, start: int = 0, initial: str = "none",
                 score: str = "link_exact", bar: float | None = None,
                 reciprocity: float = 0.0, memory: float = 1.0, fm: Any = None,
                 own_test: Any = None) -> None:
        super().__init__(n, seed, degree=degree, every=every, candidates=candidates,
                         start=start, initial=initial)
        if score not in SCORES:
            raise ValueError(f"selection score={score!r}: choose one of {SCORES}")
        if reciprocity < 0:
            raise ValueError(f"selection reciprocity={reciprocity} must be >= 0")
        if not 0.0 <= memory <= 1.0:
            raise ValueError(f"selection memory={memory} must be in [0, 1]")
        if score == "link_exact" and (fm is None or own_test is None):
            raise ValueError("selection score=link_exact needs the model and each node's own "
                             "test split (build it with select_from_settings)")
        self.proximal = proximal
        self.score = score
        self.fm, self.own_test = fm, own_test
        self.probe_weight = 1.0 / (degree + 1)
        self.bar = DEFAULT_BAR[score] if bar is None else float(bar)
        self.reciprocity = float(reciprocity)
        self.memory = float(memory)
        self._run = np.zeros((n, n))  # this epoch's per-unit-weight sums (link score)
        self._base = np.zeros((n, n))  # the observer's score at the last decision (update)
        self._sum = np.zeros((n, n))  # decayed sums over probed epochs
        self._cnt = np.zeros((n, n))  # decayed numbers of probed rounds
        self._own_run = np.zeros(n)  # this epoch's o_k = q_k G_k·u_k
        self._own_sum = np.zeros(n)
        self._own_cnt = np.zeros(n)
        self._last_t = np.zeros(n, dtype=np.int64)  # each row's previous decision round

    def observe(self, view: RoundView) -> None:
        rows = view.receivers
        own_pos = [view.sender_pos(int(k)) for k in rows]
        q = self.proximal.tracker.q.numpy()[rows]
        if self.score == "link_exact":
            self._observe_exact(view, rows, own_pos, q)
            return
        G = view.test_grad("pre").double()
        half = view.half.double()
        o = (G * view.update()[own_pos].double()).sum(1).cpu().numpy()
        self._own_run[rows] += np.where(np.isfinite(o), q * o, 0.0)
        if self.score != "link":
            return
        D = (G @ half.T).cpu().numpy()  # D[i, s] = G_k · θ_s^{t+½}
        own = D[np.arange(len(rows)), own_pos]
        L = q[:, None] * (D - own[:, None])
        L = np.where(np.isfinite(L), L, np.inf)
        probed = (self.neighbours | self.candidates)[np.ix_(rows, view.senders)]
        blk = self._run[np.ix_(rows, view.senders)]
        self._run[np.ix_(rows, view.senders)] = np.where(probed, blk + L, blk)

    def _observe_exact(self, view: RoundView, rows: np.ndarray, own_pos: list[int],
                       q: np.ndarray) -> None:
        """``link_exact``: ``q_k [L_k(θ_k^{t+½} + w(θ_j^{t+½} − θ_k^{t+½})) − L_k(θ_k^{t+½})] / w``
        on ``k``'s own test split, ``w`` = the weight a kept sender gets; own yardstick
        ``q_k [L_k(θ_k^{t+½}) − L_k(θ_k^t)]``."""
        from ..gossip import node_losses

        probed = (self.neighbours | self.candidates)[np.ix_(rows, view.senders)]
        pairs = [(i, si) for i, si in zip(*np.nonzero(probed), strict=True)]
        half, w = view.half, self.probe_weight
        own_half = half[torch.as_tensor(own_pos, device=half.device)]
        thetas = [view.theta, own_half]
        if pairs:
            ii = torch.as_tensor([i for i, _ in pairs], device=half.device)
            ss = torch.as_tensor([si for _, si in pairs], device=half.device)
            thetas.append(own_half[ii] + w * (half[ss] - own_half[ii]))
        idx = [np.arange(len(rows)), np.arange(len(rows)), np.array([i for i, _ in pairs],
                                                                     dtype=np.int64)]
        tx, ty = zip(*(self.own_test(int(k)) for k in rows), strict=True)
        X, Y = torch.stack(tx), torch.stack(ty)
        with torch.no_grad():
            loss = [node_losses(self.fm, th, X[ix], Y[ix])[0].double().cpu().numpy()
                    if len(ix) else np.zeros(0) for th, ix in zip(thetas, idx, strict=True)]
        o = loss[1] - loss[0]
        self._own_run[rows] += np.where(np.isfinite(o), q * o, 0.0)
        if pairs:
            d = q[idx[2]] * (loss[2] - loss[1][idx[2]]) / w
            d = np.where(np.isfinite(d), d, np.inf)
            for (i, si), v in zip(pairs, d, strict=True):
                self._run[rows[i], view.senders[si]] += v

    def _epoch(self, view: RoundView, rows: np.ndarray) -> np.ndarray:
        """This epoch's per-unit-weight sums (n, n) of the rows (others zero)."""
        if self.score in ("link", "link_exact"):
            E = np.zeros((self.n, self.n))
            E[rows] = self._run[rows]
            self._run[rows] = 0.0
            return E
        S_now = self.proximal.tracker.score.numpy()
        E = np.zeros((self.n, self.n))
        E[rows] = S_now[rows] - self._base[rows]
        self._base[rows] = S_now[rows]
        Wn = view.W_nominal
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(Wn > 0, E / np.where(Wn > 0, Wn, 1.0), 0.0)

    def scores(self, view: RoundView, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.reciprocity > 0 and not view.is_full:
            raise ValueError(
                "policy select: reciprocity > 0 needs what each sender measured of this node, "
                "which real peers do not exchange; set policy.reciprocity: 0 on peers")
        E = self._epoch(view, rows)
        span = float(view.t - self._last_t[rows[0]]) if len(rows) else 0.0
        self._last_t[rows] = view.t
        upd = np.zeros((self.n, self.n), dtype=bool)
        upd[rows] = (self.neighbours | self.candidates)[rows] & (view.W_nominal[rows] > 0)
        self._sum = np.where(upd, self.memory * self._sum + E, self._sum)
        self._cnt = np.where(upd, self.memory * self._cnt + span, self._cnt)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = np.where(self._cnt > 0, self._sum / self._cnt, np.nan)
        out = mean[rows].copy()
        if self.reciprocity > 0:  # what j measured of k (k in j's probe sets)
            back = np.where(self._cnt.T > 0, mean.T, 0.0)[rows]
            out = out + self.reciprocity * np.nan_to_num(back, nan=0.0)
        out = np.where(np.isnan(out), np.inf, out)
        self._own_sum[rows] = self.memory * self._own_sum[rows] + self._own_run[rows]
        self._own_cnt[rows] = self.memory * self._own_cnt[rows] + span
        self._own_run[rows] = 0.0
        own = np.abs(self._own_sum[rows] / np.maximum(self._own_cnt[rows], 1e-300))
        return np.where(out <= (self.bar * own)[:, None], out, np.inf)

    _ARRAYS = ("run", "base", "sum", "cnt", "own_run", "own_sum", "own_cnt", "last_t")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                **{key: getattr(self, f"_{key}").copy() for key in self._ARRAYS}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in self._ARRAYS:
            dt = np.int64 if key == "last_t" else np.float64
            setattr(self, f"_{key}", np.asarray(state[key], dtype=dt).copy())

    def summary(self) -> dict[str, Any]:
        what = {"link": "q_k G_k·(θ_j^{t+½} − θ_k^{t+½})", "update": "q_k G_k·u_j",
                "link_exact": "q_k [L_k(θ_k^{t+½} + w(θ_j^{t+½} − θ_k^{t+½})) − "
                              "L_k(θ_k^{t+½})] / w"}[self.score]
        return {**super().summary(), "score": self.score,
                "score_definition": f"{what} per round and unit weight, decayed mean over "
                "probed epochs (positive = harmful)", "bar": self.bar,
                "reciprocity": self.reciprocity, "memory": self.memory}


class PensPolicy(RewirePolicy):
    """PENS-style selection (Onoszko et al. 2021): keep the senders whose current model has the
    lowest loss on this node's own training data (``samples`` first local samples)."""

    name = "pens"

    def __init__(self, n: int, seed: int, fm: Any, own_data: Any, *, degree: int = 3,
                 every: int = 3, candidates: int = 6, start: int = 0, initial: str = "none",
                 samples: int | None = None) -> None:
        super().__init__(n, seed, degree=degree, every=every, candidates=candidates,
                         start=start, initial=initial)
        self.fm = fm
        self.own_data = own_data  # k -> (x (m, ...), y (m,))
        self.samples = samples

    def scores(self, view: RoundView, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from ..gossip import node_losses

        out = np.full((len(rows), self.n), np.nan)
        for i, k in enumerate(rows):
            js = np.flatnonzero(mask[i])
            if len(js) == 0:
                continue
            x, y = self.own_data(int(k))
            if self.samples is not None:
                x, y = x[: self.samples], y[: self.samples]
            pos = torch.as_tensor([view.sender_pos(int(j)) for j in js],
                                  device=view.half.device)
            with torch.no_grad():
                loss, _ = node_losses(self.fm, view.half[pos], x, y)
            val = loss.double().cpu().numpy()
            out[i, js] = np.where(np.isfinite(val), val, np.inf)
        return out

    def summary(self) -> dict[str, Any]:
        return {**super().summary(), "score": "loss of the sender's model on the node's own "
                "training data"}


# ----------------------------------------------------------------------------- factories


def _proximal(ctx: Any) -> Any:
    from .proximal import ProximalObserver, node_weight_vector

    obs = ctx.plugins.find("proximal")
    if obs is None:
        obs = ProximalObserver(ctx.n, node_weight_vector(ctx.n, "uniform"), history=False)
        ctx.plugins.observers.append(obs)
    return obs


def _seed(ctx: Any) -> int:
    return int(ctx.problem.cfg.seed)


def own_test_data(problem: Any) -> Any:
    """``k -> (x, y)``: node ``k``'s own test split ``z'_k`` (simulator or peer)."""
    nt = getattr(problem, "node_test", None)
    if hasattr(problem, "node_data"):
        if nt is None:
            raise ValueError("selection score link_exact needs data.test_samples_per_node "
                             "(each node's own test split)")
        return lambda k: (nt.x[k], nt.y[k])

    def g(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k != problem.k:
            raise ValueError(f"peer {problem.k} holds no test split of node {k}")
        return problem.test_x, problem.test_y
    return g


def own_training_data(problem: Any) -> Any:
    """``k -> (x, y)``: node ``k``'s local training samples, from a simulator
    :class:`~dice_influence.problem.Problem` (every node) or a peer's local problem (its own)."""
    nd = getattr(problem, "node_data", None)
    if nd is not None:
        def f(k: int) -> tuple[torch.Tensor, torch.Tensor]:
            size = int(nd.sizes[k])
            return nd.x[k, :size], nd.y[k, :size]
        return f

    def g(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if k != problem.k:
            raise ValueError(f"peer {problem.k} holds no training data of node {k}")
        return problem.x, problem.y
    return g


def select_from_settings(s: Any, ctx: Any) -> SelectPolicy:
    """Factory for ``policy: kind: select`` (adds a proximal observer when the config has
    none). On a peer (a local problem) ``reciprocity > 0`` is refused up front."""
    if s.reciprocity > 0 and not hasattr(ctx.problem, "node_data"):
        from ..config import ConfigError

        raise ConfigError(f"policy.reciprocity={s.reciprocity}: needs what each sender measured "
                          "of this node, which real peers do not exchange; set "
                          "policy.reciprocity: 0 for dice launch")
    return SelectPolicy(ctx.n, _seed(ctx), _proximal(ctx), degree=s.degree, every=s.every,
                        candidates=s.candidates, start=s.start, initial=s.initial,
                        score=s.score, bar=s.bar, reciprocity=s.reciprocity, memory=s.memory,
                        fm=ctx.problem.fm, own_test=own_test_data(ctx.problem)
                        if s.score == "link_exact" else None)


def pens_from_settings(s: Any, ctx: Any) -> PensPolicy:
    """Factory for ``policy: kind: pens``."""
    return PensPolicy(ctx.n, _seed(ctx), ctx.problem.fm, own_training_data(ctx.problem),
                      degree=s.degree, every=s.every, candidates=s.candidates, start=s.start,
                      initial=s.initial, samples=s.samples)


# ----------------------------------------------------------------------------- read-outs


def kept_graph_labels(neighbours: np.ndarray) -> np.ndarray:
    """Cluster label of every node: the connected components of the kept links (either
    direction)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    A = np.asarray(neighbours, dtype=bool)
    _, labels = connected_components(csr_matrix(A | A.T), directed=False)
    return labels


def group_ari(neighbours: np.ndarray, groups: np.ndarray) -> float:
    """Adjusted Rand index of the kept graph's components (:func:`kept_graph_labels`) against
    the true groups: 1 = the kept links are exactly a union of the groups' connected graphs."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(np.asarray(groups), kept_graph_labels(neighbours)))


def within_group_fraction(neighbours: np.ndarray, groups: np.ndarray) -> float:
    """Share of kept links whose two ends are in the same group (1.0 with no link)."""
    A = np.asarray(neighbours, dtype=bool)
    g = np.asarray(groups)
    same = g[:, None] == g[None, :]
    return float(same[A].mean()) if A.any() else 1.0
