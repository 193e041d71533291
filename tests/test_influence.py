"""DICE-GT (replay), DICE-E (tangent recursion) and the adjoint form."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from dice_influence.config import load_config
from dice_influence.experiments.alignment import alignment_metrics
from dice_influence.gossip import loss_grads, node_losses
from dice_influence.influence import Event, estimate, ground_truth, sample_events
from dice_influence.influence.adjoint import attribute
from dice_influence.simulator import train


def cfg(n=6, topo="ring", rounds=10, lr=0.1, momentum=0.0, tv=None, hidden=(16,), **extra):
    d = {
        "seed": 1,
        "data": {"dataset": "digits", "samples_per_node": 48, "validation_samples": 80},
        "topology": {"name": topo, "n": n, "time_varying": tv},
        "model": {"name": "mlp", "hidden": list(hidden)},
        "train": {"rounds": rounds, "batch_size": 8, "lr": lr, "dtype": "float64",
                  "checkpoint_every": 3, "momentum": momentum},
    }
    d.update(extra)
    return load_config(d)


@pytest.fixture(scope="module")
def ring():
    return train(cfg())


def naive_gt(traj, e: Event, hops: int) -> torch.Tensor:
    """Straight replay with the pure round, one network at a time: per-node loss differences."""
    p = traj.problem
    theta, state = traj.params_at(e.round)
    w = torch.ones(p.n, p.cfg.train.batch_size, dtype=p.dtype)
    if e.samples is None:
        w[e.node] = 0
    else:
        w[e.node, list(e.samples)] = 0
    x, y = p.val_x, p.val_y
    out = torch.zeros(hops + 1, p.n, dtype=torch.float64)
    fh, fs = p.local_step(theta, state, e.round)
    ch, cs = p.local_step(theta, state, e.round, w)
    out[0, e.node] = (node_losses(p.fm, fh, x, y)[0] - node_losses(p.fm, ch, x, y)[0])[e.node]
    f, c = p.mixer(e.round)(fh), p.mixer(e.round)(ch)
    for s in range(1, hops + 1):
        out[s] = node_losses(p.fm, f, x, y)[0] - node_losses(p.fm, c, x, y)[0]
        if s < hops:
            f, fs = p.round(f, fs, e.round + s)
            c, cs = p.round(c, cs, e.round + s)
    return out


@pytest.mark.parametrize("samples", [None, (0,), (1, 4)])
def test_ground_truth_matches_naive_replay(ring, samples):
    e = Event(2, 4, samples)
    gt = ground_truth(ring, [e, Event(0, 4), Event(3, 5, (2,))], hops=3)
    ref = naive_gt(ring, e, 3)
    assert torch.allclose(gt.per_node[0], ref, atol=1e-12, rtol=1e-9)


def test_ground_truth_reach_and_exact_zeros():
    traj = train(cfg(topo="isolated", rounds=6))
    gt = ground_truth(traj, [Event(1, 2), Event(3, 2, (0,))], hops=3)
    others = [k for k in range(6) if k != 1]
    # nobody else hears from node 1: the replay is bit-exact, so the differences are exactly 0
    assert torch.count_nonzero(gt.per_node[0, 1:, others]) == 0
    assert gt.per_node[0, 0, 1] != 0
    assert torch.count_nonzero(gt.hop_terms) == 0


def test_reach_sets_follow_shortest_paths(ring):
    gt = ground_truth(ring, [Event(0, 3)], hops=3)
    assert gt.reach[0, 1].nonzero().flatten().tolist() == [1, 5]
    assert gt.reach[0, 2].nonzero().flatten().tolist() == [2, 4]
    assert gt.reach[0, 3].nonzero().flatten().tolist() == [3]


def test_self_term_is_loss_difference_of_the_step(ring):
    e = Event(4, 6)
    gt = ground_truth(ring, [e], hops=1)
    p = ring.problem
    theta, _ = ring.params_at(6)
    half, _ = p.local_step(theta, None, 6)
    lv = node_losses(p.fm, half, p.val_x, p.val_y)[0] - node_losses(p.fm, theta, p.val_x,
                                                                       p.val_y)[0]
    assert gt.self_term[0].item() == pytest.approx(lv[4].item() / 6, rel=1e-9)


def test_one_hop_estimate_is_paper_prop1(ring):
    """I_E^(1) = q_j ∇L(θ_j^t)ᵀΔ + Σ_k q_k W[k,j] ∇L(θ_k^{t+1})ᵀΔ with Δ = −η g_j."""
    p = ring.problem
    j, t = 1, 5
    es = estimate(ring, [Event(j, t)], hops=1, readout="linear")
    theta, _ = ring.params_at(t)
    x, y = p.batch(t)
    from dice_influence.gossip import node_grads

    delta = -p.lr(t) * node_grads(p.fm, theta, x, y)[j]
    g_t = loss_grads(p.fm, theta, p.val_x, p.val_y)[1]
    g_t1 = loss_grads(p.fm, ring.params_at(t + 1)[0], p.val_x, p.val_y)[1]
    W = p.W(t)
    q = 1 / p.n
    ref = q * g_t[j] @ delta + sum(q * W[k, j] * g_t1[k] @ delta for k in range(p.n)
                                   if k != j and W[k, j] > 0)
    assert es.values(1)[0].item() == pytest.approx(ref.item(), rel=1e-10)


def test_additivity_batch_is_sum_of_samples(ring):
    B = ring.problem.cfg.train.batch_size
    batch = estimate(ring, [Event(3, 4)], hops=3, readout="linear")
    samples = estimate(ring, [Event(3, 4, (i,)) for i in range(B)], hops=3, readout="linear")
    assert torch.allclose(batch.r_hop[0], samples.r_hop.sum(0), rtol=1e-9, atol=1e-15)
    assert torch.allclose(batch.horizon[0], samples.horizon.sum(0), rtol=1e-9, atol=1e-15)


def test_curvature_off_equals_hessian_free_recursion(ring):
    """curvature=False: δ propagates by gossip only (J = I)."""
    es = estimate(ring, [Event(0, 3)], hops=3, curvature=False, readout="linear")
    p = ring.problem
    theta, _ = ring.params_at(3)
    x, y = p.batch(3)
    from dice_influence.gossip import node_grads

    delta = torch.zeros(p.n, p.d, dtype=torch.float64)
    delta[0] = -p.lr(3) * node_grads(p.fm, theta, x, y)[0]
    for s in range(1, 4):
        delta = torch.tensor(p.W(3 + s - 1)) @ delta
        g = loss_grads(p.fm, ring.params_at(3 + s)[0], p.val_x, p.val_y)[1]
        assert torch.allclose(es.per_node[0, s], (g * delta).sum(1), rtol=1e-9, atol=1e-15)


def _walk_sum(traj, e: Event, hops: int) -> float:
    """The printed Theorem 1 by explicit walk enumeration (out-neighbour walks without
    self-loops, Hessians at intermediate nodes via double backprop)."""
    p = traj.problem
    t, j = e.round, e.node
    q = 1 / p.n
    theta, _ = traj.params_at(t)
    x, y = p.batch(t)
    from dice_influence.gossip import node_grads

    delta = -p.lr(t) * node_grads(p.fm, theta, x, y)[j]
    thetas = {r: traj.params_at(r)[0] for r in range(t, t + hops + 1)}
    total = q * loss_grads(p.fm, theta, p.val_x, p.val_y)[1][j] @ delta

    def hvp(k, r, v):
        th = thetas[r][k].clone().requires_grad_(True)
        xb, yb = p.batch(r)
        loss = p.fm.loss(th, xb[k], yb[k])
        (g,) = torch.autograd.grad(loss, th, create_graph=True)
        (h,) = torch.autograd.grad(g @ v, th)
        return h

    for rho in range(1, hops + 1):
        gk = loss_grads(p.fm, thetas[t + rho], p.val_x, p.val_y)[1]
        for walk in itertools.product(range(p.n), repeat=rho):
            path = (j, *walk)
            ws = [p.W(t + s - 1)[path[s], path[s - 1]] for s in range(1, rho + 1)]
            if any(path[s] == path[s - 1] for s in range(1, rho + 1)) or min(ws) == 0:
                continue
            v = delta.clone()
            for s in range(1, rho):  # Hessians at the intermediate nodes, latest on the left
                v = v - p.lr(t + s) * hvp(path[s], t + s, v)
            total = total + q * float(np.prod(ws)) * gk[path[-1]] @ v
    return float(total)


def test_paper_paths_equal_walk_enumeration():
    traj = train(cfg(n=4, topo="exponential", rounds=8))
    e = Event(1, 3)
    es = estimate(traj, [e], hops=3, paths="paper", readout="linear", curvature=True)
    assert es.values(3)[0].item() == pytest.approx(_walk_sum(traj, e, 3), rel=1e-8)


def test_paper_and_exact_agree_on_first_reached_nodes(ring):
    """On N^(s)(j) every walk of length s is a shortest path (no self-loops)."""
    e = [Event(0, 3), Event(4, 5, (1,))]
    exact = estimate(ring, e, hops=3)
    paper = estimate(ring, e, hops=3, paths="paper")
    m = exact.reach[:, 1:, :]
    assert torch.allclose(exact.per_node[:, 1:][m], paper.per_node[:, 1:][m], rtol=1e-9)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_adjoint_agrees_with_forward(momentum):
    traj = train(cfg(momentum=momentum, rounds=10))
    t0, t1 = 4, 7
    A = attribute(traj, (t0, t1), target="horizon")
    H = attribute(traj, (t0, t1), target="hops", hops=2, readout="linear")
    F = attribute(traj, (t0, t1), target="hops", hops=2)  # readout="factual", the default
    events = [Event(j, r, (i,)) for j in (0, 3) for r in range(t0, t1) for i in (0, 5)]

    def adj(res):
        return torch.stack([res.scores[e.round - t0, e.node, e.samples[0]] for e in events])

    horizon = torch.cat([estimate(traj, [e], hops=t1 - e.round).horizon for e in events])
    assert torch.allclose(adj(A), horizon, rtol=1e-5, atol=1e-15)
    for res, ro in ((H, "linear"), (F, "factual")):
        fwd = estimate(traj, events, hops=2, readout=ro).values(2)
        assert torch.allclose(adj(res), fwd, rtol=1e-5, atol=1e-15), ro
    ranked = A.most_harmful(0, 3) + A.most_helpful(0, 3)  # each only of its own sign
    assert all(t["score"] > 0 for t in A.top(0, 3)) and len(ranked) >= 3
    assert all(t["score"] < 0 for t in A.top(0, 3, harmful=False))
    assert all(t["dataset_index"] >= 0 for t in ranked)


def test_momentum_estimate_tracks_ground_truth():
    traj = train(cfg(momentum=0.9, rounds=12, lr=0.05))
    ev = sample_events(traj, 12, hops=2, seed=2, rounds=(3, 10))
    gt = ground_truth(traj, ev, hops=2)
    es = estimate(traj, ev, hops=2, readout="midpoint")
    m = alignment_metrics(es.values(2).numpy(), gt.values(2).numpy())
    assert m["pearson"] > 0.99


def test_time_varying_graph_reach_and_alignment():
    traj = train(cfg(n=8, tv="one-peer-exponential", rounds=10))
    ev = sample_events(traj, 10, hops=3, seed=0)
    gt = ground_truth(traj, ev, hops=3)
    es = estimate(traj, ev, hops=3, readout="midpoint")
    assert alignment_metrics(es.values(3).numpy(), gt.values(3).numpy())["pearson"] > 0.99
    # one-peer exponential, n=8: node 0 at round 0 reaches node 7 first, then 5 and 6
    from dice_influence.influence.common import reach_masks

    r = reach_masks(traj, [Event(0, 0)], 2)
    assert r[0, 1].nonzero().flatten().tolist() == [7]
    assert r[0, 2].nonzero().flatten().tolist() == [5, 6]


def test_bad_events_are_rejected(ring):
    with pytest.raises(ValueError, match="node 9 out of range"):
        ground_truth(ring, [Event(9, 1)])
    with pytest.raises(ValueError, match="train longer"):
        estimate(ring, [Event(0, 9)], hops=3)
    with pytest.raises(ValueError, match="outside the batch"):
        estimate(ring, [Event(0, 1, (99,))])
    with pytest.raises(ValueError, match="readout"):
        estimate(ring, [Event(0, 1)], readout="quadratic")


def test_result_forms(ring):
    gt = ground_truth(ring, [Event(0, 2), Event(1, 3, (2,))], hops=2)
    d = gt.to_dict()
    assert d["axes"]["per_node"] == ["event", "hop", "node"]
    assert "positive = harmful" in d["sign"]
    assert np.allclose(d["r_hop"], gt.r_hop.numpy())


# ---------------------------------------------------------------- targets on the digits config


@pytest.fixture(scope="module")
def digits16():
    c = load_config("configs/alignment-digits.yaml")
    traj = train(c)
    ev = sample_events(traj, 30, hops=3, seed=0, rounds=(0, c.train.rounds))
    return traj, ev, ground_truth(traj, ev, hops=3)


def test_target_midpoint_alignment_digits(digits16):
    traj, ev, gt = digits16
    es = estimate(traj, ev, hops=3, readout="midpoint")
    for r in (1, 2, 3):
        m = alignment_metrics(es.values(r).numpy(), gt.values(r).numpy())
        assert m["pearson"] >= 0.999, (r, m)
        assert m["median_rel_error"] <= 0.02, (r, m)


def test_linear_readout_digits(digits16):
    """Measured, not the issue's 0.98: the linear self term misses the step's curvature."""
    traj, ev, gt = digits16
    es = estimate(traj, ev, hops=1, readout="linear")
    m = alignment_metrics(es.values(1).numpy(), gt.values(1).numpy())
    assert m["pearson"] >= 0.6 and m["sign_agreement"] >= 0.9, m
    # the neighbour terms alone are linear enough
    hop = alignment_metrics(es.hop_terms[:, 0].numpy(), gt.hop_terms[:, 0].numpy())
    assert hop["pearson"] >= 0.85, hop


def test_target_curvature_helps_at_lr_half():
    c = load_config("configs/alignment-digits.yaml", ["train.lr=0.5", "train.rounds=30"])
    traj = train(c)
    ev = sample_events(traj, 24, hops=3, seed=1, rounds=(0, 30))
    gt = ground_truth(traj, ev, hops=3)
    with_c = estimate(traj, ev, hops=3, readout="midpoint", curvature=True)
    without = estimate(traj, ev, hops=3, readout="midpoint", curvature=False)
    for r in (2, 3):
        a = alignment_metrics(with_c.values(r).numpy(), gt.values(r).numpy())
        b = alignment_metrics(without.values(r).numpy(), gt.values(r).numpy())
        assert a["pearson"] > b["pearson"], (r, a, b)
        assert a["median_rel_error"] < b["median_rel_error"], (r, a, b)
