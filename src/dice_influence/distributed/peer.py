"""One peer of a real decentralized network: ATC-DSGD round by round over torch.distributed.

Each round ``t`` peer ``k`` runs the one loop (:mod:`dice_influence.loop`) on its own row, with
the same plug-in objects the simulator runs over all rows (docs/method.md §2, §5, §6):

1. the local step on its own batch (the simulator's :func:`~dice_influence.loop.local_step_`),
   transforms included: ``θ_k^{t+½} = θ_k^t + u_k^t``;
2. sends ``[θ_k^{t+½}, u_k^t]`` to its out-neighbours of ``W^t`` and receives the same from its
   in-neighbours (point-to-point only; ``W^t`` is recomputed locally from the shared seed);
3. observers read the round (proximal influence ``P[k, j] += q_k W^t[k, j] G_k · u_j^t``,
   ``G_k`` at ``θ_k^t`` (``pre``) or ``θ_k^{t+1}`` (``post``); positive = harmful);
4. the policy decides row ``k`` of ``W^t`` (e.g. prunes harmful in-neighbours, the row repaired
   by the one rule both runtimes call);
5. aggregates: ``θ_k^{t+1} = Σ_j W^t[k, j] θ_j^{t+½}`` (or the configured robust rule).

A prune that is final (``readmit: false``) is told to the sender with a control flag, and the
sender stops sending. No coordinator is involved.

Outputs go to ``OUT/peer-<k>/``: ``params.safetensors``, ``proximal.json``/``proximal.csv``,
``metrics.json`` (written also when the run fails, with the error naming peer and round) and
``checkpoints/round-<t>.safetensors``. Every checkpoint records the run identity (see
:func:`peer_identity`); resuming from another run's checkpoint, or starting afresh over one, is
refused with one message naming what differs.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .._util import atomic_path, atomic_write_text, json_safe, write_json
from ..config import ConfigError, RunConfig, dump_config
from ..gossip import loss_grads, node_grads, param_views
from ..loop import Gossip, RoundView, local_step_, readout_observer, readout_rows
from ..manifest import RunDirError, RunIdentity
from ..plugins import build, pack_states, unpack_states
from ..problem import peer_source_files
from .local import LocalProblem, build_local
from .rendezvous import guard_network, rendezvous_store
from .settings import DistributedSettings, distributed_settings, peer_plugin_config
from .transport import FLAG_DROP, FLAG_KEEP, PeerFailure, Transport

SIGN = "influence = loss with the data - loss without it; positive = harmful"


def peer_identity(cfg: RunConfig, s: DistributedSettings | None = None) -> RunIdentity:
    """The run identity of a peer-to-peer run: the simulator's (config keys that change the
    numbers, data files read) plus the distributed settings that change them (read-out, test
    set, node weights, detection). Timeouts, checkpointing, backend, rendezvous and fault
    drills are left out."""
    s = s or distributed_settings(cfg)
    files = peer_source_files(cfg)
    extra = {"distributed": {"readout": s.readout, "test_set": s.test_set, "q": s.q,
                             "detection": s.detection.model_dump(mode="json")}}
    if s.attacks:  # only when set, so that older runs keep their identity
        extra["distributed"]["attacks"] = True
    return RunIdentity.of(cfg, files, extra)


def checkpoint_identity(path: str | Path) -> RunIdentity | None:
    """The run identity a peer checkpoint records (None when it records none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return RunIdentity.from_json(json.loads(meta["identity"]), str(path))
    except Exception:  # damaged, old format or no identity: not verifiable
        return None


@dataclass
class PeerState:
    """Everything a peer carries from round to round (and into a checkpoint)."""

    t: int
    theta: torch.Tensor  # (1, d)
    opt_state: torch.Tensor | None
    P: np.ndarray  # (n,) cumulative proximal influence of each sender on this peer
    dropped_in: set[int] = field(default_factory=set)  # in-neighbours this peer refuses now
    dropped_by: set[int] = field(default_factory=set)  # out-neighbours that dropped this peer
    events: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per-round proximal entries
    history: list[dict[str, Any]] = field(default_factory=list)


class Peer:
    """Peer ``rank`` of ``cfg``; call :meth:`run` inside an initialised process group."""

    def __init__(
        self,
        cfg: RunConfig,
        rank: int,
        out: str | Path,
        settings: DistributedSettings | None = None,
        device: torch.device | str | None = None,
    ):
        self.cfg = cfg
        self.s = settings or distributed_settings(cfg)
        self.k = rank
        self.out = Path(out) / f"peer-{rank}"
        pcfg = peer_plugin_config(cfg)
        # z'_k as the simulator reads it: the first observer that names a test set
        reader = next(o for o in pcfg.observers if o["kind"] in ("proximal", "contribution"))
        self.lp: LocalProblem = build_local(cfg, rank, test_set=reader.get("test_set", "auto"),
                                            device=device)
        self.n = self.lp.n
        self.plugins = build(pcfg, self.lp)
        self.prox = self.plugins.find("proximal")
        self.reader = readout_observer(self.plugins.observers)  # test_batch, order, every
        self.policy = self.plugins.policy
        self.aggregator = self.lp.aggregator or Gossip()
        # a final prune (no re-admission) is told to the sender, which then stops sending
        self.tells = self.policy is not None and hasattr(self.policy, "final") and \
            not getattr(self.policy, "readmit", True)
        self.q = float(self.prox.tracker.q[rank])
        self.transport = Transport(
            rank,
            self.lp.d,
            self.lp.dtype,
            self.lp.device,
            self.s.timeout_s,
            poll=self.lp.device.type == "cuda",
        )
        self.state: PeerState | None = None
        self.seconds = 0.0
        self.first_round_s: float | None = None
        self.rounds_run = 0
        self._logged = 0
        self.identity = peer_identity(cfg, self.s)
        from .sweep import sweep_plan

        self.sweep = sweep_plan(self)  # the reverse sweep (contribution), or None
        if not self.s.resume:
            self._start_afresh()
        self._warm_up()

    def _start_afresh(self) -> None:
        """A fresh start: refuse another run's checkpoints in this peer's folder; remove this
        run's old ones (they would outrank the new ones when pruning and resuming)."""
        d = self.out / "checkpoints"
        for t in self.checkpoint_rounds():
            path = d / f"round-{t}.safetensors"
            other = checkpoint_identity(path)
            if other is None or other.digest != self.identity.digest:
                why = ("records no run identity" if other is None
                       else f"belongs to another run ({self.identity.differences(other)})")
                raise RunDirError(
                    f"{path} {why}; resume it with its own config, delete it, or use "
                    "`dice launch --overwrite`"
                )
        for t in self.checkpoint_rounds():
            (d / f"round-{t}.safetensors").unlink(missing_ok=True)

    def _warm_up(self) -> None:
        """One local gradient and test gradient before joining the network: torch.func imports
        and compiles lazily on first use (seconds), which must not count against neighbours'
        timeouts in round 0."""
        theta = self.lp.init_theta()
        x, y = self.lp.batch(0)
        node_grads(self.lp.fm, theta, x, y)
        self._test_grad(theta, 0)
        self.lp.evaluate(theta)

    # ------------------------------------------------------------------------------ the round

    def _test_grad(self, theta: torch.Tensor, t: int) -> torch.Tensor:
        """This peer's test-loss gradient at ``theta`` on the test rows round ``t`` reads (the
        simulator's rule, :func:`~dice_influence.loop.readout_rows`)."""
        x, y = self.lp.test_x, self.lp.test_y
        rows = None  # the whole split; the shared validation set is never cut (as the simulator)
        if self.lp.own_test:
            o = self.reader
            rows = readout_rows(t, int(y.shape[0]), getattr(o, "test_batch", None),
                                getattr(o, "test_batch_order", "rotate"), getattr(o, "every", 1))
        if rows is not None:
            r = rows.to(y.device)
            x, y = x.index_select(0, r), y.index_select(0, r)
        return loss_grads(self.lp.fm, theta, x[None], y[None])[1]

    def _final_row(self) -> np.ndarray:
        if not self.tells:
            return np.zeros(self.n, dtype=bool)
        return self.policy.final()[self.k]

    def neighbours(self, t: int, W: np.ndarray, st: PeerState) -> tuple[list[int], list[int]]:
        """(in-neighbours this peer still listens to, out-neighbours that still listen to it)."""
        k = self.k
        final = self._final_row()
        ins = [j for j in np.flatnonzero(W[k] > 0).tolist() if j != k and not final[j]]
        outs = [
            j for j in np.flatnonzero(W[:, k] > 0).tolist() if j != k and j not in st.dropped_by
        ]
        return ins, outs

    def step(self, st: PeerState) -> None:
        """Run round ``st.t`` of the one loop on this peer's row; advance ``st`` to ``t + 1``."""
        lp, k, t = self.lp, self.k, st.t
        W = lp.W(t)
        ins, outs = self.neighbours(t, W, st)
        busy = [o for o in self.plugins.observers if o.active(t)]
        decide = self.policy is not None and self.policy.active(t)
        x, y = lp.batch(t)
        lr = lp.lr(t)
        if self.sweep is not None:
            self.sweep.before_round(st)
        half = st.theta.clone()
        opt_state = None if st.opt_state is None else st.opt_state.clone()
        views = None if opt_state is None else param_views(lp.fm, opt_state)
        with torch.no_grad():
            prev, u = local_step_(lp.fm, lp.opt, half, views, x, y, lr, t,
                                  transforms=lp.transforms, ids=[k], keep=True)
            packet = self.transport.pack(t, half, u)
        bufs, work = self.transport.exchange_packets(t, packet, outs, ins)
        pre = None
        if any(getattr(o, "readout", "") in ("pre", "midpoint") for o in busy):
            pre = self._test_grad(prev, t)  # overlaps the wait
        deadline = time.monotonic() + self.s.timeout_s
        self.transport.wait(t, [w for w in work if w[1].startswith("receive")], deadline)
        recv = {j: self.transport.unpack(bufs[j], j, t) for j in ins}
        senders = sorted([k, *ins])  # sender order as in the simulator's W @ Θ
        with torch.no_grad():
            rows = torch.cat([half if j == k else recv[j][0] for j in senders])
            us = torch.cat([u if j == k else recv[j][1] for j in senders])
            view = RoundView(t, self.n, np.array([k]), np.array(senders), prev, rows, W,
                             update=us, test_grad_fn=lambda th: self._test_grad(th, t),
                             pre_grad=pre, lr=lr)
            for o in busy:
                o.before_gossip(view)
            W_used = self.policy.decide(view) if decide else W
            view.theta_next = self.aggregator(view, W_used)
            for o in busy:
                o.after_gossip(view, W_used)
        self.transport.wait(t, [wk for wk in work if wk[1].startswith("send")], deadline)
        if self.sweep is not None:
            self.sweep.after_round(t, ins, outs, W_used, prev, st.opt_state, u)
        cum = self.prox.tracker.cum[k].numpy()
        if self.s.record_rounds and self.prox in busy:
            inc = {j: float(cum[j] - st.P[j]) for j in ins}
            st.rounds.append({"round": t, "influence": {str(j): v for j, v in inc.items()}})
        st.P = cum.copy()
        self._policy_events(t, st)
        if self.tells:
            self._tell(t, st, ins, outs)
        st.theta, st.opt_state, st.t = view.theta_next, opt_state, t + 1

    def _policy_events(self, t: int, st: PeerState) -> None:
        """This round's prunes / re-admissions of this peer, from the policy's log."""
        log = getattr(self.policy, "prune_log", None)
        if not log:
            return
        for rnd, k, j, sign in log[self._logged:]:
            if k != self.k:
                continue
            if sign > 0:
                st.dropped_in.add(j)
                st.events.append({"round": rnd, "event": "dropped", "peer": j,
                                  "cumulative_influence": float(st.P[j])})
            else:
                st.dropped_in.discard(j)
                st.events.append({"round": rnd, "event": "readmitted", "peer": j})
        self._logged = len(log)

    def _tell(self, t: int, st: PeerState, ins: list[int], outs: list[int]) -> None:
        """Tell each in-neighbour whether this peer dropped it for good; hear the same."""
        final = self._final_row()
        flags = {j: FLAG_DROP if final[j] else FLAG_KEEP for j in ins}
        got = self.transport.exchange_control(t, flags, outs)
        for j, flag in got.items():
            if flag == FLAG_DROP:
                st.dropped_by.add(j)
                st.events.append({"round": t, "event": "dropped_by", "peer": j})

    # ------------------------------------------------------------------------------ running

    def initial_state(self) -> PeerState:
        theta = self.lp.init_theta()
        return PeerState(
            t=0, theta=theta, opt_state=self.lp.opt.init_state(theta), P=np.zeros(self.n)
        )

    def run(self) -> PeerState:
        """Train ``cfg.train.rounds`` rounds (resuming from a checkpoint if asked). Outputs are
        written at the end and, on a :class:`PeerFailure`, with what was measured so far."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.yaml", dump_config(self.cfg))
        st = self.initial_state()
        if self.s.resume:
            st = self.load_checkpoint(self.s.resume_round)
        self.state = st
        total = self.cfg.train.rounds
        eval_every = self.cfg.train.eval_every
        ck = self.s.checkpoint_every
        fault = self.s.fault
        if st.t == 0 and not st.history:
            st.history.append({"round": 0, **self.lp.evaluate(st.theta)})
        if self.sweep is not None:
            self.sweep.check_resume(st.t)
        t0 = time.perf_counter()
        try:
            while st.t < total:
                if fault is not None and fault.peer == self.k and fault.round == st.t:
                    _inject(fault.kind)
                self.step(st)
                self.rounds_run += 1
                if self.first_round_s is None:
                    self.first_round_s = time.perf_counter() - t0
                if self.sweep is not None and self.sweep.due(st.t):
                    self.sweep.run(st)  # every peer sweeps the window that just ended
                if st.t % eval_every == 0 or st.t == total:
                    st.history.append(self._evaluate(st))
                if ck is not None and st.t % ck == 0:
                    self.save_checkpoint(st)
        except PeerFailure as exc:
            self.seconds = time.perf_counter() - t0
            self.write_outputs(st, error=exc)
            raise
        self.seconds = time.perf_counter() - t0
        self.write_outputs(st)
        return st

    @property
    def train_seconds(self) -> float:
        """Wall time of the training rounds (the sweeps' time taken out)."""
        sweep = 0.0 if self.sweep is None else self.sweep.seconds["sweep"]
        return self.seconds - sweep

    def _evaluate(self, st: PeerState) -> dict[str, Any]:
        """This peer's evaluation at ``st.t``; a non-finite loss means this peer diverged."""
        rec = {"round": st.t, **self.lp.evaluate(st.theta)}
        if not all(math.isfinite(v) for k, v in rec.items() if k.endswith("loss")):
            raise PeerFailure(
                self.k, st.t, "diverged: this peer's test loss is non-finite (lower train.lr, "
                "or use train.dtype=float64)"
            )
        return rec

    # ------------------------------------------------------------------------------ files

    def write_outputs(self, st: PeerState, error: PeerFailure | None = None) -> None:
        """Write params, proximal row and metrics (atomically)."""
        from safetensors.torch import save_file

        tensors = {"theta": st.theta[0].contiguous().cpu()}
        if st.opt_state is not None:
            tensors["opt_state"] = st.opt_state[0].contiguous().cpu()
        with atomic_path(self.out / "params.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"round": str(st.t), "peer": str(self.k),
                                                   "identity": self.identity.digest})
        prox = {
            "sign": SIGN,
            "receiver": self.k,
            "readout": self.prox.readout,
            "q": self.q,
            "rounds_done": st.t,
            "row": st.P.tolist(),
            "dropped": sorted(st.dropped_in),
            "dropped_by": sorted(st.dropped_by),
            "per_round": st.rounds,
        }
        write_json(self.out / "proximal.json", prox)
        atomic_write_text(
            self.out / "proximal.csv",
            "sender,receiver,influence\n"
            + "".join(f"{j},{self.k},{v!r}\n" for j, v in enumerate(st.P.tolist()) if j != self.k),
        )
        tp = self.transport
        rounds = max(self.rounds_run, 1)
        metrics = {
            "peer": self.k,
            "n": self.n,
            "d": self.lp.d,
            "status": "ok" if error is None else "failed",
            "error": None
            if error is None
            else {
                "peer": error.peer,
                "round": error.round,
                "reason": error.reason,
                "message": str(error),
            },
            "rounds_done": st.t,
            "rounds_target": self.cfg.train.rounds,
            "rounds_run": self.rounds_run,
            "seconds": self.seconds,
            "rounds_per_s": self.rounds_run / self.seconds if self.seconds > 0 else None,
            "first_round_s": self.first_round_s,
            "steady_rounds_per_s": (self.rounds_run - 1) / (self.seconds - self.first_round_s)
            if self.rounds_run > 1
            and self.first_round_s is not None
            and self.seconds > self.first_round_s
            else None,
            "bytes_sent": tp.bytes_sent,
            "bytes_received": tp.bytes_received,
            "bytes_sent_per_round": tp.bytes_sent / rounds,
            "packet_bytes": tp.packet_bytes,
            "events": st.events,
            "history": st.history,
            "final": st.history[-1] if st.history else None,
            "checkpoints": self.checkpoint_rounds(),
            "identity": self.identity.digest,
        }
        if self.sweep is not None and error is None and self.sweep.windows:
            from .sweep import peer_ledger

            res = self.sweep.write(self.out, self.train_seconds, peer_ledger(self))
            metrics["contribution"] = {k: res[k] for k in ("adjoint", "adjoint_by_target",
                                                           "seconds", "memory")}
        write_json(self.out / "metrics.json", metrics)

    def checkpoint_rounds(self) -> list[int]:
        d = self.out / "checkpoints"
        if not d.is_dir():
            return []
        return sorted(int(p.stem.split("-")[1]) for p in d.glob("round-*.safetensors"))

    def save_checkpoint(self, st: PeerState) -> None:
        """``checkpoints/round-<t>.safetensors``: θ, optimizer state, and (as metadata) the
        proximal row, drops, events and history; keeps the last ``keep_checkpoints``."""
        from safetensors.torch import save_file

        d = self.out / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        tensors = {"theta": st.theta[0].contiguous().cpu(), "P": torch.from_numpy(st.P.copy())}
        if st.opt_state is not None:
            tensors["opt_state"] = st.opt_state[0].contiguous().cpu()
        plug_tensors, plug_meta = pack_states(self.plugins)
        tensors.update(plug_tensors)
        meta = {
            "plugins": plug_meta,
            "round": str(st.t),
            "peer": str(self.k),
            "n": str(self.n),
            "identity": json.dumps(self.identity.to_json(), allow_nan=False),
            "state": json.dumps(
                json_safe({
                    "dropped_in": sorted(st.dropped_in),
                    "dropped_by": sorted(st.dropped_by),
                    "events": st.events,
                    "rounds": st.rounds,
                    "history": st.history,
                }),
                allow_nan=False,
            ),
        }
        with atomic_path(d / f"round-{st.t}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        for old in self.checkpoint_rounds()[: -self.s.keep_checkpoints]:
            (d / f"round-{old}.safetensors").unlink(missing_ok=True)

    def load_checkpoint(self, rnd: int | None) -> PeerState:
        """The state saved at round ``rnd`` (default: this peer's latest checkpoint)."""
        from safetensors import safe_open

        have = self.checkpoint_rounds()
        if rnd is None:
            if not have:
                raise ConfigError(
                    f"resume: peer {self.k} has no checkpoint in {self.out / 'checkpoints'}"
                )
            rnd = have[-1]
        path = self.out / "checkpoints" / f"round-{rnd}.safetensors"
        if not path.is_file():
            raise ConfigError(
                f"resume: peer {self.k} has no checkpoint of round {rnd} "
                f"(it has {have}); pick a round every peer has"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            theta = f.get_tensor("theta")
            P = f.get_tensor("P").numpy().copy()
            opt = f.get_tensor("opt_state") if "opt_state" in f.keys() else None
            plug = {key: f.get_tensor(key) for key in f.keys() if key.startswith("plugin/")}
        if int(meta["peer"]) != self.k or int(meta["n"]) != self.n or theta.numel() != self.lp.d:
            raise ConfigError(f"resume: {path} belongs to another peer or another model")
        other = checkpoint_identity(path)
        if other is None:
            raise RunDirError(f"resume: {path} records no run identity (written by an older "
                              "version); start afresh with `dice launch --overwrite`")
        self.identity.require_same(
            other, f"resume: {path}", "resume with the config it was trained with, or start "
            "afresh with `dice launch --overwrite`")
        extra = json.loads(meta["state"])
        try:
            unpack_states(self.plugins, plug, meta.get("plugins", "[]"))
        except ValueError as exc:
            raise ConfigError(f"resume: {path}: {exc}") from None
        log = getattr(self.policy, "prune_log", None)
        self._logged = len(log) if log else 0
        dev, dt = self.lp.device, self.lp.dtype
        return PeerState(
            t=int(meta["round"]),
            theta=theta.to(device=dev, dtype=dt)[None],
            opt_state=None if opt is None else opt.to(device=dev, dtype=dt)[None],
            P=P,
            dropped_in=set(extra["dropped_in"]),
            dropped_by=set(extra["dropped_by"]),
            events=extra["events"],
            rounds=extra["rounds"],
            history=extra["history"],
        )


def _inject(kind: str) -> None:
    if kind == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    while True:  # stall: alive, connections open, no progress
        time.sleep(3600)


# ------------------------------------------------------------------------------ entry points


def run_peer(
    cfg: RunConfig, out: str | Path, *, rank: int | None = None, world_size: int | None = None
) -> PeerState:
    """Join the process group (rank/world size from the torch.distributed environment, as set
    by torchrun or ``dice launch``), run this peer, and leave. Raises :class:`PeerFailure`."""
    s = distributed_settings(cfg)
    if (rank is None or world_size is None) and not {"RANK", "WORLD_SIZE"} <= set(os.environ):
        raise ConfigError(
            "RANK and WORLD_SIZE are not set: start peers with torchrun "
            "(torchrun --nproc-per-node N -m dice_influence.distributed CONFIG) "
            "or with `dice launch CONFIG --peers N`"
        )
    rank = int(os.environ["RANK"]) if rank is None else rank
    world = int(os.environ["WORLD_SIZE"]) if world_size is None else world_size
    if world != cfg.topology.n:
        raise ConfigError(
            f"WORLD_SIZE={world} but topology.n={cfg.topology.n}: run one peer "
            "per node (e.g. dice launch CONFIG --peers N with N = topology.n)"
        )
    init = os.environ.get("DICE_INIT_METHOD") or s.init_method or "env://"
    guard_network(s, init)
    use_cuda = cfg.train.device.startswith("cuda") and torch.cuda.is_available()
    backend = s.backend if s.backend != "auto" else ("nccl" if use_cuda else "gloo")
    device = None
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif cfg.train.device.startswith("cuda"):
        device = torch.device("cpu")
    peer = Peer(cfg, rank, out, s, device=device)  # build before joining: data loading is slow
    timeout = datetime.timedelta(seconds=max(60.0, 4 * s.timeout_s))
    store = rendezvous_store(init, rank, world, timeout)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                                timeout=timeout)
    st = peer.run()  # on PeerFailure the caller exits hard: a pending receive cannot be cancelled
    dist.destroy_process_group()
    return st

