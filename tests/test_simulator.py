"""The vectorized round, the trajectory, determinism and configs."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from dice_influence import topology as T
from dice_influence.config import ConfigError, dump_config, load_config
from dice_influence.gossip import Mixer, Optimizer, node_grads
from dice_influence.simulator import build_problem, run_rounds, train
from dice_influence.trajectory import Trajectory


def tiny_cfg(**over):
    base = {
        "seed": 3,
        "data": {"dataset": "digits", "samples_per_node": 40, "validation_samples": 50},
        "topology": {"name": "exponential", "n": 4},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"rounds": 6, "batch_size": 8, "lr": 0.1, "checkpoint_every": 4,
                  "eval_every": 3},
    }
    for key, val in over.items():
        sec, k = key.split("__")
        base[sec][k] = val
    return load_config(base)


def reference_rounds(problem, rounds, momentum=0.0, weight_decay=0.0):
    """A straightforward per-node implementation with nn.Modules and torch.optim.SGD."""
    n = problem.n
    theta0 = problem.init_theta()
    models = []
    for k in range(n):
        m = copy.deepcopy(problem.fm.module)
        torch.nn.utils.vector_to_parameters(theta0[k].clone(), m.parameters())
        models.append(m)
    opts = [torch.optim.SGD(m.parameters(), lr=problem.lr(0), momentum=momentum,
                            weight_decay=weight_decay) for m in models]
    for t in range(rounds):
        idx = problem.batches.indices(t)
        for k, (m, o) in enumerate(zip(models, opts, strict=True)):
            o.zero_grad()
            xb, yb = problem.node_data.x[k, idx[k]], problem.node_data.y[k, idx[k]]
            torch.nn.functional.cross_entropy(m(xb), yb).backward()
            o.step()
        halves = torch.stack([torch.nn.utils.parameters_to_vector(m.parameters()).detach()
                              for m in models])
        W = torch.tensor(problem.W(t), dtype=halves.dtype)
        mixed = W @ halves
        for k, m in enumerate(models):
            torch.nn.utils.vector_to_parameters(mixed[k].clone(), m.parameters())
    return torch.stack([torch.nn.utils.parameters_to_vector(m.parameters()).detach()
                        for m in models])


@pytest.mark.parametrize("momentum,wd", [(0.0, 0.0), (0.9, 1e-3)])
def test_vectorized_round_matches_per_node_loop(momentum, wd):
    cfg = tiny_cfg(train__momentum=momentum, train__weight_decay=wd)
    problem = build_problem(cfg)
    traj = train(problem)
    ref = reference_rounds(problem, cfg.train.rounds, momentum, wd)
    assert torch.allclose(traj.theta, ref, atol=1e-6, rtol=0)


def test_pure_round_matches_fast_path():
    problem = build_problem(tiny_cfg(train__momentum=0.5))
    theta, state = problem.init_theta(), None
    state = problem.opt.init_state(theta)
    th, st = theta, state
    for t in range(3):
        th, st = problem.round(th, st, t)
    fast, fstate = run_rounds(problem, theta, state, 0, 3)
    assert torch.allclose(th, fast, atol=1e-6)
    assert torch.allclose(st, fstate, atol=1e-6)


def test_same_seed_same_bits_and_replay_is_exact():
    a = train(tiny_cfg())
    b = train(tiny_cfg())
    assert torch.equal(a.theta, b.theta)
    # rounds between checkpoints are recomputed bit-exactly
    ref = train(tiny_cfg(train__checkpoint_every=1))
    for t in range(a.rounds_done + 1):
        assert torch.equal(a.params_at(t)[0], ref.checkpoints[t][0])
    c = train(tiny_cfg(), rounds=6)
    assert not torch.equal(c.theta, train(load_config({**tiny_cfg().model_dump(), "seed": 4})).theta)


def test_resume_equals_uninterrupted():
    full = train(tiny_cfg())
    part = Trajectory.start(build_problem(tiny_cfg())).run(2).run(4)
    assert torch.equal(full.theta, part.theta)


def test_save_load_roundtrip(tmp_path):
    traj = train(tiny_cfg(train__momentum=0.9))
    traj.save(tmp_path)
    back = Trajectory.load(tmp_path)
    assert back.rounds_done == traj.rounds_done
    for t in range(traj.rounds_done + 1):
        assert torch.equal(back.params_at(t)[0], traj.params_at(t)[0])


@pytest.mark.parametrize("n", [1, 2])
def test_tiny_networks(n):
    traj = train(tiny_cfg(topology__n=n, topology__name="ring"))
    assert traj.theta.shape[0] == n
    assert torch.isfinite(traj.theta).all()
    assert len(traj.final_metrics["acc"]) == n


def test_isolated_and_complete_special_cases():
    iso = build_problem(tiny_cfg(topology__name="isolated"))
    theta = iso.init_theta()
    half, _ = iso.local_step(theta, None, 0)
    out, _ = iso.round(theta, None, 0)
    assert torch.equal(out, half)
    comp = build_problem(tiny_cfg(topology__name="complete"))
    out, _ = comp.round(comp.init_theta(), None, 0)
    assert torch.allclose(out, out.mean(0, keepdim=True).expand_as(out), atol=1e-6)


def test_orientation_receiver_row_sender_column():
    # directed ring: receiver i takes from sender i+1 only
    W = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    theta = torch.tensor([[1.0], [10.0], [100.0]])
    out = Mixer(W)(theta)
    assert out[0, 0] == pytest.approx(5.5)
    assert out[1, 0] == pytest.approx(55.0)


@pytest.mark.parametrize("n", [8, 40])  # dense and sparse mixing paths
def test_mixer_never_leaks_nonfinite_through_zero_weights(n):
    from dice_influence.topology import mixing_matrix

    W = mixing_matrix("ring", n)
    theta = torch.randn(n, 5)
    theta[3] = float("nan")
    theta[5, 0] = float("inf")
    out = Mixer(W)(theta)
    buf = torch.full_like(theta, 7.0)
    out2 = Mixer(W)(theta, out=buf)
    assert out2.data_ptr() == buf.data_ptr()
    assert torch.equal(torch.nan_to_num(out2), torch.nan_to_num(out))
    bad = {2, 3, 4, 5, 6}  # receivers of the two bad senders (and themselves)
    for k in range(n):
        assert bool(torch.isfinite(out[k]).all()) == (k not in bad), k


def test_mixer_batched_leading_dims():
    from dice_influence.topology import mixing_matrix

    for n in (5, 40):
        W = mixing_matrix("exponential", n)
        theta = torch.randn(3, n, 7)
        got = Mixer(W)(theta)
        ref = torch.stack([torch.tensor(W, dtype=torch.float32) @ th for th in theta])
        assert torch.allclose(got, ref, atol=1e-5)


def test_weighted_loss_keeps_denominator():
    problem = build_problem(tiny_cfg())
    theta = problem.init_theta()
    x, y = problem.batch(0)
    w = torch.ones(y.shape)
    w[0, 0] = 0.0
    g_full = node_grads(problem.fm, theta, x, y)
    g_w = node_grads(problem.fm, theta, x, y, w)
    # removing one sample = full gradient minus that sample's gradient / B
    g_one = node_grads(problem.fm, theta[:1], x[:1, :1], y[:1, :1]) / y.shape[1]
    assert torch.allclose(g_full[0] - g_w[0], g_one[0], atol=1e-6)
    assert torch.equal(g_full[1:], g_w[1:])


def test_optimizer_pure_matches_torch_sgd():
    opt = Optimizer(momentum=0.9, weight_decay=0.01, nesterov=True)
    p = torch.nn.Parameter(torch.randn(1, 6))
    ref = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    theta = p.detach().clone()
    state = opt.init_state(theta)
    for _ in range(3):
        g = torch.randn(1, 6)
        p.grad = g.clone()
        ref.step()
        u, state = opt.update(theta, state, g, 0.1)
        theta = theta + u
    assert torch.allclose(theta, p.detach(), atol=1e-6)


def test_config_roundtrip_and_errors(tmp_path):
    cfg = tiny_cfg()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    with pytest.raises(ConfigError, match=r"train\.lrr: unknown key"):
        load_config({"train": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_config({"train": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"node ids \[9\] out of range"):
        load_config({"topology": {"n": 4},
                     "data": {"corruptions": [{"kind": "label_flip", "nodes": [9]}]}})
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])
    assert load_config(None, ["train.lr=0.05", "topology.n=8"]).train.lr == 0.05


def test_float64_runs():
    traj = train(tiny_cfg(train__dtype="float64"))
    assert traj.theta.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_gossip_sums_senders_in_csr_order_bit_for_bit(dtype):
    """The kernel takes senders four at a time; every row (0 to 11 senders) must carry the bits
    of the one-at-a-time sum ``o = w0 x0; o += w x`` in CSR order."""
    from dice_influence._kernels import csr_kernel

    rng = np.random.default_rng(0)
    n = 40
    W = np.zeros((n, n))
    for k in range(n):
        cols = rng.choice(n, size=k % 12, replace=False)
        W[k, cols] = rng.random(len(cols))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        csr = torch.as_tensor(W, dtype=dtype).to_sparse_csr()
    run = csr_kernel(csr)
    if run is None:
        pytest.skip("numba not available")
    theta = torch.randn(n, 2500, dtype=dtype)
    out = torch.empty_like(theta)
    assert run(theta, out)
    ip, ix, v = csr.crow_indices(), csr.col_indices(), csr.values()
    for k in range(n):
        p0, p1 = int(ip[k]), int(ip[k + 1])
        want = torch.zeros(theta.shape[1], dtype=dtype)
        for p in range(p0, p1):
            term = v[p] * theta[ix[p]]
            want = term if p == p0 else want + term
        assert torch.equal(out[k], want), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_sparse_gossip_equals_the_matmul(dtype):
    from dice_influence._kernels import _compiled

    n = 64
    W = T.mixing_matrix("exponential", n)
    m = Mixer(W, dtype=dtype)
    assert m.sparse
    if _compiled() is not None:
        assert m._kernel is not None
    torch.manual_seed(0)
    theta = torch.randn(n, 5000, dtype=dtype)
    theta[3, 7] = float("nan")  # node 3's non-neighbours must stay finite
    dense = torch.as_tensor(W, dtype=dtype)
    out = torch.empty_like(theta)
    m(theta, out=out)
    ok = W[:, 3] == 0
    ref = dense[ok] @ torch.nan_to_num(theta)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out[ok], ref, atol=tol, rtol=0)
    assert torch.isnan(out[~ok, 7]).all()
    # under torch.func the compiled path declines and the differentiable fallback is used
    from torch.func import jvp

    tan = torch.randn_like(theta)
    _, dout = jvp(lambda th: m(th), (torch.nan_to_num(theta),), (tan,))
    assert torch.allclose(dout, dense @ tan, atol=tol, rtol=0)


def test_keep_freed_memory_takes_effect_on_glibc():
    import platform

    from dice_influence._alloc import keep_freed_memory

    if not platform.system() == "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory() is True and keep_freed_memory() is True  # idempotent


def test_huge_page_buffers_hold_the_same_values_and_training_the_same_bits(monkeypatch):
    """The loop's own buffers may sit on huge pages (large runs); only the page size differs:
    the values, and so the bits of training and replays, are the same as on ordinary memory."""
    import gc

    from dice_influence import _alloc

    t = torch.randn(5, 7, dtype=torch.float64)
    monkeypatch.setattr(_alloc, "HUGE_MIN_BYTES", 0)  # every buffer on its own mapping
    c = _alloc.clone_huge(t)
    assert torch.equal(c, t) and c.is_contiguous() and c.data_ptr() != t.data_ptr()
    e = _alloc.empty_huge((3, 4), torch.float32)
    assert e.shape == (3, 4) and e.dtype == torch.float32
    e.fill_(2.0)
    assert float(e.sum()) == 24.0
    p = build_problem(tiny_cfg(topology__n=40, data__samples_per_node=24, train__rounds=3,
                               train__momentum=0.9))
    theta0 = p.init_theta()
    state0 = p.opt.init_state(theta0)
    huge = run_rounds(p, theta0, state0, 0, 3)
    monkeypatch.setattr(_alloc, "HUGE_MIN_BYTES", 1 << 62)  # never
    plain = run_rounds(p, theta0, state0, 0, 3)
    assert torch.equal(huge[0], plain[0]) and torch.equal(huge[1], plain[1])
    del c, e, huge
    gc.collect()  # the mappings go with their tensors (no error, nothing left to check)
