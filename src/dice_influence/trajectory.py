"""What a run keeps so that any round can be replayed exactly.

A :class:`Trajectory` stores the stacked parameters (and optimizer state) at checkpoint rounds,
every round's batch indices and learning rate, the mixing matrices a policy chose (``W_used``:
the rounds where it differs from the schedule) and the evaluation history. Rounds between
checkpoints are recomputed on demand with the same code that trained them, so
``params_at(t)`` is bit-identical to what training produced — also for a policy-driven run:
``traj.problem`` replays the recorded ``W^t`` (DICE-GT/E and attribution use it).

Training checks that the parameters (at every checkpoint and evaluation) and the test losses
(at every evaluation) are finite; the first non-finite value stops it with
:class:`DivergenceError`, and the trajectory is cut back to its last finite checkpoint, so what
was computed before is kept. A saved trajectory is committed by ``manifest.json`` (see
:mod:`dice_influence.manifest`): :meth:`Trajectory.load` refuses a folder without a matching one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._util import atomic_path, atomic_write_text, json_safe, progress_bar
from .loop import Loop, run_rounds
from .manifest import RunDirError, RunIdentity, read_manifest, remove_manifest, write_manifest
from .problem import Problem, build_problem
from .topology import RecordedSchedule

TRAJECTORY_FILES = ["trajectory.json", "checkpoints.safetensors"]


class DivergenceError(ValueError):
    """Training produced non-finite parameters or test losses. ``round``: where it was seen;
    ``nodes``: the nodes affected; ``last_good``: the last finite checkpoint round."""

    def __init__(self, round: int, nodes: list[int], what: str, lr: float | None = None,
                 last_good: int | None = None):
        self.round, self.nodes, self.what, self.lr, self.last_good = (
            round, nodes, what, lr, last_good)
        shown = ", ".join(map(str, nodes[:8])) + (", ..." if len(nodes) > 8 else "")
        hint = f"lower train.lr (now {lr:g}) or use train.dtype=float64" if lr else \
            "lower train.lr or use train.dtype=float64"
        kept = "" if last_good is None else f"; the last finite checkpoint is round {last_good}"
        super().__init__(f"training diverged at round {round}: {what} on node(s) {shown}"
                         f"{kept}; {hint}")


class Trajectory:
    """A recorded decentralized-SGD run. Round ``t`` maps ``θ^t`` to ``θ^{t+1}``; ``θ^0`` is the
    initialisation. Parameter matrices are ``(n_nodes, d)``."""

    def __init__(self, problem: Problem, checkpoint_every: int | None = None,
                 plugins: Any = None):
        self.train_problem = problem  # the nominal schedule: what the loop trains on
        self.problem = problem  # what replays use: the recorded W^t when a policy chose any
        self.plugins = plugins
        self.W_used: dict[int, np.ndarray] = {}
        self.checkpoint_every = checkpoint_every or problem.cfg.train.checkpoint_every
        self.rounds_done = 0
        self.checkpoints: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.history: list[dict[str, Any]] = []
        self.batch_idx: list[torch.Tensor] = []
        self.lrs: list[float] = []
        self.diverged: dict[str, Any] | None = None
        self.theta: torch.Tensor
        self.state: torch.Tensor | None
        self._cache: tuple[int, torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def start(cls, problem: Problem, checkpoint_every: int | None = None,
              plugins: Any = None) -> Trajectory:
        """A new run of ``problem`` with the config's plug-ins (or ``plugins``, a
        :class:`~dice_influence.plugins.Plugins`)."""
        if plugins is None:
            from .plugins import build

            plugins = build(problem.cfg, problem)
        traj = cls(problem, checkpoint_every, plugins)
        traj.theta = problem.init_theta()
        traj.state = problem.opt.init_state(traj.theta)
        traj.checkpoints[0] = _snapshot(traj.theta, traj.state)
        return traj

    # ------------------------------------------------------------------------------ running

    def run(self, rounds: int, *, progress: bool = False,
            on_checkpoint: Callable[[int], None] | None = None) -> Trajectory:
        """Train ``rounds`` more rounds (resumes where the trajectory stopped).

        ``on_checkpoint(t)`` is called after each checkpoint round's snapshot and evaluation
        (and for round 0), e.g. to write it to disk. Raises :class:`DivergenceError` (after
        cutting the trajectory back to its last finite checkpoint) when training diverges."""
        p = self.problem
        start, stop = self.rounds_done, self.rounds_done + rounds
        eval_every = p.cfg.train.eval_every
        if start == 0 and not self.history:
            self._eval(0, self.theta)
            if on_checkpoint is not None:
                on_checkpoint(0)

        with progress_bar(progress, rounds, "training") as advance:
            def on_round(t: int, theta: torch.Tensor, state: torch.Tensor | None) -> None:
                ck = t % self.checkpoint_every == 0
                if ck:
                    self._check_params(t, theta)
                    self.checkpoints[t] = _snapshot(theta, state)
                if t % eval_every == 0 or t == stop:
                    self._eval(t, theta)
                if ck and on_checkpoint is not None:
                    on_checkpoint(t)
                advance()

            for t in range(start, stop):
                self.batch_idx.append(p.batches.indices(t).to(torch.int32))
                self.lrs.append(p.lr(t))
            loop = self._loop()
            try:
                self.theta, self.state = loop.run(self.theta, self.state, start, stop,
                                                  on_round=on_round)
            except DivergenceError as exc:
                self._cut_back(exc)
                self._record({t: w for t, w in loop.recorded.items() if t < self.rounds_done})
                raise
            self._record(loop.recorded)
        self.rounds_done = stop
        self.checkpoints.setdefault(stop, _snapshot(self.theta, self.state))
        return self

    def _loop(self) -> Loop:
        if getattr(self, "_live", None) is None:
            pl = self.plugins
            self._live = (Loop(self.train_problem) if pl is None
                          else Loop.from_plugins(self.train_problem, pl))
        return self._live

    def _record(self, chosen: dict[int, np.ndarray]) -> None:
        """Keep the ``W^t`` a policy chose; replays then use them (``self.problem``)."""
        new = {t: w for t, w in chosen.items() if t not in self.W_used}
        if not new:
            return
        self.W_used.update(new)
        base = self.train_problem
        self.problem = dataclasses.replace(
            base, schedule=RecordedSchedule(base.schedule, self.W_used), _mixers={})
        self._cache = None

    def _eval(self, t: int, theta: torch.Tensor) -> None:
        self._check_params(t, theta)
        rec = {"round": t, **self.problem.evaluate(theta)}
        bad = [k for k, v in enumerate(rec["loss"]) if not math.isfinite(v)]
        if bad:
            raise DivergenceError(t, bad, "non-finite test loss", self.problem.lr(t))
        self.history.append(rec)

    def _check_params(self, t: int, theta: torch.Tensor) -> None:
        ok = torch.isfinite(theta).all(dim=1)
        if not bool(ok.all()):
            bad = torch.nonzero(~ok).flatten().tolist()
            raise DivergenceError(t, bad, "non-finite parameters", self.problem.lr(max(t - 1, 0)))

    def _cut_back(self, exc: DivergenceError) -> None:
        """Keep what was computed before ``exc``: back to the last (finite) checkpoint."""
        last = max([c for c in self.checkpoints if c < exc.round] or [0])
        exc.last_good = last
        exc.args = (str(DivergenceError(exc.round, exc.nodes, exc.what, exc.lr, last)),)
        self.rounds_done = last
        self.theta, self.state = _snapshot(*self.checkpoints[last])
        self.checkpoints = {c: v for c, v in self.checkpoints.items() if c <= last}
        self.batch_idx, self.lrs = self.batch_idx[:last], self.lrs[:last]
        self.history = [h for h in self.history if h["round"] <= last]
        self._cache = None
        self.diverged = {"round": exc.round, "nodes": exc.nodes, "what": exc.what,
                         "last_finite_checkpoint": last, "message": str(exc)}

    # ------------------------------------------------------------------------------ replay

    def params_at(self, t: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(θ^t, optimizer state^t)`` for ``0 <= t <= rounds_done``, bit-identical to training."""
        if not 0 <= t <= self.rounds_done:
            raise IndexError(f"round {t} is outside the recorded run (0..{self.rounds_done})")
        if t in self.checkpoints:
            theta, state = self.checkpoints[t]
            return theta.clone(), None if state is None else state.clone()
        c0 = max(c for c in self.checkpoints if c <= t)
        theta, state = self.checkpoints[c0]
        if self._cache is not None and c0 < self._cache[0] <= t:
            c0, theta, state = self._cache
        theta, state = run_rounds(self.problem, theta, state, c0, t)
        self._cache = (t, theta, state)
        return theta.clone(), None if state is None else state.clone()

    def W(self, t: int) -> np.ndarray:
        return self.problem.W(t)

    def lr(self, t: int) -> float:
        return self.lrs[t] if t < len(self.lrs) else self.problem.lr(t)

    @property
    def final_metrics(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    @property
    def identity(self) -> RunIdentity:
        """Which run this is: the config keys that change the numbers and the data files read
        (see :mod:`dice_influence.manifest`)."""
        return RunIdentity.of(self.problem.cfg, self.problem.dataset.files)

    @classmethod
    def restore(cls, problem: Problem, checkpoints: dict[int, tuple[torch.Tensor, Any]],
                history: list[dict[str, Any]], rounds_done: int,
                checkpoint_every: int | None = None, *,
                plugin_tensors: dict[str, torch.Tensor] | None = None,
                plugin_meta: str | None = None) -> Trajectory:
        """A trajectory at ``rounds_done`` from saved checkpoints (which must include 0 and
        ``rounds_done``) and history; batch indices and learning rates are recomputed. The
        config's plug-ins are rebuilt and, for a policy- or observer-driven run, restored from
        ``plugin_tensors`` / ``plugin_meta`` (what :meth:`plugin_checkpoint` wrote at
        ``rounds_done``, with the recorded ``W^t``)."""
        traj = cls.start(problem, checkpoint_every)
        traj._unpack_plugins(plugin_tensors or {}, plugin_meta, f"checkpoint {rounds_done}")
        dev = problem.device
        traj.checkpoints = {
            t: (th.to(dev), None if st is None else st.to(dev))
            for t, (th, st) in sorted(checkpoints.items()) if t <= rounds_done
        }
        traj.rounds_done = rounds_done
        traj.theta, traj.state = _snapshot(*traj.checkpoints[rounds_done])
        traj.history = [h for h in history if h["round"] <= rounds_done]
        traj.batch_idx = [problem.batches.indices(t).to(torch.int32) for t in range(rounds_done)]
        traj.lrs = [problem.lr(t) for t in range(rounds_done)]
        return traj

    # ------------------------------------------------------------------------------ plug-ins

    def _stateful(self) -> bool:
        pl = self.plugins
        return pl is not None and bool(pl.observers or pl.policy is not None)

    def _pack_plugins(self, tensors: dict[str, torch.Tensor]) -> str | None:
        """Add the plug-ins' state (as of ``rounds_done``) to ``tensors``; return its JSON part
        (None for a run without plug-ins)."""
        if not self._stateful():
            return None
        from .plugins import pack_states

        plug, meta = pack_states(self.plugins)
        tensors.update(plug)
        return meta

    def plugin_checkpoint(self, t: int) -> tuple[dict[str, torch.Tensor], str | None]:
        """The plug-ins' state now (call right after round ``t``) plus the ``W^t`` recorded so
        far, as tensors and a JSON string, for a progress checkpoint."""
        tensors: dict[str, torch.Tensor] = {}
        meta = self._pack_plugins(tensors)
        live = getattr(self, "_live", None)
        chosen = {**self.W_used, **(live.recorded if live is not None else {})}
        for r, w in chosen.items():
            if r < t:
                tensors[f"W_used/{r}"] = torch.from_numpy(np.ascontiguousarray(w))
        return tensors, meta

    def _unpack_plugins(self, tensors: dict[str, torch.Tensor], meta: str | None,
                        where: str) -> None:
        self._record({int(k.split("/")[1]): v.numpy() for k, v in tensors.items()
                      if k.startswith("W_used/")})
        if meta is None:
            if self._stateful():
                raise RunDirError(f"{where} holds no state of this run's plug-ins "
                                  "(observers/policy); it was written by a run without them")
            return
        if self.plugins is None:
            from .plugins import build

            self.plugins = build(self.train_problem.cfg, self.train_problem)
        from .plugins import unpack_states

        try:
            unpack_states(self.plugins, tensors, meta)
        except ValueError as exc:
            raise RunDirError(f"{where}: {exc}") from None

    # ------------------------------------------------------------------------------ storage

    def save(self, directory: str | Path, *, manifest: bool = True) -> Path:
        """Write ``trajectory.json`` and ``checkpoints.safetensors`` into ``directory``, each
        atomically, then (``manifest=True``) ``manifest.json`` as the commit marker: an
        interrupted save is never loaded. ``manifest=False`` leaves the commit to the caller
        (:func:`dice_influence.rundir.write_run_dir` commits the whole run folder)."""
        from safetensors.torch import save_file

        from .config import dump_config

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if manifest:
            remove_manifest(out)
        ident = self.identity
        tensors: dict[str, torch.Tensor] = {}
        for t, (theta, state) in self.checkpoints.items():
            tensors[f"theta/{t}"] = theta.contiguous().cpu()
            if state is not None:
                tensors[f"state/{t}"] = state.contiguous().cpu()
        if self.batch_idx:
            tensors["batch_idx"] = torch.stack(self.batch_idx).contiguous()
        for t, w in self.W_used.items():
            tensors[f"W_used/{t}"] = torch.from_numpy(np.ascontiguousarray(w))
        plug_meta = self._pack_plugins(tensors)
        with atomic_path(out / "checkpoints.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"identity": ident.digest})
        meta = {
            "format": "dice-influence.trajectory/1",
            "identity": ident.digest,
            "config_yaml": dump_config(self.problem.cfg),
            "rounds_done": self.rounds_done,
            "checkpoint_every": self.checkpoint_every,
            "lrs": self.lrs,
            "history": self.history,
            "diverged": self.diverged,
            "plugins": plug_meta,
        }
        atomic_write_text(out / "trajectory.json", json.dumps(json_safe(meta), allow_nan=False))
        if manifest:
            write_manifest(out, TRAJECTORY_FILES, ident)
        return out

    @classmethod
    def load(cls, directory: str | Path, problem: Problem | None = None) -> Trajectory:
        """Load a saved trajectory. The folder must be committed (``manifest.json`` lists
        ``trajectory.json`` and ``checkpoints.safetensors`` with their hashes); the problem is
        rebuilt from the stored config (or ``problem`` is used, which must be the same run) and
        must read the same data; the stored batch indices are checked against the rebuilt
        batch schedule. Raises :class:`~dice_influence.manifest.RunDirError`."""
        import yaml
        from safetensors.torch import load_file

        from .config import load_config

        d = Path(directory)
        if not (d / "trajectory.json").is_file():
            raise FileNotFoundError(f"no trajectory.json in {d}; pass a run directory "
                                    "written by `dice train`")
        _, ident = read_manifest(d, TRAJECTORY_FILES)
        where = d / "trajectory.json"
        try:
            meta = json.loads(where.read_text())
        except ValueError as exc:
            raise RunDirError(f"{where} is not valid JSON ({exc})") from None
        meta = _checked_meta(meta, where)
        if meta.get("identity", ident.digest) != ident.digest:
            raise RunDirError(f"{where} records another run than {d / 'manifest.json'}")
        ckpt = d / "checkpoints.safetensors"
        if _tensor_file_identity(ckpt) != ident.digest:
            raise RunDirError(
                f"{ckpt} records another run than {where} and {d / 'manifest.json'} (a mixed "
                "folder: one run's trajectory, another's checkpoints); write the run again")
        cfg = load_config(yaml.safe_load(meta["config_yaml"]))
        problem = problem or build_problem(cfg)
        traj = cls(problem, meta["checkpoint_every"])
        traj.identity.require_same(
            ident, f"{d}", "it was trained with other settings or data than these (the data "
            "files read now must be the ones the run read)")
        tensors = load_file(str(d / "checkpoints.safetensors"))
        traj._record({int(k.split("/")[1]): v.numpy() for k, v in tensors.items()
                      if k.startswith("W_used/")})
        for key, val in tensors.items():
            if key.startswith("theta/"):
                t = int(key.split("/")[1])
                traj.checkpoints[t] = (val.to(problem.device), tensors.get(f"state/{t}"))
        traj.rounds_done = meta["rounds_done"]
        traj.lrs = list(meta["lrs"])
        traj.history = meta["history"]
        traj.diverged = meta.get("diverged")
        traj._unpack_plugins(tensors, meta.get("plugins"), str(where))
        if traj.rounds_done not in traj.checkpoints or 0 not in traj.checkpoints:
            raise RunDirError(f"{d / 'checkpoints.safetensors'} lacks the checkpoints of round 0 "
                              f"or of round {traj.rounds_done} (rounds_done)")
        if len(traj.lrs) != traj.rounds_done:
            raise RunDirError(f"{where}: lrs has {len(traj.lrs)} entries for rounds_done="
                              f"{traj.rounds_done}")
        if "batch_idx" in tensors:
            traj.batch_idx = list(tensors["batch_idx"])
            if len(traj.batch_idx) != traj.rounds_done:
                raise RunDirError(f"{d / 'checkpoints.safetensors'}: batch_idx has "
                                  f"{len(traj.batch_idx)} rounds for rounds_done="
                                  f"{traj.rounds_done}")
            for t in (0, traj.rounds_done - 1):
                if t >= 0 and not torch.equal(
                    traj.batch_idx[t], problem.batches.indices(t).to(torch.int32)
                ):
                    raise RunDirError(
                        f"batch schedule of round {t} differs from the recorded one: the data "
                        "or partition code changed since this trajectory was written"
                    )
        traj.theta, traj.state = _snapshot(*traj.checkpoints[traj.rounds_done])
        return traj


def _tensor_file_identity(path: Path) -> str | None:
    """The run identity digest a safetensors file records in its metadata (None if none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("identity")
    except Exception:  # safetensors raises its own error types for damaged files
        raise RunDirError(f"{path} is damaged (not a safetensors file); write the run "
                          "again") from None


_META_TYPES: dict[str, tuple[type, ...]] = {
    "config_yaml": (str,), "rounds_done": (int,), "checkpoint_every": (int,),
    "lrs": (list,), "history": (list,),
}


def _checked_meta(meta: Any, where: Path) -> dict[str, Any]:
    """``trajectory.json`` with every key the loader needs, of the right type."""
    if not isinstance(meta, dict):
        raise RunDirError(f"{where} must hold a JSON object, got {type(meta).__name__}")
    for key, types in _META_TYPES.items():
        if key not in meta:
            raise RunDirError(f"{where} lacks the key {key!r}; the file is damaged or from "
                              "another program")
        if not isinstance(meta[key], types) or isinstance(meta[key], bool):
            raise RunDirError(f"{where}: {key!r} has type {type(meta[key]).__name__}, expected "
                              f"{types[0].__name__}")
    if meta["rounds_done"] < 0 or meta["checkpoint_every"] < 1:
        raise RunDirError(f"{where}: rounds_done must be >= 0 and checkpoint_every >= 1")
    if not all(isinstance(h, dict) and isinstance(h.get("round"), int) for h in meta["history"]):
        raise RunDirError(f"{where}: every history entry needs an integer 'round'")
    return meta


def check_finite(traj: Trajectory) -> None:
    """Raise :class:`DivergenceError` unless every checkpoint, the final parameters and every
    recorded test loss of ``traj`` are finite. Influence computations (DICE-GT/E) call it
    first: differences of non-finite losses mean nothing. (A run that diverged in training was
    cut back to its last finite checkpoint and passes; ``traj.diverged`` says where it
    stopped.) One float64 row sum per checkpoint: NaN and ±inf propagate through the sum, and
    float32 values cannot overflow a float64 sum, so no elementwise test is needed."""
    snaps = [*sorted(traj.checkpoints.items()), (traj.rounds_done, (traj.theta, traj.state))]
    for t, (theta, _state) in snaps:
        ok = torch.isfinite(theta.sum(1, dtype=torch.float64))
        if not bool(ok.all()):
            raise DivergenceError(t, torch.nonzero(~ok).flatten().tolist(),
                                  "non-finite parameters", None)
    for h in traj.history:
        bad = [k for k, v in enumerate(h.get("loss") or []) if v is None or not math.isfinite(v)]
        if bad:
            raise DivergenceError(h["round"], bad, "non-finite test loss", None)


def _snapshot(theta: torch.Tensor, state: torch.Tensor | None):
    return theta.clone(), None if state is None else state.clone()
