"""Datasets, node partitions, corruptions and seeded batch schedules.

Everything here is deterministic given its seeds. Loaded datasets are cached in-process; the
tensors of a returned :class:`Dataset` are shared with that cache, so callers must never modify
them in place (clone first). :func:`make_node_data` always copies.

File readers never execute code from the files they read: idx files are parsed byte by byte,
and the CIFAR-10 "python version" batches (pickles, by upstream format) are read with a
restricted unpickler that only resolves the few numpy/codec names an array needs.
"""

from __future__ import annotations

import gzip
import importlib
import math
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "PARTITION_SCHEMES",
    "CORRUPTION_KINDS",
    "BatchSchedule",
    "Corruption",
    "DataError",
    "Dataset",
    "NodeData",
    "gather_batch",
    "load_dataset",
    "make_node_data",
    "node_test_splits",
    "parse_idx",
    "partition",
]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")
PARTITION_SCHEMES = ("iid", "dirichlet", "shards")
CORRUPTION_KINDS = ("label_flip", "random_labels", "gaussian_noise")

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


class DataError(ValueError):
    """A dataset, partition, corruption or schedule request that cannot be honoured."""


# --------------------------------------------------------------------------------------------
# Dataset container
# --------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """A train/test split as tensors.

    ``x_*`` are float32, shape ``(N, C, H, W)`` for images or ``(N, D)`` for tabular data, already
    normalised when loaded with ``normalize=True``; ``y_*`` are int64 class ids in
    ``[0, num_classes)``. ``input_shape`` is the shape of one sample. Tensors may be shared with
    the in-process cache of :func:`load_dataset`: do not modify them in place.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.float32:
                raise DataError(f"{self.name}: x_{split} has dtype {x.dtype}; use float32")
            if y.dtype != torch.int64:
                raise DataError(f"{self.name}: y_{split} has dtype {y.dtype}; use int64")
            if y.ndim != 1 or x.shape[0] != y.shape[0]:
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
# File readers
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the file starts with the gzip magic."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path}: corrupt gzip stream ({exc}); re-download the file") from exc
    return raw


def parse_idx(path: str | Path) -> np.ndarray:
    """Parse an idx file (MNIST format, optionally gzipped) into a numpy array.

    Header: two zero bytes, a dtype code (0x08 ubyte, 0x09 sbyte, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64, all big-endian), the number of dims, then one big-endian uint32
    per dim. Raises :class:`DataError` on a bad magic, truncated or oversized payload.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"idx file {path} does not exist")
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: only {len(data)} bytes; not an idx file (needs a 4-byte magic)")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: bad idx magic 0x{data[:4].hex()} (expected 0x0000 then a dtype code in "
            f"{[hex(c) for c in _IDX_DTYPES]} and a dim count); the file is corrupt or not idx"
        )
    if ndim == 0:
        raise DataError(f"{path}: idx header declares 0 dimensions; the file is corrupt")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header ({len(data)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = math.prod(dims) * dtype.itemsize
    got = len(data) - header
    if got != expected:
        raise DataError(
            f"{path}: idx payload has {got} bytes but dims {dims} of {dtype} need {expected}; "
            "the file is truncated or corrupt, re-download it"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the names needed to rebuild numpy arrays and bytes."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise DataError(
                f"refusing to unpickle {module}.{name}: CIFAR-10 batches only contain arrays, "
                "lists and bytes; the file is not a genuine CIFAR-10 python batch"
            )
        if module.startswith("numpy.core"):
            try:
                return getattr(importlib.import_module("numpy._core" + module[10:]), name)
            except (ImportError, AttributeError):
                pass
        return getattr(importlib.import_module(module), name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch -> (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    The upstream format is a pickle. This is the only pickle read in the package, and only of a
    local file the user provides; :class:`_ArrayOnlyUnpickler` (``encoding="bytes"`` for the
    Python-2 pickles) refuses any global beyond numpy array reconstruction, so no code runs.
    """
    try:
        with path.open("rb") as fh:
            batch = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from exc
    except Exception as exc:  # any unpickling failure means a corrupt file
        raise DataError(f"{path}: cannot read CIFAR-10 batch ({exc}); re-download it") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(batch).__name__}")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: CIFAR-10 batch lacks b'data' or b'labels' (keys: {list(batch)})")
    data = np.asarray(data)
    labels = np.asarray(labels, dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"{path}: b'data' has dtype {data.dtype} shape {data.shape}; expected uint8 (N, 3072)"
        )
    if labels.shape != (data.shape[0],) or (labels.size and (labels.min() < 0 or labels.max() > 9)):
        raise DataError(f"{path}: b'labels' must be {data.shape[0]} ints in [0, 9]")
    return data.reshape(-1, 3, 32, 32), labels


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def _user_dirs(data_dir: str | Path | None, subfolders: Sequence[str]) -> list[Path]:
    """Candidate folders: data_dir, then $DICE_DATA_DIR, each followed by its subfolders."""
    roots: list[Path] = []
    if data_dir is not None:
        roots.append(Path(data_dir).expanduser())
    env = os.environ.get(ENV_DATA_DIR)
    if env:
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


