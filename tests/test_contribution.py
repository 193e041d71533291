"""Node contribution: the observer's adjoint equals the attribution sweep, is passive and tracks
leave-one-node-out; LOO batched equals LOO one by one; the Shapley sampler against exact
Shapley; the reward and free-rider rules; the data knobs of the scenario; the experiment."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dice_influence.apps.contribution import (
    ContributionObserver,
    edge_t_statistic,
    free_rider_flags,
    merge_ledgers,
    reciprocity_factor,
    reward_split,
)
from dice_influence.attacks import AttackPlan, AttackSpec, attack_transforms
from dice_influence.cli import app
from dice_influence.config import ConfigError, load_config
from dice_influence.experiments import contribution as X
from dice_influence.experiments import contribution_truth as truth
from dice_influence.influence.adjoint import attribute
from dice_influence.loop import Loop
from dice_influence.simulator import build_problem, train


def cfg_for(n=6, rounds=6, **extra):
    raw = {
        "seed": 2,
        "data": {"dataset": "digits", "samples_per_node": 32, "test_samples_per_node": 8,
                 "validation_samples": 60},
        "topology": {"name": "exponential", "n": n},
        "model": {"name": "mlp", "hidden": [12]},
        "train": {"rounds": rounds, "batch_size": 8, "lr": 0.2, "eval_every": rounds,
                  "dtype": "float64"},
    }
    for key, val in extra.items():
        if isinstance(val, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **val}
        else:
            raw[key] = val
    return load_config(raw)


def with_free_riders(problem, specs):
    plan = AttackPlan.resolve([AttackSpec(**s) for s in specs], problem.n, 0)
    return dataclasses.replace(problem, transforms=attack_transforms(plan))


def observe(problem, rounds, **kw):
    obs = ContributionObserver(problem.n, problem, rounds=rounds, **kw)
    theta = problem.init_theta()
    out, _ = Loop(problem, [obs]).run(theta, problem.opt.init_state(theta), 0, rounds)
    return obs, out


# ------------------------------------------------------------------------------ the observer


def test_adjoint_equals_attribution_and_the_observer_is_passive():
    cfg = cfg_for(observers=[{"kind": "contribution", "curvature": "exact"}])
    traj = train(cfg)
    obs = traj.plugins.find("contribution")
    plain = train(cfg.model_copy(update={"observers": []}))
    assert torch.equal(traj.theta, plain.theta)  # a passive observer changes no bit
    att = attribute(traj, (0, cfg.train.rounds), target="horizon", hops=1, q="uniform",
                    per_node_test=False)
    want = att.scores.sum(-1).numpy()  # a batch = the sum of its samples (plain SGD)
    got = np.stack([obs.b_rounds[t] for t in range(cfg.train.rounds)])
    assert np.abs(want).max() > 1e-5
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)
    m = obs.measures()
    np.testing.assert_allclose(m["adjoint"], want.sum(0), rtol=1e-8, atol=1e-12)


def test_curvature_variants_and_exclude_self():
    p = build_problem(cfg_for())
    exact, _ = observe(p, 6, curvature="exact")
    none, _ = observe(p, 6, curvature="none")
    e, z = (o.measures()["adjoint"] for o in (exact, none))
    assert np.abs(z - e).max() > 1e-3 * np.abs(e).max()  # curvature matters
    # one sweep per receiver: summing over all receivers gives the one-sweep read-out back
    excl, _ = observe(p, 6, curvature="exact", exclude_self=True)
    for t in range(6):
        np.testing.assert_allclose(excl.b_rounds[t].sum(0), exact.b_rounds[t], rtol=1e-9,
                                   atol=1e-13)
    diag = sum(np.diag(excl.b_rounds[t]) for t in range(6))
    np.testing.assert_allclose(excl.measures()["adjoint"], e - diag, rtol=1e-9, atol=1e-13)


def test_windows_cover_the_run_and_free_riders_send_nothing():
    p = with_free_riders(build_problem(cfg_for()), [{"kind": "free_rider", "nodes": [1]}])
    obs, _ = observe(p, 6, horizon="window", window=4)
    assert obs.windows == [(0, 4), (4, 6)]
    m = obs.measures()
    assert m["adjoint"][1] == 0.0 and m["proximal_out"][1] == 0.0  # û = 0: no contribution
    assert np.all(m["adjoint"][[0, 2, 3, 4, 5]] != 0.0)


def test_first_order_contribution_tracks_leave_one_node_out():
    cfg = cfg_for(n=6, rounds=10, train={"lr": 0.05},
                  data={"corruptions": [{"kind": "random_labels", "nodes": [0, 1],
                                         "fraction": 0.8}]})
    p = build_problem(cfg)
    obs, _ = observe(p, 10, curvature="exact")
    b = obs.measures()["adjoint"]
    loo = truth.leave_one_out(p, 10)["loo_all"]  # the same read-out: all nodes' mean loss
    np.testing.assert_allclose(b, loo, rtol=0.25, atol=0.05 * np.abs(loo).max())
    assert np.argsort(b).tolist()[-2:] == np.argsort(loo).tolist()[-2:]  # the noisy nodes


def test_observer_settings_are_validated_in_the_config():
    with pytest.raises(ConfigError, match=r"observers\.0\.curvature"):
        cfg_for(observers=[{"kind": "contribution", "curvature": "hessian"}])
    with pytest.raises(ConfigError, match=r"observers\.0\.horizn"):
        cfg_for(observers=[{"kind": "contribution", "horizn": "run"}])


@pytest.mark.parametrize("nesterov", [False, True])
def test_adjoint_under_momentum_equals_attribution_in_total(nesterov):
    """Under momentum ``Σ_t λ^{tᵀ} u^t`` (what j sent) = ``Σ_t c_g^{tᵀ} g^t`` (all its
    gradients removed): the state cotangent carries the buffer's later use."""
    cfg = cfg_for(train={"momentum": 0.9, "nesterov": nesterov},
                  topology={"time_varying": "random-matching"} if nesterov else {},
                  observers=[{"kind": "contribution", "curvature": "exact"}])
    traj = train(cfg)
    obs = traj.plugins.find("contribution")
    att = attribute(traj, (0, cfg.train.rounds), target="horizon", q="uniform",
                    per_node_test=False)
    want = att.scores.sum((0, 2)).numpy()
    assert np.abs(want).max() > 1e-5
    np.testing.assert_allclose(obs.measures()["adjoint"], want, rtol=1e-8, atol=1e-12)


