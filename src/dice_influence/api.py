"""Your own model, data and loss in one call: :func:`from_torch` builds the same
:class:`~dice_influence.problem.Problem` the config path builds, so training, DICE-GT/E,
attribution, observers, policies, contribution, reports and ``Trajectory.save/load`` all work
on it unchanged (docs/own-model.md).

Sign convention everywhere: influence = loss with the data - loss without it; positive =
harmful.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as D
from . import topology as T
from .checks import APIError, _check_module, check_problem
from .config import MODEL_BUILTIN_KEYS, ConfigError, TrainConfig, load_config
from .data.own import make_dataset
from .models import FunctionalModel, ModelError, describe_model, make_loss
from .problem import Problem, _cast, build_optimizer, build_schedule, run_dtype

Pair = tuple[Any, Any]
_DATA_KEYS = ("partition", "alpha", "classes_per_node", "samples_per_node",
              "validation_samples")
_TOP_KEYS = ("seed", "observers", "policy", "aggregator", "experiment")


def from_torch(
    model: nn.Module | Callable[[], nn.Module],
    nodes: Sequence[Pair] | Sequence[torch.utils.data.Dataset] | Pair | torch.utils.data.Dataset,
    *,
    test: Pair | torch.utils.data.Dataset,
    topology: str | dict[str, Any] | Any,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "cross_entropy",
    partition: str | Sequence[Sequence[int]] | None = None,
    n: int | None = None,
    node_test: Sequence[Pair] | None = None,
    ignore_index: int | None = None,
    **settings: Any,
) -> Problem:
    """A run of decentralized SGD on your model and data, ready for
    ``Trajectory.start(problem).run(rounds)`` and every influence tool.

    ``model``: an ``nn.Module`` (copied; its parameters are re-drawn from ``seed`` by each
    layer's ``reset_parameters``, as the config path does) or a zero-argument factory. No
    buffers (BatchNorm: use GroupNorm/LayerNorm), no active dropout (call ``model.eval()``).
    ``nodes``: per-node data (a list of ``(x, y)`` pairs or ``Dataset`` s, one per node), or one
    ``(x, y)`` / ``Dataset`` split by ``partition`` (``"iid"``, ``"dirichlet(0.5)"``,
    ``"shards(2)"`` or one index list per node) over ``n`` nodes (default: the topology's).
    Inputs of any shape (float features, images, int token ids); targets of any shape (class
    ids, float vectors, token sequences). ``test``: the shared test set ``(x, y)``;
    ``node_test``: optional per-node test sets. ``topology``: a builder name (``"ring"``, ``n``
    from ``nodes``), a dict as in the config's ``topology`` section, an ``(n, n)`` mixing matrix
    (``W[k, j]``: weight receiver ``k`` puts on sender ``j``) or a
    :class:`~dice_influence.topology.Schedule`. ``loss``: ``"cross_entropy"`` (class ids),
    ``"mse"``, ``"token_cross_entropy"`` (with ``ignore_index``) or a callable
    ``loss_fn(outputs, targets) -> (B,)`` per-sample losses. ``settings``: the config's
    ``train`` keys (``rounds``, ``lr``, ``batch_size``, ``momentum``, ``dtype``, ``device``, ...),
    ``seed``, ``observers``, ``policy``, ``aggregator``, ``experiment`` and the data keys
    ``alpha``, ``classes_per_node``, ``samples_per_node``, ``validation_samples``; defaults are
    the config's (``dtype`` defaults to the model's float64 if its parameters are float64).

    Raises :class:`APIError` (one message naming the argument and the fix) for bad input.
    """
    module = _module(model, int(settings.get("seed", 0)))
    nodes_xy, parts, n_nodes = _nodes(nodes, partition, n, topology, settings)
    test_x, test_y = _pair(test, "test")
    dtype_default = "float64" if any(p.dtype == torch.float64 for p in module.parameters()) \
        else "float32"
    raw = _raw_config(settings, dtype_default)
    x_all, y_all = _stack_nodes(nodes_xy)
    _check_like(x_all, y_all, test_x, test_y, "test")
    topo, schedule = _topology(topology, n_nodes)
    raw["topology"] = topo
    loss_fn, _, loss_name = make_loss(loss, ignore_index=ignore_index)
    raw["loss"] = {"kind": loss_name, "ignore_index": ignore_index,
                   "description": None if loss_name != "custom" else _qualname(loss_fn)}
    raw["model"] = {"kind": "api", "description": describe_model(module)}
    raw["data"]["dataset"] = "api"
    raw["data"]["source"] = _describe_data(nodes_xy, test_x, test_y, parts is not None)
    try:
        cfg = load_config(raw)
    except ConfigError as exc:
        raise APIError(str(exc).replace("invalid configuration in dict", "from_torch settings")
                       ) from None
    files = (_record("from_torch:train", x_all, y_all), _record("from_torch:test", test_x, test_y),
             _model_record(module), *(() if schedule is None else (_schedule_record(schedule),)))
    ds = make_dataset("api", x_all.numpy(), y_all.numpy(), test_x.numpy(), test_y.numpy(),
                      files, where="from_torch data")
    if parts is None:
        cuts = np.cumsum([0, *[len(x) for x, _ in nodes_xy]])
        parts = [np.arange(a, b, dtype=np.int64) for a, b in zip(cuts[:-1], cuts[1:],
                                                                   strict=True)]
    dtype, device = run_dtype(cfg), torch.device(cfg.train.device)
    fm = FunctionalModel(module.to(device=device, dtype=dtype), loss,
                         ignore_index=ignore_index, target_ndim=y_all.ndim - 1)
    nd = _cast(D.make_node_data(ds, parts, split="train"), dtype, device)
    node_test_nd = None
    if node_test is not None:
        node_test_nd = _node_test(node_test, n_nodes, x_all, y_all, dtype, device)
    try:
        batches = D.BatchSchedule(nd.sizes, cfg.train.batch_size, seed=cfg.seed)
    except D.DataError as exc:
        raise APIError(f"batch_size: {exc}") from None
    from .plugins import build_aggregator
    from .problem import build_validation

    val_x, val_y = build_validation(cfg, ds, dtype, device)
    problem = Problem(cfg=cfg, fm=fm, dataset=ds, node_data=nd, batches=batches,
                      schedule=schedule if schedule is not None else build_schedule(cfg),
                      opt=build_optimizer(cfg), val_x=val_x, val_y=val_y,
                      node_test=node_test_nd, dtype=dtype, device=device,
                      aggregator=build_aggregator(cfg))
    check_problem(problem)
    return problem


# ------------------------------------------------------------------------------ arguments


def _module(model: Any, seed: int) -> nn.Module:
    if isinstance(model, nn.Module):
        module = copy.deepcopy(model)
    elif callable(model):
        try:
            with torch.random.fork_rng(devices=[]):  # as the config path calls a factory
                torch.manual_seed(seed)
                module = model()
        except TypeError as exc:
            raise APIError(f"model: calling the factory with no arguments failed ({exc}); pass "
                           "an nn.Module or a zero-argument function returning one (e.g. "
                           "functools.partial)") from None
        if not isinstance(module, nn.Module):
            raise APIError(f"model: the factory returned {type(module).__name__}, not an "
                           "nn.Module")
    else:
        raise APIError(f"model: got {type(model).__name__}; pass an nn.Module or a zero-argument "
                       "function returning one")
    if list(module.buffers()):
        from .models import _BUFFER_FIX

        raise APIError(f"model: {_BUFFER_FIX}")
    if not list(module.parameters()):
        raise APIError("model: has no parameters to train")
    _check_module(module)
    return module


def _is_pair(obj: Any) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and all(
        isinstance(a, (torch.Tensor, np.ndarray)) for a in obj)


def _pair(obj: Any, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` tensors of a pair or a map-style Dataset (stacked sample by sample)."""
    if _is_pair(obj):
        x, y = (torch.as_tensor(a) for a in obj)
    elif isinstance(obj, torch.utils.data.Dataset) and hasattr(obj, "__len__"):
        items = [obj[i] for i in range(len(obj))]  # type: ignore[arg-type]
        if not items:
            raise APIError(f"{name}: the Dataset holds no samples")
        if not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items[:1]):
            raise APIError(f"{name}: Dataset items must be (x, y) pairs")
        x = torch.stack([torch.as_tensor(it[0]) for it in items])
        y = torch.stack([torch.as_tensor(it[1]) for it in items])
    else:
        raise APIError(f"{name}: got {type(obj).__name__}; pass an (x, y) pair of tensors or a "
                       "torch.utils.data.Dataset of (x, y) items")
    if x.ndim == 0 or y.ndim == 0:
        raise APIError(f"{name}: x and y need one row per sample (got shapes {tuple(x.shape)} and "
                       f"{tuple(y.shape)})")
    if len(x) != len(y):
        raise APIError(f"{name}: x has {len(x)} samples but y has {len(y)}; give one target per "
                       "sample")
    if len(x) == 0:
        raise APIError(f"{name}: holds no samples")
    x, y = x.detach().cpu(), y.detach().cpu()
    for what, t in (("x", x), ("y", y)):
        if t.dtype == torch.bool:
            t = t.long()
        if t.is_floating_point():
            if t.dtype not in (torch.float32, torch.float64):
                t = t.float()
            if not bool(torch.isfinite(t).all()):
                raise APIError(f"{name}: {what} holds NaN/inf values; clean the data first")
        elif t.is_complex():
            raise APIError(f"{name}: {what} is complex; use float or int tensors")
        else:
            t = t.long()
        if what == "x":
            x = t
        else:
            y = t
    return x.contiguous(), y.contiguous()


