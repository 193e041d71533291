"""Attacks, detection, self-healing and the anomaly experiment, on digits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dice_influence.apps import anomaly as A
from dice_influence.apps.aggregators import ClippedGossip, TrimmedMean
from dice_influence.apps.defense import (
    GuardOptions,
    guarded_train,
    honest_connected,
    repair_rows,
)
from dice_influence.attacks import AttackPlan, AttackSpec, choose_nodes, with_data_attacks
from dice_influence.config import ConfigError, load_config
from dice_influence.experiments.anomaly import demo_config, parse_experiment, run_experiment
from dice_influence.gossip import Mixer
from dice_influence.loop import RoundView
from dice_influence.simulator import build_problem
from dice_influence.topology import mixing_matrix


def digits_cfg(rounds: int = 20, **exp):
    c = demo_config()
    c["train"]["rounds"] = rounds
    c["experiment"].update(exp)
    return load_config(c)


def attacked(cfg, specs):
    plan = AttackPlan.resolve([AttackSpec(**s) for s in specs], cfg.topology.n, cfg.seed)
    return build_problem(with_data_attacks(cfg, plan)), plan


# ------------------------------------------------------------------------------------ attacks


def test_attack_specs_select_nodes_deterministically():
    a = AttackSpec(kind="label_flip", count=3)
    assert choose_nodes(a, 20, 0) == choose_nodes(a, 20, 0)
    assert choose_nodes(a, 20, 0) != choose_nodes(a, 20, 1)
    b = AttackSpec(kind="gaussian_noise", count=1)
    assert set(choose_nodes(b, 20, 0)) <= set(choose_nodes(a, 20, 0))  # same seeded draw
    assert choose_nodes(AttackSpec(kind="scale", node_fraction=0.1), 50, 0).__len__() == 5
    assert choose_nodes(AttackSpec(kind="free_rider", nodes=[3, 1]), 5, 0) == [1, 3]
    with pytest.raises(ValueError, match="exactly one of"):
        AttackSpec(kind="label_flip", count=1, nodes=[0])
    with pytest.raises(ValueError, match="out of range"):
        choose_nodes(AttackSpec(kind="label_flip", nodes=[7]), 5, 0)


def test_update_attacks_transform_sent_update():
    plan = AttackPlan.resolve(
        [
            AttackSpec(kind="sign_flip", scale=-5, nodes=[0]),
            AttackSpec(kind="free_rider", nodes=[1]),
            AttackSpec(kind="update_noise", sigma=0.5, nodes=[2]),
        ],
        4,
        0,
    )
    U = torch.ones(4, 3)
    rows = plan.apply_updates(U, 0)
    assert rows == [0, 1, 2]
    assert torch.equal(U[0], torch.full((3,), -5.0)) and torch.equal(U[1], torch.zeros(3))
    assert not torch.equal(U[2], torch.ones(3)) and torch.equal(U[3], torch.ones(3))
    V = torch.ones(4, 3)
    plan.apply_updates(V, 0)
    assert torch.equal(U, V)  # seeded noise: replay is exact
    cfg = with_data_attacks(
        digits_cfg(),
        AttackPlan.resolve([AttackSpec(kind="label_flip", count=2, fraction=0.5)], 16, 0),
    )
    assert cfg.data.corruptions[0].fraction == 0.5 and len(cfg.data.corruptions[0].nodes) == 2


# ------------------------------------------------------------------------------------ detection


def test_label_flip_detected_by_sign_rule_with_pre_readout():
    cfg = digits_cfg(rounds=40)
    problem, plan = attacked(cfg, [{"kind": "label_flip", "count": 2}])
    res = guarded_train(problem, plan, GuardOptions(readout="pre"))
    tk = res.tracker
    E = tk.seen.numpy()
    m = A.evaluate(tk.score.numpy(), E, plan.mask)
    assert m["auroc_edge"] >= 0.99 and m["auroc_node"] == 1.0
    assert m["precision"] == 1.0 and m["recall"] == 1.0
    assert m["caught"] == plan.malicious
    series = A.over_rounds(tk.history(), tk.rounds, E, plan.mask)
    s = A.summarize_rounds(series, from_round=3, to_round=40)
    assert s["min_precision"] == 1.0  # never a false alarm
    s = A.summarize_rounds(series, from_round=30, to_round=40)
    assert s["min_precision"] >= 0.95 and s["min_recall"] >= 0.95


def test_sign_flip_caught_in_first_rounds_and_defence_heals():
    cfg = digits_cfg(rounds=30)
    problem, plan = attacked(cfg, [{"kind": "sign_flip", "scale": -5, "count": 2}])
    res = guarded_train(problem, plan, GuardOptions(defense="dice"))
    judged, bad = A.edge_sets(res.tracker.seen.numpy(), plan.mask)
    first = {}
    for t, k, j, _s in res.prune_log:
        first.setdefault((k, j), t)
    assert all(first.get((k, j), 99) <= 1 for k, j in zip(*np.nonzero(bad), strict=True))
    assert not (res.blocked & judged & ~bad).any()  # no honest edge pruned
    assert honest_connected(res.W_final, ~plan.mask)
    clean = guarded_train(
        build_problem(cfg), None, GuardOptions(track_every=0), malicious=plan.mask
    )
    undefended = guarded_train(problem, plan, GuardOptions(track_every=0))
    acc = res.final["honest_acc_mean"]
    assert acc >= clean.final["honest_acc_mean"] - 0.05
    assert acc > undefended.final["honest_acc_mean"] + 0.05


def test_rules_and_metrics_on_hand_made_scores():
    E = ~np.eye(4, dtype=bool)
    S = np.array([[0, -1.0, -1.2, 5.0], [-1, 0, -1.1, 4.0], [-1, -0.9, 0, 3.0], [-1, -1, -1, 0]])
    mal = np.array([False, False, False, True])
    F = A.flags(S, E, "sign")
    assert F[:3, 3].all() and not F[:3, :3].any()
    Z = A.robust_z(S, E)
    assert np.isnan(Z[0, 0]) and Z[0, 3] > 3
    m = A.evaluate(S, E, mal)
    assert m["auroc_edge"] == 1.0 and m["f1"] == 1.0 and m["caught"] == [3]
    assert A.auroc([0.1, 0.2, 0.2, 0.9], [0, 0, 1, 1]) == pytest.approx(0.875)
    with pytest.raises(ValueError, match="unknown detection rule"):
        A.flags(S, E, "vote")


# ------------------------------------------------------------------------------------ no NaN leaks


def test_repair_keeps_rows_stochastic():
    W = mixing_matrix("ring", 6)
    B = np.zeros((6, 6), bool)
    B[0, 1] = B[0, 0] = True
    P = repair_rows(W, B)  # the default rule rescales what the row kept
    assert np.allclose(P.sum(1), 1.0) and P[0, 1] == 0 and P[0, 0] == pytest.approx(1 / 2)
    assert P[0, 5] == pytest.approx(1 / 2) and np.array_equal(P[1:], W[1:])
    D = repair_rows(W, B, "diagonal")
    assert np.allclose(D.sum(1), 1.0) and D[0, 1] == 0 and D[0, 0] == pytest.approx(2 / 3)
    B[0, 5] = True
    assert np.array_equal(repair_rows(W, B)[0], np.eye(6)[0])  # nothing left: keeps itself


@pytest.mark.parametrize("n", [8, 40])
def test_pruned_or_diverged_sender_never_leaks(n):
    W = mixing_matrix("ring", n)
    B = np.zeros((n, n), bool)
    B[[2, 4], 3] = True  # both receivers of node 3 prune it
    theta = torch.randn(n, 6)
    theta[3] = float("nan")
    theta[3, 0] = float("inf")
    out = Mixer(repair_rows(W, B))(theta)
    assert torch.isfinite(out[np.arange(n) != 3]).all()
    honest = torch.ones(n, dtype=torch.bool)
    honest[3] = False
    ids = np.arange(n)
    view = RoundView(0, n, ids, ids, theta, theta, W)
    for agg in (ClippedGossip()(view, W), TrimmedMean(0.34)(view, W)):
        assert torch.isfinite(agg[honest]).all()


@pytest.mark.parametrize("defense", ["dice", "clipped_gossip"])
def test_exploding_attacker_does_not_poison_defended_network(defense):
    cfg = digits_cfg(rounds=8)
    problem, plan = attacked(cfg, [{"kind": "scale", "scale": 1e38, "count": 1, "start": 3}])
    res = guarded_train(problem, plan, GuardOptions(defense=defense))
    assert not res.nonfinite_honest
    bad = plan.malicious[0]
    assert not torch.isfinite(res.theta[bad]).all()  # the attacker itself did blow up
    und = guarded_train(problem, plan, GuardOptions(track_every=0))
    assert und.nonfinite_honest  # without a defence it spreads


# ------------------------------------------------------------------------------------ experiment


def test_experiment_writes_metrics_and_plots(tmp_path):
    cfg = digits_cfg(rounds=12, arms=["no_attack", "attack", "attack_defended", "attack_baseline"])
    m = run_experiment(cfg, tmp_path, seeds=[0])
    det = m["detection"]
    for key in (
        "auroc_edge",
        "auroc_node",
        "precision",
        "recall",
        "f1",
        "rounds_to_90pct",
        "honest_edges_flagged",
    ):
        assert key in det and key in m["detection_worst"]
    for arm in ("no_attack", "attack", "attack_defended", "attack_baseline"):
        for key in (
            "honest_acc_mean",
            "honest_acc_worst",
            "honest_edges_pruned",
            "honest_graph_connected",
        ):
            assert key in m["defense"][arm]
    assert det["auroc_edge"] >= 0.95
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["defense"]["attack_defended"]["honest_graph_connected"] == 1.0
    for f in (
        "edges.csv",
        "detection_rounds.csv",
        "accuracy.csv",
        "reciprocity.csv",
        "fig4_neighbours.png",
        "roc.png",
        "accuracy.png",
        "graph_pruned.png",
        "README.md",
    ):
        assert (tmp_path / f).is_file(), f


def test_experiment_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"experiment\.detection\.rul: unknown key"):
        parse_experiment(digits_cfg(detection={"rul": "sign"}))
    with pytest.raises(ConfigError, match=r"experiment\.attacks\.0\.kind"):
        parse_experiment(digits_cfg(attacks=[{"kind": "flip", "count": 1}]))
    with pytest.raises(ConfigError, match=r"count=99 exceeds"):
        parse_experiment(digits_cfg(attacks=[{"kind": "label_flip", "count": 99}]))


def test_cli(tmp_path):
    from dice_influence.cli import app

    runner = CliRunner()
    r = runner.invoke(
        app,
        [
            "experiment",
            "anomaly",
            "configs/anomaly-digits.yaml",
            "--out",
            str(tmp_path / "run"),
            "--set",
            "train.rounds=6",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "metrics.json").is_file()
    r = runner.invoke(
        app,
        [
            "experiment",
            "anomaly",
            "configs/anomaly-digits.yaml",
            "--out",
            str(tmp_path / "bad"),
            "--set",
            "experiment.tracking.readout=late",
        ],
    )
    assert r.exit_code == 2
    assert "experiment.tracking.readout" in r.output


def test_anomaly_experiment_takes_the_plugin_sections(tmp_path):
    raw = digits_cfg(rounds=6, arms=["no_attack", "attack_defended"]).model_dump(mode="json")
    raw["policy"] = {"kind": "prune", "rule": "zscore", "z_threshold": 2.5, "readmit": False}
    raw["observers"] = [{"kind": "proximal", "readout": "post", "window": 5}]
    raw["aggregator"] = {"kind": "trimmed_mean", "trim": 0.3}
    ex = parse_experiment(load_config(raw))
    assert ex.detection.rule == "zscore" and ex.detection.z_threshold == 2.5
    assert ex.defense.readmit is False and ex.tracking.readout == "post"
    assert ex.tracking.window == 5
    assert ex.baseline.kind == "trimmed_mean" and ex.baseline.trim == 0.3
    with_sections = run_experiment(load_config(raw), tmp_path / "a", seeds=[0])
    plain = digits_cfg(rounds=6, arms=["no_attack"])
    without = run_experiment(plain, tmp_path / "b", seeds=[0])
    # the config's aggregator is the baseline arm's, not every arm's
    assert with_sections["defense"]["no_attack"] == without["defense"]["no_attack"] | {
        "seconds": with_sections["defense"]["no_attack"]["seconds"]}
