"""Test mini-batches of the proximal read-out (``test_batch``, ``test_batch_order``): which rows
each tracked round reads, the same in the simulator and on a peer; the whole split unchanged."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dice_influence.apps.defense import GuardOptions, guarded_train
from dice_influence.apps.proximal import ProximalObserver
from dice_influence.config import ConfigError, load_config
from dice_influence.distributed import build_local
from dice_influence.distributed.peer import Peer
from dice_influence.gossip import loss_grads
from dice_influence.influence.proximal import proximal_matrix
from dice_influence.loop import ROTATE_HOLD, Loop, readout_rows
from dice_influence.simulator import build_problem

SPLIT = 20  # test samples per node in these configs


def cfg(**train):
    return load_config({
        "seed": 3,
        "data": {"dataset": "digits", "samples_per_node": 40, "test_samples_per_node": SPLIT,
                 "validation_samples": 60},
        "topology": {"name": "ring", "n": 5},
        "model": {"name": "mlp", "hidden": [12]},
        "train": {"rounds": 5, "batch_size": 8, "lr": 0.1, "eval_every": 5, "dtype": "float64",
                  **train},
    })


@settings(max_examples=60, deadline=None)
@given(total=st.integers(1, 70), m=st.integers(1, 80), every=st.integers(1, 6),
       first=st.integers(0, 5))
def test_rotation_reads_every_sample_equally_often(total, m, every, first):
    """Any ``2·total / gcd(total, m)`` consecutive tracked rounds, from a slice's first round,
    read each row ``2·m / gcd`` times, two rounds per slice; ``first`` always reads rows
    0..m-1; m >= total reads the whole split (None)."""
    cycle = ROTATE_HOLD * total // math.gcd(total, m)
    tracked = [(ROTATE_HOLD * first + c) * every for c in range(cycle)]
    rows = [readout_rows(t, total, m, "rotate", every) for t in tracked]
    if m >= total:
        assert all(r is None for r in rows)
        assert readout_rows(0, total, m, "first") is None
        return
    counts = np.bincount(torch.cat(rows).numpy(), minlength=total)
    assert (counts == ROTATE_HOLD * m // math.gcd(total, m)).all()
    assert torch.equal(rows[0], rows[1]) and not torch.equal(rows[1], rows[2 % cycle])
    for t, r in zip(tracked, rows, strict=True):
        assert len(r) == m and len(set(r.tolist())) == m
        # rounds between tracked ones read the slice of the last tracked round
        assert torch.equal(readout_rows(t + every - 1, total, m, "rotate", every), r)
        assert torch.equal(readout_rows(t, total, m, "first", every), torch.arange(m))


@pytest.mark.parametrize("tb,order", [(SPLIT, "rotate"), (SPLIT, "first"), (500, "rotate")])
def test_whole_split_is_the_default_bit_for_bit(tb, order):
    c = cfg()
    p = build_problem(c)
    for readout in ("pre", "midpoint"):
        ref = guarded_train(p, None, GuardOptions(readout=readout))
        got = guarded_train(p, None, GuardOptions(readout=readout, test_batch=tb,
                                                  test_batch_order=order))
        assert torch.equal(got.theta, ref.theta)
        assert torch.equal(got.tracker.cum, ref.tracker.cum)
        assert torch.equal(got.tracker.score, ref.tracker.score)


@pytest.mark.parametrize("readout,every,order", [
    ("pre", 1, "rotate"), ("midpoint", 1, "rotate"), ("pre", 2, "rotate"), ("post", 1, "first")])
def test_each_tracked_round_reads_its_slice(readout, every, order):
    """Round t's increment is Def. 4 with G_k on rows (s·m + i) mod split, s = t // every // 2
    (midpoint: pre and post on the same rows; wraps around the split's end)."""
    m, R = 8, 9
    c = cfg(rounds=R)
    p = build_problem(c)
    res = guarded_train(p, None, GuardOptions(readout=readout, track_every=every, test_batch=m,
                                              test_batch_order=order))
    x, y = p.test_set(per_node=True)
    th = p.init_theta()
    hist = res.tracker.history("actual")
    assert res.tracker.rounds == list(range(0, R, every))
    for t in range(R):
        half, _ = p.local_step(th, None, t)
        nxt, _ = p.round(th, None, t)
        if t % every == 0:
            r = readout_rows(t, SPLIT, m, order, every)
            start = (t // every // 2) * m % SPLIT if order == "rotate" else 0
            assert r.tolist() == [(start + i) % SPLIT for i in range(m)]
            xs, ys = x[:, r], y[:, r]
            W = torch.tensor(p.W(t), dtype=torch.float64)
            G = {"pre": loss_grads(p.fm, th, xs, ys)[1], "post": loss_grads(p.fm, nxt, xs, ys)[1]}
            G["midpoint"] = 0.5 * (G["pre"] + G["post"])
            want = proximal_matrix(G[readout], W, half - th).double()
            got = torch.from_numpy(hist[res.tracker.rounds.index(t)]).double()
            assert torch.allclose(got, want, atol=1e-9, rtol=1e-6)
            assert want.abs().max() > 1e-6  # not vacuous
        th = nxt


@pytest.mark.parametrize("order,every", [("rotate", 1), ("rotate", 3), ("first", 1)])
def test_simulator_and_peer_read_the_same_rows(order, every):
    """The peer's test gradient on its own row equals the simulator's row of every node, for
    rounds that wrap around the split."""
    c = cfg()
    p = build_problem(c)
    theta = p.init_theta() + 0.01 * torch.randn(p.n, p.d, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64)
    obs = ProximalObserver(p.n, every=every)
    obs.test_batch, obs.test_batch_order = 8, order
    loop = Loop(p, [obs], test_batch=8, test_batch_order=order)
    for k in (0, 3):
        peer = SimpleNamespace(lp=build_local(c, k), reader=obs)
        for t in (0, 2, 3, 7):
            g_sim = loop._test_grads(theta, t)[k]
            g_peer = Peer._test_grad(peer, theta[k:k + 1], t)[0]
            assert torch.allclose(g_peer, g_sim, atol=1e-12, rtol=1e-9)
    # and different rounds really read different rows when rotating
    if order == "rotate":
        assert torch.equal(loop._test_grads(theta, 0), loop._test_grads(theta, every))
        assert not torch.equal(loop._test_grads(theta, 0), loop._test_grads(theta, 2 * every))


def test_bad_values_get_one_clear_error():
    p = build_problem(cfg())
    with pytest.raises(ValueError, match=r"test_batch_order='random'.*rotate or first"):
        Loop(p, test_batch=4, test_batch_order="random")
    with pytest.raises(ValueError, match=r"test_batch=0.*>= 1"):
        guarded_train(p, None, GuardOptions(test_batch=0))
    with pytest.raises(ValueError, match=r"test_batch_order='last'"):
        readout_rows(0, 10, 4, "last")
    with pytest.raises(ConfigError, match=r"observers\.0\.test_batch_order"):
        load_config({"observers": [{"kind": "proximal", "test_batch": 8,
                                    "test_batch_order": "random"}]})
    from dice_influence.experiments.anomaly import parse_experiment

    bad = cfg().model_copy(update={"experiment": {"tracking": {"test_batch_order": "random"}}})
    with pytest.raises(ConfigError, match=r"test_batch_order"):
        parse_experiment(bad)


@pytest.mark.parametrize("every", [1, 2])
def test_contribution_outflow_reads_the_same_rotating_rows(every):
    """The contribution observer's (a) goes through the loop's one rule (its ``every`` sets
    the rotation), so it equals the column sums of a proximal observer's ledger."""
    from dice_influence.simulator import train

    c = cfg(rounds=4)
    obs = {"test_batch": 8, "every": every}
    contrib = load_config({**c.model_dump(mode="json"), "observers": [
        {"kind": "contribution", "horizon": "off", **obs}]})
    a = train(contrib).plugins.find("contribution").a_rounds
    prox = guarded_train(build_problem(c), None, GuardOptions(track_every=every, test_batch=8))
    hist = prox.tracker.history("actual")
    assert sorted(a) == prox.tracker.rounds == list(range(0, 4, every))
    for i, t in enumerate(prox.tracker.rounds):
        np.testing.assert_allclose(a[t], hist[i].astype(np.float64).sum(0), rtol=1e-5,
                                   atol=1e-9)


def test_simulator_and_peers_take_the_test_rows_from_the_same_observer(tmp_path):
    """A contribution observer listed before the peers' proximal one sets the test rows of
    both runtimes (the peer's reader is the loop's)."""
    from dice_influence.distributed.settings import peer_plugin_config
    from dice_influence.loop import readout_observer
    from dice_influence.plugins import build

    raw = cfg().model_dump(mode="json")
    raw["observers"] = [{"kind": "contribution", "horizon": "off", "test_batch": 8,
                         "test_batch_order": "first", "every": 3}]
    pcfg = peer_plugin_config(load_config(raw))
    assert [o["kind"] for o in pcfg.observers] == ["contribution", "proximal"]
    p = build_problem(pcfg)
    plugins = build(pcfg, p)
    o = readout_observer(plugins.observers)
    assert o.name == "contribution" and (o.test_batch, o.test_batch_order, o.every) == (8, "first", 3)
    loop = Loop.from_plugins(p, plugins)
    assert (loop._test_batch, loop._test_order, loop._test_every) == (8, "first", 3)
    peer = Peer(load_config(raw), 2, tmp_path)  # in-process: no network until it runs
    assert peer.reader.name == "contribution" and peer.reader.test_batch == 8
    theta = p.init_theta()
    for t in (0, 4):
        assert torch.allclose(peer._test_grad(theta[2:3], t)[0], loop._test_grads(theta, t)[2],
                              atol=1e-12, rtol=1e-9)
