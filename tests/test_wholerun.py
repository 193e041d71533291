"""Whole-run sample attribution: one reverse sweep vs exact replay, vs forward DICE-E, and the
segmented (memory-bounded) sweep vs the full-memory one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dice_influence.influence.pullback as PB
from dice_influence.config import load_config
from dice_influence.influence import (
    Event,
    SampleScores,
    attribute_run,
    estimate,
    whole_run_ground_truth,
)
from dice_influence.simulator import build_problem, train

ROUNDS = 12


def _cfg(momentum: float = 0.9, activation: str = "relu", ck: int = 4, n: int = 4):
    return load_config({
        "seed": 0,
        "data": {"dataset": "digits", "samples_per_node": 40, "validation_samples": 60},
        "topology": {"name": "ring", "n": n},
        "model": {"name": "mlp", "hidden": [16], "activation": activation},
        "train": {"rounds": ROUNDS, "batch_size": 8, "lr": 0.05, "momentum": momentum,
                  "dtype": "float64", "checkpoint_every": ck, "eval_every": ROUNDS},
    })


@pytest.fixture(scope="module")
def run():
    traj = train(_cfg())
    return traj, attribute_run(traj)


def test_table_covers_every_sample_and_counts_draws(run):
    traj, sc = run
    p = traj.problem
    assert len(sc) == int(p.node_data.sizes.sum())
    draws = np.zeros((p.n, p.node_data.max_size), dtype=int)
    for t in range(ROUNDS):
        idx = p.batches.indices(t).numpy()
        for k in range(p.n):
            draws[k, idx[k]] += 1
    np.testing.assert_array_equal(sc.rounds_used, draws[sc.node, sc.position])
    assert np.all(sc.score[sc.rounds_used == 0] == 0)
    assert sc.target == "mean" and sc.memory["segment"] == 4


def test_sweep_equals_forward_dice_e_summed_over_draws(run):
    """The sweep's score of a sample = the sum over its draws of forward DICE-E's horizon value
    at the end of training (factual read-out and propagation, curvature on)."""
    traj, sc = run
    p = traj.problem
    for row in (0, 7, 23):
        k, pos = int(sc.node[row]), int(sc.position[row])
        events = []
        for t in range(ROUNDS):
            where = np.flatnonzero(p.batches.indices(t)[k].numpy() == pos)
            events += [Event(k, t, (int(b),)) for b in where]
        assert len(events) == sc.rounds_used[row] > 0
        total = sum(float(estimate(traj, [e], hops=ROUNDS - e.round,
                                   readout="factual").horizon[0]) for e in events)
        assert sc.score[row] == pytest.approx(total, rel=1e-7, abs=1e-12)


def test_segmented_sweep_gives_the_same_bits(run):
    traj, sc = run
    for seg in (1, 5, ROUNDS):
        other = attribute_run(traj, segment=seg)
        assert np.array_equal(other.score, sc.score), seg
        assert other.memory["boundaries"] == -(-ROUNDS // seg)


def test_sweep_tracks_exact_replay(run):
    """Whole-run DICE-GT (the sample removed from every round that drew it) vs the sweep."""
    from scipy.stats import pearsonr

    traj, sc = run
    pick = np.random.default_rng(1).choice(np.flatnonzero(sc.rounds_used > 0), 12,
                                           replace=False)
    gt = whole_run_ground_truth(traj, [(int(sc.node[i]), int(sc.position[i])) for i in pick],
                                chunk=5)
    est = sc.score[pick]
    assert pearsonr(est, gt)[0] > 0.9
    assert np.mean(np.sign(est) == np.sign(gt)) >= 0.75
    assert np.all(np.abs(est - gt) <= 0.5 * np.abs(gt).max())


def test_other_targets(run):
    traj, sc = run
    per_node = [attribute_run(traj, target="node", node=k).score for k in range(traj.problem.n)]
    np.testing.assert_allclose(np.mean(per_node, axis=0), sc.score, rtol=1e-9, atol=1e-15)
    one = attribute_run(traj, target="test_sample", test_index=3)
    assert one.target == "test_sample:3" and np.abs(one.score).max() > 0
    gt = whole_run_ground_truth(traj, [(0, 0), (1, 2)], target="test_sample", test_index=3)
    rows = [int(np.flatnonzero((sc.node == k) & (sc.position == s))[0]) for k, s in
            [(0, 0), (1, 2)]]
    assert np.all(np.sign(gt) == np.sign(one.score[rows]))


def test_top_directions_and_table(run, tmp_path):
    _, sc = run
    harm, helpf = sc.top(5), sc.top(5, direction="helpful")
    assert [r["score"] for r in harm] == sorted((r["score"] for r in harm), reverse=True)
    assert harm[0]["score"] == sc.score.max() and helpf[0]["score"] == sc.score.min()
    with pytest.raises(ValueError, match="direction"):
        sc.top(3, direction="worst")
    df = sc.to_dataframe()
    assert list(df.columns) == ["node", "position", "dataset_index", "rounds_used", "score",
                                "label", "corrupted"]
    assert len(df) == len(sc)
    import pandas as pd

    back = pd.read_csv(sc.save(tmp_path / "s.csv"))
    np.testing.assert_array_equal(back["score"].to_numpy(), sc.score)


def test_bad_input_is_named(run):
    traj, _ = run
    with pytest.raises(ValueError, match="target="):
        attribute_run(traj, target="all")
    with pytest.raises(ValueError, match="node="):
        attribute_run(traj, target="node", node=99)
    with pytest.raises(ValueError, match="test_index="):
        attribute_run(traj, target="test_sample", test_index=-1)
    with pytest.raises(ValueError, match="rounds="):
        attribute_run(traj, rounds=ROUNDS + 1)
    with pytest.raises(ValueError, match="inside"):
        whole_run_ground_truth(traj, [(0, 10_000)])


def test_refuses_a_non_finite_checkpoint():
    from dice_influence.trajectory import DivergenceError

    traj = train(_cfg(), rounds=4)
    traj.checkpoints[4][0][1, 0] = float("nan")
    with pytest.raises(DivergenceError, match="non-finite"):
        attribute_run(traj)


@pytest.mark.parametrize("act", ["relu", "tanh", "gelu", "softplus"])
def test_fast_mlp_pass_matches_torch_func(act, monkeypatch):
    p = build_problem(_cfg(activation=act))
    gen = torch.Generator().manual_seed(0)
    th = p.init_theta() + 0.3 * torch.randn(p.n, p.d, dtype=torch.float64, generator=gen)
    c = torch.randn(p.n, p.d, dtype=torch.float64, generator=gen)
    x, y = p.batch(0)
    h1, d1 = PB._hvp_and_sample_dots(p, th, c, x, y, True)
    monkeypatch.setattr(PB, "FAST_MLP", False)
    h2, d2 = PB._hvp_and_sample_dots(p, th, c, x, y, True)
    torch.testing.assert_close(h1, h2, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(d1, d2, rtol=1e-10, atol=1e-12)


def test_scores_type_is_exported():
    assert SampleScores.__name__ == "SampleScores"



def test_retraining_replay_renormalizes_kept_samples(run):
    """``renormalize=True``: a batch's loss is the mean over what it keeps; nothing removed
    gives the factual run's bits, and removing a sample differs from zeroing its weight."""
    from dice_influence.influence.wholerun import replay_without

    traj, _ = run
    p = traj.problem
    rm = torch.zeros(2, p.n, p.node_data.max_size, dtype=torch.bool)
    rm[1, 0, 0] = True
    a = replay_without(traj, rm, rounds=4, renormalize=True)[0]
    b = replay_without(traj, rm, rounds=4)[0]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], a[0])
    assert not torch.equal(a[2], b[2])


def test_sweep_is_the_derivative_of_the_replay_for_a_smooth_model():
    """With GELU the run is smooth, so removing a tiny share ``eps`` of a sample's weight in
    every round that drew it, divided by ``eps``, converges to the sweep's score: the adjoint
    is the exact derivative of the whole run (what separates it from the full removal is only
    the nonlinearity of the run, and with ReLU the kinks)."""
    traj = train(_cfg(activation="gelu"))
    sc = attribute_run(traj)
    pick = np.random.default_rng(2).choice(np.flatnonzero(sc.rounds_used > 1), 5,
                                           replace=False)
    eps = 1e-5
    fd = whole_run_ground_truth(traj, [(int(sc.node[i]), int(sc.position[i])) for i in pick],
                                share=eps) / eps
    np.testing.assert_allclose(sc.score[pick], fd, rtol=2e-3, atol=1e-3 * np.abs(fd).max())
