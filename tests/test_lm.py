"""The causal transformer LM and the fortunes text reader (docs/language-model.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

from _naive import assert_gt_equals_naive_replay
from dice_influence import from_torch
from dice_influence.config import load_config
from dice_influence.data.errors import DataError
from dice_influence.data.text import (
    DEFAULT_SOURCES,
    ENGLISH_PRETRAIN_SOURCES,
    ENGLISH_SOURCES,
    FORTUNES_DIR,
    PRETRAIN_SOURCES,
    build_corpus,
    decode,
    encode,
    main,
    parse_fortunes,
    windows,
    write_nodes,
)
from dice_influence.influence import Event, estimate, ground_truth
from dice_influence.lm import CausalLM, LayerNorm, count_parameters, make_model
from dice_influence.models import FunctionalModel
from dice_influence.simulator import train
from dice_influence.trajectory import Trajectory

# ----------------------------------------------------------------------------------- the model


def _tiny(dtype=torch.float64) -> FunctionalModel:
    return FunctionalModel(make_model(vocab=32, context=12, dim=16, layers=2, heads=2).to(dtype))


def _loss(fm: FunctionalModel):
    def f(flat, xb, yb):
        logits = fm.forward(flat, xb)
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 yb.reshape(-1))
    return f


def test_lm_shapes_parameters_only_and_budget():
    m = make_model()
    assert not list(m.buffers())
    assert count_parameters(m) <= 1_000_000
    assert count_parameters(make_model(dim=128, layers=4)) <= 1_000_000
    x = torch.randint(0, 256, (3, 64))
    assert m(x).shape == (3, 64, 256)
    assert m(x[:, :10]).shape == (3, 10, 256)


def test_lm_is_causal():
    m = make_model(vocab=32, context=12, dim=16, heads=2).double()
    x = torch.randint(0, 32, (2, 12))
    x2 = x.clone()
    x2[:, 7:] = (x2[:, 7:] + 5) % 32  # change only the future of position 6
    a, b = m(x), m(x2)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_lm_float_token_ids_give_the_same_logits():
    m = make_model(vocab=32, context=12, dim=16, heads=2).double()
    x = torch.randint(0, 32, (2, 12))
    assert torch.equal(m(x), m(x.double()))


def test_layernorm_matches_torch():
    ln, ref = LayerNorm(16).double(), torch.nn.LayerNorm(16).double()
    with torch.no_grad():
        ln.weight.normal_()
        ln.bias.normal_()
        ref.weight.copy_(ln.weight)
        ref.bias.copy_(ln.bias)
    h = torch.randn(3, 5, 16, dtype=torch.float64)
    assert torch.allclose(ln(h), ref(h), atol=1e-12)


def test_lm_vmap_grad_jvp_vjp_agree_with_per_node_and_finite_differences():
    """DICE-E pushes a tangent through the nodes' vmapped batch gradients (forward over
    reverse); that must equal each node's own Hessian-vector product (it does not with
    ``F.layer_norm``'s learned weight in torch 2.13, hence lm.LayerNorm)."""
    fm = _tiny()
    f = _loss(fm)
    theta = fm.init_params(3, 0, same_init=False, dtype=torch.float64)
    x = torch.randint(0, 32, (3, 4, 12))
    y = torch.randint(0, 32, (3, 4, 12))
    v = torch.randn_like(theta)

    def grads(th):
        return vmap(grad(f))(th, x, y)

    _, hv = jvp(grads, (theta,), (v,))
    per_node = torch.stack([jvp(lambda t, k=k: grad(f)(t, x[k], y[k]), (theta[k],), (v[k],))[1]
                            for k in range(3)])
    assert torch.allclose(hv, per_node, rtol=1e-9, atol=1e-11)
    _, pull = vjp(grads, theta)
    assert torch.allclose(pull(v)[0], hv, rtol=1e-8, atol=1e-10)  # the Hessian is symmetric
    eps = 1e-6
    fd = (grads(theta + eps * v) - grads(theta - eps * v)) / (2 * eps)
    assert torch.allclose(hv, fd, rtol=1e-5, atol=1e-6)


def test_lm_init_is_seeded_and_covers_every_parameter():
    fm = _tiny()
    a = fm.init_params(2, 3, same_init=False, dtype=torch.float64)
    b = fm.init_params(2, 3, same_init=False, dtype=torch.float64)
    c = fm.init_params(2, 4, same_init=False, dtype=torch.float64)
    assert torch.equal(a, b)
    for s in fm.slots:  # every parameter is redrawn (or reset) by init_params
        cols = slice(s.offset, s.offset + s.numel)
        if "ln" not in s.name and not s.name.endswith(".bias"):
            assert not torch.equal(a[0, cols], c[0, cols]), s.name