# ------------------------------------------------------------------------------ ground truth


def test_loo_batched_equals_loo_one_by_one_and_free_riders_are_exactly_zero():
    p = with_free_riders(build_problem(cfg_for(n=5, rounds=5)),
                         [{"kind": "free_rider", "nodes": [1]},
                          {"kind": "free_rider_noise", "nodes": [3], "sigma": 0.01}])
    batched = truth.leave_one_out(p, 5)
    one = [truth.leave_one_out(p, 5, nodes=[j])["loo"][0] for j in range(5)]
    assert np.array_equal(batched["loo"], np.array(one))  # exact, bit for bit
    assert batched["loo"][1] == 0.0 and batched["loo"][3] == 0.0  # no data was ever used
    assert np.all(batched["loo"][[0, 2, 4]] != 0.0)
    # the factual copy is the factual run
    theta = p.init_theta()
    out, _ = Loop(p).run(theta, None, 0, 5)
    np.testing.assert_array_equal(batched["factual_loss"], p.evaluate(out)["loss"])


def test_loo_refuses_weight_decay():
    p = build_problem(cfg_for(train={"weight_decay": 1e-3}))
    with pytest.raises(ConfigError, match="weight_decay"):
        truth.leave_one_out(p, 2)


def _random_game(n, seed):
    table = np.random.default_rng(seed).normal(size=1 << n)  # arbitrary, all interactions

    def u(keep):
        return table[np.asarray(keep, dtype=int) @ (1 << np.arange(n))]

    return u


def _brute_force(u, n):
    phi = np.zeros(n)
    perms = list(itertools.permutations(range(n)))
    for p in perms:
        S = np.zeros(n, dtype=bool)
        for j in p:
            before = u(S[None])[0]
            S[j] = True
            phi[j] += u(S[None])[0] - before
    return phi / len(perms)


