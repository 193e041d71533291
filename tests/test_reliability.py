"""Issue 13: bad input gets one clear line, half-written or foreign artifacts are never loaded,
divergence stops with a message, `dice train` resumes. Each test pins one defect; the kill and
fuzz probes live in test_faults.py. See docs/reliability.md for the table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dice_influence import data as D
from dice_influence._util import atomic_savefig, write_json
from dice_influence.cli import app
from dice_influence.config import ConfigError, load_config
from dice_influence.rundir import write_run_dir
from dice_influence.simulator import train
from dice_influence.trajectory import Trajectory

runner = CliRunner()
P2P = str(Path(__file__).resolve().parents[1] / "configs" / "p2p-digits.yaml")

TINY = {
    "seed": 1,
    "data": {"dataset": "digits", "samples_per_node": 40, "validation_samples": 60},
    "topology": {"name": "ring", "n": 4},
    "model": {"name": "logreg"},
    "train": {"rounds": 6, "batch_size": 8, "lr": 0.1, "eval_every": 3, "checkpoint_every": 2},
}


def tiny(**over) -> dict:
    raw = json.loads(json.dumps(TINY))
    for key, val in over.items():
        sec, _, k = key.partition("__")
        if k:
            raw[sec][k] = val
        else:
            raw[sec] = val
    return raw


def write_cfg(tmp_path: Path, raw: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


def one_error(r) -> str:
    """The CLI failed cleanly: exit 2, an 'error:' line, no traceback, no crash."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.output and "error:" in r.output, r.output
    return r.output


# ------------------------------------------------------------------------------ 9: config lines


@pytest.mark.parametrize(
    "override,needle",
    [
        ("seed=-5", "seed"),
        ("seed=4294967296", "seed"),
        ("train.lr=.inf", "train.lr"),
        ("train.momentum=.nan", "train.momentum"),
        ("data.alpha=.inf", "data.alpha"),
        ("topology.n=100000", "topology.n"),
        ("topology.matrix=[[0.5,0.5],[1.0]]", "topology.matrix"),
        ("topology.matrix=[[.nan,1.0],[0.5,0.5]]", "topology.matrix"),
        ("model.width=0", "model.width"),
        ("model.hidden=[0]", "model.hidden"),
        ("train.device=banana", "train.device"),
        ("train.device=cuda:9", "train.device"),
    ],
)
def test_bad_values_fail_in_one_line_before_training(tmp_path, override, needle):
    cfg = write_cfg(tmp_path, tiny(topology={"name": "ring", "n": 2}))
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "o"), "-q", "--set", override])
    assert needle in one_error(r)
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_seed_range_is_the_full_uint32_range():
    assert load_config({"seed": 2**32 - 1}).seed == 2**32 - 1
    with pytest.raises(ConfigError, match="seed"):
        load_config({"seed": 2**32})


def test_markup_in_config_error_is_printed_verbatim():
    r = runner.invoke(app, ["config", P2P, "--set", 'model.name="[/oops]"'])
    assert "[/oops]" in one_error(r)


def test_train_prints_an_out_path_holding_markup(tmp_path):
    out = tmp_path / "a[" / "x]"
    r = runner.invoke(app, ["train", str(write_cfg(tmp_path, tiny(train__rounds=1))), "-o",
                            str(out), "-q"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert str(out) in r.output.replace("\n", "")


def test_topology_command_refuses_huge_n_in_one_line():
    r = runner.invoke(app, ["topology", "ring", "-n", "100000"])
    assert "100000" in one_error(r)


# ------------------------------------------------------------------------------ JSON, temp files


def test_json_is_strict_nonfinite_becomes_null(tmp_path):
    write_json(tmp_path / "m.json", {"a": float("nan"), "b": [1.0, float("inf")],
                                     "c": np.float32("nan"), "d": torch.tensor([1.0, -np.inf])})
    text = (tmp_path / "m.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None], "c": None, "d": [1.0, None]}


def test_two_writers_never_share_a_temp_file(tmp_path, monkeypatch):
    """Fixed temp names (`.final.safetensors.tmp`) collide when two runs write one folder."""
    from matplotlib.figure import Figure

    seen: list[str] = []
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    real = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, p, **kw: seen.append(str(p)) or
                        real(self, p, **kw))
    atomic_savefig(fig, tmp_path / "a.png")
    atomic_savefig(fig, tmp_path / "a.png")
    assert len(set(seen)) == 2 and (tmp_path / "a.png").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


# ------------------------------------------------------------------------------ 8: datasets


def _fake_mnist(folder: Path) -> None:
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(40) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(20) % 10).astype(np.uint8),
    }
    for stem, arr in arrays.items():
        head = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I",
                                                                        *arr.shape)
        (folder / stem).write_bytes(head + arr.tobytes())


