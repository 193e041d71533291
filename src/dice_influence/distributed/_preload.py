"""Imported once by the launcher's fork server: loads torch, the package and the modules that
``torch.func`` imports lazily on first use, so that every forked peer starts warm."""

from __future__ import annotations

import sklearn.datasets  # noqa: F401 - digits loader
import torch
import torch.distributed  # noqa: F401
from torch.func import grad, vmap

from . import peer  # noqa: F401


def _warm() -> None:
    w = torch.zeros(2, 3)
    vmap(grad(lambda v: (v * v).sum()))(w)


_warm()
