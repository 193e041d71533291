"""Collaborator selection: hidden-group data, the seeded peer sampler, the select and pens
policies on per-row views equal the full network, exact replay on the rewired graph, and the
experiment command on a tiny config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _naive import assert_gt_equals_naive_replay
from dice_influence import data as D
from dice_influence.apps.proximal import ProximalObserver
from dice_influence.apps.selection import (
    PeerSampler,
    PensPolicy,
    SelectPolicy,
    group_ari,
    own_test_data,
    own_training_data,
)
from dice_influence.cli import app
from dice_influence.config import ConfigError, load_config
from dice_influence.distributed import build_local
from dice_influence.influence import Event
from dice_influence.loop import RoundView
from dice_influence.problem import build_groups
from dice_influence.simulator import build_problem, train


def group_cfg(n=8, transform="permute_labels", rounds=12, **extra):
    return load_config({
        "seed": 2,
        "data": {"dataset": "digits", "samples_per_node": 40, "test_samples_per_node": 10,
                 "validation_samples": 60,
                 "groups": {"count": 2 if n < 8 else 4, "transform": transform}},
        "topology": {"name": "complete", "n": n},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"rounds": rounds, "batch_size": 8, "lr": 0.2, "eval_every": 4,
                  "dtype": "float64", "checkpoint_every": 4},
        **extra,
    })


# ------------------------------------------------------------------------------ the data


def test_groups_transform_train_and_test_splits_per_group():
    plain_raw = group_cfg().model_dump(mode="json")
    plain_raw["data"]["groups"] = None
    plain = build_problem(load_config(plain_raw))
    cfg = group_cfg()
    p = build_problem(cfg)
    g = build_groups(cfg)
    assert sorted(np.bincount(g).tolist()) == [2, 2, 2, 2]
    maps = D.group_label_maps(4, 10, cfg.seed)
    assert (maps[0] == np.arange(10)).all()
    assert all((maps[i] != np.arange(10)).all() for i in range(1, 4))  # derangements
    for k in range(cfg.topology.n):
        m = torch.as_tensor(maps[g[k]])
        size = int(p.node_data.sizes[k])
        assert torch.equal(p.node_data.y[k, :size], m[plain.node_data.y[k, :size]])
        assert torch.equal(p.node_test.y[k], m[plain.node_test.y[k]])
        assert torch.equal(p.node_data.x[k], plain.node_data.x[k])


def test_rotated_groups_turn_the_images():
    cfg = group_cfg(transform="rotate")
    plain_raw = cfg.model_dump(mode="json")
    plain_raw["data"]["groups"] = None
    plain, p = build_problem(load_config(plain_raw)), build_problem(cfg)
    g = build_groups(cfg)
    for k in range(cfg.topology.n):
        want = torch.rot90(plain.node_data.x[k], int(g[k]), dims=(-2, -1))
        assert torch.equal(p.node_data.x[k], want)
        assert torch.equal(p.node_data.y[k], plain.node_data.y[k])


def test_a_peer_holds_its_group_transformed_data():
    cfg = group_cfg()
    p = build_problem(cfg)
    for k in (0, 5):
        lp = build_local(cfg, k)
        size = int(p.node_data.sizes[k])
        assert torch.equal(lp.y, p.node_data.y[k, :size]) and torch.equal(lp.test_y,
                                                                          p.node_test.y[k])


@pytest.mark.parametrize("raw,needle", [
    ({"data": {"groups": {"count": 5}}, "topology": {"n": 4}}, "groups.count=5 exceeds"),
    ({"data": {"groups": {"count": 6, "transform": "rotate"}}}, "at most 4 groups"),
    ({"data": {"groups": {"count": 2, "transfrom": "rotate"}}}, "unknown key"),
])
def test_bad_group_settings_are_named(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(raw)


# ------------------------------------------------------------------------------ the sampler


def test_peer_sampler_draws_depend_only_on_seed_node_epoch():
    pool = ~np.eye(12, dtype=bool)
    a, b = PeerSampler(3, pool), PeerSampler(3, pool)
    ex = np.zeros(12, dtype=bool)
    ex[[1, 2]] = True
    first = [a.candidates(k, e, 4, ex) for k in range(12) for e in range(3)]
    second = [b.candidates(k, e, 4, ex) for k in reversed(range(12)) for e in reversed(range(3))]
    assert all(np.array_equal(x, y) for x, y in zip(first, reversed(second), strict=True))
    assert all(not set(c) & {1, 2} and len(c) == 4 for c in first)
    assert not np.array_equal(PeerSampler(4, pool).candidates(0, 0, 4, ex), first[0])
    assert np.array_equal(a.initial(5, 20), np.flatnonzero(pool[5]))  # small pool: all of it


# ------------------------------------------------------------------------------ rows = network


def _policies(kind, p, n, obs):
    seed = p.cfg.seed
    if kind == "pens":
        return PensPolicy(n, seed, p.fm, own_training_data(p), degree=2, every=2, candidates=3)
    return SelectPolicy(n, seed, obs, degree=2, every=2, candidates=3, score=kind,
                        fm=p.fm, own_test=own_test_data(p))


@pytest.mark.parametrize("kind", ["link_exact", "link", "update", "pens"])
def test_selection_on_rows_equals_the_full_network(kind):
    """Each peer runs the policy on its own row with what arrived from its pool: the same
    kept neighbours and the same row of W^t as the simulator's full network."""
    cfg = group_cfg(n=6)
    p = build_problem(cfg)
    n = p.n
    W = p.W(0)
    ids = np.arange(n)
    full_obs, row_obs = ProximalObserver(n), [ProximalObserver(n) for _ in range(n)]
    full_pol = _policies(kind, p, n, full_obs)
    row_pol = [_policies(kind, p, n, o) for o in row_obs]
    gen = torch.Generator().manual_seed(0)
    theta = p.init_theta()
    from dice_influence.gossip import loss_grads

    x, y = p.test_set(True)

    def tg(th):
        return loss_grads(p.fm, th, x[: len(th)], y[: len(th)])[1]

    for t in range(7):
        U = 0.05 * torch.randn(n, p.d, generator=gen, dtype=p.dtype)
        full = RoundView(t, n, ids, ids, theta, theta + U, W, update=U, test_grad_fn=tg)
        full_obs.before_gossip(full)
        W_full = full_pol.decide(full)
        full_obs.after_gossip(full, W_full)
        for k in range(n):
            senders = np.array(sorted({k, *np.flatnonzero(W[k] > 0).tolist()}))
            G = loss_grads(p.fm, theta[k:k + 1], x[k:k + 1], y[k:k + 1])[1]
            view = RoundView(t, n, np.array([k]), senders, theta[k:k + 1],
                             (theta + U)[senders], W, update=U[senders], pre_grad=G)
            row_obs[k].before_gossip(view)
            W_k = row_pol[k].decide(view)
            row_obs[k].after_gossip(view, W_k)
            assert np.allclose(W_k[k], W_full[k], atol=1e-12), (t, k)
            assert np.array_equal(row_pol[k].neighbours[k], full_pol.neighbours[k])
        assert np.allclose(W_full.sum(1), 1.0) and (W_full >= 0).all()
        theta = torch.as_tensor(W_full, dtype=p.dtype) @ (theta + U)
    assert full_pol.rewires > 0, "the test should exercise at least one rewiring"


