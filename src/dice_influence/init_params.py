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

import numpy as np

from ._init_load import init_files, load_init

__all__ = ["export_init", "init_files", "load_init"]


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
