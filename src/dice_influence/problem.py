"""What defines a run: data on every node, the mixing schedule, the batch schedule, the model
and the optimizer (:class:`Problem`), built from a validated config by :func:`build_problem`.

Any round of a run can be recomputed exactly from its :class:`Problem` (docs/method.md §2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import data as D
from . import topology as T
from .config import ConfigError, RunConfig
from .gossip import Mixer, Optimizer, functional_step, loss_grads, lr_at, node_losses
from .loop import RoundView
from .models import FunctionalModel, build_model


@dataclass
class Problem:
    """Everything that defines a run, so that any round can be recomputed exactly.

    ``theta`` matrices are ``(n_nodes, d)``; ``W(t)[k, j]`` is the weight receiver ``k`` puts on
    sender ``j`` at round ``t``; batches are positions into each node's local data.
    """

    cfg: RunConfig
    fm: FunctionalModel
    dataset: D.Dataset
    node_data: D.NodeData
    batches: D.BatchSchedule
    schedule: T.Schedule
    opt: Optimizer
    val_x: torch.Tensor
    val_y: torch.Tensor
    node_test: D.NodeData | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    transforms: tuple[Any, ...] = ()  # update-level behaviours (attacks): part of the round
    aggregator: Any = None  # None: the W^t matmul; else a robust rule (part of the round)
    _mixers: dict[int, Mixer] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n(self) -> int:
        return self.node_data.n_nodes

    @property
    def d(self) -> int:
        return self.fm.dim

    def W(self, t: int) -> np.ndarray:
        return self.schedule.W(t)

    def mixer(self, t: int) -> Mixer:
        """The gossip operator of round ``t`` (cached; one for a static graph)."""
        key = 0 if self.schedule.is_static else t
        m = self._mixers.get(key)
        if m is None:
            if len(self._mixers) > 256:
                self._mixers.clear()
            m = self._mixers[key] = Mixer(self.schedule.W(key), dtype=self.dtype,
                                          device=self.device)
        return m

    def lr(self, t: int) -> float:
        return run_lr(self.cfg, t)

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``t``'s batches of all nodes: ``x`` (n, B, *input_shape), ``y`` (n, B)."""
        return D.gather_batch(self.node_data, self.batches.indices(t).to(self.device))

    def init_theta(self) -> torch.Tensor:
        if self.cfg.model.init:  # a given start (dice_influence.init_params), every node alike
            from ._init_load import load_init

            v = load_init(self.cfg.model.init, self.d, self.dtype).to(self.device)
            return v.expand(self.n, -1).clone()
        return self.fm.init_params(
            self.n, self.cfg.seed, same_init=self.cfg.train.same_init, dtype=self.dtype
        ).to(self.device)

    def test_set(self, per_node: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The test set ``z'``: the shared validation set, or each node's own split."""
        if per_node:
            if self.node_test is None:
                raise ValueError(
                    "per-node test sets need data.test_samples_per_node in the config"
                )
            return self.node_test.x, self.node_test.y
        return self.val_x, self.val_y

    # ------------------------------------------------------------------------- one round

    def local_step(
        self, theta: torch.Tensor, state: torch.Tensor | None, t: int,
        w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pure local step of every node (transforms included): returns ``θ^{t+½}`` and the new
        optimizer state. ``w`` (n, B): per-sample weights (docs/method.md §3 removals)."""
        x, y = self.batch(t)
        return functional_step(self.fm, self.opt, theta, state, x, y, self.lr(t), w=w, t=t,
                               transforms=self.transforms)

    def round(
        self, theta: torch.Tensor, state: torch.Tensor | None, t: int,
        w: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Pure round ``t``: ``Θ^{t+1} = W^t (Θ^t + U_t(Θ^t))`` and the new optimizer state."""
        half, new_state = self.local_step(theta, state, t, w)
        if self.aggregator is None:
            return self.mixer(t)(half), new_state
        ids = np.arange(self.n)
        view = RoundView(t, self.n, ids, ids, theta, half, self.W(t))
        return self.aggregator(view, self.W(t)), new_state

    def evaluate(self, theta: torch.Tensor) -> dict[str, object]:
        """Per-node test loss/accuracy on the shared test set, consensus distance
        (mean squared distance to the average model) and the averaged model's accuracy. A loss
        without accuracy (``mse``, a custom loss) gives the loss keys only (``acc``,
        ``mean_acc`` and ``avg_model_acc`` are absent, never NaN)."""
        with torch.no_grad():
            loss, acc = node_losses(self.fm, theta, self.val_x, self.val_y)
            mean = theta.mean(0, keepdim=True)
            cons = float(((theta - mean) ** 2).sum(1).mean())
            aloss, aacc = node_losses(self.fm, mean, self.val_x, self.val_y)
        out: dict[str, object] = {"loss": loss.tolist(), "mean_loss": float(loss.mean()),
                                  "consensus_distance": cons,
                                  "avg_model_loss": float(aloss[0])}
        if acc is not None and aacc is not None:
            out.update(acc=acc.tolist(), mean_acc=float(acc.mean()),
                       avg_model_acc=float(aacc[0]))
        return out

    def test_loss_grads(self, theta: torch.Tensor, per_node: bool = False):
        """Per-node test loss ``(n,)`` and gradient ``(n, d)`` on ``z'``."""
        x, y = self.test_set(per_node)
        return loss_grads(self.fm, theta, x, y)


def run_lr(cfg: RunConfig, t: int) -> float:
    """Learning rate of round ``t`` under ``cfg.train``'s schedule."""
    tc = cfg.train
    return lr_at(t, tc.lr, tc.lr_schedule, total=tc.rounds, step_size=tc.lr_step_size,
                 gamma=tc.lr_gamma)


def run_dtype(cfg: RunConfig) -> torch.dtype:
    return {"float32": torch.float32, "float64": torch.float64}[cfg.train.dtype]


def build_schedule(cfg: RunConfig) -> T.Schedule:
    """The mixing schedule of ``cfg`` (a pure function of the config and its seed)."""
    tc = cfg.topology
    if tc.matrix is not None:
        return T.StaticSchedule(T.from_matrix(np.array(tc.matrix, dtype=float)))
    kw = {k: v for k, v in (("p", tc.p), ("degree", tc.degree), ("k", tc.k)) if v is not None}
    return T.make_schedule(tc.name, tc.n, weights=tc.weights, seed=cfg.seed,
                           time_varying=tc.time_varying, **kw)


def build_partition(cfg: RunConfig, ds: D.Dataset) -> list[np.ndarray]:
    """Every node's training indices (fixed for the run): ``data.size_multipliers`` scale
    node sizes, ``data.duplicate_of`` gives a node an exact copy of another node's samples."""
    dc = cfg.data
    sizes = None
    if dc.size_multipliers is not None:
        sizes = [max(1, int(round(m * dc.samples_per_node))) for m in dc.size_multipliers]
    parts = D.partition(ds.y_train, cfg.topology.n, scheme=dc.partition,
                        samples_per_node=dc.samples_per_node, alpha=dc.alpha,
                        classes_per_node=dc.classes_per_node, seed=cfg.seed, sizes=sizes)
    for copy, source in dc.duplicate_of.items():
        parts[copy] = parts[source].copy()
    return parts


def build_test_partition(cfg: RunConfig, ds: D.Dataset) -> list[np.ndarray]:
    """Every node's own test split (needs ``data.test_samples_per_node``), drawn from the test
    samples after the shared validation set, so the two never overlap."""
    nval = _n_validation(cfg, ds)
    rest = ds.y_test[nval:]
    if len(rest) == 0:
        raise ValueError(
            f"data.validation_samples={nval} uses the whole test split, leaving nothing for "
            "the per-node test splits; lower data.validation_samples"
        )
    return D.test_partition(ds, cfg.topology.n, samples_per_node=cfg.data.test_samples_per_node,
                            start=nval, seed=cfg.seed)


def _n_validation(cfg: RunConfig, ds: D.Dataset) -> int:
    if cfg.data.test_samples_per_node is None:
        return cfg.data.validation_samples or len(ds.y_test)
    # leave room for the per-node splits when the shared set size is not given
    return cfg.data.validation_samples or len(ds.y_test) // 2


def build_corruptions(cfg: RunConfig) -> list[D.Corruption]:
    return [D.Corruption(kind=c.kind, nodes=tuple(c.nodes), fraction=c.fraction, sigma=c.sigma,
                         seed=c.seed,
                         permutation=None if c.permutation is None else tuple(c.permutation))
            for c in cfg.data.corruptions]


def build_groups(cfg: RunConfig) -> np.ndarray | None:
    """Group id of every node under ``data.groups`` (None without hidden groups)."""
    g = cfg.data.groups
    if g is None:
        return None
    return D.group_assignment(cfg.topology.n, g.count, seed=cfg.seed, assign=g.assign)


def group_data(cfg: RunConfig, nd: D.NodeData, num_classes: int) -> D.NodeData:
    """``nd`` with every node's samples transformed by its hidden group (``data.groups``);
    ``nd`` itself when the config has none. Used for training data and own test splits, by
    the simulator and by a peer alike."""
    g = cfg.data.groups
    if g is None:
        return nd
    maps = D.group_label_maps(g.count, num_classes, cfg.seed)
    return D.apply_groups(nd, build_groups(cfg), g.transform, maps)


def build_functional_model(cfg: RunConfig, ds: D.Dataset, dtype: torch.dtype,
                           device: torch.device) -> FunctionalModel:
    """The run's model with its loss: the zoo's ``model.name`` (output size: the classes, or
    the target's size for ``mse``) or ``model.factory`` (``model.kind: python``)."""
    mc, lc = cfg.model, cfg.loss
    if mc.kind == "api":
        raise ConfigError(API_REFUSAL)
    if mc.kind == "python":
        from .models import load_factory_model

        module = load_factory_model(mc.factory or "", mc.kwargs, cfg.seed)
    else:
        outputs = ds.num_classes if lc.kind == "cross_entropy" else math.prod(ds.target_shape)
        if outputs is None:
            raise ConfigError(f"loss.kind=cross_entropy needs class-id targets, but the data's "
                              f"targets are {ds.y_train.dtype} of shape {ds.target_shape}; "
                              "set loss.kind: mse for float targets")
        module = build_model(mc.name, ds.input_shape, outputs, hidden=tuple(mc.hidden),
                             channels=tuple(mc.channels), width=mc.width,
                             activation=mc.activation)
    return FunctionalModel(module.to(device=device, dtype=dtype), lc.kind,
                           ignore_index=lc.ignore_index, target_ndim=len(ds.target_shape))


def build_optimizer(cfg: RunConfig) -> Optimizer:
    trc = cfg.train
    return Optimizer(momentum=trc.momentum, weight_decay=trc.weight_decay, nesterov=trc.nesterov)


def build_validation(cfg: RunConfig, ds: D.Dataset, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared test set ``z'`` (the first ``data.validation_samples`` test samples)."""
    nval = _n_validation(cfg, ds)
    return cast_data(ds.x_test[:nval], dtype, device), cast_data(ds.y_test[:nval], dtype, device)


def cast_data(t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``; floating tensors in the run's ``dtype``, integer ones (class or
    token ids) kept as int64."""
    if t.is_floating_point():
        return t.to(device=device, dtype=dtype)
    return t.to(device=device, dtype=torch.int64)


def build_problem(cfg: RunConfig) -> Problem:
    """Load data, partition it, build topology, model and optimizer from ``cfg``."""
    dc = cfg.data
    dtype = run_dtype(cfg)
    device = torch.device(cfg.train.device)
    ds, parts = load_run_data(cfg)
    nd = D.make_node_data(ds, parts if parts is not None else build_partition(cfg, ds),
                          split="train",
                          corruptions=build_corruptions(cfg))
    nd = _cast(group_data(cfg, nd, ds.num_classes), dtype, device)
    node_test = None
    if dc.test_samples_per_node:
        tnd = D.make_node_data(ds, build_test_partition(cfg, ds), split="test")
        node_test = _cast(group_data(cfg, tnd, ds.num_classes), dtype, device)
    batches = D.BatchSchedule(nd.sizes, cfg.train.batch_size, seed=cfg.seed)
    val_x, val_y = build_validation(cfg, ds, dtype, device)
    from ._threads import use_threads_for
    from .plugins import build_aggregator

    problem = Problem(cfg=cfg, fm=build_functional_model(cfg, ds, dtype, device), dataset=ds,
                      node_data=nd, batches=batches, schedule=build_schedule(cfg),
                      opt=build_optimizer(cfg), val_x=val_x, val_y=val_y, node_test=node_test,
                      dtype=dtype, device=device, aggregator=build_aggregator(cfg))
    if cfg.model.kind != "builtin" or cfg.loss.kind != "cross_entropy":
        from .checks import check_problem  # one clear error for the usual own-model mistakes

        check_problem(problem)
    use_threads_for(problem)  # torch threads for this problem's size (dice_influence._threads)
    return problem


def load_run_data(cfg: RunConfig, only: int | None = None
                  ) -> tuple[D.Dataset, list[np.ndarray] | None]:
    """The run's data set and, for ``data.dataset: nodes``, each node's samples in it (None:
    split by ``data.partition``). ``only=k``: a peer's view (node ``k``'s file only). The
    files of ``model.factory``'s module are recorded with the data files (run identity)."""
    from .data.own import load_nodes, load_npz

    dc = cfg.data
    parts = None
    if dc.dataset == "api":
        raise ConfigError(API_REFUSAL)
    if dc.dataset == "npz":
        ds = load_npz(dc.path or "")
    elif dc.dataset == "nodes":
        ds, parts = load_nodes(dc.path or "", cfg.topology.n, only=only)
    else:
        if dc.test_fraction is not None and dc.dataset not in ("digits", "synthetic"):
            raise ConfigError(f"data.test_fraction={dc.test_fraction}: {dc.dataset} has an "
                              "official test split; remove data.test_fraction")
        ds = D.load_dataset(dc.dataset, data_dir=dc.data_dir, seed=cfg.seed,
                            **({} if dc.test_fraction is None
                               else {"test_fraction": dc.test_fraction}))
    extra = _model_files(cfg)
    if extra:
        ds = dataclasses.replace(ds, files=(*ds.files, *extra))
    return ds, parts


def peer_source_files(cfg: RunConfig) -> tuple[dict[str, Any], ...]:
    """The files (path, size, sha256) that every peer of ``cfg`` reads alike: the data set's
    (for ``data.dataset: nodes`` only the shared ``test.npz``: a peer never reads the other
    nodes' files) and ``model.factory``'s module."""
    from .data.files import file_records
    from .data.own import test_file

    dc = cfg.data
    if dc.dataset == "api":
        raise ConfigError(API_REFUSAL)
    if dc.dataset == "npz":
        files = file_records([Path(dc.path or "").expanduser()])
    elif dc.dataset == "nodes":
        files = file_records([test_file(dc.path or "")])
    else:
        files = D.dataset_files(dc.dataset, data_dir=dc.data_dir)
    return (*files, *_model_files(cfg))


def _model_files(cfg: RunConfig) -> tuple[dict[str, Any], ...]:
    """File records of the model's own inputs: the factory's module (``model.kind: python``)
    and the ``model.init`` vector; part of the run identity beside the data files."""
    from ._init_load import init_files
    from .models import factory_files

    return (*(factory_files(cfg.model.factory) if cfg.model.kind == "python" else ()),
            *init_files(cfg))


def _cast(nd: D.NodeData, dtype: torch.dtype, device: torch.device) -> D.NodeData:
    return dataclasses.replace(nd, x=cast_data(nd.x, dtype, device),
                               y=cast_data(nd.y, dtype, device))


API_REFUSAL = ("this run was built in Python with dice_influence.from_torch (model.kind/"
               "data.dataset: api), so its model and data cannot be rebuilt from the config; "
               "rebuild the Problem with from_torch and pass it (Trajectory.load(folder, "
               "problem=...)), or describe the model and data in a config (model.kind: python, "
               "data.dataset: npz or nodes; docs/own-model.md)")
