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
