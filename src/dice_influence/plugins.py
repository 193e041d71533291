"""The catalogue of plug-ins of the one loop and the config sections that choose them.

A run config may hold three sections (validated like everything else; ``dice config`` lists
every kind with its keys):

```yaml
observers:                 # read what each round carries
  - kind: proximal         # online proximal influence (docs/method.md §5)
    readout: pre
policy:                    # decides W^t
  kind: prune              # detection + self-healing (docs/method.md §6)
  rule: sign
aggregator:                # how half steps are combined (default: the W^t matmul)
  kind: clipped_gossip
  delta: 0.2
```

Each kind is a pydantic settings model (light: no torch) plus a factory named by a dotted path,
imported only when a run is built. A new application adds its settings model and one line to
:data:`CATALOGUE`; nothing else changes. The simulator (:class:`~dice_influence.loop.Loop`),
``dice train`` and the peers (``dice launch``) all build their plug-ins here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class PluginSettings(BaseModel):
    """Base of every plug-in's settings: ``kind`` names it; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    kind: str


# ----------------------------------------------------------------------------- observers


class _TestRowSettings(PluginSettings):
    """Which of a receiver's test samples a tracked round reads (the observers that take test
    gradients online; one rule, ``dice_influence.loop.readout_rows``)."""

    test_batch: int | None = Field(
        None, ge=1, description="read m test samples per tracked round (default: the whole "
        "split; more than the split: the whole split)")
    test_batch_order: Literal["rotate", "first"] = Field(
        "rotate", description="with test_batch: consecutive slices of m samples, each for two "
        "tracked rounds, wrapping around (every sample equally often), or always the first m")


class ProximalSettings(_TestRowSettings):
    """Online proximal influence ``I_prox(j → k)`` on every edge (positive = harmful)."""

    kind: Literal["proximal"] = "proximal"
    readout: Literal["pre", "post", "midpoint"] = Field(
        "pre", description="G_k at θ_k^t (pre, the policy can act the same round), θ_k^{t+1} "
        "(post, paper Def. 4) or their mean")
    every: int = Field(1, ge=1, description="track every k-th round")
    window: int = Field(10, ge=1, description="rounds in the windowed score")
    history: bool = Field(True, description="keep every tracked round's increments")
    q: Literal["uniform", "one"] = Field("uniform", description="node weight q_k: 1/n or 1")
    test_set: Literal["auto", "own", "shared"] = Field(
        "auto", description="z'_k: each node's own split (auto: when "
        "data.test_samples_per_node is set) or the shared validation set")


class ContributionSettings(_TestRowSettings):
    """Node contribution: proximal outflow (a), adjoint contribution (b), reciprocity and
    free-rider statistics (negative = helpful; docs/contribution.md)."""

    kind: Literal["contribution"] = "contribution"
    readout: Literal["pre", "post", "midpoint"] = Field("pre", description="G_k of (a)")
    every: int = Field(1, ge=1, description="track (a) and free riders every k-th round")
    horizon: Literal["run", "window", "off"] = Field(
        "run", description="(b): one reverse sweep over the whole run, read out at its end "
        "(the leave-one-node-out horizon), one per window, or off")
    window: int = Field(10, ge=1, description="rounds per sweep with horizon: window")
    rounds: int | None = Field(None, ge=1, description="run length (default train.rounds)")
    curvature: Literal["exact", "none"] = Field(
        "exact", description="local-step Jacobian in the sweep: Hessian-vector products by "
        "automatic differentiation, or the identity (Hessian-free ablation)")
    exclude_self: bool = Field(False, description="leave each source's own test loss out of "
                               "its read-out (one sweep per receiver: n x the sweep's cost)")
    adjoint_test: Literal["shared", "own"] = Field(
        "shared", description="z' of (b): the shared validation set or each node's own split")
    q: Literal["uniform", "one"] = Field("uniform", description="node weight q_k: 1/n or 1")
    test_set: Literal["auto", "own", "shared"] = Field("auto", description="z'_k of (a)")
    free_rider_rule: Literal["rms", "t"] = Field(
        "rms", description="flag a neighbour whose updates' alignment with the receiver's "
        "descent direction is noise-sized (rms) or has no consistent sign (t)")
    z: float = Field(3.0, gt=0, description="free rider: sqrt(d) x rms alignment (or |t|) "
                     "below z")
    quorum: float = Field(0.5, ge=0, lt=1, description="free rider: share of out-neighbours "
                          "that must flag a node (strictly more than this)")


# ----------------------------------------------------------------------------- policies


class PruneSettings(PluginSettings):
    """Each node flags harmful in-neighbours from its own proximal-influence row and removes
    them from W^t (rows repaired by the one rule, docs/anomaly.md)."""

    kind: Literal["prune"] = "prune"
    rule: Literal["sign", "zscore", "sign_and_zscore", "sign_or_zscore"] = "sign"
    score: Literal["cumulative", "window"] = "cumulative"
    z_threshold: float = Field(3.0, gt=0)
    margin: float = Field(0.0, description="sign rule flags score > margin")
    check_every: int = Field(1, ge=1)
    start: int = Field(1, ge=0, description="first round index at which a node may prune")
    readmit: bool = Field(True, description="re-admit a neighbour whose score recovers")
    max_norm_ratio: float | None = Field(
        10.0, gt=1.0, description="also refuse updates larger than ratio x the median norm seen")


