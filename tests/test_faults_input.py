"""Issue 21, hostile input: non-finite plug-in/distributed settings, strict seeds, --set blame,
overflowing mixing matrices, items that are not events, data files that are not what they
claim (Fashion-MNIST read as MNIST, NaN pixels, gzip bombs). Each is one clear error."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dice_influence.cli import app
from dice_influence.config import ConfigError, load_config
from dice_influence.data import DataError
from dice_influence.data.readers import parse_idx

ROOT = Path(__file__).resolve().parents[1]
P2P = ROOT / "configs" / "p2p-digits.yaml"
runner = CliRunner()


def one_error(args: list[str], *words: str) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error:") and "Traceback" not in r.output, r.output
    for w in words:
        assert w in r.output, r.output
    return r.output


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("override,key", [
    ("policy={kind: prune, margin: .nan}", "policy.margin"),
    ("policy={kind: prune, margin: nan}", "policy.margin"),
    ("observers=[{kind: proximal, window: .inf}]", "observers.0.window"),
    ("experiment.distributed.detection.threshold=.nan",
     "experiment.distributed.detection.threshold"),
    ("experiment.distributed.timeout_s=.inf", "experiment.distributed.timeout_s"),
    ("experiment.anything.deep=[1, -.inf]", "experiment.anything.deep.1"),
])
def test_non_finite_settings_are_refused_naming_the_key(override, key):
    one_error(["config", str(P2P), "--set", override], key, "finite")


def test_timeout_s_is_bounded():
    from dice_influence.distributed.settings import distributed_settings

    cfg = load_config(P2P, ["experiment.distributed.timeout_s=1.0e300"])
    with pytest.raises(ConfigError, match="timeout_s.*less than or equal to 86400"):
        distributed_settings(cfg)


def test_launch_with_a_nan_threshold_is_one_error(tmp_path):
    one_error(["launch", str(P2P), "-o", str(tmp_path / "o"), "--set",
               "experiment.distributed.detection={enabled: true, threshold: .nan}"],
              "experiment.distributed.detection.threshold")


@pytest.mark.parametrize("value", ["true", "false", "1.5", "'3'"])
def test_seed_must_be_an_integer(value):
    one_error(["config", str(P2P), "--set", f"seed={value}"], "seed")


def test_set_blame_names_the_values_set_not_the_files(tmp_path):
    out = one_error(["config", str(P2P), "--set", "topology.n=2", "--set",
                     "topology.matrix=[[0.5, 0.5, 0], [0.5, 0.5, 0]]"], "topology.matrix")
    assert "topology.n=8" not in out and "has 3 entries but the matrix has 2 rows" in out


def test_validate_mixing_overflow_is_a_topology_error():
    from dice_influence.topology import TopologyError, validate_mixing

    with pytest.raises(TopologyError, match="float array"):
        validate_mixing([[10**400]])


def test_an_item_that_is_not_an_event_is_one_clear_error():
    from dice_influence.influence.common import Event, validate_events
    from dice_influence.simulator import train

    cfg = load_config({"data": {"samples_per_node": 20}, "topology": {"name": "ring", "n": 3},
                       "model": {"name": "logreg"}, "train": {"rounds": 3, "batch_size": 4}})
    traj = train(cfg)
    assert validate_events(traj, [(0, 1), {"node": 1, "round": 0}], 1) == [Event(0, 1),
                                                                         Event(1, 0)]
    for bad in (7, "ab", None, (1,), object()):
        with pytest.raises(ValueError, match="is not an Event"):
            validate_events(traj, [bad], 1)


# ------------------------------------------------------------------------------ data files


def idx_bytes(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}[arr.dtype]
    return (bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
            + arr.tobytes())


def idx_set(folder: Path, pixel: int, n: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "t10k"):
        x = np.full((n, 28, 28), pixel, np.uint8)
        y = rng.integers(0, 10, n).astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(x))
        (folder / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(y))
    return folder


def test_fashion_mnist_files_read_as_mnist_are_refused_by_their_statistics(tmp_path):
    from dice_influence.data import load_dataset

    fashion_like = idx_set(tmp_path / "f", pixel=73)  # mean pixel 0.286: Fashion-MNIST's
    with pytest.raises(DataError, match="look like fashion-mnist: mean training pixel 0.2863"):
        load_dataset("mnist", data_dir=fashion_like)
    assert load_dataset("fashion-mnist", data_dir=fashion_like).n_train == 40
    mnist_like = idx_set(tmp_path / "m", pixel=33)  # 0.129: MNIST's
    with pytest.raises(DataError, match="look like mnist"):
        load_dataset("fashion-mnist", data_dir=mnist_like)
    assert load_dataset("mnist", data_dir=mnist_like).n_train == 40


def test_nan_pixels_are_refused_at_load(tmp_path):
    x = np.zeros((3, 4, 4), ">f4")
    x[1, 2, 3] = np.nan
    p = tmp_path / "x.idx"
    p.write_bytes(idx_bytes(x))
    with pytest.raises(DataError, match=r"1 values are NaN or infinite \(first at index "
                       r"\(1, 2, 3\)\)"):
        parse_idx(p)


def test_a_gzip_bomb_stops_at_the_headers_size(tmp_path):
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 1, 28, 28)
    p = tmp_path / "bomb-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(header + bytes(64 << 20), 9))  # 64 MiB of zeros, ~64 KiB file
    assert p.stat().st_size < 1 << 20
    with pytest.raises(DataError, match="more data than the idx header's dims declare"):
        parse_idx(p)
    huge = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**31, 2**16, 2**16)
    p.write_bytes(gzip.compress(huge + bytes(10)))
    with pytest.raises(DataError, match="declares .* bytes of data"):
        parse_idx(p)
    ok = tmp_path / "ok-idx3-ubyte.gz"
    ok.write_bytes(gzip.compress(header + bytes(range(256)) * 3 + bytes(16)))
    assert parse_idx(ok).shape == (1, 28, 28)


def test_a_real_config_with_nan_policy_never_writes_margin_null(tmp_path):
    cfg = tmp_path / "c.yaml"
    raw = yaml.safe_load(P2P.read_text())
    raw["policy"] = {"kind": "prune", "margin": float("nan")}
    cfg.write_text(yaml.safe_dump(raw))
    one_error(["train", str(cfg), "-o", str(tmp_path / "o"), "-q"], "policy.margin")
    assert not (tmp_path / "o").exists()
