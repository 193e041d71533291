"""File readers that never execute code from the files they read: idx files parsed byte by
byte, CIFAR-10 "python version" batches (pickles, by upstream format) read with a restricted
unpickler that only resolves the few numpy/codec names an array needs."""

from __future__ import annotations

import importlib
import math
import pickle
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .files import file_records as _records

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


MAX_IDX_BYTES = 1 << 30  # 1 GiB: 20x the largest idx file this package reads


def _gunzip_idx(path: Path, raw: bytes) -> bytes:
    """Decompress an idx ``.gz`` no further than its header says it holds: the header is
    decompressed first, then at most the bytes its dims need (+1 to detect a longer stream),
    so a gzip bomb is refused before it fills memory."""
    d = zlib.decompressobj(wbits=31)
    try:
        head = d.decompress(raw, 4)
        if len(head) == 4 and head[3] > 0:
            head += d.decompress(d.unconsumed_tail, 4 * head[3])
        need = _idx_payload_size(head)
        if need is None:  # not an idx header: parse_idx names the problem
            return head
        if need > MAX_IDX_BYTES:
            raise DataError(f"{path}: idx header declares {need} bytes of data (more than "
                            f"{MAX_IDX_BYTES}); the file is corrupt or not a dataset")
        body = d.decompress(d.unconsumed_tail, need + 1)
        if len(body) > need or (d.unconsumed_tail and d.decompress(d.unconsumed_tail, 1)):
            raise DataError(f"{path}: the gzip stream holds more data than the idx header's dims "
                            f"declare ({need} bytes); the file is corrupt or not idx")
    except zlib.error as exc:
        raise DataError(f"{path}: corrupt gzip stream ({exc}); re-download the file") from None
    except MemoryError:
        raise DataError(f"{path}: not enough memory to decompress {need} bytes") from None
    return head + body


def _idx_payload_size(head: bytes) -> int | None:
    """Bytes of data an idx header declares (None if ``head`` is no complete idx header)."""
    if len(head) < 4 or head[0] or head[1] or head[2] not in _IDX_DTYPES or not head[3]:
        return None
    ndim = head[3]
    if len(head) < 4 + 4 * ndim:
        return None
    dims = np.frombuffer(head, dtype=">u4", count=ndim, offset=4)
    return math.prod(int(x) for x in dims) * _IDX_DTYPES[head[2]].itemsize


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped (bounded by the idx header) when the file starts
    with the gzip magic."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _unreadable(path, exc) from None
    if raw[:2] == b"\x1f\x8b":
        return _gunzip_idx(path, raw)
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
    arr = arr.astype(dtype.newbyteorder("="), copy=True)
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        bad = ~np.isfinite(arr)
        first = tuple(int(i[0]) for i in np.nonzero(bad))
        raise DataError(f"{path}: {int(bad.sum())} values are NaN or infinite (first at index "
                        f"{first}); the file is corrupt: re-download or re-export it")
    return arr


def _unreadable(path: Path, exc: OSError) -> DataError:
    return DataError(
        f"cannot read {path}: {exc.strerror or exc}; check that the file exists and is "
        "readable (permissions), or point data.data_dir / --data-dir at a readable copy"
    )


def file_records(paths: Sequence[Path]) -> tuple[dict[str, Any], ...]:
    """``{"path", "size", "sha256"}`` of each file; :class:`DataError` if one is unreadable."""
    try:
        return _records(paths)
    except OSError as exc:
        raise _unreadable(Path(exc.filename or "?"), exc) from None


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
    except OSError as exc:
        raise _unreadable(path, exc) from None
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