def _nodes(nodes: Any, partition: Any, n: int | None, topology: Any, settings: dict[str, Any]
           ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[np.ndarray] | None, int]:
    single = _is_pair(nodes) or isinstance(nodes, torch.utils.data.Dataset)
    if not single:
        if not isinstance(nodes, (list, tuple)) or not nodes:
            raise APIError("nodes: pass a non-empty list with one (x, y) pair or Dataset per node, "
                           "or one (x, y) / Dataset with partition=...")
        if partition is not None:
            raise APIError("partition: nodes already holds one data set per node; drop "
                           "partition, or pass one (x, y) to split")
        out = []
        for k, item in enumerate(nodes):
            x, y = _pair(item, f"nodes[{k}]")
            out.append((x, y))
        for k, (x, y) in enumerate(out):
            if x.shape[1:] != out[0][0].shape[1:] or y.shape[1:] != out[0][1].shape[1:]:
                raise APIError(f"nodes[{k}]: samples have x {tuple(x.shape[1:])}, y "
                               f"{tuple(y.shape[1:])} but nodes[0]'s have x "
                               f"{tuple(out[0][0].shape[1:])}, y {tuple(out[0][1].shape[1:])}")
            if x.dtype.is_floating_point != out[0][0].dtype.is_floating_point or \
                    y.dtype.is_floating_point != out[0][1].dtype.is_floating_point:
                raise APIError(f"nodes[{k}]: dtypes x {x.dtype}, y {y.dtype} differ in kind from "
                               f"nodes[0]'s ({out[0][0].dtype}, {out[0][1].dtype})")
        if n is not None and n != len(out):
            raise APIError(f"n={n} but nodes holds {len(out)} nodes' data; drop n")
        return _common_float(out), None, len(out)
    x, y = _pair(nodes, "nodes")
    if partition is None:
        raise APIError("partition: nodes is one data set; say how to split it over the nodes "
                       "(partition='iid', 'dirichlet(0.5)', 'shards(2)' or one index list per "
                       "node), or pass one (x, y) per node")
    if isinstance(partition, str):
        if n is None:
            n = topology.get("n") if isinstance(topology, dict) else None
            if n is None and not isinstance(topology, str):
                n = _topology_n(topology)
        if n is None:
            raise APIError("n: splitting one data set by a partition scheme needs the number of "
                           "nodes; pass n=... (or a topology dict with n)")
        try:
            parts = D.partition(y, n, scheme=partition, seed=int(settings.get("seed", 0)),
                                samples_per_node=settings.get("samples_per_node"),
                                alpha=settings.get("alpha", 1.0),
                                classes_per_node=settings.get("classes_per_node", 2))
        except D.DataError as exc:
            raise APIError(f"partition: {exc}") from None
    else:
        parts = []
        for k, idx in enumerate(partition):
            a = np.asarray(idx, dtype=np.int64).reshape(-1)
            if a.size == 0:
                raise APIError(f"partition[{k}]: node {k} gets no data; give every node at "
                               "least batch_size samples")
            if a.min() < 0 or a.max() >= len(x):
                raise APIError(f"partition[{k}]: index {int(a.max() if a.max() >= len(x) else a.min())}"
                               f" is outside the {len(x)} samples")
            parts.append(a)
        if not parts:
            raise APIError("partition: the list is empty; give one index list per node")
        if n is not None and n != len(parts):
            raise APIError(f"n={n} but partition has {len(parts)} index lists")
    settings.pop("samples_per_node", None)
    nodes_xy = [(x[p], y[p]) for p in parts]
    for k, (xk, _) in enumerate(nodes_xy):
        if len(xk) == 0:
            raise APIError(f"partition: node {k} gets no data; use fewer nodes or more samples")
    return nodes_xy, None, len(parts)