class _RewireSettings(PluginSettings):
    degree: int = Field(3, ge=1, description="in-neighbours each node keeps")
    every: int = Field(3, ge=1, description="rounds between rewirings (an epoch)")
    candidates: int = Field(6, ge=0, description="pool members the peer sampler adds per epoch")
    start: int = Field(0, ge=0, description="first round index at which a node may rewire")
    initial: Literal["none", "random"] = Field(
        "none", description="first neighbours: none (probe candidates first) or random")


class SelectSettings(_RewireSettings):
    """Collaborator selection: every epoch each node keeps the neighbours and sampled candidates
    whose measured influence on it was most helpful (the pool = the topology's links)."""

    kind: Literal["select"] = "select"
    score: Literal["link_exact", "link", "update"] = Field(
        "link_exact", description="link_exact: change of the node's test loss from mixing the "
        "sender's half step in; link: its first-order estimate; update: proximal influence of "
        "the sender's update (paper Def. 4)")
    bar: float | None = Field(None, description="keep a sender only if its score <= bar x the "
                              "node's own-update influence (default: link 1.0, update -0.5)")
    reciprocity: float = Field(0.0, ge=0.0, description="weight of what the sender measured "
                               "of this node (simulator only)")
    memory: float = Field(1.0, ge=0.0, le=1.0, description="decay of earlier probed epochs in "
                          "a sender's score (0: last epoch only, 1: plain mean)")


class PensSettings(_RewireSettings):
    """PENS-style selection: keep the neighbours and sampled candidates whose model has the
    lowest loss on the node's own training data."""

    kind: Literal["pens"] = "pens"
    samples: int | None = Field(None, ge=1, description="use only the first m local samples")


class InfluenceWeightSettings(PluginSettings):
    """Influence-weighted aggregation: W[k, j] scaled by 2*sigmoid(-z_kj / temperature), z = the
    neighbour's proximal influence over the median |influence| of k's neighbours."""

    kind: Literal["influence_weight"] = "influence_weight"
    temperature: float = Field(0.5, gt=0.0, description="large: nominal weights; small: hard")
    score: Literal["cumulative", "window"] = "cumulative"
    start: int = Field(0, ge=0, description="first round index reweighted")


# ----------------------------------------------------------------------------- aggregators


class ClippedGossipSettings(PluginSettings):
    """ClippedGossip (He, Karimireddy & Jaggi 2022)."""

    kind: Literal["clipped_gossip"] = "clipped_gossip"
    delta: float = Field(0.2, ge=0.0, lt=1.0, description="weight share clipped per receiver")


class TrimmedMeanSettings(PluginSettings):
    """Coordinate-wise trimmed mean over each node's in-neighbours and itself."""

    kind: Literal["trimmed_mean"] = "trimmed_mean"
    trim: float = Field(0.2, ge=0.0, lt=0.5, description="fraction trimmed at each end")


@dataclass(frozen=True)
class Entry:
    settings: type[PluginSettings]
    factory: str  # "module:function", called as factory(settings, ctx)


CATALOGUE: dict[str, dict[str, Entry]] = {
    "observer": {
        "proximal": Entry(ProximalSettings, "dice_influence.apps.proximal:from_settings"),
        "contribution": Entry(ContributionSettings,
                              "dice_influence.apps.contribution:from_settings"),
    },
    "policy": {
        "prune": Entry(PruneSettings, "dice_influence.apps.defense:from_settings"),
        "select": Entry(SelectSettings, "dice_influence.apps.selection:select_from_settings"),
        "pens": Entry(PensSettings, "dice_influence.apps.selection:pens_from_settings"),
        "influence_weight": Entry(InfluenceWeightSettings,
                                  "dice_influence.apps.weighting:from_settings"),
    },
    "aggregator": {
        "clipped_gossip": Entry(ClippedGossipSettings,
                                "dice_influence.apps.aggregators:from_settings"),
        "trimmed_mean": Entry(TrimmedMeanSettings, "dice_influence.apps.aggregators:from_settings"),
    },
}
SECTIONS = {"observer": "observers", "policy": "policy", "aggregator": "aggregator"}


def parse(role: str, raw: Any, where: str) -> PluginSettings:
    """Validate one plug-in mapping of ``role`` (observer, policy, aggregator); raise
    ValueError naming ``where`` (e.g. ``observers.0``) and the fix."""
    kinds = CATALOGUE[role]
    if not isinstance(raw, dict) or "kind" not in raw:
        raise ValueError(f"{where}: needs a mapping with 'kind' (one of {', '.join(kinds)})")
    kind = raw["kind"]
    if kind not in kinds:
        from difflib import get_close_matches

        close = get_close_matches(str(kind), list(kinds), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"{where}.kind: unknown {role} {kind!r}{hint} (choose one of "
                         f"{', '.join(kinds)}; `dice config` lists their keys)")
    try:
        return kinds[kind].settings.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key (`dice config` lists the valid keys)" \
            if e["type"] == "extra_forbidden" else e["msg"]
        got = e.get("input")
        raise ValueError(f"{where}.{loc}: {msg}"
                         + ("" if isinstance(got, dict) else f" (got {got!r})")) from None


