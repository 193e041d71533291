"""Benchmarks that write their numbers to JSON (never timed assertions).

``bench_train``: seconds per training round of the vectorized simulator for several network
sizes, against (a) the floor — the same nodes' batch gradients alone (vmap over nodes, data
already in memory, no optimizer, mixing or bookkeeping) — and (b) a plain per-node Python loop
written only as a baseline. Each size runs in a fresh subprocess so that its peak resident memory
is its own.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._util import read_benchmark, write_json


def _timeit(fn: Callable[[], Any], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def batch_for(n: int) -> int:
    """Batch 64 (the paper's), or 32 where 60k images leave fewer than 64 per node (n = 1024:
    58 per node), or 8 where they leave fewer than 32 (n = 4096: 14 per node)."""
    per = 60000 // n
    return 64 if per >= 64 else 32 if per >= 32 else 8


def _bench_config(n: int, data_dir: str | None, config: str | None = None) -> Any:
    from ..config import load_config

    if config:  # a run config of one's own (e.g. configs/lm-fortunes.yaml), as it is
        return load_config(config, [f"topology.n={n}", "train.rounds=0", "observers=[]"])

    return load_config({
        "seed": 0,
        "data": {"dataset": "fashion-mnist", "data_dir": data_dir,
                 "samples_per_node": min(512, 60000 // n), "validation_samples": 64},
        "topology": {"name": "exponential", "n": n},
        "model": {"name": "mlp", "hidden": [128, 64]},
        "train": {"rounds": 0, "batch_size": batch_for(n), "lr": 0.1},
    })


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_one(n: int, rounds: int, run_loop: bool, data_dir: str | None = None,
              repeats: int = 3, config: str | None = None) -> dict[str, Any]:
    """Measure one network size in this process (called in a subprocess by bench_train)."""
    from torch.func import functional_call, grad, vmap

    from ..simulator import build_problem, run_rounds

    torch.manual_seed(0)
    problem = build_problem(_bench_config(n, data_dir, config))
    theta = problem.init_theta()
    state = problem.opt.init_state(theta)

    counter = {"t": 0}

    def vectorized() -> None:
        t = counter["t"]
        run_rounds(problem, theta, state, t, t + rounds)
        counter["t"] += rounds

    vectorized()  # warm-up; the peak memory of training alone, before the floor's buffers
    peak = _peak_rss_mb()
    from .._threads import decision

    threads = decision()
    module = problem.fm.module
    params = {name: p.detach().unsqueeze(0).expand(n, *p.shape).clone()
              for name, p in module.named_parameters()}
    x, y = problem.batch(0)

    def loss(p, xb, yb):
        return problem.fm.loss_fn(functional_call(module, p, (xb,)), yb).mean()

    floor_fn = vmap(grad(loss))

    def floor_rounds() -> None:
        for _ in range(rounds):
            floor_fn(params, x, y)

    # interleaved repeats, the fastest of each kept: both sides see the same machine state
    floor_rounds()
    vec_t, floor_t = [], []
    for _ in range(repeats):
        vec_t.append(_timeit(vectorized, reps=1, warmup=0) / rounds)
        floor_t.append(_timeit(floor_rounds, reps=1, warmup=0) / rounds)
    vec, floor = min(vec_t), min(floor_t)

    loop = None
    if run_loop:
        loop = _loop_baseline(problem, rounds=max(3, rounds // 4))
    return {"n": n, "vectorized_s_per_round": vec, "floor_s_per_round": floor,
            "loop_s_per_round": loop, "peak_rss_mb": peak, "ratio_to_floor": vec / floor,
            "d": problem.d, "samples_per_node": int(problem.node_data.sizes[0]),
            "batch_size": problem.cfg.train.batch_size, "repeats": repeats,
            "rounds_timed": rounds, "threads": threads, "loadavg": list(os.getloadavg()),
            "vectorized_all": vec_t, "floor_all": floor_t,
            "gossip_kernel": "numba" if problem.mixer(0)._kernel is not None else "torch"
            if problem.mixer(0).sparse else "dense"}


def _loop_baseline(problem: Any, rounds: int) -> float:
    """A straightforward implementation: one nn.Module per node, a Python loop over nodes for
    the local steps and for gossip (what research code typically does)."""
    import copy

    n = problem.n
    models = [copy.deepcopy(problem.fm.module) for _ in range(n)]
    nd, lr = problem.node_data, problem.lr(0)

    def one_round(t: int) -> None:
        idx = problem.batches.indices(t)
        for k, m in enumerate(models):
            xb, yb = nd.x[k, idx[k]], nd.y[k, idx[k]]
            m.zero_grad(set_to_none=True)
            problem.fm.loss_fn(m(xb), yb).mean().backward()
            with torch.no_grad():
                for prm in m.parameters():
                    prm.add_(prm.grad, alpha=-lr)
        W = problem.W(t)
        halves = [[prm.detach().clone() for prm in m.parameters()] for m in models]
        with torch.no_grad():
            for k, m in enumerate(models):
                senders = [j for j in range(n) if W[k, j] != 0]
                for i, prm in enumerate(m.parameters()):
                    prm.copy_(sum(float(W[k, j]) * halves[j][i] for j in senders))

    counter = {"t": 0}

    def step() -> None:
        one_round(counter["t"])
        counter["t"] += 1

    return _timeit(step, reps=rounds, warmup=1)


def bench_train(ns: list[int], *, rounds: int = 20, loop_max: int = 64,
                out: str | Path | None = None, data_dir: str | Path | None = None,
                keep_others: bool = False,
                log: Callable[[str], None] = print,
                config: str | Path | None = None) -> dict[str, Any]:
    """Run :func:`train_one` for each ``n`` in a subprocess; write and return the JSON.
    ``keep_others``: keep the records of other ``n`` already in ``out`` (each record carries
    its own load average and thread count). ``config``: time that run config (its model, data,
    loss, batch; ``n`` from ``ns``) instead of the built-in Fashion-MNIST MLP setting."""
    from .._threads import child_env

    old = read_benchmark(out, "train") if keep_others else None
    results = [r for r in (old or {}).get("results", []) if r["n"] not in ns]
    for n in ns:
        log(f"bench train: n={n} ...")
        cmd = [sys.executable, "-m", "dice_influence.bench.train", "train-one", str(n), str(rounds),
               "1" if n <= loop_max else "0", str(data_dir or ""), str(config or "")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark for n={n} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    results.sort(key=lambda r: r["n"])
    setting = ("MLP 784-128-64-10, Fashion-MNIST 28x28, batch 64 (32 where fewer than 64 "
               "images per node: n = 1024; 8 where fewer than 32: n = 4096, 14 images per "
               "node), exponential graph, plain SGD lr 0.1, float32")
    if config is not None:
        setting = _config_setting(config)
    doc = {
        "benchmark": "train",
        "setting": setting,
        **({"config": str(config)} if config is not None else {}),
        "load_average": list(os.getloadavg()),
        "allocator": "glibc: large buffers from the heap, freed memory kept; the loop's own "
                     "parameter buffers on transparent huge pages (_alloc.py)",
        "machine": {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(),
                    "platform": platform.platform()},
        "results": results,
    }
    if out is not None:
        write_json(out, doc)
    return doc


def _config_setting(config: str | Path) -> str:
    from ..config import data_label, load_config, model_label

    cfg = load_config(config)
    kw = ", ".join(f"{k} {v}" for k, v in cfg.model.kwargs.items())
    return (f"{config}: model {model_label(cfg)}{f' ({kw})' if kw else ''}, data "
            f"{data_label(cfg)}, loss {cfg.loss.kind}, {cfg.topology.name} graph, batch "
            f"{cfg.train.batch_size}, SGD lr {cfg.train.lr} momentum {cfg.train.momentum}, "
            f"{cfg.train.dtype}")


if __name__ == "__main__":  # subprocess entry point
    if len(sys.argv) >= 5 and sys.argv[1] == "train-one":
        from .._alloc import keep_freed_memory

        keep_freed_memory()  # as the `dice` command does
        res = train_one(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1",
                        sys.argv[5] or None if len(sys.argv) > 5 else None,
                        config=sys.argv[6] or None if len(sys.argv) > 6 else None)
        print(json.dumps(res))
    else:
        sys.exit("usage: python -m dice_influence.bench.train train-one N ROUNDS LOOP DATA_DIR "
                 "[CONFIG]")