def test_given_data_dir_without_the_data_is_an_error(tmp_path, monkeypatch):
    """Fashion-MNIST with a missing data_dir silently read the system copy."""
    sysdir = tmp_path / "system"
    _fake_mnist(sysdir)
    monkeypatch.setattr(D.datasets, "SYSTEM_FASHION_MNIST_DIR", sysdir)
    monkeypatch.delenv(D.ENV_DATA_DIR, raising=False)
    with pytest.raises(D.DataError, match="does-not-exist"):
        D.load_dataset("fashion-mnist", data_dir=tmp_path / "does-not-exist")
    ds = D.load_dataset("fashion-mnist")  # nothing given: the system copy is fine
    assert ds.n_train == 40


def test_dataset_records_the_files_it_read(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.delenv(D.ENV_DATA_DIR, raising=False)
    _fake_mnist(tmp_path / "m")
    ds = D.load_dataset("mnist", data_dir=tmp_path / "m")
    got = {Path(f["path"]).name: f for f in ds.files}
    assert len(got) == 4
    f = got["train-images-idx3-ubyte"]
    raw = (tmp_path / "m" / "train-images-idx3-ubyte").read_bytes()
    assert f["size"] == len(raw) and f["sha256"] == hashlib.sha256(raw).hexdigest()
    assert D.load_dataset("digits").files  # the bundled csv is recorded too


def test_run_dir_records_data_files(tmp_path):
    traj = train(load_config(tiny(train__rounds=1)))
    write_run_dir(traj, tmp_path, plots=False)
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["data_files"] and {"path", "size", "sha256"} <= set(man["data_files"][0])


def test_unreadable_data_file_is_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv(D.ENV_DATA_DIR, raising=False)
    _fake_mnist(tmp_path / "m")
    real = Path.read_bytes

    def deny(self):
        if self.name.startswith("t10k-images"):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    cfg = write_cfg(tmp_path, tiny(data={"dataset": "mnist", "data_dir": str(tmp_path / "m"),
                                         "samples_per_node": 8}))
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "o"), "-q"])
    out = one_error(r)
    assert "t10k-images" in out and "ermission" in out


# ------------------------------------------------------------------------------ 7: run dir atomic


def test_interrupted_rewrite_is_never_loaded(tmp_path, monkeypatch):
    """Interrupted inside write_run_dir after final.safetensors, the directory mixed two runs
    and Trajectory.load returned the old one."""
    from dice_influence.manifest import RunDirError

    write_run_dir(train(load_config(tiny())), tmp_path, plots=False)
    assert Trajectory.load(tmp_path).rounds_done == 6
    new = train(load_config(tiny(train__lr=0.05)))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trajectory, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        write_run_dir(new, tmp_path, plots=False)
    monkeypatch.undo()
    with pytest.raises(RunDirError, match="manifest"):
        Trajectory.load(tmp_path)
    r = runner.invoke(app, ["train", str(write_cfg(tmp_path, tiny(), "x.yaml")), "-o",
                            str(tmp_path), "-q", "--resume"])
    one_error(r)


def test_files_swapped_between_runs_are_refused(tmp_path):
    """trajectory.json and checkpoints.safetensors from different runs were loaded together."""
    from dice_influence.manifest import RunDirError

    a, b = tmp_path / "a", tmp_path / "b"
    write_run_dir(train(load_config(tiny())), a, plots=False)
    write_run_dir(train(load_config(tiny(train__lr=0.05))), b, plots=False)
    (a / "checkpoints.safetensors").write_bytes((b / "checkpoints.safetensors").read_bytes())
    with pytest.raises(RunDirError, match="checkpoints.safetensors"):
        Trajectory.load(a)


def test_inconsistent_trajectory_json_is_one_line(tmp_path):
    from dice_influence._util import atomic_write_text
    from dice_influence.manifest import write_manifest

    traj = train(load_config(tiny()))
    traj.save(tmp_path)
    meta = json.loads((tmp_path / "trajectory.json").read_text())
    del meta["lrs"]
    atomic_write_text(tmp_path / "trajectory.json", json.dumps(meta))  # committed as written
    write_manifest(tmp_path, ["trajectory.json", "checkpoints.safetensors"], traj.identity)
    with pytest.raises(ConfigError, match="lrs"):
        Trajectory.load(tmp_path)


