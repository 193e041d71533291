"""What a newcomer trips over: fast help, --version, errors that name the bad value and say
the fix, --data-dir, umask-following files, progress lines in logs, readable anomaly tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from typer.testing import CliRunner

from dice_influence import __version__
from dice_influence._util import atomic_write_text, progress_bar
from dice_influence.cli import app

runner = CliRunner()
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cfg(tmp_path: Path, **over) -> Path:
    raw = {"topology": {"n": 4}, "model": {"hidden": [8]}, "data": {"samples_per_node": 40},
           "train": {"rounds": 2, "batch_size": 8}}
    raw.update(over)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_help_and_version_import_neither_torch_nor_experiments():
    code = ("import sys\nfrom dice_influence.cli import app\n"
            "for args in (['--help'], ['--version']):\n"
            "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'numpy', 'pydantic', 'dice_influence.experiments."
            "anomaly') if m in sys.modules]\nprint('HEAVY', heavy)\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120).stdout
    assert "HEAVY []" in out, out
    assert "launch" in out and "experiment" in out and f"dice-influence {__version__}" in out


def test_experiment_group_lists_its_commands():
    r = runner.invoke(app, ["experiment", "--help"])
    assert r.exit_code == 0
    for name in ("alignment", "anomaly", "contribution", "selection", "aggregation", "cascade"):
        assert name in r.output
    r = runner.invoke(app, ["experimnt"])
    assert r.exit_code != 0 and "experiment" in r.output


def test_bad_set_value_is_named_not_the_config_file(tmp_path):
    cfg = _cfg(tmp_path)
    r = runner.invoke(app, ["train", str(cfg), "--set", "train.lr=abc", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "--set train.lr=abc" in r.output and "invalid configuration in" not in r.output
    r = runner.invoke(app, ["config", str(cfg), "--set", "train.rondus=5"])
    assert r.exit_code == 2 and "--set train.rondus=5" in r.output
    assert "did you mean 'rounds'?" in r.output


def test_experiment_settings_get_did_you_mean_or_the_valid_keys():
    root = Path(__file__).resolve().parents[1] / "configs"
    for config, key, want in (
        ("contribution-digits.yaml", "experiment.shapley.permutation=3", "'permutations'"),
        ("selection-digits.yaml", "experiment.degre=3", "'degree'"),
        ("anomaly-blog.yaml", "experiment.tracking.readot=pre", "'readout'"),
        ("selection-digits.yaml", "experiment.zzz=3", "valid keys here: degree, every"),
    ):
        kind = config.split("-")[0]
        r = runner.invoke(app, ["experiment", kind, str(root / config), "--out", "x", "--set", key])
        assert r.exit_code == 2, r.output
        assert want in r.output and "Traceback" not in r.output


def test_did_you_mean_for_config_keys_and_topology_names(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("topolgy:\n  n: 4\ndata:\n  corruptions:\n    - {kind: label_flip, nodes: [0],"
                   " fractoin: 0.5}\n")
    r = runner.invoke(app, ["config", str(bad)])
    assert r.exit_code == 2
    assert "topolgy: unknown key (did you mean 'topology'" in r.output
    assert "data.corruptions.0.fractoin: unknown key (did you mean 'fraction'?)" in r.output
    r = runner.invoke(app, ["topology", "rign", "-n", "8"])
    assert r.exit_code == 2 and "did you mean 'ring'?" in r.output
    r = runner.invoke(app, ["train", str(_cfg(tmp_path, topology={"name": "exponentail", "n": 4})),
                            "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "did you mean 'exponential'?" in r.output


def test_missing_dataset_says_where_it_looked_and_data_dir_works(tmp_path):
    cfg = _cfg(tmp_path, data={"dataset": "mnist"})
    env = {k: v for k, v in os.environ.items() if k != "DICE_DATA_DIR"}
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "x")], env=env)
    assert r.exit_code == 2
    assert "looked in: nowhere" in r.output and "--data-dir" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = runner.invoke(app, ["train", str(cfg), "-o", str(tmp_path / "x"), "--data-dir", str(empty)])
    assert r.exit_code == 2 and f"looked in: {empty}" in r.output.replace("\n", "")
    for cmd in (["experiment", "alignment"], ["experiment", "anomaly"], ["launch"]):
        assert "--data-dir" in runner.invoke(app, [*cmd, "--help"]).output, cmd


def test_launch_peers_default_and_mismatch(tmp_path):
    cfg = _cfg(tmp_path)
    r = runner.invoke(app, ["launch", str(cfg), "--peers", "3", "-o", str(tmp_path / "p")])
    assert r.exit_code == 2
    assert "--peers 3 but topology.n=4" in r.output and "launching" not in r.output
    assert not (tmp_path / "p").exists()


def test_train_writes_files_that_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        r = runner.invoke(app, ["train", str(_cfg(tmp_path)), "-o", str(tmp_path / "run"), "-q"])
        assert r.exit_code == 0, r.output
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    for f in ("config.yaml", "metrics.json", "README.md", "report.html", "nodes.csv",
              "final.safetensors", "accuracy.png"):
        assert (tmp_path / "run" / f).stat().st_mode & 0o777 == 0o644, f
    assert "report:" in r.output


def test_progress_is_plain_lines_off_a_terminal(capsys):
    with progress_bar(True, 5, "replaying", every_s=0.0) as advance:
        for _ in range(5):
            advance()
    err = capsys.readouterr().err
    assert "replaying: 1/5 (20%)" in err and "replaying: 5/5 (100%)" in err
    assert "\r" not in err and "\x1b[" not in err
    with progress_bar(True, 5, "quick") as advance:  # fast phases stay silent
        for _ in range(5):
            advance()
    assert capsys.readouterr().err == ""


def test_anomaly_tables_say_yes_no_and_what_min_recall_is():
    from dice_influence.experiments.anomaly_report import legend, markdown_tables

    arm = {"honest_acc_mean": 0.9, "honest_acc_worst": 0.8, "honest_edges_pruned": 0.0,
           "malicious_edges_pruned": 1.0, "honest_graph_connected": 2 / 3}
    worst = {**arm, "honest_graph_connected": False}
    det = {"auroc_edge": 1.0, "recall": 1.0, "min_recall": 0.9}
    m = {"seeds": [0, 1, 2], "detection": det, "detection_worst": det,
         "defense": {"attack_defended": arm}, "defense_worst": {"attack_defended": worst}}
    md = markdown_tables(m, (3, 40))
    assert "True" not in md and "False" not in md
    assert "no (2/3 seeds)" in md and "min recall (rounds 3-40)" in md and "recall (end)" in md
    assert "lowest value over every round from 3 to 40" in legend((3, 40), 3)
