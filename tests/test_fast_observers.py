"""The observers' fast paths equal the generic ones (float64, to 1e-10): the hand-written MLP
test-gradient pass, the edge-only proximal dots, and whole observer runs (proximal, contribution)
with the fast paths on against off."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dice_influence._mlp as M
import dice_influence.influence.pullback as A
from dice_influence.config import load_config
from dice_influence.gossip import loss_grads
from dice_influence.simulator import build_problem


def _cfg(activation: str = "relu", hidden=(16,), n: int = 6, loss: str | None = None,
         test_samples: int | None = 12, **train):
    raw = {
        "seed": 0,
        "data": {"dataset": "digits", "samples_per_node": 24, "test_samples_per_node": test_samples,
                 "validation_samples": 60},
        "topology": {"name": "ring", "n": n},
        "model": {"name": "mlp", "hidden": list(hidden), "activation": activation},
        "train": {"rounds": 8, "batch_size": 8, "lr": 0.05, "dtype": "float64",
                  "eval_every": 8, **train},
    }
    if loss is not None:
        raw["loss"] = {"kind": loss}
    return load_config(raw)


def _theta(p):
    gen = torch.Generator().manual_seed(0)
    return p.init_theta() + 0.3 * torch.randn(p.n, p.d, dtype=torch.float64, generator=gen)


@pytest.mark.parametrize("act,hidden", [("relu", (16,)), ("tanh", (16, 8)), ("gelu", (8,)),
                                        ("softplus", (16, 8))])
@pytest.mark.parametrize("per_node", [True, False])
def test_mlp_test_gradients_match_torch_func(act, hidden, per_node):
    p = build_problem(_cfg(act, hidden))
    th = _theta(p)
    x, y = p.test_set(per_node)
    v1, g1 = M.loss_grads(p.fm, th, x, y)
    with torch.enable_grad():
        v2, g2 = loss_grads(p.fm, th, x, y)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(M.grads(p.fm, th, x, y), g2, rtol=1e-10, atol=1e-12)


def test_fast_paths_refuse_other_losses(monkeypatch):
    """An MLP trained on mse takes the generic passes (the hand-written ones are cross-entropy)."""
    p = build_problem(load_config("configs/regression-diabetes-mlp16.yaml"))
    assert M.mlp_spec(p.fm) is None
    th = p.init_theta()
    x, y = p.test_set(False)
    v1, g1 = M.loss_grads(p.fm, th, x, y)
    with torch.enable_grad():
        v2, g2 = loss_grads(p.fm, th, x, y)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    gen = torch.Generator().manual_seed(1)
    c = torch.randn(p.n, p.d, dtype=th.dtype, generator=gen)
    xb, yb = p.batch(0)
    h1, d1 = A._hvp_and_sample_dots(p, th, c, xb, yb, True)
    monkeypatch.setattr(A, "FAST_MLP", False)
    h2, d2 = A._hvp_and_sample_dots(p, th, c, xb, yb, True)
    torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d1, d2, rtol=1e-10, atol=1e-12)


def test_edge_dots_equal_the_dense_product_with_non_finite_rows():
    from dice_influence._kernels import numba_module
    from dice_influence.influence.proximal import dot_matrix, edge_support

    if numba_module() is None:
        pytest.skip("the edge kernel needs numba (DICE_NO_NUMBA=1 or numba missing)")
    from dice_influence.topology.schedules import make_schedule

    gen = torch.Generator().manual_seed(0)
    n, d = 24, 300
    W = make_schedule("ring", n).W(0)
    G = torch.randn(n, d, dtype=torch.float64, generator=gen)
    U = torch.randn(n, d, dtype=torch.float64, generator=gen)
    G[3, 5], U[7, 0] = float("nan"), float("inf")
    sup = edge_support(W)
    assert sup.sum() <= 0.25 * sup.size and not sup.diagonal().any()
    dense, sparse = dot_matrix(G, U), dot_matrix(G, U, sup)
    m = torch.from_numpy(sup)
    torch.testing.assert_close(sparse[m], dense[m], rtol=1e-10, atol=1e-12)
    assert (sparse[~m] == 0).all()
    assert torch.isinf(sparse[3][m[3]]).all() and (sparse[m] > -np.inf).all()
    assert torch.isinf(sparse[:, 7][m[:, 7]]).all()


def _old_paths(monkeypatch):
    """Switch every fast path off: torch.func test gradients and HVPs, dense dots, float64
    copies for the sweep's row dots."""
    import dice_influence._edge_kernel as K
    import dice_influence.influence.proximal as IP

    monkeypatch.setattr(M, "FAST", False)
    monkeypatch.setattr(A, "FAST_MLP", False)
    monkeypatch.setattr(IP, "SPARSE_DOTS", False)
    monkeypatch.setattr(K, "_compiled", lambda *a: None)


class _AddEdge:
    """A policy that gives receiver 0 a sender the schedule does not (the ledger must then
    read a dot product outside the nominal edges)."""

    name = "add-edge"

    def active(self, t):
        return True

    def decide(self, view):
        W = view.W_nominal.copy()
        W[0, 5] += 0.1
        W[0, 0] -= 0.1
        return W


