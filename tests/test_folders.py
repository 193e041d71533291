"""Issue 21: no command mixes two runs' files in one folder, two writers never share a folder,
a manifest commits only what its own process wrote, and a mixed folder never loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from dice_influence.cli import app
from dice_influence.config import load_config
from dice_influence.folders import (
    LOCK,
    claim_folder,
    experiment_identity,
    folder_problems,
    release_folders,
)
from dice_influence.manifest import RunDirError, RunIdentity

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
TRAIN = {
    "seed": 1,
    "data": {"dataset": "digits", "samples_per_node": 30, "validation_samples": 40},
    "topology": {"name": "ring", "n": 4},
    "model": {"name": "mlp", "hidden": [8]},
    "train": {"rounds": 10, "batch_size": 8, "lr": 0.1, "eval_every": 5,
              "checkpoint_every": 5},
}


def cfg_file(tmp_path: Path, **train: object) -> Path:
    raw = json.loads(json.dumps(TRAIN))
    raw["train"].update(train)
    p = tmp_path / f"c{len(list(tmp_path.glob('c*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def folder_of(tmp_path: Path, kind: str, name: str = "out") -> Path:
    """A folder that a `kind` command wrote (marker, one file, committed)."""
    from dice_influence.folders import commit_folder

    out = tmp_path / name
    claim_folder(out, kind, RunIdentity.from_fields({"kind": kind, "x": 1}))
    (out / f"{kind}.csv").write_text("a\n1\n")
    commit_folder(out)
    release_folders()
    return out


def refused(result, *words: str) -> str:
    assert result.exit_code == 2, result.output
    msg = result.output.strip()
    assert "Traceback" not in msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------------------ one per command


def test_train_refuses_another_commands_folder_and_overwrite_replaces_it_whole(tmp_path):
    out = folder_of(tmp_path, "contribution")
    cfg = cfg_file(tmp_path)
    refused(runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q"]),
            "dice experiment contribution", "--overwrite")
    assert (out / "contribution.csv").is_file()  # nothing touched
    r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert not (out / "contribution.csv").exists()  # replaced as a whole, never mixed
    man = json.loads((out / "manifest.json").read_text())
    assert "report.html" in man["files"] and "trajectory.json" in man["files"]
    assert folder_problems(out) == []
    # another config into the committed run: refused, naming the difference
    other = cfg_file(tmp_path, lr=0.05)
    refused(runner.invoke(app, ["train", str(other), "-o", str(out), "-q"]),
            "train.lr", "--resume")


@pytest.mark.parametrize("name,config", [
    ("cascade", "cascade-digits.yaml"), ("contribution", "contribution-digits.yaml"),
    ("selection", "selection-digits.yaml"), ("aggregation", "aggregation-fmnist.yaml"),
    ("anomaly", "anomaly-digits.yaml"), ("alignment", "alignment-digits.yaml"),
])
def test_every_experiment_refuses_a_training_runs_folder(tmp_path, name, config):
    out = folder_of(tmp_path, "train")
    r = runner.invoke(app, ["experiment", name, str(ROOT / "configs" / config), "-o", str(out)])
    refused(r, "dice train", "--overwrite", "choose another --out")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".dice-folder.json", LOCK, "manifest.json", "train.csv"])


def test_experiment_rerun_with_another_seed_is_refused(tmp_path):
    cfg = load_config(ROOT / "configs" / "cascade-digits.yaml")
    out = tmp_path / "cascade"
    claim_folder(out, "cascade", experiment_identity("cascade", cfg, None))
    (out / "cascade.csv").write_text("x\n")
    release_folders()
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    with pytest.raises(RunDirError, match="another run .*seed"):
        claim_folder(out, "cascade", experiment_identity("cascade", other, None))
    release_folders()
    # the same run again replaces the folder as a whole
    claim_folder(out, "cascade", experiment_identity("cascade", cfg, None))
    release_folders()
    assert not (out / "cascade.csv").exists()


def test_demo_refuses_a_training_runs_folder(tmp_path):
    out = folder_of(tmp_path, "train")
    refused(runner.invoke(app, ["demo", "-o", str(out), "--rounds", "5"]), "dice train",
            "--overwrite")


def test_launch_refuses_an_experiments_folder(tmp_path):
    out = folder_of(tmp_path, "cascade")
    refused(runner.invoke(app, ["launch", str(ROOT / "configs" / "p2p-digits.yaml"), "-o",
                                str(out)]), "dice experiment cascade", "--overwrite")


def test_unknown_files_are_never_removed_even_with_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ([], ["--overwrite"]):
        refused(runner.invoke(app, ["train", str(cfg_file(tmp_path)), "-o", str(out), "-q",
                                    *extra]), "no dice command wrote", "thesis.tex")
    assert (out / "thesis.tex").read_text() == "years of work"


def test_the_users_config_in_the_folder_is_kept_across_runs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = out / "mine.yaml"
    cfg.write_text(yaml.safe_dump(TRAIN))
    for _ in range(2):  # a fresh folder, then a rerun that replaces the run's files
        r = runner.invoke(app, ["train", str(cfg), "-o", str(out), "-q"])
        assert r.exit_code == 0, r.output
        assert cfg.is_file() and (out / "config.yaml").is_file()
    assert "mine.yaml" not in json.loads((out / "manifest.json").read_text())["files"]
    assert folder_problems(out) == []


def test_bench_refuses_a_foreign_json_and_a_run_folder(tmp_path):
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    refused(runner.invoke(app, ["bench", "proximal", "--json", str(other)]), "--overwrite",
            "dice bench proximal")
    out = folder_of(tmp_path, "train")
    refused(runner.invoke(app, ["bench", "influence", "--json", str(out / "b.json")]),
            "dice train")


def test_report_warns_on_uncommitted_and_mixed_folders_and_commits_report_html(tmp_path):
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(cfg_file(tmp_path)), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert folder_problems(out) == []  # report.html re-committed
    (out / "stray.csv").write_text("another run's file")
    r = runner.invoke(app, ["report", str(out)])
    assert r.exit_code == 0 and "warning" in r.output and "stray.csv" in r.output
    (out / "stray.csv").unlink()
    (out / "manifest.json").unlink()
    r = runner.invoke(app, ["report", str(out)])
    assert "warning" in r.output and "not completely written" in r.output, r.output


# ------------------------------------------------------------------------------ two writers


def test_a_second_writer_fails_while_the_folder_is_locked(tmp_path):
    import fcntl

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)  # another writer's lock
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"4242\n", 0)
    try:
        msg = refused(runner.invoke(app, ["train", str(cfg_file(tmp_path)), "-o", str(out),
                                          "-q"]), "another dice process", "4242")
        assert len(msg.splitlines()) <= 3  # one line (wrapped by the console at most)
    finally:
        os.close(fd)
    r = runner.invoke(app, ["train", str(cfg_file(tmp_path)), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output


def test_two_dice_train_processes_into_one_folder_one_wins(tmp_path):
    out = tmp_path / "race"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmds = [[sys.executable, "-m", "dice_influence.cli", "train", str(cfg_file(tmp_path, lr=lr)),
             "-o", str(out), "-q"] for lr in (0.1, 0.05)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = outs[[p.returncode for p in procs].index(2)]
    assert "another dice process" in loser or "another run" in loser, loser
    from dice_influence.trajectory import Trajectory

    traj = Trajectory.load(out)  # the folder is one whole run
    winner = [0.1, 0.05][[p.returncode for p in procs].index(0)]
    assert traj.problem.cfg.train.lr == winner
    assert folder_problems(out) == []


# ------------------------------------------------------------------------------ manifests


def test_manifest_records_the_bytes_this_process_wrote(tmp_path):
    from dice_influence._util import atomic_write_text
    from dice_influence.manifest import read_manifest, write_manifest

    atomic_write_text(tmp_path / "a.txt", "mine")
    (tmp_path / "a.txt").write_text("another process replaced it")
    write_manifest(tmp_path, ["a.txt"], RunIdentity.from_fields({"x": 1}))
    with pytest.raises(RunDirError, match="differs from what manifest.json recorded"):
        read_manifest(tmp_path, ["a.txt"])


def test_trajectory_load_refuses_one_runs_json_with_anothers_checkpoints(tmp_path):
    from dice_influence.manifest import write_manifest
    from dice_influence.simulator import build_problem
    from dice_influence.trajectory import TRAJECTORY_FILES, Trajectory

    runs = []
    for lr in (0.1, 0.05):
        raw = json.loads(json.dumps(TRAIN))
        raw["train"].update(lr=lr, rounds=4)
        traj = Trajectory.start(build_problem(load_config(raw)))
        traj.run(4)
        runs.append((traj.save(tmp_path / f"lr{lr}"), traj.identity))
    (a, ident_a), (b, _) = runs
    shutil.copy(b / "checkpoints.safetensors", a / "checkpoints.safetensors")
    from dice_influence import _util

    _util._WRITTEN.clear()  # committed by another process, which hashes what is on disk
    write_manifest(a, TRAJECTORY_FILES, ident_a)  # a careless re-commit of the mixed folder
    with pytest.raises(RunDirError, match="mixed folder"):
        Trajectory.load(a)


# ------------------------------------------------------------------------------ progress


def _train_progress(tmp_path: Path, rounds: int = 10):
    from dice_influence.rundir import open_run, progress_writer
    from dice_influence.simulator import build_problem

    out = tmp_path / "run"
    raw = json.loads(json.dumps(TRAIN))
    raw["train"]["rounds"] = rounds
    cfg = load_config(raw)
    traj = open_run(out, build_problem(cfg))
    traj.run(rounds, on_checkpoint=progress_writer(traj, out))  # then "killed": no commit
    return out, cfg, traj


def test_a_flipped_bit_in_a_progress_checkpoint_is_caught_and_the_previous_one_used(
        tmp_path, capsys):
    from dice_influence.rundir import open_run
    from dice_influence.simulator import build_problem

    out, cfg, full = _train_progress(tmp_path)
    path = out / "progress" / "round-10.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x10  # one bit of the last tensor's bytes
    path.write_bytes(bytes(data))
    traj = open_run(out, build_problem(cfg), resume=True)
    assert traj.rounds_done == 5
    err = capsys.readouterr().err
    assert "round-10.safetensors is damaged" in err and "previous good checkpoint" in err
    traj.run(5)
    import torch

    assert torch.equal(traj.theta, full.theta)  # resumed bit-identically from round 5


def test_orphan_temp_files_are_removed_when_the_folder_is_claimed(tmp_path):
    out, cfg, _ = _train_progress(tmp_path, rounds=5)
    orphan = out / "progress" / ".round-10.safetensors.999.0123456789ab.tmp"
    orphan.write_bytes(b"half")
    (out / ".metrics.json.999.0123456789ab.tmp").write_bytes(b"half")
    from dice_influence.simulator import build_problem

    ident = RunIdentity.of(cfg, build_problem(cfg).dataset.files)
    claim_folder(out, "train", ident, resume=True)
    release_folders()
    assert not orphan.exists() and not list(out.glob(".*.tmp"))
