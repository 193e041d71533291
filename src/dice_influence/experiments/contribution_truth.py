"""Ground truths of node contribution: leave-one-node-out and Shapley values (SPEC §5).

Both retrain the network with some nodes' data weighted to zero for the whole run; such a node
still takes part (it relays what it receives: ``θ_j^{t+½} = θ_j^t``, then gossips). Under SGD or
momentum without weight decay a node whose every sample weight is zero computes ``u = 0``, so
the removal is the transform :class:`DataRemoval` (``u_j ← 0``), applied *before* the run's
own transforms: a free rider that adds noise still adds it, its data was never used.

Many retrainings run as **one vectorized run of the one loop**: :class:`StackedProblem` holds
``R`` copies of the network (``R·n`` nodes, node ``r·n + k`` = node ``k`` of copy ``r``), each
copy mixed with the run's own ``W^t`` (one product over the stacked copies), same batches,
same learning rates, same initialisation, same transforms. Copy 0 is the factual network, so
a removal that changes nothing gives exactly 0.

Utility (Shapley) and loss changes (LOO) are mean test losses on the shared test set ``z'``.
Sign: value = loss with the data − loss without it; negative = helpful.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import ConfigError
from ..gossip import node_losses, repeat_rows
from ..loop import Loop, Transform
from ..problem import Problem

# ----------------------------------------------------------------------------- stacked runs


class DataRemoval(Transform):
    """Node ``i`` (a row of the stacked network) with ``removed[i]`` sends ``u = 0``: its data
    weighted to zero for the whole run (exact for SGD/momentum without weight decay)."""

    name = "data_removal"

    def __init__(self, removed: np.ndarray) -> None:
        self.removed = np.asarray(removed, dtype=bool)
        self._rows = np.flatnonzero(self.removed)

    def active(self, t: int) -> bool:
        return len(self._rows) > 0

    def apply(self, t: int, ids: Sequence[int], U: torch.Tensor) -> list[int]:
        pos = [i for i, k in enumerate(ids) if self.removed[int(k)]]
        if pos:
            U[torch.as_tensor(pos, device=U.device)] = 0.0
        return pos


class Tiled(Transform):
    """A transform of the ``n``-node network applied to each of ``R`` stacked copies (node
    ``r·n + k`` behaves like node ``k``; noise depends on ``(t, k)`` as in the factual run)."""

    def __init__(self, inner: Transform, n: int, R: int) -> None:
        self.inner, self.n, self.R = inner, n, R
        self.name = f"tiled_{getattr(inner, 'name', 'transform')}"

    def active(self, t: int) -> bool:
        return self.inner.active(t)

    def apply(self, t: int, ids: Sequence[int], U: torch.Tensor) -> list[int]:
        n = self.n
        if len(ids) != n * self.R:
            raise ValueError("Tiled transforms need the whole stacked network")
        base = list(range(n))
        changed: list[int] = []
        for r in range(self.R):
            changed += [r * n + i for i in self.inner.apply(t, base, U[r * n:(r + 1) * n])]
        return changed


class _StackedMixer:
    """The base network's gossip applied to each stacked copy: ``(R·n, d)`` → ``(R·n, d)``."""

    def __init__(self, base: Any, R: int) -> None:
        self.base, self.R = base, R

    def __call__(self, theta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        n = self.base.n
        mixed = self.base(theta.view(self.R, n, theta.shape[1])).reshape(self.R * n, -1)
        return mixed if out is None else out.copy_(mixed)


@dataclass
class StackedProblem(Problem):
    """``R`` copies of ``base`` as one problem of ``R·n`` nodes (module docstring)."""

    base: Problem | None = None
    copies: int = 1

    @property
    def n(self) -> int:
        return self.base.n * self.copies

    def W(self, t: int) -> np.ndarray:
        return np.kron(np.eye(self.copies), self.base.W(t))

    def mixer(self, t: int) -> Any:
        return _StackedMixer(self.base.mixer(t), self.copies)

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.base.batch(t)
        R = self.copies
        return x.repeat(R, *([1] * (x.ndim - 1))), repeat_rows(y, R)

    def init_theta(self) -> torch.Tensor:
        return self.base.init_theta().repeat(self.copies, 1)


def stack(problem: Problem, keep: np.ndarray) -> StackedProblem:
    """The stacked problem whose copy ``r`` keeps the data of nodes ``keep[r]`` (bool (R, n))."""
    keep = np.asarray(keep, dtype=bool)
    R, n = keep.shape
    if n != problem.n:
        raise ValueError(f"keep has {n} columns but the problem has {problem.n} nodes")
    fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(Problem) if f.init}
    fields["transforms"] = (DataRemoval(~keep.reshape(-1)),
                            *(Tiled(tr, n, R) for tr in problem.transforms))
    fields["_mixers"] = {}
    return StackedProblem(**fields, base=problem, copies=R)


