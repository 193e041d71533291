"""Influence-weighted aggregation as a policy of the one loop (docs/method.md §6).

Each round node ``k`` reweights its in-neighbours from their measured proximal influence on it
(read from a :class:`~dice_influence.apps.proximal.ProximalObserver`; positive = harmful):

1. the score ``s_kj`` = accumulated proximal influence of ``j`` on ``k`` with the nominal
   weights, per unit of weight (``score[k, j] / W_nom[k, j]``; ``cumulative`` since the start or
   over the observer's ``window``);
2. made scale-free per receiver: ``z_kj = s_kj / median_{l ∈ N_k} |s_kl|`` (so ``z ≈ −1`` for
   a typical helpful neighbour, ``z ≫ 1`` for one far more harmful than the rest);
3. a bounded factor ``f_kj = 2·σ(−z_kj / τ)`` ∈ (0, 2): helpful (``z < 0``) up to ×2, harmful
   down towards 0, ``f = 1`` for ``z = 0``; a non-finite score (diverged sender) gives 0;
4. :func:`reweight_rows` — THE rule, the same in the simulator and on peers:
   ``W^t[k, j] = W_nom[k, j]·f_kj / (W_nom[k, k] + Σ_{l≠k} W_nom[k, l]·f_kl)`` and
   ``W^t[k, k] = W_nom[k, k] / (same)``. Rows stay stochastic and entries ≥ 0; weight taken from
   harmful neighbours goes back to the whole row (to ``k`` itself when every neighbour is
   harmful).

The one knob is the temperature ``τ`` (``temperature``): ``τ → ∞`` gives the nominal (uniform)
weights, ``τ → 0`` a hard rule (helpful neighbours ×2, harmful ones dropped). The factor is
bounded above so that no single neighbour, however "helpful" its first-order score looks (a
scaled-up update), can take over a row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..loop import Policy, RoundView


def influence_factors(score: np.ndarray, w_nominal: np.ndarray, k: int,
                      temperature: float) -> np.ndarray:
    """Factors ``f[j] = 2·σ(−z_kj/τ)`` (n,) of receiver ``k`` from its row of nominal-weight
    proximal influence ``score`` (positive = harmful) and its nominal row ``w_nominal``: 1 on
    ``k`` itself and off its in-neighbours, 0 for a non-finite score."""
    if not temperature > 0:
        raise ValueError(f"influence_weight temperature={temperature} must be > 0")
    score = np.asarray(score, dtype=np.float64)
    w = np.asarray(w_nominal, dtype=np.float64)
    f = np.ones(len(w))
    m = w > 0
    m[k] = False
    if not m.any():
        return f
    with np.errstate(invalid="ignore"):
        s = score[m] / w[m]  # per unit of weight
    fin = np.isfinite(s)
    scale = float(np.median(np.abs(s[fin]))) if fin.any() else 0.0
    z = s / (scale if scale > 0 else 1.0)
    with np.errstate(over="ignore", invalid="ignore"):
        fm = 2.0 / (1.0 + np.exp(np.clip(z / temperature, -700.0, 700.0)))
    f[m] = np.where(fin, fm, 0.0)
    return f


def reweight_rows(W_nominal: np.ndarray, factors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """THE reweighting rule (module docstring, step 4): rows ``rows`` of ``W_nominal``
    reweighted by ``factors`` ((len(rows), n), 1 on the diagonal); other rows unchanged."""
    W = np.array(W_nominal, dtype=np.float64, copy=True)
    for i, k in enumerate(rows):
        f = np.asarray(factors[i], dtype=np.float64).copy()
        f[k] = 1.0
        row = W_nominal[k] * f
        tot = row.sum()
        if tot > 0 and np.isfinite(tot):
            W[k] = row / tot
        else:
            W[k] = 0.0
            W[k, k] = 1.0
    return W


class InfluenceWeightPolicy(Policy):
    """Influence-weighted aggregation (module docstring). Reads ``proximal.tracker.score``
    (``cumulative``) or ``window_score`` (``window``) on this runtime's rows only, so a peer
    computes its row exactly as the simulator does."""

    name = "influence_weight"

    def __init__(self, n: int, proximal: Any, *, temperature: float = 0.5,
                 score: str = "cumulative", start: int = 0) -> None:
        if not temperature > 0:
            raise ValueError(f"influence_weight temperature={temperature} must be > 0")
        if score not in ("cumulative", "window"):
            raise ValueError(f"influence_weight score={score!r}: choose cumulative or window")
        self.n, self.proximal = n, proximal
        self.temperature, self.score, self.start = float(temperature), score, int(start)
        self.last: np.ndarray | None = None  # the last W^t decided (rows of this runtime)

    def active(self, t: int) -> bool:
        return t >= self.start or self.proximal.active(t)

    def decide(self, view: RoundView) -> np.ndarray:
        if view.t < self.start:
            return view.W_nominal
        tk = self.proximal.tracker
        S = (tk.score if self.score == "cumulative" else tk.window_score).numpy()
        rows = view.receivers
        Wn = view.W_nominal
        F = np.stack([influence_factors(S[k], Wn[k], int(k), self.temperature)
                      for k in rows])
        W = reweight_rows(Wn, F, rows)
        self.last = W
        return W

    def summary(self) -> dict[str, Any]:
        """The rule, its knob, and the last rows decided (``W[k][j]``, rows = receivers)."""
        out: dict[str, Any] = {"rule": "W[k,j] ∝ W_nom[k,j]·2σ(−z_kj/τ), self weight kept "
                               "before row normalisation; z = proximal score / median |score| "
                               "of k's neighbours (positive = harmful)",
                               "temperature": self.temperature, "score": self.score}
        if self.last is not None:
            out["W_last"] = self.last.tolist()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {}


def from_settings(s: Any, ctx: Any) -> InfluenceWeightPolicy:
    """Factory for ``policy: kind: influence_weight`` (adds a proximal observer when the config
    has none)."""
    from .selection import _proximal

    return InfluenceWeightPolicy(ctx.n, _proximal(ctx), temperature=s.temperature,
                                 score=s.score, start=s.start)
