"""Tests for dice_influence.data: loaders, idx/CIFAR readers, partitions, corruptions, batches."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dice_influence import data as D
from dice_influence.data import (
    BatchSchedule,
    Corruption,
    DataError,
    Dataset,
    gather_batch,
    load_dataset,
    make_node_data,
    node_test_splits,
    parse_idx,
    partition,
)

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HYP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def _no_env_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(D.ENV_DATA_DIR, raising=False)


def _idx_bytes(arr: np.ndarray) -> bytes:
    assert arr.dtype == np.uint8
    return (
        struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.tobytes()
    )


def _write_fake_mnist(folder: Path, n_train: int = 30, n_test: int = 10, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)


def _tiny_dataset(n: int = 40, classes: int = 4, dim: int = 3) -> Dataset:
    x = torch.arange(n * dim, dtype=torch.float32).reshape(n, dim)
    y = torch.arange(n, dtype=torch.int64) % classes
    return Dataset("tiny", x, y, x[:8].clone(), y[:8].clone(), classes, (dim,))


# ------------------------------------------------------------------------------------------
# Loaders
# ------------------------------------------------------------------------------------------


def test_digits_loads_normalised_and_stratified() -> None:
    ds = load_dataset("digits", seed=0, test_fraction=0.2)
    assert ds.num_classes == 10 and ds.input_shape == (1, 8, 8) and ds.input_dim == 64
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.n_train + ds.n_test == 1797
    assert abs(ds.n_test - 360) <= 1
    assert abs(float(ds.x_train.mean())) < 1e-4 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert set(ds.y_test.tolist()) == set(range(10))
    raw = load_dataset("digits", normalize=False)
    assert float(raw.x_train.min()) >= 0 and float(raw.x_train.max()) <= 1
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.y_test, ds.y_test)


def test_load_is_cached_and_returns_fresh_container() -> None:
    a, b = load_dataset("digits"), load_dataset("digits")
    assert a is not b and a.x_train is b.x_train


def test_synthetic_blobs_seeded() -> None:
    a = load_dataset(
        "synthetic", seed=3, synthetic_samples=500, synthetic_dim=7, synthetic_classes=3
    )
    b = load_dataset(
        "synthetic", seed=3, synthetic_samples=500, synthetic_dim=7, synthetic_classes=3
    )
    c = load_dataset(
        "synthetic", seed=4, synthetic_samples=500, synthetic_dim=7, synthetic_classes=3
    )
    assert a.x_train.shape == (400, 7) and a.x_test.shape == (100, 7) and a.num_classes == 3
    assert a.input_shape == (7,) and torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, c.x_train)
    assert set(a.y_train.tolist()) == {0, 1, 2}


@pytest.mark.skipif(not FMNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_system_path() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert abs(float(ds.x_train[:5000].mean())) < 0.05
    t0 = time.perf_counter()
    again = load_dataset("fashion-mnist", seed=5)
    assert time.perf_counter() - t0 < 0.05 and again.x_train is ds.x_train


def test_mnist_from_data_dir_subfolder_env_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_fake_mnist(tmp_path / "mnist", gz=False)
    calls = []
    real = D.parse_idx
    monkeypatch.setattr(D.datasets, "parse_idx", lambda p: calls.append(p) or real(p))
    ds = load_dataset("mnist", data_dir=tmp_path)
    assert ds.x_train.shape == (30, 1, 28, 28) and ds.y_test.shape == (10,)
    raw = parse_idx(tmp_path / "mnist" / "train-images-idx3-ubyte").astype(np.float32) / 255.0
    expected = (raw - D.MNIST_MEAN) / D.MNIST_STD
    np.testing.assert_allclose(ds.x_train[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)
    n_calls = len(calls)
    monkeypatch.setenv(D.ENV_DATA_DIR, str(tmp_path))
    again = load_dataset("mnist")  # found via $DICE_DATA_DIR/mnist, served from the cache
    assert len(calls) == n_calls and again.x_train is ds.x_train


def test_missing_datasets_name_paths_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(D.datasets, "SYSTEM_FASHION_MNIST_DIR", tmp_path / "nowhere")
    monkeypatch.setenv(D.ENV_DATA_DIR, str(tmp_path / "env"))
    with pytest.raises(DataError) as exc:
        load_dataset("fashion-mnist", data_dir=tmp_path / "mine")
    msg = str(exc.value)
    for p in ("mine", "mine/fashion-mnist"):
        assert str(tmp_path / p) in msg
    for p in ("env", "nowhere"):  # a named folder is the only one searched: no fallback
        assert str(tmp_path / p) not in msg
    assert "does not exist" in msg and "only the folder you named" in msg
    with pytest.raises(DataError) as exc:
        load_dataset("fashion-mnist")  # no data_dir: $DICE_DATA_DIR, still no system fallback
    msg = str(exc.value)
    assert str(tmp_path / "env" / "fashion-mnist") in msg and str(tmp_path / "nowhere") not in msg
    monkeypatch.delenv(D.ENV_DATA_DIR)
    with pytest.raises(DataError) as exc:
        load_dataset("fashion-mnist")  # nothing named: the system folder
    msg = str(exc.value)
    assert str(tmp_path / "nowhere") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "DICE_DATA_DIR" in msg
    with pytest.raises(DataError, match="mnist not found") as exc:
        load_dataset("mnist", data_dir=tmp_path / "mine")
    assert str(tmp_path / "mine" / "mnist") in str(exc.value)
    with pytest.raises(DataError, match="cifar-10-batches-py") as exc:
        load_dataset("cifar10", data_dir=tmp_path / "mine")
    assert str(tmp_path / "mine" / "cifar-10-batches-py") in str(exc.value)
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet")


# ------------------------------------------------------------------------------------------
# idx reader
# ------------------------------------------------------------------------------------------


def test_parse_idx_gz_and_raw(tmp_path: Path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx_bytes(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
    for name in ("a", "a.gz"):
        out = parse_idx(tmp_path / name)
        assert out.dtype == np.uint8 and np.array_equal(out, arr)
    labels = np.array([3, 1, 4], dtype=np.uint8)
    (tmp_path / "l").write_bytes(_idx_bytes(labels))
    assert parse_idx(tmp_path / "l").tolist() == [3, 1, 4]
    ints = struct.pack(">BBBBI", 0, 0, 0x0C, 1, 2) + struct.pack(">2i", -5, 7)
    (tmp_path / "i").write_bytes(ints)
    assert parse_idx(tmp_path / "i").tolist() == [-5, 7]


def test_parse_idx_rejects_corrupt_files(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((2, 2), dtype=np.uint8))
    cases = {
        "magic": b"\x01\x02" + good[2:],
        "dtype": good[:2] + b"\x42" + good[3:],
        "short": good[:-1],
        "long": good + b"\x00",
        "tiny": b"\x00\x00",
        "header": good[:6],
        "gzip": gzip.compress(good)[:-8] + b"garbage!",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(DataError, match=str(tmp_path / name)):
            parse_idx(tmp_path / name)
    with pytest.raises(DataError, match="bad idx magic"):
        parse_idx(tmp_path / "magic")
    with pytest.raises(DataError, match="does not exist"):
        parse_idx(tmp_path / "absent")


# ------------------------------------------------------------------------------------------
# CIFAR-10 reader
# ------------------------------------------------------------------------------------------


def _write_fake_cifar(root: Path, protocol: int, per_batch: int = 3) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    first = None
    for name in (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        first = data if first is None else first
        batch = {b"data": data, b"labels": [i % 10 for i in range(per_batch)], b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return first


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_fake_folder(tmp_path: Path, protocol: int) -> None:
    first = _write_fake_cifar(tmp_path, protocol)
    ds = load_dataset("cifar10", data_dir=tmp_path)  # parent folder
    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    assert ds.y_train.tolist() == [0, 1, 2] * 5 and ds.num_classes == 10
    img = first[0].reshape(3, 32, 32).astype(np.float32) / 255.0
    mean = np.asarray(D.CIFAR10_MEAN, np.float32)[:, None, None]
    std = np.asarray(D.CIFAR10_STD, np.float32)[:, None, None]
    np.testing.assert_allclose(ds.x_train[0].numpy(), (img - mean) / std, rtol=1e-5, atol=1e-5)
    same = load_dataset("cifar10", data_dir=tmp_path / "cifar-10-batches-py")  # folder itself
    assert torch.equal(same.x_train, ds.x_train)


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar10_reader_refuses_code(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path, 2)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": _Evil(), b"labels": [0]})
    )
    with pytest.raises(DataError, match="refusing to unpickle posix.getcwd|refusing to unpickle"):
        load_dataset("cifar10", data_dir=tmp_path)


# ------------------------------------------------------------------------------------------
# Partitions
# ------------------------------------------------------------------------------------------


@st.composite
def _partition_case(draw):
    n_classes = draw(st.integers(2, 6))
    n = draw(st.integers(n_classes * 4, 240))
    labels = np.asarray(draw(st.lists(st.integers(0, n_classes - 1), min_size=n, max_size=n)))
    labels[:n_classes] = np.arange(n_classes)
    n_nodes = draw(st.integers(1, 8))
    spn = draw(st.one_of(st.none(), st.integers(1, n // n_nodes)))
    scheme = draw(st.sampled_from(["iid", "dirichlet", "shards"]))
    alpha = draw(st.floats(0.05, 50.0))
    cpn = draw(st.integers(1, n_classes))
    seed = draw(st.integers(0, 2**31))
    return labels, n_nodes, spn, scheme, alpha, cpn, seed


@HYP
@given(_partition_case())
def test_partition_properties(case) -> None:
    labels, n_nodes, spn, scheme, alpha, cpn, seed = case
    kw = dict(scheme=scheme, samples_per_node=spn, alpha=alpha, classes_per_node=cpn, seed=seed)
    try:
        parts = partition(labels, n_nodes, **kw)
    except DataError as exc:  # only a strict shards request may be infeasible
        assert scheme == "shards" and spn is not None and "shards: cannot" in str(exc)
        return
    assert len(parts) == n_nodes
    flat = np.concatenate(parts)
    assert flat.dtype == np.int64 and len(np.unique(flat)) == len(flat)  # disjoint
    assert flat.min() >= 0 and flat.max() < len(labels)
    sizes = [len(p) for p in parts]
    if spn is not None:
        assert sizes == [spn] * n_nodes
    elif scheme == "iid":
        assert sizes == [len(labels) // n_nodes] * n_nodes
    elif scheme == "dirichlet":
        assert sum(sizes) == len(labels) and min(sizes) >= 1  # everything covered
    else:
        assert len(set(sizes)) == 1 and 1 <= sizes[0] <= len(labels) // n_nodes
    if scheme == "shards":
        assert all(len(np.unique(labels[p])) <= cpn for p in parts)
    again = partition(torch.as_tensor(labels), n_nodes, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_seed_changes_result_and_scheme_strings() -> None:
    y = np.arange(400) % 5
    a = partition(y, 4, seed=0)
    assert not all(np.array_equal(p, q) for p, q in zip(a, partition(y, 4, seed=1), strict=True))
    for s, kw in (
        ("dirichlet(0.3)", dict(scheme="dirichlet", alpha=0.3)),
        ("shards(3)", dict(scheme="shards", classes_per_node=3)),
        (" Dirichlet( 2 ) ", dict(scheme="dirichlet", alpha=2.0)),
    ):
        p1 = partition(y, 4, scheme=s, samples_per_node=50, seed=2)
        p2 = partition(y, 4, samples_per_node=50, seed=2, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(p1, p2, strict=True))


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 10_000))
def test_dirichlet_smaller_alpha_is_more_skewed(seed: int) -> None:
    y = np.arange(2000) % 10

    def skew(parts: list[np.ndarray]) -> float:  # mean largest-class share per node
        return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))

    for spn in (None, 80):
        low = partition(y, 20, scheme="dirichlet", alpha=0.1, samples_per_node=spn, seed=seed)
        high = partition(y, 20, scheme="dirichlet", alpha=100.0, samples_per_node=spn, seed=seed)
        assert skew(low) > skew(high) + 0.2


def test_shards_even_on_balanced_data() -> None:
    y = np.repeat(np.arange(10), 600)
    parts = partition(y, 16, scheme="shards(2)")
    assert [len(p) for p in parts] == [375] * 16
    assert all(len(np.unique(y[p])) == 2 for p in parts)


def test_partition_errors() -> None:
    y = np.arange(100) % 4
    with pytest.raises(DataError, match="n_nodes=0"):
        partition(y, 0)
    with pytest.raises(
        DataError, match=r"samples_per_node=30 x n_nodes=4 = 120 exceeds the 100.*<= 25"
    ):
        partition(y, 4, samples_per_node=30)
    with pytest.raises(DataError, match="alpha=0"):
        partition(y, 4, scheme="dirichlet", alpha=0)
    with pytest.raises(DataError, match="alpha=-1"):
        partition(y, 4, scheme="dirichlet(-1)")
    with pytest.raises(DataError, match="unknown partition scheme 'pathological'"):
        partition(y, 4, scheme="pathological")
    with pytest.raises(DataError, match="bad parameter"):
        partition(y, 4, scheme="shards(two)")
    with pytest.raises(DataError, match="classes_per_node=5 exceeds the 4 classes"):
        partition(y, 4, scheme="shards(5)")
    with pytest.raises(DataError, match="shards: cannot"):
        partition(y, 6, scheme="shards(1)", samples_per_node=13)


# ------------------------------------------------------------------------------------------
# Node data and corruptions
# ------------------------------------------------------------------------------------------


def test_make_node_data_pads_and_indexes() -> None:
    ds = _tiny_dataset()
    parts = [np.array([3, 1, 7]), np.array([0]), np.array([10, 11])]
    nd = make_node_data(ds, parts)
    assert nd.n_nodes == 3 and nd.x.shape == (3, 3, 3) and nd.y.shape == (3, 3)
    assert nd.sizes.tolist() == [3, 1, 2]
    assert nd.index.tolist() == [[3, 1, 7], [0, -1, -1], [10, 11, -1]]
    for k, p in enumerate(parts):
        assert torch.equal(nd.x[k, : len(p)], ds.x_train[p]) and torch.equal(
            nd.y[k, : len(p)], ds.y_train[p]
        )
    assert float(nd.x[1, 1:].abs().sum()) == 0 and not nd.corrupted.any()
    assert nd.mask.sum().item() == 6
    with pytest.raises(DataError, match="index 40 outside"):
        make_node_data(ds, [np.array([40])])


def test_corruptions_exact_fraction_only_on_requested_nodes() -> None:
    ds = load_dataset("synthetic", synthetic_samples=600, synthetic_classes=4)
    x_before, y_before = ds.x_train.clone(), ds.y_train.clone()
    parts = partition(ds.y_train, 6, samples_per_node=40, seed=1)
    clean = make_node_data(ds, parts)
    specs = [
        Corruption("label_flip", nodes=(1, 4), fraction=0.25),
        Corruption("random_labels", nodes=(2,), fraction=0.5, seed=3),
        Corruption("gaussian_noise", nodes=(4, 5), fraction=1.0, sigma=0.5),
    ]
    nd = make_node_data(ds, parts, corruptions=specs)
    assert torch.equal(ds.x_train, x_before) and torch.equal(ds.y_train, y_before)
    assert nd.corrupted.sum(1).tolist() == [0, 10, 20, 0, 40, 40]
    label_changed = nd.y != clean.y
    feat_changed = (nd.x != clean.x).any(-1)
    flipped = label_changed[1]
    assert flipped.sum() == 10 and torch.equal(nd.y[1][flipped], (clean.y[1][flipped] + 1) % 4)
    assert label_changed[2].sum() == 20 and torch.equal(label_changed[2], nd.corrupted[2])
    assert label_changed.sum(1).tolist() == [0, 10, 20, 0, 10, 0]
    assert feat_changed.sum(1).tolist() == [0, 0, 0, 0, 40, 40]
    assert torch.equal(label_changed | feat_changed, nd.corrupted)
    assert torch.equal(make_node_data(ds, parts, corruptions=specs).y, nd.y)  # seeded
    perm = make_node_data(
        ds, parts, corruptions=[Corruption("label_flip", (0,), permutation=(3, 2, 1, 0))]
    )
    assert torch.equal(perm.y[0], 3 - clean.y[0])


def test_inject_flip_appends_flagged_mislabelled_copies_and_keeps_the_clean_data() -> None:
    """Injected poison: each listed node keeps its samples bit for bit and gets, after them,
    copies of the samples label_flip would flip (same seed and fraction), with the flipped
    label, flagged corrupted and carrying their source's dataset index; the stacked tensors
    grow to the largest node, and removing exactly the flagged samples gives the clean data."""
    ds = load_dataset("synthetic", synthetic_samples=600, synthetic_classes=4)
    parts = partition(ds.y_train, 4, samples_per_node=40, seed=1)
    clean = make_node_data(ds, parts)
    perm = (0, 2, 2, 3)  # only class 1 moves (to 2)
    flip = make_node_data(ds, parts, corruptions=[Corruption("label_flip", (1, 2), 0.5,
                                                             permutation=perm)])
    nd = make_node_data(ds, parts, corruptions=[Corruption("inject_flip", (1, 2), 0.5,
                                                           permutation=perm)])
    extra = flip.corrupted.sum(1)
    assert extra.tolist()[0] == 0 and extra.tolist()[3] == 0 and int(extra.sum()) > 0
    assert nd.sizes.tolist() == (clean.sizes + extra).tolist()
    assert nd.max_size == int(nd.sizes.max()) > clean.max_size
    assert torch.equal(nd.x[:, :40], clean.x) and torch.equal(nd.y[:, :40], clean.y)
    assert torch.equal(nd.index[:, :40], clean.index) and not nd.corrupted[:, :40].any()
    for k in range(4):
        src = flip.corrupted[k].nonzero().flatten()
        new = slice(40, 40 + len(src))
        assert torch.equal(nd.x[k, new], clean.x[k, src])
        assert torch.equal(nd.y[k, new], flip.y[k, src]) and bool((nd.y[k, new] == 2).all())
        assert torch.equal(nd.index[k, new], clean.index[k, src])
        assert bool(nd.corrupted[k, new].all()) and int(nd.corrupted[k].sum()) == len(src)
        assert bool((nd.index[k, 40 + len(src):] == -1).all())  # padding stays padding
    keep = nd.mask & ~nd.corrupted  # the oracle clean-up: exactly the clean samples are left
    assert torch.equal(nd.x[keep], clean.x[clean.mask])
    assert torch.equal(nd.y[keep], clean.y[clean.mask])
    # the default map y -> y + 1 copies every drawn sample
    dflt = make_node_data(ds, parts, corruptions=[Corruption("inject_flip", (0,), 0.25)])
    assert dflt.sizes.tolist() == [50, 40, 40, 40]
    assert torch.equal(dflt.y[0, 40:], (ds.y_train[dflt.index[0, 40:]] + 1) % 4)


def test_corruption_validation() -> None:
    ds, parts = _tiny_dataset(), [np.arange(10), np.arange(10, 20)]
    with pytest.raises(DataError, match="unknown corruption kind 'blur'"):
        Corruption("blur", (0,))
    with pytest.raises(DataError, match="fraction=1.5"):
        Corruption("label_flip", (0,), fraction=1.5)
    with pytest.raises(DataError, match=r"node id 2 out of range for n=2"):
        make_node_data(ds, parts, corruptions=[Corruption("label_flip", (2,))])
    with pytest.raises(DataError, match="permutation"):
        make_node_data(ds, parts, corruptions=[Corruption("label_flip", (0,), permutation=(1, 0))])
    with pytest.raises(DataError, match="inject_flip permutation"):
        make_node_data(ds, parts, corruptions=[Corruption("inject_flip", (0,), permutation=(1,))])


def test_node_test_splits() -> None:
    ds = load_dataset("digits")
    nd = node_test_splits(ds, 5, samples_per_node=20, seed=1)
    assert nd.x.shape == (5, 20, 1, 8, 8) and nd.sizes.tolist() == [20] * 5
    assert int(nd.index.max()) < ds.n_test and len(torch.unique(nd.index)) == 100
    assert torch.equal(nd.y, ds.y_test[nd.index])


# ------------------------------------------------------------------------------------------
# Batch schedule
# ------------------------------------------------------------------------------------------


def test_batch_schedule_pure_in_any_order() -> None:
    sizes = [37, 50, 50, 12]
    seq = BatchSchedule(sizes, batch_size=4, seed=7)
    expected = [seq.indices(t) for t in range(60)]
    rounds = list(range(60))
    random.Random(0).shuffle(rounds)
    shuffled = BatchSchedule(torch.tensor(sizes), batch_size=4, seed=7, cache=2)  # tiny LRU
    for t in rounds:
        assert torch.equal(shuffled.indices(t), expected[t])
    other_seed = BatchSchedule(sizes, batch_size=4, seed=8)
    assert not torch.equal(other_seed.indices(0), expected[0])
    for idx in expected:
        assert idx.shape == (4, 4) and idx.dtype == torch.int64
        assert bool((idx >= 0).all()) and bool((idx < torch.tensor(sizes)[:, None]).all())
    assert not torch.equal(expected[0][1], expected[0][2])  # same size, different nodes


def test_batch_schedule_epochs() -> None:
    bs = BatchSchedule([37, 12], batch_size=5, seed=0)
    assert bs.rounds_per_epoch(0) == 7 and bs.rounds_per_epoch(1) == 2
    for k in range(2):
        r = bs.rounds_per_epoch(k)
        epochs = [
            torch.cat([bs.indices(t)[k] for t in range(e * r, (e + 1) * r)]) for e in range(3)
        ]
        for ep in epochs:
            assert len(torch.unique(ep)) == r * 5  # distinct within an epoch
        assert not torch.equal(epochs[0], epochs[1])  # reshuffled per epoch


def test_batch_schedule_compiled_rows_equal_numpy_bit_for_bit() -> None:
    """More than 32 nodes: one compiled call draws every node's batch; the positions are NumPy's
    ``default_rng([seed, k, e]).permutation`` (the per-node path), epochs and sizes mixed."""
    from dice_influence._perm_kernel import permutation

    rng = np.random.default_rng(0)
    for _ in range(300):
        seed, k, e = (int(v) for v in rng.integers(0, 2**32, size=3))
        m = int(rng.integers(1, 300))
        got = permutation(seed, k, e, m)
        if got is None:  # no numba: nothing compiled to compare
            pytest.skip("numba not available")
        assert np.array_equal(got, np.random.default_rng([seed, k, e]).permutation(m))
    sizes = [int(v) for v in rng.integers(9, 70, size=40)]
    for seed in (0, 5, 2**32 + 1):  # the last: NumPy itself (SeedSequence splits the word)
        bs = BatchSchedule(sizes, batch_size=4, seed=seed)
        for t in (0, 1, 2, 7, 40, 123):
            want = np.stack([bs.node_indices(k, t) for k in range(len(sizes))])
            assert torch.equal(bs.indices(t), torch.from_numpy(want))


def test_batch_schedule_errors_and_speed() -> None:
    with pytest.raises(DataError, match="exceeds node 2's 3 local samples"):
        BatchSchedule([10, 10, 3], batch_size=4, seed=0)
    with pytest.raises(DataError, match="round t=-1"):
        BatchSchedule([10], batch_size=2, seed=0).indices(-1)
    bs = BatchSchedule([256] * 16, batch_size=16, seed=0)
    t0 = time.perf_counter()
    for t in range(2000):
        bs.indices(t)
    assert (time.perf_counter() - t0) / 2000 < 1e-3


def test_gather_batch() -> None:
    ds = load_dataset("digits")
    nd = make_node_data(ds, partition(ds.y_train, 4, samples_per_node=30))
    bs = BatchSchedule(nd.sizes, batch_size=8, seed=0)
    idx = bs.indices(3)
    x, y = gather_batch(nd, idx)
    assert x.shape == (4, 8, 1, 8, 8) and y.shape == (4, 8)
    for k in range(4):
        assert torch.equal(x[k], nd.x[k, idx[k]]) and torch.equal(y[k], nd.y[k, idx[k]])
    with pytest.raises(DataError, match="need \\(4, B\\)"):
        gather_batch(nd, idx[:2])
