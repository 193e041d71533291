"""Communication graphs and mixing matrices for decentralized SGD.

Convention (docs/method.md §1): ``W[k, j]`` is the weight that **receiver** ``k`` puts on **sender** ``j``.
Rows sum to 1 (row-stochastic), entries are ``>= 0``; matrices are float64 arrays of shape
``(n, n)``. The out-neighbours of ``j`` are ``{k != j : W[k, j] > 0}``; the in-neighbours of ``k``
are ``{j != k : W[k, j] > 0}``. In graph form an edge ``j -> k`` (sender -> receiver) exists when
``W[k, j] > 0``.

Static graphs come from :func:`mixing_matrix`, :func:`from_networkx` or :func:`from_matrix`;
time-varying ones are :class:`Schedule` objects whose ``W(t)`` is a pure function of ``t`` and the
schedule's seed.
"""

from __future__ import annotations

from ._common import TIME_VARYING, TOPOLOGIES, WEIGHTS, TopologyError, TopologyWarning
from .analysis import describe, reach_sets
from .graphs import from_networkx, mixing_matrix, to_networkx
from .plot import plot_topology
from .schedules import (
    OnePeerExponential,
    PermutedSchedule,
    RandomMatching,
    RecordedSchedule,
    Schedule,
    StaticSchedule,
    make_schedule,
)
from .validate import from_matrix, validate_mixing

__all__ = [
    "TOPOLOGIES",
    "TIME_VARYING",
    "WEIGHTS",
    "TopologyError",
    "TopologyWarning",
    "Schedule",
    "StaticSchedule",
    "OnePeerExponential",
    "RandomMatching",
    "PermutedSchedule",
    "RecordedSchedule",
    "mixing_matrix",
    "from_networkx",
    "to_networkx",
    "validate_mixing",
    "from_matrix",
    "make_schedule",
    "describe",
    "reach_sets",
    "plot_topology",
]
