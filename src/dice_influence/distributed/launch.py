"""``dice launch``: start N local peers (loopback only) and gather what they wrote.

Every peer is its own process, started from a multiprocessing fork server that has imported
torch and the package once (the same code path as ``python -m dice_influence.distributed``), with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, a fresh ``file://`` rendezvous,
``GLOO_SOCKET_IFNAME=lo`` and ``MASTER_ADDR=127.0.0.1``. When a peer fails its neighbours stop within the configured timeout;
the launcher then gives the others a grace period and kills whatever is left, so nothing hangs.

Before any peer starts, the output folder is checked against the run identity
(:func:`~dice_influence.distributed.peer.peer_identity`): ``resume`` refuses checkpoints of
another run, and a fresh run refuses a folder holding another run's checkpoints unless
``overwrite`` (which removes them).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._util import atomic_path, atomic_write_text, write_json
from ..config import ConfigError, RunConfig, dump_config, load_config
from ..manifest import RunDirError, RunIdentity
from .lifeline import rendezvous_dir, sweep_stale
from .lifeline import start as watch_launcher
from .settings import distributed_settings


@dataclass
class LaunchResult:
    """What the peers left: per-peer metrics, stacked final ``theta`` (n, d) when every peer
    finished, the proximal-influence matrix ``P`` (n, n) (row k = receiver k; positive =
    harmful), exit codes and the failure messages. ``first_failure``: the peer whose failure
    stopped the run (:func:`first_failure`; None when every peer finished)."""

    out: Path
    n: int
    returncodes: list[int | None]
    metrics: list[dict[str, Any] | None]
    P: np.ndarray | None
    theta: Any = None
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    first_failure: int | None = None

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)


def common_checkpoint(out: str | Path, n: int) -> int | None:
    """Largest round for which every peer in ``out`` has a checkpoint (None if there is none)."""
    sets = []
    for k in range(n):
        d = Path(out) / f"peer-{k}" / "checkpoints"
        sets.append(
            {int(p.stem.split("-")[1]) for p in d.glob("round-*.safetensors")}
            if d.is_dir()
            else set()
        )
    common = set.intersection(*sets) if sets else set()
    return max(common) if common else None


def _checkpoint_files(out: Path) -> list[Path]:
    return sorted(out.glob("peer-*/checkpoints/round-*.safetensors"))


def check_checkpoints(out: Path, ident: RunIdentity, *, resume_round: int | None, n: int,
                      overwrite: bool) -> None:
    """Refuse (or, with ``overwrite``, remove) checkpoints in ``out`` that are not of the run
    ``ident``. With ``resume_round``, every peer's checkpoint of that round must be this run's;
    for a fresh start, this run's old checkpoints are removed too (a fresh run starts over)."""
    from .peer import checkpoint_identity

    fix = "resume with the config it was trained with, or start afresh with --overwrite"
    if resume_round is not None:
        for k in range(n):
            path = out / f"peer-{k}" / "checkpoints" / f"round-{resume_round}.safetensors"
            other = checkpoint_identity(path)
            if other is None:
                raise RunDirError(f"--resume: {path} records no run identity (damaged, or "
                                  "written by an older version); start afresh with --overwrite")
            ident.require_same(other, f"--resume: {path}", fix)
        return
    files = _checkpoint_files(out)
    for path in files:
        other = checkpoint_identity(path)
        if (other is None or other.digest != ident.digest) and not overwrite:
            why = ("records no run identity" if other is None
                   else f"is another run's ({ident.differences(other)})")
            raise RunDirError(
                f"--out {out} holds checkpoints of another run ({path} {why}); pass --overwrite "
                "to replace them, --resume to continue that run, or choose another --out"
            )
    for path in files:
        path.unlink(missing_ok=True)


