"""Proximal influence between neighbours (docs/method.md §5, paper Def. 4).

``I_prox(j → k) = Σ_t q_k W^t[k, j] ∇L(θ_k^{t+1}; z'_k)ᵀ u_j^t`` — the one-hop term of sender
``j``'s whole update on receiver ``k``, measured with ``k``'s own test set. Sign: positive =
``j``'s update raised ``k``'s test loss (harmful).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def proximal_matrix(
    G: torch.Tensor, W: torch.Tensor, U: torch.Tensor, q: torch.Tensor | None = None
) -> torch.Tensor:
    """One round's proximal influence of every sender on every receiver.

    ``G`` (n, d): receiver ``k``'s test-loss gradient (the read-out: ``pre`` ``∇L(θ_k^t)``,
    ``post`` ``∇L(θ_k^{t+1})``); ``W`` (n, n): ``W[k, j]`` = weight receiver ``k`` puts on
    sender ``j``; ``U`` (n, d): each sender's update ``u_j = θ_j^{t+½} − θ_j^t``; ``q`` (n,)
    node weights (default 1/n). Returns ``P`` (n, n) with ``P[k, j] = q_k W[k, j] G_kᵀ u_j``
    for ``j ≠ k`` and 0 on the diagonal and wherever ``W[k, j] = 0`` (non-finite updates of
    non-neighbours never leak in).
    """
    n = G.shape[0]
    if q is None:
        q = torch.full((n,), 1.0 / n, dtype=G.dtype, device=G.device)
    W = W.to(dtype=G.dtype, device=G.device)
    S = G @ U.T  # S[k, j] = G_k · u_j
    P = q.to(G.dtype)[:, None] * W * S
    mask = (W != 0) & ~torch.eye(n, dtype=torch.bool, device=G.device)
    return torch.where(mask, P, torch.zeros_like(P))


READOUTS = ("pre", "post", "midpoint")


SPARSE_DOTS = True
"""Compute only the entries of ``S`` on a given support when that saves work (:func:`dot_matrix`;
benchmarks and tests switch it off to compare)."""


def dot_matrix(G: torch.Tensor, U: torch.Tensor, support: np.ndarray | None = None, *,
               edges: tuple[np.ndarray, np.ndarray] | None = None) -> torch.Tensor:
    """``S[k, j] = G_k · u_j`` (n_G, n_U) in float64; non-finite entries (a diverged sender or
    receiver) become ``+inf``: a malformed update is treated as maximally harmful.

    ``support`` (bool, same shape): the entries the caller reads. When it is at most a quarter
    of the matrix (and the compiled edge kernel is available) only those entries are computed
    (:func:`dice_influence._edge_kernel.edge_dots`) and the others are 0; the values equal the
    dense product's up to float rounding. ``edges``: :func:`support_edges` of ``support``
    when the caller keeps it (a static schedule), else computed here."""
    if support is not None and SPARSE_DOTS:
        S = edge_matrix(G, U, edges if edges is not None else support_edges(support),
                        support.shape)
        if S is not None:
            return S
    S = (G @ U.T).to(torch.float64)
    return torch.where(torch.isfinite(S), S, torch.full_like(S, math.inf))


def support_edges(support: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rows, cols)`` of ``support`` when computing only those entries pays (more than 8 rows,
    at most a quarter of the matrix), else None (the dense product)."""
    if support.shape[0] <= 8 or support.sum() > 0.25 * support.size:
        return None
    return np.nonzero(support)


def edge_matrix(G: torch.Tensor, U: torch.Tensor,
                edges: tuple[np.ndarray, np.ndarray] | None, shape: tuple[int, int]
                ) -> torch.Tensor | None:
    """:func:`dot_matrix` on ``edges`` = ``(rows, cols)`` only (0 elsewhere), or None when
    ``edges`` is None or the compiled kernel is unavailable."""
    if edges is None:
        return None
    from .._edge_kernel import edge_dots

    rows, cols = edges
    vals = edge_dots(G, U, rows, cols)
    if vals is None:
        return None
    S = np.zeros(shape)
    v = vals.numpy()
    S[rows, cols] = np.where(np.isfinite(v), v, math.inf)
    return torch.from_numpy(S)


