"""Peers of ``dice launch`` stop when their launcher dies, and leave no rendezvous folder.

The launcher names its rendezvous folder ``<tmp>/dice-rdv-<launcher pid>-<random>``. Each local
peer (see :func:`start`) then

- asks Linux to send it ``SIGTERM`` when its parent (the fork server, which itself exits as
  soon as the launcher is gone) dies (``prctl(PR_SET_PDEATHSIG)`` through ctypes), and handles
  ``SIGTERM`` by removing the rendezvous folder and exiting;
- watches the launcher's pid from a daemon thread (every 0.2 s: the prompt path, which works
  even while the main thread waits inside gloo, and on systems without ``prctl``).

So ``kill -9`` of the launcher stops every peer within a fraction of a second instead of
leaving them to train to the end. :func:`sweep_stale` removes rendezvous folders of launchers
that no longer run (any that a crash left behind), at the next launch.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

PREFIX = "dice-rdv-"
EXIT_CODE = 143  # 128 + SIGTERM, as a shell reports a process stopped by SIGTERM


def rendezvous_dir() -> str:
    """A fresh rendezvous folder named after this (launcher) process."""
    return tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-")


def _launcher_of(init: str) -> tuple[int | None, Path | None]:
    """(launcher pid, rendezvous folder) encoded in a ``file://`` init method, else Nones."""
    if not init.startswith("file://"):
        return None, None
    folder = Path(init[len("file://"):]).parent
    if not folder.name.startswith(PREFIX):
        return None, None
    try:
        return int(folder.name[len(PREFIX):].split("-", 1)[0]), folder
    except ValueError:
        return None, folder


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def start(init: str) -> None:
    """In a local peer: stop (exit code 143) when the launcher behind ``init`` dies."""
    pid, folder = _launcher_of(init)
    if pid is None:
        return

    def stop(*_: object) -> None:
        gone = not _alive(pid)
        if folder is not None and gone:
            shutil.rmtree(folder, ignore_errors=True)
        why = f"launcher (pid {pid}) is gone" if gone else "stopped by SIGTERM"
        sys.stderr.write(f"{why}: this peer stops\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE)

    signal.signal(signal.SIGTERM, stop)
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        except (OSError, AttributeError):
            pass
    if not _alive(pid):  # died before the request above took effect
        stop()

    def watch() -> None:
        while _alive(pid):
            time.sleep(0.2)
        stop()

    threading.Thread(target=watch, name="dice-launcher-watch", daemon=True).start()


def sweep_stale() -> list[Path]:
    """Remove this user's rendezvous folders whose launcher no longer runs; return them."""
    gone = []
    for d in Path(tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        try:
            pid = int(d.name[len(PREFIX):].split("-", 1)[0])
            mine = d.stat().st_uid == os.getuid()
        except (ValueError, OSError):
            continue
        if mine and d.is_dir() and not _alive(pid):
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
    return gone
