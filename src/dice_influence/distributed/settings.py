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


class LieSettings(_Strict):
    """A drill for measuring honesty (docs/contribution.md, "Honesty"): peer ``peer`` corrupts
    every adjoint it sends in the sweep — ``scale`` (× ``factor``), ``sign`` (× −1) or
    ``random`` (a Gaussian vector of the same norm, seeded)."""

    peer: int = Field(..., ge=0)
    kind: Literal["scale", "sign", "random"] = "scale"
    factor: float = Field(10.0, allow_inf_nan=False)


class SweepSettings(_Strict):
    """The reverse sweep on the peers (docs/distributed.md, "contribution on real peers"): run
    when the config has a ``contribution`` observer with a horizon (``run``: once after
    training; ``window``: at the end of every window of ``window`` rounds)."""

    enabled: bool | None = Field(None, description="default: when the config has a "
                                 "contribution observer whose horizon is not off")
    checkpoint_every: int | None = Field(
        None, ge=1, description="c: keep θ and the optimizer state every c rounds and replay "
        "a segment (over the network) during the sweep: O(T/c + c) parameter vectors; "
        "default ceil(sqrt(T)) for a window of T rounds")
    targets: Literal["both", "primary"] = Field(
        "primary", description="primary: the observer's target only (adjoint_test); both: also "
        "the other one (shared validation set / each peer's own test split) when it exists")
    scores: bool = Field(True, description="write every trained sample's score")
    max_norm_ratio: float | None = Field(
        5.0, gt=1, allow_inf_nan=False,
        description="norm bound on the reverse messages: an incoming adjoint longer than "
        "this ratio times the receiver's own cotangent (times the nominal edge weight) is "
        "replaced by that estimate and logged (null: no bound)")
    min_cosine: float | None = Field(
        0.5, ge=-1, le=1, allow_inf_nan=False,
        description="direction check on the reverse messages: an incoming adjoint whose cosine "
        "with the receiver's own cotangent is below this is replaced the same way (null: off)")
    lie: LieSettings | None = Field(None, description="honesty drill: one peer corrupts its "
                                    "adjoint messages")


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
    sweep: SweepSettings = SweepSettings()
    attacks: bool = Field(False, description="run experiment.attacks (free riders, update "
                          "and data attacks) on the peers, as `dice experiment` does")
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
    if s.sweep.lie is not None and s.sweep.lie.peer >= n:
        raise ConfigError(f"experiment.distributed.sweep.lie.peer: {s.sweep.lie.peer} out of "
                          f"range for topology.n={n}")
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
