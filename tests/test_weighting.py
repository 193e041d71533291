"""Influence-weighted aggregation: the rule, the policy on per-row views equals the full
network, the same result on real peers as in the simulator, and the experiment command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dice_influence.apps.proximal import ProximalObserver
from dice_influence.apps.weighting import (
    InfluenceWeightPolicy,
    influence_factors,
    reweight_rows,
)
from dice_influence.cli import app
from dice_influence.config import ConfigError, load_config
from dice_influence.loop import RoundView
from dice_influence.topology import mixing_matrix


def test_factors_raise_helpful_lower_harmful_and_drop_diverged():
    w = np.array([0.25, 0.25, 0.25, 0.25, 0.0])
    score = np.array([0.0, -1.0, -1.2, 8.0, -5.0])  # node 0 itself; node 4 is no neighbour
    f = influence_factors(score, w, 0, temperature=1.0)
    assert f[0] == 1.0 and f[4] == 1.0
    assert 1.0 < f[1] < 2.0 and f[2] > f[1]  # helpful: up, more helpful: more
    assert f[3] < 0.01  # far more harmful than the typical neighbour
    score[3] = np.inf
    assert influence_factors(score, w, 0, 1.0)[3] == 0.0
    hot = influence_factors(np.array([0.0, -1.0, -1.2, 8.0, 0.0]), w, 0, temperature=1e9)
    assert np.allclose(hot, 1.0)  # tau -> infinity: nominal weights
    with pytest.raises(ValueError, match="temperature=0"):
        influence_factors(score, w, 0, 0.0)


def test_reweighted_rows_stay_stochastic_and_nonnegative():
    W = mixing_matrix("random-regular", 8, degree=3, weights="metropolis", seed=2)
    rng = np.random.default_rng(0)
    rows = np.arange(8)
    F = np.stack([influence_factors(rng.normal(size=8), W[k], k, 0.7) for k in rows])
    out = reweight_rows(W, F, rows)
    assert np.allclose(out.sum(1), 1.0) and (out >= 0).all()
    assert ((out > 0) <= (W > 0)).all()  # never a new link
    none = reweight_rows(W, np.zeros((8, 8)), rows)  # every neighbour dropped: itself only
    assert np.allclose(none, np.eye(8))


def test_weighting_on_rows_equals_the_full_network():
    n = 8
    W = mixing_matrix("exponential", n)
    torch.manual_seed(1)
    G = torch.randn(n, 5, dtype=torch.float64) + 2.0
    ids = np.arange(n)
    full_obs, row_obs = ProximalObserver(n), [ProximalObserver(n) for _ in range(n)]
    full_pol = InfluenceWeightPolicy(n, full_obs, temperature=0.5, start=1)
    row_pol = [InfluenceWeightPolicy(n, o, temperature=0.5, start=1) for o in row_obs]
    for t in range(5):
        theta = torch.randn(n, 5, dtype=torch.float64)
        U = torch.randn(n, 5, dtype=torch.float64)
        U[5] = 3.0 * G.mean(0)  # a consistently harmful sender
        full = RoundView(t, n, ids, ids, theta, theta + U, W, update=U)
        full._grads["pre"] = G
        full_obs.before_gossip(full)
        W_full = full_pol.decide(full)
        full_obs.after_gossip(full, W_full)
        for k in range(n):
            senders = np.array(sorted({k, *np.flatnonzero(W[k] > 0).tolist()}))
            view = RoundView(t, n, np.array([k]), senders, theta[k:k + 1], (theta + U)[senders],
                             W, update=U[senders], pre_grad=G[k:k + 1])
            row_obs[k].before_gossip(view)
            W_k = row_pol[k].decide(view)
            row_obs[k].after_gossip(view, W_k)
            assert np.allclose(W_k[k], W_full[k], atol=1e-12), (t, k)
    listeners = np.flatnonzero(W[:, 5] > 0)
    listeners = listeners[listeners != 5]
    assert (W_full[listeners, 5] < 0.2 * W[listeners, 5]).all(), "harmful sender kept weight"
    assert np.allclose(W_full.sum(1), 1.0)


def test_influence_weight_is_a_config_policy():
    cfg = load_config({"policy": {"kind": "influence_weight", "temperature": 0.5}})
    assert cfg.policy["temperature"] == 0.5
    with pytest.raises(ConfigError, match="policy.temperature"):
        load_config({"policy": {"kind": "influence_weight", "temperature": 0}})


def test_aggregation_experiment_runs_on_a_tiny_config(tmp_path):
    import yaml

    raw = {
        "seed": 0,
        "data": {"dataset": "digits", "samples_per_node": 30, "test_samples_per_node": 10,
                 "validation_samples": 60},
        "topology": {"name": "random-regular", "degree": 3, "n": 8},
        "model": {"name": "mlp", "hidden": [8]},
        "train": {"rounds": 4, "batch_size": 8, "lr": 0.1, "eval_every": 2},
        "experiment": {"scenarios": {
            "iid": {},
            "signflip": {"attacks": [{"kind": "sign_flip", "scale": -5.0, "count": 1}]},
            "noniid": {"set": {"data.partition": "dirichlet(0.3)"}}}},
    }
    path = tmp_path / "agg.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["experiment", "aggregation", str(path), "--out",
                                   str(tmp_path / "run"), "-q"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["kind"] == "aggregation"
    page = (tmp_path / "run" / "report.html").read_text()  # the run's report
    assert "data:image/png;base64" in page and "http://" not in page
    assert set(m["aggregation"]) == {"iid", "signflip", "noniid"}
    for sc in m["aggregation"].values():
        assert set(sc) == {"dice", "uniform", "clipped_gossip", "trimmed_mean"}
        for a in sc.values():
            assert 0.0 <= a["honest_acc_worst"] <= a["honest_acc_mean"] <= 1.0
    assert len(m["per_seed"][0]["scenarios"]["signflip"]["malicious"]) == 1
    for f in ("arms.csv", "accuracy.csv", "aggregation.png"):
        assert (tmp_path / "run" / f).is_file()
    raw["experiment"]["scenarios"]["bad"] = {"set": {"data.partiton": "iid"}}
    path.write_text(yaml.safe_dump(raw))
    bad = CliRunner().invoke(app, ["experiment", "aggregation", str(path), "--out",
                                   str(tmp_path / "r2")])
    assert bad.exit_code == 2 and "experiment.scenarios.bad.set" in bad.output, bad.output


# ------------------------------------------------------------------------------ real peers


def peer_cfg(n: int, rounds: int = 8, **extra):
    return load_config({
        "seed": 1,
        "data": {"dataset": "digits", "samples_per_node": 40, "test_samples_per_node": 20,
                 "validation_samples": 60,
                 "corruptions": [{"kind": "label_flip", "nodes": [1]}]},
        "topology": {"name": "exponential", "n": n},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"rounds": rounds, "batch_size": 8, "lr": 0.1, "eval_every": 4},
        "experiment": {"distributed": {"timeout_s": 20}},
        **extra,
    })


def test_influence_weighting_same_on_peers_as_in_the_simulator(tmp_path):
    """The influence-weighted rows are decided by each peer from its own proximal row: 4 real
    peers end with the simulator's parameters and proximal influence."""
    from dice_influence.distributed import launch, simulate
    from dice_influence.simulator import train

    n = 4
    cfg = peer_cfg(n, observers=[{"kind": "proximal", "readout": "pre"}],
                   policy={"kind": "influence_weight", "temperature": 0.5})
    ref = simulate(cfg)
    res = launch(cfg, n, tmp_path, wall_timeout=150)
    assert res.ok, res.errors
    assert torch.allclose(res.theta, ref.theta, atol=1e-5, rtol=0)
    assert np.allclose(res.P, ref.P, atol=1e-5, rtol=0) and np.abs(ref.P).max() > 1e-4
    sim = train(cfg)  # `dice train` with the same keys
    assert torch.allclose(sim.theta, ref.theta, atol=1e-12, rtol=0)
    plain = train(peer_cfg(n))
    assert not torch.allclose(plain.theta, sim.theta, atol=1e-4), "the policy should matter"
    W_last = sim.W_used[max(sim.W_used)]
    W0 = sim.train_problem.W(0)
    out = np.flatnonzero(W0[:, 1] > 0)
    out = out[out != 1]
    assert (W_last[out, 1] < W0[out, 1]).all(), "the label flipper should have lost weight"
