"""Offline datasets: digits (bundled), Fashion-MNIST / MNIST (idx files), CIFAR-10 (python
batches), synthetic blobs.

Loaded datasets are cached in-process; the tensors of a returned :class:`Dataset` are shared
with that cache, so callers must never modify them in place (clone first). File readers never
execute code from the files they read: idx files are parsed byte by byte, and the CIFAR-10
"python version" batches (pickles, by upstream format) are read with a restricted unpickler that
only resolves the few numpy/codec names an array needs.

A folder the user names (``data_dir``, else ``$DICE_DATA_DIR``) is the only place looked in: if
it lacks the data that is an error, never a silent fallback to another copy. Every
:class:`Dataset` lists the files it was read from (path, size, sha256) in ``files``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError
from .readers import _read_cifar_batch, file_records, parse_idx

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")
PARTITION_SCHEMES = ("iid", "dirichlet", "shards")
CORRUPTION_KINDS = ("label_flip", "random_labels", "gaussian_noise", "inject_flip")

ENV_DATA_DIR = "DICE_DATA_DIR"
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_FOLDER = "cifar-10-batches-py"
_CIFAR10_FILES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_IDX_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


_INPUT_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)

# --------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A train/test split as tensors.

    ``x_*`` are float32, shape ``(N, C, H, W)`` for images or ``(N, D)`` for tabular data, already
    normalised when loaded with ``normalize=True``; ``y_*`` are int64 class ids in
    ``[0, num_classes)``. ``input_shape`` is the shape of one sample. Data of one's own
    (``npz``/``nodes`` files, :func:`dice_influence.from_torch`) may also hold float64 or
    integer inputs (token ids) and targets of any shape (float vectors, token sequences);
    ``num_classes`` is None when the targets are not class ids. Tensors may be shared with
    the in-process cache of :func:`load_dataset`: do not modify them in place.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int | None
    input_shape: tuple[int, ...]
    files: tuple[dict[str, Any], ...] = ()
    """The files the data was read from: ``{"path", "size", "sha256"}`` each (empty for
    generated data)."""

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype not in _INPUT_DTYPES:
                raise DataError(f"{self.name}: x_{split} has dtype {x.dtype}; use float32 "
                                "(float64, or int64 token ids, for data of one's own)")
            if y.dtype not in (torch.int64, torch.float32, torch.float64):
                raise DataError(f"{self.name}: y_{split} has dtype {y.dtype}; use int64 class "
                                "or token ids, or float targets")
            if self.num_classes is not None and y.dtype != torch.int64:
                raise DataError(f"{self.name}: y_{split} has dtype {y.dtype} but class ids "
                                "must be int64")
            if y.ndim < 1 or x.shape[0] != y.shape[0]:
                raise DataError(
                    f"{self.name}: x_{split} has {x.shape[0]} rows but y_{split} has shape "
                    f"{tuple(y.shape)}; they must match one label per sample"
                )
            if tuple(x.shape[1:]) != self.input_shape:
                raise DataError(
                    f"{self.name}: x_{split} samples have shape {tuple(x.shape[1:])} but "
                    f"input_shape is {self.input_shape}"
                )

    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of one sample's target (``()`` for class ids)."""
        return tuple(self.y_train.shape[1:])

    @property
    def input_dim(self) -> int:
        """Number of features per sample, ``prod(input_shape)``."""
        return math.prod(self.input_shape)

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _user_dirs(data_dir: str | Path | None, subfolders: Sequence[str]) -> list[Path]:
    """Candidate folders: data_dir if given, else $DICE_DATA_DIR, followed by its subfolders.
    The folder the user names is the only one: a miss there is an error, not a fallback."""
    roots: list[Path] = []
    env = os.environ.get(ENV_DATA_DIR)
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    elif env:
        roots.append(Path(env).expanduser())
    out: list[Path] = []
    for root in roots:
        for p in (root, *(root / s for s in subfolders)):
            if p not in out:
                out.append(p)
    return out


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    variants = (stem, stem.replace("-idx", ".idx"))
    for v in variants:
        for suffix in (".gz", ""):
            p = folder / f"{v}{suffix}"
            if p.is_file():
                return p
    return None


