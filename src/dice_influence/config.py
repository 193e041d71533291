"""Validated run configuration (pydantic) that round-trips to YAML.

Every section forbids unknown keys, so a typo fails with a message naming the key. ``--set
key=value`` overrides use dotted paths (``train.lr=0.05``) and YAML values. Floats must be finite
(``.inf``/``.nan`` are refused), seeds are 32-bit (0..2**32-1), and an explicit matrix must be
square with one row per node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from ._util import did_you_mean
from .config_yaml import ConfigError, read_yaml_file, safe_yaml, short_repr

PositiveInt = Annotated[int, Field(ge=1)]
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding accept 0..2**32-1
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]  # `seed: true` is not seed 1
MAX_NODES = 4096  # mixing matrices are dense (n, n) float64: 4096 nodes = 128 MiB each


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class CorruptionConfig(_Strict):
    """Data corruption on chosen nodes (see :class:`dice_influence.data.Corruption`)."""

    kind: Literal["label_flip", "random_labels", "gaussian_noise", "inject_flip"]
    nodes: list[int]
    fraction: float = Field(1.0, ge=0.0, le=1.0)
    sigma: float = Field(1.0, ge=0.0)
    permutation: list[int] | None = None
    seed: Seed = 0


class GroupsConfig(_Strict):
    """Hidden groups of nodes (collaborator selection): every sample a node holds, training data
    and own test split alike, is transformed by its group's map, so groups want different
    models. Group 0 keeps the data as it is."""

    count: int = Field(4, ge=1, description="number of groups (sizes differ by at most one)")
    transform: Literal["permute_labels", "rotate"] = Field(
        "permute_labels", description="permute_labels: a seeded derangement of the labels per "
        "group; rotate: images turned by group x 90 degrees (at most 4 groups)")
    assign: Literal["seeded", "contiguous"] = Field(
        "seeded", description="which nodes form a group: a seeded draw, or blocks of ids")


class DataConfig(_Strict):
    dataset: Literal["digits", "fashion-mnist", "mnist", "cifar10", "synthetic", "npz", "nodes",
                     "api"] = Field(
        "digits", description="a built-in data set; npz: one file (x_train, y_train, x_test, "
        "y_test) split by data.partition; nodes: a folder with node_<k>.npz (x, y) per node "
        "plus test.npz (x, y); api: tensors passed to dice_influence.from_torch (not loadable "
        "from a file)")
    path: str | None = Field(None, description="the .npz file (dataset npz) or the folder "
                             "(dataset nodes); read with allow_pickle=False")
    source: str | None = Field(None, description="what a from_torch run was given (written by "
                               "the run; dataset api only)")
    data_dir: str | None = None
    partition: str = "iid"
    samples_per_node: int | None = Field(None, ge=1)
    alpha: float = Field(1.0, gt=0)
    classes_per_node: int = Field(2, ge=1)
    test_samples_per_node: int | None = Field(
        None, ge=1, description="if set, each node also holds its own test split of this size"
    )
    validation_samples: int | None = Field(
        None, ge=1, description="size of the shared test set z' (default: the whole test split)"
    )
    test_fraction: float | None = Field(
        None, gt=0, lt=1, description="digits and synthetic only (the others have an official "
        "split): share of the data set held out as the test split (default 0.2)")
    corruptions: list[CorruptionConfig] = []
    size_multipliers: list[float] | None = Field(
        None, description="node k holds round(m_k * samples_per_node) samples (iid partition)"
    )
    duplicate_of: dict[int, int] = Field(
        default_factory=dict, description="copy: source - node `copy` holds exactly the "
        "training samples of node `source` (a node with duplicated data)"
    )
    groups: GroupsConfig | None = Field(
        None, description="hidden groups of nodes whose data differ (selection experiments)")


class TopologyConfig(_Strict):
    name: str = "exponential"
    n: int = Field(16, ge=1, le=MAX_NODES)
    weights: Literal["uniform", "metropolis"] = "uniform"
    time_varying: Literal["one-peer-exponential", "random-matching", "permuted"] | None = None
    p: float | None = None
    degree: int | None = None
    k: int | None = None
    matrix: list[list[float]] | None = Field(
        None, description="explicit W (rows = receivers); overrides name"
    )


class LossConfig(_Strict):
    """The per-sample loss ``loss_fn(outputs, targets) -> (B,)`` (docs/own-model.md)."""

    kind: Literal["cross_entropy", "mse", "token_cross_entropy", "custom"] = Field(
        "cross_entropy", description="cross_entropy: class ids; mse: float targets (mean over "
        "target dims); token_cross_entropy: logits (B, L, V), token ids (B, L), mean over a "
        "sequence's tokens; custom: a callable passed to from_torch (not loadable from a file)")
    ignore_index: int | None = Field(None, description="token_cross_entropy: target id that "
                                     "counts for nothing (padding)")
    description: str | None = Field(None, description="custom: the callable's name (written "
                                    "by the run)")


MODEL_BUILTIN_KEYS = ("name", "hidden", "channels", "width", "activation")


class ModelConfig(_Strict):
    kind: Literal["builtin", "python", "api"] = Field(
        "builtin", description="builtin: model.name from the zoo; python: model.factory "
        "'pkg.module:make_model' called with model.kwargs; api: an nn.Module passed to "
        "dice_influence.from_torch (not loadable from a file)")
    factory: str | None = Field(None, description="python: 'pkg.module:function' (imported from "
                                "the working directory or an installed package)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="python: keyword "
                                   "arguments of the factory")
    description: str | None = Field(None, description="api/python: class and parameter count "
                                    "(written by the run)")
    init: str | None = Field(None, description="start every node from this flat parameter "
                             "vector (.npy, shape (d,)), e.g. a pretrained shared model "
                             "(python -m dice_influence.init_params RUN_DIR FILE.npy)")
    name: Literal["logreg", "mlp", "cnn", "resnet"] = "mlp"
    hidden: list[PositiveInt] = [128, 64]
    channels: list[PositiveInt] = [16, 32]
    width: int = Field(16, ge=1)
    activation: Literal["relu", "gelu", "tanh", "softplus"] = "relu"


class TrainConfig(_Strict):
    rounds: int = Field(100, ge=0)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(0.1, gt=0)
    lr_schedule: Literal["constant", "step", "cosine"] = "constant"
    lr_step_size: int = Field(30, ge=1)
    lr_gamma: float = Field(0.1, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    same_init: bool = True
    checkpoint_every: int = Field(10, ge=1)
    eval_every: int = Field(10, ge=1)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]{1,3})?|mps)$",
                        description="cpu, cuda, cuda:N or mps")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; null = the "
                                "automatic rule (one thread unless the work is large and cores "
                                "are idle); --threads and OMP_NUM_THREADS also set it")


class RunConfig(_Strict):
    """A whole run: data, topology, model, training. ``seed`` drives every random draw."""

    seed: Seed = 0
    data: DataConfig = DataConfig()
    topology: TopologyConfig = TopologyConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    observers: list[dict[str, Any]] = Field(
        default_factory=list, description="plug-ins that read each round (dice config lists them)"
    )
    policy: dict[str, Any] | None = Field(None, description="plug-in that decides W^t")
    aggregator: dict[str, Any] | None = Field(
        None, description="how half steps are combined (default: the W^t matmul)"
    )
    experiment: dict[str, Any] = Field(
        default_factory=dict, description="settings of an experiment built on this run"
    )

    @model_validator(mode="before")
    @classmethod
    def _finite(cls, raw: Any) -> Any:
        """Non-finite numbers are refused everywhere, free-form sections included (plug-in
        and experiment settings): ``margin: .nan`` would silently never prune."""
        bad = _non_finite(raw)
        if bad is not None:
            where, v = bad
            raise ValueError(f"{where}: {v} is not a finite number; give a finite value")
        return raw

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        n = self.topology.n
        for c in self.data.corruptions:
            bad = [k for k in c.nodes if not 0 <= k < n]
            if bad:
                raise ValueError(
                    f"data.corruptions: node ids {bad} out of range for topology.n={n} "
                    f"(valid ids are 0..{n - 1})"
                )
        _check_data_layout(self, n)
        _check_own(self)
        g = self.data.groups
        if g is not None and g.count > n:
            raise ValueError(f"data.groups.count={g.count} exceeds topology.n={n}; use at most "
                             f"{n} groups")
        if g is not None and g.transform == "rotate" and g.count > 4:
            raise ValueError(f"data.groups.count={g.count} with transform=rotate: quarter turns "
                             "give at most 4 groups; use count <= 4 or permute_labels")
        from .plugins import parse

        for i, raw in enumerate(self.observers):
            parse("observer", raw, f"observers.{i}")
        if self.policy is not None:
            parse("policy", self.policy, "policy")
        if self.aggregator is not None:
            parse("aggregator", self.aggregator, "aggregator")
        if self.model.name == "resnet" and self.model.width % 4:
            raise ValueError(
                f"model.width={self.model.width}: the resnet's GroupNorm uses 4 groups, so the "
                "width must be a multiple of 4 (e.g. 16)"
            )
        m = self.topology.matrix
        if m is not None and len(m) != n:
            raise ValueError(
                f"topology.matrix has {len(m)} rows but topology.n={n}; "
                "set topology.n to the matrix size"
            )
        for k, row in enumerate(m or []):
            if len(row) != n:
                raise ValueError(
                    f"topology.matrix row {k} has {len(row)} entries but the matrix has {n} "
                    f"rows; it must be square ({n} x {n}, W[k][j] = weight receiver k puts "
                    "on sender j)"
                )
        return self


def _non_finite(obj: Any, path: str = "") -> tuple[str, float] | None:
    """The first ``(dotted key, value)`` in ``obj`` that is a non-finite float, else None."""
    import math

    if isinstance(obj, float):
        return None if math.isfinite(obj) else (path or "(top level)", obj)
    if isinstance(obj, dict):
        items: Any = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        found = _non_finite(v, f"{path}.{k}" if path else str(k))
        if found is not None:
            return found
    return None


def _check_data_layout(cfg: RunConfig, n: int) -> None:
    """Per-node sizes and duplicated nodes must fit the network (messages name the key)."""
    dc = cfg.data
    m = dc.size_multipliers
    if m is not None:
        if len(m) != n:
            raise ValueError(f"data.size_multipliers has {len(m)} entries but topology.n={n}; "
                             "give one multiplier per node")
        if dc.samples_per_node is None or dc.partition != "iid":
            raise ValueError("data.size_multipliers needs data.samples_per_node and "
                             "data.partition: iid")
        bad = [x for x in m if not x > 0]
        if bad:
            raise ValueError(f"data.size_multipliers: {bad} must be > 0")
    for c, s in dc.duplicate_of.items():
        if not (0 <= c < n and 0 <= s < n) or c == s:
            raise ValueError(f"data.duplicate_of: {c}: {s} needs two different node ids in "
                             f"0..{n - 1}")
        if s in dc.duplicate_of:
            raise ValueError(f"data.duplicate_of: source {s} is itself a copy; point {c} at "
                             "an original node")


def _check_own(cfg: RunConfig) -> None:
    """Own model/data/loss keys: each kind with the keys it needs, and no others."""
    m, dc, lc = cfg.model, cfg.data, cfg.loss
    if m.kind == "python" and not m.factory:
        raise ValueError("model.kind=python needs model.factory: 'pkg.module:make_model'")
    if m.kind != "python" and (m.factory or m.kwargs):
        raise ValueError(f"model.factory/model.kwargs are for model.kind=python, not "
                         f"{m.kind!r}; set model.kind: python")
    if m.factory is not None:
        mod, _, fn = m.factory.partition(":")
        if not (mod and fn and all(p.isidentifier() for p in mod.split("."))
                and fn.isidentifier()):
            raise ValueError(f"model.factory={m.factory!r} must look like "
                             "'pkg.module:make_model' (a module path, a colon, a function)")
    if dc.dataset in ("npz", "nodes") and not dc.path:
        raise ValueError(f"data.dataset={dc.dataset} needs data.path (the "
                         f"{'.npz file' if dc.dataset == 'npz' else 'folder of node_<k>.npz'})")
    if dc.dataset not in ("npz", "nodes") and dc.path:
        raise ValueError(f"data.path is for data.dataset npz or nodes, not {dc.dataset!r}")
    if (dc.dataset == "api") != (m.kind == "api") and "api" in (dc.dataset, m.kind):
        raise ValueError("data.dataset=api and model.kind=api come together, from "
                         "dice_influence.from_torch; a config file cannot load them")
    if dc.dataset == "nodes":
        used = [k for k, v in (("partition", dc.partition != "iid"),
                               ("samples_per_node", dc.samples_per_node is not None),
                               ("size_multipliers", dc.size_multipliers is not None),
                               ("duplicate_of", bool(dc.duplicate_of)),
                               ("test_samples_per_node", dc.test_samples_per_node is not None))
                if v]
        if used:
            raise ValueError(f"data.dataset=nodes: each node's file is its data, so "
                             f"data.{used[0]} does not apply; remove it")
    if lc.kind == "custom" and m.kind != "api":
        raise ValueError("loss.kind=custom is a Python callable given to "
                         "dice_influence.from_torch; in a config use cross_entropy, mse or "
                         "token_cross_entropy")
    if lc.ignore_index is not None and lc.kind != "token_cross_entropy":
        raise ValueError("loss.ignore_index is for loss.kind=token_cross_entropy")
    if m.kind == "builtin" and lc.kind == "token_cross_entropy":
        raise ValueError("loss.kind=token_cross_entropy needs a sequence model: set "
                         "model.kind: python with model.factory (docs/own-model.md)")


OWN_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("model", "kind"): "builtin", ("model", "factory"): None, ("model", "kwargs"): {},
    ("model", "init"): None,
    ("data", "path"): None, ("loss",): {"kind": "cross_entropy", "ignore_index": None},
}


def drop_own_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` (a dumped config) without the own-model/data/loss keys that hold their defaults,
    so that a run's identity is the same as before those keys existed, and without the
    descriptions a run writes (derived from what it read, whose hashes count instead)."""
    raw.get("model", {}).pop("description", None)
    raw.get("data", {}).pop("source", None)
    if isinstance(raw.get("loss"), dict):
        raw["loss"].pop("description", None)
    for path, default in OWN_DEFAULTS.items():
        node = raw
        for p in path[:-1]:
            node = node.get(p, {})
        if node.get(path[-1], default) == default:
            node.pop(path[-1], None)
    return raw


