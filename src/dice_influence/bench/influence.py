"""``dice bench influence``: cost of DICE-GT and DICE-E per event, and of all-sample attribution.

Setting: the paper's MLP (784-128-64-10) on Fashion-MNIST, 16 nodes, exponential graph, 512
samples per node, batch 64, lr 0.1, float32; the attribution is also timed on digits (16 nodes,
ring, MLP 64-128-64-10, batch 16; plain SGD and momentum 0.9). Attribution is timed warm (the
best of repeated calls) and cold (the first call of the process, right after training: it
includes torch.func's one-time set-up). Numbers go to JSON; nothing here asserts a time.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._util import write_json


def _config(rounds: int, data_dir: str | None, checkpoint_every: int = 5):
    from ..config import load_config

    return load_config({
        "seed": 0,
        "data": {"dataset": "fashion-mnist", "data_dir": data_dir, "samples_per_node": 512,
                 "validation_samples": 256},
        "topology": {"name": "exponential", "n": 16},
        "model": {"name": "mlp", "hidden": [128, 64]},
        "train": {"rounds": rounds, "batch_size": 64, "lr": 0.1, "checkpoint_every": checkpoint_every,
                  "eval_every": rounds},
    })


def bench_influence(*, max_hops: int = 8, batched: int = 32, window: int = 5,
                    out: str | Path | None = None, data_dir: str | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Time GT and E per event for hops 1..max_hops (single and batched), and the adjoint
    attribution of every sample in a ``window``-round window against training and replay."""
    from ..influence import Event, estimate, ground_truth
    from ..simulator import train

    rounds = 10 + max_hops + window
    # all-sample attribution of a window vs training the same rounds vs replaying each sample;
    # the run keeps every round's parameters (checkpoint_every=1), so the sweep recomputes none.
    # Timed first, so that the first call is a true cold start (after training, as a user would)
    traj = train(_config(rounds, data_dir, checkpoint_every=1), progress=False)
    p = traj.problem
    t0, t1 = 10, 10 + window
    log("bench influence: attribution (Fashion-MNIST MLP)")
    attr = _attribution_cost(traj, t0, t1)
    # replay cost per sample: batched GT of single-sample events over the mean horizon
    mean_h = max(1, round((window + 1) / 2))
    ev = [Event(k % p.n, t0, (k % 64,)) for k in range(batched)]
    t_replay_each = _per_event(lambda e: ground_truth(traj, e, hops=mean_h), ev)
    samples = attr["samples"]
    attribution = {
        **attr,
        "replay_seconds_per_sample": t_replay_each,
        "replay_all_seconds_estimate": t_replay_each * samples,
        "speedup_vs_replay": t_replay_each * samples / attr["seconds"],
    }
    log("bench influence: attribution (digits)")
    digits = []
    for mom in (0.0, 0.9):
        dt = train(_digits_config(rounds, mom), progress=False)
        rec = _attribution_cost(dt, t0, t1)
        # not the process's first call (torch.func is already set up): name it for what it is
        rec["first_call_seconds"] = rec.pop("cold_seconds")
        rec.pop("cold_ratio_to_training")
        digits.append({"momentum": mom, **rec})
    traj = train(_config(rounds, data_dir), progress=False)
    p = traj.problem
    t_ev = 10
    single = [Event(3, t_ev)]
    many = [Event(k % p.n, t_ev, None) for k in range(batched)]
    many = [Event(e.node, t_ev, None if i < p.n else (i % 64,)) for i, e in enumerate(many)]
    per_hop = []
    for h in range(1, max_hops + 1):
        log(f"bench influence: hops={h}")
        rec: dict[str, Any] = {"hops": h}
        rec["gt_single"] = _per_event(lambda ev, h=h: ground_truth(traj, ev, hops=h), single)
        rec["gt_batched"] = _per_event(lambda ev, h=h: ground_truth(traj, ev, hops=h), many)
        rec["e_linear_single"] = _per_event(
            lambda ev, h=h: estimate(traj, ev, hops=h, readout="linear"), single)
        rec["e_linear_batched"] = _per_event(
            lambda ev, h=h: estimate(traj, ev, hops=h, readout="linear"), many)
        rec["e_midpoint_batched"] = _per_event(
            lambda ev, h=h: estimate(traj, ev, hops=h, readout="midpoint"), many)
        per_hop.append(rec)
    doc = {
        "benchmark": "influence",
        "setting": "MLP 784-128-64-10, Fashion-MNIST, 16 nodes exponential, 512/node, "
                   "batch 64, lr 0.1, float32; events at round 10; batched = "
                   f"{batched} events per call; attribution on a run with checkpoint_every=1 "
                   "(warm = best of 5 calls, cold = the process's first call, after training); "
                   "attribution_digits: digits, 16 nodes ring, MLP 128-64, batch 16, lr 0.1",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "per_hop": per_hop,
        "attribution": attribution,
        "attribution_digits": digits,
    }
    if out is not None:
        write_json(out, doc)
    return doc


def _digits_config(rounds: int, momentum: float):
    from ..config import load_config

    return load_config({
        "seed": 0,
        "data": {"dataset": "digits", "samples_per_node": 80, "validation_samples": 300},
        "topology": {"name": "ring", "n": 16},
        "model": {"name": "mlp", "hidden": [128, 64]},
        "train": {"rounds": rounds, "batch_size": 16, "lr": 0.1, "momentum": momentum,
                  "checkpoint_every": 1, "eval_every": rounds},
    })


def _attribution_cost(traj: Any, t0: int, t1: int, repeats: int = 5) -> dict[str, Any]:
    """Seconds of ``attribute`` (horizon target) over rounds ``t0..t1`` — the first call
    (``cold_seconds``) and the best of ``repeats`` later calls (``seconds``, warm) — against the
    best of ``repeats`` trainings of the same rounds (``training_seconds``)."""
    from ..influence.adjoint import attribute
    from ..loop import run_rounds

    p = traj.problem
    theta, state = traj.params_at(t0)
    cold = _time(lambda: attribute(traj, (t0, t1)))
    t_train, t_attr = [], []
    for _ in range(repeats):  # interleaved, so that load from elsewhere hits both alike
        t_train.append(_time(lambda: run_rounds(p, theta, state, t0, t1)))
        t_attr.append(_time(lambda: attribute(traj, (t0, t1))))
    tt, ta = min(t_train), min(t_attr)
    return {"rounds": t1 - t0, "samples": (t1 - t0) * p.n * p.cfg.train.batch_size,
            "seconds": ta, "cold_seconds": cold, "training_seconds": tt,
            "ratio_to_training": ta / tt, "cold_ratio_to_training": cold / tt}


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _per_event(fn: Callable[[list], Any], events: list) -> float:
    fn(events[:1])  # warm-up
    return min(_time(lambda: fn(events)) for _ in range(2)) / len(events)
