"""Reciprocity between neighbours from accumulated proximal influence (docs/method.md §5, paper Def. 5).

``P[k, j]`` = ``I_prox(j → k)`` (receiver row, sender column; positive = harmful).

- ``R_{k,j} = I_prox(j → k) / I_prox(k → j)`` (η cancels): near 1, balanced give and take.
- ``R_j = Σ_k I_prox(j → k) / Σ_l I_prox(l → j)``: outflow over inflow.

Divisions by ~0 (``|denominator| ≤ eps·max|P|``) give NaN rather than a huge number.
"""

from __future__ import annotations

import numpy as np


def pairwise(P: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """``R[k, j] = P[k, j] / P[j, k]`` on pairs linked both ways; NaN elsewhere."""
    P = np.asarray(P, dtype=np.float64)
    tiny = eps * max(float(np.nanmax(np.abs(np.where(np.isfinite(P), P, 0.0)))), 1e-300)
    den = P.T
    ok = (np.abs(den) > tiny) & (P != 0) & np.isfinite(P) & np.isfinite(den)
    np.fill_diagonal(ok, False)
    with np.errstate(all="ignore"):
        return np.where(ok, P / den, np.nan)


def node_reciprocity(P: np.ndarray, eps: float = 1e-9) -> dict[str, np.ndarray]:
    """Per node ``j``: ``outflow`` = Σ_k P[k, j] (its influence on others), ``inflow`` =
    Σ_l P[j, l] (others' influence on it), and ``R`` = outflow / inflow (NaN if inflow ≈ 0)."""
    P = np.asarray(P, dtype=np.float64).copy()
    np.fill_diagonal(P, 0.0)
    out = P.sum(0)
    inf = P.sum(1)
    tiny = eps * max(float(np.nanmax(np.abs(np.where(np.isfinite(P), P, 0.0)))), 1e-300)
    with np.errstate(all="ignore"):
        R = np.where(np.abs(inf) > tiny, out / inf, np.nan)
    return {"outflow": out, "inflow": inf, "R": R}