@pytest.mark.parametrize("n", [3, 5])
def test_exact_shapley_equals_all_permutations(n):
    u = _random_game(n, n)
    np.testing.assert_allclose(truth.shapley_exact(u, n), _brute_force(u, n), atol=1e-12)


def test_shapley_sampler_against_exact_shapley():
    n = 7
    u = _random_game(n, 1)
    exact = truth.shapley_exact(u, n)
    res = truth.shapley_permutations(u, n, 40 * 2 * n, seed=3)
    assert res["permutations"] == 40 * 2 * n
    err = np.abs(res["phi"] - exact)
    assert err.max() < 4 * res["se"].max() + 1e-12, (err, res["se"])
    assert res["se"].max() < 0.1  # the budget is worth something
    # efficiency holds exactly for every sampled order
    assert math.isclose(res["phi"].sum(), res["u_full"] - res["u_empty"], abs_tol=1e-12)
    # a game with at most pairwise interactions is recovered exactly by one stratified block
    w, V = np.random.default_rng(0).normal(size=n), np.random.default_rng(1).normal(size=(n, n))

    def pair(keep):
        K = np.asarray(keep, dtype=float)
        return K @ w + np.einsum("ci,ij,cj->c", K, np.triu(V, 1), K)

    np.testing.assert_allclose(truth.shapley_permutations(pair, n, 2 * n,
                                                          orderings="cyclic")["phi"],
                               truth.shapley_exact(pair, n), atol=1e-12)
    # truncation only removes evaluations
    tr = truth.shapley_permutations(u, n, 4 * n, seed=3, tolerance=0.5)
    assert tr["evaluations"] <= truth.shapley_permutations(u, n, 4 * n, seed=3)["evaluations"]


def test_independent_orderings_give_calibrated_standard_errors():
    """Over many sampler seeds, the spread of φ̂ matches the reported se (independent
    orderings); the cyclic design's se is widened by se_widen."""
    n = 10
    u = _random_game(n, 4)
    exact = truth.shapley_exact(u, n)
    res = [truth.shapley_permutations(u, n, 2 * n, seed=s, orderings="independent")
           for s in range(150)]
    P, S = np.array([r["phi"] for r in res]), np.array([r["se"] for r in res])
    assert np.abs(P.mean(0) - exact).max() < 4 * P.std(0).max() / math.sqrt(150)  # unbiased
    ratio = P.std(0, ddof=1).mean() / S.mean(0).mean()
    assert 0.85 < ratio < 1.15, ratio
    cyc = truth.shapley_permutations(u, n, 2 * n, seed=0, orderings="cyclic", se_widen=1.5)
    np.testing.assert_allclose(cyc["se"], 1.5 * cyc["se_raw"])
    with pytest.raises(ValueError, match="orderings"):
        truth.shapley_permutations(u, n, 2 * n, orderings="sobol")


def test_network_shapley_sampler_matches_exact_on_four_nodes():
    p = build_problem(cfg_for(n=4, rounds=4))
    u = truth.network_utility(p, 4)
    exact = truth.shapley_exact(u, 4)
    full = u(np.ones((1, 4), dtype=bool))[0] - u(np.zeros((1, 4), dtype=bool))[0]
    assert math.isclose(exact.sum(), full, rel_tol=1e-9)
    sampled = truth.shapley_permutations(u, 4, 24, seed=0)
    np.testing.assert_allclose(sampled["phi"], exact, atol=4 * sampled["se"].max() + 1e-9)


# ------------------------------------------------------------------------------ rules


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-5, 5, allow_nan=False), min_size=1, max_size=12),
       st.floats(0.1, 1000), st.integers(0, 2**16))
