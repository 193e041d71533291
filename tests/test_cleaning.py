"""The cleaning experiment end to end on a tiny run: metrics keys, ranking quality on an easy
corruption, the report's images, and bad settings named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

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


def test_poisoning_scenario_flags_exactly_the_relabelled_samples():
    """The targeted-poisoning scenario (a label_flip with a permutation that moves only the 3s
    to 8): the corrupted flags are exactly the samples whose label changed, all once 3s."""
    from dice_influence.problem import build_problem

    ex = C.parse_experiment(load_config({
        "seed": 0, "data": {"dataset": "digits", "samples_per_node": 40},
        "topology": {"name": "ring", "n": 16}, "train": {"rounds": 2}}))
    poison = next(s for s in ex.scenarios if s.name == "poison-3-as-8")
    cfg = _cfg(scenarios=[poison.model_dump(mode="json")])
    cfg = cfg.model_copy(update={"topology": cfg.topology.model_copy(update={"n": 16})})
    clean = build_problem(C._scenario_cfg(cfg, None)).node_data
    bad = build_problem(C._scenario_cfg(cfg, poison)).node_data
    changed = bad.y != clean.y
    assert bool(changed.any()) and bool((changed == bad.corrupted).all())
    assert bool((clean.y[changed] == 3).all()) and bool((bad.y[changed] == 8).all())
    # about half of the 3s on every node (only the drawn half of the samples is touched)
    share = changed.sum().item() / (clean.y == 3).sum().item()
    assert 0.3 < share < 0.7


def test_injected_poison_runs_alone_and_its_oracle_removal_leaves_the_clean_data(tmp_path):
    """``inject-3-as-8`` style scenario (inject_flip: mislabelled copies added, the clean data
    kept) run alone through ``experiment.only``: only the copies count as corrupted, the oracle
    mask (corrupted samples removed) leaves exactly the clean run's samples, and the scenario
    keeps its place in the list for ``fidelity_scenarios`` (second here: no replay check)."""
    from dice_influence.problem import build_problem

    inject = {"name": "inject", "corruptions": [
        {"kind": "inject_flip", "nodes": list(range(6)), "fraction": 0.5,
         "permutation": [0, 1, 2, 8, 4, 5, 6, 7, 8, 9]}]}
    flip = {"name": "flip", "corruptions": [{"kind": "label_flip", "nodes": [0], "fraction": 0.2}]}
    cfg = _cfg(scenarios=[flip, inject], only=["inject"], fidelity_scenarios=1,
               removal_fractions=[0.05])
    ex = C.parse_experiment(cfg)
    clean = build_problem(C._scenario_cfg(cfg, None)).node_data
    bad = build_problem(C._scenario_cfg(cfg, ex.scenarios[1])).node_data
    copies = int(bad.corrupted.sum())
    assert copies > 0 and int(bad.sizes.sum()) == int(clean.sizes.sum()) + copies
    assert bool((bad.y[bad.corrupted] == 8).all())
    assert not bool(bad.corrupted[:, :48].any())  # the node's own 48 samples are untouched
    keep = bad.mask & ~bad.corrupted
    assert torch.equal(bad.x[keep], clean.x[clean.mask]) and torch.equal(bad.y[keep],
                                                                          clean.y[clean.mask])
    m = C.run_experiment(cfg, tmp_path)
    assert list(m["scenarios"]) == ["inject"] and m["scenario"] == "inject"
    sc = m["scenarios"]["inject"]
    assert sc["corrupted_samples"] == [copies] and sc["samples"] == int(bad.sizes.sum())
    assert sc["fidelity"] is None and sc["oracle_removal"]["after_removal"] is not None
    assert 0 <= m["detection"]["dice"]["auroc"] <= 1
    with pytest.raises(ConfigError, match="experiment.only"):
        C.parse_experiment(_cfg(only=["nope"]))


def test_test_fraction_moves_the_held_out_split_and_is_refused_where_the_split_is_fixed():
    from dice_influence.problem import build_problem

    base = {"seed": 0, "data": {"dataset": "digits", "samples_per_node": 40,
                                "validation_samples": 300}, "topology": {"name": "ring", "n": 4}}
    p = build_problem(load_config({**base, "data": {**base["data"], "test_fraction": 0.28}}))
    assert p.dataset.y_test.shape[0] == pytest.approx(0.28 * 1797, abs=10)
    assert p.val_y.shape[0] == 300
    assert build_problem(load_config(base)).dataset.y_test.shape[0] == pytest.approx(
        0.2 * 1797, abs=10)
    with pytest.raises(ConfigError, match="official test split"):
        build_problem(load_config({"data": {"dataset": "fashion-mnist", "test_fraction": 0.3}}))
