"""Switch the observers' fast paths off and on together, so benchmarks time both in one run.

The fast paths (each equal to its generic counterpart up to float rounding, tests in
``tests/test_fast_observers.py``): the built-in MLP's hand-written test-gradient pass
(:data:`dice_influence._mlp.FAST`) and Hessian-vector pass (:data:`dice_influence.influence.
pullback.FAST_MLP`), proximal dot products on the edges only
(:data:`dice_influence.influence.proximal.SPARSE_DOTS`) and the compiled edge kernel that also
takes the contribution sweep's row dots (:data:`dice_influence._edge_kernel.ENABLED`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def fast_paths(on: bool = True) -> Iterator[None]:
    """Within the block every fast path is ``on`` (True) or off (False); restored after."""
    from .. import _edge_kernel as K
    from .. import _mlp as M
    from ..influence import proximal as IP
    from ..influence import pullback as A

    flags = [(M, "FAST"), (A, "FAST_MLP"), (IP, "SPARSE_DOTS"), (K, "ENABLED")]
    saved = [getattr(mod, name) for mod, name in flags]
    try:
        for mod, name in flags:
            setattr(mod, name, bool(on))
        yield
    finally:
        for (mod, name), v in zip(flags, saved, strict=True):
            setattr(mod, name, v)
