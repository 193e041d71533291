"""Data of one's own: one ``.npz`` file (``data.dataset: npz``) or one file per node
(``data.dataset: nodes``), read with ``allow_pickle=False`` (a file can never run code).

* ``npz``: arrays ``x_train, y_train, x_test, y_test``; split over nodes by ``data.partition``.
* ``nodes``: a folder with ``node_<k>.npz`` (arrays ``x``, ``y``) for ``k = 0..n-1`` and
  ``test.npz`` (``x``, ``y``), the shared test set. Each node's file is its data, as in a real
  peer-to-peer network; a peer reads its own file and ``test.npz`` only
  (:func:`load_node_file`).

Inputs may be float (any shape) or integer (token ids); targets any shape: int class ids,
float vectors or int token sequences. Float arrays are kept as float32/float64 (the run casts
them to ``train.dtype``), integer arrays become int64. Every array must be finite.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import Dataset
from .errors import DataError
from .files import file_records

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: str | Path, keys: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """Arrays ``keys`` of the ``.npz`` file ``path`` (``allow_pickle=False``; one
    :class:`DataError` naming the file and the fix for anything wrong)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{what}: {str(p)!r} is not a file; give the path of an .npz written "
                        f"by numpy.savez with arrays {', '.join(keys)}")
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in keys if k not in f.files]
            if missing:
                raise DataError(f"{what}: {p} lacks array(s) {', '.join(missing)} (it holds "
                                f"{', '.join(f.files) or 'nothing'}); save them with "
                                f"numpy.savez({p.name!r}, {', '.join(f'{k}=...' for k in keys)})")
            out = {k: f[k] for k in keys}
    except DataError:
        raise
    except ValueError as exc:  # object arrays need pickle: refused
        raise DataError(f"{what}: {p} holds an array that needs pickle ({exc}); save plain "
                        "numeric arrays (numpy.savez of float/int arrays)") from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{what}: {p} is not a readable .npz file ({exc}); write it with "
                        "numpy.savez") from None
    for k, a in out.items():
        out[k] = _numeric(a, f"{what}: {p}[{k!r}]")
    return out


def _numeric(a: np.ndarray, where: str) -> np.ndarray:
    if a.ndim == 0:
        raise DataError(f"{where} is a scalar; it needs one row per sample")
    if a.dtype.kind == "b":
        a = a.astype(np.int64)
    if a.dtype.kind in "iu":
        return a.astype(np.int64, copy=False)
    if a.dtype.kind == "f":
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float32)
        if not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise DataError(f"{where} holds {bad} NaN/inf value(s); clean the data first")
        return a
    raise DataError(f"{where} has dtype {a.dtype}; use float (features, float targets) or "
                    "int (class or token ids)")


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def _num_classes(*ys: np.ndarray) -> int | None:
    """Class count for 1-D integer targets (class ids), None otherwise."""
    if any(y.ndim != 1 or y.dtype.kind not in "iu" for y in ys):
        return None
    lo = min(int(y.min()) for y in ys if y.size)
    if lo < 0:
        return None
    return 1 + max(int(y.max()) for y in ys if y.size)


def make_dataset(name: str, x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray,
                 y_te: np.ndarray, files: tuple[dict[str, Any], ...] = (), *,
                 where: str = "data") -> Dataset:
    """A :class:`Dataset` from arrays of one's own (shapes checked, with the fix named)."""
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if len(x) != len(y):
            raise DataError(f"{where}: x_{split} has {len(x)} samples but y_{split} has "
                            f"{len(y)}; they need one target per sample")
        if len(x) == 0:
            raise DataError(f"{where}: x_{split} holds no samples")
    if x_tr.shape[1:] != x_te.shape[1:] or y_tr.shape[1:] != y_te.shape[1:]:
        raise DataError(f"{where}: train samples are x {x_tr.shape[1:]}, y {y_tr.shape[1:]} but "
                        f"test samples x {x_te.shape[1:]}, y {y_te.shape[1:]}; they must match")
    if (x_tr.dtype.kind == "f") != (x_te.dtype.kind == "f"):
        raise DataError(f"{where}: x_train is {x_tr.dtype} but x_test is {x_te.dtype}; use one "
                        "kind (float features or int token ids)")
    return Dataset(name=name, x_train=_tensor(x_tr), y_train=_tensor(y_tr),
                   x_test=_tensor(x_te), y_test=_tensor(y_te),
                   num_classes=_num_classes(y_tr, y_te), input_shape=tuple(x_tr.shape[1:]),
                   files=files)