def test_make_model_rejects_bad_sizes():
    with pytest.raises(ValueError, match="dim=0"):
        make_model(dim=0)
    with pytest.raises(ValueError, match="multiple of heads"):
        make_model(dim=30, heads=4)
    assert isinstance(make_model(), CausalLM)


# ----------------------------------------------------------------------------------- the reader


def test_tokenizer_round_trip_bytes():
    text = "Grüße, señor! ¿Qué tal? perché"
    ids = encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text


def test_parse_fortunes_splits_on_percent_lines():
    raw = "First  one\n\tby me\n%\nSecond\n%\n%\n  \n%\nThird\n"
    assert parse_fortunes(raw) == ["First one by me", "Second", "Third"]


def test_windows_next_token_targets():
    toks = np.arange(20, dtype=np.uint8)
    w = windows(toks, 6)
    assert w.shape == (3, 7)
    assert w[1, 0] == 6 and w[1, -1] == 12  # stride = context: every token a target once


def _texts(n: int = 4) -> tuple[list[str], list[str]]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(rng.choice(words, 400)) + f" source {k}" for k in range(n)]
    return [f"s{k}" for k in range(n)], texts


def test_build_corpus_split_shapes_and_determinism():
    names, texts = _texts()
    c = build_corpus(names, texts=texts, context=16, train_sequences=20, test_sequences=3)
    assert c.n == 4
    for x, y in c.nodes:
        assert x.shape == y.shape == (20, 16) and x.dtype == np.int64
        assert np.array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one token
    assert c.test[0].shape == (12, 16)
    d = build_corpus(names, texts=texts, context=16, train_sequences=20, test_sequences=3)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(c.nodes, d.nodes, strict=True))
    # held-out sequences never appear in training
    train = {tuple(r) for x, _ in c.nodes for r in x}
    assert not any(tuple(r) in train for r in c.test[0])


def test_scramble_shuffles_tokens_within_sequences_of_one_node_only():
    names, texts = _texts()
    kw = dict(texts=texts, context=16, train_sequences=20, test_sequences=3)
    clean = build_corpus(names, **kw)
    c = build_corpus(names, **kw, scramble_node=2, scramble_fraction=0.5, seed=0)
    mask = c.scrambled_mask(2)
    assert mask.sum() == 10
    for k in (0, 1, 3):
        assert np.array_equal(c.nodes[k][0], clean.nodes[k][0])
    x, y = c.nodes[2]
    x0, y0 = clean.nodes[2]
    assert np.array_equal(x[~mask], x0[~mask])
    for i in np.flatnonzero(mask):  # same multiset of the window's bytes, another order
        full, full0 = np.r_[x[i], y[i, -1]], np.r_[x0[i], y0[i, -1]]
        assert np.array_equal(np.sort(full), np.sort(full0))
        assert not np.array_equal(full, full0)
        assert np.array_equal(x[i, 1:], y[i, :-1])
    assert np.array_equal(c.test[0], clean.test[0])  # the test set is never scrambled


def test_build_corpus_errors_name_the_value():
    names, texts = _texts()
    with pytest.raises(DataError, match="scramble_node=9"):
        build_corpus(names, texts=texts, context=16, train_sequences=5, scramble_node=9)
    with pytest.raises(DataError, match="fewer than train_sequences"):
        build_corpus(names, texts=texts, context=16, train_sequences=10_000)
    with pytest.raises(DataError, match="apt-get install fortunes"):
        build_corpus(["nope"], root="/nonexistent")


def test_write_nodes_layout(tmp_path: Path):
    names, texts = _texts(3)
    c = build_corpus(names, texts=texts, context=16, train_sequences=8, test_sequences=2,
                     scramble_node=1)
    out = write_nodes(c, tmp_path / "lm")
    for k in range(3):
        with np.load(out / f"node_{k}.npz", allow_pickle=False) as z:
            assert set(z.files) == {"x", "y"}
            assert np.array_equal(z["x"], c.nodes[k][0])
    with np.load(out / "test.npz", allow_pickle=False) as z:
        assert z["x"].shape == (6, 16)
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["scrambled"] == {"1": list(range(8))} and meta["sources"] == names


