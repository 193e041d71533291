"""The cascade experiment: per-node per-hop values of one event, decay with hops, power
asymmetry, the concentric drawing, and the command on a tiny config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from dice_influence.cli import app
from dice_influence.experiments.cascade import hubs_matrix
from dice_influence.report.cascade import concentric_layout, hop_distances, plot_cascade
from dice_influence.topology import describe, mixing_matrix


def test_concentric_layout_puts_each_node_on_its_hop_circle():
    W = mixing_matrix("ring", 8)
    d = hop_distances(W, 2)
    assert d.tolist() == [2, 1, 0, 1, 2, 3, 4, 3]
    pos = concentric_layout(W, d)
    assert np.allclose(np.linalg.norm(pos, axis=1), d)


def test_hubs_graph_is_connected_with_unequal_out_weights():
    W = hubs_matrix(16, 3, 1.2, seed=0)
    info = describe(W)
    assert info["strongly_connected"] and np.allclose(W.sum(1), 1.0)
    ow = np.array(info["out_weight"])
    assert ow.max() > 2.5 * ow.min()


def test_draw_cascade_writes_a_png(tmp_path):
    W = mixing_matrix("torus", 9)
    V = np.random.default_rng(0).normal(size=(4, 9))
    plot_cascade(W, V, 4, tmp_path / "c.png", title="test")
    assert (tmp_path / "c.png").stat().st_size > 1000


def tiny(tmp_path, **exp):
    raw = {
        "seed": 0,
        "data": {"dataset": "digits", "samples_per_node": 40, "validation_samples": 100},
        "topology": {"name": "ring", "n": 8},
        "model": {"name": "mlp", "hidden": [16]},
        "train": {"rounds": 8, "batch_size": 8, "lr": 0.1, "dtype": "float64"},
        "experiment": {"graphs": [{"name": "ring"}, {"name": "star"}],
                       "asymmetric": [{"name": "star"}, {"name": "hubs", "degree": 2}],
                       "warmup": 3, "event_rounds": 1, "hops": 4,
                       "picture": {"graph": "ring", "node": 1}, **exp},
    }
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cascade_experiment_on_a_tiny_config(tmp_path):
    run = tmp_path / "run[red]"  # a path rich could read as markup is printed as it is
    res = CliRunner().invoke(app, ["experiment", "cascade", str(tiny(tmp_path)), "--out",
                                   str(run), "-q"])
    assert res.exit_code == 0, res.output
    assert "run[red]" in res.output
    m = json.loads((run / "metrics.json").read_text())
    assert m["kind"] == "cascade"
    page = (run / "report.html").read_text()  # the run's report
    assert "data:image/png;base64" in page and "http://" not in page
    c = m["cascade"]
    assert c["graph"] == "ring" and c["source"] == 1 and c["axes"] == ["hop", "node"]
    V = np.array(c["per_node"])
    assert V.shape == (5, 8)
    d = np.array(c["hop_distance"])
    for s in range(1, 5):  # nothing reaches a node before the cascade does
        assert np.all(V[s][d > s] == 0.0) and np.all(V[s][(d >= 1) & (d <= s)] != 0.0)
    per_hop = [float(np.sum(V[s][d == s]) / 8) for s in range(1, 5)]
    assert np.allclose(c["per_hop"], per_hop, rtol=1e-6, atol=1e-15)
    ring = m["decay"]["ring"]["per_node_abs"]
    assert ring[0] > ring[1] > ring[2] > ring[3] > 0  # decays with hops on a ring
    assert m["decay"]["star"]["hops_reached"] == 2
    for g in ("star", "hubs"):
        rho = m["asymmetry_spearman"][g]["mean"]
        assert rho is None or -1.0 <= rho <= 1.0
    for f in ("cascade.png", "decay.png", "asymmetry.png", "cascade.csv", "decay.csv",
              "asymmetry.csv"):
        assert (run / f).is_file()


@pytest.mark.parametrize("exp,needle", [
    ({"hops": 9}, "train.rounds=8 is too short"),
    ({"picture": {"graph": "torus"}}, "picture.graph='torus' is none of the graphs"),
    ({"graphs": [{"name": "ringg"}]}, "experiment graph 'ringg'"),
])
def test_cascade_settings_are_checked(tmp_path, exp, needle):
    res = CliRunner().invoke(app, ["experiment", "cascade", str(tiny(tmp_path, **exp)),
                                   "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and needle in res.output, res.output
