"""What a dataset was read from: path, size and SHA-256 of each file (recorded by every
:class:`~dice_influence.data.Dataset` and, through the run identity, by every run)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=64)
def _record(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return {"path": path, "size": size, "sha256": h.hexdigest()}


def file_records(paths: Sequence[str | Path]) -> tuple[dict[str, Any], ...]:
    """``{"path", "size", "sha256"}`` of each file (cached by path, mtime and size); raises
    ``OSError`` for a file that cannot be read."""
    out = []
    for p in paths:
        st = Path(p).stat()
        out.append(dict(_record(str(Path(p).resolve()), st.st_mtime_ns, st.st_size)))
    return tuple(out)