def _looked_in(folders: Sequence[Path]) -> str:
    return ", ".join(str(f) for f in folders) if folders else "(nowhere)"


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
    "synthetic"). File datasets are looked up in ``data_dir``, then ``$DICE_DATA_DIR`` (and a
    dataset-named subfolder of each); Fashion-MNIST also in ``/usr/share/datasets/fashion-mnist``.
    The returned tensors are shared with the cache: do not modify them in place.
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
        subs = (
            ("fashion-mnist", "FashionMNIST/raw")
            if n == "fashion-mnist"
            else ("mnist", "MNIST/raw")
        )
        folders = _user_dirs(data_dir, subs)
        if n == "fashion-mnist":
            folders.append(SYSTEM_FASHION_MNIST_DIR)
        files = _find_idx_set(folders)
        if files is None:
            hint = (
                "install it with `apt-get install dataset-fashion-mnist` or pass --data-dir / "
                f"set {ENV_DATA_DIR}"
                if n == "fashion-mnist"
                else f"put the four MNIST idx files there, then pass --data-dir / set {ENV_DATA_DIR}"
            )
            raise DataError(
                f"{n} not found: need {', '.join(_IDX_STEMS.values())} (.gz or raw); looked in "
                f"{_looked_in(folders)}; {hint}"
            )
        named = tuple(sorted((k, str(p.resolve())) for k, p in files.items()))
        key = (n, named, _file_key([Path(p) for _, p in named]), bool(normalize))
    else:  # cifar10
        folders = _user_dirs(data_dir, (CIFAR10_FOLDER,))
        folder = _find_cifar_dir(folders)
        if folder is None:
            raise DataError(
                f"cifar10 not found: need a {CIFAR10_FOLDER} folder with "
                f"{', '.join(_CIFAR10_FILES)}; looked in {_looked_in(folders)}; download the "
                f"CIFAR-10 python version, extract it, then pass --data-dir / set {ENV_DATA_DIR}"
            )
        stamp = _file_key([folder / f for f in _CIFAR10_FILES])
        key = ("cifar10", str(folder.resolve()), stamp, bool(normalize))
    return replace(_load_cached(key))


# --------------------------------------------------------------------------------------------
# Partitions
# --------------------------------------------------------------------------------------------

_SCHEME_RE = re.compile(r"^\s*([a-z_]+)\s*(?:\(\s*([^()]*?)\s*\))?\s*$")


def _rng(*keys: int) -> np.random.Generator:
    if any(int(k) < 0 for k in keys):
        raise DataError(f"seeds must be non-negative integers, got {keys}")
    return np.random.default_rng([int(k) for k in keys])