def test_reciprocity_needs_the_full_network():
    cfg = group_cfg(n=6)
    p = build_problem(cfg)
    obs = ProximalObserver(p.n)
    pol = SelectPolicy(p.n, 0, obs, degree=2, every=1, score="update", reciprocity=1.0)
    W = p.W(0)
    U = torch.zeros(3, p.d, dtype=p.dtype)
    view = RoundView(1, p.n, np.array([0]), np.array([0, 1, 2]), torch.zeros(1, p.d,
                     dtype=p.dtype), U, W, update=U, pre_grad=torch.zeros(1, p.d,
                                                                          dtype=p.dtype))
    with pytest.raises(ValueError, match="reciprocity: 0 on peers"):
        pol.decide(view)
    from dice_influence.plugins import build  # a peer refuses it when building its plug-ins

    raw = cfg.model_dump(mode="json")
    raw["policy"] = {"kind": "select", "reciprocity": 0.5}
    with pytest.raises(ConfigError, match="policy.reciprocity=0.5"):
        build(load_config(raw), build_local(load_config(raw), 0))


# ------------------------------------------------------------------------------ replay


def selection_run():
    return train(group_cfg(rounds=12, policy={"kind": "select", "degree": 2, "every": 2,
                                              "candidates": 3}))


def test_gt_on_a_selection_run_equals_a_naive_replay():
    traj = selection_run()
    p = traj.train_problem
    assert traj.W_used and len({w.tobytes() for w in traj.W_used.values()}) > 1, \
        "the policy should have rewired"
    t_ev = 4
    assert_gt_equals_naive_replay(traj, [Event(1, t_ev), Event(5, t_ev, (0, 2))], t_ev, hops=4)
    # the recorded rows are the kept neighbours, uniform over them and the node itself
    pol = traj.plugins.policy
    W_last = traj.W_used[traj.rounds_done - 1]
    for k in range(p.n):
        keep = np.flatnonzero(W_last[k] > 0)
        assert set(keep) == {k, *np.flatnonzero(pol.neighbours[k])}
        assert np.allclose(W_last[k, keep], 1.0 / len(keep))