def test_pretrain_windows_are_clean_held_out_and_leave_the_split_alone(tmp_path: Path):
    names, texts = _texts(3)
    kw = dict(texts=texts, context=16, train_sequences=8, test_sequences=2, scramble_node=1)
    c0 = build_corpus(names, **kw)
    c = build_corpus(names, **kw, pretrain_sequences=5)
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(c.nodes, c0.nodes, strict=True))
    assert np.array_equal(c.test[0], c0.test[0]) and not c0.pretrain
    seen = {tuple(r) for x, _ in c.nodes for r in x} | {tuple(r) for r in c.test[0]}
    for x, y in c.pretrain:
        assert x.shape == (5, 16) and np.array_equal(x[:, 1:], y[:, :-1])
        assert not any(tuple(r) in seen for r in x)
    # the scrambled node's pretraining windows are text in order (never scrambled)
    x, y = c.pretrain[1]
    src = encode(texts[1] + "\n").tobytes()
    assert all(bytes(np.r_[x[i], y[i, -1]].astype(np.uint8)) in src for i in range(len(x)))
    out = write_nodes(c, tmp_path / "lm")
    with np.load(out / "pretrain" / "node_2.npz", allow_pickle=False) as z:
        assert np.array_equal(z["x"], c.pretrain[2][0])
    with np.load(out / "pretrain" / "test.npz", allow_pickle=False) as z:
        assert np.array_equal(z["x"], c.test[0])
    with pytest.raises(DataError, match="pretrain_sources"):
        build_corpus(names, **kw, pretrain_sequences=5, pretrain_sources=["wisdom"])


@pytest.mark.skipif(not Path(FORTUNES_DIR, DEFAULT_SOURCES[-1]).is_file(),
                    reason="the Debian fortunes packages are not installed (apt-get install "
                    "fortunes fortunes-de fortunes-es fortunes-it, as ./quickstart.sh does)")
def test_real_fortunes_corpus():
    c = build_corpus(scramble_node=3, seed=0)
    assert c.n == 16 and all(x.shape == (128, 64) for x, _ in c.nodes)
    assert c.test[0].shape == (64, 64)
    assert len(c.files) == 16 and all(len(f["sha256"]) == 64 for f in c.files)
    text = [decode(x.reshape(-1)) for x, _ in c.nodes]
    assert all(" der " in t or " die " in t for t in text[4:8])  # German files
    assert all(" que " in t or " de " in t for t in text[8:12])  # Spanish files
    assert c.scrambled_mask(3).all()


def test_named_source_sets_are_disjoint_and_english_is_one_language():
    assert len(ENGLISH_SOURCES) == len(ENGLISH_PRETRAIN_SOURCES) == 16
    assert not set(ENGLISH_SOURCES) & set(ENGLISH_PRETRAIN_SOURCES)  # pretraining sees none
    assert not set(DEFAULT_SOURCES) & set(PRETRAIN_SOURCES)
    assert not any("/" in s for s in ENGLISH_SOURCES + ENGLISH_PRETRAIN_SOURCES)  # English


@pytest.mark.skipif(not Path(FORTUNES_DIR, ENGLISH_SOURCES[0]).is_file(),
                    reason="the Debian fortunes package is not installed (apt-get install "
                    "fortunes, as ./quickstart.sh does)")
def test_cli_named_english_set_writes_the_configs_corpus(tmp_path: Path):
    out = tmp_path / "en"
    assert main([str(out), "--sources", "english", "--scramble-node", "3",
                 "--test-sequences", "8", "--pretrain-sequences", "256",
                 "--pretrain-sources", "english"]) == 0  # the settings of lm-english.yaml
    meta = json.loads((out / "corpus.json").read_text())
    assert meta["sources"] == list(ENGLISH_SOURCES) and meta["scrambled"]["3"] == list(range(128))
    assert meta["settings"]["pretrain_sources"] == list(ENGLISH_PRETRAIN_SOURCES)
    with np.load(out / "test.npz", allow_pickle=False) as z:
        assert z["x"].shape == (128, 64)
    with np.load(out / "pretrain" / "node_15.npz", allow_pickle=False) as z:
        assert z["x"].shape == (256, 64)
    with np.load(out / "node_0.npz", allow_pickle=False) as z:
        assert " the " in decode(z["x"].reshape(-1))
    # a comma-separated list still names files one by one
    assert main([str(tmp_path / "two"), "--sources", "art,law", "--train-sequences", "4"]) == 0
    assert json.loads((tmp_path / "two" / "corpus.json").read_text())["sources"] == ["art", "law"]


# --------------------------------------------------------------------- DICE on the LM, exact


LM_KW = {"vocab": 256, "context": 12, "dim": 16, "layers": 2, "heads": 2}


def _lm_config(folder: Path) -> dict:
    return {"seed": 0, "data": {"dataset": "nodes", "path": str(folder)},
            "model": {"kind": "python", "factory": "dice_influence.lm:make_model",
                      "kwargs": LM_KW},
            "loss": {"kind": "token_cross_entropy"}, "topology": {"name": "ring", "n": 4},
            "train": {"rounds": 6, "batch_size": 4, "lr": 0.5, "dtype": "float64"}}