@pytest.mark.parametrize("readout", ["pre", "post", "midpoint"])
def test_proximal_observer_fast_equals_old(readout, monkeypatch):
    from dice_influence.apps.proximal import ProximalObserver
    from dice_influence.loop import Loop

    p = build_problem(_cfg(n=12))
    assert M.mlp_spec(p.fm) is not None  # the fast passes apply here
    th = _theta(p)

    def run():
        obs = ProximalObserver(p.n, readout=readout)
        Loop(p, [obs], _AddEdge()).run(th, None, 0, 6)
        return obs.tracker

    fast = run()
    _old_paths(monkeypatch)
    old = run()
    assert fast.cum[0, 5] != 0 and fast.score[0, 5] == 0  # the added edge: used, not nominal
    for a, b in ((fast.cum, old.cum), (fast.score, old.score), (fast.window_score,
                                                                 old.window_score)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
    assert torch.equal(fast.seen, old.seen)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_contribution_observer_fast_equals_old(exclude_self, monkeypatch):
    from dice_influence.apps.contribution import ContributionObserver
    from dice_influence.loop import Loop

    p = build_problem(_cfg(n=12, momentum=0.5))
    th = _theta(p)

    def run():
        obs = ContributionObserver(p.n, p, rounds=6, exclude_self=exclude_self)
        Loop(p, [obs]).run(th, p.opt.init_state(th), 0, 6)
        return obs.measures()

    fast = run()
    _old_paths(monkeypatch)
    old = run()
    assert fast["adjoint"] is not None
    for key in ("adjoint", "proximal_out", "proximal_in", "alignment_t", "alignment_rms"):
        np.testing.assert_allclose(fast[key], old[key], rtol=1e-10, atol=1e-14, err_msg=key)


def test_compiled_gossip_keeps_the_thread_count():
    """numba's OpenMP start-up used to set the process's thread count to every core, silently
    overriding the thread rule after the first gossip round."""
    from dice_influence._kernels import numba_module

    if numba_module() is None:
        pytest.skip("needs the compiled gossip kernel (DICE_NO_NUMBA=1 or numba missing)")
    import numba

    from dice_influence.loop import run_rounds

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        p = build_problem(_cfg(n=36, test_samples=None, rounds=2))
        assert p.mixer(0).sparse and p.mixer(0)._kernel is not None
        run_rounds(p, p.init_theta(), None, 0, 2)
        assert torch.get_num_threads() == 1 and numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_parallel_edge_kernel_equals_serial_bits(monkeypatch):
    """The edges shared out over two threads give the serial kernel's bits (each edge's sum is
    taken whole by one thread); the thread count is left as it was."""
    import dice_influence._edge_kernel as K
    from dice_influence._kernels import numba_module

    if numba_module() is None:
        pytest.skip("the edge kernel needs numba (DICE_NO_NUMBA=1 or numba missing)")
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(40, 997, generator=gen)
    b = torch.randn(40, 997, generator=gen)
    rows = np.repeat(np.arange(40), 3)
    cols = (rows * 7 + np.tile([1, 2, 5], 40)) % 40
    before = torch.get_num_threads()
    monkeypatch.setattr(K, "PARALLEL_WORK", 1)
    try:
        torch.set_num_threads(1)
        serial = K.edge_dots(a, b, rows, cols)
        torch.set_num_threads(2)
        parallel = K.edge_dots(a, b, rows, cols)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert torch.equal(serial, parallel)
    ref = (a[rows].double() * b[cols].double()).sum(1)
    torch.testing.assert_close(serial, ref, rtol=1e-12, atol=1e-12)


def test_loop_never_writes_a_rounds_tensors_after_its_observers():
    """Plug-ins keep ``view.theta``, ``view.update()`` and ``view.batch`` without copying them
    (the contribution observer's record): the loop must not reuse those tensors."""
    from dice_influence.loop import Loop, Observer, run_rounds

    class Keep(Observer):
        def __init__(self):
            self.kept, self.copies = [], []

        def before_gossip(self, view):
            pair = (view.theta, view.update(), *view.batch)
            self.kept.append(pair)
            self.copies.append(tuple(t.clone() for t in pair))

    p = build_problem(_cfg(n=6, momentum=0.5))
    th = _theta(p)
    st = p.opt.init_state(th)
    obs = Keep()
    Loop(p, [obs]).run(th, st, 0, 5)
    for t, (kept, copy) in enumerate(zip(obs.kept, obs.copies, strict=True)):
        for a, b in zip(kept, copy, strict=True):
            assert torch.equal(a, b), f"round {t}: a kept tensor was written later"
        theta_t, _ = run_rounds(p, th, st, 0, t)
        assert torch.equal(kept[0], theta_t)
        x, y = p.batch(t)
        assert torch.equal(kept[2], x) and torch.equal(kept[3], y)