def _find_idx_set(folders: Sequence[Path]) -> dict[str, Path] | None:
    for folder in folders:
        found = {k: _find_idx_file(folder, stem) for k, stem in _IDX_STEMS.items()}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def _find_cifar_dir(folders: Sequence[Path]) -> Path | None:
    for folder in folders:
        if all((folder / f).is_file() for f in _CIFAR10_FILES):
            return folder
    return None


def _file_key(paths: Sequence[Path]) -> tuple[tuple[str, int, int], ...]:
    """Cache key that changes when any file is replaced."""
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _named(data_dir: str | Path | None) -> str:
    """Why only the named folder was searched (no fallback to another copy)."""
    if data_dir is not None:
        where = f"data_dir {str(data_dir)!r}"
        if not Path(data_dir).expanduser().is_dir():
            where += " (which does not exist)"
    elif os.environ.get(ENV_DATA_DIR):
        where = f"${ENV_DATA_DIR}={os.environ[ENV_DATA_DIR]!r}"
    else:
        return ""
    return f" (only the folder you named, {where}, is searched: fix that path or unset it)"


def _looked_in(folders: Sequence[Path]) -> str:
    if not folders:
        return f"nowhere (no --data-dir / data.data_dir given and ${ENV_DATA_DIR} is unset)"
    return ", ".join(str(f) for f in folders)


_WHERE_TO_PUT = (
    f"pass --data-dir DIR (dice train / experiment / launch), set data.data_dir in the config "
    f"or set ${ENV_DATA_DIR}"
)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=y)
    return np.sort(tr), np.sort(te)


def _to_dataset(
    name: str,
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_te: np.ndarray,
    y_te: np.ndarray,
    num_classes: int,
) -> Dataset:
    def tx(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))

    def ty(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    return Dataset(
        name=name,
        x_train=tx(x_tr),
        y_train=ty(y_tr),
        x_test=tx(x_te),
        y_test=ty(y_te),
        num_classes=num_classes,
        input_shape=tuple(x_tr.shape[1:]),
    )


def _load_digits(seed: int, test_fraction: float, normalize: bool) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    tr, te = _stratified_split(y, test_fraction, seed)
    x_tr, x_te = x[tr], x[te]
    if normalize:
        mean, std = float(x_tr.mean()), float(x_tr.std())
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return _to_dataset("digits", x_tr, y[tr], x_te, y[te], 10)


def _digits_file() -> Path:
    """The copy of the UCI digits that scikit-learn bundles (what ``load_digits`` reads)."""
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"


def _load_synthetic(
    seed: int, test_fraction: float, n: int, dim: int, classes: int, normalize: bool
) -> Dataset:
    """Gaussian blobs: centres ~ N(0, (3^2/D) I) (norm about 3), unit-variance noise."""
    rng = np.random.default_rng([seed, 0x5EED])
    centres = rng.normal(0.0, 3.0 / math.sqrt(dim), size=(classes, dim))
    y = np.arange(n, dtype=np.int64) % classes
    rng.shuffle(y)
    x = (centres[y] + rng.normal(size=(n, dim))).astype(np.float32)
    tr, te = _stratified_split(y, test_fraction, seed)
    x_tr, x_te = x[tr], x[te]
    if normalize:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0) + 1e-8
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return _to_dataset("synthetic", x_tr, y[tr], x_te, y[te], classes)


_IDX_SIGNATURES = {  # mean training pixel in [0, 1]; per-class training counts
    "fashion-mnist": (FASHION_MNIST_MEAN, "exactly 6000 per class"),
    "mnist": (MNIST_MEAN, "5421 to 6742 per class"),
}


