"""Reading ``model.init`` (the start vector of every node; see :mod:`dice_influence.init_params`).
Kept apart from the exporter, which loads saved runs, so that :mod:`dice_influence.problem`
can import it without an import cycle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError


def load_init(path: str | Path, d: int, dtype: torch.dtype) -> torch.Tensor:
    """The flat parameter vector ``(d,)`` in ``path`` (``.npy``), as ``dtype``; one
    :class:`ConfigError` naming the file and the fix for a missing, unreadable, misshapen or
    non-finite one."""
    p = Path(path).expanduser()
    fix = ("write it with `python -m dice_influence.init_params RUN_DIR FILE.npy` or "
           f"numpy.save of a float vector of the model's {d} parameters")
    if p.suffix != ".npy":
        raise ConfigError(f"model.init={str(path)!r} must be a .npy file; {fix}")
    if not p.is_file():
        raise ConfigError(f"model.init={str(path)!r}: file not found; {fix}")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.init={str(path)!r} cannot be read as .npy ({exc}); "
                          f"{fix}") from None
    if arr.dtype.kind != "f" or arr.shape != (d,):
        raise ConfigError(f"model.init={str(path)!r} holds {arr.dtype} {arr.shape}; the model "
                          f"has {d} parameters: need a float vector of shape ({d},); {fix}")
    if not np.isfinite(arr).all():
        raise ConfigError(f"model.init={str(path)!r} holds non-finite values; {fix}")
    return torch.from_numpy(arr.copy()).to(dtype)


def init_files(cfg: Any) -> tuple[dict[str, Any], ...]:
    """``{"path", "size", "sha256"}`` of ``model.init`` (none without it), for the run
    identity."""
    init = getattr(cfg.model, "init", None)
    if not init:
        return ()
    from .data.files import file_records

    p = Path(init).expanduser()
    return file_records([p]) if p.is_file() else ()
