"""Peer/runtime options of the peer-to-peer runtime, read from ``experiment.distributed``.

They live in the run config's free-form ``experiment:`` mapping, so a config that trains in the
simulator also runs on real peers; this model validates them (unknown keys are errors).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..config import ConfigError, RunConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


MAX_TIMEOUT_S = 86400.0  # one day: a phase that waits longer has failed


class DetectionSettings(_Strict):
    """Shorthand kept for older configs: drop an in-neighbour ``j`` for good once its cumulative
    proximal influence on this peer exceeds ``threshold`` (positive = harmful), not before round
    ``warmup``. It means ``policy: {kind: prune, rule: sign, margin: THRESHOLD, start:
    WARMUP - 1, readmit: false, max_norm_ratio: null}``; prefer the ``policy:`` section."""

    enabled: bool = False
    warmup: int = Field(10, ge=0, description="rounds completed before any neighbour is dropped")
    threshold: float = Field(0.0, description="drop when cumulative P[k, j] > threshold")


class FaultSettings(_Strict):
    """Fault injection, for tests and drills: peer ``peer`` dies or stalls at round ``round``."""

    peer: int = Field(..., ge=0)
    round: int = Field(..., ge=0)
    kind: Literal["die", "stall"] = "die"


class DistributedSettings(_Strict):
    """``experiment.distributed`` of a run config."""

    timeout_s: float = Field(60.0, gt=0, le=MAX_TIMEOUT_S,
                             description="max wait for any neighbour, per round phase (s)")
    readout: Literal["pre", "post"] = Field(
        "pre", description="G_k at θ_k^t (pre) or θ_k^{t+1} (post); used when the config has "
        "no `observers: - kind: proximal` entry"
    )
    test_set: Literal["auto", "own", "shared"] = Field(
        "auto", description="z'_k: own split (auto: when data.test_samples_per_node is set)"
    )
    q: Literal["uniform", "one"] = Field("uniform", description="node weight q_k: 1/n or 1")
    checkpoint_every: int | None = Field(None, ge=1, description="checkpoint every k rounds")
    keep_checkpoints: int = Field(3, ge=1)
    resume: bool = False
    resume_round: int | None = Field(None, ge=0, description="default: this peer's latest")
    record_rounds: bool = Field(True, description="keep each round's proximal row")
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    init_method: str | None = Field(None, description="default: env:// (torchrun)")
    allow_network: bool = Field(False, description="permit a non-loopback rendezvous/interface")
    detection: DetectionSettings = DetectionSettings()
    fault: FaultSettings | None = None


def distributed_settings(cfg: RunConfig) -> DistributedSettings:
    """Validate ``cfg.experiment['distributed']``; raises :class:`ConfigError` naming the key."""
    raw: Any = (cfg.experiment or {}).get("distributed", {}) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"experiment.distributed must be a mapping, got {type(raw).__name__}")
    try:
        s = DistributedSettings.model_validate(raw)
    except ValidationError as err:
        lines = ["invalid configuration:"]
        for e in err.errors():
            loc = "experiment.distributed." + ".".join(str(p) for p in e["loc"])
            msg = e["msg"]
            if e["type"] == "extra_forbidden":
                msg = "unknown key (see docs/distributed.md for valid keys)"
            got = e.get("input")
            lines.append(f"  {loc}: {msg}" + ("" if isinstance(got, dict) else f" (got {got!r})"))
        raise ConfigError("\n".join(lines)) from None
    n = cfg.topology.n
    if s.fault is not None and s.fault.peer >= n:
        raise ConfigError(
            f"experiment.distributed.fault.peer: {s.fault.peer} out of range for topology.n={n}"
        )
    return s


def peer_plugin_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with the plug-ins a peer network runs, in the canonical sections: the config's
    ``observers:`` (plus a proximal observer from ``experiment.distributed`` when it has none —
    peers always measure their neighbours) and its ``policy:`` (or the legacy
    ``experiment.distributed.detection`` shorthand). The simulator's reference
    (:func:`~dice_influence.distributed.reference.simulate`) uses the same."""
    s = distributed_settings(cfg)
    observers = list(cfg.observers)
    if not any(o.get("kind") == "proximal" for o in observers):
        observers.append({"kind": "proximal", "readout": s.readout, "test_set": s.test_set,
                          "q": s.q, "history": False})
    policy = cfg.policy
    if policy is None and s.detection.enabled:
        policy = {"kind": "prune", "rule": "sign", "margin": s.detection.threshold,
                  "start": max(0, s.detection.warmup - 1), "readmit": False,
                  "max_norm_ratio": None}
    return cfg.model_copy(update={"observers": observers, "policy": policy})