def _clear_outputs(out: Path, n: int) -> None:
    """Remove a previous run's results (not its checkpoints) so nothing stale is collected."""
    for name in ("final.safetensors", "summary.json", "proximal.csv", "contribution_ledger.json",
                 "metrics.json"):
        (out / name).unlink(missing_ok=True)
    for k in range(n):
        for name in ("metrics.json", "proximal.json", "proximal.csv", "params.safetensors",
                     "contribution.json", "sample_scores.csv"):
            (out / f"peer-{k}" / name).unlink(missing_ok=True)


# imported once by the fork server, so that each peer starts in milliseconds, not seconds
PRELOAD = ["dice_influence.distributed._preload"]


def _start_without_main(proc: Any) -> None:
    """Start ``proc`` without multiprocessing re-running the caller's ``__main__`` in the child
    (the peer needs nothing from it, and a script without a main guard would run again)."""
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        proc.start()
    finally:
        if main is not None:
            sys.modules["__main__"] = main


def _peer_main(rank: int, n: int, init: str, config: str, out: str, log: str) -> None:
    """Body of one local peer process (forked from a clean fork server, never from the
    launcher): its own environment, output to ``log``, then ``run_cli``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    watch_launcher(init)  # stop when the launcher dies (kill -9 included)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(n),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(n),
        GROUP_RANK="0",
        DICE_INIT_METHOD=init,
        GLOO_SOCKET_IFNAME="lo",
        MASTER_ADDR="127.0.0.1",
    )
    from .._threads import use_threads

    use_threads(None)  # one thread per peer (N peers share the cores) unless OMP_NUM_THREADS
    from .__main__ import run_cli

    code = run_cli(config, out, [])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(
    config: str | Path | RunConfig,
    peers: int,
    out: str | Path = "runs/p2p",
    *,
    overrides: list[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    wall_timeout: float | None = None,
    grace: float | None = None,
    quiet: bool = True,
) -> LaunchResult:
    """Run ``peers`` local peers of ``config`` and collect their outputs under ``out``.

    ``resume``: continue from the latest round every peer has a checkpoint of (of this same
    run: another run's checkpoints are refused; with no round that every peer saved, start at
    round 0). ``overwrite``: a fresh run may replace
    another run's checkpoints in ``out``. ``wall_timeout``: kill everything after this many
    seconds (default: none)."""
    from .peer import peer_identity

    cfg = config if isinstance(config, RunConfig) else load_config(config, overrides or [])
    if isinstance(config, RunConfig) and overrides:
        cfg = load_config(cfg.model_dump(mode="json"), overrides)
    if peers != cfg.topology.n:
        raise ConfigError(
            f"--peers {peers} but topology.n={cfg.topology.n}; one peer per node "
            f"(or pass --set topology.n={peers})"
        )
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite discards it; "
                          "pass one of them")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ident = peer_identity(cfg)
    r = common_checkpoint(out, peers) if resume else None
    # no round that every peer saved (killed before the first checkpoint, or only a peer that
    # ran ahead saved one): round 0, which every peer recomputes exactly, is the common state
    resume = resume and r is not None
    check_checkpoints(out, ident, resume_round=r, n=peers, overwrite=overwrite)
    if resume:
        raw = cfg.model_dump(mode="json")
        raw["experiment"].setdefault("distributed", {}).update(resume=True, resume_round=r)
        cfg = load_config(raw)
    s = distributed_settings(cfg)
    _clear_outputs(out, peers)
    cfg_path = out / "config.yaml"
    atomic_write_text(cfg_path, dump_config(cfg))
    grace = grace if grace is not None else 2 * s.timeout_s + 10
    sweep_stale()
    rdv = rendezvous_dir()
    init = f"file://{rdv}/rendezvous"
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    procs = []
    exited_at: dict[int, float] = {}  # peer -> when the launcher saw it exit
    t0 = time.perf_counter()
    interrupted = False
    restore = _sigterm_as_interrupt()
    try:
        for k in range(peers):
            proc = ctx.Process(
                target=_peer_main,
                name=f"dice-peer-{k}",
                daemon=False,
                args=(k, peers, init, str(cfg_path), str(out), str(out / f"peer-{k}.log")),
            )
            _start_without_main(proc)
            procs.append(proc)
        first_fail: float | None = None
        while True:
            codes = [p.exitcode for p in procs]
            now = time.perf_counter()
            for k, c in enumerate(codes):
                if c is not None and k not in exited_at:
                    exited_at[k] = now
            if all(c is not None for c in codes):
                break
            if first_fail is None and any(c not in (None, 0) for c in codes):
                first_fail = now
            if (first_fail is not None and now - first_fail > grace) or (
                wall_timeout is not None and now - t0 > wall_timeout
            ):
                break
            time.sleep(0.05)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (handled the same way)
        interrupted = True
    finally:
        restore()
        for p in procs:  # anything still running is stalled or orphaned: kill it
            if p.exitcode is None:
                p.kill()
        for p in procs:
            p.join(timeout=10)
        shutil.rmtree(rdv, ignore_errors=True)
    res = collect(out, peers, [p.exitcode for p in procs], time.perf_counter() - t0,
                  exited_at=exited_at)
    if interrupted:
        raise LaunchInterrupted(res)
    return res


class LaunchInterrupted(KeyboardInterrupt):
    """``dice launch`` was stopped (SIGINT or SIGTERM): every peer was stopped, the
    rendezvous folder removed and ``summary.json`` written; ``result`` is what was collected."""

    def __init__(self, result: LaunchResult) -> None:
        super().__init__("interrupted")
        self.result = result


def _sigterm_as_interrupt() -> Any:
    """Handle SIGTERM like Ctrl-C while peers run (main thread only); returns the restorer."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_term(*_: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, old)


