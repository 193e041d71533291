"""Every node's mini-batch positions of a round in one compiled call (optional: needs numba).

:class:`~dice_influence.data.nodes.BatchSchedule` draws node ``k``'s epoch ``e`` as
``numpy.random.default_rng([seed, k, e]).permutation(size_k)``. Building one NumPy generator per
node costs about 18 µs, 18 ms a round at 1,024 nodes (each round a new epoch there). This module
computes **the same permutations, bit for bit**, for all nodes at once: NumPy's ``SeedSequence``
mixing of ``[seed, k, e]``, the PCG64 (XSL-RR 128/64) seeding and its 32-bit draws, and
``Generator.shuffle``'s Fisher-Yates with bounded masked rejection, written out in numba.
``tests/test_data.py`` checks it against NumPy. Without numba (or with ``DICE_NO_NUMBA=1``), or
for seeds / epochs of 2**32 and more, the caller uses NumPy itself.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

LIMIT = 1 << 32  # SeedSequence splits larger integers into several words: NumPy then


@lru_cache(maxsize=1)
def _compiled() -> tuple[Callable, Callable] | None:
    from ._kernels import numba_module

    if numba_module() is None:
        return None
    from ._perm_numba import batch_rows, permutation

    return batch_rows, permutation


def batch_rows(seed: int, sizes: np.ndarray, per_epoch: np.ndarray, t: int,
               batch_size: int) -> np.ndarray | None:
    """``(n, batch_size)`` int64 positions of round ``t`` (module docstring), or None where
    the compiled path does not apply (no numba, or ``seed`` / an epoch / ``n`` >= 2**32)."""
    fns = _compiled()
    n = sizes.shape[0]
    if fns is None or seed >= LIMIT or n >= LIMIT or t // int(per_epoch.min()) >= LIMIT:
        return None
    out = np.empty((n, batch_size), dtype=np.int64)
    fns[0](seed, sizes, per_epoch, t, batch_size, out, np.empty(int(sizes.max()), np.int64))
    return out


def permutation(seed: int, k: int, e: int, m: int) -> np.ndarray | None:
    """``default_rng([seed, k, e]).permutation(m)`` computed here (for tests), or None."""
    fns = _compiled()
    if fns is None or max(seed, k, e) >= LIMIT:
        return None
    out = np.empty(m, dtype=np.int64)
    fns[1](seed, k, e, m, out)
    return out
