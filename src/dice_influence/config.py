"""Validated run configuration (pydantic) that round-trips to YAML.

Every section forbids unknown keys, so a typo fails with a message naming the key. ``--set
key=value`` overrides use dotted paths (``train.lr=0.05``) and YAML values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorruptionConfig(_Strict):
    """Data corruption on chosen nodes (see :class:`dice_influence.data.Corruption`)."""

    kind: Literal["label_flip", "random_labels", "gaussian_noise"]
    nodes: list[int]
    fraction: float = Field(1.0, ge=0.0, le=1.0)
    sigma: float = Field(1.0, ge=0.0)
    permutation: list[int] | None = None
    seed: int = 0


class DataConfig(_Strict):
    dataset: Literal["digits", "fashion-mnist", "mnist", "cifar10", "synthetic"] = "digits"
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
    corruptions: list[CorruptionConfig] = []


class TopologyConfig(_Strict):
    name: str = "exponential"
    n: int = Field(16, ge=1)
    weights: Literal["uniform", "metropolis"] = "uniform"
    time_varying: Literal["one-peer-exponential", "random-matching", "permuted"] | None = None
    p: float | None = None
    degree: int | None = None
    k: int | None = None
    matrix: list[list[float]] | None = Field(
        None, description="explicit W (rows = receivers); overrides name"
    )


class ModelConfig(_Strict):
    name: Literal["logreg", "mlp", "cnn", "resnet"] = "mlp"
    hidden: list[int] = [128, 64]
    channels: list[int] = [16, 32]
    width: int = 16
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
    device: str = "cpu"


class RunConfig(_Strict):
    """A whole run: data, topology, model, training. ``seed`` drives every random draw."""

    seed: int = 0
    data: DataConfig = DataConfig()
    topology: TopologyConfig = TopologyConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    experiment: dict[str, Any] = Field(
        default_factory=dict, description="settings of an experiment built on this run"
    )

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
        if self.topology.matrix is not None and len(self.topology.matrix) != n:
            raise ValueError(
                f"topology.matrix has {len(self.topology.matrix)} rows but topology.n={n}; "
                "set topology.n to the matrix size"
            )
        return self


def _format_validation(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `dice config` prints every valid key)"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{got_s}")
    return "\n".join(lines)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["train.lr=0.05", "topology.n=8"]`` → nested dict with YAML-parsed values."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} must look like key=value, e.g. train.lr=0.05")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {pair!r}: value is not valid YAML ({exc})") from None
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
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
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
    """YAML text that :func:`load_config` reads back to an equal config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