def first_failure(metrics: list[dict[str, Any] | None], returncodes: list[int | None],
                  exited_at: dict[int, float] | None = None) -> int | None:
    """The peer whose failure stopped the run, independent of which neighbour each survivor
    happened to notice first (a survivor waits on its neighbours one after the other, so when
    two connections are gone it names whichever it waited on first). In order:

    1. a peer that exited on its own without writing metrics: killed by a signal (``kill -9``)
       before one that crashed, then the first the launcher saw exit, then the lowest rank;
    2. a peer whose own error names itself (it diverged);
    3. a peer that others name and that left no metrics (it stalled: the launcher killed it,
       its neighbours named it when their ``timeout_s`` passed; neighbours that waited on each
       other name each other too), the most named, then the lowest rank;
    4. the peer named by the first peer to stop with an error.

    ``exited_at``: when the launcher saw each peer exit on its own; a peer absent from it
    (when given) was killed by the launcher. None when every peer finished or no peer can be
    singled out (every peer killed at ``wall_timeout``)."""
    late = float("inf")

    def order(k: int) -> tuple[float, int]:
        return (exited_at or {}).get(k, late), k

    failed = [k for k, (m, rc) in enumerate(zip(metrics, returncodes, strict=True))
              if rc != 0 or m is None or m.get("error") is not None]
    if not failed:
        return None
    died = [k for k in failed if metrics[k] is None and (exited_at is None or k in exited_at)]
    if died:
        return min(died, key=lambda k: (not (returncodes[k] or 0) < 0, *order(k)))
    errs = {k: metrics[k]["error"] for k in failed
            if metrics[k] is not None and metrics[k].get("error") is not None}
    own = [k for k, e in errs.items() if e["peer"] == k]
    if own:
        return min(own, key=order)
    named = [int(e["peer"]) for e in errs.values()]
    silent = [j for j in set(named) if 0 <= j < len(metrics) and metrics[j] is None]
    if silent:
        return min(silent, key=lambda j: (-named.count(j), j))
    if errs:
        return int(errs[min(errs, key=order)]["peer"])
    return None