def load_npz(path: str | Path) -> Dataset:
    """``data.dataset: npz``: the arrays ``x_train, y_train, x_test, y_test`` of one file."""
    arrs = read_npz(path, NPZ_KEYS, "data.path")
    return make_dataset("npz", arrs["x_train"], arrs["y_train"], arrs["x_test"], arrs["y_test"],
                        file_records([Path(path).expanduser()]), where=f"data.path {path}")


def node_file(folder: str | Path, k: int) -> Path:
    return Path(folder).expanduser() / f"node_{k}.npz"


def test_file(folder: str | Path) -> Path:
    return Path(folder).expanduser() / "test.npz"


def _check_folder(folder: str | Path, n: int) -> Path:
    d = Path(folder).expanduser()
    if not d.is_dir():
        raise DataError(f"data.path {str(d)!r} is not a folder; data.dataset=nodes needs a "
                        "folder with node_0.npz .. node_<n-1>.npz and test.npz")
    found = sorted(p.name for p in d.glob("node_*.npz"))
    want = [f"node_{k}.npz" for k in range(n)]
    missing = [w for w in want if w not in found]
    if missing:
        raise DataError(f"data.path {d}: missing {', '.join(missing[:4])}"
                        f"{' ...' if len(missing) > 4 else ''} for topology.n={n}; give one "
                        f"node_<k>.npz (arrays x, y) per node, or set topology.n to the number "
                        f"of node files ({len(found)})")
    extra = [f for f in found if f not in want]
    if extra:
        raise DataError(f"data.path {d} holds {', '.join(extra[:4])} beyond topology.n={n}; set "
                        f"topology.n={len(found)} or remove the extra files")
    return d


def load_nodes(folder: str | Path, n: int, *, only: int | None = None
               ) -> tuple[Dataset, list[np.ndarray]]:
    """``data.dataset: nodes``: the per-node files as one :class:`Dataset` (nodes' samples one
    after another) and each node's index range into it. With ``only=k`` just node ``k``'s file
    (and ``test.npz``) is read: the others contribute no samples (a peer's view)."""
    d = _check_folder(folder, n)
    xs, ys, paths = [], [], []
    for k in range(n):
        if only is not None and k != only:
            continue
        arrs = read_npz(node_file(d, k), ("x", "y"), f"node {k}")
        if len(arrs["x"]) != len(arrs["y"]):
            raise DataError(f"node {k}: {node_file(d, k)} has {len(arrs['x'])} inputs but "
                            f"{len(arrs['y'])} targets; they need one target per sample")
        if len(arrs["x"]) == 0:
            raise DataError(f"node {k}: {node_file(d, k)} holds no samples; every node needs "
                            "at least batch_size samples")
        xs.append(arrs["x"])
        ys.append(arrs["y"])
        paths.append(node_file(d, k))
    test = read_npz(test_file(d), ("x", "y"), "the shared test set")
    paths.append(test_file(d))
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if x.shape[1:] != xs[0].shape[1:] or y.shape[1:] != ys[0].shape[1:]:
            k = i if only is None else only
            raise DataError(f"node {k}: samples are x {x.shape[1:]}, y {y.shape[1:]} but node 0's "
                            f"are x {xs[0].shape[1:]}, y {ys[0].shape[1:]}; every node's samples "
                            "must have one shape")
    sizes = [len(x) for x in xs]
    cuts = np.cumsum([0, *sizes])
    ranges = [np.arange(a, b, dtype=np.int64) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    if only is not None:
        empty = np.zeros(0, dtype=np.int64)
        ranges = [ranges[0] if k == only else empty for k in range(n)]
    ds = make_dataset("nodes", np.concatenate(xs), np.concatenate(ys), test["x"], test["y"],
                      file_records(paths), where=f"data.path {d}")
    return ds, ranges


def nodes_files(folder: str | Path, n: int, only: int | None = None) -> list[Path]:
    """The files a ``nodes`` run reads (all nodes', or node ``only``'s, plus ``test.npz``)."""
    ks = range(n) if only is None else [only]
    return [node_file(folder, k) for k in ks] + [test_file(folder)]
