"""Issue 13, peers: checkpoints know their run, the rendezvous listens on the address given,
launch failures print (no markup crash), malformed packets name their sender, a diverging peer
names itself."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dice_influence.cli import app
from dice_influence.config import ConfigError, load_config
from dice_influence.distributed import launch
from dice_influence.distributed.peer import Peer

WALL = 120
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
       "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def cfg_for(n: int = 2, rounds: int = 4, lr: float = 0.1, seed: int = 1, **dist) -> dict:
    return {
        "seed": seed,
        "data": {"dataset": "digits", "samples_per_node": 30, "validation_samples": 40},
        "topology": {"name": "exponential", "n": n},
        "model": {"name": "logreg"},
        "train": {"rounds": rounds, "batch_size": 8, "lr": lr, "eval_every": 2},
        "experiment": {"distributed": {"timeout_s": 20, "checkpoint_every": 2, **dist}},
    }


# ------------------------------------------------------------------------------ 1: identity


def test_checkpoints_of_another_run_are_refused(tmp_path):
    """An old run's checkpoints were resumed silently (other lr, other seed), and a fresh run
    into the folder mixed with them."""
    res = launch(load_config(cfg_for()), 2, tmp_path, wall_timeout=WALL)
    assert res.ok, res.errors
    with pytest.raises(ConfigError, match="train.lr"):
        launch(load_config(cfg_for(lr=0.05)), 2, tmp_path, resume=True, wall_timeout=WALL)
    with pytest.raises(ConfigError, match="seed"):
        launch(load_config(cfg_for(seed=2)), 2, tmp_path, resume=True, wall_timeout=WALL)
    with pytest.raises(ConfigError, match="--overwrite"):
        launch(load_config(cfg_for(lr=0.05)), 2, tmp_path, wall_timeout=WALL)
    # the torchrun path (no launcher in front): the peer itself refuses
    raw = cfg_for(lr=0.05, resume=True)
    with pytest.raises(ConfigError, match="train.lr"):
        Peer(load_config(raw), 0, tmp_path).load_checkpoint(None)
    with pytest.raises(ConfigError, match="another run"):
        Peer(load_config(cfg_for(lr=0.05)), 0, tmp_path)
    # more rounds of the same run is a resume, not another run
    res = launch(load_config(cfg_for(rounds=6)), 2, tmp_path, resume=True, wall_timeout=WALL)
    assert res.ok, res.errors
    res = launch(load_config(cfg_for(lr=0.05)), 2, tmp_path, overwrite=True, wall_timeout=WALL)
    assert res.ok, res.errors
    assert all(m["rounds_done"] == 4 for m in res.metrics)


# ------------------------------------------------------------------------------ 3: markup


def test_launch_prints_gloo_errors_verbatim_when_a_peer_dies(tmp_path):
    """gloo's error text holds `[/...pair.cc:553]`, which rich read as markup (MarkupError)."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(cfg_for(rounds=6, fault={"peer": 1, "round": 2})))
    for out in (tmp_path / "run", tmp_path / "a[" / "x]"):  # a path may hold markup too
        r = CliRunner().invoke(app, ["launch", str(cfg), "--peers", "2", "-o", str(out),
                                     "--timeout", str(WALL)])
        assert r.exit_code == 1, (r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
        text = r.output.replace("\n", "")
        assert "peer 1" in text and "connection lost" in text and str(out) in text


# ------------------------------------------------------------------------------ 4: divergence


def test_diverging_peers_say_they_diverged(tmp_path):
    res = launch(load_config(cfg_for(lr=1e37, rounds=6)), 2, tmp_path, wall_timeout=WALL)
    assert not res.ok
    errs = [m["error"] for m in res.metrics if m is not None]
    assert errs and all(e is not None for e in errs)
    for k, m in enumerate(res.metrics):
        if m is not None and "diverged" in m["error"]["reason"]:
            assert m["error"]["peer"] == k  # names itself, not its neighbour
    assert any("diverged" in e["reason"] for e in errs), errs
    assert not any("non-finite parameters or update" in e["reason"] for e in errs), errs


# ------------------------------------------------------------------------------ 6: packets

_PAIR = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    from dice_influence.distributed.transport import Transport, PeerFailure
    rank, case, init = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    d = 6
    if rank == 0:  # a faulty sender
        dt = torch.float64 if case == "float64" else torch.float32
        n = {"short": d - 2, "long": d + 3}.get(case, d)
        tp = Transport(0, n, dt, torch.device("cpu"), timeout_s=20)
        pkt = tp.pack(3, torch.ones(1, n, dtype=dt), torch.ones(1, n, dtype=dt))
        _, work = tp.exchange_packets(3, pkt, [1], [])
        try:
            tp.wait(3, work)
        except PeerFailure:
            pass  # refused: the receiver never takes the payload
        os._exit(0)
    tp = Transport(1, d, torch.float32, torch.device("cpu"), timeout_s=60)
    bufs, work = tp.exchange_packets(3, torch.zeros(1), [], [0])
    try:
        tp.wait(3, work)
        tp.unpack(bufs[0], 0, 3)
        print("ACCEPTED", flush=True)
    except PeerFailure as exc:
        print("REFUSED", exc.peer, exc, flush=True)
    os._exit(0)
""")


@pytest.mark.parametrize("case", ["short", "long", "float64"])
def test_packet_of_wrong_length_or_dtype_is_refused_naming_the_sender(tmp_path, case):
    init = f"file://{tmp_path}/rdv"
    procs = [subprocess.Popen([sys.executable, "-c", _PAIR, str(r), case, init], env=ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    try:
        out = procs[1].communicate(timeout=WALL)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[1].returncode == 0, out  # not aborted inside gloo
    assert "REFUSED 0 " in out, out
    assert ("float64" if case == "float64" else "announced a packet") in out, out


# ------------------------------------------------------------------------------ 2: rendezvous


def _listening(pid: int) -> list[str]:
    """Local addresses of the listening TCP sockets of process ``pid`` (hex, /proc/net)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # LISTEN
                out.append(f[1])
    return out


@pytest.mark.parametrize("how", ["env", "tcp"])
def test_rendezvous_listens_on_the_given_address_only(tmp_path, how):
    """env:// (MASTER_ADDR) and tcp://127.0.0.1:PORT (DICE_INIT_METHOD) alike: the store
    listens on loopback only, never on 0.0.0.0 / [::] (issue 21)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(cfg_for(n=1, rounds=3, fault={"peer": 0, "round": 1,
                                                                 "kind": "stall"})))
    env = {**ENV, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    env.pop("DICE_INIT_METHOD", None)
    if how == "tcp":
        env.update(DICE_INIT_METHOD=f"tcp://127.0.0.1:{port}", MASTER_PORT="1")
    proc = subprocess.Popen([sys.executable, "-m", "dice_influence.distributed", str(cfg),
                             "--out", str(tmp_path / "o")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        addrs: list[str] = []
        deadline = time.monotonic() + WALL
        port_hex = f":{port:04X}"
        while time.monotonic() < deadline and proc.poll() is None:
            addrs = _listening(proc.pid)
            if any(a.endswith(port_hex) for a in addrs) and (
                    (tmp_path / "o" / "peer-0" / "config.yaml").is_file()):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0]
    finally:
        proc.kill()
        proc.wait()
    assert any(a.endswith(port_hex) for a in addrs), addrs
    loopback = ("0100007F:", "00000000000000000000000001000000:",
                "0000000000000000FFFF00000100007F:")
    assert all(a.startswith(loopback) for a in addrs), addrs  # nothing on 0.0.0.0 / [::]


def test_non_loopback_master_addr_needs_allow_network(tmp_path, monkeypatch):
    from dice_influence.distributed.peer import run_peer

    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.delenv("DICE_INIT_METHOD", raising=False)
    with pytest.raises(ConfigError, match="allow_network"):
        run_peer(load_config(cfg_for(n=1)), tmp_path, rank=0, world_size=1)


def test_peer_metrics_record_identity(tmp_path):
    res = launch(load_config(cfg_for(rounds=2)), 2, tmp_path, wall_timeout=WALL)
    assert res.ok, res.errors
    ids = {m["identity"] for m in res.metrics}
    assert len(ids) == 1 and len(ids.pop()) == 64
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == ["ok", "ok"]


def test_resume_without_a_common_checkpoint_starts_at_round_zero(tmp_path):
    """A peer that is not a neighbour of the dead one can run a round ahead and save alone:
    there is then no round every peer saved, and round 0 is the common state."""
    import torch

    ref = launch(load_config(cfg_for(rounds=4)), 2, tmp_path / "ref", wall_timeout=WALL)
    res = launch(load_config(cfg_for(rounds=2)), 2, tmp_path / "run", wall_timeout=WALL)
    assert ref.ok and res.ok, (ref.errors, res.errors)
    for p in (tmp_path / "run" / "peer-1" / "checkpoints").glob("*.safetensors"):
        p.unlink()
    res = launch(load_config(cfg_for(rounds=4)), 2, tmp_path / "run", resume=True,
                 wall_timeout=WALL)
    assert res.ok, res.errors
    assert torch.equal(res.theta, ref.theta)