def _common_float(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    """Nodes given in float32 and float64 are all kept as float64 (the run casts later)."""
    def up(ts):
        wide = any(t.dtype == torch.float64 for t in ts)
        return [t.double() if wide and t.is_floating_point() else t for t in ts]

    xs, ys = up([p[0] for p in pairs]), up([p[1] for p in pairs])
    return list(zip(xs, ys, strict=True))


def _stack_nodes(pairs: list[tuple[torch.Tensor, torch.Tensor]]):
    return torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _check_like(x: torch.Tensor, y: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                name: str) -> None:
    if tx.shape[1:] != x.shape[1:] or ty.shape[1:] != y.shape[1:]:
        raise APIError(f"{name}: samples have x {tuple(tx.shape[1:])}, y {tuple(ty.shape[1:])} but "
                       f"the training samples x {tuple(x.shape[1:])}, y {tuple(y.shape[1:])}; "
                       "they must match")
    if tx.is_floating_point() != x.is_floating_point() or \
            ty.is_floating_point() != y.is_floating_point():
        raise APIError(f"{name}: dtypes x {tx.dtype}, y {ty.dtype} differ in kind from the "
                       f"training data's ({x.dtype}, {y.dtype})")


def _raw_config(settings: dict[str, Any], dtype_default: str) -> dict[str, Any]:
    raw: dict[str, Any] = {"train": {"dtype": dtype_default}, "data": {}}
    train_keys = set(TrainConfig.model_fields)
    for key, value in settings.items():
        if key in train_keys:
            if key == "dtype" and isinstance(value, torch.dtype):
                value = str(value).removeprefix("torch.")
            raw["train"][key] = value
        elif key in _DATA_KEYS:
            raw["data"][key] = value
        elif key in _TOP_KEYS:
            raw[key] = value
        else:
            from ._util import did_you_mean

            known = sorted(train_keys | set(_DATA_KEYS) | set(_TOP_KEYS))
            hint = did_you_mean(key, known)
            raise APIError(f"unknown setting {key}=...{hint or ''}; valid: {', '.join(known)}")
    return raw


def _topology_n(topology: Any) -> int | None:
    if isinstance(topology, T.Schedule):
        return topology.n
    try:
        return int(np.asarray(topology).shape[0])
    except Exception:
        return None


def _topology(topology: Any, n: int) -> tuple[dict[str, Any], T.Schedule | None]:
    if isinstance(topology, str):
        return {"name": topology, "n": n}, None
    if isinstance(topology, dict):
        t = dict(topology)
        if t.get("n", n) != n:
            raise APIError(f"topology: n={t['n']} but nodes holds {n} nodes' data")
        t["n"] = n
        return t, None
    if isinstance(topology, T.Schedule):
        if topology.n != n:
            raise APIError(f"topology: the schedule has {topology.n} nodes but nodes holds {n}")
        return {"name": f"schedule:{type(topology).__name__}", "n": n}, topology
    if isinstance(topology, (np.ndarray, torch.Tensor, list, tuple)):
        W = np.asarray(torch.as_tensor(topology).detach().cpu().double())
        if W.shape != (n, n):
            raise APIError(f"topology: the mixing matrix has shape {W.shape} but nodes holds {n} "
                           f"nodes' data; it must be ({n}, {n}), W[k, j] = weight receiver k puts "
                           "on sender j")
        try:
            T.validate_mixing(W)
        except Exception as exc:
            raise APIError(f"topology: {exc}") from None
        return {"name": "matrix", "n": n, "matrix": W.tolist()}, None
    raise APIError(f"topology: got {type(topology).__name__}; pass a name ('ring'), a dict as in "
                   "the config, an (n, n) mixing matrix or a dice_influence.topology.Schedule")


def _node_test(pairs: Sequence[Pair], n: int, x: torch.Tensor, y: torch.Tensor,
               dtype: torch.dtype, device: torch.device) -> D.NodeData:
    if len(pairs) != n:
        raise APIError(f"node_test: {len(pairs)} test sets for {n} nodes; give one per node")
    got = [_pair(p, f"node_test[{k}]") for k, p in enumerate(pairs)]
    for k, (tx, ty) in enumerate(got):
        _check_like(x, y, tx, ty, f"node_test[{k}]")
    tx_all, ty_all = _stack_nodes(got)
    ds = make_dataset("api", tx_all.numpy(), ty_all.numpy(), tx_all[:1].numpy(),
                      ty_all[:1].numpy(), where="node_test")
    cuts = np.cumsum([0, *[len(t[0]) for t in got]])
    parts = [np.arange(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return _cast(D.make_node_data(ds, parts, split="train"), dtype, device)


# ------------------------------------------------------------------------------ descriptions


def _sha(*tensors: torch.Tensor) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    for t in tensors:
        b = t.contiguous().numpy().tobytes()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(b)
        size += len(b)
    return h.hexdigest(), size


def _record(name: str, *tensors: torch.Tensor) -> dict[str, Any]:
    sha, size = _sha(*tensors)
    return {"path": name, "size": size, "sha256": sha}


def _model_record(module: nn.Module) -> dict[str, Any]:
    h = hashlib.sha256(repr(module).encode())
    for name, p in module.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    d = sum(p.numel() for p in module.parameters())
    return {"path": f"from_torch:model:{type(module).__name__}", "size": d, "sha256": h.hexdigest()}


def _schedule_record(schedule: T.Schedule) -> dict[str, Any]:
    h = hashlib.sha256()
    rounds = 1 if schedule.is_static else min(schedule.period or 64, 64)
    for t in range(rounds):
        h.update(np.ascontiguousarray(schedule.W(t)).tobytes())
    return {"path": f"from_torch:topology:{type(schedule).__name__}", "size": rounds,
            "sha256": h.hexdigest()}


def _describe_data(nodes: list[tuple[torch.Tensor, torch.Tensor]], tx: torch.Tensor,
                   ty: torch.Tensor, split: bool) -> str:
    x0, y0 = nodes[0]
    sizes = [len(x) for x, _ in nodes]
    size = f"{sizes[0]} samples each" if len(set(sizes)) == 1 else \
        f"{min(sizes)}-{max(sizes)} samples per node"
    return (f"tensors passed to from_torch: {len(nodes)} nodes, {size}; x {tuple(x0.shape[1:])} "
            f"{str(x0.dtype).removeprefix('torch.')}, y {tuple(y0.shape[1:])} "
            f"{str(y0.dtype).removeprefix('torch.')}; test set {len(tx)} samples")


def _qualname(fn: Any) -> str:
    mod = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{mod}.{name}" if mod else name


__all__ = ["APIError", "check_problem", "from_torch", "MODEL_BUILTIN_KEYS", "ModelError"]
