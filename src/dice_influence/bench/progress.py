"""Benchmark: the longest silence of the commands a person waits on (``dice bench progress``).

Each command runs under a pseudo-terminal (``pty``: rich draws its progress bars as it would for
a person), every change of what the terminal shows is time-stamped, and the longest gap between
two changes (start and exit included) is reported. A change is a new line, or a redrawn line
whose text differs from the last one drawn (ANSI codes stripped; carriage returns split
redraws), so a progress bar that advances counts and a bar that only repaints does not. The
workloads are the demo, every ``dice experiment`` (reduced with ``--set`` where the full run is
long; recorded) and the README's Python API snippet. Numbers go to JSON, never asserted.
"""

from __future__ import annotations

import os
import platform
import pty
import re
import select
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._util import read_benchmark, write_json

ROOT = Path(__file__).resolve().parents[3]
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[()][0-9A-Za-z]")

SNIPPET = """\
from dice_influence.config import load_config
from dice_influence.simulator import train
from dice_influence.influence import Event, ground_truth, estimate
from dice_influence.influence.adjoint import attribute

traj = train(load_config("configs/alignment-digits.yaml"))
events = [Event(node=3, round=20), Event(node=5, round=21, samples=(0,))]
gt = ground_truth(traj, events, hops=3)                 # exact replay
est = estimate(traj, events, hops=3, readout="midpoint")  # first order, with curvature
print(gt.r_hop, est.r_hop)          # (event, hops); positive = harmful
scores = attribute(traj, (20, 25))  # every sample of every node in rounds 20..24 (factual read-out)
print(scores.top(node=0, k=5))      # most harmful samples, with dataset indices
"""
"""The README's Python API snippet, verbatim."""


def commands(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (argv after ``python``, what is reduced) for every measured command."""
    dice = ["-c", "from dice_influence.cli import app; app()"]
    cfg = ROOT / "configs"

    def exp(name: str, config: str, *extra: str) -> list[str]:
        return [*dice, "experiment", name, str(cfg / config), "-o", str(tmp / name), *extra]

    snippet = tmp / "snippet.py"
    snippet.write_text(SNIPPET)
    out: dict[str, tuple[list[str], str]] = {
        "demo": ([*dice, "demo", "-o", str(tmp / "demo")], "full"),
        "alignment": (exp("alignment", "alignment-digits.yaml"), "full"),
        "anomaly": (exp("anomaly", "anomaly-digits.yaml"), "full (one seed)"),
        "selection": (exp("selection", "selection-digits.yaml"), "full"),
        "aggregation": (exp("aggregation", "aggregation-fmnist.yaml",
                            "--set", "train.rounds=30"), "train.rounds=30"),
        "cascade": (exp("cascade", "cascade-digits.yaml"), "full"),
        "contribution": (exp("contribution", "contribution-digits.yaml"), "full (one seed)"),
        "snippet": ([str(snippet)], "verbatim"),
    }
    if (cfg / "cleaning-digits.yaml").exists() and (
            ROOT / "src" / "dice_influence" / "experiments" / "cleaning.py").exists():
        out["cleaning"] = (exp("cleaning", "cleaning-digits.yaml"), "full (one seed)")
    return out


def watch(argv: list[str], *, timeout: float = 1800.0, cwd: Path = ROOT,
          env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python argv`` under a pseudo-terminal; return the exit code, the time-stamped
    changes of what it shows (``events``: (seconds, text)) and the longest gap."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.chdir(cwd)
            os.execve(sys.executable, [sys.executable, *argv], env or dict(os.environ))
        finally:
            os._exit(127)
    t0 = time.perf_counter()
    buf = ""
    last = None
    events: list[tuple[float, str]] = []

    def feed(text: str, now: float) -> None:
        nonlocal buf, last
        buf += text
        parts = re.split(r"[\r\n]", buf)
        buf = parts.pop()
        for p in parts:
            line = ANSI.sub("", p).rstrip()
            if line.strip() and line != last:
                events.append((now - t0, line))
                last = line

    timed_out = False
    while True:
        now = time.perf_counter()
        if now - t0 > timeout:
            timed_out = True
            os.kill(pid, 9)
            break
        try:
            r, _, _ = select.select([fd], [], [], 0.2)
        except InterruptedError:  # pragma: no cover
            continue
        if r:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            feed(data.decode("utf-8", "replace"), time.perf_counter())
    feed("\n", time.perf_counter())
    _, status = os.waitpid(pid, 0)
    end = time.perf_counter() - t0
    os.close(fd)
    stamps = [0.0, *(e[0] for e in events), end]
    gaps = [(b - a, a) for a, b in zip(stamps, stamps[1:], strict=False)]
    longest, at = max(gaps) if gaps else (end, 0.0)
    after = next((e[1] for e in events if e[0] > at), "(exit)")
    before = next((e[1] for e in reversed(events) if e[0] <= at), "(start)")
    return {"exit_code": os.waitstatus_to_exitcode(status), "timed_out": timed_out,
            "seconds": end, "lines": len(events), "longest_gap_s": longest,
            "gap_starts_at_s": at, "gap_after_line": before[:200],
            "gap_ends_with_line": after[:200],
            "events": [(round(s, 2), t[:160]) for s, t in events]}


def bench_progress(*, out: str | Path | None = None, only: list[str] | None = None,
                   timeout: float = 1800.0, keep_events: bool = False,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every command (or those in ``only``); write and return the JSON. With ``only``,
    the records of the other workloads already in ``out`` are kept (a partial rerun never drops
    earlier measurements; each record carries its own load averages)."""
    results = []
    old = read_benchmark(out, "progress") if only else None
    kept = [r for r in (old or {}).get("results", []) if r.get("workload") not in set(only or [])]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dice-bench-progress-") as tmpd:
        cmds = commands(Path(tmpd))
        order = {w: i for i, w in enumerate(cmds)}
        if only:
            unknown = sorted(set(only) - set(cmds))
            if unknown:
                raise ValueError(f"unknown workloads {unknown}; choose from {sorted(cmds)}")
            cmds = {k: v for k, v in cmds.items() if k in only}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]
                                            ).rstrip(os.pathsep)
        env.setdefault("COLUMNS", "100")
        for name, (argv, reduced) in cmds.items():
            log(f"bench progress: {name} ...")
            la = os.getloadavg()[0]
            res = watch(argv, timeout=timeout, env=env)
            if not keep_events:
                res.pop("events")
            shown = " ".join(a for a in argv[2:] if not a.startswith(str(tmpd))) \
                if argv[0] == "-c" else "python README snippet"
            results.append({"workload": name, "command": ("dice " + shown) if argv[0] == "-c"
                            else shown, "settings": reduced, "loadavg_before": la,
                            "loadavg_after": os.getloadavg()[0], **res})
            log(f"  {name}: {res['seconds']:.1f} s, longest silence {res['longest_gap_s']:.1f} s "
                f"after {res['gap_after_line'][:70]!r} (exit {res['exit_code']})")
    if kept:
        results = sorted(kept + results, key=lambda r: order.get(r["workload"], len(order)))
    doc = {
        "benchmark": "progress",
        "records_kept_from_an_earlier_run": [r["workload"] for r in kept],
        "what": "longest time (s) between two changes of what the terminal shows, each command "
                "under a pseudo-terminal; the target is <= 5 s on a quiet machine",
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": list(load0), "loadavg_end": list(os.getloadavg()),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "note": "load averages include other jobs on a shared machine"},
        "results": results,
    }
    if out is not None:
        write_json(out, doc)
    return doc
