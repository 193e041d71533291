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
