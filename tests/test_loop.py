"""The one training loop: plug-ins see the same round in the simulator and on a peer's row, a
passive observer never changes the numbers, and a policy-driven run replays exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from _naive import assert_gt_equals_naive_replay
from dice_influence.apps.aggregators import ClippedGossip, TrimmedMean
from dice_influence.apps.defense import PrunePolicy, repair_rows
from dice_influence.apps.proximal import ProximalObserver
from dice_influence.cli import app
from dice_influence.config import ConfigError, load_config
from dice_influence.influence import Event, ground_truth
from dice_influence.loop import Gossip, Loop, RoundView
from dice_influence.simulator import build_problem, train
from dice_influence.topology import mixing_matrix
from dice_influence.trajectory import Trajectory


def cfg_for(rounds=12, n=8, **extra):
    raw = {
        "seed": 3,
        "data": {"dataset": "digits", "samples_per_node": 40, "test_samples_per_node": 15,
                 "validation_samples": 60,
                 "corruptions": [{"kind": "label_flip", "nodes": [2]}]},
        "topology": {"name": "exponential", "n": n},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"rounds": rounds, "batch_size": 8, "lr": 0.2, "eval_every": 4,
                  "dtype": "float64", "checkpoint_every": 4},
        **extra,
    }
    return load_config(raw)


def row_views(full: RoundView, W: np.ndarray) -> list[RoundView]:
    """What each peer k sees: its own θ^t, and the half steps / updates of itself and its
    in-neighbours."""
    out = []
    U = full.update()
    for k in range(full.n):
        senders = np.array(sorted({k, *np.flatnonzero(W[k] > 0).tolist()}))
        out.append(RoundView(full.t, full.n, np.array([k]), senders, full.theta[k:k + 1],
                             full.half[senders], full.W_nominal, update=U[senders],
                             test_grad_fn=full._test_grad_fn))
    return out


@pytest.mark.parametrize("agg", [Gossip(), ClippedGossip(0.3), TrimmedMean(0.25)])
def test_aggregators_on_a_row_equal_the_full_network(agg):
    n = 9
    W = mixing_matrix("random-regular", n, degree=4, weights="metropolis", seed=1)
    torch.manual_seed(0)
    theta, half = torch.randn(n, 7, dtype=torch.float64), torch.randn(n, 7, dtype=torch.float64)
    half[4] = float("nan")  # a diverged sender leaks nowhere
    ids = np.arange(n)
    full = RoundView(0, n, ids, ids, theta, half, W, update=half - theta)
    want = agg(full, W)
    for k, view in enumerate(row_views(full, W)):
        got = agg(view, W)
        assert torch.equal(torch.isfinite(got), torch.isfinite(want[k:k + 1]))
        assert torch.allclose(torch.nan_to_num(got), torch.nan_to_num(want[k:k + 1]),
                              atol=1e-12, rtol=0)


def test_observer_and_policy_on_rows_equal_the_full_network():
    n = 8
    W = mixing_matrix("exponential", n)
    torch.manual_seed(1)
    G = torch.randn(n, 5, dtype=torch.float64) + 2.0  # test gradients roughly agree
    ids = np.arange(n)
    full_obs = ProximalObserver(n)
    row_obs = [ProximalObserver(n) for _ in range(n)]
    full_pol = PrunePolicy(n, full_obs, rule="zscore", z_threshold=1.0, max_norm_ratio=3.0)
    row_pol = [PrunePolicy(n, o, rule="zscore", z_threshold=1.0, max_norm_ratio=3.0)
               for o in row_obs]
    for t in range(4):
        theta = torch.randn(n, 5, dtype=torch.float64)
        U = torch.randn(n, 5, dtype=torch.float64)
        U[3] *= 1 + 5 * (t == 2)  # an oversized update once
        U[5] = 3.0 * G.mean(0)  # a consistently harmful sender (raises every test loss)
        full = RoundView(t, n, ids, ids, theta, theta + U, W, update=U,
                         test_grad_fn=lambda th: G[: len(th)] if len(th) == n else None)
        full._grads["pre"] = G
        full_obs.before_gossip(full)
        W_full = full_pol.decide(full)
        full_obs.after_gossip(full, W_full)
        for k, view in enumerate(row_views(full, W)):
            view._grads["pre"] = G[k:k + 1]
            row_obs[k].before_gossip(view)
            W_k = row_pol[k].decide(view)
            row_obs[k].after_gossip(view, W_k)
            assert np.allclose(W_k[k], W_full[k])
            assert np.allclose(row_obs[k].tracker.cum[k], full_obs.tracker.cum[k], atol=1e-12)
    assert full_pol.blocked[:, 5].any(), "the harmful sender should have been pruned"
    assert full_pol.norm_blocked[:, 3].any(), "the oversized update should have been refused"
    for k in range(n):
        assert np.array_equal(row_pol[k].blocked[k], full_pol.blocked[k])


def test_a_passive_observer_changes_no_bit():
    plain = train(cfg_for())
    observed = train(cfg_for(observers=[{"kind": "proximal", "every": 3}]))
    assert torch.equal(plain.theta, observed.theta)
    prox = observed.plugins.find("proximal")
    assert prox.tracker.rounds == [0, 3, 6, 9]
    assert np.abs(prox.tracker.cum.numpy()).max() > 0


def pruned_run():
    cfg = cfg_for(rounds=14, policy={"kind": "prune", "rule": "sign", "start": 2})
    traj = train(cfg)
    assert traj.W_used, "the label-flipping node should have been pruned"
    return traj


def test_replay_of_a_policy_driven_run_is_exact():
    traj = pruned_run()
    for t in (5, 9, 13):
        theta, _ = traj.params_at(t)
        traj._cache = None
        ck = max(c for c in traj.checkpoints if c <= t)
        assert ck < t or torch.equal(theta, traj.checkpoints[t][0])
    assert torch.equal(traj.params_at(traj.rounds_done)[0], traj.theta)
    traj.checkpoints = {0: traj.checkpoints[0]}  # recompute everything from round 0
    traj._cache = None
    assert torch.equal(traj.params_at(traj.rounds_done)[0], traj.theta)


def test_gt_on_a_pruned_run_equals_a_naive_replay():
    traj = pruned_run()
    t_ev = sorted(traj.W_used)[0]
    assert_gt_equals_naive_replay(traj, [Event(1, t_ev), Event(6, t_ev, (0, 3))], t_ev, hops=3)


def test_recorded_matrices_survive_save_and_load(tmp_path):
    traj = pruned_run()
    traj.save(tmp_path)
    back = Trajectory.load(tmp_path)
    assert sorted(back.W_used) == sorted(traj.W_used)
    for t, w in traj.W_used.items():
        assert np.array_equal(back.W_used[t], w) and np.array_equal(back.problem.W(t), w)
    back.checkpoints = {0: back.checkpoints[0]}
    assert torch.equal(back.params_at(back.rounds_done)[0], traj.theta)


def test_policy_rows_stay_stochastic():
    traj = pruned_run()
    for w in traj.W_used.values():
        assert np.allclose(w.sum(1), 1.0) and (w >= 0).all()
        assert not np.array_equal(w, traj.train_problem.W(0))
    blocked = traj.plugins.policy.blocked
    assert blocked[:, 2].any()  # the label flipper lost listeners
    assert np.allclose(repair_rows(traj.train_problem.W(0), blocked), traj.W_used[max(traj.W_used)])


def test_loop_requires_nothing_of_a_plain_problem():
    p = build_problem(cfg_for())
    th = p.init_theta()
    a, _ = Loop(p).run(th, None, 0, 3)
    b, _ = Loop(p, [ProximalObserver(p.n)]).run(th, None, 0, 3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("section,raw,needle", [
    ("observers", [{"kind": "proximl"}], "did you mean 'proximal'"),
    ("observers", [{"kind": "proximal", "readout": "mid"}], "observers.0.readout"),
    ("policy", {"kind": "prune", "rules": "sign"}, "policy.rules: unknown key"),
    ("aggregator", {"kind": "median"}, "aggregator.kind: unknown aggregator 'median'"),
    ("policy", {"rule": "sign"}, "policy: needs a mapping with 'kind'"),
])
def test_plugin_sections_are_validated(section, raw, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        load_config({section: raw})


def test_dice_config_lists_the_plugins():
    res = CliRunner().invoke(app, ["config"])
    assert res.exit_code == 0, res.output
    for kind in ("kind proximal", "kind prune", "kind clipped_gossip", "kind trimmed_mean"):
        assert kind in res.output
    import yaml

    assert yaml.safe_load(res.output)["observers"] == []  # still valid YAML


def test_dice_train_takes_the_plugin_keys(tmp_path):
    import json

    from dice_influence.config import dump_config

    path = tmp_path / "cfg.yaml"
    path.write_text(dump_config(cfg_for(rounds=10)))
    res = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "run"), "-q",
                                   "--set", "policy.kind=prune", "--set", "policy.start=2",
                                   "--set", "observers=[{kind: proximal, readout: post}]"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["observers"]["proximal"]["readout"] == "post"
    assert any(s == 2 for _, s in m["policy"]["prune"]["pruned"])  # the label flipper
    assert m["W_used_rounds"]
    back = Trajectory.load(tmp_path / "run")
    assert sorted(back.W_used) == m["W_used_rounds"]


def test_a_policy_driven_run_resumes_to_the_same_bits(tmp_path):
    from dice_influence.rundir import open_run, progress_writer, write_run_dir

    cfg = cfg_for(rounds=14, policy={"kind": "prune", "rule": "sign", "start": 2})
    whole = train(cfg)
    out = tmp_path / "run"
    first = open_run(out, build_problem(cfg))
    first.run(8, on_checkpoint=progress_writer(first, out))  # "killed" after round 8
    again = open_run(out, build_problem(cfg), resume=True)
    assert again.rounds_done == 8 and again.plugins.policy is not None
    again.run(cfg.train.rounds - again.rounds_done, on_checkpoint=progress_writer(again, out))
    assert torch.equal(again.theta, whole.theta)
    assert again.plugins.policy.prune_log == whole.plugins.policy.prune_log
    assert sorted(again.W_used) == sorted(whole.W_used)
    write_run_dir(again, out)
    back = Trajectory.load(out)
    assert np.array_equal(back.plugins.policy.blocked, whole.plugins.policy.blocked)
    assert torch.equal(back.params_at(back.rounds_done)[0], whole.theta)


def test_influence_replays_update_attacks_in_the_round():
    import dataclasses

    from dice_influence.attacks import AttackPlan, AttackSpec, attack_transforms
    from dice_influence.influence import estimate
    from dice_influence.influence.adjoint import attribute

    cfg = cfg_for(rounds=8)
    plan = AttackPlan.resolve([AttackSpec(kind="sign_flip", nodes=[3], scale=-2.0)], 8, 3)
    p = dataclasses.replace(build_problem(cfg), transforms=attack_transforms(plan))
    traj = Trajectory.start(p)
    traj.run(8)
    events = [Event(3, 4), Event(5, 4, (1,))]
    gt = ground_truth(traj, events, hops=2)
    theta0, _ = traj.params_at(4)
    for i, e in enumerate(events):  # naive: the round with the attacker's flipped update
        w = torch.ones(p.n, p.cfg.train.batch_size, dtype=p.dtype)
        w[e.node, list(e.samples) if e.samples else slice(None)] = 0.0
        f, c = theta0.clone(), theta0.clone()
        for s in range(2):
            fh, _ = p.local_step(f, None, 4 + s)
            ch, _ = p.local_step(c, None, 4 + s, w if s == 0 else None)
            Wt = torch.as_tensor(p.W(4 + s), dtype=p.dtype)
            f, c = Wt @ fh, Wt @ ch
        from dice_influence.gossip import node_losses

        naive = (node_losses(p.fm, f, p.val_x, p.val_y)[0]
                 - node_losses(p.fm, c, p.val_x, p.val_y)[0]).double()
        assert torch.allclose(gt.per_node[i, 2], naive, atol=1e-10, rtol=0)
    est = estimate(traj, events, hops=2, readout="midpoint")
    assert np.corrcoef(est.r_hop[:, 1], gt.r_hop[:, 1])[0, 1] > 0.9
    with pytest.raises(ValueError, match="update-level attacks"):
        attribute(traj, (2, 4))


def test_influence_refuses_a_robust_aggregator_run():
    traj = train(cfg_for(rounds=6, aggregator={"kind": "clipped_gossip"}))
    with pytest.raises(ValueError, match="W\\^t matmul"):
        ground_truth(traj, [Event(1, 2)], hops=1)
