"""Where the proximal and contribution observers' time goes, piece by piece (a profile, not a
benchmark: the ratios that count are `dice bench proximal` / `dice bench contribution`).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/profile_observers.py [--repeats 6]

Proximal: the anomaly-blog setting (50 nodes, Fashion-MNIST, MLP 784-64-10, batch 32, 64 test
samples per node), 30 rounds of the guarded loop, plain vs tracking every round / every 5th
round (``pre``). Contribution: configs/contribution-digits-clean.yaml (16 nodes, digits, 100
rounds), plain training vs the contribution observer. Each piece is wrapped in a timer
(wall for the proximal pieces, CPU time for the contribution ones) and reported per round,
the minimum (proximal) or median (contribution) over the alternated repeats. Pieces nest
(``local step`` holds ``train grad``; ``sweep`` holds ``step_pullback`` holds ``hvp``). Also
printed: the FLOP count of the big batched products against this machine's measured ``bmm``
throughput, which is the floor argument for proximal tracking. Nothing is written or asserted.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _wrap(acc: dict[str, float], mod: Any, name: str, key: str, clock: Any) -> None:
    f = getattr(mod, name)

    def g(*a: Any, **k: Any) -> Any:
        t0 = clock()
        r = f(*a, **k)
        acc[key] += clock() - t0
        return r

    setattr(mod, name, g)


def proximal(repeats: int) -> None:
    import dice_influence.apps.proximal as AP
    import dice_influence.gossip as GS
    import dice_influence.influence.proximal as IP
    import dice_influence.loop as L
    from dice_influence._mlp import _slot_views, grads
    from dice_influence.apps.defense import GuardOptions, guarded_train
    from dice_influence.config import load_config
    from dice_influence.simulator import build_problem

    acc: dict[str, float] = defaultdict(float)
    clock = time.perf_counter
    for mod, name, key in [(L, "node_grad_list", "train grad (vmap)"),
                           (L.Loop, "_test_grads", "test grads"),
                           (AP, "dot_matrix", "edge dots"),
                           (IP.ProximalTracker, "record_nominal", "tracker nominal"),
                           (IP.ProximalTracker, "record_actual", "tracker actual"),
                           (L, "local_step_", "local step (grad + update + keep)"),
                           (L.Loop, "_general", "after the local step (observer path)"),
                           (L.Loop, "run", "round total"),
                           (GS.Mixer, "__call__", "gossip")]:
        _wrap(acc, mod, name, key, clock)
    cfg = load_config(ROOT / "configs/anomaly-blog.yaml",
                      ["train.rounds=30", "train.eval_every=1000000"])
    p = build_problem(cfg)
    R = 30
    modes = {"plain": GuardOptions(track_every=0, eval_every=0),
             "track every round, pre": GuardOptions(track_every=1, readout="pre", eval_every=0),
             "track every 5th round, pre": GuardOptions(track_every=5, readout="pre",
                                                        eval_every=0)}
    res: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in modes}
    for o in modes.values():
        guarded_train(p, None, o, rounds=R)
    for _ in range(repeats):
        for m, o in modes.items():
            acc.clear()
            guarded_train(p, None, o, rounds=R)
            for k, v in acc.items():
                res[m][k].append(v / R * 1e3)
    print(f"proximal, {cfg.topology.n} nodes, d={p.d}, {torch.get_num_threads()} thread(s); "
          "ms per round (min over repeats, wall)")
    for m in modes:
        print(f"  {m}")
        for k, v in sorted(res[m].items(), key=lambda kv: -min(kv[1])):
            print(f"    {k:40s} {min(v):8.3f}")
    # the floor: FLOPs of the first layer's products vs this machine's bmm throughput
    th = p.init_theta()
    x, y = p.test_set(True)
    n, T = y.shape
    h = x.reshape(n, T, -1)
    W1 = _slot_views(p.fm, th)[p.fm.slots[0].name]
    hid, inp = W1.shape[1], W1.shape[2]
    flop = 2.0 * n * T * inp * hid
    best = float("inf")
    for _ in range(20):
        t0 = time.perf_counter()
        torch.bmm(h, W1.transpose(1, 2))
        best = min(best, time.perf_counter() - t0)
    tg = min(_timed(lambda: grads(p.fm, th, x, y)) for _ in range(10))
    B = cfg.train.batch_size
    print(f"  test gradient: 2 products of {flop / 1e6:.0f} MFLOP (forward, weight gradient; "
          f"{T} test rows vs the training step's {B}: {T / B:.1f}x its FLOPs); bmm "
          f"{best * 1e3:.2f} ms = {flop / best / 1e9:.0f} GFLOP/s, so >= "
          f"{2 * best * 1e3:.2f} ms; the whole pass {tg * 1e3:.2f} ms")


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def contribution(repeats: int, config: str = "configs/contribution-digits-clean.yaml") -> None:
    import dice_influence.apps.contribution as AC
    import dice_influence.apps.proximal as AP
    import dice_influence.influence.pullback as PB
    import dice_influence.loop as L
    from dice_influence.bench.contribution import _arms, _setting

    cfg, problem = _setting(ROOT / config)
    arms = _arms(cfg, problem)
    arms.pop("observer, fast paths off")
    acc: dict[str, float] = defaultdict(float)
    clock = time.process_time
    for mod, name, key in [(type(problem), "batch", "problem.batch"),
                           (L, "node_grad_list", "train grad (vmap)"),
                           (L.Loop, "_test_grads", "online: test grads"),
                           (L, "local_step_", "local step (grad + update + keep)"),
                           (L.Loop, "_general", "after the local step (observer path)"),
                           (AC.ContributionObserver, "before_gossip", "online: before gossip"),
                           (AC.ContributionObserver, "_alignment", "online: alignment"),
                           (AP, "dot_matrix", "online: ledger dots"),
                           (AP.ProximalObserver, "after_gossip", "online: ledger after"),
                           (AC.ContributionObserver, "finish", "sweep"),
                           (PB, "step_pullback", "sweep: step_pullback"),
                           (PB, "_mlp_hvp_and_sample_dots", "sweep: hvp"),
                           (AC, "row_dots", "sweep: row dots")]:
        _wrap(acc, mod, name, key, clock)
    for f in arms.values():
        f()
    res: dict[str, dict[str, list[float]]] = {k: defaultdict(list) for k in arms}
    tot: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeats):
        for name, f in arms.items():
            acc.clear()
            c0 = time.process_time()
            f()
            tot[name].append(time.process_time() - c0)
            for k, v in acc.items():
                res[name][k].append(v)
    R = cfg.train.rounds
    print(f"contribution, {problem.n} nodes, d={problem.d}, {R} rounds; CPU ms per round "
          "(median over repeats)")
    for name in arms:
        print(f"  {name}: total {np.median(tot[name]) / R * 1e3:.3f}")
        for k, v in sorted(res[name].items(), key=lambda kv: -np.median(kv[1])):
            print(f"    {k:40s} {np.median(v) / R * 1e3:8.3f}")
    print(f"  observer / plain (min CPU): {min(tot['observer']) / min(tot['plain']):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--only", choices=("proximal", "contribution"), default=None)
    ap.add_argument("--config", default="configs/contribution-digits-clean.yaml",
                    help="the contribution profile's config (relative to the repository)")
    args = ap.parse_args()
    if args.only in (None, "proximal"):
        proximal(args.repeats)
    if args.only in (None, "contribution"):
        contribution(args.repeats, args.config)


if __name__ == "__main__":
    main()