def test_gt_on_the_lm_equals_naive_replay_and_e_follows(tmp_path: Path):
    """The config path (nodes folder written by the reader, model.kind python, token loss):
    DICE-GT equals a per-node replay by hand to 1e-10 (float64); one-sequence DICE-E
    (midpoint) follows it; from_torch on the same tensors gives the same bits."""
    names, texts = _texts(4)
    c = build_corpus(names, texts=texts, context=12, train_sequences=16, test_sequences=2,
                     scramble_node=1)
    write_nodes(c, tmp_path / "d")
    traj = train(load_config(_lm_config(tmp_path / "d")))
    events = [Event(node=1, round=2), Event(node=0, round=2, samples=(1,)),
              Event(node=3, round=2, samples=(0, 3))]
    assert_gt_equals_naive_replay(traj, events, 2, 3)
    one = [Event(node=k, round=2, samples=(i,)) for k in range(4) for i in range(4)]
    gt = ground_truth(traj, one, hops=3)
    est = estimate(traj, one, hops=3, readout="midpoint")
    assert np.corrcoef(est.values(3).numpy(), gt.values(3).numpy())[0, 1] > 0.99
    # chunked one event at a time (bounded memory, experiment.alignment.batch_events):
    # the same bits as all 16 events of the round in one batched call
    gt1 = ground_truth(traj, one, hops=3, batch_events=1)
    est1 = estimate(traj, one, hops=3, readout="midpoint", batch_events=3)
    assert torch.equal(gt1.per_node, gt.per_node) and torch.equal(est1.per_node, est.per_node)

    nodes = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in c.nodes]
    p = from_torch(make_model(**LM_KW).double(), nodes,
                   test=tuple(torch.from_numpy(a) for a in c.test), topology="ring",
                   loss="token_cross_entropy", rounds=6, batch_size=4, lr=0.5,
                   dtype="float64", seed=0)
    assert torch.equal(Trajectory.start(p).run(6).theta, traj.theta)


def test_bench_train_times_a_config_of_ones_own(tmp_path: Path):
    """``dice bench train --config``: the config's model, data and loss, n from the bench, no
    observers (the floor is the same nodes' batch gradients)."""
    import yaml

    from dice_influence.bench.train import _bench_config, _config_setting

    names, texts = _texts(4)
    write_nodes(build_corpus(names, texts=texts, context=12, train_sequences=8,
                             test_sequences=2), tmp_path / "d")
    raw = _lm_config(tmp_path / "d")
    raw["observers"] = [{"kind": "contribution"}]
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = _bench_config(4, None, str(path))
    assert cfg.topology.n == 4 and cfg.observers == [] and cfg.train.rounds == 0
    assert cfg.model.factory == "dice_influence.lm:make_model"
    s = _config_setting(path)
    assert "token_cross_entropy" in s and "dice_influence.lm:make_model" in s and "batch 4" in s


def test_model_init_starts_every_node_from_the_file(tmp_path: Path):
    """``model.init``: every node starts from the given vector (the pretrained shared model of
    configs/lm-fortunes.yaml), the file is part of the run identity, and the exporter writes a
    saved run's network average; bad files get one error naming model.init."""
    from dice_influence.config import ConfigError
    from dice_influence.init_params import export_init
    from dice_influence.rundir import write_run_dir

    names, texts = _texts(4)
    write_nodes(build_corpus(names, texts=texts, context=12, train_sequences=8,
                             test_sequences=2), tmp_path / "d")
    raw = _lm_config(tmp_path / "d")
    raw["train"]["rounds"] = 2
    base = train(load_config(raw))
    write_run_dir(base, tmp_path / "run")
    vec = export_init(tmp_path / "run", tmp_path / "init.npy")
    assert np.allclose(vec, base.theta.mean(0).numpy(), rtol=0, atol=1e-15)
    raw["model"]["init"] = str(tmp_path / "init.npy")
    traj = train(load_config(raw))
    th0 = traj.params_at(0)[0]
    assert torch.equal(th0, torch.from_numpy(vec).expand(4, -1))
    assert any(f["path"].endswith("init.npy") for f in traj.problem.dataset.files)
    np.save(tmp_path / "bad.npy", vec[:-1])
    raw["model"]["init"] = str(tmp_path / "bad.npy")
    with pytest.raises(ConfigError, match="model.init=.*bad.npy.*parameters"):
        train(load_config(raw))
    raw["model"]["init"] = str(tmp_path / "missing.npy")
    with pytest.raises(ConfigError, match="model.init=.*not found"):
        train(load_config(raw))
