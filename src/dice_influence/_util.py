"""Small shared helpers: atomic file writes and progress bars.

Every write goes to a uniquely named temporary file in the target folder (two writers never
share one), is flushed to disk (fsync) and then renamed over the target, so a reader sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and rename (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
def progress_bar(enabled: bool, total: int, label: str) -> Iterator[Callable[[], None]]:
    """Yields an ``advance()`` callable; draws a rich progress bar when enabled."""
    if not enabled or total < 2:
        yield lambda: None
        return
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
