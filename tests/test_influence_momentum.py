"""Whole-batch removal under momentum and weight decay (docs/method.md §3: every sample weight zero, the
rest of the optimizer step still happens), and the adjoint under momentum on time-varying graphs."""

from __future__ import annotations

import pytest
import torch

from dice_influence.config import load_config
from dice_influence.influence import Event, estimate, ground_truth
from dice_influence.influence.adjoint import attribute
from dice_influence.simulator import train


def cfg(n=6, topo="ring", rounds=10, lr=0.1, tv=None, hidden=(16,), **train_extra):
    return load_config({
        "seed": 1,
        "data": {"dataset": "digits", "samples_per_node": 48, "validation_samples": 80},
        "topology": {"name": topo, "n": n, "time_varying": tv},
        "model": {"name": "mlp", "hidden": list(hidden)},
        "train": {"rounds": rounds, "batch_size": 8, "lr": lr, "dtype": "float64",
                  "checkpoint_every": 3, **train_extra},
    })


OPTIMIZERS = {
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"weight_decay": 0.05},
}


@pytest.fixture(scope="module", params=sorted(OPTIMIZERS))
def stateful_run(request):
    return train(cfg(**OPTIMIZERS[request.param]))


def test_gt_batch_equals_all_samples(stateful_run):
    """Removing the whole batch = zeroing every sample weight: the same replay, bit for bit
    when replayed alone (within one batched replay, rows may differ in the last bit)."""
    B = stateful_run.problem.cfg.train.batch_size
    batch = ground_truth(stateful_run, [Event(2, 4)], hops=3)
    every = ground_truth(stateful_run, [Event(2, 4, tuple(range(B)))], hops=3)
    assert torch.equal(batch.per_node, every.per_node)
    assert bool(batch.per_node.abs().sum() > 0)
    both = ground_truth(stateful_run, [Event(2, 4), Event(2, 4, tuple(range(B)))], hops=3)
    assert torch.allclose(both.per_node[0], both.per_node[1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("readout", ["linear", "factual", "midpoint"])
def test_estimate_batch_equals_all_samples(stateful_run, readout):
    B = stateful_run.problem.cfg.train.batch_size
    es = estimate(stateful_run, [Event(2, 4), Event(2, 4, tuple(range(B)))], hops=3,
                  readout=readout)
    assert torch.allclose(es.per_node[0], es.per_node[1], rtol=1e-12, atol=1e-17)


@pytest.mark.parametrize("readout", ["linear", "factual"])
def test_estimate_batch_is_sum_of_samples(stateful_run, readout):
    """First-order additivity: the step difference is linear in the removed samples' weights,
    and the linear read-outs keep it linear."""
    B = stateful_run.problem.cfg.train.batch_size
    batch = estimate(stateful_run, [Event(3, 5)], hops=3, readout=readout)
    singles = estimate(stateful_run, [Event(3, 5, (i,)) for i in range(B)], hops=3,
                       readout=readout)
    assert torch.allclose(batch.per_node[0], singles.per_node.sum(0), rtol=1e-9, atol=1e-16)
    assert torch.allclose(batch.r_hop[0], singles.r_hop.sum(0), rtol=1e-9, atol=1e-16)


def test_gt_batch_is_sum_of_samples_to_first_order():
    """Small step: the GT of a batch is the sum of its samples' GT up to second order."""
    traj = train(cfg(lr=0.01, momentum=0.9))
    B = traj.problem.cfg.train.batch_size
    batch = ground_truth(traj, [Event(1, 6)], hops=2)
    singles = ground_truth(traj, [Event(1, 6, (i,)) for i in range(B)], hops=2)
    tot = singles.r_hop.sum(0)
    assert torch.allclose(batch.r_hop[0], tot, rtol=2e-2), (batch.r_hop[0], tot)


def test_batch_removal_keeps_momentum_and_decay():
    """The counterfactual step of a removed batch still applies the momentum buffer and decay."""
    traj = train(cfg(momentum=0.9, weight_decay=0.05))
    p = traj.problem
    j, t = 2, 5
    gt = ground_truth(traj, [Event(j, t)], hops=0)
    theta, state = traj.params_at(t)
    g = p.cfg.train.weight_decay * theta[j]
    buf = 0.9 * state[j] + g
    cf_half = theta[j] - p.lr(t) * buf
    f_half, _ = p.local_step(theta, state, t)
    from dice_influence.gossip import node_losses

    x, y = p.val_x, p.val_y
    ref = (node_losses(p.fm, f_half[j:j + 1], x, y)[0] - node_losses(p.fm, cf_half[None], x, y)[0])
    assert gt.per_node[0, 0, j].item() == pytest.approx(ref.item(), rel=1e-10)


@pytest.mark.parametrize("tv", ["random-matching", "one-peer-exponential"])
def test_adjoint_hops_time_varying_momentum(tv):
    """The optimizer-state path reaches first-reached nodes on a time-varying graph: the adjoint
    must carry the state cotangent (it was dropped before)."""
    traj = train(cfg(n=6, tv=tv, rounds=10, momentum=0.9))
    t0, t1, hops = 3, 7, 2
    for ro in ("linear", "factual"):
        H = attribute(traj, (t0, t1), target="hops", hops=hops, readout=ro)
        events = [Event(j, r, (i,)) for j in range(6) for r in range(t0, t1) for i in (0, 5)]
        fwd = estimate(traj, events, hops=hops, readout=ro)
        a = torch.stack([H.scores[e.round - t0, e.node, e.samples[0]] for e in events])
        assert torch.allclose(a, fwd.values(hops), rtol=1e-6, atol=1e-14), ro


@pytest.mark.parametrize("opt", [{}, {"weight_decay": 0.1}, {"momentum": 0.9},
                                 {"momentum": 0.8, "nesterov": True, "weight_decay": 0.05}])
def test_update_transpose_matches_vjp(opt):
    """The written-out transpose of the optimizer update equals autograd's vjp of it."""
    from dataclasses import dataclass

    from dice_influence.gossip import Optimizer
    from dice_influence.influence.pullback import _update_transpose

    @dataclass(frozen=True)
    class Generic(Optimizer):  # any other type takes the generic vjp path
        pass

    g = torch.Generator().manual_seed(0)
    theta, lt, ls = (torch.randn(3, 7, generator=g, dtype=torch.float64) for _ in range(3))
    fast, slow = Optimizer(**opt), Generic(**opt)
    state = fast.init_state(theta)
    if state is not None:
        state = torch.randn(3, 7, generator=g, dtype=torch.float64)
    a = _update_transpose(fast, theta, state, 0.3, lt, None if state is None else ls)
    b = _update_transpose(slow, theta, state, 0.3, lt, None if state is None else ls)
    for x, y in zip(a, b, strict=True):
        assert (x is None and y is None) or torch.allclose(x, y, rtol=1e-12, atol=1e-15)
