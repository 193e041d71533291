"""How many intra-op (OpenMP) threads torch uses: one rule for every entry point.

On the small models of this project a second thread buys little on a quiet machine and costs up
to 10x on a shared one (OpenMP threads spin while their core runs another job). So the rule
(:func:`choose_threads`) is:

1. an explicit count wins: ``--threads`` on the command line (:func:`request`), then
   ``threads=`` (``train.threads`` in a config), then the environment's ``OMP_NUM_THREADS``;
2. otherwise (``auto``) one thread, unless the per-round work of the problem is large
   (``n_nodes x n_params x batch_size >= WORK_PER_EXTRA_THREAD``: ``dice bench threads`` shows
   a second thread paying only for the 256-node Fashion-MNIST run, not for the demo or the
   experiments) **and** the machine has idle cores right now (runnable tasks counted from
   ``/proc/stat``, not the lagging load average); then one thread per idle core, at most
   ``work / WORK_PER_EXTRA_THREAD``.

:func:`use_threads` applies the rule (``torch.set_num_threads``) and remembers the decision,
which :func:`decision` returns for the run directory (``metrics.json`` key ``threads``).
:func:`quiet_openmp` asks OpenMP threads to sleep rather than spin while waiting; it only works
before torch is imported (the ``dice`` command calls it first thing). Peers of a local
peer-to-peer run use one thread each (``n`` peers share the cores) through the same function.
"""

from __future__ import annotations

import os
import time
from typing import Any

WORK_PER_EXTRA_THREAD = 1.0e9
"""Per-round work (``n × d × B``) from which a second thread is considered (the 256-node
Fashion-MNIST MLP run is 1.8e9; the demo 3e6, the alignment experiment 5e7)."""

_request: int | None = None
_last: dict[str, Any] = {"threads": None, "source": "not chosen yet"}


def request(threads: int | None) -> None:
    """Remember a process-wide explicit count (the ``--threads`` option); None = no request."""
    global _request
    if threads is not None and threads < 1:
        raise ValueError(f"--threads {threads}: use a count >= 1 (or leave it out for the "
                         "automatic rule)")
    _request = threads


def cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def busy_cores(samples: int = 5, interval: float = 0.01) -> float:
    """Cores busy with other work right now: runnable tasks (``/proc/stat`` ``procs_running``,
    mean of ``samples`` reads) minus this process. Falls back to the 1-minute load average."""
    vals = []
    try:
        for i in range(samples):
            with open("/proc/stat") as f:
                for line in f:
                    if line.startswith("procs_running"):
                        vals.append(int(line.split()[1]))
                        break
            if i + 1 < samples:
                time.sleep(interval)
    except OSError:
        pass
    if vals:
        return max(0.0, sum(vals) / len(vals) - 1.0)
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return 0.0


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
    busy: float | None = None,
) -> tuple[int, str]:
    """The intra-op thread count and why (module docstring): the process request
    (``--threads``), ``threads`` (``train.threads``), ``OMP_NUM_THREADS``, else the automatic
    rule for per-round ``work`` (``n × d × batch``; None = small). ``n_cores`` / ``busy``
    default to this machine's (tests pass them)."""
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
    b = busy if busy is not None else busy_cores()
    idle = int(c - b + 0.5)
    k = max(1, min(c, idle, int(work // WORK_PER_EXTRA_THREAD) + 1))
    return k, f"auto: per-round work {work:.2g}, {c} cores, {b:.1f} busy"


def problem_work(problem: Any) -> float:
    """Per-round work ``n × d × batch_size`` of a :class:`~dice_influence.problem.Problem`."""
    return float(problem.n) * float(problem.d) * float(problem.cfg.train.batch_size)


def use_threads(work: float | None = None, *, threads: int | None = None) -> int:
    """Choose (:func:`choose_threads`) and apply the count with ``torch.set_num_threads``;
    remember it for :func:`decision`. Returns the count."""
    import torch

    k, why = choose_threads(work, threads=threads)
    if torch.get_num_threads() != k:
        torch.set_num_threads(k)
    _last.update(threads=k, source=why)
    return k


def use_threads_for(problem: Any) -> int:
    """:func:`use_threads` for a problem (its ``train.threads`` and per-round work)."""
    return use_threads(problem_work(problem), threads=getattr(problem.cfg.train, "threads", None))


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
