"""A compiled sparse gossip product for the training loop (optional: needs numba).

``out = W @ theta`` for a sparse ``W`` (CSR) and a dense ``theta`` of shape ``(n, d)``: the
columns are cut into cache-sized blocks shared out over threads, and each receiver's row is the
weighted sum of its senders' rows, in CSR order. Only non-zero weights touch a sender (a
non-finite non-neighbour leaks nothing), exactly like the torch fallback. Memory traffic is one
read of ``theta`` and one write of ``out``, against several passes (and a slow kernel) for
torch's CSR product on column slices. Set ``DICE_NO_NUMBA=1`` to use the torch fallback.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numpy as np
import torch

BLOCK = 1024  # columns per block (measured: 1024 beats 256 and 4096 at n = 1024, d = 109k)


def numba_module() -> Any:
    """The ``numba`` module, or None when it is not installed or switched off with
    ``DICE_NO_NUMBA=1`` (every compiled kernel of the project asks here)."""
    if os.environ.get("DICE_NO_NUMBA"):
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


@lru_cache(maxsize=1)
def _compiled() -> Callable | None:
    nb = numba_module()
    if nb is None:
        return None

    @nb.njit(parallel=True, cache=True, nogil=True)
    def spmm(indptr, indices, vals, x, out, bw):  # pragma: no cover - compiled
        n = out.shape[0]
        d = x.shape[1]
        nblk = (d + bw - 1) // bw
        for b in nb.prange(nblk):
            c0 = b * bw
            c1 = min(c0 + bw, d)
            m = c1 - c0
            for k in range(n):
                p0 = indptr[k]
                p1 = indptr[k + 1]
                o = out[k, c0:c1]  # 1-d slices: the inner loops vectorize (2-d indexing did not)
                if p1 == p0:
                    o[:] = 0.0
                    continue
                # senders four at a time, summed in CSR order exactly as one at a time would
                # (same roundings, same bits) with a quarter of the passes over ``o``
                x0 = x[indices[p0], c0:c1]
                w0 = vals[p0]
                p = p0 + 1
                if p + 3 <= p1:
                    x1, x2 = x[indices[p], c0:c1], x[indices[p + 1], c0:c1]
                    x3 = x[indices[p + 2], c0:c1]
                    w1, w2, w3 = vals[p], vals[p + 1], vals[p + 2]
                    for c in range(m):
                        o[c] = ((w0 * x0[c] + w1 * x1[c]) + w2 * x2[c]) + w3 * x3[c]
                    p += 3
                else:
                    for c in range(m):
                        o[c] = w0 * x0[c]
                while p + 4 <= p1:
                    x0, x1 = x[indices[p], c0:c1], x[indices[p + 1], c0:c1]
                    x2, x3 = x[indices[p + 2], c0:c1], x[indices[p + 3], c0:c1]
                    w0, w1, w2, w3 = vals[p], vals[p + 1], vals[p + 2], vals[p + 3]
                    for c in range(m):
                        o[c] = (((o[c] + w0 * x0[c]) + w1 * x1[c]) + w2 * x2[c]) + w3 * x3[c]
                    p += 4
                while p < p1:
                    x0 = x[indices[p], c0:c1]
                    w0 = vals[p]
                    for c in range(m):
                        o[c] += w0 * x0[c]
                    p += 1

    return spmm


def _plain(t: torch.Tensor) -> bool:
    """A CPU tensor that autograd / torch.func do not track (safe to hand to compiled code)."""
    if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in (torch.float32,
                                                                           torch.float64):
        return False
    if t.requires_grad and torch.is_grad_enabled():
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def run_parallel(fn: Callable, *args: Any) -> None:
    """Call the parallel compiled kernel ``fn(*args)`` on torch's intra-op thread count (not
    numba's default of every core), and give torch that count back afterwards: numba's OpenMP
    start-up, on a first parallel call, sets the process's count to every core."""
    from ._threads import sync_numba

    k = torch.get_num_threads()
    sync_numba(k)
    fn(*args)
    if torch.get_num_threads() != k:
        torch.set_num_threads(k)


def csr_kernel(csr: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], bool] | None:
    """A function ``(theta, out) -> bool`` computing ``out = W @ theta`` with the compiled
    kernel (True), or declining (False: the caller falls back to torch). None without numba."""
    fn = _compiled()
    if fn is None:
        return None
    indptr = csr.crow_indices().cpu().numpy().astype(np.int64)
    indices = csr.col_indices().cpu().numpy().astype(np.int64)
    vals = {torch.float32: csr.values().cpu().numpy().astype(np.float32),
            torch.float64: csr.values().cpu().numpy().astype(np.float64)}

    def run(theta: torch.Tensor, out: torch.Tensor) -> bool:
        if theta.ndim != 2 or out.shape != theta.shape or out.dtype != theta.dtype \
                or not (_plain(theta) and _plain(out)) or out.data_ptr() == theta.data_ptr():
            return False
        run_parallel(fn, indptr, indices, vals[theta.dtype], theta.numpy(), out.numpy(), BLOCK)
        return True

    return run