def data_label(cfg: RunConfig) -> str:
    """Short name of a run's data: the built-in data set, the file or folder of one's own
    (``npz``/``nodes``) or ``tensors`` (from_torch)."""
    dc = cfg.data
    if dc.dataset in ("npz", "nodes"):
        return Path(dc.path or "").name or dc.dataset
    return "tensors (from_torch)" if dc.dataset == "api" else dc.dataset


def model_label(cfg: RunConfig) -> str:
    """Short name of a run's model: the zoo's name and sizes, the factory, or what was passed
    to from_torch."""
    m = cfg.model
    if m.kind == "python":
        return f"{m.factory}"
    if m.kind == "api":
        return m.description or "a model passed to from_torch"
    if m.name in ("mlp",):
        return f"mlp {m.hidden}"
    return m.name


def check_device(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` unless ``train.device`` exists on this machine."""
    import torch

    dev = cfg.train.device
    kind, _, idx = dev.partition(":")
    if kind == "cuda":
        ok = torch.cuda.is_available() and int(idx or 0) < torch.cuda.device_count()
    elif kind == "mps":
        ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    else:
        ok = True
    if not ok:
        raise ConfigError(f"train.device={dev!r} is not available on this machine; use "
                          "train.device=cpu (or a device that torch sees here)")


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "value_error":  # our validators' messages name the key themselves
            msg = msg.removeprefix("Value error, ")
            if not loc:
                lines.append(f"  {msg}")
                continue
        loc = loc or "(top level)"
        if e["type"] == "extra_forbidden":
            keys = _keys_at(e["loc"][:-1])
            hint = did_you_mean(str(e["loc"][-1]), keys) if keys else ""
            msg = (f"unknown key{hint}" if hint else
                   f"unknown key; valid keys here: {', '.join(keys)}" if keys else
                   "unknown key (check the spelling; `dice config` prints every valid key)")
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {short_repr(got)})"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def _keys_at(loc: tuple[Any, ...], root: Any = None) -> list[str]:
    """Valid keys of the config section at ``loc`` (e.g. ``("train",)``) of ``root`` (default
    :class:`RunConfig`); [] if unknown."""
    import typing

    model: Any = RunConfig if root is None else root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        ann, model = field.annotation, None
        todo = [ann]
        while todo:  # unwrap Optional[...] / list[...] down to a config section
            a = todo.pop()
            if isinstance(a, type) and issubclass(a, BaseModel):
                model = a
                break
            todo.extend(typing.get_args(a))
        if model is None:
            return []
    return list(model.model_fields)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.05", "topology.n=8"]`` → nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value, e.g. train.lr=0.05")
        key, raw = pair.split("=", 1)
        try:
            value = safe_yaml(raw, f"override {pair[:80]!r}")
        except ConfigError as exc:
            raise ConfigError(f"override {pair[:80]!r}: value is not valid YAML ({exc})") from None
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out


def _deep_merge(base: dict[str, Any], upd: dict[str, Any]) -> dict[str, Any]:
    res = dict(base)
    for k, v in upd.items():
        if isinstance(v, dict) and isinstance(res.get(k), dict):
            res[k] = _deep_merge(res[k], v)
        else:
            res[k] = v
    return res


def load_config(
    source: str | Path | dict[str, Any] | None = None, overrides: list[str] | None = None
) -> RunConfig:
    """Load and validate a config from a YAML path or a dict, then apply ``key=value`` overrides.

    Raises :class:`ConfigError` with one readable message for any bad key or value."""
    name = "defaults"
    raw: dict[str, Any] = {}
    if isinstance(source, dict):
        raw, name = source, "dict"
    elif source is not None:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found; pass a path to a YAML file")
        raw = read_yaml_file(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a YAML mapping at top level, got {type(raw).__name__}")
        name = str(path)
    if overrides:
        raw = _deep_merge(raw, parse_overrides(overrides))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation(err, name)) from None


def dump_config(cfg: RunConfig) -> str:
    """YAML text that :func:`load_config` reads back to an equal config. A model of one's own
    (``model.kind`` python/api) is written without the zoo's keys (``name``, ``hidden``, ...),
    which it does not use."""
    raw = cfg.model_dump(mode="json")
    if cfg.model.kind != "builtin":
        for key in MODEL_BUILTIN_KEYS:
            raw["model"].pop(key, None)
    if raw["model"].get("init") is None:  # written only when set (configs stay as they were)
        raw["model"].pop("init", None)
    return yaml.safe_dump(raw, sort_keys=False)
