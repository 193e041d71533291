"""Mixing schedules: a (possibly time-varying) W(t) as a pure function of t and a seed."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._common import MAX_NODES, TIME_VARYING, TopologyError, _as_int, _norm_name
from .graphs import mixing_matrix
from .validate import validate_mixing


class Schedule:
    """A (possibly time-varying) sequence of mixing matrices ``W(0), W(1), ...``.

    ``W(t)`` is a pure function of ``t`` and the schedule's seed (any call order gives the same
    matrices) and returns a fresh float64 array. ``is_static`` is True when every round uses the
    same matrix; ``period`` is the smallest known period (None if aperiodic/unknown).
    """

    n: int
    is_static: bool
    period: int | None

    def __init__(self, n: int, *, is_static: bool, period: int | None) -> None:
        self.n = _as_int(n, "n (number of nodes)", minimum=1, maximum=MAX_NODES)
        self.is_static = bool(is_static)
        self.period = period

    def W(self, t: int) -> np.ndarray:
        """Mixing matrix used in gossip round ``t`` (``t >= 0``)."""
        return self._matrix(_as_int(t, "round t", minimum=0))

    def _matrix(self, t: int) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n})"


class StaticSchedule(Schedule):
    """The same matrix every round."""

    def __init__(self, W: Any, *, connectivity: str = "error") -> None:
        self._w = validate_mixing(W, connectivity=connectivity)
        super().__init__(self._w.shape[0], is_static=True, period=1)

    def _matrix(self, t: int) -> np.ndarray:
        return self._w.copy()


class OnePeerExponential(Schedule):
    """One-peer exponential graph (Ying et al. 2021).

    With ``tau = ceil(log2 n)``, at round ``t`` node i averages with the single sender
    ``(i + 2^(t mod tau)) % n``: ``W[i, i] = W[i, (i + 2^(t mod tau)) % n] = 1/2``. For n a power
    of two, the product over one period is exactly ``11^T / n``. ``n == 1`` gives the identity.
    """

    def __init__(self, n: int) -> None:
        n = _as_int(n, "n (number of nodes)", minimum=1, maximum=MAX_NODES)
        self.tau = (n - 1).bit_length()
        super().__init__(n, is_static=self.tau <= 1, period=max(self.tau, 1))

    def _matrix(self, t: int) -> np.ndarray:
        n = self.n
        if n == 1:
            return np.eye(1)
        off = 1 << (t % self.tau)
        w = np.zeros((n, n))
        i = np.arange(n)
        w[i, i] = 0.5
        w[i, (i + off) % n] = 0.5
        return w

    def __repr__(self) -> str:
        return f"OnePeerExponential(n={self.n})"


class RandomMatching(Schedule):
    """A uniformly random (near-)perfect matching each round; matched pairs average 1/2-1/2.

    Round ``t`` uses ``np.random.default_rng([seed, t])``; with odd n one node stays alone.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        n = _as_int(n, "n (number of nodes)", minimum=1, maximum=MAX_NODES)
        self.seed = _as_int(seed, "seed", minimum=0)
        super().__init__(n, is_static=n <= 2, period=1 if n <= 2 else None)

    def _matrix(self, t: int) -> np.ndarray:
        n = self.n
        perm = np.random.default_rng([self.seed, t]).permutation(n)
        w = np.eye(n)
        a, b = perm[0 : n - 1 : 2], perm[1:n:2]
        w[a, a] = w[b, b] = w[a, b] = w[b, a] = 0.5
        return w

    def __repr__(self) -> str:
        return f"RandomMatching(n={self.n}, seed={self.seed})"


class PermutedSchedule(Schedule):
    """Relabel a base graph each round: ``W_t = P_t W P_t^T`` with a random permutation ``P_t``.

    ``P_t`` maps node i to ``perm[i]`` with ``perm = default_rng([seed, t]).permutation(n)``,
    so ``W_t[perm[k], perm[j]] = W[k, j]``.
    """

    def __init__(self, W: Any, seed: int = 0, *, connectivity: str = "error") -> None:
        self._w = validate_mixing(W, connectivity=connectivity)
        self.seed = _as_int(seed, "seed", minimum=0)
        n = self._w.shape[0]
        super().__init__(n, is_static=n == 1, period=1 if n == 1 else None)

    def _matrix(self, t: int) -> np.ndarray:
        perm = np.random.default_rng([self.seed, t]).permutation(self.n)
        w = np.empty_like(self._w)
        w[np.ix_(perm, perm)] = self._w
        return w

    def __repr__(self) -> str:
        return f"PermutedSchedule(n={self.n}, seed={self.seed})"


def make_schedule(
    name: str,
    n: int,
    *,
    weights: str = "uniform",
    seed: int = 0,
    time_varying: str | None = None,
    **kw: Any,
) -> Schedule:
    """Build a schedule: a static named topology, or a time-varying one.

    ``time_varying``: None (static :func:`mixing_matrix`), ``"one-peer-exponential"``,
    ``"random-matching"`` (both ignore ``name``, ``weights`` and ``kw``), or ``"permuted"``
    (the named topology relabelled randomly each round). ``kw`` may hold ``p``, ``degree``, ``k``.
    ``name`` may itself be ``"one-peer-exponential"`` or ``"random-matching"``.
    """
    unknown = set(kw) - {"p", "degree", "k"}
    if unknown:
        raise TopologyError(
            f"unknown topology parameters {sorted(unknown)}; allowed: 'p', 'degree', 'k'"
        )
    key = _norm_name(name)
    tv = None if time_varying is None else _norm_name(time_varying)
    if tv is None and key in ("one-peer-exponential", "random-matching"):
        tv = key
    if tv not in TIME_VARYING:
        raise TopologyError(
            f"unknown time_varying {time_varying!r}; choose one of {list(TIME_VARYING)}"
        )
    if tv == "one-peer-exponential":
        return OnePeerExponential(n)
    if tv == "random-matching":
        return RandomMatching(n, seed)
    w = mixing_matrix(key, n, weights=weights, seed=seed, **kw)
    conn = "ignore" if key == "isolated" else "error"
    if tv == "permuted":
        return PermutedSchedule(w, seed, connectivity=conn)
    return StaticSchedule(w, connectivity=conn)


class RecordedSchedule(Schedule):
    """A schedule with some rounds replaced by the matrices a policy chose (``overrides[t]``),
    so that a policy-driven run replays exactly. Other rounds come from ``base``."""

    def __init__(self, base: Schedule, overrides: dict[int, np.ndarray]) -> None:
        self.base = base.base if isinstance(base, RecordedSchedule) else base
        merged = dict(base.overrides) if isinstance(base, RecordedSchedule) else {}
        merged.update({int(t): np.asarray(w, dtype=np.float64) for t, w in overrides.items()})
        self.overrides = merged
        super().__init__(self.base.n, is_static=self.base.is_static and not merged,
                         period=self.base.period if not merged else None)

    def _matrix(self, t: int) -> np.ndarray:
        w = self.overrides.get(t)
        return self.base.W(t) if w is None else w.copy()

    def __repr__(self) -> str:
        return f"RecordedSchedule({self.base!r}, {len(self.overrides)} rounds chosen by a policy)"