def _check_idx_identity(name: str, x: np.ndarray, y: np.ndarray, folder: Path) -> None:
    """Refuse Fashion-MNIST files read as MNIST and the reverse: the two share the idx format
    and file names but not their statistics (mean training pixel 0.2860 vs 0.1307;
    Fashion-MNIST has exactly 6000 training images per class, MNIST 5421 to 6742)."""
    if x.size == 0 or x.dtype != np.uint8:
        return
    m = float(x.mean(dtype=np.float64)) / 255.0
    looks = [k for k, (mean, _) in _IDX_SIGNATURES.items() if abs(m - mean) < 0.03]
    if not looks or looks[0] == name:
        return
    other = looks[0]
    counts = np.bincount(y.astype(np.int64), minlength=10).tolist()
    raise DataError(
        f"data.dataset={name}, but the files in {folder} look like {other}: mean training "
        f"pixel {m:.4f} ({other}'s is {_IDX_SIGNATURES[other][0]}, {name}'s "
        f"{_IDX_SIGNATURES[name][0]}); training images per class {counts} ({other}: "
        f"{_IDX_SIGNATURES[other][1]}). Set data.dataset={other}, or point data.data_dir at "
        f"{name} files"
    )


def _load_idx_dataset(
    name: str, files: dict[str, Path], mean: float, std: float, normalize: bool
) -> Dataset:
    arrays = {k: parse_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        xi, yi = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if xi.ndim != 3 or yi.ndim != 1 or xi.shape[0] != yi.shape[0]:
            raise DataError(
                f"{name}: {split} images {xi.shape} and labels {yi.shape} do not match "
                f"(expected (N, H, W) and (N,)); check {files[f'{split}_images'].parent}"
            )
        if yi.size and (yi.min() < 0 or yi.max() > 9):
            raise DataError(f"{name}: {split} labels outside [0, 9]; the label file is corrupt")
    _check_idx_identity(name, arrays["train_images"], arrays["train_labels"],
                        files["train_images"].parent)

    def prep(a: np.ndarray) -> np.ndarray:
        x = a.astype(np.float32)[:, None, :, :]
        x /= 255.0
        if normalize:
            x -= mean
            x /= std
        return x

    return _to_dataset(
        name,
        prep(arrays["train_images"]),
        arrays["train_labels"],
        prep(arrays["test_images"]),
        arrays["test_labels"],
        10,
    )


def _load_cifar10(folder: Path, normalize: bool) -> Dataset:
    parts = [_read_cifar_batch(folder / f) for f in _CIFAR10_FILES]
    x_tr = np.concatenate([p[0] for p in parts[:5]])
    y_tr = np.concatenate([p[1] for p in parts[:5]])
    x_te, y_te = parts[5]

    def prep(a: np.ndarray) -> np.ndarray:
        x = a.astype(np.float32) / 255.0
        if normalize:
            mean = np.asarray(CIFAR10_MEAN, np.float32)[None, :, None, None]
            std = np.asarray(CIFAR10_STD, np.float32)[None, :, None, None]
            x = (x - mean) / std
        return x

    return _to_dataset("cifar10", prep(x_tr), y_tr, prep(x_te), y_te, 10)


@lru_cache(maxsize=8)
def _load_cached(key: tuple) -> Dataset:
    kind = key[0]
    if kind == "digits":
        return _load_digits(*key[1:])
    if kind == "synthetic":
        return _load_synthetic(*key[1:])
    if kind in ("fashion-mnist", "mnist"):
        _, files, _stamp, normalize = key
        mean, std = (
            (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
            if kind == "fashion-mnist"
            else (MNIST_MEAN, MNIST_STD)
        )
        return _load_idx_dataset(kind, {k: Path(p) for k, p in files}, mean, std, normalize)
    if kind == "cifar10":
        _, folder, _stamp, normalize = key
        return _load_cifar10(Path(folder), normalize)
    raise AssertionError(kind)


def _canonical_name(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    aliases = {"fmnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}
    n = aliases.get(n, n)
    if n not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    return n


def dataset_files(name: str, *, data_dir: str | Path | None = None) -> tuple[dict[str, Any], ...]:
    """The files :func:`load_dataset` reads for ``name`` (path, size, sha256), without parsing
    them; raises :class:`DataError` like the loader when they are missing."""
    n = _canonical_name(name)
    if n == "synthetic":
        return ()
    if n == "digits":
        csv = _digits_file()
        return file_records([csv]) if csv.is_file() else ()
    if n in ("fashion-mnist", "mnist"):
        files = _locate_idx(n, data_dir)
        return file_records([files[k] for k in _IDX_STEMS])
    folder = _locate_cifar(data_dir)
    return file_records([folder / f for f in _CIFAR10_FILES])


def _locate_idx(n: str, data_dir: str | Path | None) -> dict[str, Path]:
    subs = ("fashion-mnist", "FashionMNIST/raw") if n == "fashion-mnist" else ("mnist", "MNIST/raw")
    folders = _user_dirs(data_dir, subs)
    if n == "fashion-mnist" and not folders:
        folders.append(SYSTEM_FASHION_MNIST_DIR)
    files = _find_idx_set(folders)
    if files is None:
        hint = (
            "install it with `apt-get install dataset-fashion-mnist`, or put the files in a "
            f"folder and {_WHERE_TO_PUT}"
            if n == "fashion-mnist"
            else f"put the four MNIST idx files in a folder and {_WHERE_TO_PUT}"
        )
        raise DataError(
            f"{n} not found: need {', '.join(_IDX_STEMS.values())} (.gz or raw); looked in: "
            f"{_looked_in(folders)}{_named(data_dir)}; {hint}"
        )
    return files


def _locate_cifar(data_dir: str | Path | None) -> Path:
    folders = _user_dirs(data_dir, (CIFAR10_FOLDER,))
    folder = _find_cifar_dir(folders)
    if folder is None:
        raise DataError(
            f"cifar10 not found: need a {CIFAR10_FOLDER} folder with "
            f"{', '.join(_CIFAR10_FILES)}; looked in: {_looked_in(folders)}"
            f"{_named(data_dir)}; download the CIFAR-10 python version, extract it, then "
            f"{_WHERE_TO_PUT}"
        )
    return folder


def load_dataset(
    name: str,
    *,
    data_dir: str | Path | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    synthetic_samples: int = 2000,
    synthetic_dim: int = 20,
    synthetic_classes: int = 4,
    normalize: bool = True,
) -> Dataset:
    """Load a dataset by name (one of :data:`DATASETS`), cached in-process.

    ``seed`` and ``test_fraction`` only affect datasets without an official split ("digits",
    "synthetic"). File datasets are looked up in ``data_dir`` if given, else in
    ``$DICE_DATA_DIR`` (and a dataset-named subfolder); only when neither is given, Fashion-MNIST
    also in ``/usr/share/datasets/fashion-mnist``. A named folder that lacks the data raises
    :class:`DataError`. The returned tensors are shared with the cache: do not modify them in
    place; ``files`` lists what was read.
    """
    n = _canonical_name(name)
    if n in ("digits", "synthetic") and not 0.0 < test_fraction < 1.0:
        raise DataError(f"test_fraction={test_fraction} must be in (0, 1), e.g. 0.2")
    if n == "digits":
        key: tuple = ("digits", int(seed), float(test_fraction), bool(normalize))
    elif n == "synthetic":
        if synthetic_classes < 2 or synthetic_dim < 1:
            raise DataError(
                f"synthetic needs synthetic_classes >= 2 and synthetic_dim >= 1, got "
                f"{synthetic_classes} and {synthetic_dim}"
            )
        n_test = round(synthetic_samples * test_fraction)
        if min(n_test, synthetic_samples - n_test) < synthetic_classes:
            raise DataError(
                f"synthetic_samples={synthetic_samples} too small for {synthetic_classes} classes "
                f"with test_fraction={test_fraction}; use at least {10 * synthetic_classes}"
            )
        key = (
            "synthetic",
            int(seed),
            float(test_fraction),
            int(synthetic_samples),
            int(synthetic_dim),
            int(synthetic_classes),
            bool(normalize),
        )
    elif n in ("fashion-mnist", "mnist"):
        files = _locate_idx(n, data_dir)
        named = tuple(sorted((k, str(p.resolve())) for k, p in files.items()))
        key = (n, named, _file_key([Path(p) for _, p in named]), bool(normalize))
    else:  # cifar10
        folder = _locate_cifar(data_dir)
        stamp = _file_key([folder / f for f in _CIFAR10_FILES])
        key = ("cifar10", str(folder.resolve()), stamp, bool(normalize))
    return replace(_load_cached(key), files=dataset_files(n, data_dir=data_dir))
