"""Validation of mixing matrices (rows = receivers, columns = senders)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ._common import (
    _CONNECTIVITY,
    _CONVENTION,
    TopologyError,
    TopologyWarning,
    _fmt,
    _strong_components,
)


def validate_mixing(W: Any, *, tol: float = 1e-6, connectivity: str = "error") -> np.ndarray:
    """Check that ``W`` is a valid mixing matrix and return it as a float64 copy.

    Checks: 2-D square (n >= 1), finite, non-negative, every row sums to 1 within ``tol``, and
    (``connectivity`` in ``{"error", "warn", "ignore"}``) that the directed graph ``j -> k`` for
    ``W[k, j] > 0`` is strongly connected. Raises :class:`TopologyError`.
    """
    if connectivity not in _CONNECTIVITY:
        raise TopologyError(f"connectivity={connectivity!r} is not one of {list(_CONNECTIVITY)}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise TopologyError(f"tol must be a finite number >= 0, got {tol!r}")
    try:
        w = np.array(W, dtype=np.float64, copy=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TopologyError(
            f"W could not be converted to a float array ({exc}); pass an (n, n) array where "
            f"{_CONVENTION}"
        ) from None
    if w.ndim != 2:
        raise TopologyError(f"W must be a 2-D (n, n) array, got shape {w.shape}; {_CONVENTION}")
    if w.shape[0] != w.shape[1]:
        raise TopologyError(
            f"W must be square (n, n), got shape {w.shape}; {_CONVENTION}, so both axes index "
            "the same n nodes"
        )
    if w.shape[0] == 0:
        raise TopologyError("W is empty (shape (0, 0)); a network needs at least one node")
    bad = ~np.isfinite(w)
    if bad.any():
        k, j = (int(x[0]) for x in np.nonzero(bad))
        raise TopologyError(
            f"W[{k}, {j}] is {w[k, j]} ({int(bad.sum())} non-finite entries); entries must be "
            "finite: replace NaN/inf before use"
        )
    neg = w < 0
    if neg.any():
        k, j = (int(x[0]) for x in np.nonzero(neg))
        raise TopologyError(
            f"W[{k}, {j}] = {_fmt(w[k, j])} is negative ({int(neg.sum())} negative entries); "
            f"entries must be >= 0: {_CONVENTION}; clip negatives to 0 and renormalise the row"
        )
    sums = w.sum(axis=1)
    off = np.abs(sums - 1.0) > tol
    if off.any():
        k = int(np.argmax(off))
        more = f"; {int(off.sum()) - 1} other rows are off too" if off.sum() > 1 else ""
        hint = ""
        if np.all(np.abs(w.sum(axis=0) - 1.0) <= tol):
            hint = "; its columns sum to 1, so this looks like the transpose: pass W.T"
        raise TopologyError(
            f"row {k} of W sums to {_fmt(sums[k])} (must be 1 within {tol:g}{more}): "
            f"{_CONVENTION}; normalise each row{hint}"
        )
    if connectivity != "ignore" and w.shape[0] > 1:
        ncomp, labels = _strong_components(w)
        if ncomp > 1:
            groups = [np.flatnonzero(labels == c).tolist() for c in range(min(ncomp, 3))]
            shown = ", ".join(str(g[:8]) + ("..." if len(g) > 8 else "") for g in groups)
            msg = (
                f"W is not strongly connected: the directed graph (edge j -> k when W[k, j] > 0) "
                f"has {ncomp} strongly connected components (e.g. {shown}), so some nodes' "
                "updates never reach others; add edges, or pass connectivity='warn' or 'ignore' "
                "to accept it"
            )
            if connectivity == "error":
                raise TopologyError(msg)
            warnings.warn(msg, TopologyWarning, stacklevel=2)
    return w


def from_matrix(W: Any, *, connectivity: str = "error") -> np.ndarray:
    """Validate a user-supplied mixing matrix (same as :func:`validate_mixing`)."""
    return validate_mixing(W, connectivity=connectivity)
