"""The cleaning experiment end to end on a tiny run: metrics keys, ranking quality on an easy
corruption, the report's images, and bad settings named."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dice_influence.config import ConfigError, load_config
from dice_influence.experiments import cleaning as C


def _cfg(**experiment):
    return load_config({
        "seed": 0,
        "data": {"dataset": "digits", "samples_per_node": 48, "validation_samples": 120},
        "topology": {"name": "ring", "n": 6},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"rounds": 24, "batch_size": 8, "lr": 0.05, "momentum": 0.9,
                  "dtype": "float64", "checkpoint_every": 6, "eval_every": 24},
        "experiment": {"fidelity_samples": 6, "window": 8, "images": 4,
                       "scenarios": [{"name": "flip", "corruptions": [
                           {"kind": "label_flip", "nodes": [0, 1], "fraction": 0.25}]}],
                       **experiment},
    })


def test_auroc_and_precision():
    s = np.array([0.9, 0.8, 0.1, 0.2, 0.7])
    bad = np.array([True, True, False, False, False])
    assert C.auroc(s, bad) == 1.0
    assert C.auroc(-s, bad) == 0.0
    assert C.auroc(s, np.zeros(5, bool)) is None
    assert C.precision_at(s, bad, 2) == 1.0 and C.precision_at(s, bad, 3) == pytest.approx(2 / 3)


def test_cleaning_run_writes_the_named_metrics(tmp_path):
    m = C.run_experiment(_cfg(), tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["kind"] == "cleaning"
    assert set(saved["detection"]) == set(C.METHODS)
    for meth in C.METHODS:
        assert set(saved["detection"][meth]) == {"auroc", "precision_at_k"}
    assert set(saved["fidelity"]) == {"pearson", "spearman", "sign_agreement"}
    assert set(saved["retrain"]) == {"1%", "5%", "10%"}
    for r in saved["retrain"].values():
        assert {"clean", "corrupted", "after_removal", "fraction_recovered"} <= set(r)
    # flipped labels on two nodes are found far better than chance, and the sweep tracks
    # the exact replay
    assert m["detection"]["dice"]["auroc"] > 0.75
    assert m["fidelity"]["pearson"] > 0.8
    low = saved["scenarios"]["flip"]["corrupted_scored_lowest"]
    assert low["samples"] == 10 and 0 <= low["gt_helpful_fraction"] <= 1
    for r in saved["retrain"].values():
        assert {"clean_loss", "corrupted_loss", "after_removal_loss",
                "loss_fraction_recovered"} <= set(r)
    assert (tmp_path / "samples-flip.png").stat().st_size > 1000
    assert (tmp_path / "scores-flip.csv").read_text().startswith("node,position,dataset_index")
    html = (tmp_path / "report.html").read_text()
    assert "Find the bad data" in html and "samples-flip.png" in html


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="out of range"):
        C.parse_experiment(_cfg(scenarios=[{"name": "x", "corruptions": [
            {"kind": "label_flip", "nodes": [9]}]}]))
    with pytest.raises(ConfigError, match="removal_fractions"):
        C.parse_experiment(_cfg(removal_fractions=[1.5]))
    with pytest.raises(ConfigError, match="names must differ"):
        C.parse_experiment(_cfg(scenarios=[{"name": "a", "corruptions": []}] * 2))