def test_reward_rule_properties(c, budget, seed):
    c = np.array(c)
    rng = np.random.default_rng(seed)
    out, inn = rng.uniform(-2, 1, size=len(c)), rng.uniform(-2, 1, size=len(c))
    excl = rng.random(len(c)) < 0.2
    r = reward_split(c, out, inn, budget=budget, excluded=excl)
    assert np.all(r >= 0)
    assert np.all(r[(c >= 0) | excl] == 0)  # harmful, useless or excluded: nothing
    if ((c < 0) & ~excl).any():
        assert math.isclose(r.sum(), budget, rel_tol=1e-9)
    else:
        assert r.sum() == 0
    # more helpful, same reciprocity: not less reward
    r2 = reward_split(np.where(np.arange(len(c)) == 0, c - 1.0, c), out, inn, budget=budget,
                      excluded=excl)
    assert r2[0] >= r[0] * (1 - 1e-12)
    rho = reciprocity_factor(out, inn)
    assert np.all((rho >= 0.5) & (rho <= 1.0))


def test_reciprocity_factor():
    rho = reciprocity_factor(np.array([-1.0, -1.0, 0.0, -1.0, 0.5, 0.0]),
                             np.array([-1.0, 0.0, -1.0, -3.0, -1.0, 0.0]))
    np.testing.assert_allclose(rho, [1.0, 1.0, 0.5, 0.5, 0.5, 1.0])  # no bonus by default
    R = 3.0  # both helpful: 2R / (1 + R)
    assert math.isclose(reciprocity_factor(np.array([-R]), np.array([-1.0]), (0, 2))[0],
                        2 * R / (1 + R))
    assert math.isclose(reciprocity_factor(np.array([-1.0]), np.array([-3.0]))[0], 0.5)


@pytest.mark.parametrize("rule", ["rms", "t"])
def test_free_rider_rule_flags_nodes_without_signal(rule):
    rng = np.random.default_rng(0)
    n, T, d = 6, 40, 1000
    E = np.ones((n, n), dtype=bool) & ~np.eye(n, dtype=bool)
    series = rng.normal(0.3, 0.2, size=(T, n, n))  # honest: consistently aligned
    series[:, :, 1] = 0.0  # sends nothing
    series[:, :, 2] = rng.normal(0.0, 1 / math.sqrt(d), size=(T, n))  # sends isotropic noise
    series[:, :, 3] = rng.normal(-0.3, 0.2, size=(T, n))  # harmful, not a free rider
    series[:, :, 4] = rng.normal(0.0, 0.3, size=(T, n))  # real but unhelpful updates
    align = np.stack([np.full((n, n), T), series.sum(0), (series ** 2).sum(0)]).astype(float)
    out = free_rider_flags(align, E, d=d, rule=rule, z=3.0)
    want = [False, True, True, False, rule == "t", False]  # rms tells unhelpful from empty
    assert out["free_rider"].tolist() == want
    t = edge_t_statistic(align)
    assert t[0, 1] == 0.0 and t[0, 5] > 3 and t[0, 3] < -3
    assert np.all(out["alignment_rms"][E[:, 2], 2] < 3)


def test_merge_ledgers_sums_the_rows():
    p = build_problem(cfg_for())
    obs, _ = observe(p, 4, horizon="off")
    m = obs.measures()
    led = merge_ledgers([row for row in obs.proximal])
    np.testing.assert_allclose(led["proximal_out"], m["proximal_out"])
    with pytest.raises(ValueError, match="one row"):
        merge_ledgers([[0.0, 1.0]])


# ------------------------------------------------------------------------------ scenario knobs


def test_size_multipliers_duplicates_and_noisy_free_riders():
    cfg = cfg_for(n=4, data={"size_multipliers": [2, 1, 0.25, 1], "duplicate_of": {3: 1}})
    p = build_problem(cfg)
    assert p.node_data.sizes.tolist() == [64, 32, 8, 32]
    assert torch.equal(p.node_data.index[3], p.node_data.index[1])
    with pytest.raises(ConfigError, match="size_multipliers"):
        cfg_for(n=4, data={"size_multipliers": [1, 1]})
    with pytest.raises(ConfigError, match="duplicate_of"):
        cfg_for(n=4, data={"duplicate_of": {3: 3}})
    plan = AttackPlan.resolve([AttackSpec(kind="free_rider_noise", nodes=[2], sigma=0.5)], 4, 0)
    U = torch.ones(4, 1000, dtype=torch.float64)
    plan.apply_updates(U, 3)
    assert torch.equal(U[[0, 1, 3]], torch.ones(3, 1000, dtype=torch.float64))
    assert abs(float(U[2].mean())) < 0.1 and 0.4 < float(U[2].std()) < 0.6  # noise only


