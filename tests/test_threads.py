"""The one thread rule (dice_influence._threads): precedence, the automatic rule, the record."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from dice_influence import _threads as T
from dice_influence.cli import app
from dice_influence.config import load_config


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    T.request(None)
    yield
    T.request(None)
    torch.set_num_threads(before)


def test_small_work_is_one_thread_even_with_idle_cores():
    assert T.choose_threads(3e6, n_cores=16, busy=0.0)[0] == 1
    assert T.choose_threads(None, n_cores=16, busy=0.0)[0] == 1


def test_large_work_uses_idle_cores_only():
    big = 4 * T.WORK_PER_EXTRA_THREAD
    assert T.choose_threads(big, n_cores=2, busy=0.0)[0] == 2
    assert T.choose_threads(big, n_cores=2, busy=2.0)[0] == 1  # loaded: one thread
    assert T.choose_threads(big, n_cores=16, busy=0.0)[0] == 5  # capped by the work
    assert T.choose_threads(big, n_cores=16, busy=13.0)[0] == 3


def test_one_busy_core_of_two_means_one_thread():
    big = 20 * T.WORK_PER_EXTRA_THREAD
    assert T.choose_threads(big, n_cores=2, idle=1.0)[0] == 1  # a thread would share a core
    assert T.choose_threads(big, n_cores=2, idle=1.6)[0] == 2  # background noise only
    assert T.choose_threads(big, n_cores=2, idle=1.4)[0] == 1
    k, why = T.choose_threads(big, n_cores=2, idle=0.3)
    assert k == 1 and "0.3 of 2 cores idle" in why
    assert T.choose_threads(big, n_cores=8, idle=12.0)[0] == 8  # never more than the cores


def test_threshold_matches_the_measured_cases():
    """The measured cases of the module docstring, on a quiet 2-core machine."""
    fmnist = 50890.0  # d of the proximal benchmark's MLP (784-64-10)
    assert T.choose_threads(8 * fmnist * 32, n_cores=2, idle=2.0)[0] == 2  # 8 nodes: 1.31x
    assert T.choose_threads(50 * fmnist * 32, n_cores=2, idle=2.0)[0] == 2  # 50 nodes: 1.66x
    assert T.choose_threads(4e6, n_cores=2, idle=2.0)[0] == 1  # the alignment experiment
    assert T.choose_threads(50 * fmnist * (32 + 64), n_cores=2, idle=0.9)[0] == 1  # loaded


def _ticks(seq):
    it = iter(seq)
    return lambda: next(it)


def test_idle_cores_from_per_core_counters(monkeypatch):
    monkeypatch.setattr(T, "_measured", None)
    monkeypatch.setattr(T.time, "sleep", lambda s: None)
    # core 0 idle 90 of 100 ticks, core 1 busy (0 of 100): 0.9 cores idle
    monkeypatch.setattr(T, "_cpu_ticks", _ticks([{0: (100, 1000), 1: (50, 1000)},
                                                 {0: (190, 1100), 1: (50, 1100)}]))
    assert T.idle_cores() == pytest.approx(0.9)
    # cached: the counters are not read again within CACHE_S
    monkeypatch.setattr(T, "_cpu_ticks", _ticks([]))
    assert T.idle_cores() == pytest.approx(0.9)
    monkeypatch.setattr(T, "_measured", (T.time.monotonic() - T.CACHE_S - 1, 0.9))
    monkeypatch.setattr(T, "_cpu_ticks", _ticks([{0: (0, 10), 1: (0, 10)},
                                                 {0: (10, 20), 1: (10, 20)}]))
    assert T.idle_cores() == pytest.approx(2.0)


def test_idle_cores_falls_back_to_the_load_average(monkeypatch):
    monkeypatch.setattr(T, "_measured", None)
    monkeypatch.setattr(T, "_cpu_ticks", lambda: None)
    monkeypatch.setattr(T, "cores", lambda: 4)
    monkeypatch.setattr(T.os, "getloadavg", lambda: (2.5, 1.0, 1.0))
    assert T.idle_cores() == pytest.approx(1.5)
    monkeypatch.setattr(T, "_measured", None)
    monkeypatch.setattr(T.os, "getloadavg", lambda: (9.0, 1.0, 1.0))
    assert T.idle_cores() == 0.0


def test_auto_measures_the_machine_only_for_large_work(monkeypatch):
    calls = []
    monkeypatch.setattr(T, "idle_cores", lambda: calls.append(1) or 2.0)
    monkeypatch.setattr(T, "cores", lambda: 2)
    assert T.choose_threads(1e6)[0] == 1 and calls == []
    assert T.choose_threads(1e9)[0] == 2 and calls == [1]


def test_loop_with_a_test_gradient_observer_counts_its_work(monkeypatch):
    from dice_influence.apps.proximal import ProximalObserver
    from dice_influence.loop import Loop
    from dice_influence.simulator import build_problem

    monkeypatch.setattr(T, "idle_cores", lambda: 2.0)
    monkeypatch.setattr(T, "cores", lambda: 2)
    p = build_problem(load_config("configs/p2p-digits.yaml", ["train.rounds=1"]))
    plain = T.problem_work(p)
    assert T.decision()["threads"] == 1
    rows = int(p.test_set(p.node_test is not None)[1].shape[-1])
    assert rows > 0
    # a threshold between plain training and training with per-round test gradients
    monkeypatch.setattr(T, "WORK_PER_EXTRA_THREAD", plain * (1 + rows / 2 / p.cfg.train.batch_size))
    Loop(p)
    assert T.decision()["threads"] == 1
    Loop(p, [ProximalObserver(p.n)])
    assert T.decision()["threads"] == 2 and torch.get_num_threads() == 2
    assert T.problem_work(p, rows) == plain * (1 + rows / p.cfg.train.batch_size)


def test_numba_start_up_does_not_override_the_decision():
    """In a fresh process (numba's OpenMP start-up happens once per process): after the
    compiled gossip kernel runs, torch still uses the decided count."""
    pytest.importorskip("numba")
    import os
    import subprocess
    import sys

    code = """if True:
        import numpy as np, torch
        from dice_influence import _threads as T
        from dice_influence.gossip import Mixer
        T.request(1)
        T.use_threads(1e12)
        W = np.eye(64) * 0.5 + np.roll(np.eye(64), 1, axis=1) * 0.5  # sparse: compiled kernel
        m = Mixer(W, dtype=torch.float64)
        assert m._kernel is not None
        m(torch.randn(64, 3000, dtype=torch.float64))
        print(torch.get_num_threads())
    """
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "DICE_NO_NUMBA")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "1"


def test_precedence(monkeypatch):
    big = 8 * T.WORK_PER_EXTRA_THREAD
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert T.choose_threads(1.0, n_cores=2, busy=0.0) == (3, "OMP_NUM_THREADS")
    assert T.choose_threads(big, threads=2, n_cores=2, busy=0.0) == (2, "train.threads")
    T.request(1)
    assert T.choose_threads(big, threads=2, n_cores=2, busy=0.0) == (1, "--threads")
    with pytest.raises(ValueError, match="--threads 0"):
        T.request(0)


def test_hoist_threads_option():
    assert T.hoist_threads_option(["train", "c.yaml", "--threads", "2", "-q"]) == \
        ["--threads", "2", "train", "c.yaml", "-q"]
    assert T.hoist_threads_option(["demo", "--threads=1"]) == ["--threads=1", "demo"]
    assert T.hoist_threads_option(["--threads", "2", "demo"]) == ["--threads", "2", "demo"]


def test_config_key_is_applied_and_operational():
    from dice_influence.manifest import RunIdentity
    from dice_influence.simulator import build_problem

    cfg = load_config("configs/p2p-digits.yaml", ["train.threads=2", "train.rounds=1"])
    build_problem(cfg)
    assert torch.get_num_threads() == 2
    assert T.decision() == {"threads": 2, "source": "train.threads"}
    plain = load_config("configs/p2p-digits.yaml", ["train.rounds=1"])
    assert RunIdentity.of(cfg).digest == RunIdentity.of(plain).digest


def test_train_records_threads_in_run_dir(tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "configs/p2p-digits.yaml", "-o", str(out), "-q",
                                   "--set", "train.rounds=2", "--threads", "1"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "metrics.json").read_text())["threads"]
    assert rec == {"threads": 1, "source": "--threads"}
    res = CliRunner().invoke(app, ["train", "configs/p2p-digits.yaml", "-o", str(out), "-q",
                                   "--set", "train.rounds=2", "--overwrite"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "metrics.json").read_text())["threads"]
    assert rec["threads"] == 1 and rec["source"].startswith("auto: small")


def test_bench_phase_run_alone_keeps_the_other_phase(tmp_path):
    from dice_influence.bench import threads as B

    cmds = {"demo": "dice demo --rounds 24",
            "train256": "dice train /tmp/dice-bench-threads-abc/train256.yaml -q"}
    old = {"benchmark": "threads", "workloads": cmds, "results": [
        {"workload": "demo", "load": "quiet", "threads": 1, "seconds": 3.0},
        {"workload": "demo", "load": "loaded", "threads": 1, "seconds": 4.0}]}
    f = tmp_path / "b.json"
    f.write_text(json.dumps(old))
    now = dict(cmds, train256="dice train /tmp/dice-bench-threads-xyz/train256.yaml -q")
    assert B._kept(f, ("loaded",), now) == [old["results"][0]]
    assert B._kept(f, B.LOADS, now) == []  # both phases: nothing kept
    assert B._kept(f, ("loaded",), dict(now, demo="dice demo --rounds 5")) == []  # other settings
    with pytest.raises(ValueError, match="--load busy"):
        B.bench_threads(loads=("busy",))


def test_a_threads_request_reaches_child_processes(monkeypatch):
    """`dice --threads 1 bench train` times each size in a subprocess: the request must travel."""
    from dice_influence import _threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(_threads, "_request", None)
    assert "OMP_NUM_THREADS" not in _threads.child_env()
    monkeypatch.setattr(_threads, "_request", 1)
    assert _threads.child_env()["OMP_NUM_THREADS"] == "1"


def test_pinned_for_holds_one_count_and_gives_the_request_back(monkeypatch):
    """The benchmarks run every arm inside pinned_for: one decided count, requested for the
    block, and the caller's own request (here none) restored after it, also on an error."""
    from types import SimpleNamespace

    from dice_influence import _threads

    monkeypatch.setattr(_threads, "_request", None)
    monkeypatch.setattr(_threads, "use_threads_for", lambda problem, rows: 3)
    with _threads.pinned_for(SimpleNamespace(), 0) as k:
        assert k == 3 and _threads._request == 3
    assert _threads._request is None
    try:
        with _threads.pinned_for(SimpleNamespace(), 0):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert _threads._request is None