def edge_support(*Ws: np.ndarray) -> np.ndarray:
    """Off-diagonal entries where any of the (n, n) weight matrices ``Ws`` is non-zero: the
    receiver–sender pairs a round's proximal increments read."""
    mask = np.zeros(np.shape(Ws[0]), dtype=bool)
    for W in Ws:
        mask |= np.asarray(W) != 0
    np.fill_diagonal(mask, False)
    return mask


class ProximalTracker:
    """Online proximal influence on every edge (receiver ``k`` ← sender ``j``), docs/method.md §5.

    Each recorded round adds ``q_k W^t[k, j] G_kᵀ u_j^t`` where ``G_k`` is receiver ``k``'s
    gradient on its own test split ``z'_k`` (read-out ``pre`` = ``∇L(θ_k^t)``, ``post`` =
    ``∇L(θ_k^{t+1})`` as in the paper's Def. 4, or their ``midpoint``). Sign: positive = ``j``'s
    update raised ``k``'s test loss (harmful). Units: loss (per-sample mean cross-entropy).

    Two sums are kept, both (n, n) float64:

    - ``cum``: the proximal influence proper, with the weight ``W^t`` actually used (0 after
      ``k`` pruned ``j``);
    - ``score``: the same with the *nominal* weight of the unpruned schedule, so a pruned
      neighbour (whose messages ``k`` still receives but puts weight 0 on) keeps being scored,
      which is what re-admission needs.

    ``window`` keeps the last ``window`` recorded rounds of ``score`` increments
    (``window_score``); ``history`` optionally keeps every recorded round's increments.
    ``seen[k, j]`` marks pairs that were ever in-neighbours (the edges).
    """

    def __init__(
        self,
        n: int,
        q: torch.Tensor | None = None,
        *,
        readout: str = "pre",
        window: int = 10,
        history: bool = True,
    ) -> None:
        if readout not in READOUTS:
            raise ValueError(f"readout {readout!r}: choose one of {', '.join(READOUTS)}")
        self.n = n
        self.readout = readout
        self.q = (
            torch.full((n,), 1.0 / n, dtype=torch.float64)
            if q is None
            else q.to(torch.float64).cpu()
        )
        self.window = max(1, int(window))
        self.keep_history = history
        self.cum = torch.zeros(n, n, dtype=torch.float64)
        self.score = torch.zeros(n, n, dtype=torch.float64)
        self._ring = torch.zeros(self.window, n, n, dtype=torch.float64)
        self.seen = torch.zeros(n, n, dtype=torch.bool)
        self.rounds: list[int] = []
        self.history_score: list[torch.Tensor] = []  # per recorded round, (n, n) float32
        self.history_actual: list[torch.Tensor] = []
        self._last_full: np.ndarray | None = None
        self._coef: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}  # W bytes -> (q W, edges)

    @property
    def window_score(self) -> torch.Tensor:
        """Sum of the last ``window`` recorded rounds of nominal-weight increments (n, n)."""
        return self._ring.sum(0)

    def record(
        self,
        t: int,
        G: torch.Tensor,
        U: torch.Tensor,
        W_actual: torch.Tensor,
        W_nominal: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Add round ``t``: read-out gradients ``G`` (n, d), sent updates ``U`` (n, d), weights
        used ``W_actual`` and nominal weights ``W_nominal`` (n, n; default = actual). Returns
        the round's nominal-weight increments (n, n)."""
        ids = np.arange(self.n)
        Wa = np.asarray(torch.as_tensor(W_actual, dtype=torch.float64).cpu())
        Wn = Wa if W_nominal is None else np.asarray(
            torch.as_tensor(W_nominal, dtype=torch.float64).cpu())
        S = dot_matrix(G, U, edge_support(Wa, Wn))
        inc = self.record_nominal(t, ids, ids, S, Wn)
        self.record_actual(ids, ids, S, Wa)
        return inc

    def _full(self, receivers: np.ndarray, senders: np.ndarray) -> bool:
        """Whether the block is the whole (n, n) matrix in node order (the simulator)."""
        if receivers is senders and receivers is self._last_full:
            return True
        full = len(receivers) == self.n == len(senders) and bool(
            (receivers == np.arange(self.n)).all() and (senders == receivers).all())
        if full and receivers is senders:
            self._last_full = receivers  # the loop passes the same array every round
        return full

    def _increments(self, receivers: np.ndarray, senders: np.ndarray, S: torch.Tensor,
                    W: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        full = self._full(receivers, senders)
        S = S.to(torch.float64).cpu()
        if full:  # the simulator: ``q_k W[k, j]`` and the edges cached per weight matrix
            coef, edges = self._coefficients(W)
            with np.errstate(invalid="ignore"):
                inc = np.where(edges, coef * S.numpy(), 0.0)
            return torch.from_numpy(inc), torch.from_numpy(edges)
        W = np.asarray(W, dtype=np.float64)
        Wb = torch.as_tensor(W[np.ix_(receivers, senders)])
        edges = (Wb != 0) & torch.as_tensor(receivers[:, None] != senders[None, :])
        q = self.q[receivers]
        inc = torch.where(edges, q[:, None] * Wb * S, torch.zeros_like(S))
        return inc, edges

    def _coefficients(self, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(q_k W[k, j]`` (n, n) float64, edges ``W[k, j] != 0, k != j``) of a full (n, n)
        weight matrix; the last few matrices are kept (a schedule repeats them every round)."""
        W = np.asarray(W, dtype=np.float64)
        key = W.tobytes()
        hit = self._coef.get(key)
        if hit is None:
            if len(self._coef) >= 4:
                self._coef.pop(next(iter(self._coef)))
            edges = W != 0
            np.fill_diagonal(edges, False)
            hit = self._coef[key] = (self.q.numpy()[:, None] * W, edges)
        return hit

    def record_nominal(self, t: int, receivers: np.ndarray, senders: np.ndarray,
                       S: torch.Tensor, W_nominal: np.ndarray) -> torch.Tensor:
        """Add round ``t``'s nominal-weight increments ``q_k W_nom[k, j] S[k, j]`` on the block
        (``receivers`` × ``senders``; ``S`` = :func:`dot_matrix` of their read-out gradients and
        updates). Returns the (n, n) increments of this round."""
        inc_b, edges = self._increments(receivers, senders, S, W_nominal)
        if self._full(receivers, senders):
            inc = inc_b
            self.seen |= edges
        else:
            inc = torch.zeros(self.n, self.n, dtype=torch.float64)
            inc[np.ix_(receivers, senders)] = inc_b
            seen = torch.zeros(self.n, self.n, dtype=torch.bool)
            seen[np.ix_(receivers, senders)] = edges
            self.seen |= seen
        self.score += inc
        self._ring[len(self.rounds) % self.window] = inc
        self.rounds.append(int(t))
        if self.keep_history:
            self.history_score.append(inc.to(torch.float32))
        return inc

    def record_actual(self, receivers: np.ndarray, senders: np.ndarray, S: torch.Tensor,
                      W_actual: np.ndarray) -> torch.Tensor:
        """Add the same round's increments with the weights actually used (0 where pruned) to
        ``cum`` (the proximal influence proper). Call after :meth:`record_nominal`."""
        inc_b, _ = self._increments(receivers, senders, S, W_actual)
        if self._full(receivers, senders):
            inc = inc_b
        else:
            inc = torch.zeros(self.n, self.n, dtype=torch.float64)
            inc[np.ix_(receivers, senders)] = inc_b
        self.cum += inc
        if self.keep_history:
            self.history_actual.append(inc.to(torch.float32))
        return inc

    def state_dict(self) -> dict[str, Any]:
        """Sums and window (for checkpoints); the per-round history is not included."""
        return {"cum": self.cum.numpy().copy(), "score": self.score.numpy().copy(),
                "ring": self._ring.numpy().copy(), "seen": self.seen.numpy().copy(),
                "rounds": list(self.rounds)}

    def load_state_dict(self, st: dict[str, Any]) -> None:
        self.cum = torch.as_tensor(np.asarray(st["cum"], dtype=np.float64))
        self.score = torch.as_tensor(np.asarray(st["score"], dtype=np.float64))
        self._ring = torch.as_tensor(np.asarray(st["ring"], dtype=np.float64))
        self.seen = torch.as_tensor(np.asarray(st["seen"], dtype=bool))
        self.rounds = [int(r) for r in st["rounds"]]

    def history(self, which: str = "score") -> np.ndarray:
        """Per-round increments as an array (rounds, n, n); ``which`` = score | actual."""
        h = self.history_score if which == "score" else self.history_actual
        if not h:
            return np.zeros((0, self.n, self.n), dtype=np.float32)
        return torch.stack(h).numpy()