def _parse_scheme(scheme: str, alpha: float, classes_per_node: int) -> tuple[str, float, int]:
    m = _SCHEME_RE.match(scheme.lower())
    if m is None or m.group(1) not in PARTITION_SCHEMES:
        raise DataError(
            f"unknown partition scheme {scheme!r}; use iid, dirichlet, dirichlet(ALPHA), shards or "
            "shards(CLASSES_PER_NODE)"
        )
    kind, arg = m.group(1), m.group(2)
    if arg:
        try:
            if kind == "dirichlet":
                alpha = float(arg)
            elif kind == "shards":
                classes_per_node = int(arg)
            else:
                raise ValueError
        except ValueError:
            raise DataError(
                f"bad parameter {arg!r} in scheme {scheme!r}; use dirichlet(0.5) or shards(2)"
            ) from None
    return kind, alpha, classes_per_node


def _largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integers >= 0 summing to ``total``, proportional to ``weights`` (largest remainder)."""
    w = np.asarray(weights, dtype=np.float64)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if w.sum() <= 0:
        w = np.ones_like(w)
    raw = total * w / w.sum()
    out = np.floor(raw).astype(np.int64)
    short = total - int(out.sum())
    if short > 0:
        out[np.argsort(-(raw - out), kind="stable")[:short]] += 1
    return out


def _partition_iid(n_labels: int, n_nodes: int, m: int, rng: np.random.Generator) -> list:
    perm = rng.permutation(n_labels)
    return [perm[k * m : (k + 1) * m] for k in range(n_nodes)]


def _class_pools(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    classes = np.unique(labels)
    return classes, [rng.permutation(np.flatnonzero(labels == c)) for c in classes]


def _partition_dirichlet_all(
    labels: np.ndarray, n_nodes: int, alpha: float, rng: np.random.Generator
) -> list:
    """Standard label skew: each class split over nodes by Dirichlet(alpha) proportions."""
    _, pools = _class_pools(labels, rng)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
    for pool in pools:
        props = rng.dirichlet(np.full(n_nodes, alpha))
        counts = _largest_remainder(len(pool), props)
        for k, chunk in enumerate(np.split(pool, np.cumsum(counts)[:-1])):
            parts[k].append(chunk)
    out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
    # Give every empty node one sample from the currently largest node.
    for k in range(n_nodes):
        if len(out[k]) == 0:
            big = int(np.argmax([len(p) for p in out]))
            out[k], out[big] = out[big][-1:], out[big][:-1]
    return out


def _partition_dirichlet_fixed(
    labels: np.ndarray, n_nodes: int, m: int, alpha: float, rng: np.random.Generator
) -> list:
    """Each node draws a class mix q ~ Dirichlet(alpha) and takes m samples accordingly."""
    _, pools = _class_pools(labels, rng)
    left = np.array([len(p) for p in pools], dtype=np.int64)
    used = np.zeros(len(pools), dtype=np.int64)
    parts: list[np.ndarray] = [np.empty(0, np.int64)] * n_nodes
    for k in rng.permutation(n_nodes):
        q = rng.dirichlet(np.full(len(pools), alpha))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # tiny alpha underflow
            q = np.eye(len(pools))[rng.integers(len(pools))]
        take = np.zeros(len(pools), dtype=np.int64)
        need = m
        while need > 0:  # when a class pool runs out, spread the rest over the others
            avail = left - take
            w = np.where(avail > 0, q, 0.0)
            if w.sum() <= 0:
                w = (avail > 0).astype(np.float64)
            add = np.minimum(_largest_remainder(need, w), avail)
            take += add
            need -= int(add.sum())
        chunks = [pools[c][used[c] : used[c] + take[c]] for c in range(len(pools)) if take[c]]
        used += take
        left -= take
        parts[k] = np.concatenate(chunks)
    return parts


def _shard_flow(
    node_classes: list[list[int]], counts: np.ndarray, m: int, cap: int
) -> np.ndarray | None:
    """Integral max-flow: per-(node, class) counts, each <= ``cap``, giving every node m samples
    from its own classes within the class sizes ``counts``; None if infeasible."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import maximum_flow

    n_nodes, n_cls = len(node_classes), len(counts)
    src, sink = 0, n_nodes + n_cls + 1
    rows = [src] * n_nodes + [n_nodes + 1 + c for c in range(n_cls)]
    cols = list(range(1, n_nodes + 1)) + [sink] * n_cls
    caps = [m] * n_nodes + [int(v) for v in counts]
    for k, cl in enumerate(node_classes):
        rows += [k + 1] * len(cl)
        cols += [n_nodes + 1 + c for c in cl]
        caps += [cap] * len(cl)
    size = sink + 1
    graph = csr_array(
        (np.asarray(caps, dtype=np.int32), (np.asarray(rows), np.asarray(cols))), shape=(size, size)
    )
    res = maximum_flow(graph, src, sink)
    if res.flow_value < m * n_nodes:
        return None
    flow = res.flow.toarray() if hasattr(res.flow, "toarray") else np.asarray(res.flow)
    return np.clip(flow[1 : n_nodes + 1, n_nodes + 1 : sink], 0, None).astype(np.int64)


