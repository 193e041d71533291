"""How many intra-op (OpenMP) threads torch uses: one rule for every entry point.

On the smallest runs of this project (the demo, the digits experiments: per-round work of
1e6-4e6) a second thread buys at most 4 % on a quiet machine, and it costs a lot where the
cores are shared: a parallel region waits for its slowest thread, and a thread that shares its
core with another job runs at a fraction of the speed. From about 1e7 it pays on idle cores
(plain training of the Fashion-MNIST MLP on 8 / 16 / 32 / 50 nodes, 1.3e7-8.1e7: 1.31x / 1.35x /
1.68x / 1.66x faster with two; measured with ``run_rounds`` after numba's thread reset was
fixed, which had made earlier "one thread" timings run on two). So the rule
(:func:`choose_threads`) is:

1. an explicit count wins: ``--threads`` on the command line (:func:`request`), then
   ``threads=`` (``train.threads`` in a config), then the environment's ``OMP_NUM_THREADS``;
2. otherwise (``auto``) one thread, unless the per-round work is large (``n x d x (B + T)`` >=
   ``WORK_PER_EXTRA_THREAD``; ``T`` = test samples whose gradients an observer takes every round,
   0 for plain training) **and** at least two cores are idle right now; then one thread per idle
   core, at most ``1 + work / WORK_PER_EXTRA_THREAD``. Idle cores are measured over
   ``SAMPLE_S`` from the per-core counters in ``/proc/stat`` (the cores this process may use),
   not from the 1-minute load average, which lags: a command started right after another one
   would still see the previous command's load. Without ``/proc/stat``: cores minus the load
   average.

:func:`use_threads` applies the rule (``torch.set_num_threads``, and numba's thread count for
the compiled gossip kernel, whose OpenMP start-up would otherwise reset torch's count) and
remembers the decision, which :func:`decision` returns for the run directory (``metrics.json``
key ``threads``). :func:`quiet_openmp` asks OpenMP threads to sleep rather than spin while
waiting; it only works before torch is imported (the ``dice`` command calls it first thing).
Peers of a local peer-to-peer run use one thread each (``n`` peers share the cores) through the
same function.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

WORK_PER_EXTRA_THREAD = 1.0e7
"""Per-round work (``n × d × (B + T)``) from which a second thread is considered: plain training
of the 8-node Fashion-MNIST MLP (784-64-10) is 1.3e7 (1.31x faster with two threads on an idle
2-core machine), 50 nodes 8.1e7 (1.66x), the 256-node benchmark run 1.8e9; below it: the demo
6e5, the alignment experiment 4e6, the contribution experiment 1e6 (+ its test gradients)."""

SAMPLE_S = 0.1
"""Seconds over which idle cores are measured (only for work above the threshold)."""

CACHE_S = 10.0
"""A measurement of idle cores is reused this long (a process builds many problems)."""

_request: int | None = None
_last: dict[str, Any] = {"threads": None, "source": "not chosen yet"}


def request(threads: int | None) -> None:
    """Remember a process-wide explicit count (the ``--threads`` option); None = no request."""
    global _request
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: use a count >= 1 (or leave it out for the "
                         "automatic rule)")
    _request = threads


def child_env() -> dict[str, str]:
    """A copy of this process's environment for a child Python process, carrying an explicit
    ``--threads`` request as ``OMP_NUM_THREADS`` (a child does not see this module's state)."""
    env = os.environ.copy()
    if _request is not None:
        env["OMP_NUM_THREADS"] = str(_request)
    return env


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _cpu_ticks() -> dict[int, tuple[int, int]] | None:
    """Per usable core: (idle ticks incl. iowait, total ticks) from ``/proc/stat``."""
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover
        allowed = None
    out = {}
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu") or line.startswith("cpu "):
                    continue
                name, *vals = line.split()
                k = int(name[3:])
                if allowed is not None and k not in allowed:
                    continue
                v = [int(x) for x in vals[:8]]
                out[k] = (v[3] + v[4], sum(v))
    except (OSError, ValueError):
        return None
    return out or None


_measured: tuple[float, float] | None = None  # (when, idle cores)


def idle_cores(interval: float = SAMPLE_S) -> float:
    """Cores (of those this process may use) idle over the next ``interval`` seconds, from the
    per-core counters of ``/proc/stat`` (this process sleeps meanwhile, so its own use does not
    count); reused for ``CACHE_S``. Fallback: cores minus the 1-minute load average."""
    global _measured
    now = time.monotonic()
    if _measured is not None and now - _measured[0] < CACHE_S:
        return _measured[1]
    a = _cpu_ticks()
    if a is not None:
        time.sleep(interval)
        b = _cpu_ticks()
    if a is not None and b is not None:
        idle = 0.0
        for k, (i1, t1) in b.items():
            if k in a and t1 > a[k][1]:
                idle += (i1 - a[k][0]) / (t1 - a[k][1])
            elif k in a:
                idle += 1.0  # no tick elapsed: nothing ran there
    else:
        try:
            idle = max(0.0, cores() - os.getloadavg()[0])
        except OSError:  # pragma: no cover
            idle = 1.0
    _measured = (time.monotonic(), idle)
    return idle


def _env_threads() -> int | None:
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return None
    try:
        v = int(raw.split(",")[0])
    except ValueError:
        return None
    return v if v >= 1 else None


def choose_threads(
    work: float | None = None,
    *,
    threads: int | None = None,
    n_cores: int | None = None,
    idle: float | None = None,
    busy: float | None = None,
) -> tuple[int, str]:
    """The intra-op thread count and why (module docstring): the process request
    (``--threads``), ``threads`` (``train.threads``), ``OMP_NUM_THREADS``, else the automatic
    rule for per-round ``work`` (``n × d × (batch + test samples)``; None = small).
    ``n_cores`` / ``idle`` (idle cores) default to this machine's; tests pass them, or ``busy``
    (busy cores: ``idle = n_cores - busy``)."""
    if _request is not None:
        return _request, "--threads"
    if threads is not None:
        if threads < 1:
            raise ValueError(f"train.threads={threads}: use a count >= 1 or null (automatic)")
        return int(threads), "train.threads"
    env = _env_threads()
    if env is not None:
        return env, "OMP_NUM_THREADS"
    if work is None or work < WORK_PER_EXTRA_THREAD:
        return 1, f"auto: small per-round work ({0 if work is None else work:.2g} < " \
                  f"{WORK_PER_EXTRA_THREAD:.0e})"
    c = n_cores if n_cores is not None else cores()
    if idle is None:
        idle = c - busy if busy is not None else idle_cores()
    free = min(c, int(idle + 0.5))
    if free < 2:
        return 1, f"auto: per-round work {work:.2g} but {idle:.1f} of {c} cores idle"
    k = max(1, min(free, int(work // WORK_PER_EXTRA_THREAD) + 1))
    return k, f"auto: per-round work {work:.2g}, {idle:.1f} of {c} cores idle"


def problem_work(problem: Any, test_rows: int = 0) -> float:
    """Per-round work ``n × d × (batch_size + test_rows)`` of a
    :class:`~dice_influence.problem.Problem`; ``test_rows``: test samples per node whose
    gradients are taken every round (observers of influence)."""
    return float(problem.n) * float(problem.d) * float(problem.cfg.train.batch_size + test_rows)


def use_threads(work: float | None = None, *, threads: int | None = None) -> int:
    """Choose (:func:`choose_threads`) and apply the count with ``torch.set_num_threads`` (and
    numba's, once the compiled gossip kernel is loaded); remember it for :func:`decision`.
    Returns the count."""
    import torch

    k, why = choose_threads(work, threads=threads)
    if torch.get_num_threads() != k:
        torch.set_num_threads(k)
    _last.update(threads=k, source=why)
    sync_numba()
    return k


def sync_numba(k: int | None = None) -> None:
    """Give numba's parallel kernels ``k`` threads (default: the decided count, before any
    decision torch's current one), then re-apply ``k`` to torch: numba's OpenMP layer, when it
    starts, sets OpenMP's count for the calling thread to all cores, which torch then reads as
    its own. No-op until numba is imported; cheap when nothing changes (the compiled gossip
    kernel calls it every round)."""
    nb = sys.modules.get("numba")
    if nb is None:
        return
    import torch

    k = int(k or _last.get("threads") or torch.get_num_threads())
    try:
        m = max(1, min(k, nb.config.NUMBA_NUM_THREADS))
        if nb.get_num_threads() != m:
            nb.set_num_threads(m)
    except (ValueError, RuntimeError, AttributeError):  # pragma: no cover - odd numba setups
        pass
    if torch.get_num_threads() != k:
        torch.set_num_threads(k)


def use_threads_for(problem: Any, test_rows: int = 0) -> int:
    """:func:`use_threads` for a problem (its ``train.threads`` and per-round work, with
    ``test_rows`` test gradients per node and round)."""
    return use_threads(problem_work(problem, test_rows),
                       threads=getattr(problem.cfg.train, "threads", None))


@contextlib.contextmanager
def pinned_for(problem: Any, test_rows: int = 0) -> Iterator[int]:
    """Decide the count once for ``problem`` (:func:`use_threads_for`) and hold it as the
    process-wide request inside the block, so that every run there (a benchmark's arms) uses
    the same count; the earlier request comes back afterwards. Yields the count."""
    global _request
    saved = _request
    k = use_threads_for(problem, test_rows)
    request(k)
    try:
        yield k
    finally:
        _request = saved


def decision() -> dict[str, Any]:
    """The last decision: ``{"threads": count, "source": why}`` (what a run dir records)."""
    return dict(_last)


def quiet_openmp() -> None:
    """Before torch is imported: waiting OpenMP threads sleep (``OMP_WAIT_POLICY=PASSIVE``)
    instead of spinning on a core another job needs. An existing setting is kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def hoist_threads_option(argv: list[str]) -> list[str]:
    """``argv`` with a ``--threads N`` / ``--threads=N`` given after a command's name moved to
    the front (where the ``dice`` group reads it), so it works in either place."""
    args = list(argv)
    if "--" in args:
        return args
    for i, a in enumerate(args):
        if i == 0:
            continue
        if a.startswith("--threads="):
            return [a, *args[:i], *args[i + 1:]]
        if a == "--threads" and i + 1 < len(args):
            return [a, args[i + 1], *args[:i], *args[i + 2:]]
    return args
