"""What a run keeps so that any round can be replayed exactly.

A :class:`Trajectory` stores the stacked parameters (and optimizer state) at checkpoint rounds,
every round's batch indices and learning rate, the mixing matrices a policy chose (``W_used``:
the rounds where it differs from the schedule) and the evaluation history. Rounds between
checkpoints are recomputed on demand with the same code that trained them, so
``params_at(t)`` is bit-identical to what training produced — also for a policy-driven run:
``traj.problem`` replays the recorded ``W^t`` (DICE-GT/E and attribution use it).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._util import atomic_write_text, progress_bar
from .loop import Loop, run_rounds
from .problem import Problem, build_problem
from .topology import RecordedSchedule


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

    def run(self, rounds: int, *, progress: bool = False) -> Trajectory:
        """Train ``rounds`` more rounds (resumes where the trajectory stopped)."""
        p = self.problem
        start, stop = self.rounds_done, self.rounds_done + rounds
        eval_every = p.cfg.train.eval_every
        if start == 0 and not self.history:
            self._eval(0, self.theta)

        with progress_bar(progress, rounds, "training") as advance:
            def on_round(t: int, theta: torch.Tensor, state: torch.Tensor | None) -> None:
                if t % self.checkpoint_every == 0:
                    self.checkpoints[t] = _snapshot(theta, state)
                if t % eval_every == 0 or t == stop:
                    self._eval(t, theta)
                advance()

            for t in range(start, stop):
                self.batch_idx.append(p.batches.indices(t).to(torch.int32))
                self.lrs.append(p.lr(t))
            loop = self._loop()
            self.theta, self.state = loop.run(self.theta, self.state, start, stop,
                                              on_round=on_round)
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
        rec = {"round": t, **self.problem.evaluate(theta)}
        self.history.append(rec)

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

    # ------------------------------------------------------------------------------ storage

    def save(self, directory: str | Path) -> Path:
        """Write ``trajectory.json`` and ``checkpoints.safetensors`` into ``directory``
        (atomically, so an interrupted save never leaves a half-written file)."""
        from safetensors.torch import save_file

        from .config import dump_config

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for t, (theta, state) in self.checkpoints.items():
            tensors[f"theta/{t}"] = theta.contiguous().cpu()
            if state is not None:
                tensors[f"state/{t}"] = state.contiguous().cpu()
        if self.batch_idx:
            tensors["batch_idx"] = torch.stack(self.batch_idx).contiguous()
        for t, w in self.W_used.items():
            tensors[f"W_used/{t}"] = torch.from_numpy(np.ascontiguousarray(w))
        tmp = out / ".checkpoints.safetensors.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, out / "checkpoints.safetensors")
        meta = {
            "format": "dice-influence.trajectory/1",
            "config_yaml": dump_config(self.problem.cfg),
            "rounds_done": self.rounds_done,
            "checkpoint_every": self.checkpoint_every,
            "lrs": self.lrs,
            "history": self.history,
        }
        atomic_write_text(out / "trajectory.json", json.dumps(meta))
        return out

    @classmethod
    def load(cls, directory: str | Path, problem: Problem | None = None) -> Trajectory:
        """Load a saved trajectory; the problem is rebuilt from the stored config and the stored
        batch indices are checked against the rebuilt batch schedule."""
        import yaml
        from safetensors.torch import load_file

        from .config import load_config

        d = Path(directory)
        if not (d / "trajectory.json").is_file():
            raise FileNotFoundError(f"no trajectory.json in {d}; pass a run directory "
                                    "written by `dice train`")
        meta = json.loads((d / "trajectory.json").read_text())
        cfg = load_config(yaml.safe_load(meta["config_yaml"]))
        problem = problem or build_problem(cfg)
        traj = cls(problem, meta["checkpoint_every"])
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
        if "batch_idx" in tensors:
            traj.batch_idx = list(tensors["batch_idx"])
            for t in (0, traj.rounds_done - 1):
                if t >= 0 and not torch.equal(
                    traj.batch_idx[t], problem.batches.indices(t).to(torch.int32)
                ):
                    raise ValueError(
                        f"batch schedule of round {t} differs from the recorded one: the data "
                        "or partition code changed since this trajectory was written"
                    )
        traj.theta, traj.state = traj.checkpoints[traj.rounds_done]
        return traj


def _snapshot(theta: torch.Tensor, state: torch.Tensor | None):
    return theta.clone(), None if state is None else state.clone()
