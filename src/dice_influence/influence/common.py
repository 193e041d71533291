"""Removal events, reach sets and the influence result type shared by DICE-GT and DICE-E.

Sign convention (docs/method.md §1): influence = test loss with the data − test loss without it.
Positive = the data was harmful, negative = helpful.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..topology import reach_sets


@dataclass(frozen=True)
class Event:
    """Remove samples of node ``node``'s batch at round ``round``.

    ``samples``: positions within that batch (0..B-1); ``None`` removes the whole batch: every
    sample weight is zero, so the batch contributes no gradient while momentum from earlier
    rounds and weight decay still act (docs/method.md §3; under plain SGD the node skips its update).
    A batch's first-order influence is the sum of its samples'."""

    node: int
    round: int
    samples: tuple[int, ...] | None = None

    @property
    def unit(self) -> str:
        if self.samples is None:
            return "batch"
        return "sample" if len(self.samples) == 1 else "samples"


def _as_event(item: Any) -> Event:
    """An :class:`Event` from ``(node, round[, samples])`` or ``{"node", "round"[,
    "samples"]}``; anything else is one ValueError naming the item and the fix."""
    try:
        if isinstance(item, dict):
            return Event(**item)
        if isinstance(item, (tuple, list)) and 2 <= len(item) <= 3:
            return Event(*item)
    except TypeError:
        pass
    shown = repr(item)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    raise ValueError(f"event {shown} ({type(item).__name__}) is not an Event; pass "
                     "Event(node, round) or Event(node, round, samples=(i, ...)), or a "
                     "(node, round[, samples]) tuple")


def validate_events(traj: Any, events: Sequence[Event], horizon: int) -> list[Event]:
    """Check node ids, rounds (the replay needs ``horizon`` recorded rounds after each event)
    and sample positions; raise one clear ValueError naming the bad event."""
    if isinstance(horizon, bool) or not isinstance(horizon, int | np.integer) or horizon < 0:
        raise ValueError(f"hops must be an integer >= 0, got {horizon!r}")
    check_replayable(traj)
    p = traj.problem
    out = []
    B = p.cfg.train.batch_size
    for e in events:
        if not isinstance(e, Event):
            e = _as_event(e)
        for what, v in (("node", e.node), ("round", e.round),
                        *(("sample", s) for s in e.samples or ())):
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise ValueError(f"event {e}: {what} must be an integer, got {v!r}")
        if not 0 <= e.node < p.n:
            raise ValueError(f"event {e}: node {e.node} out of range 0..{p.n - 1}")
        if not 0 <= e.round or e.round + horizon > traj.rounds_done:
            raise ValueError(
                f"event {e}: round {e.round} needs rounds {e.round}..{e.round + horizon} recorded, "
                f"but the run has {traj.rounds_done} rounds; pick round <= "
                f"{traj.rounds_done - horizon} or train longer"
            )
        if e.samples is not None:
            if not e.samples:
                raise ValueError(f"event {e}: empty sample list (use samples=None for the batch)")
            bad = [s for s in e.samples if not 0 <= s < B]
            if bad:
                raise ValueError(f"event {e}: sample positions {bad} outside the batch 0..{B - 1}")
        out.append(e)
    return out


def check_replayable(traj: Any, *, transforms: bool = True) -> None:
    """Refuse what influence cannot replay: a non-finite trajectory
    (:class:`~dice_influence.trajectory.DivergenceError`), a robust aggregator (a non-linear
    round: DICE-GT/E need the ``W^t`` matmul) and, with ``transforms=False`` (the adjoint),
    update-level attacks in the round."""
    from ..trajectory import check_finite

    check_finite(traj)
    p = traj.problem
    if getattr(p, "aggregator", None) is not None:
        raise ValueError(f"this run aggregates with {p.aggregator.name}; influence replays need "
                         "the W^t matmul: train without `aggregator:` to measure influence")
    if not transforms and getattr(p, "transforms", ()):
        raise ValueError("attribution through update-level attacks (transforms) is not "
                         "supported; use estimate() or ground_truth() on this run")


def factual_path(traj: Any, start: int, stop: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Factual ``(θ^r, state^r)`` for ``r = start..stop`` (inclusive), bit-identical to training:
    recorded checkpoints are used as they are, rounds in between are recomputed once."""
    from ..loop import run_rounds

    ckpt = getattr(traj, "checkpoints", {})
    th, st = traj.params_at(start)
    out = [(th, st)]
    for r in range(start, stop):
        if r + 1 in ckpt:
            th, st = ckpt[r + 1]
        else:
            th, st = run_rounds(traj.problem, th, st, r, r + 1)
        out.append((th, st))
    return out


def mix_each(mixer: Any, theta: torch.Tensor) -> torch.Tensor:
    """Gossip ``R`` stacked networks ``(R, n, d)`` one network at a time (each an ``(n, d)``
    product, the shape training uses). One product over all ``R`` networks at once gives
    different last bits for different ``R`` (the BLAS blocking depends on the column count),
    so this keeps DICE-GT and DICE-E bit-identical however the events are chunked."""
    return torch.stack([mixer(th) for th in theta])


def node_weights(n: int, q: str | Sequence[float] | None) -> torch.Tensor:
    """Node weights ``q_k``: ``"uniform"`` (1/n, default), ``"one"`` (the authors' code) or
    an explicit non-negative vector."""
    if q is None or q == "uniform":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if q == "one":
        return torch.ones(n, dtype=torch.float64)
    qt = torch.as_tensor(np.asarray(q, dtype=float))
    if qt.shape != (n,) or bool((qt < 0).any()):
        raise ValueError(f"q must be 'uniform', 'one' or {n} non-negative weights, got {q!r}")
    return qt


