"""Proximal influence as an observer of the one loop (docs/method.md §5, paper Def. 4).

Each tracked round, receiver ``k`` adds ``q_k W^t[k, j] G_kᵀ u_j^t`` for every in-neighbour
``j``, ``G_k`` its test-loss gradient on its own test split (read-out ``pre`` = ``∇L(θ_k^t)``,
``post`` = ``∇L(θ_k^{t+1})`` as in Def. 4, or their ``midpoint``). Sign: positive = ``j``'s
update raised ``k``'s test loss (harmful). The same object runs in the simulator (every row) and
on a peer (its own row, with the updates that arrived).

With ``pre`` the nominal-weight score of round ``t`` is complete before ``W^t`` is decided, so a
policy can act on it in the same round; ``post`` and ``midpoint`` scores reach a policy one round
later.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..influence.proximal import READOUTS, ProximalTracker, dot_matrix, edge_support, support_edges
from ..loop import Observer, RoundView


def node_weight_vector(n: int, q: str) -> torch.Tensor:
    """``q_k``: ``"uniform"`` (1/n) or ``"one"`` (the authors' code)."""
    if q not in ("uniform", "one"):
        raise ValueError(f"q={q!r}: choose 'uniform' or 'one'")
    return torch.full((n,), 1.0 / n if q == "uniform" else 1.0, dtype=torch.float64)


class ProximalObserver(Observer):
    """Online proximal influence on every edge this runtime sees (module docstring).

    ``tracker`` (:class:`~dice_influence.influence.proximal.ProximalTracker`) holds the sums:
    ``cum`` (weights actually used), ``score`` (nominal weights, so pruned senders keep being
    scored), a window and optionally the per-round history."""

    name = "proximal"

    def __init__(self, n: int, q: torch.Tensor | None = None, *, readout: str = "pre",
                 every: int = 1, window: int = 10, history: bool = True) -> None:
        if readout not in READOUTS:
            raise ValueError(f"readout {readout!r}: choose one of {', '.join(READOUTS)}")
        if every < 1:
            raise ValueError(f"every={every} must be >= 1")
        self.readout = readout
        self.every = int(every)
        self.tracker = ProximalTracker(n, q, readout=readout, window=window, history=history)
        self._S: torch.Tensor | None = None
        self._support = np.zeros((n, n), dtype=bool)
        self._support_key = b""
        self._edges: tuple[np.ndarray, np.ndarray] | None = None
        self.last_actual: torch.Tensor | None = None  # the last round's increments to ``cum``
        self.last_round: int | None = None
        # which z'_k the runtime reads (loop.readout_rows)
        self.test_set, self.test_batch, self.test_batch_order = "auto", None, "rotate"

    def active(self, t: int) -> bool:
        return t % self.every == 0

    @property
    def last_dots(self) -> torch.Tensor | None:
        """This round's ``S[k, j] = G_k · u_j`` (float64, receivers × senders; on the edges only
        in the simulator, 0 elsewhere) between :meth:`before_gossip` and :meth:`after_gossip`."""
        return self._S

    def _dots(self, view: RoundView, G: torch.Tensor, *Ws: np.ndarray) -> torch.Tensor:
        """``S`` on the edges of ``Ws`` (the simulator's full view; entries off them are 0 and
        never read), or the whole block (a peer's one row)."""
        if not view.is_full:
            return dot_matrix(G, view.update())
        key = b"".join(np.asarray(W).tobytes() for W in Ws)
        if key != self._support_key:  # a static schedule: once
            self._support, self._support_key = edge_support(*Ws), key
            self._edges = support_edges(self._support)
        return dot_matrix(G, view.update(), self._support, edges=self._edges)

    def before_gossip(self, view: RoundView) -> None:
        self._S = None
        if self.readout == "pre":
            self._S = self._dots(view, view.test_grad("pre"), view.W_nominal)
            self.tracker.record_nominal(view.t, view.receivers, view.senders, self._S,
                                        view.W_nominal)
            self.last_round = view.t

    def after_gossip(self, view: RoundView, W_used: np.ndarray) -> None:
        if self.readout != "pre":
            G = view.test_grad("post")
            if self.readout == "midpoint":
                G = 0.5 * (view.test_grad("pre") + G)
            self._S = self._dots(view, G, view.W_nominal, W_used)
            self.tracker.record_nominal(view.t, view.receivers, view.senders, self._S,
                                        view.W_nominal)
            self.last_round = view.t
        elif view.is_full and W_used is not view.W_nominal:  # a policy's new edges
            extra = edge_support(W_used) & ~self._support
            if extra.any():
                S2 = dot_matrix(view.test_grad("pre"), view.update(), extra)
                self._S = torch.where(torch.from_numpy(extra), S2, self._S)
        assert self._S is not None
        self.last_actual = self.tracker.record_actual(view.receivers, view.senders, self._S,
                                                      W_used)
        self._S = None

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "last_round": self.last_round}

    def summary(self) -> dict[str, Any]:
        """``P[k][j]`` = cumulative proximal influence of sender ``j`` on receiver ``k`` with the
        weights used (positive = harmful), and each node's reciprocity (outflow / inflow)."""
        from .reciprocity import node_reciprocity

        P = self.tracker.cum.numpy()
        rec = node_reciprocity(P)
        return {"sign": "P[k][j]: influence of sender j on receiver k; positive = harmful",
                "readout": self.readout, "every": self.every,
                "rounds_tracked": len(self.tracker.rounds), "P": P.tolist(),
                "reciprocity": {k: np.asarray(v).tolist() for k, v in rec.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.last_round = state.get("last_round")


def from_settings(s: Any, ctx: Any) -> ProximalObserver:
    """Factory for ``observers: - kind: proximal`` (:mod:`dice_influence.plugins`)."""
    obs = ProximalObserver(ctx.n, node_weight_vector(ctx.n, s.q), readout=s.readout,
                           every=s.every, window=s.window, history=s.history)
    obs.test_set, obs.test_batch = s.test_set, s.test_batch
    obs.test_batch_order = s.test_batch_order
    return obs