def check_removable(problem: Problem) -> None:
    """Zeroing a node's update equals weighting its data to zero only without weight decay
    and with the ``W^t`` matmul; raise :class:`ConfigError` otherwise."""
    if problem.opt.weight_decay:
        raise ConfigError("leave-one-node-out and Shapley weight a node's data to zero by "
                          "zeroing its update, which is exact only without weight decay; set "
                          f"train.weight_decay: 0 (got {problem.opt.weight_decay})")
    if problem.aggregator is not None:
        raise ConfigError("leave-one-node-out and Shapley retrainings need the W^t matmul; "
                          "remove the aggregator: section")


def run_coalitions(problem: Problem, keep: np.ndarray, rounds: int, *,
                   max_nodes: int = 1024, progress: bool = False,
                   label: str = "retraining") -> dict[str, np.ndarray]:
    """Train one network per row of ``keep`` (bool (C, n): whose data is used) for ``rounds``
    rounds, ``max_nodes // n`` networks per vectorized run (``progress``: a bar over their
    rounds). Returns final per-node test loss and accuracy on ``z'`` (``loss``, ``acc``:
    (C, n)), ``seconds`` (wall) and ``cpu_seconds`` (this process)."""
    from .._util import progress_bar

    check_removable(problem)
    keep = np.asarray(keep, dtype=bool)
    n = problem.n
    per = max(1, max_nodes // n)
    loss = np.zeros(keep.shape)
    acc = np.zeros(keep.shape) if problem.fm.has_accuracy else np.full(keep.shape, np.nan)
    t0, c0 = time.perf_counter(), time.process_time()
    chunks = range(0, len(keep), per)
    with progress_bar(progress, len(chunks) * rounds, label) as advance:
        for c in chunks:
            sp = stack(problem, keep[c:c + per])
            theta = sp.init_theta()
            theta, _ = Loop(sp).run(theta, sp.opt.init_state(theta), 0, rounds,
                                    on_round=lambda *_: advance())
            with torch.no_grad():
                lo, ac = node_losses(problem.fm, theta, problem.val_x, problem.val_y)
            R = sp.copies
            loss[c:c + R] = lo.double().reshape(R, n).numpy()
            if ac is not None:  # a loss without accuracy (mse) leaves NaN: no accuracy
                acc[c:c + R] = ac.double().reshape(R, n).numpy()
    return {"loss": loss, "acc": acc, "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0}


# ----------------------------------------------------------------------------- LOO


def leave_one_out(problem: Problem, rounds: int, *, nodes: Sequence[int] | None = None,
                  max_nodes: int = 1024, progress: bool = False) -> dict[str, Any]:
    """Leave-one-node-out for each of ``nodes`` (default all), batched with the factual network
    as copy 0. Per node ``j`` (axis ``node``): ``loo`` = mean test loss of the *other* nodes
    with ``j``'s data − without it (negative = helpful), ``loo_all`` the same over all nodes,
    ``loo_acc`` = their mean accuracy with − without (positive = helpful)."""
    n = problem.n
    nodes = list(range(n)) if nodes is None else [int(j) for j in nodes]
    keep = np.ones((1 + len(nodes), n), dtype=bool)
    for i, j in enumerate(nodes, start=1):
        keep[i, j] = False
    res = run_coalitions(problem, keep, rounds, max_nodes=max_nodes, progress=progress,
                         label="leave-one-node-out")
    L, A = res["loss"], res["acc"]
    others = ~np.eye(n, dtype=bool)[nodes]
    loo = np.array([(L[0, o].mean() - L[i, o].mean()) for i, o in enumerate(others, start=1)])
    acc = np.array([(A[0, o].mean() - A[i, o].mean()) for i, o in enumerate(others, start=1)])
    return {"nodes": nodes, "loo": loo, "loo_all": L[0].mean() - L[1:].mean(1),
            "loo_acc": acc, "factual_loss": L[0], "factual_acc": A[0],
            "seconds": float(res["seconds"]), "cpu_seconds": float(res["cpu_seconds"]),
            "retrainings": len(nodes),
            "networks_per_run": min(len(keep), max(1, max_nodes // n))}


# ----------------------------------------------------------------------------- Shapley

Utility = Callable[[np.ndarray], np.ndarray]  # bool (C, n) coalitions -> (C,) values


def network_utility(problem: Problem, rounds: int, *, max_nodes: int = 1024,
                    progress: bool = False) -> Utility:
    """``U(S)`` = mean test loss over all nodes after training with the data of ``S`` only."""
    def u(keep: np.ndarray) -> np.ndarray:
        return run_coalitions(problem, keep, rounds, max_nodes=max_nodes, progress=progress,
                              label=f"Shapley: {len(keep)} coalitions")["loss"].mean(1)

    return u


def shapley_exact(utility: Utility, n: int) -> np.ndarray:
    """Exact Shapley values ``φ_j = Σ_S |S|!(n−|S|−1)!/n! (U(S ∪ j) − U(S))`` from all
    ``2^n`` coalitions (evaluated in one call)."""
    if n > 16:
        raise ValueError(f"exact Shapley over n={n} players needs 2^{n} coalitions; use "
                         "the permutation sampler")
    masks = np.array(list(itertools.product([False, True], repeat=n)))[:, ::-1]
    vals = utility(masks)
    code = masks @ (1 << np.arange(n))
    val = np.empty(1 << n)
    val[code] = vals
    size = masks.sum(1)
    w = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n)
                  if s < n else 0.0 for s in range(n + 1)])
    phi = np.zeros(n)
    for j in range(n):
        without = ~masks[:, j]
        c = code[without]
        phi[j] = float((w[size[without]] * (val[c | (1 << j)] - val[c])).sum())
    return phi


def shapley_permutations(utility: Utility, n: int, permutations: int, *, seed: int = 0,
                         tolerance: float = 0.0) -> dict[str, Any]:
    """Permutation-sampling Shapley values (TMC-style), stratified: permutations come in blocks
    of ``2n``, the ``n`` cyclic shifts of one random order and of its reverse, so every player
    takes every position twice per block (the position, not the data, drives most of the
    variance) and every pair comes in both orders equally often. With ``tolerance > 0`` a permutation is truncated once ``|U(S) − U(N)|`` falls
    below ``tolerance · |U(∅) − U(N)|`` (later marginals taken as 0; evaluations then run in
    ``n`` position stages). Returns ``phi``, its standard error ``se`` (positions as strata:
    the spread of each player's marginals at the same position), ``evaluations`` (coalitions
    trained)."""
    if permutations < 1:
        raise ValueError(f"permutations={permutations} must be >= 1")
    rng = np.random.default_rng([int(seed), 0x5A9])
    blocks = math.ceil(permutations / (2 * n))
    perms = []
    for _ in range(blocks):
        base = rng.permutation(n)
        perms += [np.roll(b, s) for b in (base, base[::-1]) for s in range(n)]
    perms = np.array(perms[:permutations])
    M = len(perms)
    full = np.ones((1, n), dtype=bool)
    empty = np.zeros((1, n), dtype=bool)
    u_full, u_empty = utility(np.concatenate([full, empty]))
    prefix = np.zeros((M, n + 1))  # U(first i players of permutation m)
    prefix[:, 0], prefix[:, n] = u_empty, u_full
    cache: dict[bytes, float] = {full.tobytes(): u_full, empty.tobytes(): u_empty}
    masks = np.zeros((M, n + 1, n), dtype=bool)
    for m, p in enumerate(perms):
        for i in range(1, n + 1):
            masks[m, i] = masks[m, i - 1]
            masks[m, i, p[i - 1]] = True
    evaluations = 2

    def evaluate(pairs: list[tuple[int, int]]) -> None:
        nonlocal evaluations
        todo = {}
        for m, i in pairs:
            key = masks[m, i].tobytes()
            if key not in cache and key not in todo:
                todo[key] = masks[m, i]
        if todo:
            vals = utility(np.array(list(todo.values())))
            cache.update(zip(todo, vals.tolist(), strict=True))
            evaluations += len(todo)
        for m, i in pairs:
            prefix[m, i] = cache[masks[m, i].tobytes()]

    span = abs(u_empty - u_full)
    if tolerance <= 0:
        evaluate([(m, i) for m in range(M) for i in range(1, n)])
    else:
        live = np.ones(M, dtype=bool)
        for i in range(1, n):
            evaluate([(m, i) for m in np.flatnonzero(live)])
            done = live & (np.abs(prefix[:, i] - u_full) < tolerance * span)
            for m in np.flatnonzero(done):
                prefix[m, i + 1:] = prefix[m, i]  # truncated: later marginals 0
            live &= ~done
    marg = np.zeros((M, n))
    for m, p in enumerate(perms):
        marg[m, p] = np.diff(prefix[m])  # U(S ∪ j) − U(S): loss with j − without
    phi = marg.mean(0)
    se = _stratified_se(marg, perms)
    return {"phi": phi, "se": se, "permutations": M, "evaluations": evaluations,
            "tolerance": tolerance, "u_full": float(u_full), "u_empty": float(u_empty)}


def _stratified_se(marg: np.ndarray, perms: np.ndarray) -> np.ndarray:
    """Standard error of the mean marginal of each player with its positions as strata:
    ``se_j² = Σ_p s²_{jp} / (n_{jp} n²)`` (``s²_{jp}``: variance of player ``j``'s marginals at
    position ``p``); the plain standard error where a position was seen fewer than twice."""
    M, n = marg.shape
    pos = np.argsort(perms, axis=1)  # pos[m, j] = position of player j in order m
    se = np.zeros(n)
    for j in range(n):
        var = 0.0
        for p in range(n):
            x = marg[pos[:, j] == p, j]
            if len(x) < 2:
                return marg.std(0, ddof=1) / math.sqrt(M) if M > 1 else np.full(n, np.nan)
            var += x.var(ddof=1) / len(x)
        se[j] = math.sqrt(var) / n
    return se
