"""Malicious-neighbour detection from proximal influence (docs/method.md §6), decided locally by each node.

Every rule maps a score matrix ``S`` (n, n) — ``S[k, j]`` = receiver ``k``'s accumulated
proximal influence of sender ``j`` (positive = harmful) — and the edge mask ``E[k, j]``
(``j`` is an in-neighbour of ``k``) to flags ``F[k, j]``. A receiver only looks at its own row,
so every decision is local: no central authority.

Rules:

- ``sign``: flag ``S[k, j] > 0`` — ``j``'s updates raised ``k``'s test loss in total.
- ``zscore``: robust z-score among ``k``'s in-neighbours,
  ``z = (S[k, j] − median_k) / (1.4826·MAD_k)``, flag ``z > z_threshold`` (one-sided: harmful).
- ``sign_and_zscore``: both (fewer false alarms when honest neighbours drift positive).
- ``sign_or_zscore``: either.

Scores for ranking (AUROC) are scale-free per receiver: ``S[k, j] / median_j |S[k, j]|``.
Metrics compare flags with the known attackers: edge level (honest receivers, every in-edge) and
node level (a node is flagged when a majority of its honest out-neighbours flag it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

RULES = ("sign", "zscore", "sign_and_zscore", "sign_or_zscore")
MAD_SCALE = 1.4826


def _masked(S: np.ndarray, E: np.ndarray) -> np.ndarray:
    return np.where(E, S, np.nan)


def robust_z(S: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Per-receiver robust z-scores of the in-neighbours' scores (NaN off the edges).

    ``+inf`` scores (non-finite updates) get ``z = +inf``; a receiver whose neighbours all score
    alike (MAD = 0) uses a scale floor of 1e-12·max|S|."""
    M = _masked(np.where(np.isinf(S), np.nan, S), E)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(M, axis=1, keepdims=True)
        mad = MAD_SCALE * np.nanmedian(np.abs(M - med), axis=1, keepdims=True)
        floor = 1e-12 * np.nanmax(np.abs(M), axis=1, keepdims=True)
        scale = np.fmax(np.nan_to_num(mad, nan=0.0), np.nan_to_num(floor, nan=0.0)) + 1e-300
        z = (S - np.nan_to_num(med)) / scale
    z = np.where(np.isinf(S) & (S > 0), np.inf, z)
    return np.where(E, z, np.nan)


def flags(
    S: np.ndarray, E: np.ndarray, rule: str = "sign", z_threshold: float = 3.0, margin: float = 0.0
) -> np.ndarray:
    """Boolean flags ``F[k, j]`` (only on edges) for the given rule (see module docstring).
    ``margin`` raises the sign rule's threshold to ``S > margin``."""
    if rule not in RULES:
        raise ValueError(f"unknown detection rule {rule!r}; choose one of {', '.join(RULES)}")
    pos = S > margin
    if rule == "sign":
        out = pos
    else:
        with np.errstate(invalid="ignore"):
            zf = np.nan_to_num(robust_z(S, E), nan=-np.inf) > z_threshold
        out = zf if rule == "zscore" else (pos & zf if rule == "sign_and_zscore" else pos | zf)
    return out & E


def normalized_scores(S: np.ndarray, E: np.ndarray) -> np.ndarray:
    """Scale-free ranking score per edge: ``S[k, j] / median_j |S[k, j]|`` (NaN off edges;
    ``+inf`` stays ``+inf``)."""
    M = _masked(np.where(np.isinf(S), np.nan, S), E)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scale = np.nanmedian(np.abs(M), axis=1, keepdims=True)
        out = S / (np.nan_to_num(scale, nan=1.0) + 1e-300)
    return np.where(E, out, np.nan)


# ------------------------------------------------------------------------------------ metrics


