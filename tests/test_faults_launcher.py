"""Issue 21: killing `dice launch` (kill -9 or SIGTERM) stops its peers and removes the
rendezvous folder; SIGTERM is handled like Ctrl-C (summary, exit 130). A real launcher process
is started and killed; its peers are found through an environment tag they inherit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WALL = 120  # generous deadline on a loaded machine; a hang fails instead of blocking the suite


def tagged(tag: str) -> list[int]:
    """Running (not zombie) processes whose environment carries ``tag``."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if tag.encode() not in (d / "environ").read_bytes():
                continue
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            found.append(int(d.name))
    return found


def start_launcher(tmp_path: Path) -> tuple[subprocess.Popen, str, Path]:
    tag = f"DICE_TEST_TAG={uuid.uuid4().hex}"
    name, value = tag.split("=")
    env = {**os.environ, name: value, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "p2p"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dice_influence.cli", "launch",
         str(ROOT / "configs" / "p2p-digits.yaml"), "-o", str(out),
         "--set", "topology.name=ring", "--set", "topology.n=3",
         "--set", "train.rounds=100000", "--set", "experiment.distributed.checkpoint_every=5"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + WALL
    while time.monotonic() < deadline and proc.poll() is None:
        if all((out / f"peer-{k}" / "checkpoints").is_dir() and
               any((out / f"peer-{k}" / "checkpoints").glob("round-*.safetensors"))
               for k in range(3)):
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0]
    assert len(tagged(tag)) >= 4  # launcher, fork server, 3 peers (at least)
    return proc, tag, out


def rdv_dirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"dice-rdv-{pid}-*"))


def wait_gone(tag: str) -> list[int]:
    deadline = time.monotonic() + WALL
    left = tagged(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = tagged(tag)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl: Linux")
def test_kill_9_of_the_launcher_stops_every_peer_and_removes_the_rendezvous(tmp_path):
    proc, tag, _out = start_launcher(tmp_path)
    assert rdv_dirs(proc.pid)
    proc.kill()
    proc.wait()
    left = wait_gone(tag)
    for pid in left:  # clean up before failing
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes still running after the launcher died: {left}"
    assert not rdv_dirs(proc.pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc: Linux")
def test_sigterm_of_the_launcher_is_handled_like_ctrl_c(tmp_path):
    proc, tag, out = start_launcher(tmp_path)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=WALL)[0]
    assert proc.returncode == 130, text
    assert "interrupted" in text and "--resume" in text and "Traceback" not in text, text
    assert (out / "summary.json").is_file()
    left = wait_gone(tag)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left
    assert not rdv_dirs(proc.pid)


def test_stale_rendezvous_folders_of_dead_launchers_are_swept(tmp_path):
    from dice_influence.distributed import lifeline

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(tempfile.mkdtemp(prefix=f"dice-rdv-{dead.pid}-"))
    (stale / "rendezvous").write_text("x")
    live = Path(lifeline.rendezvous_dir())
    try:
        gone = lifeline.sweep_stale()
        assert stale in gone and not stale.exists() and live.exists()
    finally:
        live.rmdir()


# ------------------------------------------------------------------ who failed first (no peers)


def _err(named: int, reason: str = "connection lost") -> dict:
    return {"status": "failed", "error": {"peer": named, "round": 3, "reason": reason}}


def test_first_failure_is_the_killed_peer_whoever_the_survivors_name():
    from dice_influence.distributed.launch import first_failure

    # peer 1 killed; survivor 2 noticed the already-stopped peer 0 first
    metrics = [_err(1), None, _err(0), _err(1)]
    assert first_failure(metrics, [1, -9, 1, 1], {0: 0.2, 1: 0.1, 2: 0.3, 3: 0.2}) == 1
    # two crashed peers: the one seen exiting first, then the lower rank
    metrics = [_err(1), None, None, _err(2)]
    assert first_failure(metrics, [1, -9, -9, 1], {0: 1.0, 1: 0.5, 2: 0.1, 3: 1.0}) == 2
    assert first_failure(metrics, [1, -9, -9, 1], {0: 1.0, 1: 0.5, 2: 0.5, 3: 1.0}) == 1
    # a killed peer before a neighbour that crashed on the broken connection, seen together
    metrics = [None, _err(0), _err(0), None]
    assert first_failure(metrics, [1, 1, 1, -9], {0: 0.5, 1: 0.6, 2: 0.6, 3: 0.5}) == 3


def test_first_failure_diverged_stalled_and_none():
    from dice_influence.distributed.launch import first_failure

    # a peer that diverged names itself; its neighbours name it or each other
    metrics = [_err(2), _err(0), _err(2, "diverged"), _err(2)]
    assert first_failure(metrics, [1, 1, 1, 1], {0: 0.3, 1: 0.4, 2: 0.1, 3: 0.3}) == 2
    # a stalled peer killed by the launcher (absent from exited_at): named by the first to stop
    metrics = [_err(1, "stalled"), None, _err(0), _err(1, "stalled")]
    assert first_failure(metrics, [1, -9, 1, 1], {0: 2.0, 2: 2.1, 3: 2.0}) == 1
    # ... even when the survivor seen stopping first named another survivor it waited on
    metrics = [_err(1, "stalled"), None, _err(0, "stalled"), _err(1, "stalled")]
    assert first_failure(metrics, [1, -9, 1, 1], {0: 2.0, 2: 1.9, 3: 2.0}) == 1
    # all finished; all killed at the wall timeout (nobody can be singled out)
    ok = {"status": "ok", "error": None}
    assert first_failure([ok, ok], [0, 0], {0: 1.0, 1: 1.0}) is None
    assert first_failure([None, None], [-9, -9], {}) is None


def test_a_send_refused_on_a_broken_connection_is_the_peers_failure_not_a_crash():
    """gloo refuses to post an isend/irecv on a connection that is already gone (a neighbour
    died): the transport reports that neighbour and the round, as for a failed wait."""
    from dice_influence.distributed.transport import PeerFailure, _posted

    def broken(tensor, **kw):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error: Connection reset by "
                           "peer\nmore")

    with pytest.raises(PeerFailure, match="peer 3 at round 7: connection lost before we could "
                                          "send it our parameters") as info:
        _posted(3, 7, "send it our parameters", broken, None, dst=3, tag=1)
    assert (info.value.peer, info.value.round) == (3, 7) and "more" not in str(info.value)
    assert _posted(1, 0, "x", lambda tensor, **kw: (tensor, kw), 5, dst=1) == (5, {"dst": 1})