def catalogue_text() -> str:
    """Every plug-in kind with its keys and defaults, as YAML comments (for ``dice config``)."""
    import yaml

    lines = ["", "# plug-ins of the training loop (sections observers: / policy: / aggregator:):"]
    for role, kinds in CATALOGUE.items():
        for kind, entry in kinds.items():
            doc = (entry.settings.__doc__ or "").strip().splitlines()[0]
            lines.append(f"#   {SECTIONS[role]}: kind {kind} - {doc}")
            body = yaml.safe_dump(entry.settings().model_dump(mode="json"), sort_keys=False)
            lines += [f"#     {ln}" for ln in body.strip().splitlines()]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- building


@dataclass
class Plugins:
    """The plug-ins of one run: observers (in order), a policy, and the aggregator (which is
    part of the round: it goes into the :class:`~dice_influence.problem.Problem`)."""

    observers: list[Any] = field(default_factory=list)
    policy: Any = None
    aggregator: Any = None

    def find(self, kind: str) -> Any:
        """The first observer of ``kind`` (None if absent)."""
        return next((o for o in self.observers if getattr(o, "name", None) == kind), None)


@dataclass
class BuildContext:
    """What a factory may use: ``n`` nodes, the problem (simulator) or local problem (peer),
    and the plug-ins built so far (a policy finds the observer it reads here)."""

    n: int
    problem: Any
    plugins: Plugins


def _factory(entry: Entry) -> Any:
    mod, fn = entry.factory.split(":")
    return getattr(importlib.import_module(mod), fn)


def build(cfg: Any, problem: Any, *, defaults: list[dict[str, Any]] | None = None) -> Plugins:
    """Build the config's plug-ins for ``problem``. ``defaults``: observer mappings added when
    the config has no observer of that kind (the peers always track proximal influence)."""
    out = Plugins()
    ctx = BuildContext(n=cfg.topology.n, problem=problem, plugins=out)
    raws = list(cfg.observers)
    have = {r["kind"] for r in raws}
    raws += [d for d in (defaults or []) if d["kind"] not in have]
    for i, raw in enumerate(raws):
        s = parse("observer", raw, f"observers.{i}")
        out.observers.append(_factory(CATALOGUE["observer"][s.kind])(s, ctx))
    if cfg.policy is not None:
        s = parse("policy", cfg.policy, "policy")
        out.policy = _factory(CATALOGUE["policy"][s.kind])(s, ctx)
    out.aggregator = build_aggregator(cfg)
    return out


def build_aggregator(cfg: Any) -> Any:
    """The config's aggregator (None: the ``W^t`` matmul). Stateless, part of the round."""
    if cfg.aggregator is None:
        return None
    s = parse("aggregator", cfg.aggregator, "aggregator")
    return _factory(CATALOGUE["aggregator"][s.kind])(s, None)


# ----------------------------------------------------------------------------- checkpoints


def _all(plugins: Plugins) -> list[Any]:
    return [*plugins.observers, *([plugins.policy] if plugins.policy is not None else [])]


def pack_states(plugins: Plugins) -> tuple[dict[str, Any], str]:
    """Every plug-in's :meth:`state_dict` as tensors (arrays, keyed ``plugin/<i>/<key>``) and
    one JSON string (everything else), for a safetensors checkpoint."""
    import json

    import numpy as np
    import torch

    tensors: dict[str, Any] = {}
    meta: list[dict[str, Any]] = []
    for i, p in enumerate(_all(plugins)):
        rest = {}
        for key, val in _flatten(p.state_dict()).items():
            if isinstance(val, np.ndarray):
                tensors[f"plugin/{i}/{key}"] = torch.from_numpy(np.ascontiguousarray(val))
            else:
                rest[key] = val
        meta.append({"name": getattr(p, "name", type(p).__name__), "state": rest})
    return tensors, json.dumps(meta)


def unpack_states(plugins: Plugins, tensors: dict[str, Any], meta: str) -> None:
    """Restore what :func:`pack_states` wrote (the same plug-ins, in the same order)."""
    import json

    entries = json.loads(meta)
    live = _all(plugins)
    names = [getattr(p, "name", type(p).__name__) for p in live]
    if [e["name"] for e in entries] != names:
        raise ValueError(f"checkpoint holds plug-ins {[e['name'] for e in entries]} but this run "
                         f"has {names}; resume with the config that wrote it")
    for i, (p, e) in enumerate(zip(live, entries, strict=True)):
        flat = dict(e["state"])
        pre = f"plugin/{i}/"
        flat.update({k[len(pre):]: v.numpy() for k, v in tensors.items() if k.startswith(pre)})
        p.load_state_dict(_unflatten(flat))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out
