"""The `dice` command line: demo, train, topology, config, errors."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from dice_influence.cli import app

runner = CliRunner()


def test_demo_runs_end_to_end(tmp_path):
    r = runner.invoke(app, ["demo", "--out", str(tmp_path), "--rounds", "30"])
    assert r.exit_code == 0, r.output
    assert "mean node accuracy" in r.output
    assert "pearson" in r.output
    assert "caught by their neighbours" in r.output
    assert "report:" in r.output and "next:" in r.output and "total" in r.output
    for f in ("train/metrics.json", "train/nodes.csv", "train/final.safetensors",
              "alignment/metrics.json", "alignment/scatter.png", "anomaly/metrics.json",
              "cascade/cascade.png", "report.html", "train/report.html", "cascade/report.html",
              "alignment/report.html", "anomaly/report.html"):
        assert (tmp_path / f).is_file(), f
    top = (tmp_path / "report.html").read_text()
    assert top.count("<img") >= 8 and "The influence cascade of one removal" in top
    res = json.loads((tmp_path / "alignment/metrics.json").read_text())["results"]
    keys = {"hops", "readout", "curvature", "pearson", "spearman", "kendall", "sign_agreement",
            "median_rel_error", "gt_s_per_event", "e_s_per_event"}
    assert keys <= set(res[0])


def test_train_writes_run_directory(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"topology": {"n": 4}, "model": {"hidden": [8]},
                                   "data": {"samples_per_node": 40},
                                   "train": {"rounds": 3, "batch_size": 8}}))
    out = tmp_path / "run"
    r = runner.invoke(app, ["train", str(cfg), "--out", str(out), "--set", "train.lr=0.05", "-q"])
    assert r.exit_code == 0, r.output
    for f in ("config.yaml", "metrics.json", "nodes.csv", "history.csv", "final.safetensors",
              "trajectory.json", "checkpoints.safetensors", "README.md"):
        assert (out / f).is_file(), f
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.05


def test_bad_input_gives_one_clear_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lrr: 0.1\n")
    r = runner.invoke(app, ["train", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "train.lrr: unknown key" in r.output
    assert "Traceback" not in r.output
    r = runner.invoke(app, ["topology", "hypercube", "-n", "8"])
    assert r.exit_code == 2 and "unknown topology 'hypercube'" in r.output


def test_topology_json_orientation():
    r = runner.invoke(app, ["topology", "directed-ring", "-n", "4", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert {"W", "spectral_gap", "out_weight"} <= set(d)
    assert d["W"][0][1] == 0.5 and d["W"][1][0] == 0.0  # receiver 0 takes from sender 1


def test_config_prints_every_key():
    r = runner.invoke(app, ["config"])
    assert r.exit_code == 0
    d = yaml.safe_load(r.output)
    assert {"seed", "data", "topology", "model", "train", "experiment"} <= set(d)
