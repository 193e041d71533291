"""Whole-run sample attribution: every training sample of every node, scored by one reverse
sweep over the entire run (docs/method.md §4, "whole-run attribution").

With the target fixed at the end of training ``T`` — all nodes' (``q``-weighted) mean test loss
(default), one node's test loss, or one test sample's loss averaged over the nodes — one sweep
from ``T`` back to round 0 gives the cotangent ``λ_j^t`` on every node's half step at every
round (the adjoint of DICE-E's factual read-out, curvature on, factual propagation). Removing
sample ``i`` of node ``j``'s batch at round ``t`` changes the half step by ``Δ`` with
``λ_j^{tᵀ} Δ = (1/B) c_jᵀ ∇ℓ_i(θ_j^t)`` (``c``: ``λ`` pulled back through the optimizer
update). **A sample drawn in several rounds gets the sum over its draws** (the first-order
value of removing it from every round it was drawn in); a sample never drawn scores 0.

Memory: the sweep keeps the parameters at segment boundaries (every ``segment`` rounds, the
run's checkpoints where it has them) and recomputes one segment's rounds at a time before
sweeping back through it: ``O(T/c + c)`` parameter vectors (times two under momentum). The
recomputation is the training code itself, so the sweep's bits do not depend on ``segment``.

Sign: score = target loss with the sample − without it; **positive = harmful**.

Error sources against exact replay (DICE-GT with the sample's weight zeroed in every round
that drew it): the linear (factual) read-out, ReLU kinks crossed by the perturbation, and the
second-order effect of one removal on later batches' gradients (small for one sample).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._util import atomic_path, atomic_write_text, progress_bar
from ..gossip import loss_grads
from .adjoint import _mix_T, _pullback, check_attributable
from .common import node_weights

WHOLE_RUN_TARGETS = ("mean", "node", "test_sample")
SIGN = "score = target loss with the sample - without it; positive = harmful"


@dataclass
class SampleScores:
    """Whole-run scores of every (real) training sample of every node; one row per sample.

    Columns (NumPy arrays of equal length): ``node``, ``position`` (row in the node's local
    data), ``dataset_index`` (train-split index), ``rounds_used`` (how many rounds drew it),
    ``score`` (summed over its draws; positive = harmful), ``label`` (the label trained on),
    ``corrupted`` (True where a configured corruption altered the sample). ``target`` names
    the read-out (``"mean"``, ``"node:K"``, ``"test_sample:I"``)."""

    node: np.ndarray
    position: np.ndarray
    dataset_index: np.ndarray
    rounds_used: np.ndarray
    score: np.ndarray
    label: np.ndarray
    corrupted: np.ndarray
    target: str
    rounds: int
    seconds: float = 0.0
    memory: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.score)

    def order(self, direction: str = "harmful") -> np.ndarray:
        """Row order: ``"harmful"`` = largest positive score first, ``"helpful"`` = most
        negative first (stable: ties keep table order)."""
        if direction not in ("harmful", "helpful"):
            raise ValueError(f"direction={direction!r}: choose 'harmful' (largest positive "
                             "score first) or 'helpful' (most negative first)")
        key = -self.score if direction == "harmful" else self.score
        return np.argsort(key, kind="stable")

    def top(self, k: int = 10, direction: str = "harmful") -> list[dict[str, Any]]:
        """The ``k`` most harmful (largest positive score) or, with ``direction="helpful"``,
        most helpful (most negative) samples of the whole network, as row dicts."""
        if k < 0:
            raise ValueError(f"k={k} must be >= 0")
        return [self.row(int(i)) for i in self.order(direction)[:k]]

    def row(self, i: int) -> dict[str, Any]:
        return {"node": int(self.node[i]), "position": int(self.position[i]),
                "dataset_index": int(self.dataset_index[i]),
                "rounds_used": int(self.rounds_used[i]), "score": float(self.score[i]),
                "label": int(self.label[i]), "corrupted": bool(self.corrupted[i])}

    def columns(self) -> dict[str, np.ndarray]:
        return {"node": self.node, "position": self.position,
                "dataset_index": self.dataset_index, "rounds_used": self.rounds_used,
                "score": self.score, "label": self.label, "corrupted": self.corrupted}

    def to_dataframe(self):
        """A pandas DataFrame, one row per sample (needs pandas)."""
        import pandas as pd

        return pd.DataFrame(self.columns())

    def to_csv(self, path: str | Path) -> Path:
        """Write the table as CSV (atomically); a ``# sign`` line is not added, the column
        ``score`` carries the sign convention of :data:`SIGN`."""
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = self.columns()
        w.writerow(cols)
        for i in range(len(self)):
            w.writerow([repr(float(v[i])) if v.dtype.kind == "f" else
                        (int(v[i]) if v.dtype.kind in "iu" else bool(v[i]))
                        for v in cols.values()])
        atomic_write_text(path, buf.getvalue())
        return Path(path)

    def save(self, path: str | Path) -> Path:
        """Write Parquet when ``path`` ends in ``.parquet`` (needs pyarrow), else CSV."""
        path = Path(path)
        if path.suffix == ".parquet":
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError(f"{path}: writing Parquet needs pyarrow (pip install pyarrow);"
                                 " or give a .csv path") from None
            with atomic_path(path) as tmp:
                self.to_dataframe().to_parquet(tmp, index=False)
            return path
        return self.to_csv(path)

    def matrix(self, n: int, m: int) -> np.ndarray:
        """Scores as an ``(n, m)`` node x position array (NaN where no sample)."""
        out = np.full((n, m), np.nan)
        out[self.node, self.position] = self.score
        return out


def attribute_run(
    traj: Any,
    *,
    target: str = "mean",
    node: int | None = None,
    test_index: int | None = None,
    q: str | Sequence[float] | None = "uniform",
    per_node_test: bool = False,
    segment: int | None = None,
    rounds: int | None = None,
    progress: bool = False,
) -> SampleScores:
    """Score every training sample of every node by its whole-run DICE-E effect on a target at
    the end of training (module docstring; positive = harmful).

    ``target``: ``"mean"`` (default; ``Σ_k q_k L(θ_k^T; z')``, uniform ``q`` = all nodes' mean
    test loss), ``"node"`` (``L(θ_node^T; z')``, needs ``node``) or ``"test_sample"`` (``Σ_k q_k
    ℓ(θ_k^T; z'_i)`` of shared test sample ``i = test_index``). ``per_node_test``: each node's
    own test split as ``z'`` (``"mean"`` / ``"node"`` only). ``segment``: rounds recomputed at
    a time (default: the run's ``checkpoint_every``); memory is ``O(T/segment + segment)``
    parameter vectors. ``rounds``: the run's first ``T`` rounds (default: all).
    A sample drawn in several rounds gets the sum over its draws."""
    check_attributable(traj)
    p = traj.problem
    T = traj.rounds_done if rounds is None else int(rounds)
    if not 1 <= T <= traj.rounds_done:
        raise ValueError(f"rounds={rounds}: the run has {traj.rounds_done} rounds; pick "
                         f"1..{traj.rounds_done}")
    c = int(segment or traj.checkpoint_every)
    if c < 1:
        raise ValueError(f"segment={segment}: give a positive number of rounds")
    start = time.perf_counter()
    a_th, label = _target_cotangent(p, traj.params_at(T)[0], target, node, test_index, q,
                                    per_node_test)
    n, m = p.n, p.node_data.max_size
    total = torch.zeros(n * m, dtype=torch.float64)
    used = torch.zeros(n * m, dtype=torch.int64)
    base = (torch.arange(n) * m)[:, None]
    # segment boundaries: the run's checkpoints are reused, the others computed forward once
    bounds = list(range(0, T, c)) + [T]
    held: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for b in bounds[:-1]:
        held[b] = traj.params_at(b)
    a_st = None if held[0][1] is None else torch.zeros_like(a_th)
    vec = _vec_bytes(held[0])
    peak = len(held)
    from ..loop import run_rounds

    with progress_bar(progress, T, "whole-run attribution") as advance:
        for s in range(len(bounds) - 2, -1, -1):
            b0, b1 = bounds[s], bounds[s + 1]
            seg = [held.pop(b0)]
            if b1 - 1 > b0:  # recompute θ^{b0+1..b1-1} with the training code itself
                run_rounds(p, *seg[0], b0, b1 - 1, on_round=_keeper(seg))
            peak = max(peak, len(held) + len(seg) + 1)
            for r in range(b1 - 1, b0 - 1, -1):
                th, st = seg.pop()
                lam = _mix_T(p, r, a_th)  # cotangent on θ^{r+½}; the state is not gossiped
                sc, a_th, a_st = _pullback(p, th, st, r, lam, a_st, want_scores=True,
                                           want_theta=r > 0)
                flat = (base + p.batches.indices(r)).reshape(-1)
                total.index_add_(0, flat, sc.reshape(-1).cpu())
                used.index_add_(0, flat, torch.ones_like(flat))
                advance()
    nd = p.node_data
    real = nd.mask.reshape(-1).cpu()
    k_idx, pos = torch.nonzero(nd.mask.cpu(), as_tuple=True)
    return SampleScores(
        node=k_idx.numpy(), position=pos.numpy(),
        dataset_index=nd.index.reshape(-1).cpu()[real].numpy(),
        rounds_used=used[real].numpy(), score=total[real].numpy(),
        label=nd.y.reshape(-1).cpu()[real].numpy(),
        corrupted=nd.corrupted.reshape(-1).cpu()[real].numpy(), target=label, rounds=T,
        seconds=time.perf_counter() - start,
        memory={"segment": c, "boundaries": len(bounds) - 1,
                "peak_parameter_sets": peak, "bytes_per_set": vec,
                "peak_bytes": peak * vec,
                "note": "a parameter set = theta (n, d) plus the optimizer state if any"})


def _keeper(seg: list) -> Any:
    def keep(t: int, th: torch.Tensor, st: torch.Tensor | None) -> None:
        seg.append((th.clone(), None if st is None else st.clone()))

    return keep


def _vec_bytes(ts: tuple[torch.Tensor, torch.Tensor | None]) -> int:
    th, st = ts
    return th.numel() * th.element_size() * (1 if st is None else 2)


def _target_cotangent(p: Any, theta_T: torch.Tensor, target: str, node: int | None,
                      test_index: int | None, q: Any, per_node_test: bool
                      ) -> tuple[torch.Tensor, str]:
    """Gradient of the target w.r.t. ``θ^T`` (n, d) and the target's name."""
    if target not in WHOLE_RUN_TARGETS:
        raise ValueError(f"target={target!r}; choose one of {WHOLE_RUN_TARGETS}")
    n = p.n
    qv = node_weights(n, q).to(p.dtype).to(theta_T.device)
    if target == "test_sample":
        if per_node_test:
            raise ValueError("target='test_sample' reads one sample of the shared test set; "
                             "drop per_node_test")
        N = p.val_y.shape[0]
        if test_index is None or isinstance(test_index, bool) or not 0 <= int(test_index) < N:
            raise ValueError(f"test_index={test_index!r}: give a shared test sample 0..{N - 1}")
        i = int(test_index)
        with torch.no_grad():
            g = loss_grads(p.fm, theta_T, p.val_x[i : i + 1], p.val_y[i : i + 1])[1]
        return qv[:, None] * g, f"test_sample:{i}"
    x, y = p.test_set(per_node_test)
    with torch.no_grad():
        g = loss_grads(p.fm, theta_T, x, y)[1]
    if target == "mean":
        return qv[:, None] * g, "mean"
    if node is None or isinstance(node, bool) or not 0 <= int(node) < n:
        raise ValueError(f"node={node!r}: target='node' needs a node id 0..{n - 1}")
    a = torch.zeros_like(g)
    a[int(node)] = g[int(node)]
    return a, f"node:{int(node)}"


def replay_without(traj: Any, remove: torch.Tensor, reduce: Any = None, *,
                   rounds: int | None = None, chunk: int = 32, progress: bool = False,
                   label: str = "replay", renormalize: bool = False) -> list[Any]:
    """Exact replays of the run with chosen samples removed from every round that draws them
    (weight 0 in the batch loss, denominator kept: docs/method.md §3), everything else
    identical. ``remove``: bool ``(R, n, m)`` over removal x node x local position, or floats
    in ``[0, 1]``: the share of each sample's weight removed. Replays
    ``chunk`` removals at a time, each chunk together with the factual run (row 0 of the
    chunk, so that its differences are exact), and returns ``[reduce(θ^T) for each chunk]``
    where ``θ^T`` is ``(1 + chunk size, n, d)`` (``reduce=None`` keeps it).

    ``renormalize=True`` is retraining without the samples instead: the batch loss is the mean
    over the samples a batch keeps (weights ``B / kept``), so the step size does not shrink
    with the data removed; a batch that keeps nothing contributes no gradient. (DICE-GT keeps
    the denominator; retraining on the cleaned data does not.)"""
    from .ground_truth import batched_local_step

    check_attributable(traj)
    p = traj.problem
    T = traj.rounds_done if rounds is None else int(rounds)
    n, m = p.n, p.node_data.max_size
    remove = torch.as_tensor(remove)
    if remove.dtype != torch.bool:  # a share of each sample's weight removed
        if remove.numel() and not (0 <= float(remove.min()) and float(remove.max()) <= 1):
            raise ValueError("remove holds shares of sample weights; they must lie in [0, 1]")
    if remove.ndim != 3 or tuple(remove.shape[1:]) != (n, m):
        raise ValueError(f"remove has shape {tuple(remove.shape)}; need (R, {n}, {m}) "
                         "(removals x nodes x local positions)")
    theta0, state0 = traj.params_at(0)
    R = remove.shape[0]
    out = []
    with progress_bar(progress, -(-R // chunk) * T, label) as advance, torch.no_grad():
        for c0 in range(0, R, chunk):
            rm = remove[c0 : c0 + chunk].to(p.device)
            K = rm.shape[0] + 1
            keep = torch.cat([torch.ones(1, n, m, dtype=p.dtype, device=p.device),
                              1 - rm.to(p.dtype)])
            theta = theta0.expand(K, *theta0.shape).clone()
            state = None if state0 is None else state0.expand(K, *state0.shape).clone()
            for t in range(T):
                idx = p.batches.indices(t).to(p.device)
                w = torch.gather(keep, 2, idx.expand(K, *idx.shape))
                if renormalize:
                    w = w * (w.shape[-1] / w.sum(-1, keepdim=True).clamp(min=1.0))
                half, state = batched_local_step(p, theta, state, t, w)
                theta = p.mixer(t)(half)
                advance()
            out.append(theta if reduce is None else reduce(theta))
    return out


def target_losses(traj: Any, thetas: torch.Tensor, *, target: str = "mean",
                  node: int | None = None, test_index: int | None = None,
                  q: str | Sequence[float] | None = "uniform",
                  per_node_test: bool = False) -> torch.Tensor:
    """The whole-run target (see :func:`attribute_run`) of stacked networks ``(R, n, d)``."""
    from .ground_truth import test_losses

    p = traj.problem
    if target not in WHOLE_RUN_TARGETS:
        raise ValueError(f"target={target!r}; choose one of {WHOLE_RUN_TARGETS}")
    qv = node_weights(p.n, q).to(torch.float64)
    if target == "test_sample":
        R, n, d = thetas.shape
        from ..gossip import node_losses

        i = int(test_index)  # type: ignore[arg-type]
        with torch.no_grad():
            ls = node_losses(p.fm, thetas.reshape(R * n, d), p.val_x[i : i + 1],
                             p.val_y[i : i + 1])[0].reshape(R, n).double()
        return (ls * qv).sum(-1)
    ls = test_losses(p, thetas, per_node_test).double()
    if target == "node":
        return ls[:, int(node)]  # type: ignore[arg-type]
    return (ls * qv).sum(-1)


def whole_run_ground_truth(traj: Any, samples: Sequence[tuple[int, int]], *,
                           target: str = "mean", node: int | None = None,
                           test_index: int | None = None,
                           q: str | Sequence[float] | None = "uniform",
                           per_node_test: bool = False, chunk: int = 32, share: float = 1.0,
                           progress: bool = False) -> np.ndarray:
    """Whole-run DICE-GT of each single sample ``(node, position)``: the target with it minus
    the target after an exact replay with the sample removed from every round that drew it
    (positive = harmful), batched ``chunk`` replays at a time. ``share < 1`` removes only
    that share of the sample's weight (the result divided by ``share`` tends to the sweep's
    first-order score as ``share -> 0`` when the run is smooth)."""
    if not 0 < share <= 1:
        raise ValueError(f"share={share}: give the share of the sample's weight to remove, "
                         "in (0, 1]")
    p = traj.problem
    n, m = p.n, p.node_data.max_size
    remove = torch.zeros(len(samples), n, m, dtype=p.dtype)
    for i, (k, pos) in enumerate(samples):
        if not (0 <= int(k) < n and 0 <= int(pos) < int(p.node_data.sizes[int(k)])):
            raise ValueError(f"sample {(k, pos)}: need node 0..{n - 1} and a position inside "
                             "that node's local data")
        remove[i, int(k), int(pos)] = share
    def diff(th: torch.Tensor) -> torch.Tensor:
        L = target_losses(traj, th, target=target, node=node, test_index=test_index, q=q,
                          per_node_test=per_node_test)
        return L[0] - L[1:]

    parts = replay_without(traj, remove, diff, chunk=chunk, progress=progress,
                           label="whole-run GT")
    return torch.cat(parts).numpy()