# ------------------------------------------------------------------------------ 4: divergence


def test_divergence_stops_with_a_message_and_keeps_results(tmp_path):
    cfg = write_cfg(tmp_path, tiny(train__lr=1e37, train__rounds=20, train__eval_every=2))
    out = tmp_path / "div"
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q"])
    msg = one_error(r)
    assert "diverged" in msg and "train.lr" in msg
    metrics = json.loads((out / "metrics.json").read_text())  # strict JSON: no NaN
    assert metrics["diverged"]["round"] >= 1
    traj = Trajectory.load(out)  # what was finite is kept and replays
    assert traj.rounds_done < 20 and bool(torch.isfinite(traj.theta).all())


def test_check_finite_names_the_round(tmp_path):
    from dice_influence.trajectory import DivergenceError, check_finite

    traj = train(load_config(tiny()))
    check_finite(traj)
    traj.checkpoints[4][0][1, 0] = float("nan")
    with pytest.raises(DivergenceError, match="round 4"):
        check_finite(traj)


# ------------------------------------------------------------------------------ 5: train resume


def test_unwritable_out_is_found_before_round_zero(tmp_path, monkeypatch):
    import dice_influence.trajectory as T

    blocker = tmp_path / "file"
    blocker.write_text("x")
    called = []
    monkeypatch.setattr(T, "run_rounds", lambda *a, **k: called.append(1))
    r = runner.invoke(app, ["train", str(write_cfg(tmp_path, tiny())), "-o",
                            str(blocker / "sub"), "-q"])
    assert "file" in one_error(r) and not called


def test_train_writes_checkpoints_as_it_goes_and_resumes(tmp_path):
    cfg = write_cfg(tmp_path, tiny(train__rounds=8))
    out = tmp_path / "run"
    full = tmp_path / "full"
    assert runner.invoke(app, ["train", str(cfg), "-o", str(full), "-q"]).exit_code == 0
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q", "--set", "train.rounds=5"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q", "--resume"])
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    a = load_file(str(full / "final.safetensors"))["theta"]
    b = load_file(str(out / "final.safetensors"))["theta"]
    assert torch.equal(a, b)
    assert Trajectory.load(out).rounds_done == 8


def test_resume_refuses_another_run_and_fresh_run_needs_overwrite(tmp_path):
    cfg = write_cfg(tmp_path, tiny())
    out = tmp_path / "run"
    assert runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q"]).exit_code == 0
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q", "--resume",
                            "--set", "train.lr=0.05"])
    assert "train.lr" in one_error(r)
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q", "--set", "seed=2"])
    assert "--overwrite" in one_error(r)
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q", "--set", "seed=2",
                            "--overwrite"])
    assert r.exit_code == 0, r.output
    assert Trajectory.load(out).problem.cfg.seed == 2


def test_resume_with_nothing_saved_yet_starts_at_round_zero(tmp_path):
    """Killed before the first checkpoint: --resume has nothing to continue and starts over."""
    cfg = write_cfg(tmp_path, tiny())
    full, out = tmp_path / "full", tmp_path / "empty"
    assert runner.invoke(app, ["train", str(cfg), "-o", str(full), "-q"]).exit_code == 0
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q", "--resume"])
    assert r.exit_code == 0, r.output
    assert torch.equal(Trajectory.load(out).theta, Trajectory.load(full).theta)


# ------------------------------------------------------------------------------ influence


@pytest.mark.parametrize("node,hops", [(1.0, 1), (True, 1), (1, -1)])
def test_influence_events_and_hops_are_validated(node, hops):
    from dice_influence.influence import estimate
    from dice_influence.influence.common import Event

    traj = train(load_config(tiny()))
    with pytest.raises(ValueError, match="node|hops"):
        estimate(traj, [Event(node, 2)], hops=hops)


def test_influence_on_a_non_finite_trajectory_raises():
    from dice_influence.influence import ground_truth
    from dice_influence.influence.common import Event
    from dice_influence.trajectory import DivergenceError

    traj = train(load_config(tiny()))
    traj.checkpoints[2][0][0, 0] = float("nan")
    with pytest.raises(DivergenceError):
        ground_truth(traj, [Event(1, 2)], hops=1)
