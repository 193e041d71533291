"""``dice bench wholerun``: cost of whole-run sample attribution against the training it covers,
its memory, and the window attribution's cost against training its window (which
optimisations paid).

- ``wholerun``: one reverse sweep over the whole run (:func:`~dice_influence.influence.
  attribute_run`, segments of ``checkpoint_every`` rounds recomputed from the run's
  checkpoints) vs training the same rounds (the plain loop, no evaluation), on a 100-round
  16-node digits run and a 200-round 64-node Fashion-MNIST MLP run (momentum 0.9, float32).
  Best of ``repeats`` interleaved calls. Memory: the parameter sets the sweep holds at its
  peak (``O(T/c + c)``) against the ``T + 1`` a full-memory sweep would hold, and the
  process's peak RSS.
- ``window``: ``attribute(traj, (10, 15))`` vs training those 5 rounds on the settings of
  ``dice bench influence``, with each optimisation switched off in turn.

The machine is shared: ``load`` records ``os.getloadavg()`` before and after. Nothing here
asserts a time.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._util import write_json


def _digits(rounds: int):
    from ..config import load_config

    return load_config({
        "seed": 0,
        "data": {"dataset": "digits", "samples_per_node": 80, "validation_samples": 300},
        "topology": {"name": "ring", "n": 16},
        "model": {"name": "mlp", "hidden": [128, 64]},
        "train": {"rounds": rounds, "batch_size": 16, "lr": 0.01, "momentum": 0.9,
                  "checkpoint_every": 10, "eval_every": rounds},
    })


def _fmnist(rounds: int, n: int, data_dir: str | None):
    from ..config import load_config

    return load_config({
        "seed": 0,
        "data": {"dataset": "fashion-mnist", "data_dir": data_dir, "samples_per_node": 256,
                 "validation_samples": 256},
        "topology": {"name": "exponential", "n": n},
        "model": {"name": "mlp", "hidden": [128, 64]},
        "train": {"rounds": rounds, "batch_size": 32, "lr": 0.01, "momentum": 0.9,
                  "checkpoint_every": 14, "eval_every": rounds},
    })


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def whole_run_cost(cfg: Any, name: str, repeats: int = 2,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Seconds of the whole-run sweep vs training the same rounds (best of ``repeats``)."""
    from ..influence import attribute_run
    from ..loop import run_rounds
    from ..simulator import train

    log(f"bench wholerun: {name}: training")
    traj = train(cfg)
    p = traj.problem
    T = traj.rounds_done
    th0, st0 = traj.params_at(0)
    rss_trained = _rss_mb()
    t_train, t_sweep = [], []
    res = None
    for i in range(repeats):
        log(f"bench wholerun: {name}: repeat {i + 1}/{repeats}")
        t_train.append(_time(lambda: run_rounds(p, th0, st0, 0, T)))
        t = time.perf_counter()
        res = attribute_run(traj)
        t_sweep.append(time.perf_counter() - t)
    assert res is not None
    tt, ts = min(t_train), min(t_sweep)
    mem = dict(res.memory)
    full = (T + 1) * mem["bytes_per_set"]
    return {"setting": name, "nodes": p.n, "rounds": T, "samples": len(res),
            "params_per_node": p.d, "dtype": str(p.dtype).removeprefix("torch."),
            "training_seconds": tt, "sweep_seconds": ts, "ratio_to_training": ts / tt,
            "training_seconds_all": t_train, "sweep_seconds_all": t_sweep,
            "memory": {**mem, "full_memory_parameter_sets": T + 1, "full_memory_bytes": full,
                       "fraction_of_full_memory": mem["peak_bytes"] / full,
                       "peak_rss_mb_after_training": rss_trained,
                       "peak_rss_mb_after_sweep": _rss_mb()}}


def window_cost(log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``attribute`` over a 5-round window vs training it, on the settings of ``dice bench
    influence``, with the optimisations switched off one at a time."""
    from ..influence import adjoint as A
    from ..influence import pullback as PB
    from ..influence.common import check_replayable
    from ..simulator import train
    from . import influence as B

    def old_check(traj: Any) -> None:
        check_replayable(traj, transforms=False)

    fast_check = A.check_attributable
    variants = [
        ("before (torch.func pass, elementwise finiteness check of every checkpoint)",
         False, old_check),
        ("hand-written MLP pass only", True, old_check),
        ("cheap finiteness check only", False, fast_check),
        ("both (current)", True, fast_check),
    ]
    runs = [("fashion-mnist MLP, 16 nodes, batch 64, plain SGD",
             train(B._config(23, None, checkpoint_every=1)))]
    for mom in (0.0, 0.9):
        runs.append((f"digits MLP, 16 nodes ring, batch 16, momentum {mom}",
                     train(B._digits_config(23, mom))))
    out = []
    try:
        for label, traj in runs:
            for vname, fast, check in variants:
                log(f"bench wholerun: window, {label}: {vname}")
                PB.FAST_MLP, A.check_attributable = fast, check
                rec = B._attribution_cost(traj, 10, 15)
                out.append({"setting": label, "variant": vname, "rounds": rec["rounds"],
                            "samples": rec["samples"], "seconds": rec["seconds"],
                            "training_seconds": rec["training_seconds"],
                            "ratio_to_training": rec["ratio_to_training"]})
    finally:
        PB.FAST_MLP, A.check_attributable = True, fast_check
    return out


def bench_wholerun(*, out: str | Path | None = None, data_dir: str | None = None,
                   repeats: int = 2, fmnist_nodes: int = 64, fmnist_rounds: int = 200,
                   window: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Both measurements (module docstring); writes ``out`` (JSON) when given."""
    load0 = os.getloadavg()
    results = [whole_run_cost(_digits(100), "digits MLP 64-128-64-10, 16 nodes ring, "
                              "80 samples/node, batch 16, 100 rounds", repeats, log),
               whole_run_cost(_fmnist(fmnist_rounds, fmnist_nodes, data_dir),
                              f"Fashion-MNIST MLP 784-128-64-10, {fmnist_nodes} nodes "
                              f"exponential, 256 samples/node, batch 32, {fmnist_rounds} rounds",
                              repeats, log)]
    doc = {
        "benchmark": "wholerun",
        "what": "whole-run sample attribution (one reverse sweep, segments recomputed from the "
                "run's checkpoints) vs training the same rounds; momentum 0.9, float32; best of "
                f"{repeats} interleaved calls; window: attribute() over rounds 10..15 vs "
                "training them (best of 5), on dice bench influence's settings",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "platform": platform.platform()},
        "load": {"before": list(load0), "note": "os.getloadavg(); the machine is shared "
                 "with other jobs, so absolute seconds vary; ratios are within one run"},
        "results": results,
        "window": window_cost(log) if window else [],
    }
    doc["load"]["after"] = list(os.getloadavg())
    if out is not None:
        write_json(out, doc)
    return doc