def collect(
    out: str | Path, n: int, returncodes: list[int | None] | None = None, seconds: float = 0.0,
    *, exited_at: dict[int, float] | None = None,
) -> LaunchResult:
    """Read the peers' outputs in ``out``; write ``summary.json``, ``proximal.csv``,
    ``contribution_ledger.json`` (the summed ledger) and (when all finished)
    ``final.safetensors`` with the stacked parameters."""
    import json

    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out)
    metrics: list[dict[str, Any] | None] = []
    rows: list[list[float] | None] = []
    thetas = []
    errors = []
    for k in range(n):
        d = out / f"peer-{k}"
        m = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").is_file() else None
        metrics.append(m)
        prox = d / "proximal.json"
        rows.append(json.loads(prox.read_text())["row"] if prox.is_file() else None)
        if m is not None and m["status"] == "ok":
            thetas.append(load_file(str(d / "params.safetensors"))["theta"])
        if m is None:
            log = out / f"peer-{k}.log"
            tail = log.read_text()[-400:].strip() if log.is_file() else ""
            errors.append(f"peer {k}: no metrics written (killed or crashed) {tail}".strip())
        elif m["error"] is not None:
            errors.append(f"peer {k} stopped: {m['error']['message']}")
    P = np.array(rows) if all(r is not None for r in rows) else None
    theta = torch.stack(thetas) if len(thetas) == n else None
    codes = returncodes if returncodes is not None else [None] * n
    first = first_failure(metrics, codes if returncodes is not None else
                          [0 if m is not None and m["error"] is None else 1 for m in metrics],
                          exited_at)
    if theta is not None:
        with atomic_path(out / "final.safetensors") as tmp:
            save_file({"theta": theta.contiguous()}, str(tmp))
    if P is not None:
        from ..apps.contribution import write_ledger

        write_ledger(out, P)  # the peers' rows summed: contribution (a) and reciprocity
        atomic_write_text(
            out / "proximal.csv",
            "receiver,"
            + ",".join(f"from_{j}" for j in range(n))
            + "\n"
            + "".join(
                f"{k}," + ",".join(repr(float(v)) for v in row) + "\n" for k, row in enumerate(P)
            ),
        )
    ok = [m for m in metrics if m is not None]
    summary = {
        "n": n,
        "seconds": seconds,
        "returncodes": codes,
        "errors": errors,
        "first_failure": first,
        "sign": "P[k][j]: influence of sender j on receiver k; positive = harmful",
        "status": ["missing" if m is None else m["status"] for m in metrics],
        "rounds_done": [None if m is None else m["rounds_done"] for m in metrics],
        "mean_final_acc": float(np.mean([m["final"]["acc"] for m in ok]))
        if ok and all("acc" in (m["final"] or {}) for m in ok) else None,
        "bytes_sent_per_peer_per_round": float(np.mean([m["bytes_sent_per_round"] for m in ok]))
        if ok
        else None,
        "events": [{"peer": m["peer"], **e} for m in ok for e in m["events"]],
        "proximal": None if P is None else P.tolist(),
    }
    write_json(out / "summary.json", summary)
    _merge_contribution(out, n)
    return LaunchResult(
        out=out,
        n=n,
        returncodes=list(codes),
        metrics=metrics,
        P=P,
        theta=theta,
        errors=errors,
        seconds=seconds,
        first_failure=first,
    )


def _merge_contribution(out: Path, n: int) -> None:
    """``OUT/metrics.json`` with ``observers.contribution`` merged from the peers' reverse
    sweep (the keys ``dice train`` writes), when every peer wrote its ``contribution.json``."""
    from .sweep import merge_contributions

    if not (out / "config.yaml").is_file():
        return
    cfg = load_config(out / "config.yaml")
    contrib = merge_contributions(out, n, cfg)
    if contrib is not None:
        write_json(out / "metrics.json", {"kind": "p2p", "n": n,
                                          "observers": {"contribution": contrib}})
