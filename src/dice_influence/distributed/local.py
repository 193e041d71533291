"""What one peer needs of a run: its own partition, the shared schedules, model and optimizer.

:func:`build_local` follows :func:`dice_influence.simulator.build_problem` step by step but keeps
only node ``k``'s data (same partition, same corruptions, same batch positions), so that a peer
holds its own samples and nothing of the others'. A test checks it against ``build_problem``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import data as D
from .. import problem as S
from .. import topology as T
from ..config import ConfigError, RunConfig
from ..gossip import Optimizer, node_losses
from ..models import FunctionalModel
from ..plugins import build_aggregator


@dataclass
class LocalProblem:
    """Node ``k``'s view of a run. ``x`` (m, *input_shape) / ``y`` (m,) are its local samples;
    ``test_x``/``test_y`` its test set ``z'_k``; ``W(t)`` is the whole (n, n) mixing matrix,
    computed from the shared seed exactly as every other peer computes it."""

    cfg: RunConfig
    k: int
    n: int
    fm: FunctionalModel
    x: torch.Tensor
    y: torch.Tensor
    batches: D.BatchSchedule
    schedule: T.Schedule
    opt: Optimizer
    test_x: torch.Tensor
    test_y: torch.Tensor
    own_test: bool
    val_x: torch.Tensor
    val_y: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    transforms: tuple = ()  # update-level behaviours of this node (part of the round)
    aggregator: object = None  # None: the W^t row product; else the config's robust rule
    index: torch.Tensor | None = None  # (m,) dataset index of each local sample

    @property
    def d(self) -> int:
        return self.fm.dim

    def W(self, t: int) -> np.ndarray:
        return self.schedule.W(t)

    def lr(self, t: int) -> float:
        return S.run_lr(self.cfg, t)

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This node's batch of round ``t``: ``x`` (1, B, ...), ``y`` (1, B)."""
        idx = torch.from_numpy(self.batches.node_indices(self.k, t)).to(self.device)
        return self.x.index_select(0, idx)[None], self.y.index_select(0, idx)[None]

    def init_theta(self) -> torch.Tensor:
        """This node's row ``(1, d)`` of the simulator's initial parameters."""
        theta = self.fm.init_params(
            self.n, self.cfg.seed, same_init=self.cfg.train.same_init, dtype=self.dtype
        )
        return theta[self.k : self.k + 1].clone().to(self.device)

    def evaluate(self, theta: torch.Tensor) -> dict[str, float]:
        """Loss/accuracy of ``theta`` (1, d) on the shared test set (and the own split)."""
        with torch.no_grad():
            loss, acc = node_losses(self.fm, theta, self.val_x, self.val_y)
            out = {"loss": float(loss[0])}
            if acc is not None:  # a loss without accuracy (mse) reports losses only
                out["acc"] = float(acc[0])
            if self.own_test:
                ol, oa = node_losses(self.fm, theta, self.test_x[None], self.test_y[None])
                out["own_loss"] = float(ol[0])
                if oa is not None:
                    out["own_acc"] = float(oa[0])
        return out


def _only(parts: list[np.ndarray], k: int) -> list[np.ndarray]:
    empty = np.zeros(0, dtype=np.int64)
    return [p if j == k else empty for j, p in enumerate(parts)]


def _row(nd: D.NodeData, k: int, dtype: torch.dtype, device: torch.device):
    size = int(nd.sizes[k])
    return (S.cast_data(nd.x[k, :size].clone(), dtype, device),
            S.cast_data(nd.y[k, :size].clone(), dtype, device))


def build_local(
    cfg: RunConfig, k: int, *, test_set: str = "auto", device: torch.device | str | None = None
) -> LocalProblem:
    """Node ``k``'s :class:`LocalProblem` (same data, batches and init as the simulator's)."""
    dc = cfg.data
    n = cfg.topology.n
    if not 0 <= k < n:
        raise ConfigError(f"peer rank {k} out of range for topology.n={n}")
    dtype = S.run_dtype(cfg)
    dev = torch.device(device if device is not None else cfg.train.device)
    cfg, transforms = _with_attacks(cfg)
    ds, given = S.load_run_data(cfg, only=k)  # data.dataset=nodes: node k's file only
    parts = given if given is not None else S.build_partition(cfg, ds)
    nd = D.make_node_data(ds, _only(parts, k), split="train", corruptions=S.build_corruptions(cfg))
    index = nd.index[k, : int(nd.sizes[k])].clone().cpu()
    own_size = int(nd.sizes[k])  # the partition's, plus any injected copies (inject_flip)
    x, y = _row(S.group_data(cfg, nd, ds.num_classes), k, dtype, dev)
    del nd
    own = test_set == "own" or (test_set == "auto" and dc.test_samples_per_node is not None)
    val_x, val_y = S.build_validation(cfg, ds, dtype, dev)
    if own:
        if dc.test_samples_per_node is None:
            raise ConfigError(
                "experiment.distributed.test_set=own needs data.test_samples_per_node in the config"
            )
        tnd = D.make_node_data(ds, _only(S.build_test_partition(cfg, ds), k), split="test")
        test_x, test_y = _row(S.group_data(cfg, tnd, ds.num_classes), k, dtype, dev)
    else:
        test_x, test_y = val_x, val_y
    sizes = [len(p) for p in parts]
    sizes[k] = own_size
    if given is not None:  # other nodes' files are not read; node k's batches need only its size
        sizes = [sizes[k] if j == k else max(sizes[k], cfg.train.batch_size) for j in range(n)]
    batches = D.BatchSchedule(sizes, cfg.train.batch_size, seed=cfg.seed)
    return LocalProblem(
        cfg=cfg,
        k=k,
        n=n,
        fm=S.build_functional_model(cfg, ds, dtype, dev),
        x=x,
        y=y,
        batches=batches,
        schedule=S.build_schedule(cfg),
        opt=S.build_optimizer(cfg),
        test_x=test_x,
        test_y=test_y,
        own_test=own,
        val_x=val_x,
        val_y=val_y,
        dtype=dtype,
        device=dev,
        aggregator=build_aggregator(cfg),
        transforms=transforms,
        index=index,
    )


def _with_attacks(cfg: RunConfig) -> tuple[RunConfig, tuple]:
    """With ``experiment.distributed.attacks: true``: the config's ``experiment.attacks`` as
    ``dice experiment`` runs them (data-level ones as corruptions, update-level ones as this
    node's transforms; noise depends only on seed, round and node, so every peer draws what the
    simulator draws). Otherwise ``cfg`` unchanged and no transforms."""
    from pydantic import ValidationError

    from ..attacks import AttackPlan, AttackSpec, attack_transforms, with_data_attacks
    from .settings import distributed_settings

    if not distributed_settings(cfg).attacks:
        return cfg, ()
    raw = (cfg.experiment or {}).get("attacks") or []
    try:
        specs = [AttackSpec.model_validate(a) for a in raw]
    except ValidationError as err:
        raise ConfigError(f"experiment.attacks: {err.errors()[0]['msg']}") from None
    plan = AttackPlan.resolve(specs, cfg.topology.n, cfg.seed)
    return with_data_attacks(cfg, plan), attack_transforms(plan)
