"""Your own model, data and loss: dice_influence.from_torch, the config path (model.kind
python, data npz/nodes, loss), their equivalence, errors, run-dir honesty and peers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from _naive import assert_gt_equals_naive_replay
from dice_influence import from_torch
from dice_influence.api import APIError
from dice_influence.config import ConfigError, load_config
from dice_influence.data import DataError
from dice_influence.gossip import node_losses
from dice_influence.influence import Event, estimate, ground_truth
from dice_influence.models import ModelError, make_loss
from dice_influence.problem import build_problem
from dice_influence.rundir import write_run_dir
from dice_influence.trajectory import Trajectory

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples.own_models import Regressor  # noqa: E402

FACTORY = "examples.own_models:make_regressor"


class TinyLM(nn.Module):
    """A causal one-layer model on token ids: logits (B, L, V)."""

    def __init__(self, vocab: int = 12, dim: int = 8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x):
        h = torch.cumsum(self.emb(x), dim=1)  # causal: position l sees tokens 0..l
        return self.head(torch.tanh(self.norm(h)))


def regression_arrays(n: int = 240, dim: int = 5, seed: int = 0):
    g = np.random.default_rng(seed)
    x = g.normal(size=(n, dim))
    y = x @ g.normal(size=dim) + 0.1 * g.normal(size=n)
    return x[:192], y[:192], x[192:], y[192:]


@pytest.fixture
def in_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # model.factory is imported from the working directory


def reg_config(data: dict, n: int = 4, **train) -> object:
    return load_config({
        "seed": 3, "data": data, "topology": {"name": "ring", "n": n},
        "model": {"kind": "python", "factory": FACTORY, "kwargs": {"in_dim": 5, "hidden": 8}},
        "loss": {"kind": "mse"},
        "train": {"rounds": 6, "batch_size": 4, "lr": 0.05, "dtype": "float64",
                  "checkpoint_every": 2, "eval_every": 3, **train},
    })


# ------------------------------------------------------------------------------ losses


def test_builtin_losses_are_per_sample():
    ce, acc, _ = make_loss("cross_entropy")
    out, y = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    assert ce(out, y).shape == (5,) and 0 <= float(acc(out, y)) <= 1
    mse, acc, _ = make_loss("mse")
    assert acc is None
    assert torch.allclose(mse(torch.ones(4, 1), torch.zeros(4)), torch.ones(4))
    assert torch.allclose(mse(torch.ones(4, 2), torch.zeros(4, 2)), torch.ones(4))
    tok, tacc, _ = make_loss("token_cross_entropy", ignore_index=-1)
    logits = torch.randn(2, 3, 7)
    tgt = torch.tensor([[1, 2, -1], [3, -1, -1]])
    ref0 = nn.functional.cross_entropy(logits[0, :2], tgt[0, :2])
    ref1 = nn.functional.cross_entropy(logits[1, :1], tgt[1, :1])
    assert torch.allclose(tok(logits, tgt), torch.stack([ref0, ref1]))
    with pytest.raises(ModelError, match="unknown loss 'l1'"):
        make_loss("l1")


# ------------------------------------------------------------------------------ API == config


def test_api_equals_config_path_bit_for_bit(tmp_path, in_root):
    xtr, ytr, xte, yte = regression_arrays()
    np.savez(tmp_path / "reg.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    cfg = reg_config({"dataset": "npz", "path": str(tmp_path / "reg.npz")})
    via_cfg = Trajectory.start(build_problem(cfg)).run(6)
    p = from_torch(Regressor(5, 8), (torch.from_numpy(xtr), torch.from_numpy(ytr)),
                   test=(torch.from_numpy(xte), torch.from_numpy(yte)), topology="ring", n=4,
                   partition="iid", loss="mse", seed=3, rounds=6, batch_size=4, lr=0.05,
                   dtype="float64")
    via_api = Trajectory.start(p).run(6)
    assert torch.equal(via_cfg.theta, via_api.theta)
    assert via_cfg.history[-1]["loss"] == via_api.history[-1]["loss"]
    assert "acc" not in via_api.final_metrics  # mse: losses only, never NaN placeholders

    # one file per node (data.dataset nodes) == the API with one (x, y) per node
    parts = [np.flatnonzero(np.arange(192) % 4 == k) for k in range(4)]
    folder = tmp_path / "nodes"
    folder.mkdir()
    for k, idx in enumerate(parts):
        np.savez(folder / f"node_{k}.npz", x=xtr[idx], y=ytr[idx])
    np.savez(folder / "test.npz", x=xte, y=yte)
    t_nodes = Trajectory.start(build_problem(reg_config({"dataset": "nodes",
                                                         "path": str(folder)}))).run(6)
    p2 = from_torch(Regressor(5, 8), [(torch.from_numpy(xtr[i]), torch.from_numpy(ytr[i]))
                                      for i in parts],
                    test=(torch.from_numpy(xte), torch.from_numpy(yte)), topology="ring",
                    loss="mse", seed=3, rounds=6, batch_size=4, lr=0.05, dtype="float64")
    assert torch.equal(t_nodes.theta, Trajectory.start(p2).run(6).theta)


# ------------------------------------------------------------------------------ DICE-GT exact


def test_gt_on_custom_models_equals_naive_replay():
    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in regression_arrays())
    p = from_torch(Regressor(5, 8), [(xtr[k::4], ytr[k::4]) for k in range(4)], test=(xte, yte),
                   topology="ring", loss="mse", rounds=8, batch_size=4, lr=0.05,
                   dtype="float64", seed=1)
    traj = Trajectory.start(p).run(8)
    assert_gt_equals_naive_replay(traj, [Event(node=1, round=3), Event(2, 3, samples=(0, 2))],
                                  3, 3)

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 12, (96, 6), generator=g)
    y = torch.roll(x, -1, 1)
    y[:, -1] = -100
    lm = from_torch(TinyLM(), (x[:80], y[:80]), test=(x[80:], y[80:]), topology="ring", n=4,
                    partition="iid", loss="token_cross_entropy", ignore_index=-100, rounds=6,
                    batch_size=4, lr=0.5, dtype="float64")
    tl = Trajectory.start(lm).run(6)
    assert 0 <= tl.final_metrics["mean_acc"] <= 1  # token accuracy
    assert_gt_equals_naive_replay(tl, [Event(node=0, round=2, samples=(1,))], 2, 2)
    est = estimate(tl, [Event(node=0, round=2, samples=(1,))], hops=2, readout="midpoint")
    gt = ground_truth(tl, [Event(node=0, round=2, samples=(1,))], hops=2)
    assert np.corrcoef(est.per_node[0].flatten(), gt.per_node[0].flatten())[0, 1] > 0.9


# ------------------------------------------------------------------------------ bad input


def _reg_nodes(n=4):
    xtr, ytr, xte, yte = (torch.from_numpy(a).float() for a in regression_arrays())
    return [(xtr[k::n], ytr[k::n]) for k in range(n)], (xte, yte)


def test_api_errors_name_the_argument_and_the_fix():
    nodes, test = _reg_nodes()
    kw = {"test": test, "topology": "ring", "loss": "mse", "batch_size": 4}
    with pytest.raises(APIError, match=r"nodes\[1\]: x has 48 samples but y has 47"):
        from_torch(Regressor(5, 8), [nodes[0], (nodes[1][0], nodes[1][1][:-1])], **kw)
    with pytest.raises(APIError, match=r"nodes\[2\]: holds no samples"):
        from_torch(Regressor(5, 8), [nodes[0], nodes[1], (nodes[2][0][:0], nodes[2][1][:0])],
                   **kw)
    with pytest.raises(APIError, match=r"partition\[1\]: node 1 gets no data"):
        from_torch(Regressor(5, 8), test, test=test, topology="ring", loss="mse",
                   partition=[[0, 1, 2, 3], []])
    with pytest.raises(APIError, match=r"loss: returned \(\) for a batch of 4 samples"):
        from_torch(Regressor(5, 8), nodes, test=test, topology="ring", batch_size=4,
                   loss=lambda out, y: ((out - y) ** 2).mean())
    with pytest.raises(APIError, match="targets"):  # float targets under cross-entropy
        from_torch(Regressor(5, 8, out=3), nodes, test=test, topology="ring", batch_size=4)
    with pytest.raises(APIError, match="model/targets.*shapes"):  # 2 outputs for 1 target
        from_torch(Regressor(5, 8, out=2), nodes, **kw)
    with pytest.raises(APIError, match="GroupNorm"):
        from_torch(nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), nodes,
                   **kw)
    with pytest.raises(APIError, match=r"nn.Dropout in train mode.*model.eval\(\)"):
        from_torch(nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 1)), nodes,
                   **kw)
    # dropout in eval mode is the identity: accepted
    from_torch(nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.Linear(4, 1)).eval(),
               nodes, **kw)

    class Rand(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 1)

        def forward(self, x):
            return (self.lin(x) + 0.1 * torch.randn_like(self.lin(x))).squeeze(-1)

    with pytest.raises(APIError, match="draws random numbers"):
        from_torch(Rand(), nodes, **kw)

    class Fixed32(nn.Module):  # a tensor created in forward with a fixed dtype
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1) + x @ torch.ones(5, dtype=torch.float32)

    with pytest.raises(APIError, match=r"mixes dtypes.*dtype=x.dtype"):
        from_torch(Fixed32(), nodes, dtype="float64", **kw)
    with pytest.raises(APIError, match="unknown setting bach_size"):
        from_torch(Regressor(5, 8), nodes, test=test, topology="ring", loss="mse", bach_size=4)
    with pytest.raises(APIError, match=r"topology: the mixing matrix has shape \(3, 3\)"):
        from_torch(Regressor(5, 8), nodes, test=test, topology=np.eye(3), loss="mse")


def test_config_errors_for_own_keys(tmp_path):
    with pytest.raises(ConfigError, match="model.kind=python needs model.factory"):
        load_config({"model": {"kind": "python"}})
    with pytest.raises(ConfigError, match="must look like 'pkg.module:make_model'"):
        load_config({"model": {"kind": "python", "factory": "os.system('x')"}})
    with pytest.raises(ConfigError, match="token_cross_entropy needs a sequence model"):
        load_config({"loss": {"kind": "token_cross_entropy"}})
    with pytest.raises(ConfigError, match="data.dataset=npz needs data.path"):
        load_config({"data": {"dataset": "npz"}})
    with pytest.raises(ConfigError, match="data.partition does not apply"):
        load_config({"data": {"dataset": "nodes", "path": "x", "partition": "dirichlet"}})
    with pytest.raises(ConfigError, match="from_torch"):
        load_config({"model": {"kind": "api"}})
    bad = tmp_path / "obj.npz"
    np.savez(bad, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros(1), y_test=np.zeros(1))
    cfg = load_config({"data": {"dataset": "npz", "path": str(bad)}})
    with pytest.raises(DataError, match="needs pickle"):
        build_problem(cfg)
    with pytest.raises(DataError, match=r"missing node_0.npz, node_1.npz, node_2.npz for topology.n=3"):
        build_problem(load_config({"data": {"dataset": "nodes", "path": str(tmp_path)},
                                   "topology": {"name": "ring", "n": 3}}))
    with pytest.raises(ModelError, match="no module 'no_such_pkg'"):
        build_problem(load_config({"model": {"kind": "python",
                                             "factory": "no_such_pkg.mod:make"}}))


def test_factory_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        "from torch import nn\n"
        "def drop(d=5):\n"
        "    return nn.Sequential(nn.Linear(d, 4), nn.Dropout(0.2), nn.Linear(4, 1), "
        "nn.Flatten(0))\n"
        "def fine(d=5):\n"
        "    return drop(d).eval()\n")
    xtr, ytr, xte, yte = regression_arrays()
    np.savez(tmp_path / "d.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    monkeypatch.chdir(tmp_path)
    raw = reg_config({"dataset": "npz", "path": "d.npz"}).model_dump()
    raw["model"] = {"kind": "python", "factory": "mymodels:drop"}
    with pytest.raises(APIError, match=r"Dropout in train mode.*return model.eval\(\)"):
        build_problem(load_config(raw))
    raw["model"]["factory"] = "mymodels:fine"
    p = build_problem(load_config(raw))
    assert p.d == 5 * 4 + 4 + 4 + 1
    assert "mymodels" not in sys.modules or Path(sys.modules["mymodels"].__file__).parent == \
        tmp_path
    raw["model"]["factory"] = "mymodels:nothing"
    with pytest.raises(ModelError, match="has no function 'nothing'"):
        build_problem(load_config(raw))


# ------------------------------------------------------------------------------ run dirs


def test_run_dir_says_what_ran(tmp_path, in_root):
    nodes, test = _reg_nodes()
    p = from_torch(Regressor(5, 8), nodes, test=test, topology="ring", loss="mse",
                   batch_size=4, rounds=4)
    traj = Trajectory.start(p).run(4)
    out = write_run_dir(traj, tmp_path / "api")
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == {"kind": "api", "factory": None, "kwargs": {},
                            "description": "Regressor, 73 parameters"}
    assert cfg["data"]["dataset"] == "api" and "4 nodes, 48 samples each" in cfg["data"]["source"]
    readme = (out / "README.md").read_text()
    assert "digits" not in readme and "mlp" not in readme
    assert "Regressor" in readme and "73 parameters" in readme and "`mse`" in readme
    import json

    run = json.loads((out / "metrics.json").read_text())["run"]
    assert run["model"]["class"] == "Regressor" and run["data"]["x"] == [5]
    with pytest.raises(ConfigError, match=r"from_torch.*problem="):
        Trajectory.load(out)
    again = Trajectory.load(out, problem=p)
    assert torch.equal(again.theta, traj.theta)
    other = from_torch(Regressor(5, 8), [(x + 1, y) for x, y in nodes], test=test,
                       topology="ring", loss="mse", batch_size=4, rounds=4)
    with pytest.raises(ConfigError, match="data"):
        Trajectory.load(out, problem=other)  # other tensors: another run

    # the config path: the factory and its module's hash are recorded
    xtr, ytr, xte, yte = regression_arrays()
    np.savez(tmp_path / "reg.npz", x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    t2 = Trajectory.start(build_problem(reg_config({"dataset": "npz",
                                                    "path": str(tmp_path / "reg.npz")}))).run(6)
    out2 = write_run_dir(t2, tmp_path / "cfg")
    run2 = json.loads((out2 / "metrics.json").read_text())["run"]
    assert run2["model"]["factory"] == FACTORY
    assert run2["model"]["module_file"].endswith("own_models.py")
    assert len(run2["model"]["module_sha256"]) == 64
    assert "mlp" not in (out2 / "config.yaml").read_text()
    assert torch.equal(Trajectory.load(out2).theta, t2.theta)


def test_to_dataframe_names_the_extra(monkeypatch):
    nodes, test = _reg_nodes()
    p = from_torch(Regressor(5, 8), nodes, test=test, topology="ring", loss="mse", batch_size=4)
    res = ground_truth(Trajectory.start(p).run(3), [Event(node=0, round=1)], hops=1)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"dice-influence\[pandas\]"):
        res.to_dataframe()


# ------------------------------------------------------------------------------ peers


def test_peer_reads_only_its_node_file(tmp_path, in_root):
    from dice_influence.distributed import build_local

    xtr, ytr, xte, yte = regression_arrays()
    folder = tmp_path / "nodes"
    folder.mkdir()
    for k in range(4):
        np.savez(folder / f"node_{k}.npz", x=xtr[k::4][: 40 + 2 * k], y=ytr[k::4][: 40 + 2 * k])
    np.savez(folder / "test.npz", x=xte, y=yte)
    cfg = reg_config({"dataset": "nodes", "path": str(folder)})
    p = build_problem(cfg)
    for k in (0, 3):
        for j in range(4):  # the others' files are unreadable: never opened
            if j != k:
                (folder / f"node_{j}.npz").rename(folder / f"hide_{j}")
                (folder / f"node_{j}.npz").write_bytes(b"not an npz")
        lp = build_local(cfg, k)
        size = int(p.node_data.sizes[k])
        assert torch.equal(lp.x, p.node_data.x[k, :size])
        assert torch.equal(lp.y, p.node_data.y[k, :size])
        for t in range(5):
            assert torch.equal(lp.batch(t)[1][0], p.batch(t)[1][k])
        for j in range(4):
            if j != k:
                (folder / f"hide_{j}").rename(folder / f"node_{j}.npz")


@pytest.mark.slow
def test_launch_custom_model_equals_simulator(tmp_path, in_root):
    from dice_influence.distributed import launch, simulate
    from dice_influence.simulator import train

    xtr, ytr, xte, yte = regression_arrays()
    folder = tmp_path / "nodes"
    folder.mkdir()
    for k in range(4):
        np.savez(folder / f"node_{k}.npz", x=xtr[k::4], y=ytr[k::4])
    np.savez(folder / "test.npz", x=xte, y=yte)
    raw = reg_config({"dataset": "nodes", "path": str(folder)}, dtype="float32").model_dump()
    raw["experiment"] = {"distributed": {"timeout_s": 20}}
    cfg = load_config(raw)
    res = launch(cfg, 4, tmp_path / "p2p", wall_timeout=150)
    assert res.ok, res.errors
    sim = train(cfg).theta
    assert torch.allclose(res.theta, sim, atol=1e-5, rtol=0)
    ref = simulate(cfg)
    assert np.allclose(res.P, ref.P, atol=1e-5, rtol=0) and np.abs(ref.P).max() > 1e-6


def test_evaluation_without_accuracy_is_nan_free():
    nodes, test = _reg_nodes()
    p = from_torch(Regressor(5, 8), nodes, test=test, topology="ring", loss="mse", batch_size=4)
    ev = p.evaluate(p.init_theta())
    assert set(ev) == {"loss", "mean_loss", "consensus_distance", "avg_model_loss"}
    assert node_losses(p.fm, p.init_theta(), p.val_x, p.val_y)[1] is None


def test_datasets_per_node_equal_tensors():
    from torch.utils.data import TensorDataset

    nodes, test = _reg_nodes()
    kw = {"test": test, "topology": {"name": "ring"}, "loss": "mse", "batch_size": 4,
          "rounds": 3}
    a = Trajectory.start(from_torch(Regressor(5, 8), nodes, **kw)).run(3)
    b = Trajectory.start(from_torch(lambda: Regressor(5, 8),
                                    [TensorDataset(x, y) for x, y in nodes], **kw)).run(3)
    assert torch.equal(a.theta, b.theta)
