"""Malicious behaviours as declarative specs (docs/method.md §6, issue 4).

An :class:`AttackSpec` names a behaviour and the nodes that show it (explicit ids, a count, or
a fraction of the network, drawn with a seed). Two levels:

- **data level** (``label_flip``, ``random_labels``, ``gaussian_noise``): the node trains
  honestly on corrupted local data. These reuse :class:`dice_influence.data.Corruption`
  through the config's ``data.corruptions`` (:func:`with_data_attacks`), so the simulator
  itself builds the poisoned node data.
- **update level** (``scale`` / ``sign_flip``, ``update_noise``, ``free_rider``): the node
  computes an honest local step ``u`` and then sends a manipulated one,
  ``θ_j^{t+½} = θ_j^t + û_j`` with ``û = s·u`` (scale / sign flip), ``û = u + σ·ε``
  (``ε ~ N(0, I)``, parameter units), ``û = 0`` (free rider: does not train and re-sends the
  model it holds, i.e. what it received) or ``û = σ·ε`` (``free_rider_noise``: re-sends it plus
  small noise, so that it looks like it trained). :class:`AttackPlan` applies them in place each round.

Nodes of specs given by ``count`` / ``node_fraction`` are the first ones of one seeded
permutation of all nodes, so two specs with ``count: 1`` hit the same node (combined attacks);
explicit ``nodes`` are used as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .config import CorruptionConfig, RunConfig
from .loop import Transform

DATA_KINDS = ("label_flip", "random_labels", "gaussian_noise")
UPDATE_KINDS = ("scale", "sign_flip", "update_noise", "free_rider", "free_rider_noise")
ATTACK_KINDS = DATA_KINDS + UPDATE_KINDS


class AttackSpec(BaseModel):
    """One malicious behaviour on chosen nodes.

    ``nodes`` (ids) or ``count`` or ``node_fraction`` (of all n nodes) selects the attackers;
    ``fraction`` is the fraction of each attacker's *data* altered (data level); ``sigma`` the
    noise std (feature units for ``gaussian_noise``, parameter units for ``update_noise`` and
    ``free_rider_noise``);
    ``scale`` the factor ``s`` in ``û = s·u`` (``sign_flip`` defaults to −1); ``start`` the
    first round an update-level attack is active.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal[
        "label_flip",
        "random_labels",
        "gaussian_noise",
        "scale",
        "sign_flip",
        "update_noise",
        "free_rider",
        "free_rider_noise",
    ]
    nodes: list[int] | None = None
    count: int | None = Field(None, ge=0)
    node_fraction: float | None = Field(None, ge=0.0, le=1.0)
    fraction: float = Field(1.0, ge=0.0, le=1.0)
    sigma: float = Field(1.0, ge=0.0)
    scale: float = -1.0
    permutation: list[int] | None = None
    start: int = Field(0, ge=0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _one_selector(self) -> AttackSpec:
        given = [k for k in ("nodes", "count", "node_fraction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"attack {self.kind!r}: give exactly one of nodes, count, node_fraction "
                f"(got {given or 'none'})"
            )
        if not math.isfinite(self.scale):
            raise ValueError(f"attack scale={self.scale} must be finite")
        return self

    @property
    def level(self) -> str:
        return "data" if self.kind in DATA_KINDS else "update"


def choose_nodes(spec: AttackSpec, n: int, seed: int) -> list[int]:
    """The attacker ids of ``spec`` in a network of ``n`` nodes (seeded by ``seed``)."""
    if spec.nodes is not None:
        bad = [k for k in spec.nodes if not 0 <= k < n]
        if bad:
            raise ValueError(f"attack {spec.kind!r}: node ids {bad} out of range 0..{n - 1}")
        return sorted(set(int(k) for k in spec.nodes))
    count = spec.count if spec.count is not None else int(round(spec.node_fraction * n))
    if count > n:
        raise ValueError(f"attack {spec.kind!r}: count={count} exceeds n={n} nodes")
    perm = np.random.default_rng([int(seed), 0xA77AC]).permutation(n)
    return sorted(int(k) for k in perm[:count])


@dataclass
class AttackPlan:
    """Resolved attacks of one run: who does what. ``malicious`` is the union of attackers."""

    specs: tuple[AttackSpec, ...]
    nodes: tuple[tuple[int, ...], ...]
    n: int
    seed: int

    @classmethod
    def resolve(cls, specs: Sequence[AttackSpec], n: int, seed: int) -> AttackPlan:
        return cls(tuple(specs), tuple(tuple(choose_nodes(s, n, seed)) for s in specs), n, seed)

    @property
    def malicious(self) -> list[int]:
        return sorted({k for ks in self.nodes for k in ks})

    @property
    def honest(self) -> list[int]:
        bad = set(self.malicious)
        return [k for k in range(self.n) if k not in bad]

    @property
    def mask(self) -> np.ndarray:
        """(n,) bool, True for malicious nodes."""
        m = np.zeros(self.n, dtype=bool)
        m[self.malicious] = True
        return m

    @property
    def has_update_attacks(self) -> bool:
        return any(s.level == "update" for s in self.specs)

    def corruptions(self) -> list[CorruptionConfig]:
        """The data-level attacks as ``data.corruptions`` entries."""
        out = []
        for spec, ks in zip(self.specs, self.nodes, strict=True):
            if spec.level == "data" and ks:
                out.append(
                    CorruptionConfig(
                        kind=spec.kind,
                        nodes=list(ks),
                        fraction=spec.fraction,
                        sigma=spec.sigma,
                        permutation=spec.permutation,
                        seed=spec.seed,
                    )
                )
        return out

    def _update_rows(self, t: int, ids: list[int]) -> list[tuple[int, AttackSpec, list[int]]]:
        """``(spec index, spec, row positions)`` of the update attacks active at round ``t``
        on some row of ``ids`` (ids may repeat: stacked copies), in the plan's order."""
        out = []
        for i, (spec, ks) in enumerate(zip(self.specs, self.nodes, strict=True)):
            mine = set(ks)
            rows = [r for r, k in enumerate(ids) if k in mine]
            if spec.level == "update" and rows and t >= spec.start:
                out.append((i, spec, rows))
        return out

    def apply_updates(self, U: torch.Tensor, t: int, ids: Sequence[int] | None = None) -> list[int]:
        """Replace attackers' honest updates in place with what they send at round ``t``.

        ``U`` holds the updates of nodes ``ids`` (row ``i`` = node ``ids[i]``; default: all
        ``n`` nodes, row = node id). Returns the rows changed (their half step must be rebuilt
        as ``θ^t + U``). Noise for node ``k`` depends only on (seed, spec, t, k), so a peer that
        holds only its own row draws the same noise as the simulator."""
        ids = list(range(U.shape[0])) if ids is None else [int(k) for k in ids]
        changed: list[int] = []
        for i, spec, rows in self._update_rows(t, ids):
            idx = torch.tensor(rows, device=U.device)
            if spec.kind in ("scale", "sign_flip"):
                U[idx] *= spec.scale
            elif spec.kind == "free_rider":
                U[idx] = 0.0
            else:  # update_noise, free_rider_noise (the same noise on a zero update)
                if spec.kind == "free_rider_noise":
                    U[idx] = 0.0
                for r in rows:
                    gen = torch.Generator(device="cpu").manual_seed(
                        ((self.seed * 1_000_003 + spec.seed * 7919 + i) * 100_003 + t)
                        * 1_000_033 + ids[r]
                    )
                    noise = torch.randn(U.shape[1], generator=gen, dtype=U.dtype)
                    U[r] += spec.sigma * noise.to(U.device)
            changed.extend(rows)
        return sorted(set(changed))

    def transpose_updates(self, lam: torch.Tensor, t: int,
                          ids: Sequence[int] | None = None) -> torch.Tensor:
        """The transpose of :meth:`apply_updates`'s map at round ``t`` applied to ``lam`` (a new
        tensor): every update attack is a per-row scale (``scale``, ``sign_flip``), a zeroing
        (``free_rider``, ``free_rider_noise``) or an added constant (``update_noise``: no
        linear part), so its transpose scales, zeroes or keeps the row; no noise is drawn."""
        ids = list(range(lam.shape[0])) if ids is None else [int(k) for k in ids]
        out = lam.clone()
        # reverse order, as the vjp of the forward map runs (same bits where scales stack)
        for _, spec, rows in reversed(self._update_rows(t, ids)):
            idx = torch.tensor(rows, device=lam.device)
            if spec.kind in ("scale", "sign_flip"):
                out[idx] *= spec.scale
            elif spec.kind in ("free_rider", "free_rider_noise"):
                out[idx] = 0.0
        return out


class UpdateAttacks(Transform):
    """The plan's update-level attacks as a transform of the one loop (part of the round, so
    replays repeat them)."""

    name = "update_attacks"

    def __init__(self, plan: AttackPlan) -> None:
        self.plan = plan
        self._starts = [s.start for s in plan.specs if s.level == "update"]

    def active(self, t: int) -> bool:
        return any(t >= s for s in self._starts)

    def apply(self, t: int, ids: Sequence[int], U: torch.Tensor) -> list[int]:
        return self.plan.apply_updates(U, t, ids)

    def transpose(self, t: int, ids: Sequence[int], lam: torch.Tensor) -> torch.Tensor:
        return self.plan.transpose_updates(lam, t, ids)


def attack_transforms(plan: AttackPlan | None) -> tuple[Transform, ...]:
    """The transforms a problem needs for ``plan`` (empty without update-level attacks)."""
    return (UpdateAttacks(plan),) if plan is not None and plan.has_update_attacks else ()


def with_data_attacks(cfg: RunConfig, plan: AttackPlan) -> RunConfig:
    """A copy of ``cfg`` whose ``data.corruptions`` also hold the plan's data-level attacks."""
    extra = plan.corruptions()
    if not extra:
        return cfg
    data = cfg.data.model_copy(update={"corruptions": [*cfg.data.corruptions, *extra]})
    return cfg.model_copy(update={"data": data})
