"""Benchmark: the automatic thread rule against fixed counts, quiet and under load
(``dice bench threads``).

Each cell runs one ``dice`` command in a fresh process (so the rule, OpenMP's start-up and the
allocator are what a user gets) and times it wall-clock: the workloads are the demo, the
alignment and contribution experiments on digits and a 256-node Fashion-MNIST training run
(scaled down with overrides, recorded in ``workloads``), each with the automatic rule
(``"auto"``: no ``--threads``, no ``OMP_NUM_THREADS``), ``--threads 1`` and ``--threads 2``.
``load = "loaded"``: two busy-loop processes (``while True: pass``), pinned to the last core
this process may use, started before the cell and stopped after it; ``"quiet"``: none started
by the benchmark (other jobs on the machine are recorded as ``os.getloadavg()`` around every
cell). ``loads`` (``--load quiet|loaded|both``) runs one phase or both: a phase run alone is
merged into an existing JSON of the same workloads (the other phase's records are kept), so the
two can be run at different times. The settings are sized for about 8 minutes in all on a
2-core machine. Numbers are written to JSON, never asserted.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._util import write_json

ROOT = Path(__file__).resolve().parents[3]
THREADS: tuple[Any, ...] = ("auto", 1, 2)
LOADS = ("quiet", "loaded")

TRAIN256: dict[str, Any] = {
    "seed": 0,
    "data": {"dataset": "fashion-mnist", "samples_per_node": 234, "validation_samples": 64},
    "topology": {"name": "exponential", "n": 256},
    "model": {"name": "mlp", "hidden": [128, 64]},
    "train": {"rounds": 20, "batch_size": 64, "lr": 0.1, "eval_every": 1000},
}
"""The 256-node run (the training benchmark's setting: MLP 784-128-64-10, batch 64)."""


def workloads(tmp: Path, quick: bool = False) -> dict[str, list[str]]:
    """``dice`` arguments of each workload (outputs under ``tmp``); ``quick``: tiny settings
    for a smoke test of the benchmark itself."""
    from ..config import dump_config, load_config

    t256 = dict(TRAIN256, train=dict(TRAIN256["train"], rounds=2 if quick else 20))
    cfg256 = tmp / "train256.yaml"
    cfg256.write_text(dump_config(load_config(t256)))

    def r(full: int, small: int) -> str:
        return str(small if quick else full)

    return {
        "demo": ["demo", "--rounds", r(24, 4)],
        "alignment": ["experiment", "alignment", str(ROOT / "configs" / "alignment-digits.yaml"),
                      "--set", f"train.rounds={r(12, 4)}",
                      "--set", f"experiment.alignment.events={r(4, 1)}"],
        "contribution": ["experiment", "contribution",
                         str(ROOT / "configs" / "contribution-digits.yaml"),
                         "--set", f"train.rounds={r(20, 4)}"],
        "train256": ["train", str(cfg256), "-q"],
    }


def _busy_loops(count: int) -> list[subprocess.Popen]:
    core = sorted(os.sched_getaffinity(0))[-1] if hasattr(os, "sched_getaffinity") else None
    procs = []
    for _ in range(count):
        p = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        if core is not None:
            try:
                os.sched_setaffinity(p.pid, {core})
            except OSError:  # pragma: no cover
                pass
        procs.append(p)
    return procs


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        p.wait()


def _run_cell(args: list[str], threads: Any, out: Path, timeout: float) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    cmd = [sys.executable, "-c", "from dice_influence.cli import app; app()", *args,
           "-o", str(out)]
    if threads != "auto":
        cmd += ["--threads", str(threads)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        seconds: float | None = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"`dice {' '.join(args)}` failed:\n{proc.stderr[-3000:]}")
    except subprocess.TimeoutExpired:
        seconds = None
    rec: dict[str, Any] = {"seconds": seconds, "timed_out": seconds is None,
                           "loadavg_before": load0, "loadavg_after": os.getloadavg()[0]}
    metrics = out / "metrics.json"
    if metrics.exists():
        import json

        rec["threads_chosen"] = json.loads(metrics.read_text()).get("threads")
    return rec


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload and load: auto / best fixed count; per workload: auto loaded / quiet."""
    out: dict[str, Any] = {}
    names = sorted({r["workload"] for r in results})
    for w in names:
        row: dict[str, Any] = {}
        for load in LOADS:
            cell = {r["threads"]: r["seconds"] for r in results
                    if r["workload"] == w and r["load"] == load}
            fixed = [v for k, v in cell.items() if k != "auto" and v is not None]
            auto = cell.get("auto")
            if fixed and auto is not None:
                row[f"{load}_auto_over_best_fixed"] = auto / min(fixed)
        q = [r["seconds"] for r in results if r["workload"] == w and r["threads"] == "auto"
             and r["load"] == "quiet"]
        lo = [r["seconds"] for r in results if r["workload"] == w and r["threads"] == "auto"
              and r["load"] == "loaded"]
        if q and lo and q[0] and lo[0]:
            row["auto_loaded_over_quiet"] = lo[0] / q[0]
        out[w] = row
    return out


def _kept(out: str | Path | None, loads: tuple[str, ...], commands: dict[str, str]
          ) -> list[dict[str, Any]]:
    """Records of the phases not run now from an existing JSON of the same workloads."""
    from .._util import read_benchmark

    old = None if set(loads) == set(LOADS) else read_benchmark(out, "threads")
    if old is None or _shape(old.get("workloads", {})) != _shape(commands):
        return []
    return [r for r in old.get("results", []) if r.get("load") not in loads]


def _shape(commands: dict[str, str]) -> dict[str, str]:
    """Workload commands without their temporary folders (which differ between runs)."""
    import re

    return {k: re.sub(r"/\S*dice-bench-threads-\S*?/", "/TMP/", v) for k, v in commands.items()}


def bench_threads(*, out: str | Path | None = None, quick: bool = False,
                  only: list[str] | None = None, timeout: float = 400.0,
                  loads: tuple[str, ...] = LOADS,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time every (workload, load, threads) cell once for the phases ``loads``; write and
    return the JSON (merged with the other phase's records of an earlier run, see above)."""
    bad = [ld for ld in loads if ld not in LOADS]
    if bad or not loads:
        raise ValueError(f"--load {','.join(loads) or '(none)'}: choose quiet, loaded or both")
    from .._threads import SAMPLE_S, WORK_PER_EXTRA_THREAD, cores

    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dice-bench-threads-") as tmpd:
        tmp = Path(tmpd)
        works = workloads(tmp, quick)
        if only:
            works = {k: v for k, v in works.items() if k in only}
        total = len(works) * len(loads) * len(THREADS)
        i = 0
        for load in loads:
            busy = _busy_loops(2) if load == "loaded" else []
            try:
                time.sleep(0.5 if busy else 0.0)
                for name, args in works.items():
                    for th in THREADS:
                        i += 1
                        rec = _run_cell(args, th, tmp / f"{name}-{load}-{th}", timeout)
                        results.append({"workload": name, "load": load, "threads": th, **rec})
                        s = rec["seconds"]
                        log(f"bench threads [{i}/{total}] {name}, {load}, threads={th}: "
                            + ("timed out" if s is None else f"{s:.1f} s")
                            + f" (load average {rec['loadavg_after']:.1f})")
            finally:
                _stop(busy)
    commands = {k: "dice " + " ".join(v) for k, v in works.items()}
    kept = _kept(out, loads, commands)
    results = sorted(kept + results, key=lambda r: LOADS.index(r["load"]))
    doc = {
        "benchmark": "threads",
        "what": "wall-clock seconds of one `dice` command per cell, in a fresh process; auto = "
                "no --threads and no OMP_NUM_THREADS (the rule of dice_influence._threads); "
                "loaded = two busy-loop processes pinned to the last core, started and stopped "
                "by the benchmark; quiet = none started by the benchmark",
        "workloads": commands,
        "phases_run_now": list(loads),
        "records_kept_from_an_earlier_run": len(kept),
        "quick": quick,
        "rule": {"work_per_extra_thread": WORK_PER_EXTRA_THREAD,
                 "idle_cores_sampled_s": SAMPLE_S,
                 "omp_wait_policy": "PASSIVE unless set (the dice command sets it)"},
        "machine": {"cpu_count": os.cpu_count(), "cores_usable": cores(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
                    "note": "load averages include other jobs on a shared machine"},
        "seconds_total": time.perf_counter() - t_start,
        "results": results,
        "summary": summarize(results),
    }
    if out is not None:
        write_json(out, doc)
    return doc
