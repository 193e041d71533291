"""Robust aggregation rules as aggregators of the one loop (baselines for the DICE defence).

Both work on a :class:`~dice_influence.loop.RoundView`, so the simulator (every receiver) and a
peer (its own row, the half steps that arrived) compute the same numbers. Non-finite senders
never leak into a receiver's result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..loop import Aggregator, RoundView


def _own_rows(view: RoundView) -> torch.Tensor:
    """Row of each receiver's own half step in ``view.half``."""
    pos = [view.sender_pos(int(r)) for r in view.receivers]
    return torch.as_tensor(pos, device=view.half.device)


class ClippedGossip(Aggregator):
    """ClippedGossip (He, Karimireddy & Jaggi 2022): ``θ_k ← θ_k + Σ_j W[k, j] clip(θ_j − θ_k,
    τ_k)``, ``clip(v, τ) = v·min(1, τ/‖v‖)`` (all at the half step).

    ``τ_k`` follows the paper's practical rule: the farthest neighbours holding at most
    ``delta`` of ``k``'s weight are clipped to the distance of the nearest of the rest.
    Non-finite differences are dropped (their weight stays with ``k``)."""

    name = "clipped_gossip"

    def __init__(self, delta: float = 0.2) -> None:
        if not 0.0 <= delta < 1.0:
            raise ValueError(f"clipped_gossip delta={delta} must be in [0, 1)")
        self.delta = float(delta)

    def __call__(self, view: RoundView, W: np.ndarray) -> torch.Tensor:
        half = view.half
        own = _own_rows(view)
        Wb = view.block(W).copy()
        not_self = view.receivers[:, None] != view.senders[None, :]
        Wb = np.where(not_self, Wb, 0.0)
        recv, send = np.nonzero(Wb > 0)
        out = half[own].clone()
        if len(recv) == 0:
            return out
        r_t = torch.as_tensor(recv, device=half.device)
        s_t = torch.as_tensor(send, device=half.device)
        diff = half[s_t] - half[own[r_t]]
        norms = diff.norm(dim=1)
        finite = torch.isfinite(norms)
        nn_ = np.where(finite.cpu().numpy(), norms.cpu().numpy().astype(np.float64), np.inf)
        w = Wb[recv, send]
        tau = np.zeros(len(recv))
        for k in range(len(view.receivers)):
            sel = np.flatnonzero(recv == k)
            if len(sel) == 0:
                continue
            order = sel[np.argsort(-nn_[sel], kind="stable")]
            clipped = np.cumsum(w[order]) <= self.delta + 1e-12
            rest = order[~clipped]
            tk = float(nn_[rest].max()) if len(rest) else 0.0
            tau[sel] = tk if np.isfinite(tk) else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            fac = np.where(np.isfinite(nn_) & (nn_ > 0), np.minimum(1.0, tau / nn_), 0.0)
        coef = torch.as_tensor(w * fac, dtype=half.dtype, device=half.device)
        diff = torch.where(finite[:, None], diff, torch.zeros_like(diff))
        out.index_add_(0, r_t, coef[:, None] * diff)
        return out


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean over each receiver's in-neighbours and itself (unweighted):
    drop the ``floor(trim·m)`` largest and smallest values of each coordinate (``m`` values),
    average the rest. Non-finite values sort to the ends and are dropped first."""

    name = "trimmed_mean"

    def __init__(self, trim: float = 0.2) -> None:
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trimmed_mean trim={trim} must be in [0, 0.5)")
        self.trim = float(trim)

    def __call__(self, view: RoundView, W: np.ndarray) -> torch.Tensor:
        half = view.half
        Wb = view.block(W)
        own = _own_rows(view)
        out = torch.empty(len(view.receivers), half.shape[1], dtype=half.dtype,
                          device=half.device)
        for i in range(len(view.receivers)):
            js = np.flatnonzero(Wb[i] > 0)
            vals = torch.nan_to_num(half[torch.as_tensor(js, device=half.device)],
                                    nan=float("inf"))
            m = len(js)
            b = int(np.floor(self.trim * m))
            if b == 0 or m - 2 * b < 1:
                out[i] = vals.mean(0) if torch.isfinite(vals).all() else half[own[i]]
                continue
            s, _ = torch.sort(vals, dim=0)
            out[i] = s[b : m - b].mean(0)
        return out


AGGREGATORS = {"clipped_gossip": ClippedGossip, "trimmed_mean": TrimmedMean}


def from_settings(s: Any, ctx: Any) -> Aggregator:
    """Factory for ``aggregator: kind: clipped_gossip | trimmed_mean``."""
    return ClippedGossip(s.delta) if s.kind == "clipped_gossip" else TrimmedMean(s.trim)