def test_dice_train_with_selection_writes_a_replayable_run_dir(tmp_path):
    from dice_influence.config import dump_config
    from dice_influence.trajectory import Trajectory

    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(group_cfg(rounds=8)))
    res = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "run"), "-q",
                                   "--set", "policy={kind: select, degree: 2, every: 2}"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["policy"]["select"]["decisions"][0]["round"] == 0
    back = Trajectory.load(tmp_path / "run")
    assert sorted(back.W_used) == m["W_used_rounds"] and len(back.W_used) == 8
    want = back.theta.clone()
    back.checkpoints = {0: back.checkpoints[0]}  # replay every round on the recorded W^t
    back._cache = None
    assert torch.equal(back.params_at(back.rounds_done)[0], want)


def test_group_ari_reads_the_kept_graph():
    g = np.array([0, 0, 1, 1, 2, 2])
    N = np.zeros((6, 6), dtype=bool)
    for a, b in ((0, 1), (2, 3), (4, 5)):
        N[a, b] = N[b, a] = True
    assert group_ari(N, g) == pytest.approx(1.0)
    N[0, 2] = True  # one link across groups merges two components
    assert group_ari(N, g) < 0.9


# ------------------------------------------------------------------------------ the command


def test_selection_experiment_runs_on_a_tiny_config(tmp_path):
    cfg = tmp_path / "sel.yaml"
    raw = group_cfg(n=8, rounds=8).model_dump(mode="json")
    raw["train"]["dtype"] = "float32"
    raw["experiment"] = {"degree": 2, "every": 2, "candidates": 2, "ari_round": 4}
    import yaml

    cfg.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["experiment", "selection", str(cfg), "--out",
                                   str(tmp_path / "run"), "--seeds", "0,1", "-q"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["kind"] == "selection"
    page = (tmp_path / "run" / "report.html").read_text()  # the run's report
    assert "data:image/png;base64" in page and "http://" not in page
    s = m["selection"]
    assert set(s["arms"]) == {"dice", "static", "pens", "oracle", "local"}
    for a in s["arms"].values():
        assert 0.0 <= a["acc_worst"] <= a["acc_mean"] <= 1.0
    assert -1.0 <= s["ari_final"] <= 1.0 and s["ari_per_round"][0]["round"] == 0
    for f in ("arms.csv", "ari.csv", "accuracy.csv", "selection.png", "kept_graph.png"):
        assert (tmp_path / "run" / f).is_file()
    for opt, needle in (("data.groups=null", "data.groups must be set"),
                        ("experiment.degree=1", "experiment.degree=1: the static arm")):
        bad = CliRunner().invoke(app, ["experiment", "selection", str(cfg), "--out",
                                       str(tmp_path / "r2"), "--set", opt])
        assert bad.exit_code == 2 and needle in bad.output, bad.output


def test_selection_same_on_peers_as_in_the_simulator(tmp_path):
    """4 real peers in 2 hidden groups, the complete graph as the pool: each peer rewires its own
    row from the half steps that arrived and ends with the simulator's parameters."""
    from dice_influence.distributed import launch, simulate

    raw = group_cfg(n=4, rounds=8).model_dump(mode="json")
    raw["train"]["dtype"] = "float32"
    raw["policy"] = {"kind": "select", "degree": 1, "every": 2, "candidates": 2}
    raw["experiment"] = {"distributed": {"timeout_s": 20}}
    cfg = load_config(raw)
    sim = train(cfg)
    assert len({w.tobytes() for w in sim.W_used.values()}) > 1, "the policy should rewire"
    ref = simulate(cfg)
    assert torch.allclose(sim.theta, ref.theta, atol=1e-6, rtol=0)
    res = launch(cfg, 4, tmp_path, wall_timeout=150)
    assert res.ok, res.errors
    assert torch.allclose(res.theta, ref.theta, atol=1e-5, rtol=0)


def test_selection_state_survives_a_checkpoint():
    from dice_influence.plugins import build, pack_states, unpack_states

    traj = selection_run()
    tensors, meta = pack_states(traj.plugins)
    fresh = build(traj.train_problem.cfg, traj.train_problem)
    unpack_states(fresh, tensors, meta)
    a, b = traj.plugins.policy, fresh.policy
    assert np.array_equal(a.neighbours, b.neighbours) and a.epoch == b.epoch
    assert np.allclose(a._sum, b._sum) and [t for t, _ in a.decisions] == \
        [t for t, _ in b.decisions]
