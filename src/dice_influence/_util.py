"""Small shared helpers: atomic file writes and progress bars.

Every write goes to a uniquely named temporary file in the target folder (two writers never
share one), is flushed to disk (fsync), given the mode a plain ``open()`` would give (``0o666``
less the umask) and then renamed over the target, so a reader sees the old file or the new one,
never half of one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import uuid
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


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename) to disk; best effort where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_name(path: str | Path) -> Path:
    """A temporary path next to ``path``, unique to this call (process id + random suffix)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a unique temporary path to write ``path`` through (e.g. ``save_file(t, tmp)``); on
    success it is fsynced and renamed over ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
            digest = _digest_fd(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _WRITTEN[os.path.abspath(path)] = digest
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_WRITTEN: dict[str, dict[str, Any]] = {}
"""absolute path -> ``{"size", "sha256"}`` of the bytes this process last wrote there."""


def _digest_fd(fd: int) -> dict[str, Any]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    os.lseek(fd, 0, os.SEEK_SET)
    while chunk := os.read(fd, 1 << 20):
        h.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def written_digest(path: str | Path) -> dict[str, Any] | None:
    """``{"size", "sha256"}`` of what this process last wrote to ``path`` through
    :func:`atomic_path` (read back from the temporary file before the rename, so a file that
    another process replaced since is not mistaken for ours); None if it wrote nothing there."""
    return _WRITTEN.get(os.path.abspath(path))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (module docstring)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
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
    """Atomically write ``obj`` as indented, strict JSON: NaN and ±inf (which JSON cannot
    hold) are written as ``null``, as JavaScript's ``JSON.stringify`` does."""
    text = json.dumps(json_safe(obj), indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_benchmark(path: str | Path | None, benchmark: str) -> dict[str, Any] | None:
    """The JSON an earlier run of ``benchmark`` wrote at ``path`` (its ``"benchmark"`` key), so
    that a partial rerun can keep the records it does not replace; None when there is no such
    file, it cannot be read, or another benchmark wrote it."""
    if path is None or not Path(path).is_file():
        return None
    try:
        old = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return old if isinstance(old, dict) and old.get("benchmark") == benchmark else None


def json_safe(o: Any) -> Any:
    """``o`` with arrays/tensors as lists, numpy/torch scalars as Python numbers and
    non-finite floats as ``None``."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (str, int, bool)):
        return o
    if isinstance(o, dict):
        return {k: json_safe(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [json_safe(v) for v in o]
    if hasattr(o, "tolist"):
        return json_safe(o.tolist())
    if hasattr(o, "item"):
        return json_safe(o.item())
    raise TypeError(f"cannot serialise {type(o).__name__} to JSON")


def atomic_savefig(fig: Any, path: str | Path, **kw: Any) -> None:
    """Save a matplotlib figure atomically (PNG)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=kw.pop("format", Path(path).suffix.lstrip(".") or "png"), **kw)


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