def auroc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney, ties count ½); NaN if a class is empty.
    Higher score = more likely positive (malicious)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf, posinf=np.finfo(float).max)
    y = np.asarray(labels, dtype=bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    ss = s[order]
    i = 0
    while i < len(ss):  # average ranks over ties
        j = i
        while j + 1 < len(ss) and ss[j + 1] == ss[i]:
            j += 1
        ranks[order[i : j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) over all thresholds, from (0, 0) to (1, 1)."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    y = np.asarray(labels, dtype=bool)
    order = np.argsort(-s, kind="mergesort")
    ys, ss = y[order], s[order]
    tp, fp = np.cumsum(ys), np.cumsum(~ys)
    keep = np.r_[np.flatnonzero(np.diff(ss)), len(ss) - 1] if len(ss) else np.array([], int)
    tpr = np.r_[0.0, tp[keep] / max(1, y.sum())]
    fpr = np.r_[0.0, fp[keep] / max(1, (~y).sum())]
    return fpr, tpr


def prf(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 (precision = 1 when nothing is flagged, recall = 1 when there is
    nothing to find)."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp = int((pred & truth).sum())
    fp = int((pred & ~truth).sum())
    fn = int((~pred & truth).sum())
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f, "tp": tp, "fp": fp, "fn": fn}


def edge_sets(E: np.ndarray, malicious: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges judged (honest receivers' in-edges) and which of them come from attackers."""
    judged = E & ~malicious[:, None]
    bad = judged & malicious[None, :]
    return judged, bad


def node_flags(F: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """A sender is flagged when more than half of its judging out-neighbours flag it."""
    votes = (F & judged).sum(0)
    voters = judged.sum(0)
    return (voters > 0) & (2 * votes > voters)


def node_scores(S: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """Node ranking score: mean over judging out-neighbours of the normalized edge score."""
    N = normalized_scores(S, judged)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        N = np.where(np.isposinf(N), 1e300, N)
        return np.nanmean(np.where(judged, N, np.nan), axis=0)


def evaluate(
    S: np.ndarray,
    E: np.ndarray,
    malicious: np.ndarray,
    *,
    rule: str = "sign",
    z_threshold: float = 3.0,
    margin: float = 0.0,
) -> dict[str, Any]:
    """Detection metrics of one score matrix against the known attackers (``malicious`` (n,)
    bool). Edge level over honest receivers' in-edges; node level by majority vote."""
    judged, bad = edge_sets(E, malicious)
    F = flags(S, E, rule, z_threshold, margin)
    e = prf(F[judged], bad[judged])
    ns = node_scores(S, judged)
    has_voters = judged.sum(0) > 0
    nf = node_flags(F, judged)
    nd = prf(nf[has_voters], malicious[has_voters])
    honest_edges = judged & ~bad
    return {
        "auroc_edge": auroc(normalized_scores(S, E)[judged], bad[judged]),
        "auroc_node": auroc(ns[has_voters], malicious[has_voters]),
        "precision": e["precision"],
        "recall": e["recall"],
        "f1": e["f1"],
        "node_precision": nd["precision"],
        "node_recall": nd["recall"],
        "node_f1": nd["f1"],
        "honest_edges_flagged": float(F[honest_edges].mean()) if honest_edges.any() else 0.0,
        "malicious_edges_flagged": float(F[bad].mean()) if bad.any() else float("nan"),
        "caught": [int(k) for k in np.flatnonzero(nf)],
    }


def over_rounds(
    increments: np.ndarray,
    rounds: Sequence[int],
    E: np.ndarray,
    malicious: np.ndarray,
    *,
    rule: str = "sign",
    z_threshold: float = 3.0,
    margin: float = 0.0,
    window: int | None = None,
) -> list[dict[str, Any]]:
    """Detection metrics at every recorded round from per-round increments (R, n, n).

    ``window`` = None uses cumulative sums, else the sum of the last ``window`` records. Each
    entry's ``round`` is the number of rounds trained when the decision is taken (round
    index + 1; with the ``pre`` read-out a node decides before mixing in that round)."""
    cum = np.cumsum(increments.astype(np.float64), axis=0)
    out = []
    for i, t in enumerate(rounds):
        S = cum[i] if window is None or i < window else cum[i] - cum[i - window]
        m = evaluate(S, E, malicious, rule=rule, z_threshold=z_threshold, margin=margin)
        m.pop("caught")
        out.append({"round": int(t) + 1, **m})
    return out


def summarize_rounds(
    series: list[dict[str, Any]], *, from_round: int = 3, to_round: int = 100
) -> dict[str, Any]:
    """Worst precision / recall over checks in ``[from_round, to_round]`` and the first round
    at which ≥ 90 % of malicious edges are flagged (None if never)."""
    sel = [r for r in series if from_round <= r["round"] <= to_round]
    r90 = next((r["round"] for r in series if r["malicious_edges_flagged"] >= 0.9), None)
    if not sel:
        return {"rounds_to_90pct": r90}
    return {
        "rounds_to_90pct": r90,
        "min_precision": min(r["precision"] for r in sel),
        "min_recall": min(r["recall"] for r in sel),
        "min_auroc_edge": float(np.nanmin([r["auroc_edge"] for r in sel])),
        "max_honest_edges_flagged": max(r["honest_edges_flagged"] for r in sel),
        "checks": [from_round, min(to_round, sel[-1]["round"])],
    }