def reach_masks(traj: Any, events: Sequence[Event], hops: int) -> torch.Tensor:
    """Boolean ``(E, hops+1, n)``: ``[e, s, k]`` is True when ``k ∈ N^(s)(j)`` (first reached at
    round ``t+s``, docs/method.md §3); ``[e, 0, j]`` marks the source itself (the self term)."""
    n = traj.problem.n
    out = torch.zeros(len(events), hops + 1, n, dtype=torch.bool)
    cache: dict[tuple[int, int], list[list[int]]] = {}
    static = traj.problem.schedule.is_static
    for i, e in enumerate(events):
        key = (e.node, 0 if static else e.round)
        if key not in cache:
            cache[key] = reach_sets(traj.problem.schedule, e.node, e.round, hops)
        out[i, 0, e.node] = True
        for s, nodes in enumerate(cache[key], start=1):
            out[i, s, nodes] = True
    return out


@dataclass
class InfluenceResult:
    """Influence of removal events, per node and hop (docs/method.md §3–4).

    Sign: influence = test loss with the data − without it; **positive = harmful**.

    - ``per_node[e, s, k]``: the unweighted loss difference (GT) or its first-order estimate
      (E) at node ``k``: ``s = 0`` is the source's own half step ``θ_j^{t+½}`` (only ``k = j``
      is filled), ``s ≥ 1`` is node ``k`` at round ``t+s``. Axes: (event, hop, node).
    - ``self_term[e]`` = ``q_j per_node[e, 0, j]``.
    - ``hop_terms[e, s-1]`` = ``Σ_{k ∈ N^(s)(j)} q_k per_node[e, s, k]`` for ``s = 1..hops``.
    - ``r_hop[e, r-1]`` = self term + hop terms 1..r (the r-hop DICE value, Def. 3).
    - ``horizon[e]`` = ``Σ_k q_k per_node[e, hops, k]`` (all nodes, at round ``t+hops``).
    """

    method: str
    events: list[Event]
    hops: int
    per_node: torch.Tensor
    q: torch.Tensor
    reach: torch.Tensor
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def self_term(self) -> torch.Tensor:
        idx = torch.tensor([e.node for e in self.events])
        return self.q[idx] * self.per_node[torch.arange(len(self.events)), 0, idx]

    @property
    def hop_terms(self) -> torch.Tensor:
        w = self.reach[:, 1:, :].to(self.per_node.dtype) * self.q
        return (w * self.per_node[:, 1:, :]).sum(-1)

    @property
    def r_hop(self) -> torch.Tensor:
        return self.self_term[:, None] + torch.cumsum(self.hop_terms, dim=1)

    @property
    def horizon(self) -> torch.Tensor:
        return (self.q * self.per_node[:, self.hops, :]).sum(-1)

    def values(self, hops: int) -> torch.Tensor:
        """The r-hop value of every event for ``r = hops`` (``hops = 0``: self term only)."""
        return self.self_term if hops == 0 else self.r_hop[:, hops - 1]

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form with named axes."""
        return {
            "method": self.method,
            "sign": "influence = loss with the data - loss without it; positive = harmful",
            "options": self.options,
            "seconds": self.seconds,
            "events": [{"node": e.node, "round": e.round, "samples": e.samples}
                       for e in self.events],
            "axes": {"per_node": ["event", "hop", "node"], "r_hop": ["event", "hops"]},
            "self_term": self.self_term.tolist(),
            "r_hop": self.r_hop.tolist(),
            "horizon": self.horizon.tolist(),
            "per_node": self.per_node.tolist(),
        }

    def to_dataframe(self):
        """Long table: one row per (event, hops) with the r-hop value (needs pandas, the
        ``pandas`` extra: ``pip install 'dice-influence[pandas]'``)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("InfluenceResult.to_dataframe needs pandas, which is optional: "
                              "pip install 'dice-influence[pandas]' (or pip install pandas); "
                              "to_dict() gives the same numbers without it") from None

        rows = []
        rh = self.r_hop
        for i, e in enumerate(self.events):
            rows.append({"event": i, "node": e.node, "round": e.round, "unit": e.unit,
                         "hops": 0, "value": float(self.self_term[i]), "method": self.method})
            for r in range(self.hops):
                rows.append({"event": i, "node": e.node, "round": e.round, "unit": e.unit,
                             "hops": r + 1, "value": float(rh[i, r]), "method": self.method})
        return pd.DataFrame(rows)


def sample_events(traj: Any, count: int, *, unit: str = "batch", hops: int = 1,
                  seed: int = 0, rounds: tuple[int, int] | None = None) -> list[Event]:
    """Draw ``count`` distinct events uniformly over nodes and rounds (seeded). ``unit``:
    ``batch`` (whole batch) or ``sample`` (one sample of the batch)."""
    p = traj.problem
    lo, hi = rounds or (0, traj.rounds_done - hops)
    hi = min(hi, traj.rounds_done - hops)
    if hi < lo:
        raise ValueError(f"no room for events: rounds {lo}..{hi} with {hops} hops after each; "
                         "train longer or use fewer hops")
    rng = np.random.default_rng([seed, 7919])
    B = p.cfg.train.batch_size
    seen, out = set(), []
    while len(out) < count and len(seen) < 50 * count + 100:
        j, t = int(rng.integers(p.n)), int(rng.integers(lo, hi + 1))
        s = None if unit == "batch" else (int(rng.integers(B)),)
        key = (j, t, s)
        if key in seen:
            continue
        seen.add(key)
        out.append(Event(j, t, s))
    return out