# ------------------------------------------------------------------------------ experiment

TINY = {
    "seed": 0,
    "data": {"dataset": "digits", "samples_per_node": 32, "test_samples_per_node": 8,
             "validation_samples": 60, "size_multipliers": [1, 1, 0.5, 1],
             "corruptions": [{"kind": "random_labels", "nodes": [2], "fraction": 0.6}]},
    "topology": {"name": "exponential", "n": 4},
    "model": {"name": "mlp", "hidden": [8]},
    "train": {"rounds": 4, "batch_size": 8, "lr": 0.2, "eval_every": 4},
    "observers": [{"kind": "contribution"}],
    "experiment": {"attacks": [{"kind": "free_rider", "nodes": [3]}],
                   "shapley": {"permutations": 8}, "timing_repeats": 1},
}


def test_experiment_command_writes_the_metrics(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(TINY))
    res = CliRunner().invoke(app, ["experiment", "contribution", str(path), "--out",
                                   str(tmp_path / "run"), "--seeds", "0,1", "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(m["contribution"]) == 8
    keys = {"spearman_loo", "spearman_quality", "spearman_shapley", "free_rider_precision",
            "free_rider_recall", "attacker_reward", "online_overhead", "spearman_loo_data",
            "spearman_loo_node", "spearman_loo_data_vs_node", "loo_over_plain"}
    assert keys <= set(m["agreement"]) and keys <= set(m["agreement_worst"])
    ag = m["per_seed"][0]["agreement"]
    assert ag["spearman_loo"] == ag["spearman_loo_data"]  # ground_truth: data (the default)
    assert ag["loo_over_plain"] == pytest.approx(ag["loo_seconds"] / ag["plain_seconds"])
    rec = m["contribution"][3]
    assert rec["role"] == "free_rider" and rec["loo"] == 0.0 and rec["reward"] == 0.0
    assert rec["loo_data"] == 0.0 and rec["loo_node"] != 0.0  # it relays: removing it matters
    assert rec["shapley_exact"] is not None  # n <= 8: exact Shapley as the sampler's check
    for name in ("rewards.png", "contribution_vs_loo.png", "reciprocity.png", "README.md",
                 "contribution.csv"):
        assert (tmp_path / "run" / name).is_file()
    assert m["kind"] == "contribution"
    page = (tmp_path / "run" / "report.html").read_text()  # the run's report, plots inlined
    assert page.count("data:image/png;base64") >= 3 and "spearman_loo" in page


def test_experiment_console_prints_the_node_table(tmp_path):
    import yaml

    path = tmp_path / "c.yaml"
    raw = {**TINY, "experiment": {**TINY["experiment"], "ground_truth": "node",
                                  "ablation": []}}
    path.write_text(yaml.safe_dump(raw))
    res = CliRunner().invoke(app, ["experiment", "contribution", str(path), "--out",
                                   str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "| node | role |" in res.output and "Shapley ± se" in res.output
    assert "LOO (node)" in res.output and "s wall (" in res.output
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    ag = m["per_seed"][0]["agreement"]
    assert ag["spearman_loo"] == ag["spearman_loo_node"]
    assert all(r["loo"] == r["loo_node"] for r in m["contribution"])


def test_node_removal_takes_the_node_out_of_the_graph():
    from dice_influence.gossip import node_losses
    from dice_influence.loop import run_rounds

    p = build_problem(cfg_for(n=5, rounds=5, topology={"time_varying": "random-matching"}))
    node = truth.leave_one_out(p, 5, removal="node")
    data = truth.leave_one_out(p, 5, removal="data")
    assert np.abs(node["loo"] - data["loo"]).max() > 1e-4  # different questions
    W = p.W(0)
    iso = truth.isolate(W, np.eye(5, dtype=bool)[2])
    assert np.allclose(iso.sum(1), 1) and iso[2, 2] == 1 and not iso[:, 2][[0, 1, 3, 4]].any()

    class Without:  # the schedule with node j out of every W^t (rows repaired by the rule)
        def __init__(self, sched, j):
            self.sched, self.j, self.is_static = sched, j, sched.is_static

        def W(self, t):
            return truth.isolate(self.sched.W(t), np.eye(5, dtype=bool)[self.j])

    theta0 = p.init_theta()
    full, _ = run_rounds(p, theta0, None, 0, 5)
    L0 = node_losses(p.fm, full, p.val_x, p.val_y)[0].numpy()
    for j in (0, 2):
        q = dataclasses.replace(p, schedule=Without(p.schedule, j), _mixers={})
        th, _ = run_rounds(q, theta0, None, 0, 5)
        L = node_losses(p.fm, th, p.val_x, p.val_y)[0].numpy()
        others = np.arange(5) != j
        np.testing.assert_allclose(node["loo"][j], L0[others].mean() - L[others].mean(),
                                   rtol=1e-9, atol=1e-12)


def test_experiment_settings_are_validated():
    with pytest.raises(ConfigError, match=r"experiment\.shapley\.permutation"):
        X.parse_experiment(load_config({**TINY, "experiment": {"shapley": {"permutation": 3}}}))
    with pytest.raises(ConfigError, match="weight_decay"):
        X.parse_experiment(load_config({**TINY, "train": {**TINY["train"],
                                                          "weight_decay": 0.1}}))
    with pytest.raises(ConfigError, match=r"attacks\.0\.nodes"):
        X.parse_experiment(load_config({**TINY, "experiment": {
            "attacks": [{"kind": "free_rider", "nodes": [9]}]}}))


def test_real_peers_keep_their_rows_and_launch_writes_the_summed_ledger(tmp_path):
    from dice_influence.distributed import launch

    cfg = cfg_for(n=4, rounds=5, train={"dtype": "float32"},
                  data={"corruptions": [{"kind": "label_flip", "nodes": [2]}]},
                  observers=[{"kind": "contribution"}],
                  experiment={"distributed": {"timeout_s": 20}})
    res = launch(cfg, 4, tmp_path, wall_timeout=150)
    assert res.ok, res.errors
    led = json.loads((tmp_path / "contribution_ledger.json").read_text())
    sim = train(cfg).plugins.find("contribution").measures()
    np.testing.assert_allclose(led["proximal_out"], sim["proximal_out"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(led["reciprocity"], sim["reciprocity"], atol=1e-3, rtol=1e-3)
    assert np.abs(led["proximal_out"]).max() > 1e-3  # not vacuous


def test_attack_transposes_are_the_vjp_bit_for_bit():
    """The reverse sweeps take the built-in update attacks' transpose written out (no noise
    drawn, no vjp per round); it must equal the vjp through the attack's forward map."""
    import torch
    from torch.func import vjp

    from dice_influence.attacks import AttackPlan, AttackSpec, UpdateAttacks
    from dice_influence.influence.pullback import transform_transpose

    specs = [AttackSpec(kind="scale", nodes=[0, 1], scale=3.7),
             AttackSpec(kind="sign_flip", nodes=[1, 2]),
             AttackSpec(kind="free_rider", nodes=[3]),
             AttackSpec(kind="free_rider_noise", nodes=[4], sigma=0.01),
             AttackSpec(kind="update_noise", nodes=[0, 5], sigma=0.1),
             AttackSpec(kind="scale", nodes=[6], scale=0.3, start=5)]
    tr = UpdateAttacks(AttackPlan.resolve(specs, 8, seed=0))
    lam = torch.randn(10, 33, dtype=torch.float64)
    ids = [0, 1, 2, 3, 4, 5, 6, 7, 1, 6]  # stacked copies repeat ids
    for t in (2, 7):
        fast = transform_transpose([tr], t, ids, lam)
        slow = vjp(lambda u, t=t: tr.transform(t, ids, u), torch.zeros_like(lam))[1](lam)[0]
        assert torch.equal(fast, slow)
    assert fast[3].abs().sum() == 0 and torch.equal(fast[5], lam[5])
