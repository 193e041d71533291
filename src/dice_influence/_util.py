"""Small shared helpers: atomic file writes (following the umask) and progress bars."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file and rename (never half-written).

    The file gets the mode a plain ``open()`` would give (``0o666`` less the umask), not the
    ``0o600`` of :func:`tempfile.mkstemp`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, Any],
                 metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically, with the umask's mode (``safetensors.torch.
    save_file`` creates ``0o600`` files)."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


def did_you_mean(word: str, choices: Any) -> str:
    """``" (did you mean 'ring'?)"`` for the closest of ``choices`` to ``word``, else ``""``."""
    import difflib

    close = difflib.get_close_matches(str(word).lower(), [str(c) for c in choices], n=2,
                                      cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def csv_text(rows: list[dict[str, Any]]) -> str:
    """CSV text with a header from the first row's keys ("" for no rows)."""
    import csv
    import io

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return buf.getvalue()


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def atomic_savefig(fig: Any, path: str | Path, **kw: Any) -> None:
    """Save a matplotlib figure atomically (PNG)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, **kw)
    os.replace(tmp, path)


@contextmanager
def progress_bar(
    enabled: bool, total: int, label: str, *, every_s: float = 10.0
) -> Iterator[Callable[[], None]]:
    """Yields an ``advance()`` callable for a loop of ``total`` steps.

    When enabled: a rich progress bar on a terminal; elsewhere (logs, CI, pipes) one plain line
    on stderr at most every ``every_s`` seconds and a last line when done, so a long phase is
    never silent and a log is never flooded. Disabled, or fewer than 2 steps: nothing."""
    if not enabled or total < 2:
        yield lambda: None
        return
    from rich.console import Console

    if Console().is_terminal:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn(f"[bold]{label}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeRemainingColumn(),
            transient=True,
        ) as prog:
            task = prog.add_task(label, total=total)
            yield lambda: prog.advance(task)
        return
    yield from _plain_progress(total, label, every_s)


def _plain_progress(total: int, label: str, every_s: float) -> Iterator[Callable[[], None]]:
    start = time.perf_counter()
    state = {"done": 0, "last": start, "printed": False}

    def line(done: int, now: float) -> None:
        sys.stderr.write(f"{label}: {done}/{total} ({100 * done // total}%), "
                         f"{now - start:.1f} s\n")
        sys.stderr.flush()
        state["printed"] = True

    def advance() -> None:
        state["done"] += 1
        now = time.perf_counter()
        if now - state["last"] >= every_s and state["done"] < total:
            state["last"] = now
            line(state["done"], now)

    yield advance
    now = time.perf_counter()
    if state["printed"] or now - start >= every_s:
        line(state["done"], now)
