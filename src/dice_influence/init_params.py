"""Start a run from given parameters (``model.init``): e.g. a shared model pretrained on other
data, which every node (and every counterfactual retraining) then fine-tunes.

``model.init: FILE.npy`` holds one flat parameter vector ``(d,)`` (the order of
:meth:`~dice_influence.models.FunctionalModel.flat_init`), read with ``allow_pickle=False`` and
cast to the run's dtype; every node starts from it (``train.same_init`` does not apply). The
file is recorded (path, size, sha256) with the run's data files, so the run identity changes
when it does.

``python -m dice_influence.init_params RUN_DIR FILE.npy`` writes the network average of a
saved run's last round (e.g. ``dice train configs/lm-pretrain.yaml --out runs/lm-pretrain``):
the pretraining phase of ``docs/language-model.md``.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
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


def export_init(run_dir: str | Path, out: str | Path) -> np.ndarray:
    """Write the network average of ``run_dir``'s last round to ``out`` (``.npy``, float64
    kept as the run's dtype) atomically; returns the vector."""
    from ._util import atomic_write_bytes
    from .trajectory import Trajectory

    traj = Trajectory.load(run_dir)
    vec = traj.theta.mean(0).detach().cpu().numpy()
    buf = io.BytesIO()
    np.save(buf, vec, allow_pickle=False)
    atomic_write_bytes(Path(out), buf.getvalue())
    return vec


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dice_influence.init_params",
        description="Write the network average of a saved run's last round as a .npy file "
                    "for model.init.")
    ap.add_argument("run_dir", help="a run directory written by `dice train`")
    ap.add_argument("out", help="output .npy file")
    a = ap.parse_args(argv)
    if not a.out.endswith(".npy"):
        print(f"error: out={a.out!r} must end in .npy", file=sys.stderr)
        return 2
    try:
        vec = export_init(a.run_dir, a.out)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {a.out}: {vec.size} parameters (network average at the last round of "
          f"{a.run_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
