"""Online proximal influence: tracker, read-outs, sign convention, baseline equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dice_influence.apps import reciprocity as REC
from dice_influence.apps.defense import GuardOptions, guarded_train
from dice_influence.config import load_config
from dice_influence.gossip import loss_grads
from dice_influence.influence.proximal import ProximalTracker, dot_matrix, proximal_matrix
from dice_influence.simulator import build_problem, train


def cfg(**over):
    base = {
        "seed": 1,
        "data": {
            "dataset": "digits",
            "samples_per_node": 40,
            "test_samples_per_node": 20,
            "validation_samples": 100,
        },
        "topology": {"name": "ring", "n": 6},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"rounds": 8, "batch_size": 8, "lr": 0.1, "eval_every": 4},
    }
    for key, val in over.items():
        sec, k = key.split("__")
        base[sec][k] = val
    return load_config(base)


@pytest.mark.parametrize("readout,momentum", [("pre", 0.0), ("midpoint", 0.9)])
def test_baseline_loop_equals_simulator(readout, momentum):
    c = cfg(train__momentum=momentum)
    ref = train(c)
    res = guarded_train(build_problem(c), None, GuardOptions(readout=readout))
    assert torch.allclose(res.theta, ref.theta, atol=1e-6, rtol=0)
    assert res.tracker is not None and len(res.tracker.rounds) == c.train.rounds
    # evaluation on the common test set matches the simulator's at the last round
    assert res.final["honest_acc_mean"] == pytest.approx(ref.final_metrics["mean_acc"], abs=1e-6)


def test_tracker_matches_proximal_matrix_and_readouts():
    """pre = ∇L(θ^t)·u, post = ∇L(θ^{t+1})·u, midpoint = their mean; sums = proximal_matrix."""
    c = cfg(train__rounds=3)
    p = build_problem(c)
    x, y = p.test_set(per_node=True)
    res = {
        ro: guarded_train(p, None, GuardOptions(readout=ro)) for ro in ("pre", "post", "midpoint")
    }
    th0 = p.init_theta()
    th1, _ = p.round(th0, None, 0)
    half, _ = p.local_step(th0, None, 0)
    U = half - th0
    W = torch.tensor(p.W(0), dtype=torch.float32)
    G0 = loss_grads(p.fm, th0, x, y)[1]
    G1 = loss_grads(p.fm, th1, x, y)[1]
    pre = proximal_matrix(G0, W, U).double()
    post = proximal_matrix(G1, W, U).double()
    h = {ro: torch.from_numpy(r.tracker.history("actual")[0]).double() for ro, r in res.items()}
    assert torch.allclose(h["pre"], pre, atol=1e-7)
    assert torch.allclose(h["post"], post, atol=1e-7)
    assert torch.allclose(h["midpoint"], 0.5 * (pre + post), atol=1e-7)
    # cumulative = sum of the per-round history
    tk = res["pre"].tracker
    assert torch.allclose(tk.cum, torch.from_numpy(tk.history("actual")).double().sum(0), atol=1e-6)


def test_sign_convention_matches_counterfactual_loss_difference():
    """post read-out ≈ q_k [L(θ_k^{t+1}) − L(θ_k^{t+1} without j's update)] (positive = harmful)."""
    c = cfg(train__dtype="float64", train__lr=0.01)
    p = build_problem(c)
    x, y = p.test_set(per_node=True)
    th0 = p.init_theta()
    half, _ = p.local_step(th0, None, 0)
    U = half - th0
    th1, _ = p.round(th0, None, 0)
    G1 = loss_grads(p.fm, th1, x, y)[1]
    W = torch.tensor(p.W(0), dtype=torch.float64)
    P = proximal_matrix(G1, W, U)
    k, j = 0, 1
    assert W[k, j] > 0
    loss1 = loss_grads(p.fm, th1, x, y)[0][k]
    cf = th1.clone()
    cf[k] -= W[k, j] * U[j]
    loss_cf = loss_grads(p.fm, cf, x, y)[0][k]
    truth = (loss1 - loss_cf) / p.n
    assert float(P[k, j]) == pytest.approx(float(truth), rel=0.05)


def test_nonfinite_updates_are_harmful_and_contained():
    G = torch.randn(4, 5)
    U = torch.randn(4, 5)
    U[2] = float("nan")
    S = dot_matrix(G, U)
    assert torch.isposinf(S[:, 2]).all() and torch.isfinite(S[:, [0, 1, 3]]).all()
    W = torch.full((4, 4), 0.25)
    tk = ProximalTracker(4, readout="pre", window=2)
    for t in range(3):
        tk.record(t, G, U, W)
    assert torch.isposinf(tk.score[[0, 1, 3], 2]).all()
    assert torch.isfinite(tk.score[:, [0, 1, 3]]).all()
    assert torch.isfinite(tk.window_score[:, [0, 1, 3]]).all()
    # proximal_matrix (core semantics) masks non-finite senders that carry weight 0
    W0 = W.clone()
    W0[:, 2] = 0.0
    W0[2, 2] = 0.25
    assert torch.isfinite(proximal_matrix(G, W0, U)).all()


def test_reciprocity():
    P = np.array([[0.0, 2.0, 0.0], [1.0, 0.0, -3.0], [0.0, 0.0, 0.0]])
    R = REC.pairwise(P)
    assert R[0, 1] == pytest.approx(2.0) and R[1, 0] == pytest.approx(0.5)
    assert np.isnan(R[1, 2]) and np.isnan(R[2, 1])  # I(1 -> 2) = 0: guarded
    node = REC.node_reciprocity(P)
    assert node["outflow"].tolist() == [1.0, 2.0, -3.0]
    assert node["inflow"].tolist() == [2.0, -2.0, 0.0]
    assert node["R"][0] == pytest.approx(0.5) and np.isnan(node["R"][2])