def _balanced_shard_alloc(
    node_classes: list[list[int]], counts: np.ndarray, m: int
) -> np.ndarray | None:
    """Feasible per-(node, class) counts minimising the largest count (most even), or None."""
    cpn = len(node_classes[0])
    alloc = _shard_flow(node_classes, counts, m, m)
    if alloc is None:
        return None
    lo, hi = -(-m // cpn), int(alloc.max())
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _shard_flow(node_classes, counts, m, mid)
        if trial is None:
            lo = mid + 1
        else:
            alloc, hi = trial, int(trial.max())
    return alloc


def _random_shard_layout(
    n_nodes: int, cpn: int, order: np.ndarray, rng: np.random.Generator
) -> list[list[int]] | None:
    """Deal n_nodes * cpn class slots (each class used equally often, +-1) to nodes at random,
    then swap slots until no node holds a class twice. None if repair fails."""
    n_cls = len(order)
    grid = order[np.arange(n_nodes * cpn) % n_cls].copy()
    rng.shuffle(grid)
    grid = grid.reshape(n_nodes, cpn)
    for _ in range(10 * n_nodes * cpn + 10):
        bad = [k for k in range(n_nodes) if len(set(grid[k].tolist())) < cpn]
        if not bad:
            return [[int(c) for c in row] for row in grid]
        k = bad[0]
        row = grid[k].tolist()
        j = next(i for i in range(cpn) if row[i] in row[:i])
        c = row[j]
        ok = [
            (k2, j2)
            for k2 in range(n_nodes)
            if k2 != k and c not in grid[k2]
            for j2 in range(cpn)
            if grid[k2, j2] not in grid[k]
        ]
        if not ok:
            return None
        k2, j2 = ok[int(rng.integers(len(ok)))]
        grid[k, j], grid[k2, j2] = grid[k2, j2], c
    return None


def _partition_shards(
    labels: np.ndarray, n_nodes: int, m: int, cpn: int, strict: bool, rng: np.random.Generator
) -> list:
    """Each node gets m samples from ``cpn`` distinct classes, as evenly split as possible.

    Which classes each node holds (its layout) is the first of these that works: node k takes
    classes ``perm[(k * cpn + j) % C]`` (tiling), ``perm[(k + j * n) % C]`` (circulant), three
    seeded random deals (class slots dealt evenly, distinct per node), then strides cpn - 1 and 1
    (``perm`` is a seeded class permutation, j < cpn). If none can give m samples per node: raise
    when ``strict`` (explicit samples_per_node), else use the largest equal size one allows.
    """
    classes, pools = _class_pools(labels, rng)
    n_cls = len(classes)
    if cpn > n_cls:
        raise DataError(
            f"classes_per_node={cpn} exceeds the {n_cls} classes present; use at most {n_cls}"
        )
    order = rng.permutation(n_cls)
    counts = np.array([len(p) for p in pools], dtype=np.int64)

    def layouts():  # lazily, most structured first
        def strided(s: int) -> list[list[int]]:
            return [[int(order[(k * s + j) % n_cls]) for j in range(cpn)] for k in range(n_nodes)]

        yield strided(cpn)
        yield [[int(order[(k + j * n_nodes) % n_cls]) for j in range(cpn)] for k in range(n_nodes)]
        for _ in range(3):
            yield _random_shard_layout(n_nodes, cpn, order, rng)
        yield strided(max(1, cpn - 1))
        yield strided(1)

    even = -(-m // cpn)
    tried: list[list[list[int]]] = []
    found = None
    for nc in layouts():  # prefer a layout allowing a perfectly even split
        if nc is None or any(len(set(row)) != cpn for row in nc):
            continue
        tried.append(nc)
        if (alloc := _shard_flow(nc, counts, m, even)) is not None:
            found = (nc, alloc)
            break
    if found is None:
        m_ok = m if strict else 0
        best = None
        for nc in tried:  # largest feasible equal size (m itself when strict)
            lo, hi = m_ok, m
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (
                    (mid, hi) if _shard_flow(nc, counts, mid, mid) is not None else (lo, mid - 1)
                )
            if lo >= max(m_ok, 1) and _shard_flow(nc, counts, lo, lo) is not None:
                if best is None or lo > best[0]:
                    best = (lo, nc)
                if lo == m:
                    break
        if best is not None:
            found = (best[1], _balanced_shard_alloc(best[1], counts, best[0]))
    if found is None:
        raise DataError(
            f"shards: cannot give each of {n_nodes} nodes {m} samples from only {cpn} classes "
            f"each (class sizes {counts.tolist()}); use a smaller samples_per_node or a larger "
            "classes_per_node"
        )
    node_classes, alloc = found
    used = np.zeros(n_cls, dtype=np.int64)
    parts = []
    for k in range(n_nodes):
        chunks = []
        for c in node_classes[k]:
            chunks.append(pools[c][used[c] : used[c] + alloc[k, c]])
            used[c] += alloc[k, c]
        parts.append(np.concatenate(chunks))
    return parts


def partition(
    labels: np.ndarray | torch.Tensor,
    n_nodes: int,
    *,
    scheme: str = "iid",
    samples_per_node: int | None = None,
    alpha: float = 1.0,
    classes_per_node: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split dataset indices over ``n_nodes`` disjoint, fixed (no replacement) local sets.

    Schemes: "iid" (random), "dirichlet" / "dirichlet(ALPHA)" (label skew; smaller alpha = more
    skewed), "shards" / "shards(K)" (each node holds at most K = ``classes_per_node`` classes).
    ``samples_per_node=None`` splits everything evenly (floor ``N / n_nodes`` each), except plain
    dirichlet, which uses every sample and yields unequal sizes (each node gets >= 1 sample), and
    shards when class sizes cannot fill that many from few classes (then the largest equal size).
    Returns one sorted int64 index array per node.
    """
    y = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    y = y.reshape(-1).astype(np.int64)
    kind, alpha, cpn = _parse_scheme(scheme, alpha, classes_per_node)
    n_total = len(y)
    if int(n_nodes) != n_nodes or n_nodes < 1:
        raise DataError(f"n_nodes={n_nodes} must be a positive integer")
    n_nodes = int(n_nodes)
    if not (math.isfinite(alpha) and alpha > 0):
        raise DataError(f"dirichlet alpha={alpha} must be > 0 (e.g. 0.1 skewed, 100 near-iid)")
    if cpn < 1:
        raise DataError(f"classes_per_node={cpn} must be >= 1")
    if samples_per_node is not None:
        if samples_per_node < 1:
            raise DataError(f"samples_per_node={samples_per_node} must be >= 1")
        if samples_per_node * n_nodes > n_total:
            raise DataError(
                f"samples_per_node={samples_per_node} x n_nodes={n_nodes} = "
                f"{samples_per_node * n_nodes} exceeds the {n_total} samples available; use "
                f"samples_per_node <= {n_total // n_nodes} or fewer nodes"
            )
    elif n_total < n_nodes:
        raise DataError(f"{n_total} samples cannot cover n_nodes={n_nodes}; use fewer nodes")
    rng = _rng(seed)
    m = samples_per_node if samples_per_node is not None else n_total // n_nodes
    if kind == "iid":
        parts = _partition_iid(n_total, n_nodes, m, rng)
    elif kind == "dirichlet":
        if samples_per_node is None:
            parts = _partition_dirichlet_all(y, n_nodes, alpha, rng)
        else:
            parts = _partition_dirichlet_fixed(y, n_nodes, m, alpha, rng)
    else:
        parts = _partition_shards(y, n_nodes, m, cpn, samples_per_node is not None, rng)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


# --------------------------------------------------------------------------------------------
# Corruptions and per-node data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corruption:
    """Declarative corruption of a seeded ``fraction`` of each listed node's samples.

    kinds: "label_flip" (y -> permutation[y], default (y + 1) mod C), "random_labels" (uniform
    over the C - 1 wrong labels, so every chosen sample really changes), "gaussian_noise" (adds
    N(0, sigma^2) to every feature, in normalised feature units). The number of altered samples
    on node k is round(fraction * size_k).
    """

    kind: str
    nodes: tuple[int, ...]
    fraction: float = 1.0
    sigma: float = 1.0
    permutation: tuple[int, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in CORRUPTION_KINDS:
            raise DataError(
                f"unknown corruption kind {self.kind!r}; use one of {', '.join(CORRUPTION_KINDS)}"
            )
        object.__setattr__(self, "nodes", tuple(int(k) for k in self.nodes))
        if self.permutation is not None:
            object.__setattr__(self, "permutation", tuple(int(c) for c in self.permutation))
        if not 0.0 <= self.fraction <= 1.0:
            raise DataError(f"corruption fraction={self.fraction} must be in [0, 1]")
        if self.kind == "gaussian_noise" and not (math.isfinite(self.sigma) and self.sigma > 0):
            raise DataError(f"gaussian_noise sigma={self.sigma} must be > 0")
        if self.seed < 0:
            raise DataError(f"corruption seed={self.seed} must be >= 0")

    def validate(self, n_nodes: int, num_classes: int) -> None:
        """Check node ids and the label mapping against a concrete setup."""
        for k in self.nodes:
            if not 0 <= k < n_nodes:
                raise DataError(
                    f"{self.kind}: node id {k} out of range for n={n_nodes} nodes (use 0..{n_nodes - 1})"
                )
        if self.kind == "label_flip" and self.permutation is not None:
            p = self.permutation
            if len(p) != num_classes or any(not 0 <= c < num_classes for c in p):
                raise DataError(
                    f"label_flip permutation {p} must map each of the {num_classes} classes to a "
                    f"class in 0..{num_classes - 1}"
                )
        if self.kind == "random_labels" and num_classes < 2:
            raise DataError("random_labels needs at least 2 classes")

    def count(self, size: int) -> int:
        """Number of samples altered on a node holding ``size`` samples."""
        return min(size, int(math.floor(self.fraction * size + 0.5)))


@dataclass
class NodeData:
    """Per-node stacked, padded local data for a vectorised simulator.

    ``x``: (n, m_max, *input_shape) float32; ``y``: (n, m_max) int64; ``sizes``: (n,) int64
    real sample counts (positions >= sizes[k] are padding: x = 0, y = 0); ``index``: (n, m_max)
    int64 dataset index of each sample (-1 for padding); ``corrupted``: (n, m_max) bool, True
    where a :class:`Corruption` altered the sample.
    """

    x: torch.Tensor
    y: torch.Tensor
    sizes: torch.Tensor
    index: torch.Tensor
    corrupted: torch.Tensor
    corruptions: tuple[Corruption, ...] = field(default=())

    @property
    def n_nodes(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def max_size(self) -> int:
        return int(self.x.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[2:])

    @property
    def mask(self) -> torch.Tensor:
        """(n, m_max) bool, True for real (non-padding) samples."""
        return self.index >= 0

    def to(self, device: torch.device | str) -> NodeData:
        """A copy with every tensor on ``device``."""
        return replace(
            self,
            x=self.x.to(device),
            y=self.y.to(device),
            sizes=self.sizes.to(device),
            index=self.index.to(device),
            corrupted=self.corrupted.to(device),
        )


def make_node_data(
    dataset: Dataset,
    parts: list[np.ndarray],
    *,
    split: str = "train",
    corruptions: Sequence[Corruption] = (),
) -> NodeData:
    """Stack each node's samples (``parts[k]`` = dataset indices) into padded tensors.

    Corruptions are applied to copies, in order; the dataset is never modified. Which samples a
    corruption picks depends only on (its seed, node, kind). Tensors live on the dataset's device.
    """
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} must be 'train' or 'test'")
    x_all: torch.Tensor = getattr(dataset, f"x_{split}")
    y_all: torch.Tensor = getattr(dataset, f"y_{split}")
    n_total = int(y_all.shape[0])
    n = len(parts)
    if n < 1:
        raise DataError("parts is empty; need at least one node")
    arrays = [np.asarray(p, dtype=np.int64).reshape(-1) for p in parts]
    for k, p in enumerate(arrays):
        if p.size and (p.min() < 0 or p.max() >= n_total):
            raise DataError(
                f"node {k} has dataset index {int(p.min() if p.min() < 0 else p.max())} outside "
                f"the {split} split of size {n_total}"
            )
    dev = x_all.device
    sizes = torch.tensor([len(p) for p in arrays], dtype=torch.int64)
    m_max = max(1, int(sizes.max()))
    index = torch.full((n, m_max), -1, dtype=torch.int64)
    for k, p in enumerate(arrays):
        index[k, : len(p)] = torch.from_numpy(p)
    sizes, index = sizes.to(dev), index.to(dev)
    real = index >= 0
    safe = index.clamp(min=0)
    x = x_all[safe]  # one gather; copies
    y = y_all[safe]
    x[~real] = 0.0
    y[~real] = 0
    corrupted = torch.zeros((n, m_max), dtype=torch.bool, device=dev)
    for c in corruptions:
        c.validate(n, dataset.num_classes)
        kind_id = CORRUPTION_KINDS.index(c.kind)
        for k in c.nodes:
            size = int(sizes[k])
            cnt = c.count(size)
            if cnt == 0:
                continue
            rng = _rng(c.seed, k, kind_id)
            pos = torch.from_numpy(np.sort(rng.choice(size, size=cnt, replace=False))).to(dev)
            if c.kind == "label_flip":
                if c.permutation is None:
                    new = (y[k, pos] + 1) % dataset.num_classes
                else:
                    mapping = torch.tensor(c.permutation, dtype=torch.int64, device=dev)
                    new = mapping[y[k, pos]]
                changed = new != y[k, pos]
                y[k, pos] = new
                corrupted[k, pos[changed]] = True
            elif c.kind == "random_labels":  # shift by 1..C-1: uniform over the wrong labels
                shift = torch.from_numpy(rng.integers(1, dataset.num_classes, size=cnt)).to(dev)
                y[k, pos] = (y[k, pos] + shift) % dataset.num_classes
                corrupted[k, pos] = True
            else:
                noise = rng.normal(0.0, c.sigma, size=(cnt, *x.shape[2:])).astype(np.float32)
                x[k, pos] += torch.from_numpy(noise).to(dev)
                corrupted[k, pos] = True
    return NodeData(
        x=x, y=y, sizes=sizes, index=index, corrupted=corrupted, corruptions=tuple(corruptions)
    )


def node_test_splits(
    dataset: Dataset,
    n_nodes: int,
    *,
    samples_per_node: int,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 1.0,
    classes_per_node: int = 2,
) -> NodeData:
    """Per-node test sets: :func:`partition` of ``y_test`` stacked like :func:`make_node_data`."""
    parts = partition(
        dataset.y_test,
        n_nodes,
        scheme=scheme,
        samples_per_node=samples_per_node,
        alpha=alpha,
        classes_per_node=classes_per_node,
        seed=seed,
    )
    return make_node_data(dataset, parts, split="test")


# --------------------------------------------------------------------------------------------
# Batch schedule
# --------------------------------------------------------------------------------------------


class BatchSchedule:
    """Seeded, order-independent mini-batch positions for every node and round.

    Node k's round t lies in epoch e = t // (sizes[k] // batch_size); an epoch is a permutation
    of ``range(sizes[k])`` drawn from ``default_rng([seed, k, e])``, cut into consecutive
    non-overlapping batches (the incomplete tail is dropped). ``indices(t)`` is therefore a pure
    function of (seed, node, round), whatever order rounds are requested in.
    """

    def __init__(
        self, sizes: Sequence[int] | torch.Tensor, batch_size: int, seed: int, *, cache: int = 0
    ) -> None:
        if isinstance(sizes, torch.Tensor):
            sizes = sizes.detach().cpu().reshape(-1).tolist()
        self.sizes = [int(s) for s in sizes]
        if not self.sizes:
            raise DataError("BatchSchedule needs at least one node size")
        if batch_size < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if seed < 0:
            raise DataError(f"seed={seed} must be >= 0")
        for k, s in enumerate(self.sizes):
            if s < batch_size:
                raise DataError(
                    f"batch_size={batch_size} exceeds node {k}'s {s} local samples; use "
                    f"batch_size <= {min(self.sizes)}"
                )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self._rpe = [s // self.batch_size for s in self.sizes]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_size = cache or max(64, 4 * len(self.sizes))

    @property
    def n_nodes(self) -> int:
        return len(self.sizes)

    def rounds_per_epoch(self, k: int) -> int:
        """Rounds (batches) in one epoch of node k: sizes[k] // batch_size."""
        return self._rpe[k]

    def _perm(self, k: int, e: int) -> np.ndarray:
        key = (k, e)
        perm = self._cache.get(key)
        if perm is None:
            perm = np.random.default_rng([self.seed, k, e]).permutation(self.sizes[k])
            self._cache[key] = perm
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return perm

    def node_indices(self, k: int, t: int) -> np.ndarray:
        """Positions (batch_size,) into node k's local data at round t."""
        r = self._rpe[k]
        e, j = divmod(int(t), r)
        b = self.batch_size
        return self._perm(k, e)[j * b : (j + 1) * b]

    def indices(self, t: int) -> torch.Tensor:
        """(n, batch_size) int64 positions into each node's local data for round ``t`` >= 0."""
        if t < 0:
            raise DataError(f"round t={t} must be >= 0")
        out = np.stack([self.node_indices(k, t) for k in range(len(self.sizes))])
        return torch.from_numpy(out)


def gather_batch(nd: NodeData, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (x (n, B, *input_shape), y (n, B)) for positions ``idx`` (n, B) in one indexing op."""
    if idx.ndim != 2 or idx.shape[0] != nd.n_nodes:
        raise DataError(f"batch indices have shape {tuple(idx.shape)}; need ({nd.n_nodes}, B)")
    idx = idx.to(device=nd.x.device, dtype=torch.int64)
    n, m = nd.n_nodes, nd.max_size
    flat = (torch.arange(n, device=nd.x.device).unsqueeze(1) * m + idx).reshape(-1)
    x = nd.x.reshape(n * m, -1).index_select(0, flat).reshape(n, idx.shape[1], *nd.input_shape)
    return x, nd.y.reshape(-1).index_select(0, flat).reshape(n, idx.shape[1])
