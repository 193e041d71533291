"""Dot products on the edges of a graph only: ``s_e = a[rows[e]] · b[cols[e]]`` (optional: numba).

Proximal influence needs ``G_k · u_j`` for the in-neighbours ``j`` of every receiver ``k``, a few
entries per row of the (n, n) product ``G Uᵀ``; the dense product costs ``n / degree`` times the
needed arithmetic (50 nodes of degree 6: 7×). The compiled kernel takes each edge's dot product
in float64 (products and sum; a vectorized reduction), edges in row order so a receiver's row
stays in cache (measured: column blocking was slower; the kernel is bound by memory traffic). Without numba (or with
``DICE_NO_NUMBA=1``) :func:`edge_dots` returns None and callers use the dense product.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np
import torch

from ._kernels import _plain, numba_module

ENABLED = True
"""Use the compiled kernel when available (benchmarks switch it off to compare)."""


@lru_cache(maxsize=1)
def _compiled() -> Callable | None:
    nb = numba_module()
    if nb is None:
        return None

    @nb.njit(cache=True, nogil=True, fastmath={"reassoc", "contract", "nsz"})  # NaN/inf kept
    def dots(a, b, rows, cols, out):  # pragma: no cover - compiled
        for e in range(rows.shape[0]):
            ar = a[rows[e]]  # 1-d rows: the reduction vectorizes
            br = b[cols[e]]
            acc = 0.0
            for c in range(ar.shape[0]):
                acc += np.float64(ar[c]) * np.float64(br[c])
            out[e] = acc

    return dots


def edge_dots(a: torch.Tensor, b: torch.Tensor, rows: np.ndarray, cols: np.ndarray
              ) -> torch.Tensor | None:
    """``a[rows[e]] · b[cols[e]]`` for every edge ``e`` as a float64 tensor ``(E,)``, or None
    when the compiled kernel is unavailable or the inputs are not plain contiguous CPU float
    matrices of one dtype (the caller then takes the dense product)."""
    fn = _compiled() if ENABLED else None
    if fn is None or a.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0 \
            or a.dtype != b.dtype:
        return None
    if not all(_plain(t) and not t.requires_grad for t in (a, b)):
        return None
    out = np.empty(len(rows), dtype=np.float64)
    fn(a.numpy(), b.numpy(), np.ascontiguousarray(rows, dtype=np.int64),
       np.ascontiguousarray(cols, dtype=np.int64), out)
    return torch.from_numpy(out)
